"""The whole unit tier inside the test guest: proof that vhost_min works on a minimal image.

The guest of tests/guest.py is Debian's python3.11-minimal with its standard library and nothing
else: no pip, no site-packages, no compiler, no C headers, busybox for a shell, one CPU under TCG.
It boots once and runs exactly what a developer runs on the host, ``python3 -m tests unit -v``,
on a copy of the tree taken when the test starts (others may edit the working tree during those
minutes), shared read-only over 9p (so no bytecode is written either). The test asserts on
the runner's last line, ``N passed, 0 failed, M skipped``:

- every test the host discovers in that copy was started in the guest (a module that failed
  to import would be an error; one that vanished would be missing);
- each of the M skips is for the reason :data:`ALLOWED_SKIP` describes (a C compiler or a uapi
  header is missing), and the guest says it has neither gcc nor the headers, so no skip hides a
  failure.

VHOST_MIN_STRESS_CHAINS is scaled down to :data:`STRESS_CHAINS` (from 500000): TCG runs the
interpreter some 10-50x slower than the host, and the ring stress tests would take hours. With
2000 chains the eight stress tests take ~10 s of the run, so the budget is the rest of the tier:
the whole test took 270-370 s of wall time on a 2-core host shared with other work at load 3-6,
490 s at load 7 (boot ~10 s, copying the tree and listing its tests ~2 s), for 580-650 unit tests.
Under five minutes needs a quieter machine than that, whatever the chain count.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

#: Chains per split stress case (half per packed case) in the guest; the host default is 500000.
STRESS_CHAINS = 2000
#: The fuzz test's share of its cases in the guest (1% of 100,000: TCG runs the interpreter ~30x slower).
FUZZ_SCALE = "0.01"
#: The in-guest bound on the tier (250-460 s measured, the slowest at load 7 on 2 cores); QEMU is
#: killed boot_timeout after it.
TIMEOUT = 900
#: Loaded before the tier runs: test_net's tap test needs /dev/net/tun. (Not vduse: without
#: /dev/vduse/control, test_vduse checks the command's error, as on a machine without VDUSE.)
GUEST_MODULES = ("tun",)

#: Why a unit test may skip in the guest: it compares vhost_min with the C compiler's reading of
#: Linux's uapi headers (or builds a C helper), and the image carries no gcc and no linux-libc-dev
#: (tests/guest.py's USERLAND), as a vendored deployment would not. The guest's facts line shows
#: both absent, so such a skip hides nothing; the host's unit tier runs these tests. Any other skip
#: fails this test. (Skipped in the guest when this was written, each by tests.support.require:
#: test_blk.HeaderFactsTest's two, test_ioctl.HeaderTest and VduseAbiTest, test_memory's
#: store-buffering litmus, and test_bench_vublk.VublkDriverTest, which builds a C client.)
ALLOWED_SKIP = re.compile(r"(\bgcc\b|\ba C compiler\b|/usr/include/linux/\S+\.h\b).* is missing; install it with: ")

#: One line of facts about the guest's interpreter before the tier runs.
FACTS = ("import importlib.util, os, platform, shutil, sys; "
         "print('guest-facts:', 'python', platform.python_version(), "
         "'pip', 'yes' if importlib.util.find_spec('pip') else 'no', "
         "'gcc', 'yes' if shutil.which('gcc') or shutil.which('cc') else 'no', "
         "'headers', 'yes' if os.path.exists('/usr/include/linux/vhost.h') else 'no', "
         "'cpus', os.cpu_count(), flush=True)")

SCRIPT = f"""
python3 -c "{FACTS}" || exit 1
exec python3 -m tests unit -v 2>&1
"""


#: Lists the ids of the unit tests discovered in the cwd's tree, one a line.
LIST_IDS = """
import unittest
def walk(suite):
    for t in suite:
        yield from walk(t) if isinstance(t, unittest.TestSuite) else [t.id()]
print("\\n".join(walk(unittest.TestLoader().discover("tests/unit", top_level_dir="."))))
"""


def snapshot(root: str, dest: str) -> None:
    """Copy the tree at ``root`` (its files as they are now, without .git or bytecode) to ``dest``."""
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".notes", "build",
                                                               "dist", "*.egg-info"))


def unit_test_ids(tree: str) -> list[str]:
    """The unit tests the host discovers in ``tree`` (what the guest should run)."""
    proc = subprocess.run([sys.executable, "-c", LIST_IDS], cwd=tree, capture_output=True, text=True, timeout=120,
                          check=True)
    return proc.stdout.split()


class UnitTierInGuestTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        from tests import guest
        guest.require_guest()
        # The tree as it is now: others may edit the working tree during the minutes this runs.
        work = tempfile.TemporaryDirectory(prefix="vhost_min-unit-in-guest-")
        cls.addClassCleanup(work.cleanup)
        tree = os.path.join(work.name, "tree")
        snapshot(guest.PROJECT_ROOT, tree)
        cls.host_ids = unit_test_ids(tree)
        start = time.monotonic()
        cls.result = guest.Guest(modules=GUEST_MODULES, env={"VHOST_MIN_STRESS_CHAINS": str(STRESS_CHAINS),
                                                           "VHOST_MIN_FUZZ_SCALE": FUZZ_SCALE},
                                 source_dir=tree).run(
            SCRIPT, timeout=TIMEOUT)
        cls.seconds = time.monotonic() - start
        cls.out = cls.result.stdout
        cls.lines = cls.out.rstrip("\n").splitlines()
        cls.tail = "\n".join(cls.lines[-60:]) + f"\n--- stderr:\n{cls.result.stderr[-2000:]}"
        report = cls.out[cls.out.rfind("\nskipped:\n") + 1:] if "\nskipped:\n" in cls.out else "\n".join(cls.lines[-2:])
        facts = next((line for line in cls.lines if line.startswith("guest-facts:")), "(no facts line)")
        print(f"\nunit tier in the guest: {cls.seconds:.1f} s wall (boot included)\n{facts}\n{report}", end="",
              flush=True)

    def facts(self) -> dict[str, str]:
        line = next((line for line in self.lines if line.startswith("guest-facts:")), None)
        self.assertIsNotNone(line, self.tail)
        words = line.split()[1:]
        return dict(zip(words[::2], words[1::2]))

    def summary(self) -> re.Match:
        self.assertFalse(self.result.timed_out, f"the tier ran out of its {TIMEOUT} s\n{self.tail}")
        summary = re.fullmatch(r"(\d+) passed, (\d+) failed, (\d+) skipped", self.lines[-1] if self.lines else "")
        self.assertIsNotNone(summary, self.tail)
        return summary

    def test_the_image_is_minimal(self) -> None:
        facts = self.facts()
        self.assertRegex(facts.get("python", ""), r"^3\.11\.")
        self.assertEqual((facts.get("pip"), facts.get("gcc"), facts.get("headers")), ("no", "no", "no"), facts)

    def skipped(self) -> dict[str, str]:
        """The runner's "skipped:" block: test id (or "setUpClass (CLASS)") -> reason."""
        block = self.out[self.out.rfind("\nskipped:\n"):] if "\nskipped:\n" in self.out else ""
        return dict(re.findall(r"^  (tests\.\S+|setUp\w+ \(tests\.\S+\)): (.*)$", block, re.M))

    def test_every_unit_test_ran_and_none_failed(self) -> None:
        summary = self.summary()
        self.assertEqual((summary[2], self.result.status), ("0", 0), self.tail)
        # -v prints "name (id) ... result" for every test started, and "setUpClass (CLASS) ..." for a
        # class skipped as a whole: every test the host discovers is among them.
        started = set(re.findall(r"^\w+ \((tests\.unit\.[\w.]+)\)", self.out, re.M))
        host = self.host_ids
        missing = [t for t in host if not any(t == s or t.startswith(s + ".") for s in started)]
        self.assertEqual(missing, [], f"the host discovers {len(host)} unit tests\n{self.tail}")
        self.assertGreater(int(summary[1]), 0.95 * len(host), f"{len(host)} unit tests on the host")

    def test_skips_are_only_for_the_missing_compiler_and_headers(self) -> None:
        summary = self.summary()
        skipped = self.skipped()
        self.assertEqual(len(skipped), int(summary[3]), self.tail)
        self.assertEqual({t: r for t, r in skipped.items() if not ALLOWED_SKIP.search(r)}, {}, self.tail)

    def test_the_stress_tests_ran_scaled_down_in_two_processes_too(self) -> None:
        self.summary()
        for ring, chains in (("Split", STRESS_CHAINS), ("Packed", STRESS_CHAINS // 2)):
            test = f"tests.unit.test_vring_stress.{ring}StressTest.test_two_processes_event_idx_on"
            self.assertRegex(self.out, rf"\[{re.escape(test)}\] {chains} chains in ", self.tail)


if __name__ == "__main__":
    unittest.main()
