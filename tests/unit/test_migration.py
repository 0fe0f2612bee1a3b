"""Live migration, unit tier (our front-end against our blk back-end): the dirty log checked
against the guest memory the back-end really changed (split and packed, guest-physical and behind
an IOTLB with IOVA != GPA), the blk device state (DEVICE_STATE), and a running blk back-end moved
to a second back-end process mid-stream, losing and repeating nothing."""

from __future__ import annotations

import errno
import io
import os
import select
import time
import unittest

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
