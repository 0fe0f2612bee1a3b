"""Load and isolation in one back-end process, our front-end against our back-end (issue 10):

- ManyDevicesTest: one Server serving 16 BlkDevices with 4 queues each on 16 sockets; our front-end
  drives all 64 queues at once (every queue writes its own stripe of its disk, then reads it back),
  and every image holds exactly what was written to it.
- MemorySlotsTest: GET_MAX_MEM_SLOTS answers 509 (memory.MAX_MEM_SLOTS); the front-end adds regions
  up to that limit and removes them again, twice, while a queue keeps doing I/O on buffers in a
  region that stays and another does I/O through buffers in the regions that come and go. After
  REM_MEM_REG a request pointing into the removed region breaks its ring (error eventfd), never
  the process, and the other ring goes on. At the end the fds, the mappings of the regions and
  the process's mapping count are back where they started.

The real-peer proofs (QEMU guests, a disk whose I/O blocks) are in tests/peers/test_load_peers.py;
``python3 -m bench load`` measures the same shapes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
import unittest
from collections.abc import Iterator

from tests import support
from vhost_min.backend import Server
from vhost_min.blk import (VIRTIO_BLK_OUTHDR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, BlkClient, BlkDevice,
                           BlkRequest)
from vhost_min.errors import VhostError
from vhost_min.frontend import Frontend
from vhost_min.memory import MAX_MEM_SLOTS

TIMEOUT = 10.0
BLOCK = 4096


@contextlib.contextmanager
def serving(devices: list[tuple[BlkDevice, str]]) -> Iterator[Server]:
    """One Server for every (device, socket path), run in a thread until the block ends."""
    server = Server()
    stop = threading.Event()
    try:
        for device, path in devices:
            server.add(device, path)
        thread = threading.Thread(target=server.run, kwargs={"stop_event": stop}, daemon=True)
        thread.start()
        try:
            yield server
        finally:
            stop.set()
            server.stop()
            thread.join(10)
    finally:
        server.close()
        for device, _ in devices:
            device.close()


def drive(clients: list[BlkClient], requests: list[list]) -> list[dict]:
    """Keep every client's queue full with its own requests until all are done, one thread for all
    queues (what a guest's blk-mq does across CPUs). Returns each client's completions by tag."""
    pending = [list(r) for r in requests]
    done: list[dict] = [{} for _ in clients]
    while any(pending) or any(c.in_flight for c in clients):
        progress = False
        for i, client in enumerate(clients):
            if pending[i] and client.free_slots:
                pending[i] = pending[i][client.submit(pending[i]):]
            for c in client.complete(0):
                done[i][c.tag] = (c.status, None if c.data is None else bytes(c.data))
                progress = True
        if not progress:
            busy = next((c for c in clients if c.in_flight), None)
            if busy is not None:
                busy.frontend.wait_call(busy.queue_index, 0.005)
    return done


class ManyDevicesTest(unittest.TestCase):
    DEVICES, QUEUES, BLOCKS = 16, 4, 8          # 64 queues, 8 x 4 KiB per queue written and read

    def test_16_devices_with_4_queues_each_in_one_process(self) -> None:
        rng = support.seeded_random(self)
        fds_before = support.open_fds()
        stripe = self.BLOCKS * BLOCK
        with tempfile.TemporaryDirectory(prefix="vhost_min-load-") as work:
            images = [os.path.join(work, f"disk{d}.img") for d in range(self.DEVICES)]
            for path in images:
                with open(path, "wb") as f:
                    f.truncate(self.QUEUES * stripe + BLOCK)
            devices = [(BlkDevice(path, num_queues=self.QUEUES), os.path.join(work, f"blk{d}.sock"))
                       for d, path in enumerate(images)]
            expected = [[rng.randbytes(stripe) for _ in range(self.QUEUES)] for _ in range(self.DEVICES)]
            with serving(devices) as server, contextlib.ExitStack() as stack:
                clients = []
                for _, path in devices:
                    fe = stack.enter_context(Frontend.connect(path, timeout=TIMEOUT))
                    clients += [BlkClient(fe, queue_index=q, queue_size=16, depth=4, max_io=BLOCK, timeout=TIMEOUT)
                                for q in range(self.QUEUES)]
                self.assertEqual(len(server.backends), self.DEVICES)
                self.assertTrue(all(c.config.num_queues == self.QUEUES for c in clients))
                writes = [[_write(q * stripe + b * BLOCK, expected[d][q][b * BLOCK:(b + 1) * BLOCK])
                           for b in range(self.BLOCKS)] for d in range(self.DEVICES) for q in range(self.QUEUES)]
                for results in drive(clients, writes):
                    self.assertEqual(sorted(s for s, _ in results.values()), [VIRTIO_BLK_S_OK] * self.BLOCKS)
                reads = [[_read(q * stripe + b * BLOCK) for b in range(self.BLOCKS)]
                         for d in range(self.DEVICES) for q in range(self.QUEUES)]
                for i, results in enumerate(drive(clients, reads)):
                    d, q = divmod(i, self.QUEUES)
                    got = b"".join(results[("r", q * stripe + b * BLOCK)][1] for b in range(self.BLOCKS))
                    self.assertTrue(got == expected[d][q], f"device {d} queue {q} read back other bytes")
                # every one of the 64 rings was used by the back-end
                used = {(b.name, r.index): r.queue.used_idx for b in server.backends for r in b.rings[:self.QUEUES]}
                self.assertEqual(sorted(used.values()), [2 * self.BLOCKS] * (self.DEVICES * self.QUEUES))
                self.assertEqual(list(server.errors), [])
            for d, path in enumerate(images):
                with open(path, "rb") as f:
                    self.assertTrue(f.read() == b"".join(expected[d]) + bytes(BLOCK), f"image {d}")
        self.assertEqual(support.open_fds(), fds_before)


def _write(offset: int, data: bytes) -> BlkRequest:
    return BlkRequest.write(offset, data, tag=("w", offset))


def _read(offset: int) -> BlkRequest:
    return BlkRequest.read(offset, BLOCK, tag=("r", offset))


def region_mappings(name_prefix: str = "/memfd:vhost_min-guest-") -> int:
    """Mappings of the front-end's region memfds in this process (front-end and back-end both)."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if name_prefix in line)


def mapping_count() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


class MemorySlotsTest(unittest.TestCase):
    """509 slots added and removed while I/O runs (CONFIGURE_MEM_SLOTS: ADD_MEM_REG / REM_MEM_REG)."""

    ROUNDS = 2

    def test_slots_come_and_go_under_io(self) -> None:
        rng = support.seeded_random(self)
        fds_before, maps_before = support.open_fds(), mapping_count()
        with tempfile.TemporaryDirectory(prefix="vhost_min-slots-") as work:
            image = os.path.join(work, "disk.img")
            with open(image, "wb") as f:
                f.truncate(4 << 20)
            sock = os.path.join(work, "blk.sock")
            with serving([(BlkDevice(image, num_queues=2), sock)]) as server, \
                    Frontend.connect(sock, timeout=TIMEOUT) as fe:
                stable = BlkClient(fe, queue_index=0, queue_size=16, depth=4, max_io=BLOCK, timeout=TIMEOUT)
                self.assertEqual(fe.max_mem_slots, MAX_MEM_SLOTS)
                backend = server.backends[0]
                self.assertEqual(len(fe.regions), 1)
                # queue 1 is driven by hand: header and status in the stable region, data in the churned ones
                vq = fe.setup_queue(1, 16)
                header, status = fe.alloc(VIRTIO_BLK_OUTHDR.size), fe.alloc(1)
                expect = bytearray(4 << 20)

                def churn_request(type_: int, sector: int, gpa: int) -> int:
                    VIRTIO_BLK_OUTHDR.pack_into(fe.memory.view(header, VIRTIO_BLK_OUTHDR.size), 0, type_, 0, sector)
                    fe.memory.view(status, 1)[0] = 0xFF
                    data = [(gpa, BLOCK)]
                    vq.add([(header, VIRTIO_BLK_OUTHDR.size)] + (data if type_ == VIRTIO_BLK_T_OUT else []),
                           (data if type_ == VIRTIO_BLK_T_IN else []) + [(status, 1)], "churn")
                    fe.publish(1)
                    while not vq.reap():
                        self.assertTrue(fe.wait_call(1, TIMEOUT), "queue 1 request not completed")
                    return fe.memory.view(status, 1)[0]

                def stable_io(n: int) -> None:
                    offset = rng.randrange(0, 512) * BLOCK
                    data = rng.randbytes(BLOCK)
                    stable.write(offset, data)
                    expect[offset:offset + BLOCK] = data
                    self.assertEqual(stable.read(offset, BLOCK), data, f"stable I/O {n}")

                for round_ in range(self.ROUNDS):
                    added = []
                    while len(fe.regions) < MAX_MEM_SLOTS:
                        added.append(fe.add_memory_region(BLOCK))
                        if len(added) % 64 == 1:
                            # I/O through the region just added: write from it, read into the next one
                            region = added[-1]
                            sector = 1024 + len(added)
                            data = rng.randbytes(BLOCK)
                            fe.memory.write(region.gpa, data)
                            self.assertEqual(churn_request(VIRTIO_BLK_T_OUT, sector, region.gpa), VIRTIO_BLK_S_OK)
                            expect[sector * 512:sector * 512 + BLOCK] = data
                            stable_io(len(added))
                    self.assertEqual(len(backend.memory.regions), MAX_MEM_SLOTS)
                    with self.assertRaises(VhostError):            # one more than the back-end has
                        fe.add_memory_region(BLOCK)
                    self.assertEqual(len(backend.memory.regions), MAX_MEM_SLOTS)
                    # read back into the newest region: the bytes written from the first one
                    sector = 1024 + 1
                    self.assertEqual(churn_request(VIRTIO_BLK_T_IN, sector, added[-1].gpa), VIRTIO_BLK_S_OK)
                    self.assertTrue(fe.memory.read(added[-1].gpa, BLOCK) == expect[sector * 512:sector * 512 + BLOCK])
                    for n, region in enumerate(added):
                        fe.remove_memory_region(region.gpa)
                        if n % 64 == 0:
                            stable_io(n)
                    self.assertEqual(len(backend.memory.regions), 1, f"round {round_}")
                    # every removed region is unmapped on both sides at once (no view kept in a cache)
                    self.assertEqual(region_mappings(), 2, f"round {round_}")
                # A request into a removed region: its ring breaks (the error eventfd), nothing else does.
                gone = added[-1].gpa
                VIRTIO_BLK_OUTHDR.pack_into(fe.memory.view(header, VIRTIO_BLK_OUTHDR.size), 0, VIRTIO_BLK_T_IN, 0, 0)
                vq.add([(header, VIRTIO_BLK_OUTHDR.size)], [(gone, BLOCK), (status, 1)], "stale")
                fe.publish(1)
                with self.assertRaisesRegex(VhostError, "signalled an error"):
                    deadline = time.monotonic() + TIMEOUT
                    while time.monotonic() < deadline:     # a call left from the churn's I/O is not it
                        fe.wait_call(1, TIMEOUT)
                self.assertIn("outside", backend.rings[1].broken or "")
                stable_io(-1)
                self.assertEqual(region_mappings(), 2, "only the stable region, mapped by both sides")
                with open(image, "rb") as f:
                    self.assertTrue(f.read() == expect)
        del stable, vq                 # the driver side's views of the stable region
        self.assertEqual(region_mappings(), 0, open("/proc/self/maps").read())
        self.assertEqual(support.open_fds(), fds_before)
        self.assertLessEqual(mapping_count(), maps_before + 8)     # allocator arenas may stay


if __name__ == "__main__":
    unittest.main()


class ForcedAsyncTest(unittest.TestCase):
    """The io_uring engine with IOSQE_ASYNC (what BlkDevice uses on FUSE, whose files io_uring_enter
    would otherwise block on inline: tests/peers/test_load_peers.py) moves the same bytes."""

    def test_forced_async_reads_and_writes(self) -> None:
        from vhost_min import aio, blk
        if not aio.io_uring_available()[0]:
            self.skipTest(f"io_uring refused here: {aio.io_uring_available()[1]}")
        with tempfile.TemporaryFile() as f:
            self.assertNotIn(blk._fs_type(f.fileno()), (None, blk.FUSE_SUPER_MAGIC))
            data = bytearray(os.urandom(3 * BLOCK))     # io_uring needs addresses: writable buffers
            engine = aio.UringEngine(8, force_async=True)
            try:
                engine.submit(aio.OP_WRITE, f.fileno(), 0, [memoryview(data)], 0, "w")
                engine.commit()
                self.assertEqual(engine.drain(), [("w", len(data))])
                back = bytearray(len(data))
                engine.submit(aio.OP_READ, f.fileno(), 0, [memoryview(back)[:BLOCK], memoryview(back)[BLOCK:]], 0, "r")
                engine.commit()
                self.assertEqual(engine.drain(), [("r", len(data))])
                self.assertEqual(bytes(back), data)
            finally:
                engine.close()
