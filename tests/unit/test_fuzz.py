"""The fuzzing harness (tests/fuzz.py) with a fixed seed and a bounded number of cases: at least
100,000 valid and mutated messages (after the handshakes) through the back-end's message handling,
20,000 mutated replies to the front-end (and back-end requests on its channel), and 100,000 split and packed ring states through the
virtqueue engine (about 1.5 minutes on a shared 2-core machine). Any crash, hang, leaked fd or
exception other than a VhostError fails the test with the seed and case to replay
(VHOST_MIN_SEED=N; ``python3 -m bench fuzz --seed N --minutes M`` runs longer)."""

from __future__ import annotations

import os
import time
import unittest

from tests import fuzz

SEED = int(os.environ.get("VHOST_MIN_SEED", 20261203))
#: Fewer cases under emulation (the aarch64 proof under qemu-user, the unit tier in the TCG guest).
SCALE = float(os.environ.get("VHOST_MIN_FUZZ_SCALE", "1"))
MESSAGES = int(100_000 * SCALE)
REPLIES = int(20_000 * SCALE)
RING_STATES = int(100_000 * SCALE)


class FuzzTest(unittest.TestCase):
    def run_target(self, name: str, until, headline: str) -> fuzz.Stats:
        stats = fuzz.Stats()
        start = time.monotonic()
        fuzz.run(SEED, {name: fuzz.Budget(until=lambda: until(stats))}, stats)
        print(f"\n[{self.id()}] seed {SEED} (VHOST_MIN_SEED replays): {stats.counts[name]['cases run']:,} cases, "
              f"{headline.format(**fuzz.summary(stats))} in {time.monotonic() - start:.1f} s", flush=True)
        return stats

    def test_backend_messages(self):
        stats = self.run_target("backend", lambda s: s.counts["backend"]["messages sent"] >= MESSAGES,
                                "{fuzzed messages:,} messages after the handshakes ({messages:,} handled in all)")
        backend = stats.counts["backend"]
        self.assertGreaterEqual(backend["messages sent"], MESSAGES)
        # Every request type went out, valid and mutated, and rings were kicked with hostile contents.
        self.assertEqual(len(stats.counts["backend requests"]), len(fuzz.FrontendRequest))
        self.assertGreater(stats.counts["backend mutations"]["valid"], MESSAGES // 100)
        self.assertGreater(backend["ring kicks"], MESSAGES // 100)

    def test_frontend_replies(self):
        stats = self.run_target("frontend", lambda s: s.counts["frontend"]["replies"] >= REPLIES, "{replies:,} replies")
        self.assertGreaterEqual(stats.counts["frontend"]["replies"], REPLIES)
        self.assertGreater(stats.counts["frontend"]["accepted"], REPLIES // 20)
        self.assertEqual(len(stats.counts["frontend channel requests"]), len(fuzz.BackendRequest))
        self.assertGreater(stats.counts["frontend"]["back-end requests"], REPLIES // 4)

    def test_ring_states(self):
        stats = self.run_target("rings", lambda s: fuzz.summary(s)["ring states"] >= RING_STATES,
                                "{ring states:,} ring states")
        self.assertGreaterEqual(fuzz.summary(stats)["ring states"], RING_STATES)
        for ring in ("split ring", "packed ring"):
            self.assertGreater(stats.counts[ring]["chains pushed"], RING_STATES // 10, ring)


if __name__ == "__main__":
    unittest.main()
