"""Run every test tier: ``python3 -m tests [unit|peers|kernel|DOTTED.TEST.NAME ...] [-v]``.

Plain unittest (no pip needed); the last line is ``N passed, N failed, N skipped``.
With CI=true a tier whose prerequisites are missing fails instead of skipping.
"""

from __future__ import annotations

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
