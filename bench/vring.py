"""The virtqueue engine's speed, device side and driver side, split and packed, beside a yardstick.

The yardstick is the tightest device loop we could write by hand for the same ring: it reads the
same avail index, ring entries and descriptors with precompiled ``struct`` objects on a
memoryview, slices the same buffer views and writes the same used elements and index, but checks
nothing. It is the floor for a pure-Python design; ``ratio`` is yardstick rate / our rate.
For the ``indirect`` cases (every chain one INDIRECT descriptor, as Linux sends a multi-segment
virtio-blk request) the yardstick reads the indirect descriptor, then the table's entries.
``python3 -m bench vring [--json] [--seconds S] [--only SUBSTRING]`` (``--only`` runs the cases
whose name contains SUBSTRING, e.g. ``indirect``).
Only the measured side's calls are inside the clock; the other side refills or drains untimed.
A rate is that of the fastest lap (a ring's worth of chains, well under a millisecond): on shared,
noisy cores a lap that was preempted measures the neighbours, and the mean over a third of a
second moved ratios by 0.5 from run to run where the fastest lap holds them within a few percent.
"""

from __future__ import annotations

import os
import platform
import struct
import sys
import time

from vhost_min.memory import GuestMemory, barriers
from vhost_min.packed import PackedDeviceQueue, PackedDriverQueue
from vhost_min.vring import SplitDeviceQueue, SplitDriverQueue

MEM_SIZE = 64 << 20
BUF_BASE = 16 << 20          # data buffers live above the rings
BUF_SIZE = 512


class _SplitYardstick:
    """Hand-written split-ring device loop: the same reads and writes as the engine (avail idx
    once, the ring entries in one unpack, each descriptor, one pack of all used elements, the used
    idx), with precompiled structs on a memoryview and no checks at all."""

    def __init__(self, mem: memoryview, size: int, desc: int, avail: int, used: int) -> None:
        self.mem, self.size, self.desc, self.avail, self.used = mem, size, desc, avail, used
        self.last_avail = 0
        self.used_idx = 0
        self.u16 = struct.Struct("<H")
        self.desc_s = struct.Struct("<QIHH")
        self.heads = {n: struct.Struct(f"<{n}H") for n in range(1, size + 1)}
        self.elems = {n: struct.Struct(f"<{2 * n}I") for n in range(1, size + 1)}

    def pop_batch(self, limit: int):
        mem, size, unpack = self.mem, self.size, self.desc_s.unpack_from
        last = self.last_avail
        n = min((self.u16.unpack_from(mem, self.avail + 2)[0] - last) & 0xFFFF, limit)
        if not n:
            return []
        start = last & (size - 1)
        ring = self.avail + 4
        if start + n <= size:
            heads = self.heads[n].unpack_from(mem, ring + 2 * start)
        else:
            heads = self.heads[size - start].unpack_from(mem, ring + 2 * start) + \
                self.heads[n - size + start].unpack_from(mem, ring)
        table = self.desc
        chains = []
        append = chains.append
        for head in heads:
            addr, length, flags, nxt = unpack(mem, table + 16 * head)
            if not flags & 5:
                append((head, [], [mem[addr:addr + length]]) if flags & 2 else (head, [mem[addr:addr + length]], []))
                continue
            base = table
            if flags & 4:                       # INDIRECT: the chain is the table, from entry 0
                base = addr
                addr, length, flags, nxt = unpack(mem, base)
            readable, writable = [], []
            while True:
                (writable if flags & 2 else readable).append(mem[addr:addr + length])
                if not flags & 1:
                    break
                addr, length, flags, nxt = unpack(mem, base + 16 * nxt)
            append((head, readable, writable))
        self.last_avail = (last + n) & 0xFFFF
        return chains

    def push_batch(self, done) -> bool:
        n, size, idx = len(done), self.size, self.used_idx
        start = idx & (size - 1)
        flat = [x for pair in done for x in pair]
        ring = self.used + 4
        if start + n <= size:
            self.elems[n].pack_into(self.mem, ring + 8 * start, *flat)
        else:
            first = size - start
            self.elems[first].pack_into(self.mem, ring + 8 * start, *flat[:2 * first])
            self.elems[n - first].pack_into(self.mem, ring, *flat[2 * first:])
        self.used_idx = (idx + n) & 0xFFFF
        self.u16.pack_into(self.mem, self.used + 2, self.used_idx)
        return False


class _PackedYardstick:
    """Hand-written packed-ring device loop: flags, descriptor, one used descriptor per chain."""

    def __init__(self, mem: memoryview, size: int, desc: int) -> None:
        self.mem, self.size, self.desc = mem, size, desc
        self.next_avail, self.avail_wrap = 0, 1
        self.next_used, self.used_wrap = 0, 1
        self.desc_s = struct.Struct("<QIHH")
        self.used_s = struct.Struct("<IHH")
        self.counts = [0] * size

    def pop_batch(self, limit: int):
        mem, desc_s, base, size = self.mem, self.desc_s, self.desc, self.size
        slot, wrap = self.next_avail, self.avail_wrap
        chains = []
        while len(chains) < limit:
            addr, length, bid, flags = desc_s.unpack_from(mem, base + 16 * slot)
            if bool(flags & 0x80) != wrap or bool(flags & 0x8000) == wrap:
                break
            readable, writable, count = [], [], 0
            if flags & 4:                       # INDIRECT: one slot, the table read entry by entry
                for e in range(length >> 4):
                    a, ln, _, f = desc_s.unpack_from(mem, addr + 16 * e)
                    (writable if f & 2 else readable).append(mem[a:a + ln])
                slot += 1
                if slot == size:
                    slot, wrap = 0, wrap ^ 1
                self.counts[bid] = 1
                chains.append((bid, readable, writable))
                continue
            while True:
                (writable if flags & 2 else readable).append(mem[addr:addr + length])
                count += 1
                slot += 1
                if slot == size:
                    slot, wrap = 0, wrap ^ 1
                if not flags & 1:
                    break
                addr, length, bid, flags = desc_s.unpack_from(mem, base + 16 * slot)
            self.counts[bid] = count
            chains.append((bid, readable, writable))
        self.next_avail, self.avail_wrap = slot, wrap
        return chains

    def push_batch(self, done) -> bool:
        mem, used_s, base, size, counts = self.mem, self.used_s, self.desc, self.size, self.counts
        slot, wrap = self.next_used, self.used_wrap
        for bid, length in done:
            flags = 0x8080 if wrap else 0
            used_s.pack_into(mem, base + 16 * slot + 8, length, bid, flags)
            slot += counts[bid]
            if slot >= size:
                slot, wrap = slot - size, wrap ^ 1
        self.next_used, self.used_wrap = slot, wrap
        return False


def _memory() -> tuple[GuestMemory, int]:
    fd = os.memfd_create("bench-vring", os.MFD_CLOEXEC)
    os.ftruncate(fd, MEM_SIZE)
    memory = GuestMemory()
    memory.add_region(0, MEM_SIZE, fd=fd)
    os.close(fd)
    return memory, 0


def _rings(kind: str, memory: GuestMemory, size: int, indirect_max: int = 0):
    driver_cls, device_cls = (SplitDriverQueue, SplitDeviceQueue) if kind == "split" else (
        PackedDriverQueue, PackedDeviceQueue)
    lay = driver_cls.layout(size, 0x1000, indirect_max)
    driver = driver_cls(memory, size, lay["desc"], lay["driver"], lay["device"],
                        indirect_area=lay["indirect"], indirect_max=indirect_max)
    device = device_cls(memory, size, lay["desc"], lay["driver"], lay["device"])
    return lay, driver, device


def _fill(driver, nchains: int, ndesc: int, indirect: bool = False) -> None:
    """``nchains`` chains of ``ndesc`` buffers (the last one device-writable, as a virtio-blk
    read's status byte), each as one indirect descriptor when ``indirect``."""
    for k in range(nchains):
        base = BUF_BASE + k * ndesc * BUF_SIZE
        segs = [(base + j * BUF_SIZE, BUF_SIZE) for j in range(ndesc)]
        driver.add(segs[:-1], segs[-1:], k, indirect=indirect)
    driver.publish()


def _device_rate(kind: str, ndesc: int, batch: int, yardstick: bool, seconds: float,
                 indirect: bool = False) -> float:
    """Chains per second through the device side (ours or the yardstick) over a ring the
    driver refills untimed."""
    memory, _ = _memory()
    size = 256 if ndesc == 1 or indirect else 1024
    lay, driver, device = _rings(kind, memory, size, ndesc if indirect else 0)
    if yardstick:
        mem = memory.regions[0].view
        device = (_SplitYardstick(mem, size, lay["desc"], lay["driver"], lay["device"]) if kind == "split"
                  else _PackedYardstick(mem, size, lay["desc"]))
    per_lap = size if indirect else min(size // ndesc, 256)
    best = float("inf")
    pop, push, clock = device.pop_batch, device.push_batch, time.perf_counter
    deadline = clock() + seconds
    while clock() < deadline:
        _fill(driver, per_lap, ndesc, indirect)
        left = per_lap
        start = clock()
        while left:
            got = pop(batch)
            push([(c[0], 0) for c in got])
            left -= len(got)
        best = min(best, clock() - start)
        driver.reap()
    memory.clear()
    return per_lap / best


def _driver_rate(kind: str, seconds: float) -> float:
    """Chains per second through the driver side: add (1 descriptor), publish, reap."""
    memory, _ = _memory()
    size = 256
    lay, driver, device = _rings(kind, memory, size)
    segs = [[(BUF_BASE + k * BUF_SIZE, BUF_SIZE)] for k in range(size)]
    none: list = []
    best = float("inf")
    clock = time.perf_counter
    add, publish, reap = driver.add, driver.publish, driver.reap
    deadline = clock() + seconds
    while clock() < deadline:
        start = clock()
        for k in range(size):
            add(none, segs[k], k)
        publish()
        timed = clock() - start
        device.push_batch([(c[0], 0) for c in device.pop_batch(size)])
        start = clock()
        reap()
        best = min(best, timed + clock() - start)
    memory.clear()
    return size / best


def _barrier_ns() -> float:
    full = barriers().full
    n = 200_000
    start = time.perf_counter()
    for _ in range(n):
        full()
    return (time.perf_counter() - start) / n * 1e9


def run(argv: list[str]) -> dict:
    seconds = float(argv[argv.index("--seconds") + 1]) if "--seconds" in argv else 1.0
    from bench.__main__ import print_table

    # (name, ring, buffers per chain, batch, as one indirect descriptor). Linux sends every
    # multi-segment virtio-blk request as one indirect descriptor (header, data..., status).
    cases = [
        ("split 1-desc batch 256", "split", 1, 256, False),
        ("split 3-desc batch 256", "split", 3, 256, False),
        ("split indirect3 batch 256", "split", 3, 256, True),
        ("split indirect8 batch 256", "split", 8, 256, True),
        ("split 1-desc batch 32", "split", 1, 32, False),
        ("split 1-desc batch 1", "split", 1, 1, False),
        ("split indirect3 batch 1", "split", 3, 1, True),
        ("packed 1-desc batch 256", "packed", 1, 256, False),
        ("packed 3-desc batch 256", "packed", 3, 256, False),
        ("packed indirect3 batch 256", "packed", 3, 256, True),
        ("packed indirect8 batch 256", "packed", 8, 256, True),
    ]
    only = argv[argv.index("--only") + 1] if "--only" in argv else None
    rows, result = [], {}
    for name, kind, ndesc, batch, indirect in cases:
        if only is not None and only not in name:
            continue
        # Interleave ours and the yardstick, best of three each, so both see the same machine.
        ours = yard = 0.0
        for _ in range(3):
            ours = max(ours, _device_rate(kind, ndesc, batch, False, seconds / 3, indirect))
            yard = max(yard, _device_rate(kind, ndesc, batch, True, seconds / 3, indirect))
        rows.append([f"device {name}", ours, yard, yard / ours])
        key = name.replace(" ", "_").replace("-", "")
        result[f"{key}_chains_per_s"] = round(ours)
        result[f"{key}_yardstick_chains_per_s"] = round(yard)
    for kind in ("split", "packed") if only is None else ():
        rate = max(_driver_rate(kind, seconds / 3) for _ in range(3))
        rows.append([f"driver {kind} 1-desc add+publish+reap", rate, "-", "-"])
        result[f"driver_{kind}_chains_per_s"] = round(rate)
    barrier = _barrier_ns()
    if "split_1desc_batch_256_chains_per_s" in result:
        result["chains_per_s"] = result["split_1desc_batch_256_chains_per_s"]
        result["yardstick_chains_per_s"] = result["split_1desc_batch_256_yardstick_chains_per_s"]
        result["ratio_yardstick_over_ours"] = round(result["yardstick_chains_per_s"] / result["chains_per_s"], 3)
    result["full_barrier_ns"] = round(barrier, 1)
    result["barrier"] = barriers().how
    result["python"] = platform.python_version()
    result["machine"] = platform.machine()
    print_table(f"vring: chains/s on one core (python {platform.python_version()}, {platform.machine()}, "
                f"{seconds:g} s per case)", ["case", "ours", "yardstick", "yardstick/ours"], rows)
    print(f"full barrier ({barriers().how}): {barrier:.0f} ns per call")
    sys.stdout.flush()
    return result
