"""vhost-user front-end (vhost_min.frontend) against a fake back-end thread built on user.Connection:
negotiation, REPLY_ACK, the memory table paths, replies of any size, feature gates, every way a
back-end can fail us (closes, hangs, garbage), the back-end-request channel, stop/reconnect, probe,
and no fd left open on any path."""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import tempfile
import threading
import time
import unittest
import uuid

from tests.support import open_fds
from vhost_min.backend import Device, Server
from vhost_min.errors import (DisconnectedError, NotNegotiatedError, NotSupportedError, ProtocolError,
                              VhostError)
from vhost_min.frontend import (FRONTEND_FEATURES, FRONTEND_PROTOCOL_FEATURES, PROBE_PROTOCOL_FEATURES, Frontend,
                                SharedObjects, _Allocator, feature_names)
from vhost_min.memory import VHOST_ACCESS_RO, GuestMemory
from vhost_min.user import (FRONTEND_REQUESTS, U64, BackendRequest, Config, Connection, DeviceState,
                            FrontendRequest, Inflight, IotlbMsg, Listener, MemoryRegion, MemoryTable, Message,
                            VHOST_IOTLB_MISS, ProtocolFeature, SharedObject, ShmemConfig, ShmemMap, VringAddr, VringFd,
                            VringState)
from vhost_min.virtio import (VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, VHOST_VRING_F_LOG, VirtioFeature)

F = FrontendRequest
P = ProtocolFeature
PF = int(VHOST_USER_F_PROTOCOL_FEATURES)
V1, EVENT_IDX, INDIRECT, PACKED = (int(VirtioFeature.VIRTIO_F_VERSION_1), int(VirtioFeature.VIRTIO_F_EVENT_IDX),
                                   int(VirtioFeature.VIRTIO_F_INDIRECT_DESC), int(VirtioFeature.VIRTIO_F_RING_PACKED))
DEVICE_BIT = 1 << 1
ALL_PROTOCOL = ProtocolFeature((1 << 23) - 1)
TIMEOUT = 2.0


class FakeBackend(threading.Thread):
    """A scripted vhost-user back-end: answers what a back-end must, records every message
    (request, flags, payload, fd count) and checks REPLY_ACK use: NEED_REPLY set exactly on the
    requests without their own reply once REPLY_ACK is acked, never before."""

    def __init__(self, conn: Connection | None = None, *, listener: Listener | None = None,
                 features: int = PF | V1 | EVENT_IDX | INDIRECT | DEVICE_BIT,
                 protocol: ProtocolFeature = ALL_PROTOCOL, queue_num: int = 4, max_mem_slots: int = 509,
                 config: bytes = bytes(range(60)), log_reply_size: int = 8, hang_on: FrontendRequest | None = None,
                 close_on: FrontendRequest | None = None, partial_reply_on: FrontendRequest | None = None,
                 fail_on: FrontendRequest | None = None, config_change_on_set: bool = False) -> None:
        super().__init__(daemon=True)
        self.conn, self.listener = conn, listener
        self.features, self.protocol, self.queue_num, self.max_mem_slots = features, protocol, queue_num, max_mem_slots
        self.config, self.log_reply_size = config, log_reply_size
        self.hang_on, self.close_on, self.partial_reply_on, self.fail_on = hang_on, close_on, partial_reply_on, fail_on
        self.config_change_on_set = config_change_on_set
        self.received: list[tuple[FrontendRequest, int, bytes, int]] = []
        self.violations: list[str] = []
        self.errors: list[BaseException] = []
        self.acked_protocol = P(0)
        self.acked_features: int | None = None
        self.owner = False
        self.regions: list[MemoryRegion] = []
        self.memory = GuestMemory()
        self.set_bases: dict[int, int] = {}
        self.vring_bases: dict[int, int] = {}       # what GET_VRING_BASE answers
        self.vring_addrs: dict[int, VringAddr] = {}
        self.enabled: dict[int, int] = {}
        self.fds: dict[tuple[FrontendRequest, int], int] = {}   # (SET_VRING_KICK/CALL/ERR, index) -> fd
        self.channel: Connection | None = None
        self.channel_replies: list[Message] = []
        self.inflight_fd_inodes: list[int] = []
        self.log_fd_size: int | None = None
        self.log_inodes: list[int] = []
        self.status = 0
        self.state_saved = b"device-state-bytes"
        self.state_loaded = b""
        self.shared_fd: int | None = None
        self._stopping = threading.Event()

    # -- plumbing ------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            if self.listener is not None:
                while not select.select([self.listener.fileno()], [], [], 0.05)[0]:
                    if self._stopping.is_set():
                        return
                self.conn = self.listener.accept()
                if self._stopping.is_set():
                    return
            while True:
                msg = self.conn.recv()
                with msg:
                    if not self.handle(msg):
                        return
        except DisconnectedError:
            pass
        except BaseException as exc:        # noqa: BLE001 - reported by the test
            self.errors.append(exc)
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.channel is not None:
            self.channel.close()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        if self.shared_fd is not None:
            os.close(self.shared_fd)
            self.shared_fd = None
        self.memory.clear()

    def stop(self) -> None:
        """Hang up (a back-end that exits) and wait for the thread."""
        self._stopping.set()
        conn = self.conn
        if conn is not None and not conn.closed:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.join(5)
        if self.listener is not None:
            self.listener.close()

    def requests(self) -> list[FrontendRequest]:
        return [r for r, *_ in self.received]

    def payloads(self, request: FrontendRequest) -> list[bytes]:
        return [p for r, _f, p, _n in self.received if r == request]

    def reply(self, msg: Message, payload: bytes = b"", fds=()) -> None:
        self.conn.send(msg.request, payload, fds, reply=True)

    # -- the protocol --------------------------------------------------------------------------
    def handle(self, msg: Message) -> bool:
        request = msg.request
        self.received.append((request, msg.flags, msg.payload, len(msg.fds)))
        spec = FRONTEND_REQUESTS[request]
        if msg.need_reply and not self.acked_protocol & P.REPLY_ACK:
            self.violations.append(f"{spec.name}: NEED_REPLY without REPLY_ACK")
        if self.acked_protocol & P.REPLY_ACK and not spec.reply and not msg.need_reply:
            self.violations.append(f"{spec.name}: REPLY_ACK negotiated but NEED_REPLY not set")
        if request == self.close_on:
            return False
        if request == self.hang_on:
            return True
        if request == self.partial_reply_on:
            self.conn.sock.sendall(struct.pack("=I", int(request)) + b"\x05")
            return False
        answered = getattr(self, f"on_{request.name.lower()}", lambda m: False)(msg)
        if spec.reply and not answered:
            self.violations.append(f"{spec.name}: the fake has no answer")
        if msg.need_reply and not spec.reply:
            self.conn.reply_u64(msg, 1 if request == self.fail_on else 0)
        return True

    def on_get_features(self, msg):
        self.conn.reply_u64(msg, self.features)
        return True

    def on_set_features(self, msg):
        self.acked_features = msg.u64()

    def on_set_owner(self, msg):
        self.owner = True

    def on_get_protocol_features(self, msg):
        self.conn.reply_u64(msg, int(self.protocol))
        return True

    def on_set_protocol_features(self, msg):
        self.acked_protocol = P(msg.u64())

    def on_get_queue_num(self, msg):
        self.conn.reply_u64(msg, self.queue_num)
        return True

    def on_get_max_mem_slots(self, msg):
        self.conn.reply_u64(msg, self.max_mem_slots)
        return True

    def on_get_shmem_config(self, msg):
        self.reply(msg, ShmemConfig(1, (0, 1 << 16)).pack())
        return True

    def on_set_backend_req_fd(self, msg):
        self.channel = Connection.from_fd(msg.take_fd(), requests=BackendRequest)
        self.channel.sock.settimeout(TIMEOUT)

    def _map(self, region: MemoryRegion, fd: int) -> None:
        self.regions.append(region)
        self.memory.add_region(region.guest_phys_addr, region.memory_size, fd=fd, mmap_offset=region.mmap_offset,
                               uva=region.userspace_addr)

    def on_set_mem_table(self, msg):
        self.regions.clear()
        self.memory.clear()
        for region, fd in zip(MemoryTable.unpack(msg.payload).regions, msg.fds):
            self._map(region, fd)

    def on_add_mem_reg(self, msg):
        self._map(MemoryRegion.unpack_single(msg.payload), msg.fds[0])

    def on_rem_mem_reg(self, msg):
        region = MemoryRegion.unpack_single(msg.payload)
        self.regions = [r for r in self.regions if r[:3] != region[:3]]
        self.memory.remove_region(region.guest_phys_addr, region.memory_size, region.userspace_addr)

    def on_set_log_base(self, msg):
        st = os.fstat(msg.fds[0])
        self.log_fd_size = st.st_size
        self.log_inodes.append(st.st_ino)
        self.reply(msg, U64.pack(0) if self.log_reply_size == 8 else msg.payload[:self.log_reply_size])
        return True

    def on_set_vring_base(self, msg):
        state = VringState.unpack(msg.payload)
        self.set_bases[state.index] = state.num

    def on_get_vring_base(self, msg):
        index = VringState.unpack(msg.payload).index
        self.reply(msg, VringState(index, self.vring_bases.get(index, 0)).pack())
        return True

    def on_set_vring_addr(self, msg):
        addr = VringAddr.unpack(msg.payload)
        self.vring_addrs[addr.index] = addr

    def on_set_vring_enable(self, msg):
        state = VringState.unpack(msg.payload)
        self.enabled[state.index] = state.num

    def _vring_fd(self, msg):
        index, _nofd = VringFd.unpack(msg.payload)
        old = self.fds.pop((msg.request, index), None)
        if old is not None:
            os.close(old)
        fd = msg.take_fd()
        if fd is not None:
            self.fds[(msg.request, index)] = fd

    on_set_vring_kick = on_set_vring_call = on_set_vring_err = _vring_fd

    def on_get_config(self, msg):
        req = Config.unpack(msg.payload)
        if req.offset + req.size > len(self.config):
            self.reply(msg)                      # refused: an empty reply
        else:
            self.reply(msg, Config(req.offset, req.size, 0, self.config[req.offset:req.offset + req.size]).pack())
        return True

    def on_set_config(self, msg):
        req = Config.unpack(msg.payload)
        config = bytearray(self.config)
        config[req.offset:req.offset + req.size] = req.data
        self.config = bytes(config)
        if self.config_change_on_set:           # ask the front-end something while it waits for us
            self.channel.send(BackendRequest.CONFIG_CHANGE_MSG, need_reply=True)
            self.channel_replies.append(self.channel.recv())

    def on_get_inflight_fd(self, msg):
        inflight = Inflight.unpack(msg.payload)
        size = inflight.num_queues * 4096
        fd = os.memfd_create("fake-inflight", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self.reply(msg, Inflight(size, 0, inflight.num_queues, inflight.queue_size).pack(), [fd])
        finally:
            os.close(fd)
        return True

    def on_set_inflight_fd(self, msg):
        self.inflight_fd_inodes.append(os.fstat(msg.fds[0]).st_ino)

    def on_iotlb_msg(self, msg):
        self.conn.reply_u64(msg, 0)
        return True

    def on_get_status(self, msg):
        self.conn.reply_u64(msg, self.status)
        return True

    def on_set_status(self, msg):
        self.status = msg.u64()

    def on_set_device_state_fd(self, msg):
        direction = DeviceState.unpack(msg.payload).direction
        fd = msg.take_fd()
        self.conn.reply_u64(msg, 0x100)          # success, no fd of our own
        try:
            if direction == 0:
                os.write(fd, self.state_saved)
            else:
                chunks = []
                while chunk := os.read(fd, 4096):
                    chunks.append(chunk)
                self.state_loaded = b"".join(chunks)
        finally:
            os.close(fd)
        return True

    def on_check_device_state(self, msg):
        self.conn.reply_u64(msg, 0)
        return True

    def on_get_shared_object(self, msg):
        fd = os.memfd_create("fake-dmabuf", os.MFD_CLOEXEC)
        os.write(fd, b"dmabuf")
        try:
            self.reply(msg, U64.pack(0), [fd])
        finally:
            os.close(fd)
        return True


class FrontendTestCase(unittest.TestCase):
    """Fails a test that leaves an fd open; builds front-end/fake pairs that are torn down in order."""

    def setUp(self) -> None:
        self._fds_before = open_fds()
        self.addCleanup(self._check_no_leak)
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.path = os.path.join(self.tmp.name, "vhost.sock")

    def _check_no_leak(self) -> None:
        leaked = open_fds() - self._fds_before
        self.assertFalse(leaked, f"fds leaked: {sorted(leaked)}")

    def pair(self, timeout: float = TIMEOUT, **kwargs) -> tuple[Frontend, FakeBackend]:
        a, b = Connection.pair()
        fake = FakeBackend(b, **kwargs)
        fake.start()
        fe = Frontend(a, timeout=timeout)
        self.addCleanup(self._teardown, fe, fake)
        return fe, fake

    def served(self, **kwargs) -> FakeBackend:
        """A fake listening on self.path (a back-end process that can exit and come back)."""
        fake = FakeBackend(listener=Listener(self.path), **kwargs)
        fake.start()
        self.addCleanup(self._teardown, None, fake)
        return fake

    def _teardown(self, fe: Frontend | None, fake: FakeBackend) -> None:
        if fe is not None:
            fe.close()
            fake.join(5)
        else:
            fake.stop()
        self.assertFalse(fake.is_alive(), "fake back-end thread did not finish")
        self.assertEqual(fake.errors, [])
        self.assertEqual(fake.violations, [])

    def sync(self, fe: Frontend) -> None:
        """A round trip, so the fake has handled everything sent before."""
        fe.get_features()


class TestNegotiation(FrontendTestCase):
    def test_intersection_and_order(self) -> None:
        fe, fake = self.pair(features=PF | V1 | EVENT_IDX | DEVICE_BIT | int(VirtioFeature.VIRTIO_F_ACCESS_PLATFORM))
        result = fe.negotiate(features=V1 | EVENT_IDX | DEVICE_BIT | PACKED)
        self.assertEqual(result.features, PF | V1 | EVENT_IDX | DEVICE_BIT)   # no PACKED (not offered), no IOMMU
        self.assertEqual(result.protocol_features, ALL_PROTOCOL & FRONTEND_PROTOCOL_FEATURES)
        self.assertEqual((result.num_queues, result.max_mem_slots), (4, 509))
        self.assertEqual((fe.features, fe.protocol_features, fe.num_queues), result[:3])
        self.sync(fe)
        self.assertEqual(fake.acked_features, result.features)
        self.assertEqual(fake.acked_protocol, result.protocol_features)
        self.assertTrue(fake.owner)
        self.assertEqual(fake.requests()[:9], [F.GET_FEATURES, F.SET_OWNER, F.GET_PROTOCOL_FEATURES,
                                               F.SET_PROTOCOL_FEATURES, F.GET_QUEUE_NUM, F.GET_MAX_MEM_SLOTS,
                                               F.SET_BACKEND_REQ_FD, F.GET_SHMEM_CONFIG, F.SET_FEATURES])
        self.assertEqual(fe.shmem_config.memory_sizes[1], 1 << 16)

    def test_protocol_features_asked_for(self) -> None:
        fe, fake = self.pair()
        result = fe.negotiate(protocol_features=P.MQ | P.CONFIG | P.RARP | P.PAGEFAULT)
        self.assertEqual(result.protocol_features, P.MQ | P.CONFIG | P.RARP)      # PAGEFAULT is never taken
        self.assertIsNone(result.max_mem_slots)

    def test_without_protocol_features(self) -> None:
        fe, fake = self.pair(features=V1 | EVENT_IDX)
        result = fe.negotiate()
        self.assertEqual(result.features, V1 | EVENT_IDX)
        self.assertEqual(result.protocol_features, 0)
        self.sync(fe)
        self.assertEqual(fake.requests(), [F.GET_FEATURES, F.SET_OWNER, F.SET_FEATURES, F.GET_FEATURES])
        with self.assertRaisesRegex(NotNegotiatedError, "does not offer"):
            fe.get_protocol_features()
        with self.assertRaisesRegex(NotNegotiatedError, "VHOST_USER_SET_VRING_ENABLE"):
            fe.set_vring_enable(0, True)
        # A ring comes up enabled without PROTOCOL_FEATURES: no SET_VRING_ENABLE is sent.
        fe.setup_memory(1 << 16)
        fe.setup_queue(0, 8)
        self.sync(fe)
        self.assertNotIn(F.SET_VRING_ENABLE, fake.requests())

    def test_not_negotiated_raises_before_sending(self) -> None:
        fe, fake = self.pair(protocol=P.MQ | P.REPLY_ACK)
        fe.negotiate()
        calls = {
            F.GET_CONFIG: lambda: fe.get_config(0, 4),
            F.SET_CONFIG: lambda: fe.set_config(0, b"\0"),
            F.GET_INFLIGHT_FD: lambda: fe.get_inflight_fd(1, 8),
            F.SET_STATUS: lambda: fe.set_status(1),
            F.GET_STATUS: fe.get_status,
            F.RESET_DEVICE: fe.reset_device,
            F.GET_MAX_MEM_SLOTS: fe.get_max_mem_slots,
            F.SET_LOG_BASE: lambda: fe.set_log_base(0, 4096),
            F.CHECK_DEVICE_STATE: fe.check_device_state,
            F.VRING_KICK: lambda: fe.vring_kick(0),
            F.IOTLB_MSG: lambda: fe.iotlb_msg(IotlbMsg(0, 4096, 0, 3, 2)),
        }
        for request, call in calls.items():
            with self.subTest(request=request.name), self.assertRaises(NotNegotiatedError) as cm:
                call()
            self.assertIn(request.spec_name, str(cm.exception))
        self.sync(fe)
        self.assertFalse(set(calls) & set(fake.requests()))
        self.assertTrue(fe.connected)                   # nothing was sent: the connection is fine


class TestReplyAck(FrontendTestCase):
    def run_session(self, **kwargs) -> FakeBackend:
        fe, fake = self.pair(**kwargs)
        fe.negotiate()
        fe.setup_memory(1 << 16)
        fe.setup_queue(0, 16)
        fe.set_config(0, b"\x01\x02")
        fe.set_status(7)
        self.assertEqual(fe.get_status(), 7)
        self.sync(fe)
        fe.close()
        fake.join(5)
        return fake

    def test_need_reply_only_when_negotiated(self) -> None:
        for protocol in (ALL_PROTOCOL, ALL_PROTOCOL & ~P.REPLY_ACK):
            with self.subTest(reply_ack=bool(protocol & P.REPLY_ACK)):
                fake = self.run_session(protocol=protocol)
                flagged = {r for r, flags, *_ in fake.received if flags & 0x8}
                if protocol & P.REPLY_ACK:
                    self.assertTrue({F.SET_FEATURES, F.ADD_MEM_REG, F.SET_VRING_ADDR, F.SET_CONFIG,
                                     F.SET_STATUS, F.SET_BACKEND_REQ_FD} <= flagged)
                    # Requests with their own reply never carry it; neither do those before the ack.
                    self.assertFalse(flagged & {F.GET_FEATURES, F.GET_VRING_BASE, F.GET_STATUS, F.SET_OWNER,
                                                F.SET_PROTOCOL_FEATURES})
                else:
                    self.assertEqual(flagged, set())
                self.assertEqual(fake.violations, [])

    def test_nonzero_ack_is_an_error(self) -> None:
        fe, fake = self.pair(fail_on=F.SET_VRING_NUM)
        fe.negotiate()
        fe.setup_memory(1 << 16)
        with self.assertRaisesRegex(VhostError, r"VHOST_USER_SET_VRING_NUM failed: the back-end answered 0x1"):
            fe.setup_queue(0, 16)
        # The failed setup released its eventfds and ring memory; the connection is still usable.
        ring_area = fe.alloc(1 << 15, 64)
        self.assertEqual(ring_area, 0)
        fe.free(ring_area)
        self.sync(fe)


class TestMemory(FrontendTestCase):
    def test_set_mem_table_without_configure_mem_slots(self) -> None:
        fe, fake = self.pair(protocol=ALL_PROTOCOL & ~P.CONFIGURE_MEM_SLOTS)
        fe.negotiate()
        memory = fe.setup_memory(3 << 16, regions=3)
        self.sync(fe)
        self.assertNotIn(F.ADD_MEM_REG, fake.requests())
        (_, _, payload, nfds), = [m for m in fake.received if m[0] == F.SET_MEM_TABLE]
        self.assertEqual(nfds, 3)
        table = MemoryTable.unpack(payload).regions
        self.assertEqual([(r.guest_phys_addr, r.memory_size) for r in table],
                         [(0, 1 << 16), (1 << 16, 1 << 16), (2 << 16, 1 << 16)])
        # userspace_addr is our own mapping's address: consistent with the memory we hand out.
        for region, mine in zip(table, memory.regions):
            self.assertEqual(region.userspace_addr, mine.uva)
        # It really is shared: a write here shows in the back-end's mapping, across regions too.
        memory.write((1 << 16) - 3, b"shared!")
        self.assertEqual(fake.memory.read((1 << 16) - 3, 7), b"shared!")

    def test_add_mem_reg_with_configure_mem_slots(self) -> None:
        fe, fake = self.pair()
        fe.negotiate()
        fe.setup_memory(3 << 16, regions=3)
        self.sync(fe)
        self.assertNotIn(F.SET_MEM_TABLE, fake.requests())
        adds = [(MemoryRegion.unpack_single(p), n) for r, _f, p, n in fake.received if r == F.ADD_MEM_REG]
        self.assertEqual([(r.guest_phys_addr, r.memory_size, n) for r, n in adds],
                         [(0, 1 << 16, 1), (1 << 16, 1 << 16, 1), (2 << 16, 1 << 16, 1)])
        # Hotplug: one more region with ADD_MEM_REG, and its removal with REM_MEM_REG (no fd).
        region = fe.add_memory_region(1 << 16)
        fe.memory.write(region.gpa, b"hot")
        self.sync(fe)
        self.assertEqual(fake.memory.read(region.gpa, 3), b"hot")
        fe.remove_memory_region(region.gpa)
        self.sync(fe)
        (rem, nfds), = [(MemoryRegion.unpack_single(p), n) for r, _f, p, n in fake.received if r == F.REM_MEM_REG]
        self.assertEqual((rem.guest_phys_addr, rem.memory_size, rem.userspace_addr, nfds),
                         (region.gpa, region.size, region.uva, 0))
        self.assertEqual(len(fake.regions), 3)

    def test_region_limits(self) -> None:
        fe, fake = self.pair(protocol=ALL_PROTOCOL & ~P.CONFIGURE_MEM_SLOTS)
        fe.negotiate()
        with self.assertRaisesRegex(VhostError, "CONFIGURE_MEM_SLOTS"):
            fe.setup_memory(9 << 12, regions=9)
        self.assertIsNone(fe.memory)
        fe2, fake2 = self.pair(max_mem_slots=2)
        fe2.negotiate()
        with self.assertRaisesRegex(VhostError, "2 slots"):
            fe2.setup_memory(3 << 12, regions=3)
        self.sync(fe)
        self.assertNotIn(F.SET_MEM_TABLE, fake.requests())

    def test_allocator(self) -> None:
        alloc = _Allocator()
        alloc.add_range(0, 0x1000)
        alloc.add_range(0x1000, 0x2000)
        a = alloc.alloc(0x800, 16)
        b = alloc.alloc(0x900, 16)                     # does not fit behind a: the next region
        self.assertEqual((a, b), (0, 0x1000))
        c = alloc.alloc(0x10, 0x100)
        self.assertEqual(c, 0x800)
        with self.assertRaisesRegex(VhostError, "out of guest memory"):
            alloc.alloc(0x1000, 16)                    # free space exists but never across a region boundary
        for gpa in (a, c, b):
            alloc.free(gpa)
        self.assertEqual(alloc.alloc(0x1000, 16), 0)
        self.assertEqual(alloc.alloc(0x1000, 16), 0x1000)
        with self.assertRaises(ValueError):
            alloc.free(0x10)


class TestReplies(FrontendTestCase):
    def test_set_log_base_reply_of_8_or_16_bytes(self) -> None:
        for size in (8, 16):
            with self.subTest(reply_size=size):
                fe, fake = self.pair(log_reply_size=size)
                fe.negotiate()
                fd = os.memfd_create("log", os.MFD_CLOEXEC)
                try:
                    os.ftruncate(fd, 4096)
                    fe.set_log_base(fd, 4096)
                finally:
                    os.close(fd)
                self.assertEqual(fake.log_fd_size, 4096)
                self.assertEqual(fe.get_features(), fake.features)     # framing intact after the reply
                fe.close()

    def test_dirty_log(self) -> None:
        fe, fake = self.pair(features=PF | V1 | VHOST_F_LOG_ALL)
        fe.negotiate()
        self.assertFalse(fe.features & VHOST_F_LOG_ALL)          # not taken by default
        fe.setup_memory(4 << 12, regions=2)
        fe.setup_queue(0, 8)
        dirty = fe.start_dirty_log()
        self.sync(fe)
        self.assertTrue(fake.acked_features & VHOST_F_LOG_ALL)
        self.assertEqual(fake.vring_addrs[0].flags, VHOST_VRING_F_LOG)
        self.assertGreaterEqual(fake.log_fd_size, 1)
        self.assertFalse(dirty.is_dirty(0x1000))
        fe.stop_dirty_log()
        self.sync(fe)
        self.assertFalse(fake.acked_features & VHOST_F_LOG_ALL)
        self.assertEqual(fake.vring_addrs[0].flags, 0)

    def test_get_config_and_refusal(self) -> None:
        fe, fake = self.pair()
        fe.negotiate()
        self.assertEqual(fe.get_config(4, 8), bytes(range(4, 12)))
        with self.assertRaisesRegex(VhostError, "refused VHOST_USER_GET_CONFIG"):
            fe.get_config(0, 100)
        with self.assertRaises(ValueError):
            fe.get_config(250, 10)
        self.assertTrue(fe.connected)

    def test_device_state_and_inflight(self) -> None:
        fe, fake = self.pair()
        fe.negotiate()
        self.assertEqual(fe.save_device_state(), b"device-state-bytes")
        fe.load_device_state(b"x" * 100_000)          # more than a pipe buffer
        self.sync(fe)
        self.assertEqual(fake.state_loaded, b"x" * 100_000)
        inflight = fe.setup_inflight(2, 64)
        self.assertEqual(inflight, Inflight(2 * 4096, 0, 2, 64))
        self.sync(fe)
        self.assertEqual(fake.requests()[-3:-1], [F.GET_INFLIGHT_FD, F.SET_INFLIGHT_FD])


class TestFailures(FrontendTestCase):
    def test_backend_closes_mid_reply(self) -> None:
        fe, fake = self.pair(partial_reply_on=F.GET_PROTOCOL_FEATURES)
        with self.assertRaisesRegex(DisconnectedError, "VHOST_USER_GET_PROTOCOL_FEATURES"):
            fe.negotiate()
        self.assertFalse(fe.connected)
        with self.assertRaises(DisconnectedError):
            fe.get_features()                         # latched: no reading from a broken stream

    def test_backend_closes_instead_of_answering(self) -> None:
        fe, fake = self.pair(close_on=F.GET_VRING_BASE)
        fe.negotiate()
        with self.assertRaises(DisconnectedError):
            fe.get_vring_base(0)

    def test_backend_never_answers(self) -> None:
        fe, fake = self.pair(timeout=0.3, hang_on=F.GET_VRING_BASE)
        fe.negotiate()
        start = time.monotonic()
        with self.assertRaises(VhostError) as cm:
            fe.get_vring_base(0)
        self.assertEqual(cm.exception.errno, errno.ETIMEDOUT)
        self.assertIn("VHOST_USER_GET_VRING_BASE", str(cm.exception))
        self.assertLess(time.monotonic() - start, 2)
        with self.assertRaises(VhostError) as cm:
            fe.get_features()                         # a late reply would be taken for this one's: refused
        self.assertIn("reconnect()", str(cm.exception))

    def test_backend_never_answers_with_reply_ack(self) -> None:
        fe, fake = self.pair(timeout=0.3, hang_on=F.SET_VRING_NUM)
        fe.negotiate()
        fe.setup_memory(1 << 16)
        with self.assertRaises(VhostError) as cm:
            fe.setup_queue(0, 8)
        self.assertEqual(cm.exception.errno, errno.ETIMEDOUT)


class TestConnect(FrontendTestCase):
    def _peer(self, behaviour) -> threading.Thread:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(self.path)
        server.listen(1)
        release = threading.Event()

        def run() -> None:
            with server:
                conn, _ = server.accept()
                with conn:
                    behaviour(conn)
                    release.wait(5)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        self.addCleanup(release.set)
        return thread

    def test_missing_socket(self) -> None:
        with self.assertRaises(VhostError) as cm:
            Frontend.connect(self.path)
        self.assertEqual(cm.exception.errno, errno.ENOENT)
        self.assertEqual(str(cm.exception), f"no vhost-user socket at {self.path}")

    def test_stale_socket_and_plain_file(self) -> None:
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(self.path)
        stale.close()
        with self.assertRaises(VhostError) as cm:
            Frontend.connect(self.path)
        self.assertEqual(cm.exception.errno, errno.ECONNREFUSED)
        self.assertIn("nothing listens", str(cm.exception))

    def test_peer_answers_garbage(self) -> None:
        self._peer(lambda c: (c.recv(64), c.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")))
        with self.assertRaisesRegex(ProtocolError, r"not a vhost-user back-end: .*HTTP/1.1 400"):
            Frontend.connect(self.path)

    def test_peer_closes(self) -> None:
        self._peer(lambda c: c.close())
        with self.assertRaisesRegex(ProtocolError, "closed the connection without answering VHOST_USER_GET_FEATURES"):
            Frontend.connect(self.path)

    def test_peer_answers_half_a_header(self) -> None:
        self._peer(lambda c: (c.recv(64), c.sendall(b"\x01\x00\x00\x00\x05"), c.close()))
        with self.assertRaisesRegex(ProtocolError, r"not a vhost-user back-end.*\\x01\\x00"):
            Frontend.connect(self.path)

    def test_peer_is_silent(self) -> None:
        self._peer(lambda c: c.recv(64))
        with self.assertRaises(VhostError) as cm:
            Frontend.connect(self.path, timeout=0.3)
        self.assertEqual(cm.exception.errno, errno.ETIMEDOUT)

    def test_connect_to_a_backend(self) -> None:
        fake = self.served()
        with Frontend.connect(self.path) as fe:
            self.assertEqual(fe.offered_features, fake.features)
            fe.negotiate()
        fake.join(5)


class TestRings(FrontendTestCase):
    def test_setup_queue_programs_the_ring(self) -> None:
        fe, fake = self.pair()
        fe.negotiate()
        fe.setup_memory(1 << 16, regions=2)
        q = fe.setup_queue(1, 64)
        self.sync(fe)
        ring_msgs = [r for r in fake.requests() if r in (F.SET_VRING_NUM, F.SET_VRING_BASE, F.SET_VRING_ADDR,
                                                         F.SET_VRING_CALL, F.SET_VRING_ERR, F.SET_VRING_KICK,
                                                         F.SET_VRING_ENABLE)]
        self.assertEqual(ring_msgs, [F.SET_VRING_NUM, F.SET_VRING_BASE, F.SET_VRING_ADDR, F.SET_VRING_CALL,
                                     F.SET_VRING_ERR, F.SET_VRING_KICK, F.SET_VRING_ENABLE])
        self.assertEqual(fake.set_bases, {1: 0})
        self.assertEqual(fake.enabled, {1: 1})
        addr = fake.vring_addrs[1]
        # Ring addresses are user addresses that the back-end translates to the driver's GPAs.
        self.assertEqual(fake.memory.gpa_for_uva(addr.desc_user_addr), q.desc_addr)
        self.assertEqual(fake.memory.gpa_for_uva(addr.avail_user_addr), q.avail_addr)
        self.assertEqual(fake.memory.gpa_for_uva(addr.used_user_addr), q.used_addr)
        self.assertEqual(addr.log_guest_addr, q.used_addr)
        # The eventfds: our kick reaches the back-end's copy, its call reaches wait_call.
        fe.kick(1)
        self.assertEqual(os.eventfd_read(fake.fds[(F.SET_VRING_KICK, 1)]), 1)
        self.assertFalse(fe.wait_call(1, timeout=0.05))
        os.eventfd_write(fake.fds[(F.SET_VRING_CALL, 1)], 1)
        self.assertTrue(fe.wait_call(1, timeout=1))
        os.eventfd_write(fake.fds[(F.SET_VRING_ERR, 1)], 1)
        with self.assertRaisesRegex(VhostError, "vring 1: the back-end signalled an error"):
            fe.wait_call(1, timeout=1)
        # Buffers from the allocator do not overlap the ring.
        buf = fe.alloc(4096)
        self.assertFalse(q.desc_addr <= buf < q.used_addr + 8 * 64 + 6)
        with self.assertRaises(VhostError):
            fe.setup_queue(1, 64)
        with self.assertRaises(ValueError):
            fe.setup_queue(4, 64)                      # GET_QUEUE_NUM said 4

    def test_feature_checks(self) -> None:
        fe, fake = self.pair(features=PF | V1)
        fe.negotiate()
        fe.setup_memory(1 << 16)
        with self.assertRaisesRegex(NotNegotiatedError, "RING_PACKED"):
            fe.setup_queue(0, 8, packed=True)
        with self.assertRaisesRegex(NotNegotiatedError, "EVENT_IDX"):
            fe.setup_queue(0, 8, event_idx=True)
        fe2, fake2 = self.pair(features=PF | V1 | EVENT_IDX | PACKED)
        fe2.negotiate(V1 | EVENT_IDX | PACKED)
        fe2.setup_memory(1 << 16)
        with self.assertRaisesRegex(VhostError, "every ring of the device is packed"):
            fe2.setup_queue(0, 8, packed=False)
        with self.assertRaisesRegex(VhostError, "every ring of the device uses it"):
            fe2.setup_queue(0, 8, event_idx=False)
        with self.assertRaisesRegex(NotNegotiatedError, "INDIRECT"):
            fe.setup_queue(0, 8, indirect_max=4)

    def test_reset_device_tears_the_rings_down(self) -> None:
        fe, fake = self.pair()
        fe.negotiate()
        fe.setup_memory(1 << 16)
        fe.setup_queue(0, 64)
        fds_with_ring = open_fds()
        fe.reset_device()
        self.assertEqual(len(fds_with_ring - open_fds()), 3)      # kick, call, err
        with self.assertRaises(VhostError):
            fe.kick(0)
        q = fe.setup_queue(0, 64)                                 # the ring memory was freed: same place
        self.assertEqual(q.desc_addr, 0)
        self.sync(fe)
        self.assertIn(F.RESET_DEVICE, fake.requests())

    def test_wait_call_sees_hangup(self) -> None:
        fe, fake = self.pair()
        fe.negotiate()
        fe.setup_memory(1 << 16)
        fe.setup_queue(0, 8)
        fake.stop()
        with self.assertRaises(DisconnectedError):
            fe.wait_call(0, timeout=2)

    def test_stop_returns_bases(self) -> None:
        fe, fake = self.pair()
        fe.negotiate()
        fe.setup_memory(1 << 16)
        fe.setup_queue(0, 8)
        fe.setup_queue(1, 8)
        fake.vring_bases = {0: 5, 1: 9}
        self.assertEqual(fe.stop(), {0: 5, 1: 9})
        self.assertEqual(fe.stop(), {0: 5, 1: 9})          # already stopped: nothing sent again
        self.assertEqual(fake.requests().count(F.GET_VRING_BASE), 2)
        fe.resume()
        self.sync(fe)
        self.assertEqual(fake.set_bases, {0: 5, 1: 9})


class TestBackendChannel(FrontendTestCase):
    def test_config_change_with_need_reply_while_waiting(self) -> None:
        """The back-end asks CONFIG_CHANGE_MSG (NEED_REPLY) while handling SET_CONFIG: answered
        while we wait for SET_CONFIG's own ack, instead of deadlocking."""
        fe, fake = self.pair(config_change_on_set=True)
        seen = []
        fe.on_config_change = lambda: seen.append(fe.config_changes)
        fe.negotiate()
        fe.set_config(0, b"\xff")
        self.assertEqual(seen, [1])
        (reply,) = fake.channel_replies
        self.assertEqual((reply.request, reply.is_reply, reply.need_reply, reply.u64()),
                         (BackendRequest.CONFIG_CHANGE_MSG, True, False, 0))

    def test_served_by_handle_backend_request_and_wait_call(self) -> None:
        fe, fake = self.pair()
        fe.negotiate()
        fe.setup_memory(1 << 16)
        fe.setup_queue(0, 8)
        self.sync(fe)
        channel = fake.channel
        # Through fileno() + handle_backend_request():
        channel.send(BackendRequest.CONFIG_CHANGE_MSG, need_reply=True)
        self.assertTrue(select.select([fe.fileno()], [], [], 1)[0])
        self.assertTrue(fe.handle_backend_request())
        with channel.recv() as reply:
            self.assertEqual(reply.u64(), 0)
        self.assertEqual(fe.config_changes, 1)
        # In-band call and error (INBAND_NOTIFICATIONS), served inside wait_call.
        calls = []
        fe.on_vring_call = calls.append
        channel.send(BackendRequest.VRING_CALL, VringState(0, 0).pack())
        self.assertTrue(fe.wait_call(0, timeout=1))
        self.assertEqual(calls, [0])
        channel.send(BackendRequest.VRING_ERR, VringState(0, 0).pack(), need_reply=True)
        with self.assertRaisesRegex(VhostError, "BACKEND_VRING_ERR"):
            fe.wait_call(0, timeout=1)
        with channel.recv() as reply:
            self.assertEqual(reply.u64(), 0)
        # A request for a vring that does not exist: answered with an error, the channel lives on.
        channel.send(BackendRequest.VRING_CALL, VringState(7, 0).pack(), need_reply=True)
        with self.assertLogs("vhost_min.frontend", "WARNING") as logs:
            fe.handle_backend_request()
        self.assertIn("vring 7 is not set up", logs.output[0])
        with channel.recv() as reply:
            self.assertNotEqual(reply.u64(), 0)
        # No NEED_REPLY: no answer (the next thing on the channel is the next answer).
        channel.send(BackendRequest.CONFIG_CHANGE_MSG)
        fe.handle_backend_request()
        self.assertFalse(select.select([channel.fileno()], [], [], 0.05)[0])

    def test_rejected_request_is_answered_nonzero(self) -> None:
        fe, fake = self.pair(protocol=ALL_PROTOCOL & ~P.SHMEM)
        fe.negotiate()
        self.sync(fe)
        fd = os.memfd_create("shm", os.MFD_CLOEXEC)
        try:
            fake.channel.send(BackendRequest.SHMEM_MAP, ShmemMap(1, 0, 0, 4096, 1).pack(), [fd], need_reply=True)
        finally:
            os.close(fd)
        with self.assertLogs("vhost_min.frontend", "WARNING") as logs:
            self.assertTrue(fe.handle_backend_request())
        self.assertIn("VHOST_USER_PROTOCOL_F_SHMEM", logs.output[0])
        with fake.channel.recv() as reply:
            self.assertEqual(reply.u64(), errno.EINVAL)
        self.assertEqual(fe.shmem_mappings, {})

    def test_shmem_map_unmap(self) -> None:
        fe, fake = self.pair()
        fe.negotiate()
        self.sync(fe)
        fd = os.memfd_create("shm", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, 8192)
            os.pwrite(fd, b"from the back-end", 4096)
            fake.channel.send(BackendRequest.SHMEM_MAP, ShmemMap(1, 4096, 0x2000, 4096, 1).pack(), [fd],
                              need_reply=True)
            fe.handle_backend_request()
            with fake.channel.recv() as reply:
                self.assertEqual(reply.u64(), 0)
            self.assertEqual(fe.shmem_mappings[(1, 0x2000)][:17], b"from the back-end")
            # Outside the region GET_SHMEM_CONFIG announced (64 KiB): refused.
            fake.channel.send(BackendRequest.SHMEM_MAP, ShmemMap(1, 0, 0xF000, 0x2000, 1).pack(), [fd],
                              need_reply=True)
        finally:
            os.close(fd)
        with self.assertLogs("vhost_min.frontend", "WARNING"):
            fe.handle_backend_request()
        with fake.channel.recv() as reply:
            self.assertEqual(reply.u64(), errno.EINVAL)
        fake.channel.send(BackendRequest.SHMEM_UNMAP, ShmemMap(1, 0, 0x2000, 4096, 0).pack(), need_reply=True)
        fe.handle_backend_request()
        with fake.channel.recv() as reply:
            self.assertEqual(reply.u64(), 0)
        self.assertEqual(fe.shmem_mappings, {})

    def test_shmem_map_fd_offset_beyond_off_t(self) -> None:
        """An fd offset of 2^63 or more (found by tests/fuzz.py): refused with EINVAL, not an
        OverflowError out of mmap logged as a handler bug."""
        fe, fake = self.pair()
        fe.negotiate()
        self.sync(fe)
        fd = os.memfd_create("shm", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, 8192)
            fake.channel.send(BackendRequest.SHMEM_MAP, ShmemMap(1, 1 << 63, 0, 4096, 1).pack(), [fd],
                              need_reply=True)
        finally:
            os.close(fd)
        with self.assertLogs("vhost_min.frontend", "WARNING") as logs:
            fe.handle_backend_request()
        self.assertIn("SHMEM_MAP: cannot map 0x1000 bytes at fd offset 0x8000000000000000", logs.output[0])
        self.assertNotIn("Traceback", "".join(logs.output))
        with fake.channel.recv() as reply:
            self.assertEqual(reply.u64(), errno.EINVAL)
        self.assertEqual(fe.shmem_mappings, {})

    def test_shared_objects(self) -> None:
        fe, fake = self.pair()
        fe.negotiate()
        self.sync(fe)
        obj = uuid.UUID("12345678-9abc-def0-1122-334455667788")
        fake.channel.send(BackendRequest.SHARED_OBJECT_ADD, SharedObject(obj).pack(), need_reply=True)
        fe.handle_backend_request()
        with fake.channel.recv() as reply:
            self.assertEqual(reply.u64(), 0)
        self.assertIs(fe.shared_objects.owner(obj), fe)
        # LOOKUP: the front-end asks the exporting back-end (GET_SHARED_OBJECT) and passes the fd on.
        fake.channel.send(BackendRequest.SHARED_OBJECT_LOOKUP, SharedObject(obj).pack())
        fe.handle_backend_request()
        with fake.channel.recv() as reply:
            self.assertEqual(reply.u64(), 0)
            fd = reply.take_fd()
        try:
            self.assertEqual(os.pread(fd, 6, 0), b"dmabuf")
        finally:
            os.close(fd)
        fake.channel.send(BackendRequest.SHARED_OBJECT_REMOVE, SharedObject(obj).pack(), need_reply=True)
        fe.handle_backend_request()
        with fake.channel.recv() as reply:
            self.assertEqual(reply.u64(), 0)
        fake.channel.send(BackendRequest.SHARED_OBJECT_LOOKUP, SharedObject(obj).pack())
        fe.handle_backend_request()
        with fake.channel.recv() as reply:
            self.assertEqual((reply.u64(), reply.fds), (errno.ENOENT, []))

    def test_shared_object_registry_with_fds(self) -> None:
        table = SharedObjects()
        obj = uuid.uuid4()
        fd = os.memfd_create("dmabuf", os.MFD_CLOEXEC)
        table.add_fd(obj, fd)
        os.close(fd)
        dup = table.lookup(obj)
        os.close(dup)
        self.assertTrue(table.remove(obj))
        self.assertIsNone(table.lookup(obj))
        fd = os.memfd_create("dmabuf-2", os.MFD_CLOEXEC)     # not fd 0: CI may run with no stdin
        table.add_fd(obj, fd)
        os.close(fd)
        table.close()

    def test_iotlb_miss_identity_mapping(self) -> None:
        iommu = int(VirtioFeature.VIRTIO_F_ACCESS_PLATFORM)
        fe, fake = self.pair(features=PF | V1 | iommu)
        fe.negotiate(features=V1 | iommu)
        memory = fe.setup_memory(2 << 16, regions=2)
        fe.setup_queue(0, 8)
        self.sync(fe)
        self.assertEqual(fake.vring_addrs[0].desc_user_addr, fe.queue(0).desc_addr)   # IOVA = GPA
        fake.channel.send(BackendRequest.IOTLB_MSG, IotlbMsg(0x10010, 4, 0, 1, 1).pack(), need_reply=True)
        fe.handle_backend_request()
        with fake.channel.recv() as reply:
            self.assertEqual(reply.u64(), 0)
        self.sync(fe)
        region = memory.regions[1]
        self.assertEqual(IotlbMsg.unpack(fake.payloads(F.IOTLB_MSG)[-1]),
                         IotlbMsg(0x10000, 0x10000, region.uva, 3, 2))

    def test_backend_closes_its_channel(self) -> None:
        fe, fake = self.pair()
        fe.negotiate()
        self.sync(fe)
        fake.channel.close()
        self.assertFalse(fe.handle_backend_request())
        with self.assertRaises(VhostError):
            fe.fileno()
        self.assertTrue(fe.connected)


class TestReconnect(FrontendTestCase):
    def setup_session(self, **kwargs) -> tuple[Frontend, FakeBackend]:
        fake = self.served(**kwargs)
        fe = Frontend.connect(self.path, timeout=TIMEOUT)
        self.addCleanup(fe.close)
        fe.negotiate()
        fe.setup_memory(2 << 16, regions=2)
        return fe, fake

    def restart(self, fake: FakeBackend, **kwargs) -> FakeBackend:
        fake.stop()
        return self.served(**kwargs)

    def test_reconnect_replays_memory_and_ring_bases(self) -> None:
        fe, fake1 = self.setup_session(protocol=ALL_PROTOCOL & ~P.CONFIGURE_MEM_SLOTS)
        fe.setup_queue(0, 16)
        fe.setup_queue(1, 16)
        fe.set_status(0xF)
        self.sync(fe)
        first_regions = list(fake1.regions)
        first_addrs = dict(fake1.vring_addrs)
        fake1.vring_bases = {0: 5, 1: 9}
        self.assertEqual(fe.stop(), {0: 5, 1: 9})
        fake2 = self.restart(fake1, protocol=ALL_PROTOCOL & ~P.CONFIGURE_MEM_SLOTS)
        fe.reconnect()
        self.sync(fe)
        self.assertEqual(fake2.regions, first_regions)
        self.assertEqual(fake2.vring_addrs, first_addrs)
        self.assertEqual(fake2.set_bases, {0: 5, 1: 9})
        self.assertEqual(fake2.enabled, {0: 1, 1: 1})
        self.assertEqual(fake2.status, 0xF)
        self.assertTrue(fake2.owner)
        for index in (0, 1):
            self.assertEqual(os.eventfd_read(fake2.fds[(F.SET_VRING_KICK, index)]), 1)   # kicked once
            os.eventfd_write(fake2.fds[(F.SET_VRING_CALL, index)], 1)
            self.assertTrue(fe.wait_call(index, timeout=1))
        # The memory the new back-end maps is the same memory.
        fe.memory.write(0x100, b"same")
        self.assertEqual(fake2.memory.read(0x100, 4), b"same")

    def test_reconnect_after_a_crash_uses_the_used_index(self) -> None:
        fe, fake1 = self.setup_session()
        q = fe.setup_queue(0, 16)
        fe.memory.write(q.used_addr + 2, struct.pack("<H", 3))       # the device had used 3 chains
        fake2 = self.restart(fake1)
        with self.assertRaises(DisconnectedError):
            fe.wait_call(0, timeout=2)
        fe.reconnect()
        self.sync(fe)
        self.assertEqual(fake2.set_bases, {0: 3})
        adds = [r for r in fake2.requests() if r == F.ADD_MEM_REG]
        self.assertEqual(len(adds), 2)

    def test_reconnect_hands_back_the_inflight_fd(self) -> None:
        fe, fake1 = self.setup_session()
        fe.setup_inflight(1, 16)
        fe.setup_queue(0, 16)
        self.sync(fe)
        fake2 = self.restart(fake1)
        fe.reconnect()
        self.sync(fe)
        self.assertEqual(fake2.inflight_fd_inodes, fake1.inflight_fd_inodes)
        order = fake2.requests()
        self.assertNotIn(F.GET_INFLIGHT_FD, order)
        self.assertLess(order.index(F.SET_INFLIGHT_FD), order.index(F.SET_VRING_BASE))

    def test_reconnect_keeps_the_dirty_log(self) -> None:
        features = PF | V1 | EVENT_IDX | VHOST_F_LOG_ALL
        fe, fake1 = self.setup_session(features=features)
        fe.setup_queue(0, 16)
        dirty = fe.start_dirty_log()
        dirty.mark(0x3000, 1)                      # as a back-end would
        self.sync(fe)
        fake2 = self.restart(fake1, features=features)
        fe.reconnect()
        self.sync(fe)
        self.assertEqual(fake2.log_inodes, fake1.log_inodes)      # the same bitmap, bits intact
        self.assertTrue(fe.start_dirty_log().is_dirty(0x3000))
        self.assertTrue(fake2.acked_features & VHOST_F_LOG_ALL)
        self.assertEqual(fake2.vring_addrs[0].flags, VHOST_VRING_F_LOG)

    def test_reconnect_waits_for_the_backend(self) -> None:
        fe, fake1 = self.setup_session()
        fake1.stop()
        timer = threading.Timer(0.3, lambda: self.served())
        timer.start()
        self.addCleanup(timer.join)
        fe.reconnect(timeout=3)
        self.assertTrue(fe.connected)

    def test_reconnect_refuses_changed_features(self) -> None:
        fe, fake1 = self.setup_session()
        self.restart(fake1, features=PF | V1)
        with self.assertRaisesRegex(ProtocolError, "lost: .*VIRTIO_F_EVENT_IDX"):
            fe.reconnect()

    def test_reconnect_without_a_path(self) -> None:
        fe, fake = self.pair()
        with self.assertRaises(VhostError):
            fe.reconnect()


class TestProbe(FrontendTestCase):
    def test_probe_leaves_the_backend_unowned(self) -> None:
        fe, fake = self.pair()
        result = fe.probe()
        self.assertEqual(result.features, fake.features)
        self.assertIn("VIRTIO_F_VERSION_1", result.feature_names)
        self.assertIn("bit 1", result.feature_names)
        self.assertEqual(result.protocol_features, ALL_PROTOCOL)
        self.assertIn("CONFIGURE_MEM_SLOTS", result.protocol_feature_names)
        self.assertEqual((result.num_queues, result.max_mem_slots), (4, 509))
        self.assertEqual(result.config, bytes(range(60)))        # the largest size the back-end accepts
        self.sync(fe)
        self.assertFalse(fake.owner)
        self.assertIsNone(fake.acked_features)
        self.assertEqual(fake.acked_protocol, PROBE_PROTOCOL_FEATURES)
        sent = set(fake.requests())
        self.assertLessEqual(sent, {F.GET_FEATURES, F.GET_PROTOCOL_FEATURES, F.SET_PROTOCOL_FEATURES,
                                    F.GET_QUEUE_NUM, F.GET_MAX_MEM_SLOTS, F.GET_CONFIG})
        self.assertEqual(fe.probe(config_size=8).config, bytes(range(8)))
        fe.negotiate()
        with self.assertRaisesRegex(VhostError, "fresh connection"):
            fe.probe()

    def test_probe_of_a_minimal_backend(self) -> None:
        fe, fake = self.pair(features=V1)
        result = fe.probe()
        self.assertEqual(result, (V1, ("VIRTIO_F_VERSION_1",), None, (), None, None, None))

    def test_feature_names(self) -> None:
        self.assertEqual(feature_names(PF | VHOST_F_LOG_ALL | 1 << 63),
                         ("VHOST_F_LOG_ALL", "VHOST_USER_F_PROTOCOL_FEATURES", "bit 63"))


class TestLeaks(FrontendTestCase):
    def test_everything_closed_with_views_still_held(self) -> None:
        fe, fake = self.pair(features=PF | V1 | INDIRECT | VHOST_F_LOG_ALL)
        fe.negotiate()
        memory = fe.setup_memory(4 << 12, regions=2)
        q = fe.setup_queue(0, 8)
        fe.setup_queue(1, 8, indirect_max=4)
        fe.setup_inflight(2, 8)
        fe.start_dirty_log()
        view = memory.view(0x10, 4)                   # a caller still holding guest memory
        fe.close()
        fe.close()                                    # twice is fine
        view[:] = b"safe"                             # still mapped: unmapped when the last view goes
        del view, q, memory
        fake.join(5)
        # _check_no_leak (cleanup) asserts the memfds, eventfds, sockets, inflight and log fds are closed.



class UpperDevice(Device):
    """A test device for the in-process pairing: each chain's readable bytes come back upper-cased."""

    num_queues = 2
    features = DEVICE_BIT

    def __init__(self) -> None:
        super().__init__()
        self.config = bytearray(range(24))
        self.state = b""

    def get_config(self, offset: int, size: int) -> bytes:
        if offset + size > len(self.config):
            raise NotSupportedError("beyond the config space")
        return bytes(self.config[offset:offset + size])

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        self.config[offset:offset + len(data)] = data

    def handle(self, queue, readable, writable):
        data = b"".join(bytes(r) for r in readable).upper()
        done = 0
        for w in writable:
            n = min(len(w), len(data) - done)
            w[:n] = data[done:done + n]
            done += n
        return done

    def save_state(self, file) -> None:
        file.write(b"upper:" + bytes(self.config))

    def load_state(self, file) -> None:
        self.state = file.read()


class TestWithOurBackend(FrontendTestCase):
    """Our front-end against our back-end framework (vhost_min.backend) in one process: the
    protocol logic of both sides, not the interop proof (that is tests/peers)."""

    def setUp(self) -> None:
        super().setUp()
        logging.getLogger("vhost_min.backend").setLevel(logging.CRITICAL)
        self.addCleanup(logging.getLogger("vhost_min.backend").setLevel, logging.NOTSET)

    def start_backend(self) -> tuple[UpperDevice, threading.Event]:
        device, stop = UpperDevice(), threading.Event()
        ready = threading.Event()
        server = Server()
        server.add(device, self.path)
        ready.set()
        thread = threading.Thread(target=self._run_server, args=(server, stop), daemon=True)
        thread.start()

        def finish() -> None:
            stop.set()
            thread.join(5)
            self.assertFalse(thread.is_alive())
        self.addCleanup(finish)
        return device, stop, thread

    @staticmethod
    def _run_server(server, stop) -> None:
        with server:
            server.run(stop_event=stop)

    def roundtrip(self, fe: Frontend, index: int, text: bytes, indirect: bool = False) -> bytes:
        q = fe.queue(index)
        src, dst = fe.alloc(len(text)), fe.alloc(len(text))
        fe.memory.write(src, text)
        q.add([(src, len(text))], [(dst, len(text))], token=text, indirect=indirect)
        fe.publish(index)
        deadline = time.monotonic() + 5
        done = []
        while not done and time.monotonic() < deadline:
            fe.wait_call(index, timeout=0.5)
            done = q.reap()
        self.assertEqual(done, [(text, len(text))])
        out = fe.memory.read(dst, len(text))
        fe.free(src)
        fe.free(dst)
        return out

    def test_data_path_split_and_packed(self) -> None:
        self.start_backend()
        for packed in (0, PACKED):
            for event_idx in (EVENT_IDX, 0):
                with self.subTest(packed=bool(packed), event_idx=bool(event_idx)), \
                        Frontend.connect(self.path, timeout=TIMEOUT) as fe:
                    fe.negotiate((FRONTEND_FEATURES & ~EVENT_IDX) | DEVICE_BIT | packed | event_idx)
                    self.assertEqual(fe.features & (PACKED | EVENT_IDX | DEVICE_BIT), packed | event_idx | DEVICE_BIT)
                    self.exercise(fe)

    def exercise(self, fe: Frontend) -> None:
        fe.setup_memory(1 << 20, regions=2)
        fe.setup_queue(0, 64, indirect_max=4)
        fe.setup_queue(1, 32)
        for i in range(100):
            self.assertEqual(self.roundtrip(fe, i % 2, b"chain %d" % i, indirect=i % 4 == 0), b"CHAIN %d" % i)
        self.assertEqual(fe.get_config(4, 4), bytes(range(4, 8)))

    def test_stop_resume_and_state(self) -> None:
        device, *_ = self.start_backend()
        with Frontend.connect(self.path, timeout=TIMEOUT) as fe:
            fe.negotiate()
            fe.setup_memory(1 << 18)
            fe.setup_queue(0, 16)
            for i in range(20):
                self.roundtrip(fe, 0, b"x%d" % i)
            self.assertEqual(fe.stop(), {0: 20})
            self.assertEqual(fe.save_device_state(), b"upper:" + bytes(range(24)))
            fe.load_device_state(b"restored")
            self.assertEqual(device.state, b"restored")
            fe.resume()
            self.assertEqual(self.roundtrip(fe, 0, b"again"), b"AGAIN")
            self.assertEqual(fe.stop(), {0: 21})

    def test_config_change_from_the_backend(self) -> None:
        device, *_ = self.start_backend()
        with Frontend.connect(self.path, timeout=TIMEOUT) as fe:
            fe.negotiate()
            fe.setup_memory(1 << 18)
            fe.setup_queue(0, 16)
            self.roundtrip(fe, 0, b"start")               # a started ring: the device is not suspended
            fe.set_config(0, b"\xaa")
            device.backend.notify_config_change()
            deadline = time.monotonic() + 5
            while not fe.config_changes and time.monotonic() < deadline:
                fe.wait_call(0, timeout=0.1)
            self.assertEqual(fe.config_changes, 1)
            self.assertEqual(fe.get_config(0, 1), b"\xaa")

    def test_every_backend_request_a_device_can_send(self) -> None:
        """A device sends each back-end request (1-10) through its backend's methods; our front-end
        acts on each: what it did is checked on the front-end side."""
        memfd = os.memfd_create("shmem-source")
        self.addCleanup(os.close, memfd)
        os.ftruncate(memfd, 0x4000)
        os.pwrite(memfd, b"from the back-end", 0x1000)

        class Exporter(UpperDevice):
            features = DEVICE_BIT | VirtioFeature.VIRTIO_F_ACCESS_PLATFORM

            def get_shmem_config(self):
                return [0x10000]

            def get_shared_object(self, wanted):
                return memfd

        device, server = Exporter(), Server()
        server.add(device, self.path)
        stop = threading.Event()
        thread = threading.Thread(target=self._run_server, args=(server, stop), daemon=True)
        thread.start()
        self.addCleanup(thread.join, 5)
        self.addCleanup(stop.set)
        with Frontend.connect(self.path, timeout=TIMEOUT) as fe:
            fe.negotiate(FRONTEND_FEATURES | DEVICE_BIT | VirtioFeature.VIRTIO_F_ACCESS_PLATFORM,
                         protocol_features=FRONTEND_PROTOCOL_FEATURES & ~P.INBAND_NOTIFICATIONS)
            self.assertTrue(fe.protocol_features & (P.SHARED_OBJECT | P.SHMEM | P.BACKEND_SEND_FD | P.REPLY_ACK)
                            == P.SHARED_OBJECT | P.SHMEM | P.BACKEND_SEND_FD | P.REPLY_ACK, fe.protocol_features)
            fe.setup_memory(1 << 18)
            fe.setup_queue(0, 16)
            self.roundtrip(fe, 0, b"start")
            backend = device.backend
            iotlb: list[IotlbMsg] = []
            fe.on_iotlb_msg = iotlb.append
            # The front-end serves its back-end channel in a thread while the device waits for answers.
            serving = threading.Event()
            serving.set()

            def serve_channel() -> None:
                while serving.is_set():
                    if select.select([fe.fileno()], [], [], 0.05)[0] and not fe.handle_backend_request():
                        return
            channel_thread = threading.Thread(target=serve_channel, daemon=True)
            channel_thread.start()
            try:
                # 1 IOTLB_MSG: a miss reported to the front-end.
                backend.send_iotlb_msg(IotlbMsg(0x5000, 0, 0, VHOST_ACCESS_RO, VHOST_IOTLB_MISS))
                # 2 CONFIG_CHANGE_MSG
                backend.notify_config_change()
                # 3 VRING_HOST_NOTIFIER_MSG: our front-end never negotiates HOST_NOTIFIER, so the
                # device is told before anything is sent.
                with self.assertRaises(NotNegotiatedError):
                    backend.set_host_notifier(0, memfd, 0x1000)
                # 4 and 5 (in-band VRING_CALL / VRING_ERR) need INBAND_NOTIFICATIONS, not negotiated here.
                for request in (BackendRequest.VRING_CALL, BackendRequest.VRING_ERR):
                    with self.assertRaises(NotNegotiatedError):
                        backend.backend_request(request, VringState(0, 0).pack())
                # 6, 8, 7: SHARED_OBJECT add, lookup (of another exporter's object), remove.
                mine, theirs = uuid.uuid4(), uuid.uuid4()
                backend.shared_object_add(mine)
                self.assertIs(fe.shared_objects.owner(mine), fe)
                other = os.memfd_create("dmabuf")
                os.write(other, b"an exported buffer")
                fe.shared_objects.add_fd(theirs, other)
                os.close(other)
                looked_up = backend.shared_object_lookup(theirs)
                try:
                    self.assertEqual(os.pread(looked_up, 18, 0), b"an exported buffer")
                finally:
                    os.close(looked_up)
                with self.assertRaises(VhostError) as caught:
                    backend.shared_object_lookup(uuid.uuid4())
                self.assertEqual(caught.exception.errno, errno.ENOENT)
                backend.shared_object_remove(mine)
                self.assertIsNone(fe.shared_objects.owner(mine))
                # 9, 10: SHMEM_MAP then UNMAP of region 0.
                backend.shmem_map(0, memfd, 0x1000, 0x2000, 0x1000, writable=False)
                self.assertEqual(fe.shmem_mappings[(0, 0x2000)][:17], b"from the back-end")
                with self.assertRaises(VhostError):          # the front-end refuses (REPLY_ACK non-zero)
                    backend.shmem_map(0, memfd, 0, 0xF000, 0x2000)     # past the region's 64 KiB
                backend.shmem_unmap(0, 0x2000, 0x1000)
                self.assertEqual(fe.shmem_mappings, {})
            finally:
                serving.clear()
                channel_thread.join(5)
            self.assertEqual(iotlb, [IotlbMsg(0x5000, 0, 0, VHOST_ACCESS_RO, VHOST_IOTLB_MISS)])
            self.assertEqual(fe.config_changes, 1)

    def test_the_bring_up_routine_of_kernel_vhost_and_vdpa_drives_vhost_user_too(self) -> None:
        """One interface for the three dataplanes: the kernel tier's start_dataplane (run there over
        VhostNet, VhostVsock, VhostScsi and VhostVdpa) brings our back-end up through Frontend, and
        chains then flow on rings from our driver side in memory the routine handed over."""
        from tests.kernel.test_kernel_vhost import Ring, start_dataplane
        from vhost_min.memory import address_of
        from vhost_min.vring import SplitDriverQueue
        self.start_backend()
        size = 1 << 20
        fd = os.memfd_create("dataplane-routine", os.MFD_CLOEXEC)
        self.addCleanup(os.close, fd)
        os.ftruncate(fd, size)
        memory = GuestMemory()
        self.addCleanup(memory.clear)
        view = memory.add_region(0x100000, size, fd=fd).view
        region = MemoryRegion(0x100000, size, address_of(view), 0)
        rings, kicks = [], []
        for index in range(2):
            parts = SplitDriverQueue.layout(16, 0x100000 + index * 0x10000)
            queue = SplitDriverQueue(memory, 16, parts["desc"], parts["driver"], parts["device"])
            kick, call = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.addCleanup(os.close, kick)
            self.addCleanup(os.close, call)
            rings.append(Ring(index, queue, kick, call))
        with Frontend.connect(self.path, timeout=TIMEOUT) as fe:
            wanted = VirtioFeature.VIRTIO_F_VERSION_1 | DEVICE_BIT | VHOST_USER_F_PROTOCOL_FEATURES
            self.assertEqual(start_dataplane(fe, [region], rings, wanted, fds=[fd]), wanted)
            for ring in rings:
                src, dst = 0x180000 + ring.index * 0x1000, 0x1A0000 + ring.index * 0x1000
                memory.write(src, b"ring %d" % ring.index)
                ring.queue.add([(src, 6)], [(dst, 6)], token=ring.index)
                ring.queue.publish()
                os.eventfd_write(ring.kick, 1)
                used, deadline = [], time.monotonic() + TIMEOUT
                while not used and select.select([ring.call], [], [], deadline - time.monotonic())[0]:
                    os.eventfd_read(ring.call)      # the first may be SET_VRING_CALL's own signal
                    used = ring.queue.reap()
                self.assertEqual(used, [(ring.index, 6)])
                self.assertEqual(memory.read(dst, 6), b"RING %d" % ring.index)
            self.assertEqual(fe.get_vring_base(1).num, 1)

    def test_reconnect_to_a_restarted_backend(self) -> None:
        _device, stop, thread = self.start_backend()
        fe = Frontend.connect(self.path, timeout=TIMEOUT)
        self.addCleanup(fe.close)
        fe.negotiate()
        fe.setup_memory(1 << 18, regions=2)
        fe.setup_queue(0, 16)
        fe.setup_queue(1, 16)
        for i in range(7):
            self.roundtrip(fe, i % 2, b"before %d" % i)
        bases = fe.stop()
        self.assertEqual(bases, {0: 4, 1: 3})
        stop.set()                                         # the back-end process exits...
        thread.join(5)
        self.start_backend()                               # ...and a new one listens on the same path
        fe.reconnect()
        for i in range(7):
            self.assertEqual(self.roundtrip(fe, i % 2, b"after %d" % i), b"AFTER %d" % i)
        self.assertEqual(fe.stop(), {0: 8, 1: 6})

    def test_reconnect_after_a_crash(self) -> None:
        """No GET_VRING_BASE before the back-end went away: the bases come from the rings."""
        for packed in (0, PACKED):
            with self.subTest(packed=bool(packed)):
                _device, stop, thread = self.start_backend()
                fe = Frontend.connect(self.path, timeout=TIMEOUT)
                self.addCleanup(fe.close)
                fe.negotiate(FRONTEND_FEATURES | packed)
                fe.setup_memory(1 << 18)
                fe.setup_queue(0, 8)
                for i in range(11):                            # wraps the 8-slot ring
                    self.roundtrip(fe, 0, b"before %d" % i)
                stop.set()
                thread.join(5)
                with self.assertRaises(DisconnectedError):
                    fe.wait_call(0, timeout=2)
                _device, stop, thread = self.start_backend()
                fe.reconnect()
                for i in range(11):
                    self.assertEqual(self.roundtrip(fe, 0, b"after %d" % i), b"AFTER %d" % i)
                fe.close()
                stop.set()
                thread.join(5)

    def test_probe(self) -> None:
        self.start_backend()
        with Frontend.connect(self.path, timeout=TIMEOUT) as fe:
            result = fe.probe()
        self.assertEqual(result.config, bytes(range(24)))
        self.assertEqual(result.num_queues, 2)
        self.assertIn("bit 1", result.feature_names)
        # The back-end was left unowned: a real front-end can take it from here.
        with Frontend.connect(self.path, timeout=TIMEOUT) as fe:
            fe.negotiate()
            fe.setup_memory(1 << 18)
            fe.setup_queue(0, 8)
            self.assertEqual(self.roundtrip(fe, 0, b"owned"), b"OWNED")


if __name__ == "__main__":
    unittest.main()
