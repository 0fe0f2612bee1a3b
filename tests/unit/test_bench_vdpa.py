"""bench/vdpa.py without a guest: it imports, ``python3 -m bench`` lists it, its options parse (and
bad ones are refused), and the command it hands the guest parses back to the same options. The
bench itself boots the kernel tier's guest (``python3 -m bench vdpa``)."""

from __future__ import annotations

import contextlib
import io
import shlex
import unittest

from bench import __main__ as bench_main
from bench import vdpa
from tests import guest


class BenchVdpaTest(unittest.TestCase):
    def test_listed_by_python_m_bench(self) -> None:
        self.assertIn("vdpa", bench_main.BENCHMARKS)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(bench_main.main([]), 2)
        self.assertRegex(out.getvalue(), r"\n  vdpa +in a QEMU guest")

    def test_defaults(self) -> None:
        args = vdpa.parse_args([])
        self.assertEqual((args.seconds, args.mib, args.timeout, args.in_guest), (2.0, 16, 600.0, False))

    def test_options(self) -> None:
        args = vdpa.parse_args(["--seconds", "0.5", "--mib", "4", "--timeout", "300"])
        self.assertEqual((args.seconds, args.mib, args.timeout), (0.5, 4, 300.0))

    def test_bad_options_are_refused(self) -> None:
        for argv in (["--seconds", "0"], ["--seconds", "-1"], ["--mib", "0"], ["--mib", "33"], ["--mib", "x"],
                     ["--frobnicate"]):
            with self.subTest(argv=argv), contextlib.redirect_stderr(io.StringIO()) as err, \
                    self.assertRaises(SystemExit) as raised:
                vdpa.parse_args(argv)
            self.assertEqual(raised.exception.code, 2)
            self.assertIn("usage: python3 -m bench vdpa", err.getvalue())

    def test_the_guest_runs_the_bench_with_the_same_options(self) -> None:
        args = vdpa.parse_args(["--seconds", "1.5", "--mib", "8"])
        argv = shlex.split(vdpa.guest_script(args))
        self.assertEqual(argv[:5], ["exec", "python3", "-m", "bench", "vdpa"])
        self.assertIn("--json", argv)          # the host reads the guest's last line
        inner = vdpa.parse_args([a for a in argv[5:] if a != "--json"])
        self.assertEqual((inner.seconds, inner.mib, inner.in_guest), (1.5, 8, True))

    def test_the_guest_carries_the_modules_in_binding_order(self) -> None:
        self.assertEqual([m for m in vdpa.GUEST_MODULES if m not in guest.IMAGE_MODULES], [])
        # A new vDPA device binds to the vdpa driver registered first: virtio_vdpa for the VDUSE disk.
        self.assertLess(vdpa.GUEST_MODULES.index("virtio_vdpa"), vdpa.GUEST_MODULES.index("vhost_vdpa"))


if __name__ == "__main__":
    unittest.main()
