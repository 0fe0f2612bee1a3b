"""Run every test tier: ``python3 -m tests [unit|peers|kernel|DOTTED.TEST.NAME ...] [-v]``.

Plain unittest (no pip needed); the last line is ``N passed, N failed, N skipped``.
With CI=true a tier whose prerequisites are missing fails instead of skipping.
"""

from __future__ import annotations

USAGE = """\
usage: python3 -m tests [-v] [TIER | DOTTED.TEST.NAME ...]

Run the test tiers (all three when none is named); the last line is "N passed, N failed, N skipped".

  unit      anywhere, no root: protocol, rings, devices, the CLI, the README's examples
  peers     against QEMU 7.2, qemu-storage-daemon, virtiofsd and DPDK's testpmd (and the unit
            tier again on arm64 python under qemu-user)
  kernel    in a QEMU guest booting Debian's kernel: kernel vhost, vhost-vdpa, VDUSE
  NAME      a module, class or test by dotted name, e.g. tests.unit.test_blk.DeviceTest
  -v        one line per test

environment:
  CI=true                    a tier that cannot run fails instead of skipping
  VHOST_MIN_SEED=N           the seed of the randomized tests (each prints the seed it used)
  VHOST_MIN_STRESS_CHAINS=N  chains per ring stress test (default 500000)
  VHOST_MIN_FUZZ_SCALE=F     the fuzz test's share of its 100,000 messages and ring states (default 1)
  VHOST_MIN_CACHE=DIR        downloads and built guest images (default ~/.cache/vhost_min)
"""

import os
import sys
import time
import unittest

TIERS = ("unit", "peers", "kernel")


class _CountingResult(unittest.TextTestResult):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.passed = 0

    def addSuccess(self, test):
        super().addSuccess(test)
        self.passed += 1


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE, end="")
        return 0
    unknown = [a for a in argv if a.startswith("-") and a != "-v"]
    if unknown:
        print(f"unknown option {unknown[0]}\n{USAGE}", end="", file=sys.stderr)
        return 2
    verbosity = 2 if "-v" in argv else 1
    names = [a for a in argv if a != "-v"] or list(TIERS)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for name in names:
        if name in TIERS:
            suite.addTests(loader.discover(os.path.join(root, "tests", name), top_level_dir=root))
        else:
            suite.addTests(loader.loadTestsFromName(name))
    runner = unittest.TextTestRunner(verbosity=verbosity, resultclass=_CountingResult, stream=sys.stdout)
    start = time.monotonic()
    result = runner.run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    if skipped:
        print("skipped:")
        for test, reason in result.skipped:
            print(f"  {test.id()}: {reason}")
    print(f"tiers: {' '.join(names)}; {time.monotonic() - start:.1f} s")
    print(f"{result.passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed or result.testsRun == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
