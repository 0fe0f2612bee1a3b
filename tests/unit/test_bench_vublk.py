"""bench/vublk.c, the C front-end ``python3 -m bench blk`` measures with, checked against our blk
back-end: it builds, completes requests, and what it writes is in the image and what it reads is
checked (a benchmark client that lies is worthless). Its null back-end completes requests too; and
bench blk's table, printed and in the README's Markdown, from one row of figures."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import unittest

from bench import vublk
from tests.support import require, run_server, stop_process, wait_for_path
from vhost_min.trace import FRONTEND, Record, Tracer
from vhost_min.user import FRONTEND_REQUESTS, VHOST_USER_NEED_REPLY_MASK

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IMAGE_SIZE = 1 << 20
SEED = 0x5EED


class VublkDriverTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        require(vublk.compiler() is not None, "a C compiler (cc)", vublk.CC_INSTALL)
        cls.binary = vublk.build()

    def setUp(self) -> None:
        self.work = tempfile.TemporaryDirectory(prefix="vhost_min-test-vublk-")
        self.addCleanup(self.work.cleanup)
        self.image = os.path.join(self.work.name, "disk.img")
        with open(self.image, "wb") as f:
            f.truncate(IMAGE_SIZE)

    def _ours(self) -> tuple[subprocess.Popen, str]:
        return self._ours_on("blk.sock")

    def _ours_on(self, name: str) -> tuple[subprocess.Popen, str]:
        sock = os.path.join(self.work.name, name)
        proc = subprocess.Popen([sys.executable, "-m", "vhost_min", "blk", "--socket-path", sock, self.image],
                                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.addCleanup(stop_process, proc)
        wait_for_path(sock, proc)
        return proc, sock

    def test_what_it_reads_is_checked_and_what_it_writes_is_in_the_image(self) -> None:
        with open(self.image, "r+b") as f:                # every block holds the pattern of SEED
            f.write(vublk.pattern(SEED, 0, IMAGE_SIZE))
        proc, sock = self._ours()
        for rw, bs, qd, event_idx, wait_call in (("randread", 4096, 8, True, True), ("read", 65536, 4, False, True),
                                                 ("randread", 4096, 1, False, False)):
            with self.subTest(rw=rw, bs=bs, qd=qd, event_idx=event_idx, wait_call=wait_call):
                read = vublk.drive(self.binary, sock, rw, bs, qd, 0.3, warmup=0, pattern=SEED, event_idx=event_idx,
                                   wait_call=wait_call, backend_pid=proc.pid)
                self.assertGreater(read["requests"], 0)
                self.assertEqual((read["returncode"], read["bad_status"], read["mismatches"], read["capacity"]),
                                 (0, 0, 0, IMAGE_SIZE))
                self.assertGreater(read["backend_cpu_s"], 0)
        lie = vublk.drive(self.binary, sock, "randread", 4096, 4, 0.2, warmup=0, pattern=SEED + 1, wait_call=True)
        self.assertEqual(lie["returncode"], 3, "reads of other bytes than the pattern are reported")
        self.assertGreater(lie["mismatches"], 0)

        # Sequential writes from block 0, waiting on the call eventfd (a busy-polling driver on the
        # back-end's core would starve it): each block once, the whole image gets the pattern of another seed.
        blocks = IMAGE_SIZE // 4096
        wrote = vublk.drive(self.binary, sock, "write", 4096, 8, 30, warmup=0, pattern=SEED + 2, wait_call=True,
                            count=blocks)
        self.assertEqual((wrote["returncode"], wrote["bad_status"], wrote["requests"]), (0, 0, blocks))
        with open(self.image, "rb") as f:
            self.assertTrue(f.read() == vublk.pattern(SEED + 2, 0, IMAGE_SIZE), "the image holds what was written")
        again = vublk.drive(self.binary, sock, "randread", 4096, 8, 0.2, warmup=0, pattern=SEED + 2, wait_call=True)
        self.assertEqual((again["returncode"], again["mismatches"]), (0, 0))

    def test_handshakes_time_each_connection_and_fail_loudly(self) -> None:
        proc, sock = self._ours()
        for need_reply in ("all", "mem-table"):
            with self.subTest(need_reply=need_reply):
                run = vublk.handshakes(self.binary, sock, 3, need_reply=need_reply, backend_pid=proc.pid)
                self.assertEqual((run["handshakes"], run["need_reply"]), (3, need_reply))
                for n in range(3):      # the phases add up to the whole, each one took time
                    phases = [run[f"{phase}_us"][n] for phase in ("connect", "bring_up", "first_read")]
                    self.assertTrue(all(t > 0 for t in phases), phases)
                    self.assertAlmostEqual(sum(phases), run["ready_us"][n], delta=0.5)
                self.assertGreater(run["backend_cpu_s"], 0)
        with self.assertRaisesRegex(RuntimeError, "exited with 1"):
            vublk.handshakes(self.binary, os.path.join(self.work.name, "nobody.sock"), 1)

        # On the wire (through our Tracer): NEED_REPLY on every request without a reply of its own
        # once REPLY_ACK is acked, or on SET_MEM_TABLE alone, as the mode says.
        records: list = []
        traced = os.path.join(self.work.name, "trace.sock")
        run_server(self, Tracer(traced, sock, records.append))
        for session, need_reply in enumerate(("all", "mem-table")):
            vublk.handshakes(self.binary, traced, 1, need_reply=need_reply)
            sent = [r for r in records if isinstance(r, Record) and r.session == session and r.sender == FRONTEND]
            asked = [r.name for r in sent if r.flags & VHOST_USER_NEED_REPLY_MASK]
            after_ack = [r.name for r in sent[[r.name for r in sent].index("VHOST_USER_SET_PROTOCOL_FEATURES") + 1:]
                         if not FRONTEND_REQUESTS[r.request].reply]
            with self.subTest(need_reply=need_reply):
                self.assertIn("VHOST_USER_SET_VRING_KICK", after_ack)
                self.assertEqual(asked, after_ack if need_reply == "all" else ["VHOST_USER_SET_MEM_TABLE"])
        with open(self.image, "r+b") as f:      # smaller than the first read: refused, not timed
            f.truncate(512)
        proc, sock = self._ours_on("small.sock")
        with self.assertRaisesRegex(RuntimeError, "capacity unknown or too small"):
            vublk.handshakes(self.binary, sock, 1)

    def test_the_null_backend_completes_every_request(self) -> None:
        with vublk.null_backend(self.binary, self.work.name, size=IMAGE_SIZE) as null:
            for event_idx, wait_call in ((False, False), (True, True)):
                with self.subTest(event_idx=event_idx, wait_call=wait_call):
                    run = vublk.drive(self.binary, null.socket, "randwrite", 4096, 32, 0.3, warmup=0,
                                      event_idx=event_idx, wait_call=wait_call, backend_pid=null.pid)
                    self.assertEqual((run["returncode"], run["bad_status"], run["capacity"]), (0, 0, IMAGE_SIZE))
                    self.assertGreater(run["requests"], 1000)


if __name__ == "__main__":
    unittest.main()


class BenchBlkTableTest(unittest.TestCase):
    """bench blk's table (printed and the README's Markdown) from one row of figures."""

    def test_a_row_shows_each_side_the_ratio_and_the_ceiling(self) -> None:
        from bench import blk
        side = {"iops": 20000.0, "mib_s": 78.1, "cpu_us_per_req": 10.0, "backend_busy": 0.2, "lat_us_p50": 12.5,
                "threads": 1, "core_other": 0.031}
        row = {"bs": 4096, "ours": side, "theirs": dict(side, iops=40000.0, cpu_us_per_req=12.5, threads=60,
                                                         core_other=None),
               "null": dict(side, iops=500000.0), "ratio": 0.5, "cpu_ratio": 0.8}
        columns, lines = blk.table_rows({"randread_4k_qd32": row})
        self.assertEqual(lines, [["randread_4k_qd32", "IOPS", 20000.0, 40000.0, 0.5, 500000.0, 10.0, 12.5, 0.8,
                                  "20/20", "3/-", "12.5/12.5", "1/60"]])
        text = blk.markdown(columns, lines).splitlines()
        self.assertEqual(len(text), 3)
        self.assertEqual(text[2], "| randread_4k_qd32 | IOPS | 20,000 | 40,000 | 0.50 | 500,000 | 10.00 | 12.50 | 0.80 "
                                  "| 20/20 | 3/- | 12.5/12.5 | 1/60 |")
