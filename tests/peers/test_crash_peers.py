"""Crash recovery with INFLIGHT_SHMFD: our blk back-end killed with SIGKILL again and again under
sustained writes, restarted 0.1 s later on the same socket and image (bench/crash.py does the
work; ``python3 -m bench crash`` runs the long campaign).

- QemuGuestCrashTest: a QEMU 7.2 guest (``reconnect=1``) writes 1 MiB O_DIRECT blocks from 4
  threads, each block carrying its number, a generation and a CRC; QEMU hands the inflight region
  back to each new back-end. One boot per ring type (``packed=on`` for packed).
- OurFrontendCrashTest: vhost_min's Frontend and BlkClient in this process, 16 writes in flight,
  reconnect() after each kill; right after each kill a copy of the region is reconciled against
  the ring and must list what the next back-end resubmits in submission order.

Each asserts: every kill restarted and the writes resumed (no hang), the writer finished without an
error, every block's last completed generation is what the image holds (no lost byte), and the
kills did land with requests in flight, which the restarted back-ends resubmitted.
"""

from __future__ import annotations

import unittest

from bench import crash
from tests import guest, support
from tests.peers import launch

#: Kills per ring type: ~50 s of a TCG guest each, ~40 s of our front-end each (2 shared cores).
QEMU_KILLS = 16
OURS_KILLS = 25


class CrashCase(unittest.TestCase):
    def seed(self) -> int:
        """The campaign's seed (its kill moments): printed, VHOST_MIN_SEED replays it."""
        return support.seeded_random(self).randrange(1 << 31)

    def check(self, tally: crash.Tally, kills: int) -> None:
        summary = (f"{tally.frontend} front-end, {tally.ring} ring: {tally.kills} kills, {tally.in_flight_at_kill} "
                   f"with requests in flight ({tally.requests_in_flight} requests, {tally.resubmitted} resubmitted, "
                   f"{tally.stale_cleared} stale used cleared), {tally.writes} writes, {tally.hangs} hangs, "
                   f"{tally.lost_bytes} bytes lost, {tally.seconds:.0f} s")
        print(f"\n[{type(self).__name__}] {summary}", flush=True)
        details = "\n".join(tally.errors)
        self.assertEqual(tally.errors, [], f"{summary}\n{details}")
        self.assertEqual((tally.kills, tally.restarts, tally.hangs), (kills, kills, 0), summary)
        self.assertEqual(tally.lost_bytes, 0, summary)
        self.assertGreater(tally.writes, kills, summary)
        self.assertGreaterEqual(tally.in_flight_at_kill, 1, f"no kill landed with a request in flight: {summary}")
        self.assertGreaterEqual(tally.resubmitted, 1, summary)
        # What the back-ends resubmitted is what the region held after the kills (a batch being
        # published at the kill counts as held there, and the next back-end finds it done).
        self.assertLessEqual(tally.resubmitted, tally.requests_in_flight, summary)
        self.assertEqual(launch.child_processes(), [], "a back-end or QEMU was left running")


class QemuGuestCrashTest(CrashCase):
    def setUp(self) -> None:
        guest.require_guest()

    def test_split_ring(self) -> None:
        self.check(crash.qemu_campaign("split", QEMU_KILLS, self.seed(), say=lambda line: None), QEMU_KILLS)

    def test_packed_ring(self) -> None:
        self.check(crash.qemu_campaign("packed", QEMU_KILLS, self.seed(), say=lambda line: None), QEMU_KILLS)


class OurFrontendCrashTest(CrashCase):
    def run_campaign(self, ring: str) -> None:
        tally = crash.ours_campaign(ring, OURS_KILLS, self.seed(), say=lambda line: None)
        self.assertEqual(tally.order_violations, 0, tally.errors)
        self.check(tally, OURS_KILLS)

    def test_split_ring(self) -> None:
        self.run_campaign("split")

    def test_packed_ring(self) -> None:
        self.run_campaign("packed")


if __name__ == "__main__":
    unittest.main()
