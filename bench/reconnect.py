"""Our front-end through qemu-storage-daemon crashes: ``python3 -m bench reconnect [--kills N]
[--seed S] [--json]``.

Each round submits 24 requests (writes of 4..128 KiB and a FLUSH), SIGKILLs the daemon 0..4 ms
later, starts it again on the same socket and image, and lets Frontend.reconnect() replay the
state; every request must complete exactly once with status OK (the round raises otherwise), and
each round's writes are read back through the restarted daemon. At the end the last write to
every place is checked in the image file. The table
says how many kills found requests pending and how many came after out-of-order completions (the
case QEMU's resume-at-the-used-index rule gets wrong), and how long a reconnect took. The rounds
are tests.peers.test_reconnect_peers's, which CI runs a few of.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

from tests.peers.test_reconnect_peers import (IN_FLIGHT_WRITES, TIMEOUT, WRITE_SLOT, RestartingStorageDaemon,
                                              kill_with_requests_in_flight)

MiB = 1 << 20
#: Stretches of the image the rounds write in turn (a round's writes take IN_FLIGHT_WRITES slots).
STRETCHES = 32


def run(argv: list[str]) -> dict:
    from bench.__main__ import print_table
    from vhost_min.blk import BlkClient
    from vhost_min.frontend import Frontend

    parser = argparse.ArgumentParser(prog="python3 -m bench reconnect")
    parser.add_argument("--kills", type=int, default=200, help="rounds of kill, restart, reconnect (default 200)")
    parser.add_argument("--seed", type=int, default=20261203)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    stretch = IN_FLIGHT_WRITES * WRITE_SLOT
    written: dict[int, bytes] = {}
    rounds = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vhost_min-bench-reconnect-") as tmp:
        image = os.path.join(tmp, "disk.img")
        with open(image, "wb") as f:
            f.truncate(STRETCHES * stretch)
        with RestartingStorageDaemon(image, os.path.join(tmp, "qsd.sock")) as daemon, \
                Frontend.connect(daemon.path, timeout=TIMEOUT) as fe:
            blk = BlkClient(fe, timeout=TIMEOUT)
            bad_reads = checked = checked_bytes = 0
            for n in range(args.kills):
                mine: dict[int, bytes] = {}
                rounds.append(kill_with_requests_in_flight(daemon, blk, rng, n % STRETCHES * stretch, mine))
                bad_reads += sum(blk.read(offset, len(data)) != data for offset, data in mine.items())
                checked, checked_bytes = checked + len(mine), checked_bytes + sum(map(len, mine.values()))
                written.update(mine)
            blk.flush()
        with open(image, "rb") as f:
            bad_image = sum(os.pread(f.fileno(), len(data), offset) != data for offset, data in written.items())
    result = {
        "seed": args.seed, "kills": len(rounds), "requests_per_kill": IN_FLIGHT_WRITES,
        "kills_with_requests_pending": sum(1 for r in rounds if r.pending),
        "kills_after_out_of_order_completions": sum(r.out_of_order for r in rounds),
        "requests_pending_at_kills": sum(r.pending for r in rounds),
        "requests_completed": len(rounds) * IN_FLIGHT_WRITES,
        "writes_read_back": checked, "bytes_read_back": checked_bytes, "bad_reads": bad_reads,
        "last_writes_checked_in_image": len(written), "bad_in_image": bad_image,
        "reconnect_ms_median": round(statistics.median(r.reconnect_s for r in rounds) * 1000, 2) if rounds else None,
        "reconnect_ms_max": round(max(r.reconnect_s for r in rounds) * 1000, 2) if rounds else None,
        "seconds": round(time.monotonic() - started, 1),
    }
    print_table(f"our front-end, qemu-storage-daemon SIGKILLed with {IN_FLIGHT_WRITES} requests submitted "
                f"(seed {args.seed}; indicative timings)", ["what", "count"],
                [[key.replace("_", " "), value] for key, value in result.items() if key != "seed"])
    return result
