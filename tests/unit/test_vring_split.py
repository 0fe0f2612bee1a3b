"""The split virtqueue (vhost_min.vring): layout, our driver against our device over memfd memory,
notification decisions worked out by hand, and one test per way a hostile driver (or a lying
device) can break the ring rules."""

from __future__ import annotations

import os
import struct
import unittest

from tests.support import LateDriver, StoreBuffer, memfd
from vhost_min.errors import GuestMemoryError, VirtqueueError
from vhost_min.memory import IOTLB, VHOST_ACCESS_RO, VHOST_ACCESS_RW, DirtyLog, GuestMemory, IOTLBMiss
from vhost_min.virtio import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                              split_ring_sizes)
from vhost_min.vring import SplitDeviceQueue, SplitDriverQueue

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
DESC = struct.Struct("<QIHH")
U16 = struct.Struct("<H")
ELEM = struct.Struct("<II")
MEM_SIZE = 1 << 20
RING_BASE = 0x1000
BUF = 0x40000          # data buffers start here


class RingCase(unittest.TestCase):
    """One memfd-backed guest memory with a ring at RING_BASE; helpers to write rings by hand."""

    #: Start the device with its region cache filled, as after a first pop: chains then take the
    #: inlined fast paths (one descriptor, direct chains) before the general walk.
    WARM = False

    def memory_with(self, *regions: tuple[int, int]) -> GuestMemory:
        memory = GuestMemory()
        for gpa, size in regions:
            fd = memfd(size)
            memory.add_region(gpa, size, fd=fd)
            os.close(fd)
        self.addCleanup(memory.clear)
        return memory

    def setup_ring(self, size: int = 8, *, event_idx: bool = False, indirect: bool = True,
                   indirect_max: int = 8, driver: bool = True, memory: GuestMemory | None = None, **device_kw):
        self.size = size
        self.memory = memory or self.memory_with((0, MEM_SIZE))
        self.lay = SplitDriverQueue.layout(size, RING_BASE, indirect_max)
        lay = self.lay
        self.driver = (SplitDriverQueue(self.memory, size, lay["desc"], lay["driver"], lay["device"],
                                        event_idx=event_idx, indirect_area=lay["indirect"],
                                        indirect_max=indirect_max) if driver else None)
        self.device = SplitDeviceQueue(self.memory, size, lay["desc"], lay["driver"], lay["device"],
                                       event_idx=event_idx, indirect=indirect, **device_kw)
        if self.WARM:
            region = self.memory.regions[0]
            self.device._rstart, self.device._rend, self.device._rview = region.gpa, region.end, region.view
        self.avail_idx = 0
        return self.device

    # -- hand-written rings (the hostile driver) ---------------------------------------------------
    def put_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int | None = None):
        base = self.lay["desc"] if table is None else table
        self.memory.write(base + 16 * i, DESC.pack(addr, length, flags, nxt))

    def offer(self, *heads: int) -> None:
        for head in heads:
            self.memory.write(self.lay["driver"] + 4 + 2 * (self.avail_idx % self.size), U16.pack(head))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        self.memory.write(self.lay["driver"] + 2, U16.pack(value))

    def u16(self, gpa: int) -> int:
        return U16.unpack(self.memory.read(gpa, 2))[0]

    def used_idx(self) -> int:
        return self.u16(self.lay["device"] + 2)

    def used_elem(self, slot: int) -> tuple[int, int]:
        return ELEM.unpack(self.memory.read(self.lay["device"] + 4 + 8 * slot, 8))

    def avail_event(self) -> int:
        return self.u16(self.lay["device"] + 4 + 8 * self.size)

    def used_event(self) -> int:
        return self.u16(self.lay["driver"] + 4 + 2 * self.size)

    def assert_broken(self, queue, call=None):
        self.assertTrue(queue.broken)
        with self.assertRaisesRegex(VirtqueueError, "queue is broken: "):
            (call or queue.pop_batch)()


# ----------------------------------------------------------------------------------------------
class LayoutTest(RingCase):
    def test_ring_sizes_golden(self):
        self.assertEqual(split_ring_sizes(1), (16, 8, 14))
        self.assertEqual(split_ring_sizes(256), (4096, 518, 2054))
        self.assertEqual(split_ring_sizes(32768), (524288, 65542, 262150))

    def test_layout_golden(self):
        self.assertEqual(SplitDriverQueue.layout(256, 0x1000),
                         {"desc": 0x1000, "driver": 0x2000, "device": 0x2208, "indirect": None, "end": 0x2A0E})
        self.assertEqual(SplitDriverQueue.layout(256, 0x1000, 8),
                         {"desc": 0x1000, "driver": 0x2000, "device": 0x2208, "indirect": 0x2A10,
                          "end": 0x2A10 + 256 * 8 * 16})
        # base rounded up to 16; avail right after the table; used rounded up to 4
        self.assertEqual(SplitDriverQueue.layout(1, 0x1001),
                         {"desc": 0x1010, "driver": 0x1020, "device": 0x1028, "indirect": None, "end": 0x1036})
        lay = SplitDriverQueue.layout(32768, 0)
        self.assertEqual((lay["driver"], lay["device"], lay["end"]), (0x80000, 0x90008, 0x90008 + 262150))

    def test_size_must_be_power_of_two(self):
        memory = self.memory_with((0, MEM_SIZE))
        for bad in (0, 3, 6, 100, 65536, -8, 1 << 16):
            with self.assertRaisesRegex(VirtqueueError, f"size {bad}"):
                SplitDeviceQueue(memory, bad, 0x1000, 0x20000, 0x30000)
            with self.assertRaises(VirtqueueError):
                SplitDriverQueue.layout(bad, 0)
        for good in (1, 2, 256, 32768):
            SplitDeviceQueue(memory, good, 0x0, 0x80000, 0xA0000)

    def test_ring_addresses_must_be_aligned(self):
        memory = self.memory_with((0, MEM_SIZE))
        for desc, avail, used, what in ((0x1008, 0x2000, 0x3000, "descriptor table"),
                                        (0x1000, 0x2001, 0x3000, "available ring"),
                                        (0x1000, 0x2000, 0x3002, "used ring")):
            with self.assertRaisesRegex(VirtqueueError, f"{what} address .* not .*aligned"):
                SplitDeviceQueue(memory, 8, desc, avail, used)

    def test_ring_addresses_must_be_in_memory(self):
        memory = self.memory_with((0, MEM_SIZE))
        for desc, avail, used, what in ((0x200000, 0x2000, 0x3000, "descriptor table"),
                                        (0x1000, MEM_SIZE - 8, 0x3000, "available ring"),   # runs off the end
                                        (0x1000, 0x2000, MEM_SIZE, "used ring")):
            with self.assertRaisesRegex(GuestMemoryError, what):
                SplitDeviceQueue(memory, 8, desc, avail, used)

    def test_event_words_needed_only_with_event_idx(self):
        memory = self.memory_with((0, 0x1000))
        used = 0x1000 - (4 + 8 * 8)            # ends exactly at the region's end without avail_event
        SplitDeviceQueue(memory, 8, 0x0, 0x100, used)
        with self.assertRaisesRegex(GuestMemoryError, "used ring"):
            SplitDeviceQueue(memory, 8, 0x0, 0x100, used, event_idx=True)


# ----------------------------------------------------------------------------------------------
class DataPathTest(RingCase):
    def test_direct_chain_exact_bytes(self):
        self.setup_ring()
        self.memory.write(BUF, b"hello ")
        self.memory.write(BUF + 0x100, b"world")
        head = self.driver.add([(BUF, 6), (BUF + 0x100, 5)], [(BUF + 0x200, 4), (BUF + 0x300, 8)], token="t1")
        self.assertEqual(head, 0)
        self.assertEqual(self.driver.num_free, 4)
        self.assertTrue(self.driver.publish())
        # the descriptors as the spec lays them out: 0 -> 1 -> 2 -> 3
        table = self.memory.read(self.lay["desc"], 64)
        self.assertEqual([DESC.unpack_from(table, 16 * i) for i in range(4)],
                         [(BUF, 6, NEXT, 1), (BUF + 0x100, 5, NEXT, 2), (BUF + 0x200, 4, NEXT | WRITE, 3),
                          (BUF + 0x300, 8, WRITE, 0)])
        self.assertEqual((self.u16(self.lay["driver"] + 2), self.u16(self.lay["driver"] + 4)), (1, 0))
        self.assertEqual(self.device.pending(), 1)
        (got_head, readable, writable), = self.device.pop_batch()
        self.assertEqual(got_head, 0)
        self.assertEqual([bytes(v) for v in readable], [b"hello ", b"world"])
        self.assertEqual([len(v) for v in writable], [4, 8])
        self.assertEqual(self.device.in_flight, 1)
        writable[0][:] = b"ABCD"
        writable[1][:3] = b"EFG"
        self.assertTrue(self.device.push(0, 7))
        self.assertEqual(self.used_idx(), 1)
        self.assertEqual(self.used_elem(0), (0, 7))
        self.assertEqual(self.driver.reap(), [("t1", 7)])
        self.assertEqual(self.memory.read(BUF + 0x200, 4) + self.memory.read(BUF + 0x300, 3), b"ABCDEFG")
        self.assertEqual((self.device.in_flight, self.driver.in_flight, self.driver.num_free), (0, 0, 8))
        self.assertEqual(self.device.pop_batch(), [])

    def test_indirect_chain_exact_bytes(self):
        self.setup_ring(indirect_max=4)
        self.memory.write(BUF, b"request")
        head = self.driver.add([(BUF, 7)], [(BUF + 0x100, 16), (BUF + 0x200, 1)], indirect=True)
        self.driver.publish()
        self.assertEqual(self.driver.num_free, 7)              # one ring descriptor for the chain
        table_addr = self.lay["indirect"] + head * 4 * 16
        self.assertEqual(DESC.unpack(self.memory.read(self.lay["desc"] + 16 * head, 16)),
                         (table_addr, 48, INDIRECT, 0))
        table = self.memory.read(table_addr, 48)
        self.assertEqual([DESC.unpack_from(table, 16 * i) for i in range(3)],
                         [(BUF, 7, NEXT, 1), (BUF + 0x100, 16, NEXT | WRITE, 2), (BUF + 0x200, 1, WRITE, 0)])
        (got, readable, writable), = self.device.pop_batch()
        self.assertEqual((got, [bytes(v) for v in readable], [len(v) for v in writable]),
                         (head, [b"request"], [16, 1]))
        writable[0][:] = bytes(range(16))
        writable[1][:] = b"\xff"
        self.device.push(head, 17)
        self.assertEqual(self.driver.reap(), [(head, 17)])
        self.assertEqual(self.memory.read(BUF + 0x100, 16), bytes(range(16)))
        self.assertEqual(self.memory.read(BUF + 0x200, 1), b"\xff")
        self.assertEqual(self.driver.num_free, 8)

    def test_direct_descriptors_then_one_indirect(self):
        # virtio §2.7.5.3.2: the device MUST handle zero or more direct descriptors followed by
        # one INDIRECT descriptor (whose WRITE flag it ignores).
        self.setup_ring(driver=False)
        table = BUF + 0x1000
        self.memory.write(BUF, b"AB")
        self.put_desc(5, BUF, 1, NEXT, 2)
        self.put_desc(2, BUF + 1, 1, NEXT, 7)
        self.put_desc(7, table, 32, INDIRECT | WRITE)
        self.put_desc(0, BUF + 0x10, 3, WRITE | NEXT, 1, table=table)
        self.put_desc(1, BUF + 0x20, 2, WRITE, table=table)
        self.offer(5)
        (head, readable, writable), = self.device.pop_batch()
        self.assertEqual((head, [bytes(v) for v in readable], [len(v) for v in writable]), (5, [b"A", b"B"], [3, 2]))

    def test_zero_length_descriptors_give_empty_views(self):
        self.setup_ring(driver=False)
        self.put_desc(0, BUF, 0, NEXT, 1)
        self.put_desc(1, 0xDEAD_0000_0000, 0, NEXT | WRITE, 2)   # no bytes: the address is never used
        self.put_desc(2, BUF, 4, WRITE)
        self.offer(0)
        (head, readable, writable), = self.device.pop_batch()
        self.assertEqual(([len(v) for v in readable], [len(v) for v in writable]), ([0], [0, 4]))
        self.assertFalse(readable[0].readonly)

    def test_buffer_spanning_two_adjacent_regions(self):
        fd1, fd2 = memfd(0x20000), memfd(0x20000)
        self.addCleanup(os.close, fd1)
        self.addCleanup(os.close, fd2)
        memory = GuestMemory()
        self.addCleanup(memory.clear)
        memory.add_region(0, 0x20000, fd=fd1)
        memory.add_region(0x20000, 0x20000, fd=fd2)
        self.setup_ring(memory=memory)
        memory.write(0x1FFF0, bytes(range(32)))
        self.driver.add([(0x1FFF0, 32)], [(0x1FFF8, 16)])
        self.driver.publish()
        (head, readable, writable), = self.device.pop_batch()
        self.assertEqual([bytes(v) for v in readable], [bytes(range(16)), bytes(range(16, 32))])
        self.assertEqual([len(v) for v in writable], [8, 8])
        writable[0][:] = b"x" * 8
        writable[1][:] = b"y" * 8
        self.device.push(head, 16)
        self.assertEqual(self.driver.reap(), [(head, 16)])
        self.assertEqual(os.pread(fd1, 8, 0x1FFF8), b"x" * 8)       # really two different files
        self.assertEqual(os.pread(fd2, 8, 0), b"y" * 8)

    def test_memory_added_later_is_seen(self):
        self.setup_ring(driver=False)
        fd = memfd(0x10000)
        self.addCleanup(os.close, fd)
        self.memory.add_region(0x200000, 0x10000, fd=fd)
        self.put_desc(0, 0x200010, 4)
        self.offer(0)
        os.pwrite(fd, b"late", 0x10)
        (_, readable, _), = self.device.pop_batch()
        self.assertEqual(bytes(readable[0]), b"late")

    def test_used_elements_wrap_in_two_runs(self):
        self.setup_ring(size=8)
        for round_ in range(2):
            for k in range(6):
                self.driver.add([], [(BUF + 64 * k, 64)], token=(round_, k))
            self.driver.publish()
            chains = self.device.pop_batch()
            self.assertEqual(len(chains), 6)
            self.device.push_batch([(head, 10 + i) for i, (head, _, _) in enumerate(chains)])
            self.assertEqual(self.driver.reap(), [((round_, k), 10 + k) for k in range(6)])
        # round 2 went to used slots 6, 7, 0, 1, 2, 3
        self.assertEqual(self.used_idx(), 12)
        self.assertEqual([self.used_elem(s)[1] for s in (6, 7, 0, 1, 2, 3)], [10, 11, 12, 13, 14, 15])

    def test_index_wraparound_with_set_base(self):
        self.setup_ring(size=8, driver=False)
        self.memory.write(self.lay["device"] + 2, U16.pack(65533))   # used idx as a previous backend left it
        device = SplitDeviceQueue(self.memory, 8, self.lay["desc"], self.lay["driver"], self.lay["device"])
        device.set_base(65534)
        self.assertEqual((device.get_base(), device.used_idx), (65534, 65533))
        for i in range(8):
            self.put_desc(i, BUF + 16 * i, 16, WRITE)
        self.avail_idx = 65534
        self.offer(3, 4, 5, 6)           # ring slots 6, 7, 0, 1; avail idx 65534 -> 2
        self.assertEqual(self.u16(self.lay["driver"] + 2), 2)
        self.assertEqual(device.pending(), 4)
        self.assertEqual([c[0] for c in device.pop_batch()], [3, 4, 5, 6])
        self.assertEqual(device.get_base(), 2)
        device.push_batch([(3, 1), (4, 2), (5, 3)])       # used slots 5, 6, 7
        device.push_batch([(6, 4)])                       # used slot 0, used idx 65536 -> 0
        self.assertEqual(self.used_idx(), 1)
        self.assertEqual([self.used_elem(s) for s in (5, 6, 7, 0)], [(3, 1), (4, 2), (5, 3), (6, 4)])
        device.set_base(65536 * 5 + 7)
        self.assertEqual(device.get_base(), 7)
        for bad in (-1, 1 << 32, "1"):
            with self.assertRaises(ValueError):
                device.set_base(bad)

    def test_many_laps_round_the_16_bit_indices(self):
        self.setup_ring(size=8, event_idx=True)
        serial = 0
        expected = []
        for lap in range(17500):           # 70000 chains: both indices wrap past 65535
            for _ in range(4):
                self.driver.add([(BUF, 1)], [(BUF + 64, 8)], token=serial)
                expected.append(serial)
                serial += 1
            self.driver.publish()
            chains = self.device.pop_batch(3) + self.device.pop_batch()
            self.device.push_batch([(head, 8) for head, _, _ in chains])
            got = self.driver.reap()
            self.assertEqual([t for t, _ in got], expected)
            expected.clear()
        self.assertEqual(self.device.get_base(), 70000 & 0xFFFF)
        self.assertEqual(self.driver.get_base(), 70000 & 0xFFFF)
        self.assertEqual(self.used_idx(), 70000 & 0xFFFF)

    def test_pop_descriptors_untranslated(self):
        self.setup_ring(driver=False)
        self.put_desc(1, 0x7777_0000_0000, 10, NEXT, 0)        # not in memory: not looked up here
        self.put_desc(0, BUF, 20, WRITE)
        self.offer(1)
        self.assertEqual(self.device.pop_descriptors(), [(1, [(0x7777_0000_0000, 10, False), (BUF, 20, True)])])
        self.assertEqual(self.device.in_flight, 1)
        self.device.push(1, 20)

    def test_resubmit_marks_in_flight(self):
        self.setup_ring(driver=False)
        self.put_desc(4, BUF, 8, WRITE)
        self.assertEqual(self.device.resubmit(4)[0], 4)
        self.assertEqual((self.device.in_flight, self.device.get_base()), (1, 0))
        with self.assertRaisesRegex(VirtqueueError, "already in flight"):
            self.device.resubmit(4)
        self.device.push(4, 8)
        self.assertEqual(self.used_elem(0), (4, 8))

    def test_inflight_hooks_called_in_order(self):
        calls = []

        class Recorder:
            def on_pop(self, head):
                calls.append(("pop", head))

            def before_publish(self, heads):
                calls.append(("before", list(heads), self_.used_idx()))

            def after_publish(self, heads, used_idx):
                calls.append(("after", list(heads), used_idx, self_.used_idx()))

        self_ = self
        self.setup_ring(inflight=Recorder())
        for k in range(2):
            self.driver.add([(BUF, 4)], [])
        self.driver.publish()
        heads = [c[0] for c in self.device.pop_batch()]
        self.device.push_batch([(h, 0) for h in heads])
        self.assertEqual(calls, [("pop", 0), ("pop", 1), ("before", [0, 1], 0), ("after", [0, 1], 2, 2)])

    def test_iotlb_memory_and_misses(self):
        backing = self.memory_with((0, MEM_SIZE))
        iotlb = IOTLB()
        iotlb.update_view(0, backing.view(0, 0x40000))                        # rings
        iotlb.update_view(0x100000, backing.view(BUF, 0x1000), VHOST_ACCESS_RO)
        iotlb.update_view(0x200000, backing.view(BUF + 0x1000, 0x1000), VHOST_ACCESS_RW)
        self.memory = backing
        self.lay = SplitDriverQueue.layout(8, RING_BASE)
        self.size = 8
        self.avail_idx = 0
        device = SplitDeviceQueue(iotlb, 8, self.lay["desc"], self.lay["driver"], self.lay["device"])
        backing.write(BUF, b"iova")
        self.put_desc(0, 0x100000, 4, NEXT, 1)
        self.put_desc(1, 0x200000, 4, WRITE)
        self.put_desc(2, 0x100000, 4, WRITE)         # device-writable in a read-only mapping
        self.offer(0)
        (head, readable, writable), = device.pop_batch()
        self.assertEqual((bytes(readable[0]), len(writable[0])), (b"iova", 4))
        self.offer(2)
        with self.assertRaises(IOTLBMiss):
            device.pop_batch()
        self.assertFalse(device.broken)               # a miss is not the driver's fault: retry later
        self.assertEqual((device.pending(), device.in_flight), (1, 1))
        iotlb.update_view(0x100000, backing.view(BUF, 0x1000), VHOST_ACCESS_RW)
        self.assertEqual(device.pop_batch()[0][0], 2)


# ----------------------------------------------------------------------------------------------
class NotificationTest(RingCase):
    def one_chain(self):
        self.driver.add([], [(BUF, 8)])

    def test_interrupt_without_event_idx(self):
        self.setup_ring()
        self.one_chain()
        self.driver.publish()
        heads = [c[0] for c in self.device.pop_batch()]
        self.assertTrue(self.device.push_batch([(heads[0], 0)]))           # avail.flags == 0
        self.driver.disable_interrupts()
        self.assertEqual(self.u16(self.lay["driver"]), 1)                   # VIRTQ_AVAIL_F_NO_INTERRUPT
        self.one_chain()
        self.driver.publish()
        self.assertFalse(self.device.push(self.device.pop()[0], 0))
        self.assertTrue(self.driver.enable_interrupts())                    # re-check: one waiting
        self.assertEqual(self.u16(self.lay["driver"]), 0)
        self.assertEqual(len(self.driver.reap()), 2)
        self.assertFalse(self.driver.enable_interrupts())

    def test_interrupt_with_event_idx_hand_computed(self):
        # vring_need_event(event, new, old): notify iff event in [old, new) mod 2^16.
        cases = [  # (used idx before, chains pushed, used_event, expected)
            (10, 3, 10, True), (10, 3, 12, True), (10, 3, 13, False), (10, 3, 9, False),
            (65534, 3, 65535, True), (65534, 3, 0, True), (65534, 3, 1, False), (65534, 3, 65533, False),
            (0, 1, 0, True), (0, 1, 65535, False)]
        for old, n, used_event, expected in cases:
            with self.subTest(old=old, n=n, used_event=used_event):
                self.setup_ring(size=8, event_idx=True, driver=False)
                self.memory.write(self.lay["device"] + 2, U16.pack(old))
                device = SplitDeviceQueue(self.memory, 8, self.lay["desc"], self.lay["driver"], self.lay["device"],
                                          event_idx=True)
                for i in range(n):
                    self.put_desc(i, BUF, 4, WRITE)
                self.offer(*range(n))
                self.memory.write(self.lay["driver"] + 4 + 2 * 8, U16.pack(used_event))
                self.memory.write(self.lay["driver"], U16.pack(1))   # NO_INTERRUPT must be ignored
                heads = [c[0] for c in device.pop_batch()]
                self.assertEqual(device.push_batch([(h, 4) for h in heads]), expected)
                self.assertEqual(self.used_idx(), (old + n) & 0xFFFF)

    def test_kick_without_event_idx(self):
        self.setup_ring()
        self.one_chain()
        self.assertTrue(self.driver.publish())
        self.assertFalse(self.driver.publish())                             # nothing new: no kick
        self.device.disable_notifications()
        self.assertEqual(self.u16(self.lay["device"]), 1)                   # VIRTQ_USED_F_NO_NOTIFY
        self.one_chain()
        self.assertFalse(self.driver.publish())
        self.assertTrue(self.device.enable_notifications())                 # re-check sees them
        self.assertEqual(self.u16(self.lay["device"]), 0)
        self.assertEqual(len(self.device.pop_batch()), 2)
        self.assertFalse(self.device.enable_notifications())
        self.one_chain()
        self.assertTrue(self.driver.publish())

    def test_kick_with_event_idx_hand_computed(self):
        cases = [  # (avail idx before, chains published, avail_event, expected)
            (0, 1, 0, True), (0, 3, 2, True), (0, 3, 3, False), (5, 2, 4, False), (5, 2, 6, True),
            (65535, 2, 65535, True), (65535, 2, 0, True), (65535, 2, 1, False)]
        for old, n, avail_event, expected in cases:
            with self.subTest(old=old, n=n, avail_event=avail_event):
                self.setup_ring(size=8, event_idx=True)
                driver = self.driver
                # bring the driver's avail index to `old` by running chains through
                for _ in range(old // 7):
                    for _ in range(7):
                        driver.add([(BUF, 1)], [])
                    driver.publish()
                    self.device.push_batch([(c[0], 0) for c in self.device.pop_batch()])
                    driver.reap()
                for _ in range(old % 7):
                    driver.add([(BUF, 1)], [])
                    driver.publish()
                    self.device.push_batch([(c[0], 0) for c in self.device.pop_batch()])
                    driver.reap()
                self.assertEqual(self.u16(self.lay["driver"] + 2), old)
                self.device.disable_notifications()                         # stop avail_event moving
                self.memory.write(self.lay["device"] + 4 + 8 * 8, U16.pack(avail_event))
                self.memory.write(self.lay["device"], U16.pack(1))          # NO_NOTIFY must be ignored
                for _ in range(n):
                    driver.add([(BUF, 1)], [])
                self.assertEqual(driver.publish(), expected)

    def test_event_idx_avail_event_follows_pops(self):
        self.setup_ring(event_idx=True)
        for _ in range(3):
            self.one_chain()
        self.driver.publish()
        self.device.pop_batch(2)
        self.assertEqual(self.avail_event(), 2)               # "kick me when entry 2 is published"
        self.device.disable_notifications()
        self.device.pop_batch()
        self.assertEqual(self.avail_event(), 2)               # disabled: left behind
        self.assertEqual(self.u16(self.lay["device"]), 0)     # flags stay 0 with EVENT_IDX
        self.assertFalse(self.device.enable_notifications())
        self.assertEqual(self.avail_event(), 3)
        self.one_chain()
        self.assertTrue(self.driver.publish())

    def test_event_idx_used_event_follows_reaps(self):
        self.setup_ring(event_idx=True)
        for _ in range(3):
            self.one_chain()
        self.driver.publish()
        self.device.push_batch([(c[0], 8) for c in self.device.pop_batch()])
        self.assertEqual(len(self.driver.reap()), 3)
        self.assertEqual(self.used_event(), 3)
        self.driver.disable_interrupts()
        self.assertEqual(self.used_event(), 2)                # just behind: no interrupt until wrap
        self.assertEqual(self.u16(self.lay["driver"]), 0)
        self.one_chain()
        self.driver.publish()
        self.assertFalse(self.device.push(self.device.pop()[0], 0))
        self.assertTrue(self.driver.enable_interrupts())
        self.assertEqual(self.used_event(), 3)

    def test_event_idx_pop_that_finds_nothing_sees_a_chain_published_unkicked(self):
        """Pops move avail_event with no barrier after it (a pop that stopped at its budget, or
        any pop). The next pop finds the ring empty and the driver publishes right then, reading
        avail_event from memory while our store still sits in the store buffer: the driver must
        kick, or that pop must take the chain (its re-check behind a full barrier)."""
        self.setup_ring(event_idx=True)
        device = self.device
        device._used16 = buffered = StoreBuffer(device._used16, 2 + 4 * self.size)   # avail_event
        late = LateDriver(device, buffered, self.driver, BUF)
        for k in (0, 1):
            self.driver.add([], [(BUF, 1)], k)
        self.assertTrue(self.driver.publish())
        self.assertEqual(len(device.pop_batch(1)) + len(device.pop_batch(1)), 2)   # each at its budget
        self.assertEqual(self.u16(self.lay["device"] + 4 + 8 * self.size), 0)    # avail_event 2: not visible
        late.armed = True
        chains = device.pop_batch()
        late()                           # no barrier in that pop: the driver comes after it returned
        self.assertEqual(late.published, [False])                     # the driver saw avail_event 0: no kick
        self.assertEqual(len(chains), 1, "a chain published while avail_event was unfenced was neither "
                                         "kicked nor popped")

    def test_a_chain_used_while_the_driver_reaps_is_not_left_unsignalled(self):
        """The device publishes chain B after the driver read used.idx but before it moved
        used_event past A: the device sends no interrupt for B, so reap itself must take B."""
        self.setup_ring(event_idx=True)
        self.driver.enable_interrupts()
        self.driver.add([], [(BUF, 8)], "A")
        self.driver.add([], [(BUF + 8, 8)], "B")
        self.driver.publish()
        (a, _, _), (b, _, _) = self.device.pop_batch()
        self.device.push(a, 8)
        interrupts = []
        set_used_event = self.driver._set_used_event

        def device_pushes_b_first(value):
            if not interrupts:
                interrupts.append(self.device.push(b, 8))
            set_used_event(value)

        self.driver._set_used_event = device_pushes_b_first
        self.assertEqual(self.driver.reap(), [("A", 8), ("B", 8)])
        self.assertEqual(interrupts, [False])        # the race: B got no interrupt


# ----------------------------------------------------------------------------------------------
class HostileDriverTest(RingCase):
    """Each test writes a ring that breaks one rule; the device must refuse it precisely, latch
    broken and refuse everything after — never read out of bounds, loop or crash."""

    def expect(self, exc_class, pattern: str):
        with self.assertRaisesRegex(exc_class, pattern):
            self.device.pop_batch()
        self.assert_broken(self.device)
        self.assertIn(self.device.broken_reason.split(":")[0], self.device.broken_reason)
        with self.assertRaisesRegex(VirtqueueError, "queue is broken"):
            self.device.push(0, 0)

    def test_descriptor_loop(self):
        self.setup_ring(driver=False)
        self.put_desc(3, BUF, 8, NEXT, 5)
        self.put_desc(5, BUF, 8, NEXT, 3)
        self.offer(3)
        self.expect(VirtqueueError, r"head 3: chain longer than the queue size 8 \(a loop: descriptor \d visited")

    def test_chain_longer_than_queue(self):
        self.setup_ring(size=4, driver=False)
        for i in range(4):
            self.put_desc(i, BUF, 1, NEXT, (i + 1) % 4)     # every descriptor, then round again
        self.offer(0)
        self.expect(VirtqueueError, r"head 0: chain longer than the queue size 4 \(a loop: descriptor 0 visited")

    def test_full_length_chain_is_fine(self):
        self.setup_ring(size=4, driver=False)
        for i in range(4):
            self.put_desc(i, BUF + i, 1, NEXT if i < 3 else 0, i + 1)
        self.offer(0)
        (_, readable, _), = self.device.pop_batch()
        self.assertEqual(len(readable), 4)

    def test_loop_inside_indirect_table(self):
        self.setup_ring(driver=False)
        table = BUF + 0x1000
        self.put_desc(0, table, 32, INDIRECT)
        self.put_desc(0, BUF, 1, NEXT, 1, table=table)
        self.put_desc(1, BUF, 1, NEXT, 0, table=table)
        self.offer(0)
        self.expect(VirtqueueError, r"head 0: chain longer than its indirect table of 2 entries")

    def test_indirect_inside_indirect(self):
        self.setup_ring(driver=False)
        table = BUF + 0x1000
        self.put_desc(2, table, 32, INDIRECT)
        self.put_desc(0, BUF, 1, NEXT, 1, table=table)
        self.put_desc(1, BUF + 0x2000, 16, INDIRECT, table=table)
        self.offer(2)
        self.expect(VirtqueueError, r"head 2: descriptor 1 of the indirect table at 0x41000 \(from descriptor 2\) "
                                    r"has INDIRECT inside an indirect table")

    def test_indirect_with_next(self):
        self.setup_ring(driver=False)
        self.put_desc(1, BUF + 0x1000, 16, INDIRECT | NEXT, 2)
        self.offer(1)
        self.expect(VirtqueueError, "head 1: descriptor 1 has both INDIRECT and NEXT")

    def test_indirect_table_length_zero(self):
        self.setup_ring(driver=False)
        self.put_desc(0, BUF + 0x1000, 0, INDIRECT)
        self.offer(0)
        self.expect(VirtqueueError, "head 0: descriptor 0 points at an indirect table of 0 bytes")

    def test_indirect_table_length_24(self):
        self.setup_ring(driver=False)
        self.put_desc(6, BUF + 0x1000, 24, INDIRECT)
        self.offer(6)
        self.expect(VirtqueueError, "head 6: descriptor 6 points at an indirect table of 24 bytes "
                                    r"\(must be a non-zero multiple of 16")

    def test_indirect_table_outside_memory(self):
        self.setup_ring(driver=False)
        self.put_desc(0, 0x900000000, 32, INDIRECT)
        self.offer(0)
        self.expect(GuestMemoryError, "head 0: descriptor 0 points at an indirect table 0x900000000")

    def test_indirect_not_negotiated(self):
        self.setup_ring(indirect=False, driver=False)
        self.put_desc(0, BUF + 0x1000, 16, INDIRECT)
        self.put_desc(0, BUF, 4, 0, table=BUF + 0x1000)
        self.offer(0)
        self.expect(VirtqueueError, "head 0: descriptor 0 has INDIRECT but VIRTIO_F_INDIRECT_DESC was not negotiated")

    def test_address_outside_every_region(self):
        self.setup_ring(driver=False)
        self.put_desc(4, BUF, 4, NEXT, 7)
        self.put_desc(7, MEM_SIZE - 2, 4, WRITE)            # runs 2 bytes past the only region
        self.offer(4)
        self.expect(GuestMemoryError, f"head 4: descriptor 7 buffer {MEM_SIZE - 2:#x}\\+0x4 is outside guest memory")

    def test_address_far_outside(self):
        self.setup_ring(driver=False)
        self.put_desc(0, 0xFFFF_FFFF_FFFF_FFF0, 0x20)        # wraps the address space
        self.offer(0)
        self.expect(GuestMemoryError, "head 0: descriptor 0 buffer 0xfffffffffffffff0")

    def test_lengths_summing_beyond_2_32(self):
        self.setup_ring(driver=False)
        self.put_desc(0, BUF, 0xFFFF_FFFF, NEXT, 1)
        self.put_desc(1, BUF, 1, WRITE)
        self.offer(0)
        self.expect(VirtqueueError, r"head 0: descriptor 1 \(len 0x1\) takes the chain to 0x100000000 bytes")

    def test_lengths_summing_beyond_2_32_all_in_one_region(self):
        big = 0x1_2000_0000                        # a sparse memfd: the fast paths' region holds it all
        self.setup_ring(driver=False, memory=self.memory_with((0, big)))
        self.put_desc(0, 0x1000_0000, 0x8000_0000, NEXT, 1)
        self.put_desc(1, 0x9000_0000, 0x8000_0000, WRITE)
        self.offer(0)
        self.expect(VirtqueueError, r"head 0: descriptor 1 \(len 0x80000000\) takes the chain to 0x100000000 bytes")

    def test_lengths_summing_beyond_2_32_in_an_indirect_table_in_one_region(self):
        big = 0x1_2000_0000
        self.setup_ring(driver=False, memory=self.memory_with((0, big)))
        table = BUF + 0x1000
        self.put_desc(0, table, 32, INDIRECT)
        self.put_desc(0, 0x1000_0000, 0x8000_0000, NEXT, 1, table=table)
        self.put_desc(1, 0x9000_0000, 0x8000_0000, WRITE, table=table)
        self.offer(0)
        self.expect(VirtqueueError, r"head 0: descriptor 1 of the indirect table at 0x41000 \(from descriptor 0\) "
                                    r"\(len 0x80000000\) takes the chain to 0x100000000 bytes")

    def test_avail_idx_more_than_queue_size_ahead(self):
        self.setup_ring(driver=False)
        self.set_avail_idx(9)
        self.expect(VirtqueueError,
                    "avail idx 9 is 9 entries ahead of the next avail index 0, more than the queue size 8")

    def test_avail_idx_going_backwards(self):
        self.setup_ring(driver=False)
        self.device.set_base(5)
        self.set_avail_idx(4)                              # = 65535 ahead
        with self.assertRaisesRegex(VirtqueueError, "avail idx 4 is 65535 entries ahead"):
            self.device.pending()
        self.assert_broken(self.device)

    def test_readable_after_writable(self):
        self.setup_ring(driver=False)
        self.put_desc(0, BUF, 4, WRITE | NEXT, 1)
        self.put_desc(1, BUF, 4, 0)
        self.offer(0)
        self.expect(VirtqueueError, "head 0: descriptor 1 is device-readable but follows a device-writable one")

    def test_readable_in_indirect_after_direct_writable(self):
        self.setup_ring(driver=False)
        table = BUF + 0x1000
        self.put_desc(0, BUF, 4, WRITE | NEXT, 1)
        self.put_desc(1, table, 16, INDIRECT)
        self.put_desc(0, BUF, 4, 0, table=table)
        self.offer(0)
        self.expect(VirtqueueError, "head 0: descriptor 0 of the indirect table .* is device-readable")

    def test_next_index_out_of_range(self):
        self.setup_ring(driver=False)
        self.put_desc(2, BUF, 4, NEXT, 8)
        self.offer(2)
        self.expect(VirtqueueError, "head 2: descriptor 2 has next 8, out of range for queue size 8")

    def test_next_index_out_of_indirect_table(self):
        self.setup_ring(driver=False)
        table = BUF + 0x1000
        self.put_desc(0, table, 32, INDIRECT)
        self.put_desc(0, BUF, 4, NEXT, 2, table=table)
        self.offer(0)
        self.expect(VirtqueueError, "has next 2, out of range for an indirect table of 2 entries")

    def test_head_out_of_range(self):
        self.setup_ring(driver=False)
        self.offer(300)
        self.expect(VirtqueueError, "head 300 in the available ring is out of range for queue size 8")

    def test_head_offered_again_while_in_flight(self):
        self.setup_ring(driver=False)
        self.put_desc(1, BUF, 4)
        self.offer(1)
        self.device.pop_batch()
        self.offer(1)
        self.expect(VirtqueueError, "head 1 made available again while still in flight")

    def test_head_offered_twice_in_one_batch(self):
        self.setup_ring(driver=False)
        self.put_desc(1, BUF, 4)
        self.offer(1, 1)
        self.expect(VirtqueueError, "head 1 made available twice in one batch")


class HostileDriverWarmTest(HostileDriverTest):
    """The same hostile rings met by the fast paths (the region cache already filled)."""

    WARM = True


class IndirectTableTest(RingCase):
    """Indirect tables as a driver may legally write them: the in-order tables every driver writes
    take the fast path, the rest the general walk; both give the chain in walk order, cold (first
    pop) and warm (region cache filled)."""

    TABLE = BUF + 0x8000

    def pop_table(self, entries, head_flags=INDIRECT, warm=True, memory=None):
        """Write ``entries`` [(addr, len, flags, next)] as the table of head 3, pop it; returns
        (readable bytes, writable lengths)."""
        self.WARM = warm
        self.setup_ring(driver=False, memory=memory or self.data)
        for i, (addr, length, flags, nxt) in enumerate(entries):
            self.put_desc(i, addr, length, flags, nxt, table=self.TABLE)
        self.put_desc(3, self.TABLE, 16 * len(entries), head_flags)
        self.offer(3)
        (head, readable, writable), = self.device.pop_batch()
        self.assertEqual(head, 3)
        self.device.push(3, 0)
        return [bytes(v) for v in readable], [len(v) for v in writable]

    def both(self, entries, expected, **kw):
        for warm in (False, True):
            with self.subTest(warm=warm):
                self.assertEqual(self.pop_table(entries, warm=warm, **kw), expected)

    def setUp(self):
        self.data = self.memory_with((0, MEM_SIZE))
        self.data.write(BUF, b"abcdefghijklmnop")
        self.data.write(BUF + 0x1000, bytes(range(32)))

    def test_in_order_table(self):
        self.both([(BUF, 3, NEXT, 1), (BUF + 3, 2, NEXT, 2), (BUF + 0x100, 9, NEXT | WRITE, 3),
                   (BUF + 0x200, 1, WRITE, 77)], ([b"abc", b"de"], [9, 1]))   # the last next is ignored

    def test_one_entry_tables_and_write_on_the_indirect_descriptor(self):
        self.both([(BUF, 4, 0, 0)], ([b"abcd"], []))
        self.both([(BUF, 4, WRITE, 0)], ([], [4]))
        self.both([(BUF, 4, 0, 0)], ([b"abcd"], []), head_flags=INDIRECT | WRITE)   # WRITE ignored

    def test_out_of_order_table_is_walked_by_next(self):
        self.both([(BUF, 2, NEXT, 2), (BUF + 0x200, 1, WRITE, 0), (BUF + 2, 2, NEXT, 1)], ([b"ab", b"cd"], [1]))
        self.both([(BUF + 2, 2, NEXT, 2), (BUF, 2, NEXT, 0), (BUF + 4, 1, WRITE, 0)], ([b"cd"], [1]))   # entry 1 unused

    def test_chain_ending_before_the_table_does(self):
        self.both([(BUF, 2, NEXT, 1), (BUF + 0x100, 5, WRITE, 2), (BUF, 8, 0, 0)], ([b"ab"], [5]))

    def test_unknown_flag_bits_are_ignored(self):
        self.both([(BUF, 2, NEXT | 0x80, 1), (BUF + 0x100, 5, WRITE, 0)], ([b"ab"], [5]))

    def test_zero_length_entries(self):
        self.both([(BUF, 0, NEXT, 1), (0x900000000, 0, NEXT, 2), (BUF + 0x100, 5, WRITE, 0)], ([b"", b""], [5]))

    def test_buffer_across_two_regions(self):
        memory = self.memory_with((0, BUF + 2), (BUF + 2, MEM_SIZE - BUF - 2))
        memory.write(BUF, b"wxyz")
        self.both([(BUF, 4, NEXT, 1), (BUF + 0x100, 5, WRITE, 0)], ([b"wx", b"yz"], [5]), memory=memory)

    def test_in_order_tables_of_every_shape_match_the_general_walk(self):
        for n in (1, 2, 3, 8, 17):
            for readable in range(n + 1):
                entries = [(BUF + 0x1000 + j, 1, (WRITE if j >= readable else 0) | (NEXT if j + 1 < n else 0),
                            j + 1) for j in range(n)]
                want = ([bytes([j]) for j in range(readable)], [1] * (n - readable))
                with self.subTest(n=n, readable=readable):
                    self.both(entries, want)

    def test_large_table_takes_the_general_walk(self):
        n = 300                                                   # beyond the fast path's 256
        entries = [(BUF + 0x100, 1, NEXT | WRITE if j + 1 < n else WRITE, j + 1) for j in range(n)]
        self.both(entries, ([], [1] * n))


class DeviceMisuseTest(RingCase):
    """A backend pushing what it never popped is the backend's bug, not the driver's: refused
    precisely, nothing written, the queue stays usable."""

    def test_push_of_a_head_not_in_flight(self):
        self.setup_ring()
        self.driver.add([], [(BUF, 8)])
        self.driver.publish()
        head = self.device.pop()[0]
        for batch, pattern in (([(5, 0)], "head 5 is not in flight"),
                               ([(head, 1), (head, 1)], f"head {head} pushed twice in one batch"),
                               ([(head, -1)], "written length -1 .* is not a u32"),
                               ([(head, 1 << 32)], "is not a u32"),
                               ([(-1, 0)], "head -1 is not in flight"),
                               ([(head,)], r"is not a \(head, written_len\) pair"),
                               ([(head, 1.5)], "written length 1.5 .* is not a u32"),
                               ([([head], 0)], r"head \[\d+\] is not in flight")):
            with self.subTest(batch=batch):
                with self.assertRaisesRegex(VirtqueueError, pattern):
                    self.device.push_batch(batch)
                self.assertEqual((self.used_idx(), self.device.in_flight), (0, 1))
                self.assertFalse(self.device.broken)
        self.device.push(head, 8)
        self.assertEqual(self.driver.reap(), [(head, 8)])


class LyingDeviceTest(RingCase):
    """The driver side checks the device's used entries the same way."""

    def lie(self, elem: tuple[int, int], used_idx: int = 1):
        self.memory.write(self.lay["device"] + 4, ELEM.pack(*elem))
        self.memory.write(self.lay["device"] + 2, U16.pack(used_idx))

    def expect(self, pattern: str):
        with self.assertRaisesRegex(VirtqueueError, pattern):
            self.driver.reap()
        self.assert_broken(self.driver, self.driver.reap)
        with self.assertRaisesRegex(VirtqueueError, "queue is broken"):
            self.driver.add([(BUF, 1)], [])

    def test_used_id_never_added(self):
        self.setup_ring()
        self.driver.add([(BUF, 4)], [])
        self.driver.publish()
        self.lie((5, 0))
        self.expect("used ring entry 0 has id 5, which is not a chain in flight")

    def test_used_id_out_of_range(self):
        self.setup_ring()
        self.driver.add([(BUF, 4)], [])
        self.lie((70000, 0))
        self.expect("has id 70000, which is not a chain in flight")

    def test_used_len_beyond_writable_bytes(self):
        self.setup_ring()
        head = self.driver.add([(BUF, 4)], [(BUF + 64, 16)])
        self.lie((head, 17))
        self.expect("says 17 bytes written but the chain has 16 device-writable bytes")

    def test_used_idx_beyond_chains_in_flight(self):
        self.setup_ring()
        self.driver.add([(BUF, 4)], [])
        self.lie((0, 0), used_idx=3)
        self.expect("used idx is 3 entries ahead of the last reaped .* only 1 chains are in flight")


class DriverApiTest(RingCase):
    def test_queue_full_and_bad_chains(self):
        self.setup_ring(size=4, indirect_max=2)
        self.driver.add([(BUF, 1), (BUF, 1)], [(BUF, 1)])
        with self.assertRaisesRegex(VirtqueueError, "queue full"):
            self.driver.add([(BUF, 1)], [(BUF, 1)])
        with self.assertRaisesRegex(VirtqueueError, "do not fit an indirect table of 2"):
            self.driver.add([(BUF, 1)] * 3, [], indirect=True)
        with self.assertRaises(ValueError):
            self.driver.add([], [])
        with self.assertRaises(ValueError):
            self.driver.add([(BUF, 1 << 32)], [])
        self.assertEqual(self.driver.num_free, 1)
        self.driver.add([(BUF, 1)], [(BUF, 1)], indirect=True)
        self.assertEqual(self.driver.num_free, 0)
        with self.assertRaisesRegex(VirtqueueError, "queue full"):
            self.driver.add([(BUF, 1)], [], indirect=True)


class DirtyLogTest(RingCase):
    def test_push_marks_written_pages_and_used_ring(self):
        page = 0x1000
        bitmap = bytearray(MEM_SIZE // page // 8)
        log = DirtyLog(memoryview(bitmap))
        self.setup_ring(log=log, log_used_addr=None)
        lay = self.lay
        readable = 0x50000
        writable = 0x60000
        head = self.driver.add([(readable, 2 * page)], [(writable, 2 * page), (writable + 4 * page, page)])
        self.driver.publish()
        bitmap[:] = bytes(len(bitmap))               # the driver's own setup does not count
        (_, r, w), = self.device.pop_batch()
        self.assertFalse(any(bitmap))                # popping writes nothing into guest memory
        w[0][:10] = b"x" * 10
        self.device.push(head, page + 10)            # 1 page + 10 bytes: pages 0x60 and 0x61 only
        dirty = {n for n in range(MEM_SIZE // page) if log.is_dirty(n * page)}
        used_pages = {lay["device"] // page, (lay["device"] + 4 + 8) // page}
        self.assertEqual(dirty, {0x60, 0x61} | used_pages)
        self.assertFalse(log.is_dirty(readable))

    def test_log_used_addr_is_where_used_ring_bytes_are_logged(self):
        page = 0x1000
        bitmap = bytearray(MEM_SIZE // page // 8)
        log = DirtyLog(memoryview(bitmap))
        self.setup_ring(log=log, log_used_addr=0x80000)
        head = self.driver.add([], [(0x60000, 8)])
        self.driver.publish()
        self.device.pop_batch()
        self.device.push(head, 0)
        dirty = {n for n in range(MEM_SIZE // page) if log.is_dirty(n * page)}
        self.assertEqual(dirty, {0x80})


if __name__ == "__main__":
    unittest.main()
