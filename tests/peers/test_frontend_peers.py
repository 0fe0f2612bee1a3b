"""Our front-end against real back-ends: vhost_min.frontend.Frontend and vhost_min.blk.BlkClient
driving qemu-storage-daemon's vhost-user-blk export, and Frontend driving QEMU 7.2's C virtiofsd.

What a user would check: the bytes written through our virtqueues are in the image file on disk
(read with os.pread, after a flush), the bytes already on disk come back through our queues, a
file in virtiofsd's shared directory is found and read through FUSE requests in our guest memory.
Every message our front-end sends passes through a WireTap (launch.py), which records what really
crossed the socket, so assertions about the protocol (ADD_MEM_REG rather than SET_MEM_TABLE, the
features acked) are about the wire, not about our own bookkeeping.

Peer facts these tests rely on (QEMU 7.2's libvhost-user): no packed rings, CONFIGURE_MEM_SLOTS
with 32 slots, a spurious call on every SET_VRING_CALL, qsd answers GET_ID with "vhost_user_blk".
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import subprocess
import sys
import time
import unittest
from collections.abc import Iterator

from tests import support
from tests.peers import launch
from tests.peers.test_wire_peers import PeerTestCase as _WirePeerTestCase, report
from vhost_min.blk import (BLK_DRIVER_FEATURES, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
                           VIRTIO_BLK_F_WRITE_ZEROES, BlkClient, BlkConfig, BlkRequest, VirtioBlkFeature)
from vhost_min.errors import VhostError
from vhost_min.frontend import FRONTEND_FEATURES, PROBE_PROTOCOL_FEATURES, Frontend
from vhost_min.user import FrontendRequest, MemoryRegion, ProtocolFeature
from vhost_min.virtio import (VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC,
                              VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                              VIRTQ_DESC_F_WRITE, DeviceStatus)

F = FrontendRequest
P = ProtocolFeature

TIMEOUT = 10.0                  # any one request, and any wait for a completion
MiB = 1 << 20

#: The requests that hand guest memory to a back-end.
MEMORY_REQUESTS = {"SET_MEM_TABLE", "ADD_MEM_REG", "REM_MEM_REG"}


class PeerTestCase(_WirePeerTestCase):
    """A private temporary directory; afterwards no fd of ours and no process of ours left."""

    def assertNothingLeft(self) -> None:
        self.assertNoFdLeak()
        self.assertEqual(launch.child_processes(), [], "processes this test started are still running")


def acked(tap: launch.WireTap, session: int = 0) -> int:
    """The virtio features our front-end acked on the wire (its last SET_FEATURES of ``session``)."""
    return [m for m in tap.requests(session) if m.request == F.SET_FEATURES][-1].u64()


class StorageDaemonBlkTest(PeerTestCase):
    """BlkClient -> qemu-storage-daemon's vhost-user-blk export, bytes checked on disk."""

    IMAGE_SIZE = 8 * MiB

    def setUp(self):
        super().setUp()
        self.rng = support.seeded_random(self)
        self.image = os.path.join(self.tmp, "disk.img")
        # A random first MiB on disk before qsd starts: reads must bring it back, not zeros.
        self.background = self.rng.randbytes(MiB)
        with open(self.image, "wb") as f:
            f.write(self.background)
            f.truncate(self.IMAGE_SIZE)

    def on_disk(self, offset: int, length: int) -> bytes:
        fd = os.open(self.image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def frontend(self, qsd: launch.Peer) -> Iterator[tuple[launch.WireTap, Frontend]]:
        """A Frontend connected to ``qsd`` through a wire tap."""
        with launch.WireTap(os.path.join(self.tmp, "tap.sock"), qsd.socket) as tap:
            with Frontend.connect(tap.path, timeout=TIMEOUT) as fe:
                yield tap, fe
            self.assertEqual(tap.errors, [])

    def check_memory_by_add_mem_reg(self, tap: launch.WireTap, fe: Frontend, session: int = 0) -> None:
        """CONFIGURE_MEM_SLOTS negotiated, so every region went as one ADD_MEM_REG (with its memfd,
        acked 0), and SET_MEM_TABLE was never sent."""
        self.assertTrue(fe.protocol_features & P.CONFIGURE_MEM_SLOTS, fe.protocol_features)
        self.assertEqual(fe.max_mem_slots, 32)
        sent = [m for m in tap.requests(session) if m.name in MEMORY_REQUESTS]
        self.assertEqual([m.name for m in sent], ["ADD_MEM_REG"] * len(fe.regions))
        for message, region in zip(sent, fe.regions):
            self.assertEqual(MemoryRegion.unpack_single(message.payload), region.wire)
            self.assertEqual(len(message.fd_targets), 1)
            self.assertTrue(message.fd_targets[0].startswith("/memfd:vhost_min-guest"), message.fd_targets)
            ack = tap.reply_to(message)                    # REPLY_ACK: qsd mapped it
            self.assertIsNotNone(ack, "ADD_MEM_REG was not acked")
            self.assertEqual(ack.u64(), 0)

    # -- the tests -------------------------------------------------------------------------------
    def test_split_ring_write_read_flush_the_bytes_are_on_disk(self):
        with launch.storage_daemon(self.image) as qsd, self.frontend(qsd) as (tap, fe):
            blk = BlkClient(fe, timeout=TIMEOUT)
            self.assertEqual(blk.capacity, self.IMAGE_SIZE // 512)
            self.assertEqual(blk.get_id(), "vhost_user_blk")

            # What is on disk comes up through the queue.
            self.assertEqual(blk.read(0, MiB), self.background)

            # What goes down the queue lands in the file: 300 KiB (three requests of at most
            # max_io), and one sector at the very end of the disk.
            pattern = self.rng.randbytes(300 << 10)
            last = self.rng.randbytes(512)
            blk.write(3 * MiB + 4096, pattern)
            blk.write(self.IMAGE_SIZE - 512, last)
            self.assertEqual(blk.read(3 * MiB + 4096, len(pattern)), pattern)
            blk.flush()
            self.assertEqual(self.on_disk(3 * MiB + 4096, len(pattern)), pattern)
            self.assertEqual(self.on_disk(self.IMAGE_SIZE - 512, 512), last)
            self.assertEqual(self.on_disk(0, MiB), self.background)     # nothing else touched

            # The protocol as it crossed the wire.
            self.check_memory_by_add_mem_reg(tap, fe)
            wanted = FRONTEND_FEATURES & ~VIRTIO_F_RING_PACKED | BLK_DRIVER_FEATURES
            self.assertEqual(acked(tap), fe.offered_features & wanted)
            for bit in (VIRTIO_F_VERSION_1, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VHOST_USER_F_PROTOCOL_FEATURES,
                        VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES):
                self.assertTrue(acked(tap) & bit, f"{bit:#x} not acked: {acked(tap):#x}")
            self.assertFalse(acked(tap) & VIRTIO_F_RING_PACKED)
            names = tap.names()
            self.assertEqual(names[:2], ["GET_FEATURES", "GET_FEATURES"])    # connect()'s check, negotiate()
            for request in ("SET_OWNER", "SET_PROTOCOL_FEATURES", "GET_MAX_MEM_SLOTS", "SET_BACKEND_REQ_FD",
                            "GET_CONFIG", "SET_VRING_NUM", "SET_VRING_ADDR", "SET_VRING_KICK", "SET_VRING_ENABLE"):
                self.assertIn(request, names)
            report(self, "requests on the wire", " ".join(names))
        self.assertNothingLeft()

    def test_two_queues_io_on_both(self):
        with launch.storage_daemon(self.image, num_queues=2) as qsd, self.frontend(qsd) as (tap, fe):
            q0 = BlkClient(fe, queue_index=0, timeout=TIMEOUT)
            q1 = BlkClient(fe, queue_index=1, timeout=TIMEOUT)
            self.assertTrue(fe.features & VIRTIO_BLK_F_MQ)
            self.assertEqual((fe.num_queues, q0.config.num_queues), (2, 2))
            a, b = self.rng.randbytes(64 << 10), self.rng.randbytes(64 << 10)
            # Both queues busy at once: submit on each, then complete each.
            self.assertEqual(q0.submit([BlkRequest.write(2 * MiB, a, tag="a")]), 1)
            self.assertEqual(q1.submit([BlkRequest.write(5 * MiB, b, tag="b")]), 1)
            done = q0.complete(1, TIMEOUT) + q1.complete(1, TIMEOUT)
            self.assertEqual(sorted((c.tag, c.status) for c in done), [("a", 0), ("b", 0)])
            # Each queue reads what the other wrote.
            self.assertEqual(q1.read(2 * MiB, len(a)), a)
            self.assertEqual(q0.read(5 * MiB, len(b)), b)
            q1.flush()
            self.assertEqual(self.on_disk(2 * MiB, len(a)), a)
            self.assertEqual(self.on_disk(5 * MiB, len(b)), b)
            # qsd used chains on both rings (their used indices moved).
            self.assertGreaterEqual(q0.queue.get_base(), 2)
            self.assertGreaterEqual(q1.queue.get_base(), 3)
            kicks = [m for m in tap.requests() if m.request == F.SET_VRING_KICK]
            self.assertEqual(len(kicks), 2)
            self.check_memory_by_add_mem_reg(tap, fe)
        self.assertNothingLeft()

    def test_indirect_descriptors_with_many_requests_in_flight(self):
        with launch.storage_daemon(self.image) as qsd, self.frontend(qsd) as (tap, fe):
            blk = BlkClient(fe, indirect=True, queue_size=64, max_io=16 << 10, timeout=TIMEOUT)
            self.assertTrue(acked(tap) & VIRTIO_F_INDIRECT_DESC)
            self.assertEqual(blk.depth, 64)                 # one ring slot per request
            chunks = [self.rng.randbytes(16 << 10) for _ in range(64)]
            placed = blk.submit(BlkRequest.write(4 * MiB + i * (16 << 10), data, tag=i)
                                for i, data in enumerate(chunks))
            self.assertEqual(placed, 64)
            done = []
            while len(done) < 64:
                done += blk.complete(1, TIMEOUT)
            self.assertEqual(sorted(c.tag for c in done), list(range(64)))
            self.assertTrue(all(c.status == 0 for c in done), done)
            # Every ring slot qsd saw was one indirect descriptor pointing to a 3-entry table:
            # header (readable) -> 16 KiB of data (readable) -> status byte (writable).
            ring = fe.memory.read(blk.queue.desc_addr, 64 * 16)
            for slot in range(64):
                addr, length, flags, _next = struct.unpack_from("<QIHH", ring, slot * 16)
                self.assertEqual((flags, length), (VIRTQ_DESC_F_INDIRECT, 3 * 16), f"descriptor {slot}")
                table = [struct.unpack_from("<QIHH", fe.memory.read(addr, 48), i * 16) for i in range(3)]
                self.assertEqual([(d[1], d[2], d[3]) for d in table], [
                    (16, VIRTQ_DESC_F_NEXT, 1), (16 << 10, VIRTQ_DESC_F_NEXT, 2), (1, VIRTQ_DESC_F_WRITE, 0)])
            self.assertEqual(blk.read(4 * MiB, 64 << 14), b"".join(chunks))
            blk.flush()
            self.assertEqual(self.on_disk(4 * MiB, 64 << 14), b"".join(chunks))
        self.assertNothingLeft()

    def test_split_chains_are_laid_out_as_linux_does(self):
        """Without indirect: header, data and status in three chained descriptors."""
        with launch.storage_daemon(self.image) as qsd, self.frontend(qsd) as (_tap, fe):
            blk = BlkClient(fe, timeout=TIMEOUT)
            self.assertEqual(blk.read(0, 4096), self.background[:4096])
            _addr, length, flags, nxt = struct.unpack_from("<QIHH", fe.memory.read(blk.queue.desc_addr, 16))
            self.assertEqual((length, flags), (16, VIRTQ_DESC_F_NEXT))             # the request header
            chain = [struct.unpack_from("<QIHH", fe.memory.read(blk.queue.desc_addr + 16 * nxt, 16))]
            chain.append(struct.unpack_from("<QIHH", fe.memory.read(blk.queue.desc_addr + 16 * chain[0][3], 16)))
            self.assertEqual([(c[1], c[2]) for c in chain],
                             [(4096, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT), (1, VIRTQ_DESC_F_WRITE)])
        self.assertNothingLeft()

    def test_write_zeroes_and_discard(self):
        with launch.storage_daemon(self.image, discard=True) as qsd, self.frontend(qsd) as (tap, fe):
            blk = BlkClient(fe, timeout=TIMEOUT)
            self.assertTrue(blk.features & VIRTIO_BLK_F_WRITE_ZEROES and blk.features & VIRTIO_BLK_F_DISCARD)
            data = self.rng.randbytes(MiB)
            blk.write(2 * MiB, data)
            blk.flush()
            self.assertEqual(self.on_disk(2 * MiB, MiB), data)
            blocks_before = os.stat(self.image).st_blocks

            blk.write_zeroes(2 * MiB + (64 << 10), 64 << 10)
            blk.discard(2 * MiB + (512 << 10), 256 << 10)
            blk.flush()
            expected = bytearray(data)
            expected[64 << 10:128 << 10] = bytes(64 << 10)
            expected[512 << 10:768 << 10] = bytes(256 << 10)
            self.assertEqual(self.on_disk(2 * MiB, MiB), bytes(expected))
            self.assertEqual(blk.read(2 * MiB, MiB), bytes(expected))
            # discard=unmap: the discarded range is a hole in the file now.
            fd = os.open(self.image, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self.assertEqual(os.lseek(fd, 2 * MiB + (512 << 10), os.SEEK_HOLE), 2 * MiB + (512 << 10))
            finally:
                os.close(fd)
            self.assertLess(os.stat(self.image).st_blocks, blocks_before)
        self.assertNothingLeft()

    def test_memory_in_several_regions_hot_added_and_removed(self):
        """CONFIGURE_MEM_SLOTS at work: four regions (four ADD_MEM_REG), I/O with buffers across
        them, a fifth region hot-added (ADD_MEM_REG) and removed (REM_MEM_REG) under running I/O."""
        with launch.storage_daemon(self.image) as qsd, self.frontend(qsd) as (tap, fe):
            fe.negotiate(FRONTEND_FEATURES & ~VIRTIO_F_RING_PACKED | BLK_DRIVER_FEATURES)
            fe.setup_memory(MiB, regions=4)
            # 16 slots of 16 KiB: the data buffers fill a 256 KiB region of their own, apart from
            # the ring (allocations never straddle regions).
            blk = BlkClient(fe, max_io=16 << 10, depth=16, timeout=TIMEOUT)
            self.check_memory_by_add_mem_reg(tap, fe)
            self.assertEqual(len(fe.regions), 4)
            a = self.rng.randbytes(160 << 10)
            blk.write(MiB, a)
            # Descriptor 0 held the first request's header, descriptor 1 its data.
            header, data = (struct.unpack_from("<Q", fe.memory.read(blk.queue.desc_addr + 16 * i, 8))[0]
                            for i in (0, 1))
            self.assertNotEqual(fe.memory.region_at(data).gpa, fe.memory.region_at(blk.queue.desc_addr).gpa)
            self.assertEqual(fe.memory.region_at(header).gpa, fe.memory.region_at(blk.queue.desc_addr).gpa)

            region = fe.add_memory_region(MiB)
            b = self.rng.randbytes(160 << 10)
            blk.write(2 * MiB, b)
            self.assertEqual(blk.read(MiB, len(a)), a)
            fe.remove_memory_region(region.gpa)
            self.assertEqual(blk.read(2 * MiB, len(b)), b)
            blk.flush()
            self.assertEqual((self.on_disk(MiB, len(a)), self.on_disk(2 * MiB, len(b))), (a, b))

            memory = [m for m in tap.requests() if m.name in MEMORY_REQUESTS]
            self.assertEqual([m.name for m in memory], ["ADD_MEM_REG"] * 5 + ["REM_MEM_REG"])
            self.assertEqual(MemoryRegion.unpack_single(memory[4].payload), region.wire)
            self.assertEqual(MemoryRegion.unpack_single(memory[5].payload), region.wire)
            self.assertEqual(memory[5].fd_targets, ())
            self.assertTrue(all(tap.reply_to(m).u64() == 0 for m in memory))
        self.assertNothingLeft()

    def test_packed_ring_only_if_offered(self):
        """qsd's libvhost-user (QEMU 7.2) has no packed rings: it does not offer VIRTIO_F_RING_PACKED,
        and BlkClient(packed=True) refuses rather than running a split ring. If a newer qsd offers
        it, the same I/O runs over a packed ring."""
        with launch.storage_daemon(self.image) as qsd, self.frontend(qsd) as (tap, fe):
            offered = fe.offered_features
            if offered & VIRTIO_F_RING_PACKED:
                blk = BlkClient(fe, packed=True, timeout=TIMEOUT)
                self.assertTrue(acked(tap) & VIRTIO_F_RING_PACKED)
                data = self.rng.randbytes(128 << 10)
                blk.write(MiB, data)
                blk.flush()
                self.assertEqual(blk.read(MiB, len(data)), data)
                self.assertEqual(self.on_disk(MiB, len(data)), data)
                report(self, "packed", "offered and used")
            else:
                with self.assertRaises(VhostError) as caught:
                    BlkClient(fe, packed=True, timeout=TIMEOUT)
                self.assertEqual(caught.exception.errno, errno.EINVAL)
                self.assertIn("RING_PACKED", str(caught.exception))
                self.assertFalse(acked(tap) & VIRTIO_F_RING_PACKED)
                report(self, "packed", f"not offered by qemu-storage-daemon (features {offered:#x})")
        self.assertNothingLeft()

    def test_reconnect_qsd_keeps_serving_and_the_data_stays(self):
        with launch.storage_daemon(self.image) as qsd:
            with self.frontend(qsd) as (tap, fe):
                blk = BlkClient(fe, timeout=TIMEOUT)
                a = self.rng.randbytes(128 << 10)
                blk.write(MiB, a)

                # An orderly disconnect: the ring stopped (GET_VRING_BASE), requests added while
                # it is stopped wait in the ring (qsd dropped its kick fd), and the new connection
                # resumes from the saved base, so qsd finds and serves them.
                bases = fe.stop()
                self.assertEqual(bases, {0: blk.queue.get_base()})
                c = [self.rng.randbytes(16 << 10) for _ in range(16)]
                placed = blk.submit(BlkRequest.write(7 * MiB + i * (16 << 10), data, tag=i)
                                    for i, data in enumerate(c))
                self.assertEqual(placed, 16)
                time.sleep(0.2)
                self.assertEqual(blk.complete(0), [], "qsd served a stopped ring")
                fe.reconnect(timeout=TIMEOUT)
                done = []
                while len(done) < placed:
                    done += blk.complete(1, TIMEOUT)
                self.assertEqual(sorted((x.tag, x.status) for x in done), [(i, 0) for i in range(16)])
                self.assertEqual(blk.read(MiB, len(a)), a)
                self.assertEqual(blk.read(7 * MiB, 16 << 14), b"".join(c))

                # An abrupt one: no GET_VRING_BASE, the ring resumes from the used index in memory.
                b = self.rng.randbytes(128 << 10)
                blk.write(6 * MiB, b)
                fe.reconnect(timeout=TIMEOUT)
                self.assertEqual(blk.read(6 * MiB, len(b)), b)
                blk.flush()
                qsd.check_alive()
                self.assertEqual(tap.sessions, 3)
                for session in range(3):
                    self.check_memory_by_add_mem_reg(tap, fe, session)
                # Each session programmed the ring from where the last one left it.
                bases = [int.from_bytes(m.payload[4:8], "little") for m in tap.requests()
                         if m.request == F.SET_VRING_BASE]
                stop = next(m for m in tap.requests() if m.request == F.GET_VRING_BASE)
                self.assertEqual(bases[0], 0)
                self.assertEqual(bases[1], int.from_bytes(tap.reply_to(stop).payload[4:8], "little"))
                self.assertGreater(bases[2], bases[1] + 16)
            # A brand-new front-end still finds everything on the disk qsd serves.
            with self.frontend(qsd) as (_tap, fe):
                blk = BlkClient(fe, timeout=TIMEOUT)
                self.assertEqual(blk.read(MiB, len(a)), a)
                self.assertEqual(blk.read(6 * MiB, len(b)), b)
            qsd.check_alive()
        self.assertEqual(self.on_disk(MiB, len(a)), a)
        self.assertEqual(self.on_disk(6 * MiB, len(b)), b)
        self.assertEqual(self.on_disk(7 * MiB, 16 << 14), b"".join(c))
        self.assertNothingLeft()

    def test_probe_shows_the_real_features(self):
        with launch.storage_daemon(self.image, num_queues=2) as qsd, self.frontend(qsd) as (tap, fe):
            result = fe.probe(device_features=VirtioBlkFeature)
            # Exactly what qsd answered on the wire.
            answers = {m.name: tap.reply_to(m) for m in tap.requests()}
            self.assertEqual(result.features, answers["GET_FEATURES"].u64())
            self.assertEqual(int(result.protocol_features), answers["GET_PROTOCOL_FEATURES"].u64())
            self.assertEqual(result.num_queues, 2)
            self.assertEqual(result.max_mem_slots, answers["GET_MAX_MEM_SLOTS"].u64())
            for name in ("VIRTIO_F_VERSION_1", "VIRTIO_F_INDIRECT_DESC", "VIRTIO_F_EVENT_IDX", "VIRTIO_BLK_F_FLUSH",
                         "VIRTIO_BLK_F_DISCARD", "VIRTIO_BLK_F_WRITE_ZEROES", "VIRTIO_BLK_F_MQ",
                         "VIRTIO_BLK_F_BLK_SIZE", "VHOST_USER_F_PROTOCOL_FEATURES"):
                self.assertIn(name, result.feature_names)
            self.assertNotIn("VIRTIO_F_RING_PACKED", result.feature_names)
            for name in ("MQ", "REPLY_ACK", "CONFIG", "CONFIGURE_MEM_SLOTS", "BACKEND_REQ"):
                self.assertIn(name, result.protocol_feature_names)
            config = BlkConfig.unpack(result.config)
            self.assertEqual((config.capacity, config.blk_size, config.num_queues), (self.IMAGE_SIZE // 512, 512, 2))
            # Read-only: no SET_OWNER, no SET_FEATURES, no memory, no rings; only what its queries need.
            self.assertEqual(set(tap.names()), {"GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
                                                "GET_QUEUE_NUM", "GET_MAX_MEM_SLOTS", "GET_CONFIG"})
            protocol = [m for m in tap.requests() if m.request == F.SET_PROTOCOL_FEATURES][0].u64()
            self.assertEqual(protocol, int(result.protocol_features & PROBE_PROTOCOL_FEATURES))
            report(self, "probe", f"{result.features:#x} {' '.join(result.feature_names)}; "
                                  f"{' '.join(result.protocol_feature_names)}")
        self.assertNothingLeft()


class ProbeCommandTest(PeerTestCase):
    """``python3 -m vhost_min probe SOCKET --json`` on qemu-storage-daemon's socket: the same answers
    as Frontend.probe, the config decoded as blk, and qsd left serving."""

    def test_probe_json(self):
        image = os.path.join(self.tmp, "disk.img")
        with open(image, "wb") as f:
            f.truncate(4 * MiB)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with launch.storage_daemon(image, num_queues=2) as qsd:
            out = subprocess.run([sys.executable, "-m", "vhost_min", "probe", qsd.socket, "--json"],
                                 capture_output=True, text=True, timeout=30, cwd=root)
            self.assertEqual(out.returncode, 0, out.stderr)
            probe = json.loads(out.stdout)
            with Frontend.connect(qsd.socket, timeout=TIMEOUT) as fe:
                api = fe.probe(device_features=VirtioBlkFeature)
            self.assertEqual((probe["features"], probe["protocol_features"], probe["num_queues"],
                              probe["max_mem_slots"], bytes.fromhex(probe["config_hex"])),
                             (api.features, int(api.protocol_features), 2, api.max_mem_slots, api.config))
            self.assertEqual(probe["feature_names"], list(api.feature_names))
            self.assertEqual((probe["device_type"], probe["device_type_guessed"]), ("blk", True))
            self.assertEqual((probe["config"]["capacity"], probe["config"]["num_queues"]), (4 * MiB // 512, 2))
            qsd.check_alive()
            report(self, "probe --json", out.stdout.strip()[:300])
        self.assertNothingLeft()


class BenchHandshakeTest(PeerTestCase):
    """``python3 -m bench handshake --count 4 --json``: both tables (our front-end; the C front-end in
    both NEED_REPLY modes), every figure a real time for both back-ends, and nothing left running."""

    def test_both_front_ends_time_both_back_ends(self):
        from bench import vublk
        support.require_commands(launch.QEMU_STORAGE_DAEMON, install=launch.APT_QEMU_COMMON)
        support.require(vublk.compiler() is not None, "a C compiler (cc)", vublk.CC_INSTALL)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run([sys.executable, "-m", "bench", "handshake", "--count", "4", "--json"],
                             capture_output=True, text=True, timeout=300, cwd=root)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("handshake under vublk (C front-end)", out.stdout)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        # (Our front-end's rows take back-end CPU from /proc/PID/stat, in 10 ms ticks: four handshakes
        # may show none, so those two are only required to be there. vublk reads schedstat's nanoseconds.)
        for key in ("ours_cpu_ms_per_handshake", "theirs_cpu_ms_per_handshake"):
            self.assertIsInstance(result[key], float, key)
        keys = ["ours_ms_median", "theirs_ms_median"]
        for mode in ("all", "mem_table"):
            keys += [f"vublk_{mode}_{side}_{what}" for side in ("ours", "theirs")
                     for what in ("ms_median", "ms_p90", "cpu_ms_per_handshake", "connect_ms_median")]
        for key in keys:
            with self.subTest(key=key):
                self.assertGreater(result[key], 0)
        for mode in ("all", "mem_table"):
            self.assertAlmostEqual(result[f"vublk_{mode}_ratio_median"],
                                   result[f"vublk_{mode}_ours_ms_median"] / result[f"vublk_{mode}_theirs_ms_median"],
                                   delta=0.01)
        report(self, "bench handshake", {k: result[k] for k in ("ratio_median", "vublk_all_ratio_median",
                                                               "vublk_mem_table_ratio_median")})
        self.assertNothingLeft()


# --------------------------------------------------------------------------------------------
# Packed rings: qsd has none, DPDK's vhost has them
# --------------------------------------------------------------------------------------------

#: struct virtio_net_hdr_mrg_rxbuf {u8 flags; u8 gso_type; le16 hdr_len, gso_size, csum_start,
#: csum_offset, num_buffers} (<linux/virtio_net.h>): every virtio 1.x net buffer starts with it.
virtio_net_hdr_mrg_rxbuf = struct.Struct("<BBHHHHH")
ETH_P_LOCAL_EXP1 = 0x88B5           # <linux/if_ether.h>: local experimental ethertype
RECEIVEQ1, TRANSMITQ1 = 0, 1


class DpdkVhostNetTest(PeerTestCase):
    """Frontend -> dpdk-testpmd's vhost port (net_vhost, macswap forwarding): our driver-side rings,
    split and packed, against a real device. Frames go out on transmitq1 and come back on
    receiveq1 with their MAC addresses swapped by testpmd."""

    FRAMES = 32
    OURS, PEER = bytes.fromhex("525400c0ffee"), bytes.fromhex("020000000001")

    def frame(self, seq: int) -> bytes:
        """64 bytes: Ethernet to PEER from OURS, a sequence number, zeros."""
        return (self.PEER + self.OURS + struct.pack("!HI", ETH_P_LOCAL_EXP1, seq)).ljust(64, b"\0")

    def round_trip(self, packed: bool) -> None:
        ok = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
        with launch.testpmd_vhost(extra=("--forward-mode=macswap",)) as pmd:
            with launch.WireTap(os.path.join(self.tmp, "tap.sock"), pmd.socket) as tap:
                with Frontend.connect(tap.path, timeout=TIMEOUT) as fe:
                    negotiated = fe.negotiate(FRONTEND_FEATURES | (VIRTIO_F_RING_PACKED if packed else 0))
                    self.assertEqual(bool(negotiated.features & VIRTIO_F_RING_PACKED), packed)
                    self.assertTrue(negotiated.protocol_features & P.STATUS)   # DPDK waits for DRIVER_OK
                    fe.set_status(ok)
                    fe.setup_memory(2 * MiB)
                    rx, tx = fe.setup_queue(RECEIVEQ1, 256), fe.setup_queue(TRANSMITQ1, 256)
                    fe.set_status(ok | DeviceStatus.DRIVER_OK)
                    for _ in range(2 * self.FRAMES):
                        buffer = fe.alloc(2048)
                        rx.add([], [(buffer, 2048)], buffer)
                    fe.publish(RECEIVEQ1)
                    for seq in range(self.FRAMES):
                        buffer = fe.alloc(virtio_net_hdr_mrg_rxbuf.size + 64)
                        fe.memory.write(buffer, bytes(virtio_net_hdr_mrg_rxbuf.size) + self.frame(seq))
                        tx.add([(buffer, virtio_net_hdr_mrg_rxbuf.size + 64)], [], seq)
                    fe.publish(TRANSMITQ1)

                    received: list = []
                    deadline = time.monotonic() + TIMEOUT
                    while len(received) < self.FRAMES and time.monotonic() < deadline:
                        fe.wait_call(RECEIVEQ1, 0.2)
                        received += rx.reap()
                    sent = tx.reap()
                    self.assertEqual(sorted(sent), [(seq, 0) for seq in range(self.FRAMES)])
                    self.assertEqual(len(received), self.FRAMES, pmd.log())
                    seqs = []
                    for buffer, length in received:
                        data = fe.memory.read(buffer, length)
                        self.assertEqual(length, virtio_net_hdr_mrg_rxbuf.size + 64)
                        self.assertEqual(virtio_net_hdr_mrg_rxbuf.unpack_from(data)[:2], (0, 0))
                        frame = data[virtio_net_hdr_mrg_rxbuf.size:]
                        self.assertEqual((frame[:6], frame[6:12]), (self.OURS, self.PEER))     # swapped
                        seq = struct.unpack_from("!I", frame, 14)[0]
                        self.assertEqual(frame[12:], self.frame(seq)[12:])                     # the rest intact
                        seqs.append(seq)
                    self.assertEqual(sorted(seqs), list(range(self.FRAMES)))
                bases = [int.from_bytes(m.payload[4:8], "little") for m in tap.requests()
                         if m.request == F.SET_VRING_BASE]
                # A fresh packed ring: avail and used index 0, both wrap counters 1 (the full encoding).
                self.assertEqual(bases, [1 << 15 | 1 << 31] * 2 if packed else [0, 0])
                self.assertEqual(tap.errors, [])
            pmd.check_alive()                     # it outlives our disconnect, as a server does
        self.assertEqual(pmd.proc.returncode, 0)
        self.assertNothingLeft()

    def test_split_rings_round_trip(self):
        self.round_trip(packed=False)

    def test_packed_rings_round_trip(self):
        self.round_trip(packed=True)


# --------------------------------------------------------------------------------------------
# virtiofsd: FUSE requests through our rings
# --------------------------------------------------------------------------------------------

# <linux/fuse.h> (uapi 7.38), named as the header names them.
FUSE_KERNEL_VERSION = 7
FUSE_MINOR = 31                     # what we speak: fuse_init_in as it was before 7.36 extended it
FUSE_ROOT_ID = 1
FUSE_LOOKUP = 1
FUSE_OPEN = 14
FUSE_READ = 15
FUSE_INIT = 26
S_IFMT, S_IFREG = 0o170000, 0o100000
#: struct fuse_in_header {u32 len; u32 opcode; u64 unique; u64 nodeid; u32 uid; u32 gid; u32 pid;
#: u16 total_extlen; u16 padding}
fuse_in_header = struct.Struct("<IIQQIIIHH")
#: struct fuse_out_header {u32 len; i32 error; u64 unique}
fuse_out_header = struct.Struct("<IiQ")
#: struct fuse_init_in as of 7.31 {u32 major; u32 minor; u32 max_readahead; u32 flags} (7.36 appended
#: flags2 and unused[11], read only with FUSE_INIT_EXT in flags)
fuse_init_in = struct.Struct("<IIII")
#: struct fuse_init_out {u32 major, minor, max_readahead, flags; u16 max_background,
#: congestion_threshold; u32 max_write, time_gran; u16 max_pages, map_alignment; u32 flags2, unused[7]}
fuse_init_out = struct.Struct("<IIIIHHIIHHI7I")
#: struct fuse_attr {u64 ino, size, blocks, atime, mtime, ctime; u32 atimensec, mtimensec,
#: ctimensec, mode, nlink, uid, gid, rdev, blksize, flags}
fuse_attr = struct.Struct("<QQQQQQIIIIIIIIII")
#: struct fuse_entry_out {u64 nodeid, generation, entry_valid, attr_valid; u32 entry_valid_nsec,
#: attr_valid_nsec; struct fuse_attr attr}
fuse_entry_out = struct.Struct("<QQQQII" + fuse_attr.format[1:])
#: struct fuse_open_in {u32 flags; u32 open_flags}
fuse_open_in = struct.Struct("<II")
#: struct fuse_open_out {u64 fh; u32 open_flags; u32 padding}
fuse_open_out = struct.Struct("<QII")
#: struct fuse_read_in {u64 fh; u64 offset; u32 size; u32 read_flags; u64 lock_owner; u32 flags; u32 padding}
fuse_read_in = struct.Struct("<QQIIQII")
assert (fuse_in_header.size, fuse_out_header.size, fuse_init_out.size, fuse_attr.size, fuse_entry_out.size,
        fuse_read_in.size) == (40, 16, 64, 88, 128, 40)

HIPRIO_QUEUE, REQUEST_QUEUE = 0, 1      # virtio-fs: the high-priority queue, then request queues


class VirtiofsdTest(PeerTestCase):
    """Frontend -> QEMU 7.2's C virtiofsd: handshake, memory, both rings, FUSE over the request queue."""

    def setUp(self):
        super().setUp()
        self.shared = os.path.join(self.tmp, "shared")
        os.mkdir(self.shared)
        self.content = support.seeded_random(self).randbytes(3000)
        self.file = os.path.join(self.shared, "hello.bin")
        with open(self.file, "wb") as f:
            f.write(self.content)
        self.unique = 0

    def fuse(self, fe: Frontend, opcode: int, nodeid: int, body: bytes, reply_size: int) -> tuple[int, bytes]:
        """One FUSE request through the request queue: (error, reply body). The request and a
        writable reply buffer of ``reply_size`` bytes are in our guest memory."""
        self.unique += 1
        request = fuse_in_header.pack(fuse_in_header.size + len(body), opcode, self.unique, nodeid, 0, 0,
                                      os.getpid(), 0, 0) + body
        req_gpa, reply_gpa = fe.alloc(len(request)), fe.alloc(fuse_out_header.size + reply_size)
        try:
            fe.memory.write(req_gpa, request)
            queue = fe.queue(REQUEST_QUEUE)
            queue.add([(req_gpa, len(request))], [(reply_gpa, fuse_out_header.size + reply_size)], self.unique)
            fe.publish(REQUEST_QUEUE)
            # libvhost-user signals every call eventfd once when it is set: a wake-up is not a
            # completion, so reap until ours is there.
            used: list = []
            deadline = time.monotonic() + TIMEOUT
            while not used and time.monotonic() < deadline:
                fe.wait_call(REQUEST_QUEUE, deadline - time.monotonic())
                used = queue.reap()
            self.assertEqual([token for token, _ in used], [self.unique], f"opcode {opcode} was not answered")
            length = used[0][1]
            reply = fe.memory.read(reply_gpa, length)
        finally:
            fe.free(req_gpa)
            fe.free(reply_gpa)
        out_len, error, unique = fuse_out_header.unpack_from(reply)
        self.assertEqual((out_len, unique), (length, self.unique), "fuse_out_header.len is the used length")
        return error, reply[fuse_out_header.size:]

    def test_fuse_init_lookup_open_read(self):
        with launch.virtiofsd(self.shared) as fsd:
            with launch.WireTap(os.path.join(self.tmp, "tap.sock"), fsd.socket) as tap:
                with Frontend.connect(tap.path, timeout=TIMEOUT) as fe:
                    negotiated = fe.negotiate()
                    self.assertEqual(negotiated.num_queues, 2)          # hiprio + one request queue
                    self.assertTrue(negotiated.protocol_features & P.CONFIGURE_MEM_SLOTS)
                    self.assertTrue(negotiated.features & VIRTIO_F_VERSION_1)
                    fe.setup_memory(MiB)
                    fe.setup_queue(HIPRIO_QUEUE, 64)
                    fe.setup_queue(REQUEST_QUEUE, 64)
                    self.assertEqual([m for m in tap.names() if m in MEMORY_REQUESTS], ["ADD_MEM_REG"])

                    error, body = self.fuse(fe, FUSE_INIT, 0, fuse_init_in.pack(FUSE_KERNEL_VERSION, FUSE_MINOR, 0, 0),
                                            fuse_init_out.size)
                    self.assertEqual(error, 0)
                    init = fuse_init_out.unpack_from(body)
                    self.assertEqual(init[0], FUSE_KERNEL_VERSION)
                    report(self, "FUSE_INIT", f"virtiofsd speaks {init[0]}.{init[1]}, max_write {init[6]}")

                    error, body = self.fuse(fe, FUSE_LOOKUP, FUSE_ROOT_ID, b"hello.bin\0", fuse_entry_out.size)
                    self.assertEqual(error, 0)
                    entry = fuse_entry_out.unpack_from(body)
                    nodeid, attr = entry[0], entry[6:]
                    st = os.stat(self.file)
                    self.assertEqual((attr[0], attr[1], attr[9] & S_IFMT), (st.st_ino, len(self.content), S_IFREG))

                    error, body = self.fuse(fe, FUSE_LOOKUP, FUSE_ROOT_ID, b"missing\0", fuse_entry_out.size)
                    self.assertEqual(error, -errno.ENOENT)

                    error, body = self.fuse(fe, FUSE_OPEN, nodeid, fuse_open_in.pack(os.O_RDONLY, 0),
                                            fuse_open_out.size)
                    self.assertEqual(error, 0)
                    fh = fuse_open_out.unpack_from(body)[0]
                    error, body = self.fuse(fe, FUSE_READ, nodeid, fuse_read_in.pack(fh, 0, 4096, 0, 0, 0, 0), 4096)
                    self.assertEqual(error, 0)
                    self.assertEqual(body, self.content)                # the host file, in our guest memory
                self.assertEqual(tap.errors, [])
            # One-shot: our disconnect ends it, cleanly.
            self.assertEqual(fsd.wait_exit(TIMEOUT), 0, fsd.log())
        self.assertNothingLeft()


if __name__ == "__main__":
    unittest.main()
