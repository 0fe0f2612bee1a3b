"""Live migration, unit tier (our front-end against our blk back-end): the dirty log checked
against the guest memory the back-end really changed (split and packed, guest-physical and behind
an IOTLB with IOVA != GPA), the blk device state (DEVICE_STATE), and a running blk back-end moved
to a second back-end process mid-stream, losing and repeating nothing."""

from __future__ import annotations

import errno
import io
import os
import select
import tempfile
import time
import unittest

from tests import support
from tests.peers.launch import vhost_min_blk
from tests.unit.test_blk import ServedImageCase
from vhost_min import blk
from vhost_min.blk import BLK_DRIVER_FEATURES, BLK_STATE, VIRTIO_BLK_CONFIG_OFFSETS, BlkClient, BlkRequest
from vhost_min.errors import VhostError
from vhost_min.frontend import FRONTEND_FEATURES, Frontend
from vhost_min.memory import VHOST_ACCESS_RW, VHOST_LOG_PAGE, GuestMemory
from vhost_min.packed import PackedDriverQueue, decode_base
from vhost_min.user import VHOST_IOTLB_UPDATE, IotlbMsg, VringAddr
from vhost_min.virtio import VHOST_VRING_F_LOG
from vhost_min.virtio import VirtioFeature
from vhost_min.vring import SplitDriverQueue

PACKED = VirtioFeature.VIRTIO_F_RING_PACKED
ACCESS_PLATFORM = VirtioFeature.VIRTIO_F_ACCESS_PLATFORM
#: Behind the IOMMU the driver sees guest memory here: IOVA = GPA + IOVA_BASE.
IOVA_BASE = 0x7_0000_0000
IOTLB_ENTRY = 0x10000               # one IOTLB entry per 64 KiB, as a vIOMMU maps in pieces
TIMEOUT = 10.0


def pages_of(address: int, length: int) -> set[int]:
    return set(range(address // VHOST_LOG_PAGE, (address + length - 1) // VHOST_LOG_PAGE + 1))


class IovaDriver:
    """The driver behind an IOMMU: the front-end's guest memory seen at IOVA = GPA + IOVA_BASE,
    IOTLB entries for all of it, and rings laid out and programmed in IOVAs. It offers the part
    of Frontend a BlkClient uses (alloc, memory, setup_queue, publish, wait_call) plus stop and
    resume, and hands everything else to the front-end."""

    def __init__(self, fe: Frontend, logging: bool) -> None:
        self.fe, self.logging = fe, logging
        self.memory = GuestMemory()
        for region in fe.regions:
            self.memory.add_region(region.gpa + IOVA_BASE, region.size, buffer=region.mapping)
            for at in range(0, region.size, IOTLB_ENTRY):
                fe.iotlb_msg(IotlbMsg(region.gpa + IOVA_BASE + at, min(IOTLB_ENTRY, region.size - at),
                                      region.uva + at, VHOST_ACCESS_RW, VHOST_IOTLB_UPDATE))
        self.rings: dict[int, list] = {}        # index -> [queue, size, kick, call, base]

    def __getattr__(self, name: str):
        return getattr(self.fe, name)

    def close(self) -> None:
        for ring in self.rings.values():
            os.close(ring[2])
            os.close(ring[3])
        self.memory.clear()

    def alloc(self, size: int, align: int = 16) -> int:
        return self.fe.alloc(size, align) + IOVA_BASE

    def setup_queue(self, index: int, size: int, *, packed: bool, indirect_max: int = 0):
        cls = PackedDriverQueue if packed else SplitDriverQueue
        area = self.alloc(cls.layout(size, 0, indirect_max)["end"], 64)
        parts = cls.layout(size, area, indirect_max)
        queue = cls(self.memory, size, parts["desc"], parts["driver"], parts["device"],
                    event_idx=bool(self.fe.features & VirtioFeature.VIRTIO_F_EVENT_IDX),
                    indirect_area=parts["indirect"], indirect_max=indirect_max)
        self.rings[index] = [queue, size, os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
                             os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK), queue.get_base(), parts]
        self._program(index)
        return queue

    def _program(self, index: int) -> None:
        queue, size, kick, call, base, parts = self.rings[index]
        fe = self.fe
        fe.set_vring_num(index, size)
        fe.set_vring_base(index, base)
        # log_guest_addr is the used ring's (packed: the descriptor ring's) IOVA, as QEMU sends it
        log = parts["desc"] if isinstance(queue, PackedDriverQueue) else parts["device"]
        fe.set_vring_addr(VringAddr(index, VHOST_VRING_F_LOG if self.logging else 0, parts["desc"],
                                    parts["device"], parts["driver"], log))
        fe.set_vring_call(index, call)
        fe.set_vring_kick(index, kick)
        fe.set_vring_enable(index, True)

    def publish(self, index: int) -> bool:
        if self.rings[index][0].publish():
            os.eventfd_write(self.rings[index][2], 1)
            return True
        return False

    def wait_call(self, index: int, timeout: float | None = None) -> bool:
        call = self.rings[index][3]
        if not select.select([call], [], [], TIMEOUT if timeout is None else timeout)[0]:
            return False
        os.eventfd_read(call)
        return True

    def stop(self) -> dict[int, int]:
        for index, ring in self.rings.items():
            ring[4] = self.fe.get_vring_base(index).num
        return {index: ring[4] for index, ring in self.rings.items()}

    def resume(self) -> None:
        for index, ring in self.rings.items():
            self._program(index)
            os.eventfd_write(ring[2], 1)


class DirtyLogTest(ServedImageCase):
    """Every guest page the blk back-end changes while logging is on is marked in the log: round
    after round the rings are stopped, requests placed, guest memory copied, the log cleared,
    the rings let run until the device has used everything, and the copies compared."""

    SECTORS = 2048                              # 1 MiB of random bytes

    def run_rounds(self, packed: bool, iommu: bool) -> None:
        device = blk.BlkDevice(self.path, serial="dirty-log-disk", num_queues=2)
        self.serve(device)
        fe = Frontend.connect(self.socket, timeout=TIMEOUT)
        self.addCleanup(fe.close)
        fe.negotiate(FRONTEND_FEATURES | BLK_DRIVER_FEATURES | (PACKED if packed else 0)
                     | (ACCESS_PLATFORM if iommu else 0))
        self.assertEqual(bool(fe.features & PACKED), packed)
        self.assertEqual(bool(fe.features & ACCESS_PLATFORM), iommu)
        fe.setup_memory(1 << 20, regions=2)
        dirty = fe.start_dirty_log()
        driver = fe
        if iommu:
            driver = IovaDriver(fe, logging=True)
            self.addCleanup(driver.close)
        offset = IOVA_BASE if iommu else 0      # driver address - guest-physical address
        clients = [BlkClient(driver, queue_index=q, queue_size=64, depth=12, max_io=16 << 10, indirect=iommu)
                   for q in range(2)]
        if iommu:
            self.assertGreater(len(fe.regions), 1)
        rng = self.rng
        for round_ in range(6):
            bases = driver.stop()
            sent: list[list[BlkRequest]] = []
            for q, client in enumerate(clients):
                requests = [BlkRequest.get_id(tag=("id",)),
                            BlkRequest.read(self.SECTORS * 512, 512, tag=("past the end",))]
                half = self.SECTORS // 2            # reads in the first half, writes in the second
                for i in range(8):
                    at = rng.randrange(half - 32) * 512
                    if i % 3 == 2:
                        at += half * 512
                        requests.append(BlkRequest.write(at, rng.randbytes(4096), tag=("write", at)))
                    else:
                        requests.append(BlkRequest.read(at, rng.randrange(1, 33) * 512, tag=("read", at)))
                self.assertEqual(client.submit(requests), len(requests))
                sent.append(requests)
            before = [bytes(region.mapping) for region in fe.regions]
            dirty.view[:] = bytes(len(dirty.view))
            self.run_until_used(driver, clients, packed, bases, [len(r) for r in sent])
            changed: set[int] = set()
            for region, old in zip(fe.regions, before):
                new = region.mapping
                for page in range(0, region.size, VHOST_LOG_PAGE):
                    if new[page:page + VHOST_LOG_PAGE] != old[page:page + VHOST_LOG_PAGE]:
                        changed.add((region.gpa + page) // VHOST_LOG_PAGE)
            marked = {page for page in range(len(dirty.view) * 8) if dirty.is_dirty(page * VHOST_LOG_PAGE)}
            with self.subTest(round=round_):
                self.assertFalse(changed - marked, f"pages the back-end changed but did not log: "
                                 f"{sorted(changed - marked)}")
                # ...and it did change what it had to: the used ring (split: used.idx and elements;
                # packed: the descriptor slots it wrote back)
                for client in clients:
                    queue = client.queue
                    ring = queue.desc_addr if packed else queue.used_addr
                    self.assertIn((ring - offset) // VHOST_LOG_PAGE, changed & marked)
            for client, requests in zip(clients, sent):
                done = client.complete(len(requests), TIMEOUT)
                self.assertEqual(len(done), len(requests))
                for c in done:
                    if c.tag[0] == "read":
                        self.assertEqual(bytes(c.data), self.disk(c.tag[1], len(c.data)))
                    elif c.tag[0] == "id":
                        self.assertEqual(bytes(c.data).rstrip(b"\0"), b"dirty-log-disk")
                    expect = blk.VIRTIO_BLK_S_IOERR if c.tag[0] == "past the end" else blk.VIRTIO_BLK_S_OK
                    self.assertEqual(c.status, expect, c.tag)

    def run_until_used(self, driver, clients, packed: bool, bases: dict[int, int], counts: list[int]) -> None:
        """Let the device run until it has used every chain placed, then stop it again (GET_VRING_BASE
        waits for what it holds), so nothing changes while memory is compared. Only read-only
        looks at the ring meanwhile: the driver's own writes would blur the comparison."""
        if packed:
            want = {q: decode_base(c.queue.get_base())[:2] for q, c in enumerate(clients)}
        else:
            want = {q: (bases[q] + n) & 0xFFFF for q, n in enumerate(counts)}
        deadline = time.monotonic() + TIMEOUT
        while True:
            driver.resume()
            driver.wait_call(0, 0.05)
            now = driver.stop()
            got = {q: decode_base(b)[:2] if packed else b for q, b in now.items()}
            if got == want:
                return
            self.assertLess(time.monotonic(), deadline, f"the device used {got}, not {want}")

    def test_split(self):
        self.run_rounds(packed=False, iommu=False)

    def test_packed(self):
        self.run_rounds(packed=True, iommu=False)

    def test_split_behind_an_iotlb_logs_guest_physical_pages(self):
        self.run_rounds(packed=False, iommu=True)

    def test_packed_behind_an_iotlb_logs_guest_physical_pages(self):
        self.run_rounds(packed=True, iommu=True)


class DeviceStateTest(ServedImageCase):
    """The blk device state (BLK_STATE): what it carries, and the precise refusal of a blob
    that is not one this device can take (nothing of it applied)."""

    def saved(self, device: blk.BlkDevice) -> bytes:
        out = io.BytesIO()
        device.save_state(out)
        return out.getvalue()

    def test_layout_golden(self):
        with blk.BlkDevice(self.path, num_queues=3) as device:
            device.image.writeback = False
            self.assertEqual(self.saved(device),
                             b"VMINBLK\0" + bytes.fromhex("0100" "0000" "00020000" "4000000000000000" "0300" "0000"))
            device.image.writeback = True
            self.assertEqual(self.saved(device)[10:12], b"\x01\x00")
        self.assertEqual(BLK_STATE.size, 28)

    def test_the_cache_mode_travels_and_outlives_set_features(self):
        with blk.BlkDevice(self.path) as source, blk.BlkDevice(self.path) as destination:
            source.image.writeback = False
            destination.load_state(io.BytesIO(self.saved(source)))
            self.assertFalse(destination.image.writeback)
            destination.features_set(int(blk.VIRTIO_BLK_F_FLUSH))    # QEMU negotiates after loading
            self.assertFalse(destination.image.writeback)
            self.assertEqual(destination.get_config(VIRTIO_BLK_CONFIG_OFFSETS["wce"], 1), b"\0")
            destination.set_config(VIRTIO_BLK_CONFIG_OFFSETS["wce"], b"\1", 0)   # the driver's newer choice
            destination.features_set(int(blk.VIRTIO_BLK_F_FLUSH))
            self.assertTrue(destination.image.writeback)
            destination.features_set(0)                    # no FLUSH: writes must be stable at completion
            self.assertFalse(destination.image.writeback)
            destination.reset()                            # a reset forgets it
            destination.features_set(int(blk.VIRTIO_BLK_F_FLUSH))
            self.assertTrue(destination.image.writeback)

    def test_bad_blobs_are_refused_precisely(self):
        other = self.path + ".other"
        with open(other, "wb") as f:
            f.truncate(2 * self.SECTORS * 512)
        self.addCleanup(os.unlink, other)
        with blk.BlkDevice(self.path) as device, blk.BlkDevice(other) as bigger, \
                blk.BlkDevice(self.path, read_only=True) as read_only:
            device.image.writeback = False
            good = self.saved(device)
            cases = [
                (b"", "is empty"),
                (good[:5], "not a vhost_min virtio-blk device state"),
                (b"QEMU-VM\0" + good[8:], "starts with b'QEMU-VM"),
                (good[:9], "ends inside its header"),
                (good[:8] + b"\x02\x00" + good[10:], "version 2: this back-end reads version 1"),
                (good[:-1], "is 28 bytes, not 27"),
                (good + b"\0", "is 28 bytes, not more"),
                (good[:10] + b"\x04\x00" + good[12:], "unknown flags 0x4"),
                (good[:-2] + b"\x01\x00", "non-zero reserved field 0x1"),
            ]
            for blob, message in cases:
                with self.subTest(blob=blob), self.assertRaisesRegex(blk.BlkStateError, message) as caught:
                    bigger.load_state(io.BytesIO(blob))
                self.assertEqual(caught.exception.errno,
                                 errno.EPROTONOSUPPORT if "version 2" in message else errno.EINVAL)
                self.assertTrue(bigger.image.writeback)         # nothing applied
            with self.assertRaisesRegex(blk.BlkStateError, r"another disk .*capacity \(sectors\) 128 here, 64"):
                bigger.load_state(io.BytesIO(good))
            with self.assertRaisesRegex(blk.BlkStateError, "read-only True here, False in the state"):
                read_only.load_state(io.BytesIO(good))
            self.assertTrue(bigger.image.writeback)

    def test_through_the_front_end(self):
        """SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE over the socket: saved, loaded, and a bad
        blob answered with the errno (the back-end stays usable)."""
        device = blk.BlkDevice(self.path)
        self.serve(device)
        fe, client = self.connect()
        self.assertTrue(fe.protocol_features & blk.ProtocolFeature.DEVICE_STATE)
        client.set_writeback(False)
        fe.stop()
        state = fe.save_device_state()
        self.assertEqual(state[:8], b"VMINBLK\0")
        refused = r"CHECK_DEVICE_STATE: the back-end answered 0x16 \(Invalid argument\)"
        with self.assertRaisesRegex(VhostError, refused), \
                self.assertLogs("vhost_min.backend", "WARNING") as logs:
            fe.load_device_state(b"VMINBLK\0" + b"\1\0" + bytes(10))
        self.assertIn("BlkStateError: virtio-blk device state version 1 is 28 bytes, not 20", logs.output[0])
        device.image.writeback = True
        fe.load_device_state(state)
        self.assertFalse(device.image.writeback)
        fe.resume()
        client.write(0, b"after" * 512)
        self.assertEqual(self.disk(0, 2560), b"after" * 512)
        self.assertEqual(fe.get_config(VIRTIO_BLK_CONFIG_OFFSETS["wce"], 1), b"\0")


    def test_a_failed_move_leaves_the_source_running(self):
        device = blk.BlkDevice(self.path)
        self.serve(device)
        fe, client = self.connect()
        client.set_writeback(False)
        client.write(0, b"before" * 512)
        with self.assertRaises(VhostError) as caught:
            fe.migrate(os.path.join(self.work, "nobody-listens.sock"), timeout=0.2)
        self.assertEqual(caught.exception.errno, errno.ENOENT)
        self.assertEqual(fe.path, self.socket)
        client.write(4096, b"after" * 512)                  # the source was resumed
        self.assertEqual(self.disk(4096, 2560), b"after" * 512)
        self.assertFalse(device.image.writeback)


BLOCK = 4096


class _Stream:
    """One queue's share of a write/read stream: 4 KiB blocks of its own, each written again
    and again with a new version, and read; never two requests on one block in flight, so the
    last write submitted is what the image must hold and a read returns the version last
    completed. Counts every completion by tag."""

    def __init__(self, client: BlkClient, blocks: range, rng, expected: dict[int, bytes]) -> None:
        self.client, self.blocks, self.rng, self.expected = client, blocks, rng, expected
        self.busy: set[int] = set()
        self.seq = 0
        self.submitted: set[int] = set()
        self.completed: list[int] = []
        self.problems: list[str] = []

    def fill(self, limit: int = 1 << 30) -> int:
        requests = []
        while len(requests) < min(limit, self.client.free_slots):
            block = self.rng.choice([b for b in self.blocks if b not in self.busy])
            self.seq += 1
            self.busy.add(block)
            if self.rng.random() < 0.6:
                data = b"%6d:%6d:" % (block, self.seq) + self.rng.randbytes(BLOCK - 14)
                requests.append(BlkRequest.write(block * BLOCK, data, tag=(self.seq, "write", block, data)))
            else:
                requests.append(BlkRequest.read(block * BLOCK, BLOCK,
                                                tag=(self.seq, "read", block, self.expected[block])))
            self.submitted.add(self.seq)
        self.client.submit(requests)
        return len(requests)

    def reap(self, at_least: int = 0) -> int:
        done = self.client.complete(at_least, TIMEOUT)
        for c in done:
            seq, kind, block, data = c.tag
            self.completed.append(seq)
            self.busy.discard(block)
            if c.status != blk.VIRTIO_BLK_S_OK:
                self.problems.append(f"{kind} #{seq} of block {block}: status {c.status}")
            elif kind == "write":
                self.expected[block] = data
            elif bytes(c.data) != data:
                self.problems.append(f"read #{seq} of block {block} returned {bytes(c.data[:14])!r}, "
                                     f"not {data[:14]!r}")
        return len(done)


class MoveToAnotherProcessTest(unittest.TestCase):
    """A running blk back-end (process A, asynchronous I/O on a thread pool) moved mid-stream to
    a second back-end process B on the same image with Frontend.migrate: requests in flight on
    both queues at the switch, more placed while the rings are stopped; afterwards every request
    completed exactly once, every read saw the last completed write, the image holds the last
    write of every block, and B kept the cache mode the driver had chosen on A."""

    def move(self, packed: bool) -> None:
        rng = support.seeded_random(self)
        work = self.enterContext(tempfile.TemporaryDirectory(prefix="vhost_min-migration-"))
        image = os.path.join(work, "disk.img")
        blocks = 64
        initial = rng.randbytes(blocks * BLOCK)
        with open(image, "wb") as f:
            f.write(initial)
        expected = {b: initial[b * BLOCK:(b + 1) * BLOCK] for b in range(blocks)}
        source = self.enterContext(vhost_min_blk(image, 2, ["--aio", "threads"]))
        destination = self.enterContext(vhost_min_blk(image, 2))
        fe = self.enterContext(Frontend.connect(source.socket, timeout=TIMEOUT))
        clients = [BlkClient(fe, queue_index=q, queue_size=64, max_io=16 << 10, packed=packed) for q in range(2)]
        clients[0].set_writeback(False)
        streams = [_Stream(c, range(q * blocks // 2, (q + 1) * blocks // 2), rng, expected)
                   for q, c in enumerate(clients)]
        for _ in range(30):                                    # A at work
            for s in streams:
                s.fill()
                s.reap(1)
        for s in streams:
            s.fill()                                           # a full window in flight...
        fe.stop()                                              # ...A stopped (GET_VRING_BASE)...
        for s in streams:
            s.reap(0)
            s.fill()                                           # ...and more that only B can see
            self.assertGreater(s.client.in_flight, 0)
        fe.migrate(destination.socket)
        self.assertEqual(fe.path, destination.socket)
        self.assertEqual(fe.get_config(VIRTIO_BLK_CONFIG_OFFSETS["wce"], 1), b"\0")    # wce survived
        for _ in range(30):                                    # B at work
            for s in streams:
                s.reap(1)
                s.fill()
        for s in streams:
            while s.client.in_flight:
                s.reap(1)
        for s in streams:
            self.assertEqual(s.problems, [])
            self.assertEqual(sorted(s.completed), sorted(s.submitted))          # each exactly once
            self.assertGreater(len(s.completed), 200)
        with open(image, "rb") as f:
            on_disk = f.read()
        for block in range(blocks):
            self.assertTrue(on_disk[block * BLOCK:(block + 1) * BLOCK] == expected[block],
                            f"block {block} holds {on_disk[block * BLOCK:block * BLOCK + 14]!r}, not "
                            f"{expected[block][:14]!r}")
        fe.close()
        source.check_alive()                                   # A survived losing its front-end
        destination.check_alive()

    def test_split(self):
        self.move(packed=False)

    def test_packed(self):
        self.move(packed=True)

