"""vhost_min on aarch64: Debian 12's arm64 python3.11 under qemu-aarch64-static runs our code.

On aarch64 vhost_min takes paths x86-64 never runs: its barriers are hand-encoded ``dmb ish`` /
``dmb ishld`` / ``dmb ishst`` and an ``ldaxrb``/``stlxrb`` loop, written to an executable page
and called through ctypes after libgcc's __clear_cache, and the rings call read and write
barriers that are None on x86-64. Two tests:

- the barrier code as QEMU's own disassembler shows it when it executes it (``-d in_asm``):
  exactly the intended instructions at the addresses vhost_min calls, and the atomic OR's result;
- the whole unit tier in the emulated interpreter (the memory, split, packed and fork-based
  stress tests, inflight, our front-end against our back-end, ``python -m vhost_min`` child
  processes), after it checked that it is aarch64 with vhost_min on the aarch64 machine code and
  real read/write barriers, so it fails rather than silently testing x86-64 paths. Only what the
  emulator cannot do is skipped (tests.aarch64.EMULATOR_GAPS, each with its reason).

What emulation cannot show: that the barriers are sufficient on weakly ordered hardware (TCG on
x86-64 keeps the host's order; the litmus and two-process tests also pass with a ``nop`` in place
of ``dmb ish`` here). That is what the disassembly check is for.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
import unittest

from tests import aarch64

#: Chains per split stress case (half per packed case); about 15 s of the run under emulation.
STRESS_CHAINS = 10000
#: The fuzz test's share of its cases under qemu-user (5%: the emulated interpreter is ~10x slower).
FUZZ_SCALE = "0.05"
#: The emulated unit tier takes about 100 s on two cores (building the root once, 5 s more).
TIMEOUT = 420
#: Tests (ids, or module prefixes) that must be among those that ran and passed: the aarch64
#: barriers and atomics, the engines, fork-based stress, and front-end against back-end.
MUST_RUN = (
    "tests.unit.test_memory.BarrierTest.test_barriers_run",
    "tests.unit.test_memory.BarrierTest.test_the_code_page_is_never_writable_and_executable",
    "tests.unit.test_memory.DirtyLogTest.test_atomic_or_from_two_processes",
    "tests.unit.test_vring_split.", "tests.unit.test_vring_packed.", "tests.unit.test_inflight.",
    "tests.unit.test_vring_stress.SplitStressTest.test_two_processes_event_idx_on",
    "tests.unit.test_vring_stress.PackedStressTest.test_two_processes_event_idx_on",
    "tests.unit.test_backend.", "tests.unit.test_frontend.",
    "tests.unit.test_blk.EndToEndTest.test_write_read_flush",
    "tests.unit.test_blk.EndToEndTest.test_packed_ring",
    "tests.unit.test_cli.DemoTest.test_demo_verifies_and_summarizes",
)

#: Calls each barrier once and prints where each function is, for the disassembly check.
CALL_BARRIERS = """
import ctypes, json
from vhost_min.memory import barriers
b = barriers()
b.full(); b.read(); b.write()
cell = ctypes.create_string_buffer(b"\\x10")
b.atomic_or8(ctypes.addressof(cell), 0x21)
print(json.dumps({"how": b.how, "or": cell.raw[0],
                  **{n: ctypes.cast(getattr(b, n), ctypes.c_void_p).value for n in ("full", "read", "write", "atomic_or8")}}))
"""

#: The instructions each function must consist of (Arm ARM mnemonics, up to and including ret).
EXPECTED = {
    "full": ["dmb ish", "ret"],
    "read": ["dmb ishld", "ret"],
    "write": ["dmb ishst", "ret"],
    "atomic_or8": ["ldaxrb w2, [x0]", "orr w2, w2, w1", "stlxrb w3, w2, [x0]", "cbnz w3, #{start:#x}", "ret"],
}


class Aarch64Test(unittest.TestCase):
    def setUp(self):
        aarch64.require_emulator()
        start = time.monotonic()
        self.root = aarch64.ensure_root()
        self.ready = time.monotonic()
        print(f"\n[{self.id()}] arm64 root ready in {self.ready - start:.1f} s", flush=True)

    def emulated(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(aarch64.python_command(self.root, *args), cwd=aarch64.PROJECT_ROOT,
                              env=aarch64.python_env(**env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)

    def test_barrier_code_as_qemu_disassembles_it(self):
        with tempfile.TemporaryDirectory(prefix="vhost-min-a64-") as work:
            log = os.path.join(work, "in_asm.log")
            proc = self.emulated("-c", CALL_BARRIERS, QEMU_LOG="in_asm", QEMU_LOG_FILENAME=log)
            self.assertEqual(proc.returncode, 0, proc.stdout)
            with open(log, errors="replace") as f:
                executed = {int(a, 16): " ".join(text.split()) for a, text in
                            re.findall(r"^0x([0-9a-f]+):\s+[0-9a-f]{8}\s+(.*)$", f.read(), re.M)}
        got = json.loads(proc.stdout.splitlines()[-1])
        self.assertEqual(got["how"], aarch64.AARCH64_BARRIERS)
        self.assertEqual(got["or"], 0x31)
        for name, expected in EXPECTED.items():
            start = got[name]
            code = []
            while not code or (code[-1] != "ret" and len(code) < len(expected)):
                code.append(executed.get(start + 4 * len(code), "(not executed)"))
            self.assertEqual(code, [e.format(start=start) for e in expected], f"barriers().{name} at {start:#x}")
            print(f"  {name} at {start:#x}: {'; '.join(code)}")

    def test_unit_tier_on_arm64_python(self):
        proc = self.emulated("-c", "import sys, tests.aarch64; sys.exit(tests.aarch64.inside(['unit', '-v']))",
                             VHOST_MIN_STRESS_CHAINS=str(STRESS_CHAINS), VHOST_MIN_FUZZ_SCALE=FUZZ_SCALE)
        out = proc.stdout
        lines = out.rstrip("\n").splitlines()
        tail = "\n".join(lines[-60:])
        report = out[out.rfind("\nskipped:\n") + 1:] if "\nskipped:\n" in out else "\n".join(lines[-2:])
        print(f"emulated unit tier in {time.monotonic() - self.ready:.1f} s\n{lines[0] if lines else ''}\n{report}",
              end="", flush=True)
        self.assertIn("machine aarch64, python 3.11", out, tail)
        self.assertIn(f"barriers: {aarch64.AARCH64_BARRIERS}, read yes, write yes", out, tail)
        self.assertEqual(proc.returncode, 0, tail)
        summary = re.fullmatch(r"(\d+) passed, 0 failed, (\d+) skipped", lines[-1])
        self.assertIsNotNone(summary, tail)
        # Nothing skipped but the emulator's known gaps (a skip elsewhere could hide a module) ...
        skipped = re.findall(r"^  (tests\.\S+): ", out, re.M)
        self.assertEqual(len(skipped), int(summary[2]), tail)
        self.assertEqual([t for t in skipped if t not in aarch64.EMULATOR_GAPS], [], tail)
        # ... and what this test is for among what ran (-v prints "name (id) ... ok").
        self.assertEqual([t for t in MUST_RUN if f"({t}" not in out or t in skipped], [], tail)


if __name__ == "__main__":
    unittest.main()
