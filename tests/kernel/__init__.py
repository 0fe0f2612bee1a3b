"""The kernel tier: vhost, vhost-vdpa and VDUSE for real, in a QEMU guest booting Debian's kernel.

Each module boots the guest once; inside, ``python3 -m tests.kernel.MODULE --in-guest`` runs its
checks and prints one JSON line per check (:func:`run_checks`); the host's test methods assert on
those lines (:class:`GuestChecks`), so one boot serves every assertion.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable, Mapping


def run_checks(checks: Mapping[str, Callable[[], dict]]) -> int:
    """In the guest: run every check, one JSON line each, ``{"check": name, "result": {...},
    "seconds": s}`` or with ``"error"`` (the traceback) instead of ``"result"``."""
    for name, check in checks.items():
        start = time.monotonic()
        try:
            line = {"check": name, "result": check()}
        except Exception:                      # reported to the host test, which fails on it
            line = {"check": name, "error": traceback.format_exc()}
        line["seconds"] = round(time.monotonic() - start, 2)
        print(json.dumps(line), flush=True)
    return 0


class GuestChecks:
    """Host side, a mixin before unittest.TestCase: :meth:`boot` runs the guest once per class;
    :meth:`result` is one check's facts (the test fails with the guest's output when the check is
    missing or raised)."""

    results: dict[str, dict]
    #: The module's checks (every one must report).
    CHECKS: Mapping[str, Callable[[], dict]] = {}

    @classmethod
    def boot(cls, script: str, timeout: float, **guest_options) -> None:
        from tests import guest
        guest.require_guest()
        start = time.monotonic()
        cls.run_result = guest.Guest(**guest_options).run(script, timeout=timeout)
        cls.seconds = time.monotonic() - start
        cls.results = {}
        for line in cls.run_result.stdout.splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                cls.results[entry["check"]] = entry

    def result(self, name: str) -> dict:
        entry = self.results.get(name)
        if entry is None:
            self.fail(f"the guest reported nothing for {name} (status {self.run_result.status}):\n"
                      f"{self.run_result.output}\n--- console tail:\n{self.run_result.console[-3000:]}")
        if "error" in entry:
            self.fail(f"{name} failed in the guest:\n{entry['error']}\n--- stderr:\n{self.run_result.stderr[-3000:]}")
        return entry["result"]

    def test_the_guest_ran_every_check(self) -> None:
        self.run_result.check()
        self.assertEqual(sorted(self.results), sorted(self.CHECKS))
