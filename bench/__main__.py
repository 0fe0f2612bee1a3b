"""Run one benchmark: ``python3 -m bench NAME [--json] [options]``."""

from __future__ import annotations

import importlib
import json
import os
import sys

BENCHMARKS = {
    "vring": "virtqueue engine: device and driver side, split and packed, against a yardstick loop",
    "handshake": "connect to first 4 KiB read done, our frontend against our back-end and qemu-storage-daemon",
    "blk": "4k randread qd1/32, randwrite qd32, 64k read qd1/32, +-EVENT_IDX, C front-end: ours against qemu-storage-daemon",
    "startup": "import time of vhost_min and resident memory of a blk backend under I/O",
    "net": "64-byte frames, dpdk-testpmd virtio-user into and out of our net back-end and DPDK's vhost PMD",
    "vdpa": "in a QEMU guest (TCG): our VdpaDriver on vdpa_sim_blk, and our VDUSE blk device under dd O_DIRECT",
    "load": "one back-end process: 1x1, 4x4, 16x4 blk devices x queues (IOPS, CPU), memory-slot churn under I/O",
    "fuzz": "the fuzzing harness for --minutes N (default 1) [--seed S]: back-end messages, front-end replies, rings",
    "reconnect": "our front-end through --kills N (default 200) SIGKILLs of qemu-storage-daemon with requests in flight",
    "crash": "kill -9 the blk back-end under sustained writes, --kills N [--ring split|packed|both] "
             "[--frontend qemu|ours] [--yardstick qsd]: lost bytes, hangs",
    "reliability": "every reliability campaign (fuzz, kills, reconnects, migration, isolation) [--scale F] "
                   "[--only A,B] [--readme]: what was tried and what was lost",
}


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    """A plain aligned table on stdout."""
    cells = [[str(c) for c in columns]] + [[f"{v:,.0f}" if isinstance(v, float) and v >= 100 else
                                             f"{v:.2f}" if isinstance(v, float) else str(v) for v in row]
                                            for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    print(title)
    for n, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        print("usage: python3 -m bench NAME [--json]\n\nbenchmarks:")
        for name, what in BENCHMARKS.items():
            print(f"  {name:10} {what}")
        return 2
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    module = importlib.import_module(f"bench.{argv[0]}")
    want_json = "--json" in argv
    result = module.run([a for a in argv[1:] if a != "--json"])
    if want_json:
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
