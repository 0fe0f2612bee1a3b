"""Stress: our driver side against our device side with random chain shapes, checking every byte
and every used length, first in one process and then across two processes (os.fork sharing the
memfd, notifications through eventfds), with EVENT_IDX off and on.

The device answers each chain deterministically: from the CRC of its readable bytes and its head
it picks how many bytes to write (the whole writable capacity, or sometimes less) and which slice
of a fixed pattern to write there. The driver knows the readable bytes and the head, so it can
predict the used length and every written byte, and checks that bytes past the used length still
hold the canary it put there.

Notifications are part of the test: each side goes to sleep when it has nothing to do and only
wakes on the other side's kick / interrupt (a real eventfd across processes, a flag in one
process), so a lost notification shows up as a stall and fails the test.

Ring types: split (queue size 128) and packed (queue size 127, not a power of two, so its wrap
counters flip at a different slot every lap).

Scale: VHOST_MIN_STRESS_CHAINS chains per split case (default 500000: two million over the four),
half as many per packed case. Seeds are printed; VHOST_MIN_SEED replays one.

Adding a ring type: put its (DriverQueue, DeviceQueue, queue size) in RINGS and subclass
StressCases with ``ring = "<name>"``; the workload only uses the shared ring API.
"""

from __future__ import annotations

import gc
import os
import random
import select
import signal
import sys
import time
import traceback
import unittest
import zlib

from tests.support import open_fds, seeded_random
from vhost_min.memory import GuestMemory
from vhost_min.packed import PackedDeviceQueue, PackedDriverQueue
from vhost_min.vring import SplitDeviceQueue, SplitDriverQueue

CHAINS = int(os.environ.get("VHOST_MIN_STRESS_CHAINS", "500000"))
QUEUE_SIZE = 128                       # the largest queue size of any ring type below

#: ring type -> (driver queue class, device queue class, queue size), with the shared ring API.
RINGS = {"split": (SplitDriverQueue, SplitDeviceQueue, 128),
         "packed": (PackedDriverQueue, PackedDeviceQueue, 127)}
INDIRECT_MAX = 8
MAX_SEGMENTS = 8
SLOT = 1 << 16                         # one segment's room: the largest buffer is 64 KiB
ARENA = MAX_SEGMENTS * SLOT            # one chain's buffers
ARENA_BASE = 1 << 20
N_ARENAS = QUEUE_SIZE                  # never more chains in flight than descriptors
BOUNDARY = ARENA_BASE + 16             # two adjacent regions meet inside arena 0, slot 0
MEM_SIZE = ARENA_BASE + N_ARENAS * ARENA
POP_BATCHES = (1, 2, 3, 7, 16, 64, 256)
WAIT_S = 30.0                          # a side waiting this long for a notification has lost one
CASE_DEADLINE_S = 900.0

_fixed = random.Random(0x5EED)
POOL = _fixed.randbytes(1 << 20)                        # readable contents come from here
PATTERN_BYTES = _fixed.randbytes(SLOT + ARENA)          # the device writes slices of this
CANARY_BYTES = bytes((i * 7 + 0x5A) & 0xFF for i in range(SLOT))
# Views to copy from (slicing them copies nothing); comparisons use the bytes, because comparing
# memoryviews goes item by item (~3 ns a byte) where bytes == bytes is a memcmp.
PATTERN, CANARY = memoryview(PATTERN_BYTES), memoryview(CANARY_BYTES)
POOL_MV = memoryview(POOL)


def device_reply(head: int, crc: int, capacity: int) -> tuple[int, int]:
    """What the device writes for a chain: (used length, offset into PATTERN)."""
    seed = (crc ^ (head * 0x9E3779B1)) & 0xFFFFFFFF
    written = capacity if seed & 3 else (seed >> 2) % (capacity + 1)
    return written, (seed >> 8) & 0xFFFF


def serve(chains) -> list[tuple[int, int]]:
    """The device's work for popped chains: CRC the readable views, fill the writable ones."""
    crc32, pattern = zlib.crc32, PATTERN
    done = []
    for head, readable, writable in chains:
        crc = 0
        for view in readable:
            crc = crc32(view, crc)
        capacity = 0
        for view in writable:
            capacity += len(view)
        written, pos = device_reply(head, crc, capacity)
        left = written
        for view in writable:
            if not left:
                break
            take = len(view) if len(view) < left else left
            view[:take] = pattern[pos:pos + take]
            pos += take
            left -= take
        done.append((head, written))
    return done


def random_size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.15:
        return 0
    if r < 0.16:
        return SLOT                      # 64 KiB
    if r < 0.66:
        return rng.randint(1, 64)
    if r < 0.98:
        return rng.randint(65, 2048)
    return rng.randint(2049, SLOT - 1)


def random_shapes(rng: random.Random, count: int = 4096) -> list[tuple[int, tuple[tuple[int, int], ...], bool]]:
    """(readable count, ((offset in arena, size), ...), indirect) chain shapes."""
    shapes = []
    for _ in range(count):
        n = rng.randint(1, MAX_SEGMENTS)
        segs = []
        for j in range(n):
            size = random_size(rng)
            offset = 0 if rng.random() < 0.5 else rng.randint(0, SLOT - size)
            segs.append((j * SLOT + offset, size))
        shapes.append((rng.randint(0, n), tuple(segs), rng.random() < 0.3))
    return shapes


class Workload:
    """The driver side's half of the test: builds random chains, predicts the device's answers
    and checks every used chain."""

    def __init__(self, test: unittest.TestCase, ring: str, memory: GuestMemory, total: int, event_idx: bool,
                 rng: random.Random) -> None:
        driver_cls, _, size = RINGS[ring]
        self.test, self.memory, self.total, self.rng = test, memory, total, rng
        self.lay = driver_cls.layout(size, 0x1000, INDIRECT_MAX)
        assert self.lay["end"] <= BOUNDARY - 16 and size <= N_ARENAS
        self.driver = driver_cls(memory, size, self.lay["desc"], self.lay["driver"], self.lay["device"],
                                 event_idx=event_idx, indirect_area=self.lay["indirect"],
                                 indirect_max=INDIRECT_MAX)
        # (readable count, segments, indirect, descriptors needed, writable bytes, zero-length
        # segments, 64 KiB segments) per shape, so adding a chain only looks things up
        self.shapes = [(nr, segs, indirect, 1 if indirect else len(segs), sum(n for _, n in segs[nr:]),
                        sum(1 for _, n in segs if not n), sum(1 for _, n in segs if n == SLOT))
                       for nr, segs, indirect in random_shapes(rng)]
        high = memory.region_at(BOUNDARY)      # where nearly every buffer lives: write it directly
        self.high_view, self.high_start = high.view, high.gpa
        self.free_arenas = list(range(N_ARENAS - 1, -1, -1))   # arena 0 (across the boundary) used most
        self.pending: dict[int, tuple] = {}
        self.added = self.reaped = 0
        self.stats = dict.fromkeys(("indirect", "crossing", "partial", "zero", "64k", "bytes", "kicks", "calls"), 0)

    def add_burst(self, limit: int) -> int:
        """Add up to ``limit`` random chains (fewer when the ring is full); publish them."""
        driver, rng, shapes, stats = self.driver, self.rng, self.shapes, self.stats
        high, hstart, crc32, free_arenas = self.high_view, self.high_start, zlib.crc32, self.free_arenas
        nshapes, span = len(shapes), len(POOL) - ARENA
        added = indirects = zeros = bigs = 0
        while added < limit and self.added < self.total:
            nr, segs, indirect, need, capacity, nzero, nbig = shapes[rng.randrange(nshapes)]
            if driver.num_free < need:
                break
            arena = free_arenas.pop()
            base = ARENA_BASE + arena * ARENA
            o = rng.randrange(span)
            crc = 0
            if arena:                          # wholly inside the high region: write it directly
                at = base - hstart
                for offset, size in segs[:nr]:
                    data = POOL_MV[o + offset:o + offset + size]
                    high[at + offset:at + offset + size] = data
                    crc = crc32(data, crc)
                for offset, size in segs[nr:]:
                    high[at + offset:at + offset + size] = CANARY[:size]
            else:                              # arena 0 straddles the two regions
                for j, (offset, size) in enumerate(segs):
                    data = POOL_MV[o + offset:o + offset + size] if j < nr else CANARY[:size]
                    self.memory.write(base + offset, data)
                    if j < nr:
                        crc = crc32(data, crc)
                    if base + offset < BOUNDARY < base + offset + size:
                        stats["crossing"] += 1
            readable = [(base + offset, size) for offset, size in segs[:nr]]
            writable = [(base + offset, size) for offset, size in segs[nr:]]
            serial = self.added
            head = driver.add(readable, writable, serial, indirect=indirect)
            self.pending[serial] = (head, crc, writable, capacity, arena)
            indirects += indirect
            zeros += nzero
            bigs += nbig
            self.added += 1
            added += 1
        stats["indirect"] += indirects
        stats["zero"] += zeros
        stats["64k"] += bigs
        if added and driver.publish():
            stats["kicks"] += 1
            return -added              # negative: the device asked for a kick
        return added

    def check(self, used: list[tuple[int, int]]) -> None:
        """Every used chain: its length as predicted, the pattern up to it, the canary after."""
        high, hstart, read = self.high_view, self.high_start, self.memory.read
        for serial, length in used:
            head, crc, writable, capacity, arena = self.pending.pop(serial)
            written, pos = device_reply(head, crc, capacity)
            if length != written:
                self.test.fail(f"chain {serial} (head {head}): used len {length}, expected {written}")
            left = written
            for gpa, size in writable:
                got = bytes(high[gpa - hstart:gpa - hstart + size]) if gpa >= hstart else read(gpa, size)
                take = size if size < left else left
                expected = PATTERN_BYTES[pos:pos + take] + CANARY_BYTES[take:size]
                if got != expected:
                    at = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
                    self.test.fail(f"chain {serial} (head {head}, used len {length}): buffer {gpa:#x}+{size:#x} "
                                   f"byte {at} is {got[at]:#x}, expected {expected[at]:#x}")
                pos += take
                left -= take
            self.stats["partial"] += written < capacity
            self.stats["bytes"] += capacity
            self.free_arenas.append(arena)
            self.reaped += 1

    def summary(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.stats.items())


def make_memory() -> tuple[GuestMemory, int]:
    """Two adjacent regions of one memfd (buffers in arena 0 cross from one into the other)."""
    fd = os.memfd_create("vring-stress", os.MFD_CLOEXEC)
    os.ftruncate(fd, MEM_SIZE)
    memory = GuestMemory()
    memory.add_region(0, BOUNDARY, fd=fd)
    memory.add_region(BOUNDARY, MEM_SIZE - BOUNDARY, fd=fd, mmap_offset=BOUNDARY)
    return memory, fd


def make_device(ring: str, memory: GuestMemory, lay: dict, event_idx: bool):
    _, device_cls, size = RINGS[ring]
    return device_cls(memory, size, lay["desc"], lay["driver"], lay["device"], event_idx=event_idx, indirect=True)


class StressCases:
    """The cases, for the ring type named by ``ring``."""

    ring = ""
    chains = CHAINS                    # per case

    def setUp(self):
        gc.collect()          # fds that earlier tests left to the garbage collector must not close mid-case
        self.fds_before = open_fds()
        self.memory, self.fd = make_memory()

    def tearDown(self):
        self.memory.clear()
        os.close(self.fd)
        self.assertEqual(open_fds(), self.fds_before)

    # -- one process ------------------------------------------------------------------------------
    def run_in_process(self, event_idx: bool) -> None:
        """Both sides in one loop; each sleeps when idle and wakes only on the other's kick or
        interrupt, so a notification the rings wrongly suppress stalls and fails the test."""
        rng = seeded_random(self)
        work = Workload(self, self.ring, self.memory, self.chains, event_idx, rng)
        device = make_device(self.ring, self.memory, work.lay, event_idx)
        driver = work.driver
        kicked = called = False
        device_awake = driver_awake = True
        device_quiet = driver_quiet = False      # the classic "suppress while busy" style this wake
        start = time.monotonic()
        while work.reaped < self.chains:
            if kicked:
                kicked = False
                if not device_awake:                # a (spurious) kick while awake changes nothing
                    device_awake = True
                    device_quiet = rng.random() < 0.5
                    if device_quiet:
                        device.disable_notifications()
            if device_awake:
                for _ in range(rng.randint(0, 3)):             # 0: busy elsewhere this round
                    chains = device.pop_batch(rng.choice(POP_BATCHES))
                    if chains:
                        if device.push_batch(serve(chains)):
                            called = True
                            work.stats["calls"] += 1
                        continue
                    if device_quiet:
                        device_quiet = False
                        if device.enable_notifications():
                            continue
                    device_awake = False
                    break
            if called:
                called = False
                if not driver_awake:
                    driver_awake = True
                    driver_quiet = rng.random() < 0.5
                    if driver_quiet:
                        driver.disable_interrupts()
            if driver_awake:
                added = work.add_burst(rng.randint(1, 48))
                if added < 0:
                    kicked = True
                used = driver.reap(rng.choice((None, None, 5, 50)))
                work.check(used)
                if not used and (not added or driver.in_flight and rng.random() < 0.3):   # idle, or wait for replies
                    if driver_quiet:
                        driver_quiet = False
                        if driver.enable_interrupts():
                            continue
                    driver_awake = False
            if not (device_awake or driver_awake or kicked or called):
                self.fail(f"lost notification: both sides asleep with {work.added - work.reaped} chains "
                          f"in flight (device pending {device.pending()}, device in flight {device.in_flight})")
            if time.monotonic() - start > CASE_DEADLINE_S:
                self.fail(f"too slow: {work.reaped} of {self.chains} chains in {CASE_DEADLINE_S} s")
        self.assertEqual((device.in_flight, driver.in_flight, driver.num_free), (0, 0, RINGS[self.ring][2]))
        self.report(work, time.monotonic() - start)

    # -- two processes ----------------------------------------------------------------------------
    def run_two_processes(self, event_idx: bool) -> None:
        """The device in a forked child over the same memfd; kick and call are eventfds."""
        rng = seeded_random(self)
        work = Workload(self, self.ring, self.memory, self.chains, event_idx, rng)
        driver = work.driver
        kick = os.eventfd(0, os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        stop = os.eventfd(0, os.EFD_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        child_seed = rng.getrandbits(32)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:                                          # the device process
            status = 1
            try:
                os.close(err_r)
                _device_process(self.ring, self.memory, work.lay, event_idx, kick, call, stop, child_seed)
                status = 0
            except BaseException:                             # noqa: B902 - report everything
                try:
                    os.write(err_w, traceback.format_exc().encode()[-4000:])
                except OSError:
                    pass
            finally:
                os._exit(status)
        exited = False
        try:
            os.close(err_w)
            err_w = -1
            poller = select.poll()
            poller.register(call, select.POLLIN)
            poller.register(err_r, select.POLLIN)
            start = time.monotonic()
            while work.reaped < self.chains:
                quiet = rng.random() < 0.5
                if quiet:
                    driver.disable_interrupts()
                while True:                                   # awake: add and reap until idle
                    added = work.add_burst(rng.randint(1, 48))
                    if added < 0:
                        os.eventfd_write(kick, 1)
                    used = driver.reap(rng.choice((None, None, 5, 50)))
                    work.check(used)
                    if not used and (not added or driver.in_flight and rng.random() < 0.3):
                        if quiet:
                            quiet = False
                            if driver.enable_interrupts():
                                continue
                        break
                if work.reaped == self.chains:
                    break
                events = dict(poller.poll(WAIT_S * 1000))
                if err_r in events:
                    raise AssertionError("device process failed:\n" + _read_all(err_r))
                if not events:
                    raise AssertionError(f"lost notification: no interrupt for {WAIT_S} s with "
                                         f"{work.added - work.reaped} chains in flight")
                os.eventfd_read(call)
                work.stats["calls"] += 1
                if time.monotonic() - start > CASE_DEADLINE_S:
                    raise AssertionError(f"too slow: {work.reaped} of {self.chains} chains in {CASE_DEADLINE_S} s")
            os.eventfd_write(stop, 1)
            status = _wait_child(pid, WAIT_S)
            exited = True
            message = _read_all(err_r)
            self.assertEqual(status, 0, f"device process exit status {status}:\n{message}")
            self.assertEqual(driver.in_flight, 0)
            self.report(work, time.monotonic() - start)
        finally:
            if not exited:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                os.waitpid(pid, 0)
            for fd in (kick, call, stop, err_r, err_w):
                if fd >= 0:
                    os.close(fd)

    def report(self, work: Workload, seconds: float) -> None:
        print(f"[{self.id()}] {work.reaped} chains in {seconds:.1f} s "
              f"({work.reaped / seconds:,.0f}/s): {work.summary()}", flush=True)
        if self.chains >= 10000:      # big enough that every kind of chain must have come up
            for key in ("indirect", "crossing", "partial", "zero", "64k"):
                self.assertGreater(work.stats[key], 0, key)

    def test_one_process_event_idx_off(self):
        self.run_in_process(False)

    def test_one_process_event_idx_on(self):
        self.run_in_process(True)

    def test_two_processes_event_idx_off(self):
        self.run_two_processes(False)

    def test_two_processes_event_idx_on(self):
        self.run_two_processes(True)


def _device_process(ring: str, memory: GuestMemory, lay: dict, event_idx: bool, kick: int, call: int, stop: int,
                    seed: int) -> None:
    """The child: sleep on the kick eventfd, drain the ring, signal the call eventfd when asked."""
    device = make_device(ring, memory, lay, event_idx)
    rng = random.Random(seed)
    poller = select.poll()
    poller.register(kick, select.POLLIN)
    poller.register(stop, select.POLLIN)
    while True:
        events = dict(poller.poll(WAIT_S * 1000))
        if stop in events:
            if device.in_flight or device.pending():
                raise AssertionError(f"stopped with {device.in_flight} in flight, {device.pending()} pending")
            return
        if not events:
            raise AssertionError(f"lost notification: no kick for {WAIT_S} s (pending {device.pending()})")
        os.eventfd_read(kick)
        quiet = rng.random() < 0.5
        if quiet:
            device.disable_notifications()
        while True:
            chains = device.pop_batch(rng.choice(POP_BATCHES))
            if chains:
                if device.push_batch(serve(chains)):
                    os.eventfd_write(call, 1)
                continue
            if quiet:
                quiet = False
                if device.enable_notifications():
                    continue
            break


def _read_all(fd: int) -> str:
    os.set_blocking(fd, False)
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except BlockingIOError:
        pass
    return b"".join(chunks).decode(errors="replace")


def _wait_child(pid: int, timeout: float) -> int:
    """The child's exit status; SIGKILL it if it has not exited within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


class SplitStressTest(StressCases, unittest.TestCase):
    ring = "split"


class PackedStressTest(StressCases, unittest.TestCase):
    ring = "packed"
    chains = CHAINS // 2               # one million chains over the four cases by default


if __name__ == "__main__":
    unittest.main()
