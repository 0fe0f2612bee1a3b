"""What one back-end process sustains: ``python3 -m bench load [--json] [--seconds S]``.

One child process runs vhost_min's Server with D BlkDevices of Q queues each (D sockets, images on
tmpfs where there is one, page cache, aio sync); our front-end in this process keeps every queue
at depth 4 with 4 KiB random reads, all queues from one thread (tests/unit/test_load.drive's
loop). Reported per shape (1x1, 4x4, 16x4): aggregate IOPS and the back-end's CPU share (utime +
stime over the wall time, /proc/PID/stat). Then memory-slot churn: ADD_MEM_REG + REM_MEM_REG pairs
per second on a 16-slot window while one queue keeps reading. Indicative numbers: the front-end
is Python too and shares the machine.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = [(1, 1), (4, 4), (16, 4)]
IMAGE_SIZE = 16 << 20
BLOCK = 4096
DEPTH = 4

#: argv: (IMAGE SOCKET QUEUES)... ; one Server, every device on its own socket, until SIGTERM.
BACKEND = """\
import signal, sys
from vhost_min.backend import Server
from vhost_min.blk import BlkDevice
signal.signal(signal.SIGTERM, lambda signum, frame: server.stop())
args = sys.argv[1:]
with Server() as server:
    devices = [BlkDevice(args[i], num_queues=int(args[i + 2])) for i in range(0, len(args), 3)]
    for i, device in zip(range(0, len(args), 3), devices):
        server.add(device, args[i + 1])
    server.run()
    for device in devices:
        device.close()
"""


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def backend(devices: int, queues: int) -> Iterator[tuple[subprocess.Popen, list[str]]]:
    """The back-end process serving ``devices`` images of ``queues`` queues; yields it and its sockets."""
    from tests import support
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="vhost_min-bench-load-", dir=base) as work:
        argv, socks = [], []
        for d in range(devices):
            image, sock = os.path.join(work, f"disk{d}.img"), os.path.join(work, f"blk{d}.sock")
            with open(image, "wb") as f:
                f.write(os.urandom(IMAGE_SIZE))
            argv += [image, sock, str(queues)]
            socks.append(sock)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH")))))
        proc = subprocess.Popen([sys.executable, "-c", BACKEND, *argv], env=env)
        try:
            for sock in socks:
                support.wait_for_path(sock, proc)
            yield proc, socks
        finally:
            support.stop_process(proc)


def _reads(n: int, seed: int) -> list:
    from vhost_min.blk import BlkRequest
    return [BlkRequest.read((seed * 7919 + i * 104729) % (IMAGE_SIZE // BLOCK) * BLOCK, BLOCK, tag=i) for i in range(n)]


def shape(devices: int, queues: int, seconds: float) -> dict:
    from tests.unit.test_load import drive
    from vhost_min.blk import BlkClient
    from vhost_min.frontend import Frontend
    with backend(devices, queues) as (proc, socks), contextlib.ExitStack() as stack:
        clients = []
        for sock in socks:
            fe = stack.enter_context(Frontend.connect(sock))
            clients += [BlkClient(fe, queue_index=q, queue_size=16, depth=DEPTH, max_io=BLOCK) for q in range(queues)]
        drive(clients, [_reads(DEPTH * 4, i) for i in range(len(clients))])          # warm-up
        done, start, cpu0 = 0, time.monotonic(), _cpu_seconds(proc.pid)
        rounds = 0
        while time.monotonic() - start < seconds:
            results = drive(clients, [_reads(64, rounds * 1000 + i) for i in range(len(clients))])
            done += sum(len(r) for r in results)
            rounds += 1
        wall, cpu = time.monotonic() - start, _cpu_seconds(proc.pid) - cpu0
    return {"devices": devices, "queues": queues, "rings": devices * queues, "requests": done,
            "iops": done / wall, "backend_cpu": cpu / wall}


def slot_churn(seconds: float, window: int = 16) -> dict:
    from vhost_min.blk import BlkClient
    from vhost_min.frontend import Frontend
    with backend(1, 1) as (proc, socks), Frontend.connect(socks[0]) as fe:
        client = BlkClient(fe, queue_size=16, depth=DEPTH, max_io=BLOCK)
        pairs = reads = 0
        start, cpu0 = time.monotonic(), _cpu_seconds(proc.pid)
        regions = [fe.add_memory_region(BLOCK) for _ in range(window)]
        while time.monotonic() - start < seconds:
            fe.remove_memory_region(regions.pop(0).gpa)
            regions.append(fe.add_memory_region(BLOCK))
            pairs += 1
            if pairs % 4 == 0:
                client.read((pairs * 7919) % (IMAGE_SIZE // BLOCK) * BLOCK, BLOCK)
                reads += 1
        wall, cpu = time.monotonic() - start, _cpu_seconds(proc.pid) - cpu0
    return {"add_rem_pairs_per_s": pairs / wall, "reads_per_s": reads / wall, "backend_cpu": cpu / wall,
            "window": window}


def run(argv: list[str]) -> dict:
    from bench.__main__ import print_table
    seconds = float(argv[argv.index("--seconds") + 1]) if "--seconds" in argv else 3.0
    rows = [shape(d, q, seconds) for d, q in SHAPES]
    print_table(f"one back-end process, 4 KiB random reads, depth {DEPTH} per queue, {seconds:g} s each "
                f"(indicative: Python front-end on the same machine)",
                ["devices x queues", "rings", "IOPS", "back-end CPU"],
                [[f"{r['devices']} x {r['queues']}", r["rings"], r["iops"], f"{r['backend_cpu']:.0%}"] for r in rows])
    churn = slot_churn(seconds)
    print_table("memory slots: REM_MEM_REG + ADD_MEM_REG while one queue reads",
                ["window", "pairs/s", "reads/s", "back-end CPU"],
                [[churn["window"], churn["add_rem_pairs_per_s"], churn["reads_per_s"], f"{churn['backend_cpu']:.0%}"]])
    return {"benchmark": "load", "seconds": seconds, "shapes": rows, "slot_churn": churn}
