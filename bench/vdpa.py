"""vDPA inside the test guest: our userspace driver on vdpa_sim_blk, and our VDUSE blk device under
the kernel's own virtio_blk.

The machines we build on have no vDPA, so the bench boots the kernel tier's guest (tests/guest.py:
Debian's 6.12 kernel with the vdpa_sim modules built for it, busybox and python3.11-minimal, one
vCPU under TCG) and runs itself there (``--in-guest``); the host prints the guest's table and, with
--json, one JSON object on the last line. Two halves, one boot:

- ``vduse``: BlkDevice(image) served as a VDUSE device (VduseDevice, its loop in a thread of the
  bench process), attached with ``vdpa dev add mgmtdev vduse`` to virtio_vdpa, so virtio_blk gives
  /dev/vdX; busybox dd with O_DIRECT reads and writes it sequentially in 4 KiB and 64 KiB blocks
  (one request in flight: dd is synchronous). The image is a file on the guest's tmpfs.
- ``driver``: vdpa_sim_blk (a 128 MiB ramdisk in the kernel) bound to vhost_vdpa, driven by
  VdpaDriver from userspace: 4 KiB random reads and writes, one at a time through
  ``VdpaDriver.request`` (which copies each buffer in and out), and 16 in flight on the driver's
  ring with buffers allocated once (what a VMM-style driver does).

virtio_vdpa is unloaded between the halves: a new vDPA device binds to the first vdpa driver
registered, and vdpasim_blk must get vhost_vdpa. Every request's status is checked; a failed one
fails the bench.

TCG caveat: the guest's CPU (its kernel, its python, dd) is emulated, 10-50x slower than the host
and unevenly so; the numbers are not hardware numbers. Compare rows within one run only.

``python3 -m bench vdpa [--json] [--seconds S] [--mib M]``: S seconds per driver workload
(default 2), M MiB per dd run (default 16).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

#: The modules the guest loads at boot, in this order: virtio_vdpa registers before vhost_vdpa,
#: so the VDUSE device (added first) binds to it.
GUEST_MODULES = ("vduse", "virtio_vdpa", "virtio_blk", "vhost_vdpa", "vdpa_sim_blk")
SIM_NAME, VDUSE_NAME = "bench-sim0", "bench-vduse0"
BLOCK = 4096
#: Requests in flight in the driver's deep workloads (and its ring's size: one descriptor each
#: for header, data and status per request, so 64 entries hold 16 requests with room).
DEPTH, QUEUE_SIZE = 16, 64
IMAGE_SIZE = 64 << 20
#: Bound on any single wait for the kernel or dd in the guest.
WAIT = 60.0
CAVEAT = ("TCG: the guest's CPU is emulated (10-50x slower than the host, unevenly); these are not "
          "hardware numbers; compare rows within one run only")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m bench vdpa", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per driver workload (default 2)")
    parser.add_argument("--mib", type=int, default=16, help="MiB per dd run on the VDUSE disk (default 16)")
    parser.add_argument("--timeout", type=float, default=600.0, help="bound on the guest's run (default 600 s)")
    parser.add_argument("--in-guest", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.seconds > 0 or not 1 <= args.mib <= IMAGE_SIZE >> 21:
        parser.error(f"--seconds must be positive and --mib from 1 to {IMAGE_SIZE >> 21}")
    return args


def guest_script(args: argparse.Namespace) -> str:
    """What the guest runs: this bench with ``--in-guest``, the table then the JSON line."""
    return f"exec python3 -m bench vdpa --in-guest --json --seconds {args.seconds:g} --mib {args.mib}\n"


# --------------------------------------------------------------------------------------------
# In the guest
# --------------------------------------------------------------------------------------------

def _vdpa(*args: str) -> None:
    proc = subprocess.run([shutil.which("vdpa") or "vdpa", *args], capture_output=True, text=True, timeout=WAIT)
    if proc.returncode:
        raise RuntimeError(f"vdpa {' '.join(args)}: {proc.stderr.strip()}")


def _wait_for(what: str, predicate):
    deadline = time.monotonic() + WAIT
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {WAIT} s")
        time.sleep(0.05)
    return value


def _driver_of(name: str) -> str:
    return os.path.basename(os.readlink(f"/sys/bus/vdpa/devices/{name}/driver"))


def _dd(args: list[str], count: int) -> float:
    """Run busybox dd for ``count`` blocks; the seconds it took, by our clock around it (Debian's
    busybox prints no time), its start included."""
    start = time.monotonic()
    proc = subprocess.run(["dd", *args, f"count={count}"], capture_output=True, text=True, timeout=WAIT * 5)
    seconds = time.monotonic() - start
    if proc.returncode or f"{count}+0 records out" not in proc.stderr:
        raise RuntimeError(f"dd {' '.join(args)} count={count} (status {proc.returncode}): {proc.stderr.strip()}")
    return seconds


def bench_vduse(args: argparse.Namespace) -> dict:
    """dd with O_DIRECT on the /dev/vdX that virtio_blk makes of our VDUSE blk device."""
    from vhost_min.blk import BlkDevice
    from vhost_min.vdpa import VduseDevice

    rows: dict = {}
    total = args.mib << 20
    with tempfile.TemporaryDirectory() as tmp:
        image = os.path.join(tmp, "disk.img")
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        source = os.path.join(tmp, "source")
        with open(source, "wb") as f:
            f.write(random.Random(1).randbytes(total))
        with BlkDevice(image) as device, VduseDevice(device, VDUSE_NAME) as vd:
            loop = threading.Thread(target=vd.run, name="vduse loop", daemon=True)
            loop.start()
            try:
                _vdpa("dev", "add", "mgmtdev", "vduse", "name", VDUSE_NAME)
                try:
                    found = _wait_for("/dev/vdX", lambda: [e for e in os.listdir(f"/sys/bus/vdpa/devices/{VDUSE_NAME}")
                                                          if e.startswith("virtio")])
                    disk = _wait_for("/dev/vdX", lambda: os.listdir(
                        f"/sys/bus/vdpa/devices/{VDUSE_NAME}/{found[0]}/block"))[0]
                    dev = f"/dev/{disk}"
                    _wait_for(dev, lambda: os.path.exists(dev))
                    rows["driver"] = _driver_of(VDUSE_NAME)
                    if rows["driver"] != "virtio_vdpa":
                        raise RuntimeError(f"{VDUSE_NAME} bound to {rows['driver']}, not virtio_vdpa")
                    for block in (4 << 10, 64 << 10):
                        count = total // block
                        label = f"{block >> 10}k"
                        for op, dd_args in (("write", [f"if={source}", f"of={dev}", f"bs={block}", "oflag=direct",
                                                       "conv=notrunc"]),
                                            ("read", [f"if={dev}", "of=/dev/null", f"bs={block}", "iflag=direct"])):
                            before = _completed(disk)
                            seconds = _dd(dd_args, count)
                            requests = _completed(disk)[op] - before[op]
                            rows[f"{op}_{label}"] = dict(_rates(requests, total, seconds), dd_blocks=count)
                    with open(image, "rb") as f:
                        rows["data_in_image"] = f.read(total) == random.Random(1).randbytes(total)
                finally:
                    _vdpa("dev", "del", VDUSE_NAME)
            finally:
                vd.stop()
                loop.join(WAIT)
    if not rows["data_in_image"]:
        raise RuntimeError("the bytes dd wrote through /dev/vdX are not in the image")
    return rows


def _completed(disk: str) -> dict[str, int]:
    """Reads and writes the block layer completed on ``disk`` (/sys/block/DISK/stat): the requests
    virtio_blk sent our device, after any merging or splitting."""
    with open(f"/sys/block/{disk}/stat") as f:
        fields = f.read().split()
    return {"read": int(fields[0]), "write": int(fields[4])}


def _rates(requests: int, size: int, seconds: float) -> dict:
    return {"requests_s": requests / seconds, "mib_s": size / seconds / (1 << 20), "requests": requests,
            "seconds": round(seconds, 3)}


def bench_driver(args: argparse.Namespace) -> dict:
    """VdpaDriver on vdpa_sim_blk through vhost_vdpa: 4 KiB random reads and writes."""
    from vhost_min.blk import VIRTIO_BLK_OUTHDR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, BlkConfig
    from vhost_min.vdpa import VdpaDriver

    _vdpa("dev", "add", "mgmtdev", "vdpasim_blk", "name", SIM_NAME)
    rows: dict = {}
    try:
        rows["driver"] = _driver_of(SIM_NAME)
        node = "/dev/" + next(e for e in os.listdir(f"/sys/bus/vdpa/devices/{SIM_NAME}") if e.startswith("vhost-vdpa-"))
        with VdpaDriver(node, 0, [0], queue_size=QUEUE_SIZE, memory_size=1 << 20) as driver:
            capacity = BlkConfig.unpack(driver.config()).capacity
            rng = random.Random(20261203)
            sectors = [rng.randrange(capacity // 8) * 8 for _ in range(4096)]
            data = rng.randbytes(BLOCK)
            for op, type_ in (("write", VIRTIO_BLK_T_OUT), ("read", VIRTIO_BLK_T_IN)):
                done, start = 0, time.perf_counter()
                deadline = start + args.seconds
                while True:
                    header = VIRTIO_BLK_OUTHDR.pack(type_, 0, sectors[done % len(sectors)])
                    if op == "write":
                        _, (status,) = driver.request(0, [header, data], [1])
                    else:
                        _, (_, status) = driver.request(0, [header], [BLOCK, 1])
                    if status != bytes([VIRTIO_BLK_S_OK]):
                        raise RuntimeError(f"{op} at sector {sectors[done % len(sectors)]}: status {status.hex()}")
                    done += 1
                    if time.perf_counter() >= deadline:
                        break
                rows[f"rand{op}_4k_qd1"] = _rates(done, done * BLOCK, time.perf_counter() - start)
            # Buffers for DEPTH requests, allocated once (after request()'s: it reuses what is past them).
            slots = [(driver.alloc(VIRTIO_BLK_OUTHDR.size), driver.alloc(BLOCK, BLOCK), driver.alloc(1))
                     for _ in range(DEPTH)]
            for op, type_ in (("write", VIRTIO_BLK_T_OUT), ("read", VIRTIO_BLK_T_IN)):
                rows[f"rand{op}_4k_qd{DEPTH}"] = _deep(driver, slots, type_, sectors, args.seconds)
    finally:
        _vdpa("dev", "del", SIM_NAME)
    return rows


def _deep(driver, slots: list[tuple[int, int, int]], type_: int, sectors: list[int], seconds: float) -> dict:
    """len(slots) requests kept in flight on ring 0, each in its slot's buffers (header, data,
    status: three descriptors, as Linux lays out a virtio-blk request)."""
    from vhost_min.blk import VIRTIO_BLK_OUTHDR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT

    q = driver.queues[0]
    memory = driver.memory
    write = type_ == VIRTIO_BLK_T_OUT
    if write:
        for _, data, _ in slots:
            memory.write(data, random.Random(data).randbytes(BLOCK))
    n = 0

    def submit(slot: int) -> None:
        nonlocal n
        header, data, status = slots[slot]
        memory.write(header, VIRTIO_BLK_OUTHDR.pack(type_, 0, sectors[n % len(sectors)]))
        memory.write(status, b"\xff")
        n += 1
        if write:
            q.ring.add([(header, VIRTIO_BLK_OUTHDR.size), (data, BLOCK)], [(status, 1)], slot)
        else:
            q.ring.add([(header, VIRTIO_BLK_OUTHDR.size)], [(data, BLOCK), (status, 1)], slot)

    done, start = 0, time.perf_counter()
    deadline = start + seconds
    for slot in range(len(slots)):
        submit(slot)
    if q.ring.publish():
        q.kick()
    in_flight = len(slots)
    while in_flight:
        used = q.wait(WAIT)
        in_flight -= len(used)
        done += len(used)
        again = time.perf_counter() < deadline
        for slot, _ in used:
            if memory.read(slots[slot][2], 1) != bytes([VIRTIO_BLK_S_OK]):
                raise RuntimeError(f"a request of type {type_} at depth {len(slots)} failed: "
                                   f"status {memory.read(slots[slot][2], 1).hex()}")
            if again:
                submit(slot)
                in_flight += 1
        if again and q.ring.publish():
            q.kick()
    return _rates(done, done * BLOCK, time.perf_counter() - start)


def in_guest(args: argparse.Namespace) -> dict:
    from bench.__main__ import print_table

    result: dict = {"vduse": bench_vduse(args)}
    # vdpasim_blk must bind to vhost_vdpa: unload the driver registered first (no device uses it now).
    proc = subprocess.run(["rmmod", "virtio_vdpa"], capture_output=True, text=True, timeout=WAIT)
    if proc.returncode:
        raise RuntimeError(f"rmmod virtio_vdpa: {proc.stderr.strip()}")
    result["driver"] = bench_driver(args)
    with open("/proc/sys/kernel/osrelease") as f:
        release = f.read().strip()

    rows = []
    for name in ("randread_4k_qd1", "randwrite_4k_qd1", f"randread_4k_qd{DEPTH}", f"randwrite_4k_qd{DEPTH}"):
        r = result["driver"][name]
        how = "VdpaDriver.request()" if name.endswith("qd1") else f"ring, {DEPTH} in flight"
        rows.append([f"VdpaDriver on vdpa_sim_blk: {name}", how, r["requests_s"], r["mib_s"], r["requests"]])
    for name in ("read_4k", "write_4k", "read_64k", "write_64k"):
        r = result["vduse"][name]
        rows.append([f"our VDUSE blk, kernel dd: {name}", f"O_DIRECT, {r['dd_blocks']} dd blocks", r["requests_s"],
                     r["mib_s"], r["requests"]])
    print_table(f"vdpa: in the test guest, Linux {release}, python {platform.python_version()}, "
                f"{os.cpu_count()} vCPU", ["workload", "how", "requests/s", "MiB/s", "requests"], rows)
    print(f"notes: {CAVEAT}.\n"
          f"  driver: vhost_vdpa, our rings in a memfd DMA-mapped through IOTLB messages, {args.seconds:g} s per "
          f"workload, random 4 KiB-aligned sectors of the simulator's 128 MiB;\n"
          f"  vduse: BlkDevice on a {IMAGE_SIZE >> 20} MiB image in tmpfs, its loop in a thread; busybox dd "
          f"sequential, one block in flight, {args.mib} MiB per run, timed around dd;\n"
          f"  requests = what virtio_blk sent our device (/sys/block/vdX/stat), not dd's blocks; data checked "
          f"in the image.")
    sys.stdout.flush()
    return _rounded(result)


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, float):
        return round(value, 1)
    return value


# --------------------------------------------------------------------------------------------
# On the host
# --------------------------------------------------------------------------------------------

def run(argv: list[str]) -> dict:
    args = parse_args(argv)
    if args.in_guest:
        return in_guest(args)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tests import guest

    missing = guest.missing_prerequisites(build=False)      # building the image, when needed, says what it lacks
    if missing:
        raise SystemExit(f"bench vdpa boots a QEMU guest and needs {', '.join(missing)}: {guest.INSTALL}")
    start = time.monotonic()
    result = guest.Guest(modules=GUEST_MODULES).run(guest_script(args), timeout=args.timeout)
    seconds = time.monotonic() - start
    lines = result.stdout.rstrip("\n").splitlines()
    if result.status or result.timed_out or not lines or not lines[-1].startswith("{"):
        raise SystemExit(f"bench vdpa failed in the guest (status {result.status}"
                         f"{', timed out' if result.timed_out else ''}):\n{result.output}\n--- console tail:\n"
                         f"{guest.console_tail(result.console, 20)}")
    print("\n".join(lines[:-1]))
    print(f"  (one guest boot, {seconds:.0f} s wall on the host: {platform.machine()}, {os.cpu_count()} CPUs)")
    sys.stdout.flush()
    out = json.loads(lines[-1])
    out.update({"caveat": CAVEAT, "guest_seconds": round(seconds, 1), "host_cpus": os.cpu_count(),
                "seconds": args.seconds, "mib": args.mib})
    return out
