"""Inflight I/O tracking (vhost_min.inflight): the region's layout byte for byte, the sealed memfd
and its hand-over to a restarted back-end, the spec's split and packed algorithms across crashes
at every step of a push, and corrupt regions."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import sys
import unittest

from tests.support import open_fds, seeded_random
from vhost_min.errors import GuestMemoryError, VhostError, VirtqueueError
from vhost_min.inflight import (INFLIGHT_ALIGNMENT, INFLIGHT_VERSION, DescStatePacked, DescStateSplit,
                                InflightError, InflightPacked, InflightRegion, InflightSplit,
                                QueueRegionPacked, QueueRegionSplit, allocate, queue_region_size)
from vhost_min.virtio import VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_USED, VIRTQ_DESC_F_WRITE


def offsets(struct_type) -> dict[str, int]:
    return {name: getattr(struct_type, name).offset for name, *_ in struct_type._fields_}


def split_region(size: int) -> bytearray:
    return bytearray(queue_region_size(size))


def packed_region(size: int) -> bytearray:
    return bytearray(queue_region_size(size, packed=True))


class LayoutTest(unittest.TestCase):
    """Golden sizes and offsets, read off the spec's C structs by hand."""

    def test_split_structs(self):
        self.assertEqual(ctypes.sizeof(DescStateSplit), 16)
        self.assertEqual(offsets(DescStateSplit), {"inflight": 0, "padding": 1, "next": 6, "counter": 8})
        self.assertEqual(offsets(QueueRegionSplit), {"features": 0, "version": 8, "desc_num": 10,
                                                     "last_batch_head": 12, "used_idx": 14, "desc": 16})
        self.assertEqual(ctypes.sizeof(QueueRegionSplit), 16)
        # The same facts from packed formats written from the spec text (native order, no padding).
        self.assertEqual(struct.calcsize("=B5xHQ"), 16)
        self.assertEqual(struct.calcsize("=QHHHH"), 16)

    def test_packed_structs(self):
        self.assertEqual(ctypes.sizeof(DescStatePacked), 32)
        self.assertEqual(offsets(DescStatePacked), {"inflight": 0, "padding": 1, "next": 2, "last": 4, "num": 6,
                                                    "counter": 8, "id": 16, "flags": 18, "len": 20, "addr": 24})
        self.assertEqual(offsets(QueueRegionPacked), {
            "features": 0, "version": 8, "desc_num": 10, "free_head": 12, "old_free_head": 14, "used_idx": 16,
            "old_used_idx": 18, "used_wrap_counter": 20, "old_used_wrap_counter": 21, "padding": 22, "desc": 32})
        # 29 bytes of header fields; desc[] (8-byte aligned) starts at 32, where C puts it.
        self.assertEqual(struct.calcsize("=QHHHHHHBB7x"), 29)
        self.assertEqual(ctypes.sizeof(QueueRegionPacked), 32)
        self.assertEqual(struct.calcsize("=BxHHHQHHIQ"), 32)

    def test_queue_region_size(self):
        self.assertEqual(INFLIGHT_ALIGNMENT, 64)
        golden = {(1, False): 64, (2, False): 64, (3, False): 64, (4, False): 128, (128, False): 2112,
                  (256, False): 4160, (32768, False): 524352, (1, True): 64, (128, True): 4160,
                  (100, True): 3264, (32768, True): 1048640}
        for (size, packed), expect in golden.items():
            self.assertEqual(queue_region_size(size, packed), expect, (size, packed))

        def align(n):
            return -(-n // 64) * 64
        for size in range(1, 32769):
            # libvhost-user: ALIGN_UP(sizeof(VuDescStateSplit) * qsz + sizeof(uint16_t), 64);
            # DPDK: ALIGN(16 * qsz + 8 + 2 * 4, 64) and ALIGN(32 * qsz + 8 + 2 * 6 + 9, 64).
            self.assertEqual(queue_region_size(size), align(16 * size + 2))
            self.assertEqual(queue_region_size(size), align(16 * size + 16))
            self.assertEqual(queue_region_size(size, True), align(32 * size + 29))
        for bad in (0, 32769, -1):
            with self.assertRaises(InflightError):
                queue_region_size(bad)

    def test_bytes_in_the_region(self):
        """What another back-end reading the same memory would find, in native byte order."""
        buf = split_region(4)
        t = InflightSplit(buf, 4)
        t.init()
        t.on_pop(2)
        t.on_pop(1)
        t.before_publish([1])
        t.after_publish([1], 1)
        n = sys.byteorder
        self.assertEqual(int.from_bytes(buf[8:10], n), INFLIGHT_VERSION)
        self.assertEqual(int.from_bytes(buf[10:12], n), 4)                 # desc_num
        self.assertEqual(int.from_bytes(buf[12:14], n), 1)                 # last_batch_head
        self.assertEqual(int.from_bytes(buf[14:16], n), 1)                 # used_idx
        d2, d1 = 16 + 2 * 16, 16 + 1 * 16
        self.assertEqual(buf[d2], 1)
        self.assertEqual(int.from_bytes(buf[d2 + 8:d2 + 16], n), 0)        # counter of the first pop
        self.assertEqual(buf[d1], 0)
        self.assertEqual(int.from_bytes(buf[d1 + 8:d1 + 16], n), 1)
        self.assertEqual(int.from_bytes(buf[d1 + 6:d1 + 8], n), 0)         # next = previous last_batch_head

        pbuf = packed_region(4)
        p = InflightPacked(pbuf, 4)
        p.init()
        self.assertEqual(pbuf[20:22], b"\x01\x01")                          # wrap counters start at 1
        self.assertEqual([int.from_bytes(pbuf[32 + 32 * i + 2:32 + 32 * i + 4], n) for i in range(4)], [1, 2, 3, 4])
        p.on_pop_packed(0, [(0x1122334455667788, 0x99AABBCC, 3, VIRTQ_DESC_F_AVAIL)])
        e = 32
        self.assertEqual((pbuf[e], int.from_bytes(pbuf[e + 6:e + 8], n)), (1, 1))       # inflight, num
        self.assertEqual(int.from_bytes(pbuf[e + 16:e + 18], n), 3)                     # id
        self.assertEqual(int.from_bytes(pbuf[e + 18:e + 20], n), VIRTQ_DESC_F_AVAIL)    # flags
        self.assertEqual(int.from_bytes(pbuf[e + 20:e + 24], n), 0x99AABBCC)            # len
        self.assertEqual(int.from_bytes(pbuf[e + 24:e + 32], n), 0x1122334455667788)    # addr
        self.assertEqual(int.from_bytes(pbuf[12:14], n), 1)                             # free_head
        self.assertEqual(int.from_bytes(pbuf[14:16], n), 1)                             # old_free_head


class RegionTest(unittest.TestCase):
    def setUp(self):
        self.fds_before = open_fds()

    def tearDown(self):
        self.assertEqual(open_fds(), self.fds_before, "fd leak")

    def test_allocate_gives_a_sealed_zeroed_memfd(self):
        fd, size = allocate(3, 128)
        try:
            self.assertEqual(size, 3 * 2112)
            self.assertEqual(os.fstat(fd).st_size, size)
            self.assertFalse(os.get_inheritable(fd))
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            want = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
            self.assertEqual(seals & want, want)
            self.assertEqual(os.pread(fd, size, 0), bytes(size))
            for new_size in (size + 4096, size - 64):
                with self.assertRaises(PermissionError):
                    os.ftruncate(fd, new_size)
        finally:
            os.close(fd)
        fd, size = allocate(2, 256, packed=True)
        os.close(fd)
        self.assertEqual(size, 2 * 8256)
        for args in ((0, 128), (1, 0), (65536, 4), (1, 32769)):
            with self.assertRaises(InflightError):
                allocate(*args)

    def test_handover_to_a_restarted_backend(self):
        fd, size = allocate(2, 8)
        with InflightRegion(fd, size, 0, 2, 8) as first:
            os.close(fd)                               # the region keeps its own fd
            q1 = first.queue(1)
            self.assertIs(first.queue(1), q1)
            self.assertFalse(q1.initialized)
            q1.init()
            for head in (5, 2, 7):
                q1.on_pop(head)
            q1.before_publish([2])
            q1.after_publish([2], 1)
            # The front-end passes the region fd to the new back-end (SET_INFLIGHT_FD).
            with InflightRegion(first.fileno(), size, 0, 2, 8) as second:
                q2 = second.queue(1)
                self.assertTrue(q2.initialized)
                self.assertFalse(second.queue(0).initialized)
                q2.reconcile(1)
                self.assertEqual(q2.resubmit(), [5, 7])
                self.assertEqual(q2.vring_base(), 3)
                q2.on_pop(1)                           # the new back-end's counter continues: 3
                self.assertEqual(q1.resubmit(), [5, 7, 1])   # both map the same pages
        self.assertEqual(first.fileno(), -1)
        with self.assertRaises(InflightError) as cm:
            first.queue(0)
        self.assertEqual(cm.exception.errno, errno.EBADF)

    def test_mmap_offset(self):
        need = queue_region_size(16, packed=True)
        fd = os.memfd_create("inflight-offset", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, 0x3000 + need)
            with InflightRegion(fd, need, 0x3000, 1, 16, packed=True) as region:
                region.queue(0).init()
            self.assertEqual(int.from_bytes(os.pread(fd, 2, 0x3000 + 8), sys.byteorder), INFLIGHT_VERSION)
            self.assertEqual(os.pread(fd, 0x3000, 0), bytes(0x3000))
        finally:
            os.close(fd)

    def test_bad_parameters_leak_nothing(self):
        fd, size = allocate(2, 64)
        try:
            with self.assertRaises(InflightError) as cm:      # 3 queues do not fit in 2 queues' bytes
                InflightRegion(fd, size, 0, 3, 64)
            self.assertIn("smaller than 3 split queue regions", str(cm.exception))
            self.assertEqual(cm.exception.errno, errno.EINVAL)
            with self.assertRaises(InflightError):
                InflightRegion(fd, size, 0, 2, 128, packed=True)
            with self.assertRaises(GuestMemoryError):        # runs past the end of the file
                InflightRegion(fd, size, 4096, 2, 64)
            with InflightRegion(fd, size, 0, 2, 64) as region:
                with self.assertRaises(InflightError):
                    region.queue(2)
        finally:
            os.close(fd)
        with self.assertRaises(GuestMemoryError):
            InflightRegion(fd, size, 0, 2, 64)               # closed fd
        self.assertTrue(issubclass(InflightError, VhostError))

    def test_tracker_needs_a_big_enough_writable_view(self):
        with self.assertRaises(InflightError):
            InflightSplit(bytearray(16 + 16 * 7), 8)
        with self.assertRaises(InflightError):
            InflightPacked(bytes(queue_region_size(8, True)), 8)


class SplitCrashTest(unittest.TestCase):
    """Pop 5, complete a batch of 2, crash in the middle of a second batch of 2."""

    def setUp(self):
        self.buf = split_region(8)
        t = InflightSplit(self.buf, 8)
        t.init()
        for head in (3, 1, 6, 0, 5):           # counters 0..4: the submission order
            t.on_pop(head)
        t.before_publish([1, 6])
        t.after_publish([1, 6], 2)             # the ring's used.idx is now 2
        t.before_publish([5, 3])               # second batch: used.idx would become 4
        self.tracker = t

    def restart(self, ring_used_idx):
        t = InflightSplit(self.buf, 8)          # the new back-end over the same memory
        self.assertTrue(t.initialized)
        t.reconcile(ring_used_idx)
        return t

    def test_crash_before_used_idx_moved(self):
        t = self.restart(2)
        self.assertEqual(t.resubmit(), [3, 0, 5])
        self.assertEqual(t.vring_base(), 5)
        self.assertEqual(t.used_idx, 2)

    def test_crash_after_used_idx_moved(self):
        t = self.restart(4)
        self.assertEqual(t.resubmit(), [0])
        self.assertEqual(t.used_idx, 4)
        self.assertEqual(t.vring_base(), 5)

    def test_crash_in_the_middle_of_after_publish(self):
        self.tracker.after_publish([5], 3)       # as if only one flag was cleared: used_idx stays 2
        self.buf[14:16] = (2).to_bytes(2, sys.byteorder)
        t = self.restart(4)
        self.assertEqual(t.resubmit(), [0])

    def test_batch_complete_and_counter_continues(self):
        self.tracker.after_publish([5, 3], 4)
        t = self.restart(4)
        self.assertEqual(t.resubmit(), [0])
        t.on_pop(7)
        t.on_pop(2)
        self.assertEqual(t.resubmit(), [0, 7, 2])

    def test_reconcile_is_idempotent(self):
        t = self.restart(4)
        t.reconcile(4)
        self.assertEqual(t.resubmit(), [0])

    def test_used_idx_wraps(self):
        buf = split_region(4)
        t = InflightSplit(buf, 4)
        t.init()
        for i in range(0xFFFF):                  # move used_idx to 0xffff one chain at a time
            t.on_pop(i % 4)
            t.before_publish([i % 4])
            t.after_publish([i % 4], i + 1)
        self.assertEqual(t.used_idx, 0xFFFF)
        for head in (2, 0, 3):
            t.on_pop(head)
        t.before_publish([3, 2])
        t = InflightSplit(buf, 4)
        t.reconcile(0x0001)                      # 0xffff + 2
        self.assertEqual(t.resubmit(), [0])
        self.assertEqual(t.vring_base(), 2)


class PackedCrashTest(unittest.TestCase):
    """Four chains (2, 1, 3 and 1 descriptors) in a ring of 8; one batch done, one cut short."""

    SIZE = 8

    def setUp(self):
        self.buf = packed_region(self.SIZE)
        self.ring_flags = [0] * self.SIZE
        t = InflightPacked(self.buf, self.SIZE)
        t.init()
        avail = VIRTQ_DESC_F_AVAIL                       # driver wrap counter 1
        self.chains = {
            10: [(0x1000, 16, 0, avail | VIRTQ_DESC_F_NEXT), (0x2000, 512, 0, avail | VIRTQ_DESC_F_WRITE)],
            11: [(0x3000, 64, 1, avail)],
            12: [(0x4000, 16, 2, avail | VIRTQ_DESC_F_NEXT), (0x5000, 4096, 2, avail | VIRTQ_DESC_F_NEXT),
                 (0x6000, 1, 2, avail | VIRTQ_DESC_F_WRITE)],
            13: [(0x7000, 8, 3, avail | VIRTQ_DESC_F_WRITE)],
        }
        slot = 0
        for key in (10, 11, 12, 13):                     # the driver makes them available...
            for desc in self.chains[key]:
                self.ring_flags[slot] = desc[3]
                slot += 1
            t.on_pop_packed(slot - len(self.chains[key]), self.chains[key])   # ...the device pops them
        # Batch 1: buffer 1 (1 descriptor) -> used slot 0, used_idx 1.
        t.before_publish([1])
        self.publish([(0, 1)])
        t.after_publish([1], 1, 1)
        # Batch 2: buffers 2 and 0 -> used slots 1 and 4, used_idx 1 + 3 + 2 = 6.
        t.before_publish([2, 0])
        self.assertEqual((t.used_idx, t.used_wrap_counter), (6, 1))
        self.tracker = t

    def publish(self, used):
        """The ring writes used descriptors (wrap counter 1: AVAIL | USED), the batch's first last."""
        for slot, _ in reversed(used):
            self.ring_flags[slot] = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED

    def restart(self):
        t = InflightPacked(self.buf, self.SIZE)
        self.assertTrue(t.initialized)
        t.reconcile(lambda slot: self.ring_flags[slot])
        return t

    def test_crash_before_the_ring_published(self):
        t = self.restart()
        self.assertEqual(t.resubmit(), [self.chains[10], self.chains[12], self.chains[13]])
        self.assertEqual((t.used_idx, t.used_wrap_counter, t.free_head), (1, 1, t.old_free_head))
        base = t.vring_base()
        self.assertEqual((base & 0x7FFF, base >> 15 & 1, base >> 16 & 0x7FFF, base >> 31), (7, 1, 1, 1))

    def test_crash_after_the_ring_published(self):
        self.publish([(1, 2), (4, 0)])
        t = self.restart()
        self.assertEqual(t.resubmit(), [self.chains[13]])
        self.assertEqual((t.used_idx, t.used_wrap_counter, t.old_used_idx), (6, 1, 6))
        base = t.vring_base()
        self.assertEqual((base & 0x7FFF, base >> 15 & 1, base >> 16 & 0x7FFF, base >> 31), (7, 1, 6, 1))

    def test_flags_passed_as_a_value(self):
        t = InflightPacked(self.buf, self.SIZE)
        t.reconcile(self.ring_flags[t.old_used_idx])
        self.assertEqual(len(t.resubmit()), 3)

    def test_driver_already_reused_the_slot(self):
        """Published, reaped, and slot 1 made available again in the next lap (wrap 0)."""
        self.ring_flags[1] = VIRTQ_DESC_F_USED
        t = self.restart()
        self.assertEqual(t.resubmit(), [self.chains[13]])

    def test_after_publish_then_restart_and_reuse(self):
        self.publish([(1, 2), (4, 0)])
        self.tracker.after_publish([2, 0], 6, 1)
        t = self.restart()
        self.assertEqual(t.resubmit(), [self.chains[13]])
        # The restarted back-end completes buffer 3 and pops a chain that wraps the entries.
        t.before_publish([3])
        self.assertEqual((t.used_idx, t.used_wrap_counter), (7, 1))
        t.after_publish([3], 7, 1)
        chain = [(0x8000 + i, 1, 5, VIRTQ_DESC_F_NEXT) for i in range(7)] + [(0x9000, 2, 5, 0)]
        t.on_pop_packed(7, chain)               # all 8 entries in use
        with self.assertRaises(InflightError):
            t.on_pop_packed(7, [(0, 1, 6, 0)])  # nothing free: more than the ring can hold
        t2 = InflightPacked(self.buf, self.SIZE)
        t2.reconcile(0)                          # nothing in progress: flags not consulted
        self.assertEqual(t2.resubmit(), [chain])

    def test_crash_in_the_middle_of_a_pop(self):
        class Crash(Exception):
            pass

        class CrashingChain(list):
            def __iter__(self):
                yield self[0]
                raise Crash

        self.tracker.after_publish([2, 0], 6, 1)
        with self.assertRaises(Crash):
            self.tracker.on_pop_packed(7, CrashingChain([(0xA000, 1, 6, VIRTQ_DESC_F_NEXT), (0xB000, 1, 6, 0)]))
        t = self.restart()
        self.assertEqual(t.resubmit(), [self.chains[13]])

    def test_ids_checked(self):
        t = self.tracker
        with self.assertRaises(VirtqueueError):
            t.on_pop_packed(7, [(0, 1, 3, 0)])              # buffer 3 is in flight
        with self.assertRaises(VirtqueueError):
            t.on_pop_packed(7, [(0, 1, 8, 0)])              # not below the queue size
        t.after_publish([2, 0], 6, 1)
        with self.assertRaises(InflightError):
            t.before_publish([3, 3])                         # twice in one batch
        with self.assertRaises(InflightError):
            t.before_publish([0])                            # already completed
        t.before_publish([3])                                # the failed calls undid their changes
        t.after_publish([3], 7, 1)
        self.assertEqual(self.restart().resubmit(), [])

    def test_ring_disagreeing_on_used_idx_is_reported(self):
        with self.assertRaises(InflightError) as cm:
            self.tracker.after_publish([2, 0], 5, 1)
        self.assertIn("(5, 1) after buffers [2, 0] differ from (6, 1)", str(cm.exception))
        self.assertEqual((self.tracker.used_idx, self.tracker.old_used_idx), (5, 5))


class RandomCrashTest(unittest.TestCase):
    """Random pops and out-of-order batched completions, crashing at a random step of a push; after
    every restart the driver must get each request completed exactly once."""

    def test_split(self):
        rng = seeded_random(self)
        size = 16
        buf = split_region(size)
        t = InflightSplit(buf, size)
        t.init()
        ring_used = 0
        order: list[int] = []          # heads in flight, in submission order (the model)
        completed = 0
        for step in range(3000):
            free = [h for h in range(size) if h not in order]
            for head in rng.sample(free, rng.randint(0, len(free))):
                t.on_pop(head)
                order.append(head)
            if not order:
                continue
            batch = rng.sample(order, rng.randint(1, len(order)))
            crash = rng.choice(["none", "none", "before", "moved", "partial"])
            t.before_publish(batch)
            if crash == "before":
                pass
            else:
                ring_used = (ring_used + len(batch)) & 0xFFFF      # the driver sees them
                for head in batch:
                    order.remove(head)
                completed += len(batch)
                if crash == "partial":
                    t.after_publish(batch[:len(batch) // 2], (ring_used - len(batch)) & 0xFFFF)
                elif crash == "none":
                    t.after_publish(batch, ring_used)
            if crash != "none":
                t = InflightSplit(buf, size)
                t.reconcile(ring_used)
                self.assertEqual(t.resubmit(), order, f"step {step}, crash {crash}")
                self.assertEqual(t.vring_base(), (ring_used + len(order)) & 0xFFFF)
        self.assertGreater(completed, 3000)

    def test_packed(self):
        rng = seeded_random(self)
        size = 10                                   # packed rings need not be a power of two
        buf = packed_region(size)
        t = InflightPacked(buf, size)
        t.init()
        ring = [0] * size                           # flags of each ring slot
        avail, avail_wrap = 0, 1                    # driver's next slot (= device's next avail)
        used, used_wrap = 0, 1                      # device's next used slot
        outstanding = {}                            # id -> descriptors, in submission order
        free_ids = list(range(size))
        crashes = 0

        def flags_of(wrap, used_too=False):
            if used_too:
                return VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED if wrap else 0
            return VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED

        for step in range(3000):
            # The driver adds chains while slots are free; the device pops them at once.
            while True:
                room = size - sum(len(c) for c in outstanding.values())
                length = rng.randint(1, 4)
                if length > room or not free_ids or rng.random() < 0.3:
                    break
                buffer_id = free_ids.pop(rng.randrange(len(free_ids)))
                chain, head_slot = [], avail
                for n in range(length):
                    f = flags_of(avail_wrap) | (VIRTQ_DESC_F_NEXT if n < length - 1 else 0)
                    chain.append((rng.getrandbits(64), rng.getrandbits(32), buffer_id, f))
                    ring[avail] = f
                    avail += 1
                    if avail == size:
                        avail, avail_wrap = 0, avail_wrap ^ 1
                t.on_pop_packed(head_slot, chain)
                outstanding[buffer_id] = chain
            if not outstanding:
                continue
            batch = rng.sample(list(outstanding), rng.randint(1, len(outstanding)))
            crash = rng.choice(["none", "none", "before", "tail", "published", "step9a", "step9b"])
            t.before_publish(batch)
            slots, new_used, new_wrap = [], used, used_wrap
            for buffer_id in batch:
                slots.append((new_used, new_wrap))
                new_used += len(outstanding[buffer_id])
                if new_used >= size:
                    new_used, new_wrap = new_used - size, new_wrap ^ 1
            self.assertEqual((t.used_idx, t.used_wrap_counter), (new_used, new_wrap))
            # "before": the crash comes before the ring wrote any used descriptor; "tail": after
            # it wrote the batch's later descriptors, flags included, but not the first one's
            # flags. Those stale slots must all be among the slots the restarted ring has in flight
            # (PackedDeviceQueue.clear_stale_used rewrites exactly those).
            stale = []
            if crash == "tail":
                for slot, wrap in slots[1:]:
                    ring[slot] = flags_of(wrap, True)
                    stale.append((slot, wrap))
            elif crash != "before":
                for slot, wrap in slots[1:]:        # every used descriptor but the first...
                    ring[slot] = flags_of(wrap, True)
                ring[slots[0][0]] = flags_of(slots[0][1], True)   # ...whose flags publish the batch
                used, used_wrap = new_used, new_wrap
                for buffer_id in batch:
                    del outstanding[buffer_id]      # reaped by the driver: exactly once
                    free_ids.append(buffer_id)
                if crash == "none":
                    t.after_publish(batch, used, used_wrap)
                elif crash.startswith("step9"):     # part of step 9 done: old_* partly updated
                    header = QueueRegionPacked.from_buffer(buf)
                    header.old_free_head = header.free_head
                    if crash == "step9b":
                        header.old_used_wrap_counter = header.used_wrap_counter
                    del header
            if crash != "none":
                crashes += 1
                t = InflightPacked(buf, size)
                t.reconcile(lambda slot: ring[slot])
                self.assertEqual(t.resubmit(), list(outstanding.values()), f"step {step}, crash {crash}")
                base = t.vring_base()
                self.assertEqual((base & 0x7FFF, base >> 15 & 1, base >> 16 & 0x7FFF, base >> 31),
                                 (avail, avail_wrap, used, used_wrap), f"step {step}")
                # Slots on a line of two laps: the in-flight range [used, avail) must hold them.
                line = lambda slot, wrap: slot + (0 if wrap else size)
                lo, hi = line(used, used_wrap), line(avail, avail_wrap)
                hi += 2 * size if hi < lo else 0
                for slot, wrap in stale:
                    at = line(slot, wrap)
                    at += 2 * size if at < lo else 0
                    self.assertTrue(lo < at < hi, f"step {step}: stale slot {slot} outside [{used}, {avail})")
                    ring[slot] = flags_of(wrap)         # what clear_stale_used writes
        self.assertGreater(crashes, 500)


class CorruptRegionTest(unittest.TestCase):
    """A peer (or a crash mid-init) may hand over anything: each defect has its own message."""

    def split(self, size=8):
        buf = split_region(size)
        t = InflightSplit(buf, size)
        t.init()
        header = QueueRegionSplit.from_buffer(buf)
        desc = (DescStateSplit * size).from_buffer(buf, QueueRegionSplit.desc.offset)
        return buf, header, desc

    def assertInflightError(self, text, func, *args):
        with self.assertRaises(InflightError) as cm:
            func(*args)
        self.assertIn(text, str(cm.exception))
        self.assertEqual(cm.exception.errno, errno.EINVAL)

    def test_split_version(self):
        buf, header, _ = self.split()
        header.version = 2
        self.assertInflightError("unknown layout (version 2, expected 1)", InflightSplit(buf, 8).reconcile, 0)
        header.version = 0
        self.assertInflightError("is not initialised (version 0", InflightSplit(buf, 8).resubmit)

    def test_split_desc_num(self):
        buf, header, _ = self.split()
        header.desc_num = 16
        self.assertInflightError("desc_num 16 does not match the queue size 8", InflightSplit(buf, 8).reconcile, 0)

    def test_split_next_out_of_range(self):
        buf, header, desc = self.split()
        header.last_batch_head, desc[3].next = 3, 99
        self.assertInflightError("entry 1 of the last batch is descriptor 99, outside the queue of 8",
                                 InflightSplit(buf, 8).reconcile, 2)
        header.last_batch_head = 8
        self.assertInflightError("entry 0 of the last batch is descriptor 8", InflightSplit(buf, 8).reconcile, 2)

    def test_split_batch_cycle(self):
        buf, header, desc = self.split()
        header.last_batch_head, desc[3].next, desc[5].next = 3, 5, 3
        for head in (3, 5):
            desc[head].inflight = 1
        t = InflightSplit(buf, 8)
        self.assertInflightError("loops back to descriptor 3 after 2 of 3 entries", t.reconcile, 3)
        self.assertEqual((desc[3].inflight, desc[5].inflight, header.used_idx), (1, 1, 0))   # untouched
        t.reconcile(2)                           # a batch of 2 does not reach the loop
        self.assertEqual(t.resubmit(), [])

    def test_split_batch_larger_than_queue(self):
        buf, _, _ = self.split()
        self.assertInflightError("9 entries past the recorded used_idx 0", InflightSplit(buf, 8).reconcile, 9)
        self.assertInflightError("65535 entries past", InflightSplit(buf, 8).reconcile, 0xFFFF)

    def test_split_inflight_value(self):
        buf, _, desc = self.split()
        desc[4].inflight = 7
        self.assertInflightError("descriptor 4 has inflight = 7", InflightSplit(buf, 8).resubmit)

    def packed(self, size=8):
        buf = packed_region(size)
        t = InflightPacked(buf, size)
        t.init()
        t.on_pop_packed(0, [(0x1000, 1, 0, VIRTQ_DESC_F_NEXT), (0x2000, 2, 0, 0)])   # entries 0, 1
        t.on_pop_packed(2, [(0x3000, 3, 1, 0)])                                     # entry 2
        header = QueueRegionPacked.from_buffer(buf)
        desc = (DescStatePacked * size).from_buffer(buf, QueueRegionPacked.desc.offset)
        return buf, header, desc

    def test_packed_header(self):
        buf, header, _ = self.packed()
        header.desc_num = 9
        self.assertInflightError("desc_num 9 does not match", InflightPacked(buf, 8).reconcile, 0)
        header.desc_num, header.version = 8, 3
        self.assertInflightError("version 3", InflightPacked(buf, 8).reconcile, 0)
        header.version, header.old_used_wrap_counter = 1, 2
        self.assertInflightError("old_used_wrap_counter 2 is out of range", InflightPacked(buf, 8).reconcile, 0)
        header.old_used_wrap_counter, header.free_head = 1, 9
        self.assertInflightError("free_head 9 is out of range", InflightPacked(buf, 8).reconcile, 0)

    def test_packed_free_list(self):
        buf, header, desc = self.packed()
        desc[7].next = 4                        # free list 3 -> 4 -> ... -> 7 -> 4
        self.assertInflightError("the free list loops back to entry 4 after 5 entries",
                                 InflightPacked(buf, 8).reconcile, 0)
        desc[7].next = 12
        self.assertInflightError("free list entry 5 is 12", InflightPacked(buf, 8).reconcile, 0)

    def test_packed_chains(self):
        buf, header, desc = self.packed()
        t = InflightPacked(buf, 8)
        t.reconcile(0)
        self.assertEqual(len(t.resubmit()), 2)
        desc[0].num = 0
        self.assertInflightError("the chain at entry 0 has num = 0", InflightPacked(buf, 8).reconcile, 0)
        desc[0].num = 3
        self.assertInflightError("ends at entry 2 after 3 descriptors, but its last is 1",
                                 InflightPacked(buf, 8).reconcile, 0)
        desc[0].last = 2
        self.assertInflightError("entry 2 of the chain at entry 2 also belongs to another chain",
                                 InflightPacked(buf, 8).reconcile, 0)
        desc[0].num, desc[0].last = 2, 2
        self.assertInflightError("ends at entry 1 after 2 descriptors, but its last is 2",
                                 InflightPacked(buf, 8).reconcile, 0)
        desc[0].last, desc[1].id = 1, 1
        self.assertInflightError("buffer id 1, already used by another chain", InflightPacked(buf, 8).reconcile, 0)
        desc[1].id, desc[3].inflight = 0, 1      # entry 3 is free: cleared by reconcile, as the spec says
        t = InflightPacked(buf, 8)
        t.reconcile(0)
        self.assertEqual(len(t.resubmit()), 2)
        desc[4].inflight = 2
        self.assertInflightError("entry 4 has inflight = 2", t.resubmit)

    def test_counter_cannot_overflow(self):
        buf, _, desc = self.split()
        desc[0].counter = (1 << 64) - 1
        self.assertInflightError("counter is 2^64-1", InflightSplit, buf, 8)


# --------------------------------------------------------------------------------------------
# Through the real rings: a back-end "crashes" in the middle of a push (the hook raises, the
# queue object is dropped), a new one starts over the same guest memory and inflight fd.
# --------------------------------------------------------------------------------------------

class Crash(Exception):
    """The back-end process dies here."""


class CrashingTracker:
    """Passes the ring's hooks to a tracker and dies at ``point``, once armed: "before" (after
    before_publish, before the ring publishes) or "after" (published, before after_publish)."""

    def __init__(self, tracker, point: str) -> None:
        self.tracker, self.point, self.armed = tracker, point, False

    def on_pop(self, head):
        self.tracker.on_pop(head)

    def on_pop_packed(self, slot, descriptors):
        self.tracker.on_pop_packed(slot, descriptors)

    def before_publish(self, *args):
        self.tracker.before_publish(*args)
        if self.armed and self.point == "before":
            raise Crash

    def after_publish(self, *args):
        if self.armed and self.point == "after":
            raise Crash
        self.tracker.after_publish(*args)


MEM_SIZE, RING_BASE, BUF = 1 << 20, 0x1000, 0x40000


class RingIntegrationCase(unittest.TestCase):
    SIZE = 16

    def setUp(self):
        from vhost_min.memory import GuestMemory
        fds_before = open_fds()
        self.addCleanup(lambda: self.assertEqual(open_fds(), fds_before, "fd leak"))
        fd = os.memfd_create("guest", os.MFD_CLOEXEC)
        os.ftruncate(fd, MEM_SIZE)
        self.memory = GuestMemory()
        self.memory.add_region(0, MEM_SIZE, fd=fd)
        os.close(fd)
        self.addCleanup(self.memory.clear)
        # GET_INFLIGHT_FD at the first start; the front-end keeps the fd for SET_INFLIGHT_FD.
        self.inflight_fd, self.inflight_size = allocate(1, self.SIZE, self.packed)
        self.addCleanup(os.close, self.inflight_fd)
        self.payloads = {}

    def tracker(self):
        """What a back-end does on SET_INFLIGHT_FD: map the region the front-end hands it."""
        region = InflightRegion(self.inflight_fd, self.inflight_size, 0, 1, self.SIZE, self.packed)
        self.addCleanup(region.close)
        return region.queue(0)

    def add_requests(self, driver, tokens):
        """Each request: 64 readable bytes, 64 writable bytes for the device's answer."""
        ids = {}
        for token in tokens:
            out, back = BUF + 0x100 * token, BUF + 0x100 * token + 0x80
            self.payloads[token] = os.urandom(64)
            self.memory.write(out, self.payloads[token])
            ids[driver.add([(out, 64)], [(back, 64)], token)] = token
        driver.publish()
        return ids

    @staticmethod
    def serve(chains):
        """The device's work: answer each request with its bytes reversed."""
        done = []
        for head, readable, writable in chains:
            writable[0][:] = bytes(readable[0])[::-1]
            done.append((head, 64))
        return done

    def reap(self, driver, reaped):
        for token, length in driver.reap():
            self.assertEqual(length, 64)
            self.assertNotIn(token, reaped, "a request completed twice")
            back = self.memory.read(BUF + 0x100 * token + 0x80, 64)
            self.assertEqual(back, self.payloads[token][::-1])
            reaped.append(token)


class SplitRingIntegrationTest(RingIntegrationCase):
    packed = False
    SIZE = 32

    def run_crash(self, point):
        from vhost_min.vring import SplitDeviceQueue, SplitDriverQueue
        lay = SplitDriverQueue.layout(self.SIZE, RING_BASE)
        ring = (self.memory, self.SIZE, lay["desc"], lay["driver"], lay["device"])
        driver = SplitDriverQueue(*ring)
        reaped: list[int] = []

        tracker = self.tracker()
        self.assertFalse(tracker.initialized)
        tracker.init()
        hooks = CrashingTracker(tracker, point)
        device = SplitDeviceQueue(*ring, inflight=hooks)
        self.add_requests(driver, range(10))
        chains = device.pop_batch()
        self.assertEqual(len(chains), 10)
        done = self.serve(chains)
        device.push_batch([done[2], done[0]])
        hooks.armed = True
        with self.assertRaises(Crash):
            device.push_batch([done[4], done[1], done[6]])
        del device, hooks, tracker                      # the back-end is gone
        self.reap(driver, reaped)
        self.assertEqual(reaped, [2, 0] + ([4, 1, 6] if point == "after" else []))

        tracker = self.tracker()
        self.assertTrue(tracker.initialized)
        device = SplitDeviceQueue(*ring, inflight=tracker)
        tracker.reconcile(device.used_idx)
        device.set_base(tracker.vring_base())
        heads = tracker.resubmit()
        self.assertEqual(len(heads), 10 - len(reaped))
        again = [device.resubmit(head) for head in heads]
        self.add_requests(driver, range(10, 14))
        fresh = device.pop_batch()
        self.assertEqual(len(fresh), 4, "only the new requests are popped")
        device.push_batch(self.serve(again) + self.serve(fresh)[::-1])
        self.reap(driver, reaped)
        self.assertEqual(sorted(reaped), list(range(14)))
        self.assertEqual(tracker.resubmit(), [])
        self.assertEqual(driver.in_flight, 0)

    def test_crash_before_used_idx_is_published(self):
        self.run_crash("before")

    def test_crash_after_used_idx_is_published(self):
        self.run_crash("after")


class PackedRingIntegrationTest(RingIntegrationCase):
    packed = True

    def run_crash(self, point, batch):
        from vhost_min.packed import PackedDeviceQueue, PackedDriverQueue, decode_base
        lay = PackedDriverQueue.layout(self.SIZE, RING_BASE)
        ring = (self.memory, self.SIZE, lay["desc"], lay["driver"], lay["device"])
        driver = PackedDriverQueue(*ring)
        reaped: list[int] = []

        tracker = self.tracker()
        tracker.init()
        hooks = CrashingTracker(tracker, point)
        device = PackedDeviceQueue(*ring, inflight=hooks)
        ids = self.add_requests(driver, range(6))       # 2 descriptors each: 12 of 16 slots
        chains = device.pop_batch()
        self.assertEqual(len(chains), 6)
        done = self.serve(chains)
        device.push_batch([done[3]])
        hooks.armed = True
        with self.assertRaises(Crash):
            device.push_batch([done[i] for i in batch])
        del device, hooks, tracker
        self.reap(driver, reaped)
        completed = [3] + (list(batch) if point == "after" else [])
        self.assertEqual(reaped, completed)

        tracker = self.tracker()
        device = PackedDeviceQueue(*ring, inflight=tracker)
        tracker.reconcile(lambda slot: struct.unpack("<H", self.memory.read(lay["desc"] + 16 * slot + 14, 2))[0])
        device.set_base(tracker.vring_base())
        self.assertEqual(decode_base(tracker.vring_base())[:2], (12, 1))   # resumes after the 6 popped
        resubmitted = tracker.resubmit()
        tokens = [ids[chain[-1][2]] for chain in resubmitted]
        self.assertEqual(tokens, [t for t in range(6) if t not in completed], "in submission order")
        for token, chain in zip(tokens, resubmitted):
            self.assertEqual([(addr, length) for addr, length, _, _ in chain],
                             [(BUF + 0x100 * token, 64), (BUF + 0x100 * token + 0x80, 64)])
            self.assertEqual([flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE) for *_, flags in chain],
                             [VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE])
        # New requests after the restart are popped (and only they), served and reaped once.
        self.add_requests(driver, range(6, 8))
        fresh = device.pop_batch()
        self.assertEqual(len(fresh), 2)
        device.push_batch(self.serve(fresh))
        self.reap(driver, reaped)
        self.assertEqual(sorted(reaped), sorted(completed + [6, 7]))
        self.assertEqual(tracker.resubmit(), resubmitted)
        # Finishing the resubmitted chains needs a way to mark a buffer id in flight again in the
        # restarted PackedDeviceQueue (like SplitDeviceQueue.resubmit); it has none yet.
        if hasattr(device, "resubmit"):
            device.push_batch(self.serve([device.resubmit(chain) for chain in resubmitted]))
            self.reap(driver, reaped)
            self.assertEqual(sorted(reaped), list(range(8)))

    def test_crash_before_the_batch_is_published(self):
        self.run_crash("before", (1,))

    def test_crash_after_the_batch_is_published(self):
        self.run_crash("after", (4, 0))

    def test_crash_between_a_batch_and_its_first_flags(self):
        """The packed-ring gap: push_batch writes a batch's later used descriptors whole, flags
        included, and the first one's flags last. A crash in between leaves the later ones
        reading as used in slots that are in flight again after the restart. Here: used slot 0
        holds request 3; the batch [1, 4] dies with request 4's used descriptor complete in slot
        4 and slot 2 (request 1's) unpublished. The restarted device completes 2 first, in slot 2:
        without clear_stale_used the driver would go on to read request 4's stale descriptor in
        slot 4 (a completion the restarted device never gave: 4 is in flight again), and the
        restarted device's own completion of 4 later, at another slot, as an unknown id."""
        from vhost_min.packed import PackedDeviceQueue, PackedDriverQueue
        lay = PackedDriverQueue.layout(self.SIZE, RING_BASE)
        ring = (self.memory, self.SIZE, lay["desc"], lay["driver"], lay["device"])
        driver = PackedDriverQueue(*ring)
        reaped: list[int] = []
        flags_at = lambda slot: struct.unpack("<H", self.memory.read(lay["desc"] + 16 * slot + 14, 2))[0]

        tracker = self.tracker()
        tracker.init()
        device = PackedDeviceQueue(*ring, inflight=tracker)
        ids = self.add_requests(driver, range(6))       # 2 descriptors each: slots 0-11 of 16
        done = {ids[head]: (head, n) for head, n in self.serve(device.pop_batch())}
        device.push_batch([done[3]])                    # used slot 0
        self.reap(driver, reaped)
        self.assertEqual(reaped, [3])

        def crash():                                    # the write barrier before the first flags
            raise Crash
        device._wmb = crash
        with self.assertRaises(Crash):
            device.push_batch([done[1], done[4]])       # 1 -> slot 2 (flags not yet), 4 -> slot 4
        del device, tracker
        used_flags = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
        self.assertNotEqual(flags_at(2) & used_flags, used_flags, "the batch was not published")
        self.assertEqual(flags_at(4) & used_flags, used_flags, "the batch's second descriptor reads as used")
        self.reap(driver, reaped)
        self.assertEqual(reaped, [3])

        # The back-end restarts: reconcile (rolled back: slot 2 is unpublished), resume, resubmit.
        tracker = self.tracker()
        device = PackedDeviceQueue(*ring, inflight=tracker)
        tracker.reconcile(flags_at)
        device.set_base(tracker.vring_base())
        self.assertEqual(device.clear_stale_used(), 1)
        self.assertNotEqual(flags_at(4) & used_flags, used_flags)
        self.assertEqual(device.clear_stale_used(), 0, "idempotent (a crash during recovery)")
        again = {ids[chain[-1][2]]: device.resubmit(chain) for chain in tracker.resubmit()}
        self.assertEqual(list(again), [0, 1, 2, 4, 5], "in submission order")
        answers = {token: pair for token, pair in zip(again, self.serve(list(again.values())))}
        device.push_batch([answers[2]])                 # slot 2: the driver reads on to slot 4
        self.reap(driver, reaped)
        self.assertEqual(reaped, [3, 2], "nothing completed that the restarted device did not complete")
        for token in (0, 1, 4, 5):                      # slots 4, 6, 8, 10
            device.push_batch([answers[token]])
            self.reap(driver, reaped)
        self.assertEqual(reaped, [3, 2, 0, 1, 4, 5])
        self.assertEqual(driver.in_flight, 0)
        self.assertEqual(tracker.resubmit(), [])


if __name__ == "__main__":
    unittest.main()
