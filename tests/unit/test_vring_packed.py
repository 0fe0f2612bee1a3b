"""The packed virtqueue (vhost_min.packed): layouts and the base encoding as golden numbers, our
driver against our device over memfd memory (exact bytes, wrap counters over many laps, sizes
that are not powers of two), event suppression decisions worked out by hand, and one test per
way a hostile driver (or a lying device) can break the ring rules."""

from __future__ import annotations

import os
import struct
import unittest
from unittest import mock

from tests.support import LateDriver, StoreBuffer, memfd, seeded_random
from vhost_min import packed
from vhost_min.errors import GuestMemoryError, VirtqueueError
from vhost_min.inflight import InflightPacked, queue_region_size
from vhost_min.memory import IOTLB, VHOST_ACCESS_RO, VHOST_ACCESS_RW, Barriers, DirtyLog, GuestMemory, IOTLBMiss
from vhost_min.packed import (PVIRTQ_DESC, PVIRTQ_EVENT_SUPPRESS, PackedDeviceQueue, PackedDriverQueue,
                              decode_base, encode_base)
from vhost_min.virtio import (RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE,
                              VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_USED,
                              VIRTQ_DESC_F_WRITE, VRING_PACKED_EVENT_F_WRAP_CTR, packed_ring_sizes)

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
AVAIL, USED = VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED
ENABLE, DISABLE, DESC_EVENT = RING_EVENT_FLAGS_ENABLE, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_DESC
DESC = struct.Struct("<QIHH")          # written from the spec text, not imported
EVENT = struct.Struct("<HH")
MEM_SIZE = 1 << 20
RING_BASE = 0x1000
BUF = 0x40000                          # data buffers start here


def avail_bits(wrap: int) -> int:
    """Flags bits of an available descriptor for the driver's wrap counter."""
    return AVAIL if wrap else USED


def used_bits(wrap: int) -> int:
    return AVAIL | USED if wrap else 0


class RingCase(unittest.TestCase):
    """One memfd-backed guest memory with a packed ring at RING_BASE; helpers to write it by hand."""

    #: Start the device with its region cache filled, as after a first pop: chains then take the
    #: inlined fast paths (one descriptor, direct chains, indirect tables) before the general walk.
    WARM = False

    def memory_with(self, *regions: tuple[int, int]) -> GuestMemory:
        memory = GuestMemory()
        for gpa, size in regions:
            fd = memfd(size)
            memory.add_region(gpa, size, fd=fd)
            os.close(fd)
        self.addCleanup(memory.clear)
        return memory

    def setup_ring(self, size: int = 8, *, event_idx: bool = False, indirect: bool = True, indirect_max: int = 8,
                   driver: bool = True, memory: GuestMemory | None = None, **device_kw) -> PackedDeviceQueue:
        self.size = size
        self.memory = memory or self.memory_with((0, MEM_SIZE))
        self.lay = lay = PackedDriverQueue.layout(size, RING_BASE, indirect_max)
        self.driver = (PackedDriverQueue(self.memory, size, lay["desc"], lay["driver"], lay["device"],
                                         event_idx=event_idx, indirect_area=lay["indirect"],
                                         indirect_max=indirect_max) if driver else None)
        self.device = PackedDeviceQueue(self.memory, size, lay["desc"], lay["driver"], lay["device"],
                                        event_idx=event_idx, indirect=indirect, **device_kw)
        if self.WARM:
            region = self.memory.regions[0]
            self.device._rs, self.device._re, self.device._rv = region.gpa, region.end, region.view
        self.slot, self.wrap = 0, 1          # the hand-written driver's next avail slot and wrap counter
        return self.device

    # -- the hand-written (hostile) driver --------------------------------------------------------
    def put(self, slot: int, addr: int, length: int, buffer_id: int, flags: int, table: int | None = None):
        base = self.lay["desc"] if table is None else table
        self.memory.write(base + 16 * slot, DESC.pack(addr, length, buffer_id, flags))

    def offer(self, buffer_id: int, *descs: tuple[int, int, int]) -> int:
        """Make a chain of (addr, len, flags) available from the next slot, NEXT added for all but
        the last and the head's flags written last; returns the head slot."""
        head = self.slot
        head_flags = None
        for k, (addr, length, flags) in enumerate(descs):
            flags |= avail_bits(self.wrap) | (NEXT if k < len(descs) - 1 else 0)
            if k == 0:
                head_flags = flags
                self.put(self.slot, addr, length, buffer_id, 0)
            else:
                self.put(self.slot, addr, length, buffer_id, flags)
            self.slot += 1
            if self.slot == self.size:
                self.slot, self.wrap = 0, self.wrap ^ 1
        self.memory.write(self.lay["desc"] + 16 * head + 14, struct.pack("<H", head_flags))
        return head

    def desc(self, slot: int) -> tuple[int, int, int, int]:
        return DESC.unpack(self.memory.read(self.lay["desc"] + 16 * slot, 16))

    def event(self, area: str) -> tuple[int, int]:
        return EVENT.unpack(self.memory.read(self.lay[area], 4))

    def set_event(self, area: str, off: int, wrap: int, flags: int) -> None:
        self.memory.write(self.lay[area], EVENT.pack(off | wrap << 15, flags))

    def assert_broken(self, queue, call=None):
        self.assertTrue(queue.broken)
        with self.assertRaisesRegex(VirtqueueError, "queue is broken: "):
            (call or queue.pop_batch)()


def fake_barriers(log: list, on_write=None) -> Barriers:
    """Barriers that record their calls, with read and write set as on a weakly ordered CPU."""
    def write():
        log.append("wmb")
        if on_write is not None:
            on_write()
    return Barriers(lambda: log.append("mb"), lambda: log.append("rmb"), write, lambda a, b: None, "test")


# ----------------------------------------------------------------------------------------------
class LayoutTest(RingCase):
    def test_descriptor_and_event_layout_golden(self):
        self.assertEqual((PVIRTQ_DESC.size, PVIRTQ_EVENT_SUPPRESS.size), (16, 4))
        self.assertEqual(PVIRTQ_DESC.pack(0x1122334455667788, 0x99AABBCC, 0x0102, 0x8081),
                         bytes.fromhex("8877665544332211" "ccbbaa99" "0201" "8180"))
        # desc: off 5 in bits 0-14, wrap in bit 15; flags DESC
        self.assertEqual(PVIRTQ_EVENT_SUPPRESS.pack(5 | 1 << VRING_PACKED_EVENT_F_WRAP_CTR, RING_EVENT_FLAGS_DESC),
                         bytes.fromhex("0580" "0200"))
        self.assertEqual((AVAIL, USED, VRING_PACKED_EVENT_F_WRAP_CTR), (0x80, 0x8000, 15))
        self.assertEqual((ENABLE, DISABLE, DESC_EVENT), (0, 1, 2))
        self.assertEqual(packed_ring_sizes(7), (112, 4, 4))
        self.assertEqual(packed_ring_sizes(32768), (524288, 4, 4))

    def test_layout_golden(self):
        self.assertEqual(PackedDriverQueue.layout(256, 0x1000),
                         {"desc": 0x1000, "driver": 0x2000, "device": 0x2004, "indirect": None, "end": 0x2008})
        # base rounded up to 16; event areas right after the ring; indirect tables rounded up to 16
        self.assertEqual(PackedDriverQueue.layout(7, 0x1001, 3),
                         {"desc": 0x1010, "driver": 0x1080, "device": 0x1084, "indirect": 0x1090,
                          "end": 0x1090 + 7 * 3 * 16})

    def test_base_encoding_golden(self):
        self.assertEqual(encode_base(5, 1, 3, 0), 0x0003_8005)
        self.assertEqual(encode_base(0x7FFF, 1, 0x7FFF, 1), 0xFFFF_FFFF)
        self.assertEqual(encode_base(0, 0, 0x1234, 1), 0x9234_0000)
        self.assertEqual(decode_base(0x9234_8005), (5, 1, 0x1234, 1))
        self.setup_ring(7)
        self.assertEqual(self.device.get_base(), 0x8000_8000)      # both wrap counters start at 1
        self.assertEqual(self.driver.get_base(), 0x8000_8000)

    def test_driver_zeroes_the_ring(self):
        memory = self.memory_with((0, MEM_SIZE))
        memory.write(RING_BASE, b"\xff" * 0x200)
        lay = PackedDriverQueue.layout(8, RING_BASE)
        PackedDriverQueue(memory, 8, lay["desc"], lay["driver"], lay["device"])
        self.assertEqual(memory.read(RING_BASE, lay["end"] - RING_BASE), bytes(lay["end"] - RING_BASE))

    def test_any_size_from_1_to_32768(self):
        memory = self.memory_with((0, MEM_SIZE))
        for bad in (0, -1, 32769, 65536, 8.0):
            with self.assertRaisesRegex(VirtqueueError, "size"):
                PackedDeviceQueue(memory, bad, 0x1000, 0x80000, 0x80004)
            with self.assertRaises(VirtqueueError):
                PackedDriverQueue.layout(bad, 0)
        for good in (1, 3, 7, 257, 1000, 32768):
            PackedDeviceQueue(memory, good, 0x0, 0x80000, 0x80004)

    def test_ring_addresses_must_be_aligned(self):
        memory = self.memory_with((0, MEM_SIZE))
        for desc, driver, device, what in ((0x1008, 0x2000, 0x2004, "descriptor ring address 0x1008 is not 16-byte"),
                                           (0x1000, 0x2002, 0x2004, "driver area address 0x2002 is not 4-byte"),
                                           (0x1000, 0x2000, 0x2006, "device area address 0x2006 is not 4-byte")):
            with self.assertRaisesRegex(VirtqueueError, what):
                PackedDeviceQueue(memory, 8, desc, driver, device)

    def test_ring_addresses_must_be_in_memory(self):
        memory = self.memory_with((0, MEM_SIZE))
        for desc, driver, device in ((MEM_SIZE - 64, 0x2000, 0x2004),       # 8 slots run off the end
                                     (0x1000, MEM_SIZE, 0x2004),
                                     (0x1000, 0x2000, MEM_SIZE)):
            with self.assertRaisesRegex(GuestMemoryError, "packed ring of size 8"):
                PackedDeviceQueue(memory, 8, desc, driver, device)


# ----------------------------------------------------------------------------------------------
class DataPathTest(RingCase):
    def test_direct_chain_exact_bytes(self):
        self.setup_ring(7)
        self.memory.write(BUF, b"hello ")
        self.memory.write(BUF + 0x100, b"world")
        bid = self.driver.add([(BUF, 6), (BUF + 0x100, 5)], [(BUF + 0x1000, 16)], token="t")
        self.assertEqual(bid, 0)
        # Added, not published: the tail is complete, the head's flags still zero.
        self.assertEqual(self.desc(0), (BUF, 6, 0, 0))
        self.assertEqual(self.desc(1), (BUF + 0x100, 5, 0, AVAIL | NEXT))
        self.assertEqual(self.desc(2), (BUF + 0x1000, 16, 0, AVAIL | WRITE))
        self.assertIsNone(self.device.pop())
        self.assertTrue(self.driver.publish())                          # device area: ENABLE
        self.assertEqual(self.memory.read(self.lay["desc"], 16),
                         bytes.fromhex("0000040000000000" "06000000" "0000" "8100"))
        self.assertEqual(self.device.pending(), 1)
        head, readable, writable = self.device.pop()
        self.assertEqual((head, [bytes(v) for v in readable], [len(v) for v in writable]),
                         (0, [b"hello ", b"world"], [16]))
        writable[0][:11] = b"HELLO WORLD"
        self.assertTrue(self.device.push(head, 11))                      # driver area: ENABLE
        # One used descriptor, in the chain's first slot: len, id, AVAIL|USED (wrap 1) and WRITE.
        self.assertEqual(self.memory.read(self.lay["desc"] + 8, 8), bytes.fromhex("0b000000" "0000" "8280"))
        self.assertEqual(self.driver.reap(), [("t", 11)])
        self.assertEqual(self.memory.read(BUF + 0x1000, 12), b"HELLO WORLD\0")
        self.assertEqual((self.device.get_base(), self.driver.get_base()), (0x8003_8003,) * 2)
        self.assertEqual((self.driver.num_free, self.driver.in_flight, self.device.in_flight), (7, 0, 0))

    def test_indirect_chain_exact_bytes(self):
        self.setup_ring(7, indirect_max=4)
        self.memory.write(BUF, b"abc")
        bid = self.driver.add([(BUF, 3)], [(BUF + 0x100, 4), (BUF + 0x200, 4)], indirect=True)
        table = self.lay["indirect"] + bid * 4 * 16
        self.assertEqual(self.memory.read(table, 48),
                         DESC.pack(BUF, 3, 0, 0) + DESC.pack(BUF + 0x100, 4, 0, WRITE)
                         + DESC.pack(BUF + 0x200, 4, 0, WRITE))
        self.driver.publish()
        self.assertEqual(self.desc(0), (table, 48, bid, AVAIL | INDIRECT))
        (head, readable, writable), = self.device.pop_batch()
        self.assertEqual((head, [bytes(v) for v in readable], [len(v) for v in writable]), (bid, [b"abc"], [4, 4]))
        writable[0][:] = b"1234"
        writable[1][:2] = b"56"
        self.device.push(head, 6)
        self.assertEqual(self.desc(0)[1:], (6, bid, AVAIL | USED | WRITE))
        self.assertEqual(self.driver.reap(), [(bid, 6)])
        self.assertEqual(self.memory.read(BUF + 0x100, 4) + self.memory.read(BUF + 0x200, 2), b"123456")

    def test_nothing_written_leaves_write_clear(self):
        self.setup_ring(4)
        bid = self.driver.add([(BUF, 8)], [])
        self.driver.publish()
        self.device.push(self.device.pop()[0], 0)
        self.assertEqual(self.desc(0)[1:], (0, bid, AVAIL | USED))
        self.assertEqual(self.driver.reap(), [(bid, 0)])

    def test_out_of_order_completion_skips_slots(self):
        self.setup_ring(8)
        a = self.driver.add([(BUF, 1), (BUF + 1, 1)], [(BUF + 2, 1)], token="a")   # slots 0-2
        b = self.driver.add([], [(BUF + 3, 1)], token="b")                         # slot 3
        c = self.driver.add([(BUF + 4, 1), (BUF + 5, 1)], [], token="c")           # slots 4-5
        self.driver.publish()
        self.assertEqual([ch[0] for ch in self.device.pop_batch()], [a, b, c])
        self.assertEqual(self.device.get_base(), 0x8000_8006)
        self.device.push_batch([(b, 1), (c, 0)])          # b's used descriptor in slot 0, c's in slot 1
        self.assertEqual(self.desc(0)[1:], (1, b, AVAIL | USED | WRITE))
        self.assertEqual(self.desc(1)[1:], (0, c, AVAIL | USED))
        self.assertEqual(self.device.get_base(), 0x8003_8006)          # used index 1 + 2 slots
        self.device.push(a, 1)                                          # slot 3, then skip a's 3 slots
        self.assertEqual(self.desc(3)[1:], (1, a, AVAIL | USED | WRITE))
        self.assertEqual(self.device.get_base(), 0x8006_8006)
        self.assertEqual(self.driver.reap(), [("b", 1), ("c", 0), ("a", 1)])
        self.assertEqual(self.driver.get_base(), 0x8006_8006)

    def test_zero_length_descriptors_give_empty_views(self):
        self.setup_ring(4)
        self.driver.add([(BUF, 0)], [(0xDEAD_0000_0000, 0), (BUF, 4)])          # no lookup for zero bytes
        self.driver.publish()
        (_, readable, writable), = self.device.pop_batch()
        self.assertEqual(([len(v) for v in readable], [len(v) for v in writable]), ([0], [0, 4]))

    def test_buffer_spanning_two_adjacent_regions(self):
        memory = self.memory_with((0, 0x80000), (0x80000, 0x80000))
        self.setup_ring(4, memory=memory)
        memory.write(0x7FFFC, b"abcdefgh")
        self.driver.add([(0x7FFFC, 8)], [])
        self.driver.publish()
        (_, readable, _), = self.device.pop_batch()
        self.assertEqual([bytes(v) for v in readable], [b"abcd", b"efgh"])

    def test_memory_added_later_is_seen(self):
        memory = self.memory_with((0, MEM_SIZE))
        self.setup_ring(4, memory=memory)
        fd = memfd(0x10000)
        memory.add_region(0x200000, 0x10000, fd=fd)
        os.close(fd)
        memory.write(0x200010, b"late")
        self.driver.add([(0x200010, 4)], [])
        self.driver.publish()
        self.assertEqual(bytes(self.device.pop()[1][0]), b"late")

    def test_pop_descriptors_untranslated(self):
        self.setup_ring(8, indirect_max=2)
        self.driver.add([(0xAAAA_0000, 5)], [(0xBBBB_0000, 7)])                  # not in memory: not looked up
        self.driver.add([(0xCCCC_0000, 1)], [(0xDDDD_0000, 2)], indirect=True)
        self.driver.publish()
        self.assertEqual(self.device.pop_descriptors(),
                         [(0, [(0xAAAA_0000, 5, False), (0xBBBB_0000, 7, True)]),
                          (1, [(0xCCCC_0000, 1, False), (0xDDDD_0000, 2, True)])])
        self.device.push_batch([(1, 2), (0, 7)])
        self.assertEqual(self.driver.reap(), [(1, 2), (0, 7)])

    def test_wrap_counters_over_many_laps(self):
        for size in (7, 257):
            with self.subTest(size=size):
                self.run_laps(size, laps=20)

    def run_laps(self, size: int, laps: int) -> None:
        rnd = seeded_random(self, 7 * size)
        self.setup_ring(size, indirect_max=3)
        expected = {}
        done = 0
        flips = 0
        last_wrap = 1
        while done < laps * size:
            # Add a few chains of 1..3 descriptors (some indirect) while there is room.
            for _ in range(rnd.randrange(1, 6)):
                nseg = rnd.randrange(1, 4)
                indirect = rnd.random() < 0.3
                if (1 if indirect else nseg) > self.driver.num_free:
                    break
                addr = BUF + rnd.randrange(0, 0x10000)
                token = object()
                self.memory.write(addr, bytes([done & 0xFF]) * nseg)
                readable = [(addr + i, 1) for i in range(nseg - 1)]
                bid = self.driver.add(readable, [(addr + 0x20000, 8)], token, indirect=indirect)
                expected[bid] = (token, bytes([done & 0xFF]) * (nseg - 1))
            self.driver.publish()
            chains = self.device.pop_batch(rnd.randrange(1, 8))
            rnd.shuffle(chains)                                          # complete out of order
            _, _, first_slot, wrap = decode_base(self.device.get_base())
            used = []
            for bid, readable, writable in chains:
                token, data = expected[bid]
                self.assertEqual(b"".join(bytes(v) for v in readable), data)
                writable[0][:1] = b"%c" % (bid & 0x7F)
                used.append((bid, 1 + bid % 8))
            self.device.push_batch(used)
            if used:                       # the batch's first used descriptor: AVAIL == USED == wrap
                self.assertEqual(self.desc(first_slot)[3] & (AVAIL | USED), used_bits(wrap))
            for token, written in self.driver.reap():
                bid = next(b for b, (t, _) in expected.items() if t is token)
                self.assertEqual(written, 1 + bid % 8)
                del expected[bid]
                done += 1
            wrap = self.device.get_base() >> 31
            flips += wrap != last_wrap
            last_wrap = wrap
        self.assertGreaterEqual(flips, laps - 1)
        # Drain and check both sides agree on where they are.
        while expected:
            self.device.push_batch([(c[0], 0) for c in self.device.pop_batch()])
            for token, _ in self.driver.reap():
                del expected[next(b for b, (t, _) in expected.items() if t is token)]
        self.assertEqual(self.device.get_base(), self.driver.get_base())
        avail, avail_wrap, used_idx, used_wrap = decode_base(self.device.get_base())
        self.assertEqual((avail, avail_wrap), (used_idx, used_wrap))

    def test_batch_publishes_first_descriptor_flags_last(self):
        """At the write barrier of push_batch every used descriptor but the first is complete and
        the first still looks available: the driver sees the whole batch or nothing."""
        seen = []

        def at_wmb():
            if self.device.in_flight == 3:
                seen.append([self.desc(s) for s in range(3)])

        calls: list = []
        with mock.patch.object(packed, "barriers", lambda: fake_barriers(calls, at_wmb)):
            self.setup_ring(8)
        for _ in range(3):
            self.driver.add([], [(BUF, 4)])
        self.driver.publish()
        ids = [c[0] for c in self.device.pop_batch()]
        calls.clear()
        self.device.push_batch([(ids[2], 1), (ids[0], 2), (ids[1], 3)])
        first, second, third = seen[0]
        self.assertEqual(first, (BUF, 1, ids[2], AVAIL | WRITE))            # len and id written, flags not yet
        self.assertEqual(second[1:], (2, ids[0], AVAIL | USED | WRITE))
        self.assertEqual(third[1:], (3, ids[1], AVAIL | USED | WRITE))
        self.assertEqual(self.desc(0)[3], AVAIL | USED | WRITE)
        self.assertEqual(calls, ["wmb", "mb"])

    def test_publish_writes_first_head_flags_last(self):
        seen = []
        calls: list = []

        def at_wmb():
            seen.append([self.desc(s)[3] for s in range(4)])

        with mock.patch.object(packed, "barriers", lambda: fake_barriers(calls, at_wmb)):
            self.setup_ring(8)
        self.driver.add([(BUF, 1), (BUF, 1)], [])
        self.driver.add([(BUF, 1)], [])
        self.driver.add([], [(BUF, 1)])
        self.assertTrue(self.driver.publish())
        self.assertEqual(seen, [[0, AVAIL, AVAIL, AVAIL | WRITE]])          # everything but the first head
        self.assertEqual(self.desc(0)[3], AVAIL | NEXT)
        self.assertEqual(calls, ["wmb", "mb"])

    def test_weakly_ordered_pop_reads_flags_then_one_read_barrier(self):
        calls: list = []
        with mock.patch.object(packed, "barriers", lambda: fake_barriers(calls)):
            self.setup_ring(7)
        for lap in range(2):                                                # the second crosses the wrap
            for k in range(3):
                self.driver.add([(BUF + k, 1)], [(BUF + 0x100, 1)])
            self.driver.publish()
            calls.clear()
            chains = self.device.pop_batch()
            self.assertEqual([len(c[1]) + len(c[2]) for c in chains], [2, 2, 2])
            self.assertEqual(calls, ["rmb"])                                # one scan, one barrier
            self.device.push_batch([(c[0], 1) for c in chains])
            self.assertEqual(len(self.driver.reap()), 3)
        self.assertEqual(self.device.get_base(), encode_base(5, 0, 5, 0))

    def test_struct_fallback_for_big_endian_hosts(self):
        """The same ring through the struct-based arrays a big-endian host would use."""
        with mock.patch.object(packed, "_cast", packed._LittleEndianArray):
            self.setup_ring(5, indirect_max=2)
            self.assertIsInstance(self.device._q, packed._LittleEndianArray)
            for lap in range(4):
                self.memory.write(BUF, b"lap%d" % lap)
                a = self.driver.add([(BUF, 4)], [(BUF + 0x100, 4)], token="a")
                b = self.driver.add([(BUF, 4)], [(BUF + 0x200, 4)], token="b", indirect=True)
                self.driver.publish()
                chains = self.device.pop_batch()
                self.assertEqual([(bid, bytes(r[0])) for bid, r, _ in chains],
                                 [(a, b"lap%d" % lap), (b, b"lap%d" % lap)])
                self.device.push_batch([(b, 4), (a, 3)])
                self.assertEqual(self.driver.reap(), [("b", 4), ("a", 3)])
            self.assertEqual(self.device.get_base(), encode_base(2, 1, 2, 1))      # 12 slots: lap 2, slot 2
            self.assertEqual(self.desc(4)[1:], (4, b, WRITE))                      # lap 1: wrap 0
            self.assertEqual(self.desc(0)[1:], (3, a, AVAIL | USED | WRITE))       # lap 2: wrap 1

    def test_inflight_hooks_called_in_order(self):
        calls = []
        test = self

        class Recorder:
            def on_pop_packed(self, head_slot, descriptors):
                calls.append(("pop", head_slot, list(descriptors)))

            def before_publish(self, ids):
                calls.append(("before", list(ids), test.desc(0)[3]))

            def after_publish(self, ids, used_idx, used_wrap):
                calls.append(("after", list(ids), used_idx, used_wrap, test.desc(0)[3]))

        self.setup_ring(4, inflight=Recorder())
        self.driver.add([(BUF, 4)], [(BUF + 8, 4)])
        self.driver.add([(BUF, 2)], [], indirect=True)
        self.driver.publish()
        ids = [c[0] for c in self.device.pop_batch()]
        self.device.push_batch([(i, 0) for i in ids])
        table = self.lay["indirect"] + 1 * 8 * 16
        self.assertEqual(calls, [
            ("pop", 0, [(BUF, 4, 0, AVAIL | NEXT), (BUF + 8, 4, 0, AVAIL | WRITE)]),
            ("pop", 2, [(table, 16, 1, AVAIL | INDIRECT)]),
            ("before", [0, 1], AVAIL | NEXT),                 # before the first used flags ...
            ("after", [0, 1], 3, 1, AVAIL | USED),            # ... after: 3 slots used, wrap 1
        ])

    def test_iotlb_memory_and_misses(self):
        backing = self.memory_with((0, MEM_SIZE))
        iotlb = IOTLB()
        iotlb.update_view(0, backing.view(0, 0x40000))                            # rings
        iotlb.update_view(0x100000, backing.view(BUF, 0x1000), VHOST_ACCESS_RO)
        iotlb.update_view(0x200000, backing.view(BUF + 0x1000, 0x1000), VHOST_ACCESS_RW)
        self.setup_ring(4, memory=backing, driver=False)
        device = PackedDeviceQueue(iotlb, 4, self.lay["desc"], self.lay["driver"], self.lay["device"])
        backing.write(BUF, b"iova")
        self.offer(0, (0x100000, 4, 0), (0x200000, 4, WRITE))
        (bid, readable, writable), = device.pop_batch()
        self.assertEqual((bid, bytes(readable[0]), len(writable[0])), (0, b"iova", 4))
        self.offer(1, (0x100000, 4, WRITE))                  # device-writable in a read-only mapping
        with self.assertRaises(IOTLBMiss):
            device.pop_batch()
        self.assertFalse(device.broken)                       # a miss is not the driver's fault: retry
        self.assertEqual((device.pending(), device.in_flight), (1, 1))
        iotlb.update_view(0x100000, backing.view(BUF, 0x1000), VHOST_ACCESS_RW)
        self.assertEqual(device.pop_batch()[0][0], 1)

    def test_dirty_log_marks_written_pages_and_used_slots(self):
        page = 0x1000
        bitmap = bytearray(MEM_SIZE // page // 8)
        log = DirtyLog(memoryview(bitmap))
        self.setup_ring(8, log=log)
        writable = 0x60000
        a = self.driver.add([(0x50000, 2 * page)], [(writable, 2 * page), (writable + 4 * page, page)])
        b = self.driver.add([], [(0x70000, 8)], indirect=True)
        self.driver.publish()
        (_, _, w), _ = self.device.pop_batch()
        self.assertFalse(any(bitmap))
        w[0][:10] = b"x" * 10
        self.device.push_batch([(b, 0), (a, page + 10)])    # b in slot 0, a (1 page + 10 bytes) in slot 1
        dirty = {n for n in range(MEM_SIZE // page) if log.is_dirty(n * page)}
        self.assertEqual(dirty, {0x60, 0x61, self.lay["desc"] // page})
        bitmap[:] = bytes(len(bitmap))
        self.device.set_log(log, log_used_addr=0x90000)
        self.driver.reap()
        self.driver.add([], [(0x70000, 8)])
        self.driver.publish()
        self.device.push(self.device.pop()[0], 8)              # used descriptor in slot 2 (of 0x90000)
        dirty = {n for n in range(MEM_SIZE // page) if log.is_dirty(n * page)}
        self.assertEqual(dirty, {0x70, 0x90})


# ----------------------------------------------------------------------------------------------
class NotificationTest(RingCase):
    """Interrupt and kick decisions against hand-computed expectations.  The batch used in the
    EVENT_IDX cases crosses the end of a ring of 7: slots 5 and 6 of wrap 1, then 0 and 1 of
    wrap 0; the notification is due iff the event's (off, wrap) is one of those four."""

    CASES = [((5, 1), True), ((6, 1), True), ((0, 0), True), ((1, 0), True),
             ((2, 0), False),          # the next slot: not written yet
             ((4, 1), False),          # passed by an earlier batch
             ((5, 0), False),          # slot 5 of the next lap
             ((0, 1), False)]          # slot 0 of the previous lap

    def prepare_interrupt_case(self, event_idx: bool):
        self.setup_ring(7, event_idx=event_idx)
        for _ in range(5):
            self.driver.add([], [(BUF, 4)])
        self.driver.publish()
        self.device.push_batch([(c[0], 0) for c in self.device.pop_batch()])
        self.driver.reap()
        for _ in range(4):
            self.driver.add([], [(BUF, 4)])
        self.driver.publish()
        return [(c[0], 0) for c in self.device.pop_batch()]

    def test_interrupts_with_event_idx_hand_computed(self):
        for (off, wrap), expect in self.CASES + [((3, 1), False)]:
            with self.subTest(off=off, wrap=wrap):
                used = self.prepare_interrupt_case(True)
                self.set_event("driver", off, wrap, DESC_EVENT)
                self.assertEqual(self.device.push_batch(used), expect)
                self.assertEqual(self.device.get_base() >> 16, 2)            # used index 2, wrap 0
        for flags, expect in ((ENABLE, True), (DISABLE, False), (3, True)):   # 3 is reserved: notify
            with self.subTest(flags=flags):
                used = self.prepare_interrupt_case(True)
                self.set_event("driver", 2, 0, flags)
                self.assertEqual(self.device.push_batch(used), expect)

    def test_interrupts_without_event_idx(self):
        for flags, expect in ((ENABLE, True), (DISABLE, False), (DESC_EVENT, True)):   # DESC needs EVENT_IDX
            with self.subTest(flags=flags):
                used = self.prepare_interrupt_case(False)
                self.set_event("driver", 2, 0, flags)          # (off, wrap) that DESC would refuse
                self.assertEqual(self.device.push_batch(used), expect)

    def test_interrupt_range_covers_skipped_slots(self):
        for off, expect in ((0, True), (2, True), (3, False)):
            with self.subTest(off=off):
                self.setup_ring(7, event_idx=True)
                self.driver.add([(BUF, 1), (BUF, 1)], [(BUF, 1)])       # one chain of 3 slots
                self.driver.publish()
                self.set_event("driver", off, 1, DESC_EVENT)
                self.assertEqual(self.device.push(self.device.pop()[0], 0), expect)

    def prepare_kick_case(self, event_idx: bool):
        self.setup_ring(7, event_idx=event_idx)
        for _ in range(5):
            self.driver.add([], [(BUF, 4)])
        self.driver.publish()
        self.device.push_batch([(c[0], 0) for c in self.device.pop_batch()])
        self.driver.reap()
        for _ in range(4):
            self.driver.add([], [(BUF, 4)])

    def test_kicks_with_event_idx_hand_computed(self):
        for (off, wrap), expect in self.CASES:
            with self.subTest(off=off, wrap=wrap):
                self.prepare_kick_case(True)
                self.set_event("device", off, wrap, DESC_EVENT)
                self.assertEqual(self.driver.publish(), expect)
                self.assertEqual(self.driver.get_base() & 0xFFFF, 2)          # avail index 2, wrap 0
        for flags, expect in ((ENABLE, True), (DISABLE, False)):
            with self.subTest(flags=flags):
                self.prepare_kick_case(True)
                self.set_event("device", 2, 0, flags)
                self.assertEqual(self.driver.publish(), expect)

    def test_kicks_without_event_idx(self):
        for flags, expect in ((ENABLE, True), (DISABLE, False), (DESC_EVENT, True)):
            with self.subTest(flags=flags):
                self.prepare_kick_case(False)
                self.set_event("device", 2, 0, flags)
                self.assertEqual(self.driver.publish(), expect)
        self.assertFalse(self.driver.publish())                  # nothing added since: no kick

    def test_device_enable_disable_notifications(self):
        self.setup_ring(7)
        self.device.disable_notifications()
        self.assertEqual(self.event("device"), (0, DISABLE))
        self.driver.add([], [(BUF, 1)])
        self.assertFalse(self.driver.publish())
        self.assertTrue(self.device.enable_notifications())       # re-check: one chain waiting
        self.assertEqual(self.event("device"), (0, ENABLE))
        self.device.pop()
        self.assertFalse(self.device.enable_notifications())

    def test_event_idx_avail_event_follows_pops(self):
        self.setup_ring(7, event_idx=True)
        self.assertFalse(self.device.enable_notifications())
        self.assertEqual(self.event("device"), (0 | 1 << 15, DESC_EVENT))
        for _ in range(3):
            self.driver.add([(BUF, 1), (BUF, 1)], [])              # 6 slots
        self.assertTrue(self.driver.publish())                     # event at slot 0: kicked
        self.device.pop_batch()
        self.assertEqual(self.event("device"), (6 | 1 << 15, DESC_EVENT))
        self.device.push_batch([(0, 0), (1, 0)])
        self.driver.reap()
        self.driver.add([(BUF, 1), (BUF, 1)], [])                  # slots 6 and 0 (wrap 0)
        self.assertTrue(self.driver.publish())
        self.device.disable_notifications()
        self.assertEqual(self.event("device"), (0, DISABLE))
        self.device.pop_batch()
        self.assertEqual(self.event("device"), (0, DISABLE))        # disabled: pops leave it alone
        self.assertFalse(self.device.enable_notifications())
        self.assertEqual(self.event("device"), (1, DESC_EVENT))    # slot 1, wrap 0

    def test_event_idx_pop_after_a_budget_stop_sees_a_chain_published_unkicked(self):
        """A pop that stops at its budget moves the event offset with no barrier after it. The next
        pop finds the ring empty and the driver publishes right then, reading the event from
        memory while our store still sits in the store buffer: the driver must kick, or that pop
        must take the chain (its re-scan behind a full barrier); else the chain waits for ever."""
        self.setup_ring(8, event_idx=True)
        device = self.device
        device._device_event = buffered = StoreBuffer(device._device_event, 0)
        late = LateDriver(device, buffered, self.driver, BUF)
        self.driver.add([], [(BUF, 1)], 0)
        self.assertTrue(self.driver.publish())                   # ENABLE: kicked
        device.push_batch([(c[0], 1) for c in device.pop_batch()])
        self.assertEqual(self.event("device"), (1 | 1 << 15, DESC_EVENT))   # behind a barrier: visible
        self.driver.reap()
        for k in (1, 2):
            self.driver.add([], [(BUF, 1)], k)
        self.assertTrue(self.driver.publish())                   # slots 1, 2: the event at 1, kicked
        first, second = device.pop_batch(1), device.pop_batch(1)  # each stops at its budget of one
        self.assertEqual(len(first) + len(second), 2)
        self.assertEqual(self.event("device"), (1 | 1 << 15, DESC_EVENT))   # the move to 3 not visible yet
        late.armed = True
        chains = device.pop_batch()
        late()                           # no barrier in that pop: the driver comes after it returned
        self.assertEqual(late.published, [False])                     # the driver saw the event at 1: no kick
        self.assertEqual(len(chains), 1, "a chain published while the event store was unfenced was neither "
                                         "kicked nor popped")

    def test_event_idx_used_event_follows_reaps(self):
        self.setup_ring(7, event_idx=True)
        self.assertFalse(self.driver.enable_interrupts())
        self.assertEqual(self.event("driver"), (1 << 15, DESC_EVENT))
        for _ in range(3):
            self.driver.add([], [(BUF, 1)])
        self.driver.publish()
        ids = [c[0] for c in self.device.pop_batch()]
        self.assertTrue(self.device.push(ids[0], 0))
        self.assertFalse(self.device.push(ids[1], 0))               # the driver has not moved on yet
        self.assertEqual(len(self.driver.reap()), 2)
        self.assertEqual(self.event("driver"), (2 | 1 << 15, DESC_EVENT))
        self.assertTrue(self.device.push(ids[2], 0))
        self.driver.disable_interrupts()
        self.assertEqual(self.event("driver"), (0, DISABLE))
        self.assertTrue(self.driver.enable_interrupts())            # re-check: one used waiting
        self.assertEqual(self.event("driver"), (2 | 1 << 15, DESC_EVENT))


# ----------------------------------------------------------------------------------------------
class BaseTest(RingCase):
    def test_get_set_base_round_trip_mid_lap(self):
        self.setup_ring(7, event_idx=True)
        for _ in range(3):                                   # 2 laps and 3 slots: wrap counter 1 again
            for _ in range(5):
                self.driver.add([], [(BUF, 1)])
            self.driver.publish()
            self.device.push_batch([(c[0], 1) for c in self.device.pop_batch()])
            self.driver.reap()
        self.driver.add([(BUF, 1), (BUF, 1)], [], token="late")
        self.driver.publish()
        self.assertEqual(self.device.get_base(), encode_base(1, 1, 1, 1))
        num = self.device.get_base()
        again = PackedDeviceQueue(self.memory, 7, self.lay["desc"], self.lay["driver"], self.lay["device"],
                                  event_idx=True)
        again.set_base(num)
        self.assertEqual(again.get_base(), num)
        self.assertEqual(again.pending(), 1)
        for _ in range(30):                                  # several more laps on the new device
            (bid, readable, _), = again.pop_batch()
            again.push(bid, 0)
            self.assertEqual(len(self.driver.reap()), 1)
            self.driver.add([(BUF, 1), (BUF, 1)], [])
            self.driver.publish()
        (bid, _, _), = again.pop_batch()
        again.push(bid, 0)
        self.assertEqual(len(self.driver.reap()), 1)
        self.assertEqual(again.get_base(), self.driver.get_base())
        self.assertEqual(again.get_base(), encode_base(0, 0, 0, 0))     # 15 + 31 * 2 = 77 = lap 11 (odd), slot 0

    def test_set_base_with_chains_in_flight_and_resubmit(self):
        """A backend restarted with chains in flight: inflight tracking gives set_base's num and
        the saved descriptors, resubmit takes them back, the driver gets every buffer."""
        region = bytearray(queue_region_size(7, packed=True))
        tracker = InflightPacked(region, 7)
        tracker.init()
        self.setup_ring(7, inflight=tracker)
        self.memory.write(BUF, b"data")
        tokens = {self.driver.add([(BUF, 4)], [(BUF + 0x100, 4)], token=t) for t in "ab"}
        self.driver.add([(BUF, 4)], [], token="c", indirect=True)
        self.driver.publish()
        chains = self.device.pop_batch()
        self.device.push(chains[1][0], 0)                    # "b" done; "a" and "c" lost in the crash
        self.assertEqual(len(tokens), 2)
        tracker = InflightPacked(region, 7)                  # the restarted backend
        tracker.reconcile(lambda slot: self.desc(slot)[3])
        device = PackedDeviceQueue(self.memory, 7, self.lay["desc"], self.lay["driver"], self.lay["device"],
                                   inflight=tracker)
        device.set_base(tracker.vring_base())
        self.assertEqual(device.get_base(), encode_base(5, 1, 2, 1))     # 3 slots still occupied
        resubmitted = [device.resubmit(descs) for descs in tracker.resubmit()]
        self.assertEqual([(bid, bytes(r[0])) for bid, r, _ in resubmitted], [(0, b"data"), (2, b"data")])
        self.assertEqual(device.in_flight, 2)
        with self.assertRaisesRegex(VirtqueueError, "does not fit"):
            device.resubmit([(BUF, 4, 3, 0)])
        device.push_batch([(bid, 0) for bid, _, _ in reversed(resubmitted)])
        self.assertEqual(sorted(t for t, _ in self.driver.reap()), ["a", "b", "c"])
        self.assertEqual(device.get_base(), self.driver.get_base())

    def test_set_base_rejects_bad_numbers(self):
        self.setup_ring(7)
        with self.assertRaisesRegex(VirtqueueError, "not below the queue size 7"):
            self.device.set_base(encode_base(7, 1, 0, 1))
        with self.assertRaisesRegex(VirtqueueError, "used index is ahead"):
            self.device.set_base(encode_base(2, 1, 3, 1))
        self.device.set_base(encode_base(2, 0, 3, 1))        # 6 slots in flight across the wrap: fine


# ----------------------------------------------------------------------------------------------
class IndirectTableTest(RingCase):
    """Legal indirect tables, the ones drivers write (readable entries then writable ones, taken by
    the fast path) and the others (other flag bits, zero lengths, buffers across two regions),
    give the chain in table order."""

    def pop_table(self, entries, memory=None):
        self.setup_ring(7, driver=False, memory=memory)
        table = BUF + 0x8000
        self.memory.write(BUF, b"abcdefgh")
        for i, (addr, length, flags) in enumerate(entries):
            self.put(i, addr, length, 0, flags, table=table)
        self.offer(5, (table, 16 * len(entries), INDIRECT))
        (bid, readable, writable), = self.device.pop_batch()
        self.assertEqual(bid, 5)
        return [bytes(v) for v in readable], [len(v) for v in writable]

    def test_tables(self):
        for entries, want in (
                ([(BUF, 2, 0), (BUF + 2, 3, 0), (BUF + 0x100, 9, WRITE)], ([b"ab", b"cde"], [9])),
                ([(BUF + 0x100, 9, WRITE), (BUF + 0x200, 1, WRITE)], ([], [9, 1])),
                ([(BUF, 8, 0)], ([b"abcdefgh"], [])),
                ([(BUF, 2, NEXT), (BUF + 0x100, 9, WRITE | 0x40)], ([b"ab"], [9])),     # other bits ignored
                ([(BUF, 0, 0), (0x900000000, 0, 0), (BUF + 0x100, 4, WRITE)], ([b"", b""], [4]))):
            with self.subTest(entries=entries):
                self.assertEqual(self.pop_table(entries), want)

    def test_buffer_across_two_regions(self):
        memory = self.memory_with((0, BUF + 3), (BUF + 3, MEM_SIZE - BUF - 3))
        self.assertEqual(self.pop_table([(BUF, 5, 0), (BUF + 0x100, 2, WRITE)], memory),
                         ([b"abc", b"de"], [2]))


# ----------------------------------------------------------------------------------------------
class HostileDriverTest(RingCase):
    """Rings written by hand with struct; each rule broken once.  The error names the slot and the
    value, the queue is broken, and every later pop and push says so."""

    def setUp(self):
        self.setup_ring(7, driver=False)

    def rejects(self, pattern: str, exc=VirtqueueError, device=None, call=None) -> None:
        device = device or self.device
        with self.assertRaisesRegex(exc, pattern):
            (call or device.pop_batch)()
        self.assert_broken(device)
        self.assert_broken(device, lambda: device.push(0, 0))

    def test_chain_longer_than_queue(self):
        for slot in range(7):                    # every slot available, NEXT for ever
            self.put(slot, BUF, 1, 0, AVAIL | NEXT)
        self.rejects(r"slot 6: the chain at slot 0 is longer than the queue size 7 \(NEXT is still set")

    def test_full_length_chain_is_fine(self):
        self.offer(3, *[(BUF, 1, 0)] * 7)
        (bid, readable, writable), = self.device.pop_batch()
        self.assertEqual((bid, len(readable), writable), (3, 7, []))

    def test_tail_not_available(self):
        self.put(1, BUF, 1, 0, 0)                 # never made available
        self.put(0, BUF, 1, 0, AVAIL | NEXT)
        self.rejects(r"slot 1: descriptor 1 of the chain at slot 0 is not available \(flags 0x0000\)")

    def test_indirect_inside_indirect(self):
        table = BUF + 0x1000
        self.put(0, BUF, 8, 0, 0, table=table)
        self.put(1, table, 16, 0, INDIRECT, table=table)
        self.offer(0, (table, 32, INDIRECT))
        self.rejects(r"slot 0: entry 1 of the indirect table at 0x41000 has INDIRECT set \(flags 0x0004\)")

    def test_indirect_with_next(self):
        self.put(1, BUF, 1, 0, AVAIL)
        self.put(0, BUF + 0x1000, 16, 0, AVAIL | INDIRECT | NEXT)
        self.rejects(r"slot 0: INDIRECT together with NEXT \(flags 0x0085\)")

    def test_indirect_in_a_next_chain(self):
        self.offer(0, (BUF, 1, 0), (BUF + 0x1000, 16, INDIRECT))
        self.rejects("slot 1: INDIRECT descriptor inside the NEXT chain at slot 0")

    def test_indirect_table_length_zero(self):
        self.offer(0, (BUF, 0, INDIRECT))
        self.rejects("slot 0: indirect table length 0 is not a non-zero multiple of 16")

    def test_indirect_table_length_24(self):
        self.offer(0, (BUF, 24, INDIRECT))
        self.rejects("slot 0: indirect table length 24 is not a non-zero multiple of 16")

    def test_indirect_table_outside_memory(self):
        self.offer(0, (MEM_SIZE - 16, 32, INDIRECT))
        self.rejects(r"slot 0: buffer 0xffff0\+0x20 is outside guest memory", GuestMemoryError)

    def test_indirect_not_negotiated(self):
        device = PackedDeviceQueue(self.memory, 7, self.lay["desc"], self.lay["driver"], self.lay["device"],
                                   indirect=False)
        self.offer(0, (BUF, 16, INDIRECT))
        self.rejects("slot 0: INDIRECT but VIRTIO_F_INDIRECT_DESC was not negotiated", device=device)

    def test_address_outside_memory(self):
        for addr, length in ((MEM_SIZE - 4, 8), (0xFFFF_FFFF_FFFF_0000, 0x1_0000), (MEM_SIZE, 1)):
            with self.subTest(addr=addr):
                self.setup_ring(7, driver=False)
                self.offer(0, (BUF, 1, 0), (addr, length, WRITE))
                self.rejects(f"slot 1: buffer {addr:#x}\\+{length:#x} is outside guest memory", GuestMemoryError)

    def test_lengths_summing_beyond_2_32(self):
        big = 0x1_2000_0000                        # a sparse memfd: only the touched pages exist
        self.setup_ring(7, memory=self.memory_with((0, big)), driver=False)
        self.offer(0, (0x1000_0000, 0x8000_0000, 0), (0x9000_0000, 0x8000_0000, WRITE))
        self.rejects(r"slot 0: the chain's lengths add up to 0x100000000, beyond 2\^32-1")

    def test_lengths_summing_beyond_2_32_in_an_indirect_table(self):
        table = BUF + 0x1000
        self.put(0, 0xAAAA_0000, 0xFFFF_FFFF, 0, 0, table=table)
        self.put(1, 0xBBBB_0000, 1, 0, WRITE, table=table)
        self.offer(0, (table, 32, INDIRECT))
        self.rejects("slot 0: the chain's lengths add up to 0x100000000", call=self.device.pop_descriptors)

    def test_readable_after_writable(self):
        self.offer(0, (BUF, 1, WRITE), (BUF, 1, 0))
        self.rejects(r"slot 1: device-readable descriptor after a writable one in the chain at slot 0 "
                     r"\(flags 0x0080\)")

    def test_lengths_summing_beyond_2_32_in_an_indirect_table_popped(self):
        big = 0x1_2000_0000                        # a sparse memfd: the fast path's region holds it all
        self.setup_ring(7, memory=self.memory_with((0, big)), driver=False)
        table = BUF + 0x1000
        self.put(0, 0x1000_0000, 0x8000_0000, 0, 0, table=table)
        self.put(1, 0x9000_0000, 0x8000_0000, 0, WRITE, table=table)
        self.offer(0, (table, 32, INDIRECT))
        self.rejects(r"slot 0: the chain's lengths add up to 0x100000000, beyond 2\^32-1")

    def test_readable_after_writable_in_an_indirect_table(self):
        table = BUF + 0x1000
        self.put(0, BUF, 1, 0, WRITE, table=table)
        self.put(1, BUF, 1, 0, 0, table=table)
        self.offer(0, (table, 32, INDIRECT))
        self.rejects("slot 0: entry 1 of the indirect table at 0x41000 is device-readable after a writable")

    def test_buffer_id_out_of_range(self):
        self.offer(7, (BUF, 1, 0))
        self.rejects("slot 0: buffer id 7 is not below the queue size 7")

    def test_buffer_id_in_the_last_descriptor_out_of_range(self):
        self.put(1, BUF, 1, 0xFFFF, AVAIL)
        self.put(0, BUF, 1, 0, AVAIL | NEXT)       # the head's id is ignored: the last one counts
        self.rejects("slot 1: buffer id 65535 is not below the queue size 7")

    def test_indirect_buffer_id_out_of_range(self):
        table = BUF + 0x1000
        self.put(0, BUF, 8, 0, 0, table=table)
        self.put(1, BUF, 1, 0, WRITE, table=table)
        self.offer(7, (table, 32, INDIRECT))
        self.rejects("slot 0: buffer id 7 is not below the queue size 7")

    def test_indirect_entry_outside_memory(self):
        table = BUF + 0x1000
        self.put(0, BUF, 8, 0, 0, table=table)
        self.put(1, MEM_SIZE - 4, 8, 0, WRITE, table=table)
        self.offer(0, (table, 32, INDIRECT))
        self.rejects(r"slot 0: buffer 0xffffc\+0x8 is outside guest memory", GuestMemoryError)

    def test_chain_id_made_available_again_while_in_flight(self):
        self.offer(2, (BUF, 1, 0), (BUF, 1, WRITE))
        self.device.pop_batch()
        self.offer(2, (BUF, 1, 0), (BUF, 1, WRITE))
        self.rejects("slot 3: buffer id 2 is made available again while still in flight")

    def test_buffer_id_made_available_again_while_in_flight(self):
        self.offer(2, (BUF, 1, 0))
        self.device.pop_batch()
        self.offer(2, (BUF, 1, 0))
        self.rejects("slot 1: buffer id 2 is made available again while still in flight")

    def test_ring_overrun(self):
        self.offer(0, *[(BUF, 1, 0)] * 7)          # all 7 slots in flight
        self.device.pop_batch()
        self.offer(1, (BUF, 1, 0))                 # slot 0 again, next lap, before any was used
        self.rejects(r"slot 0: the driver made 1 more descriptor\(s\) available while 7 of 7 slots are still "
                     r"in flight \(ring overrun\)")

    def test_push_of_an_id_not_in_flight(self):
        for bad in ([(2, 0)], [(0, 0), (0, 0)], [(1, 0), (-1, 0)], [(0, 0), (9, 0)]):
            with self.subTest(bad=bad):
                self.setUp()
                self.offer(0, (BUF, 1, 0))
                self.offer(1, (BUF, 1, 0))
                self.device.pop_batch()
                before = self.memory.read(self.lay["desc"], 16 * 7)
                with self.assertRaisesRegex(VirtqueueError, f"push: buffer id {bad[-1][0]} is not in flight"):
                    self.device.push_batch(bad)
                self.assertEqual(self.memory.read(self.lay["desc"], 16 * 7), before)     # ring untouched
                self.assertEqual(self.device.in_flight, 2)
                self.assertFalse(self.device.broken)   # the caller's bug, not the driver's (as split)
                self.device.push_batch([(0, 0), (1, 0)])
                self.assertEqual(self.device.in_flight, 0)

    def test_push_of_a_length_that_is_not_a_u32(self):
        self.offer(0, (BUF, 1, WRITE))
        self.offer(1, (BUF, 1, WRITE))
        self.device.pop_batch()
        before = self.memory.read(self.lay["desc"], 16 * 7)
        for bad, shown in ((1 << 32, "4294967296"), (-1, "-1"), (1.5, "1.5"), ("1", "'1'")):
            with self.subTest(bad=bad):
                with self.assertRaisesRegex(VirtqueueError, f"written length {shown} for buffer id 1 is not a u32"):
                    self.device.push_batch([(0, 1), (1, bad)])
                self.assertFalse(self.device.broken)   # the driver did nothing wrong; nothing was written
                self.assertEqual(self.memory.read(self.lay["desc"], 16 * 7), before)
                self.assertEqual(self.device.in_flight, 2)
        self.device.push_batch([(0, 1), (1, 1)])
        self.assertEqual(self.device.in_flight, 0)


class HostileDriverWarmTest(HostileDriverTest):
    """The same broken rings met by the fast paths (the region cache already filled): they must
    hand every one of them to the general walk."""

    WARM = True


class LyingDeviceTest(RingCase):
    def setUp(self):
        self.setup_ring(7)
        self.bid = self.driver.add([], [(BUF, 8)], token="x")
        self.driver.publish()

    def test_used_id_never_in_flight(self):
        self.put(0, 0, 0, 5, AVAIL | USED)
        with self.assertRaisesRegex(VirtqueueError, "slot 0: the device used buffer id 5, which is not in flight"):
            self.driver.reap()
        self.assert_broken(self.driver, self.driver.reap)
        self.assert_broken(self.driver, self.driver.publish)

    def test_used_id_out_of_range(self):
        self.put(0, 0, 0, 0xFFFF, AVAIL | USED)
        with self.assertRaisesRegex(VirtqueueError, "buffer id 65535, which is not in flight"):
            self.driver.reap()

    def test_used_id_twice(self):
        self.put(0, 0, 0, self.bid, AVAIL | USED)
        self.assertEqual(self.driver.reap(), [("x", 0)])
        self.put(1, 0, 0, self.bid, AVAIL | USED)
        with self.assertRaisesRegex(VirtqueueError, "slot 1: the device used buffer id 0, which is not in flight"):
            self.driver.reap()

    def test_used_len_beyond_writable_bytes(self):
        self.put(0, 0, 9, self.bid, AVAIL | USED | WRITE)
        with self.assertRaisesRegex(VirtqueueError, "wrote 9 bytes into buffer id 0, which offered 8"):
            self.driver.reap()

    def test_len_ignored_without_write_flag(self):
        self.put(0, 0, 9, self.bid, AVAIL | USED)        # spec: len is reserved without WRITE
        self.assertEqual(self.driver.reap(), [("x", 0)])

    def test_queue_full_and_bad_chains(self):
        for _ in range(6):
            self.driver.add([(BUF, 1)], [])
        with self.assertRaisesRegex(VirtqueueError, r"queue full: 2 descriptor\(s\) needed, 0 free"):
            self.driver.add([(BUF, 1)], [(BUF, 1)])
        with self.assertRaisesRegex(ValueError, "at least one element"):
            self.driver.add([], [])
        with self.assertRaisesRegex(VirtqueueError, "do not fit an indirect table of 8"):
            self.driver.add([(BUF, 1)] * 9, [], indirect=True)
        with self.assertRaisesRegex(ValueError, "does not fit a descriptor"):
            self.driver.add([(BUF, 1 << 32)], [])
        with self.assertRaisesRegex(ValueError, "more than 2\\^32-1"):
            self.driver.add([(BUF, 1 << 31), (BUF, 1 << 31)], [], indirect=True)


if __name__ == "__main__":
    unittest.main()
