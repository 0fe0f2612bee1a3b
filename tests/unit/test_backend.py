"""The vhost-user back-end framework (vhost_min.backend), driven by a small hand-rolled front-end
that speaks raw user.py messages: handshakes in QEMU's and DPDK's order, memory by table and by
slots, rings through the real driver side of vring.py / packed.py, the ring state machine,
REPLY_ACK for every request, config space, notifications, errors, and the serve() loop with two
devices and a reconnect. Every byte a device writes is checked on the driver side."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import random
import select
import socket
import tempfile
import threading
import time
import unittest
import uuid

from tests.support import memfd, open_fds
from vhost_min.backend import POLL_INTERVAL, Backend, Device, Server, serve
from vhost_min.errors import (DisconnectedError, GuestMemoryError, NotNegotiatedError, NotSupportedError, ProtocolError,
                              VhostError, VirtqueueError)
from vhost_min.memory import MAX_MEM_SLOTS, VHOST_ACCESS_RO, GuestMemory
from vhost_min.user import (FRONTEND_REQUESTS, VHOST_IOTLB_INVALIDATE, VHOST_IOTLB_MISS, VHOST_USER_NEED_REPLY_MASK,
                            VHOST_USER_VRING_NOFD_MASK, BackendRequest,
                            Config, Connection, DeviceState, FrontendRequest, Inflight, IotlbMsg, Log, MemoryRegion,
                            MemoryTable, Message, ProtocolFeature, SharedObject, ShmemConfig, VringAddr, VringFd,
                            VringState, pack_u64)
from vhost_min.virtio import (VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, VHOST_VRING_F_LOG,
                              VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC,
                              VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, DeviceId, DeviceStatus)
from vhost_min.vring import SplitDriverQueue

from vhost_min.packed import PackedDriverQueue, encode_base

F, P = FrontendRequest, ProtocolFeature
#: The front-end's user addresses are not its guest addresses: uva = UVA_BASE + gpa.
UVA_BASE = 0x7F31_0000_0000
RAM_SIZE = 1 << 20
TIMEOUT = 5.0
#: Protocol features a QEMU 7.2 vhost-user-blk front-end asks for (qemu-storage-daemon offers 0x8f2b).
QEMU_PROTOCOL = P.MQ | P.LOG_SHMFD | P.REPLY_ACK | P.BACKEND_REQ | P.CONFIG | P.INFLIGHT_SHMFD | P.RESET_DEVICE \
    | P.CONFIGURE_MEM_SLOTS
#: What DPDK's virtio-user front-end sets (PEERS.md): MQ, REPLY_ACK, STATUS.
DPDK_PROTOCOL = P.MQ | P.REPLY_ACK | P.STATUS
DRIVER_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC | VHOST_USER_F_PROTOCOL_FEATURES


class _Quiet(logging.Handler):
    """Keeps the backend's (expected) rejection lines off stderr; assertLogs still sees them."""

    def emit(self, record: logging.LogRecord) -> None:
        pass


_QUIET = _Quiet()


def setUpModule() -> None:
    logging.getLogger("vhost_min.backend").addHandler(_QUIET)


def tearDownModule() -> None:
    logging.getLogger("vhost_min.backend").removeHandler(_QUIET)


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def fired(fd: int, timeout: float = 0.0) -> int:
    """The eventfd's counter (0 if it was not written within ``timeout``), reset to 0."""
    if not select.select([fd], [], [], timeout)[0]:
        return 0
    return os.eventfd_read(fd)


def scatter(data: bytes, views: list[memoryview]) -> int:
    pos = 0
    for view in views:
        take = min(len(view), len(data) - pos)
        view[:take] = data[pos:pos + take]
        pos += take
    return pos


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------

class Echo(Device):
    """Answers each request with its bytes reversed and the queue index appended; a tiny config
    space; records every hook call in ``events``."""

    device_id = DeviceId.CONSOLE
    num_queues = 2
    features = 1 << 0

    def __init__(self) -> None:
        super().__init__()
        self.config = bytearray(b"echo-cfg\x00\x00\x00\x00\x00\x00\x00\x00")
        self.events: list[tuple] = []

    def get_config(self, offset: int, size: int) -> bytes:
        if offset + size > len(self.config):
            raise VhostError(f"config read {offset}+{size} outside {len(self.config)} bytes", errno.EINVAL)
        return bytes(self.config[offset:offset + size])

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        if offset < 8:
            raise NotSupportedError("the first 8 bytes are read-only")
        self.config[offset:offset + len(data)] = data

    def handle(self, queue, readable, writable):
        data = b"".join(bytes(v) for v in readable)
        if data == b"raise-vhost":
            raise VhostError("asked to fail")
        if data == b"raise-bug":
            raise ValueError("a device bug")
        return scatter(data[::-1] + bytes([queue]), writable)

    def started(self, queue):
        self.events.append(("started", queue))

    def stopped(self, queue):
        self.events.append(("stopped", queue))

    def reset(self):
        self.events.append(("reset",))

    def features_set(self, features):
        self.events.append(("features", features))

    def set_status(self, status):
        self.events.append(("status", status))


class InbandEcho(Echo):
    """Echo that asks for in-band notifications (VRING_KICK, BACKEND_VRING_CALL / _ERR)."""

    protocol_features = ProtocolFeature.INBAND_NOTIFICATIONS


class Rng(Device):
    """virtio-rng-like: fills every writable buffer from a seeded generator."""

    device_id = DeviceId.RNG

    def __init__(self, seed: int = 7) -> None:
        super().__init__()
        self.random = random.Random(seed)

    def handle(self, queue, readable, writable):
        for buf in writable:
            buf[:] = self.random.randbytes(len(buf))
        return sum(len(b) for b in writable)


class Full(Echo):
    """Echo with every optional hook, so every protocol feature is offered."""

    def __init__(self) -> None:
        super().__init__()
        self.state = b"device state " * 10
        self.loaded = b""
        self.shared_fd = eventfd()
        self.uuid = uuid.UUID("12345678-1234-5678-1234-567812345678")

    def close(self) -> None:
        os.close(self.shared_fd)

    def save_state(self, file):
        file.write(self.state)

    def load_state(self, file):
        self.loaded = file.read()

    def send_rarp(self, mac):
        self.events.append(("rarp", mac))

    def set_mtu(self, mtu):
        if mtu < 68:
            raise VhostError(f"MTU {mtu} too small", errno.EINVAL)
        self.events.append(("mtu", mtu))

    def get_shared_object(self, uuid_):
        if uuid_ != self.uuid:
            raise VhostError(f"no object {uuid_}", errno.ENOENT)
        return self.shared_fd

    def get_shmem_config(self):
        return [0, 0x10000]


# --------------------------------------------------------------------------------------------
# The test front-end
# --------------------------------------------------------------------------------------------

class Ram:
    """Guest RAM as a front-end owns it: memfd regions (mapped here too, by guest address)."""

    def __init__(self, *regions: tuple[int, int]) -> None:
        self.memory = GuestMemory()
        self.fds: list[int] = []
        self.regions: list[MemoryRegion] = []
        for gpa, size in regions or ((0, RAM_SIZE),):
            fd = memfd(size)
            self.memory.add_region(gpa, size, fd=fd)
            self.fds.append(fd)
            self.regions.append(MemoryRegion(gpa, size, UVA_BASE + gpa, 0))

    def table(self) -> bytes:
        return MemoryTable(tuple(self.regions)).pack()

    def close(self) -> None:
        self.memory.clear()
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class Frontend:
    """Raw vhost-user messages over a Connection; with ``backend`` (in-process) each message is
    handed to it at once, otherwise a backend in another thread answers."""

    def __init__(self, connection: Connection, backend: Backend | None = None) -> None:
        self.conn = connection
        self.backend = backend
        if backend is None:
            connection.sock.settimeout(TIMEOUT)

    @classmethod
    def connect(cls, path: str) -> Frontend:
        return cls(Connection.connect(path))

    def close(self) -> None:
        self.conn.close()

    def send(self, request: int, payload: bytes = b"", fds=(), *, need_reply: bool = False,
             flags: int | None = None) -> None:
        self.conn.send(request, payload, fds, need_reply=need_reply, flags=flags)
        if self.backend is not None:
            self.backend.handle_message()

    def request(self, request: int, payload: bytes = b"", fds=(), *, need_reply: bool = False,
                validate: bool = True) -> Message | None:
        """Send; if the spec says an answer is due, read it and check its header and shape."""
        self.send(request, payload, fds, need_reply=need_reply)
        spec = FRONTEND_REQUESTS.get(request)
        if spec is None or not spec.reply_due(VHOST_USER_NEED_REPLY_MASK if need_reply else 0):
            return None
        reply = self.conn.recv()
        assert reply.is_reply and reply.request == request, reply
        if validate:
            spec.validate_reply(reply.payload, len(reply.fds))
        return reply

    def ack(self, request: int, payload: bytes = b"", fds=()) -> int:
        """Send with NEED_REPLY and return the u64 answer."""
        with self.request(request, payload, fds, need_reply=True) as reply:
            return reply.u64()

    def u64(self, request: int) -> int:
        with self.request(request) as reply:
            return reply.u64()

    def pending(self) -> bool:
        """Something (a stray second answer, or EOF) is waiting to be read."""
        return bool(select.select([self.conn.fileno()], [], [], 0)[0])

    def peer_closed(self, timeout: float = TIMEOUT) -> bool:
        """True when the backend closed the connection (EOF)."""
        if not select.select([self.conn.fileno()], [], [], timeout)[0]:
            return False
        try:
            return self.conn.sock.recv(1, socket.MSG_PEEK) == b""
        except ConnectionResetError:
            return True

    # -- common sequences ------------------------------------------------------------------------
    def negotiate(self, features: int = DRIVER_FEATURES, protocol: int = QEMU_PROTOCOL) -> None:
        offered = self.u64(F.GET_FEATURES)
        assert offered & VHOST_USER_F_PROTOCOL_FEATURES
        if features & VHOST_USER_F_PROTOCOL_FEATURES:
            self.send(F.SET_PROTOCOL_FEATURES, pack_u64(self.u64(F.GET_PROTOCOL_FEATURES) & protocol))
        self.send(F.SET_FEATURES, pack_u64(features & offered))


class DriverRing:
    """A ring set up with the driver side of vring.py (or packed.py), its kick/call/err eventfds
    and a data area for requests and replies."""

    def __init__(self, ram: Ram, index: int, size: int = 8, base: int = 0x10000, *, packed: bool = False,
                 event_idx: bool = True) -> None:
        self.ram, self.index, self.size, self.packed = ram, index, size, packed
        cls = PackedDriverQueue if packed else SplitDriverQueue
        lay = cls.layout(size, base)
        self.lay = lay
        self.queue = cls(ram.memory, size, lay["desc"], lay["driver"], lay["device"], event_idx=event_idx)
        self.kick, self.call, self.err = eventfd(), eventfd(), eventfd()
        self.data = (lay["end"] + 0xFFF) & ~0xFFF
        self.slot = 0

    def close(self) -> None:
        for fd in (self.kick, self.call, self.err):
            os.close(fd)

    def addr(self, flags: int = 0, log: int = 0, uva: int = UVA_BASE) -> VringAddr:
        lay = self.lay
        return VringAddr(self.index, flags, uva + lay["desc"], uva + lay["device"], uva + lay["driver"], log)

    def setup(self, fe: Frontend, *, base: int | None = None, enable: bool | None = True, need_reply: bool = False,
              uva: int = UVA_BASE) -> None:
        """QEMU's per-queue order: NUM, BASE, ADDR, KICK, CALL, ERR, ENABLE."""
        if base is None:
            base = self.queue.get_base()        # split 0; packed: both wrap counters 1
        for request, payload, fds in (
                (F.SET_VRING_NUM, VringState(self.index, self.size).pack(), ()),
                (F.SET_VRING_BASE, VringState(self.index, base).pack(), ()),
                (F.SET_VRING_ADDR, self.addr(uva=uva).pack(), ()),
                (F.SET_VRING_KICK, VringFd(self.index, False).pack(), (self.kick,)),
                (F.SET_VRING_CALL, VringFd(self.index, False).pack(), (self.call,)),
                (F.SET_VRING_ERR, VringFd(self.index, False).pack(), (self.err,))):
            if need_reply:
                assert fe.ack(request, payload, fds) == 0, request
            else:
                fe.send(request, payload, fds)
            if request == F.SET_VRING_CALL:
                # The back-end signals a new call fd at once (libvhost-user's "in case of I/O hang
                # after reconnecting"): taken here, so later checks see only real completions.
                assert fired(self.call, TIMEOUT), "SET_VRING_CALL did not signal the new call fd"
        if enable is not None:
            fe.send(F.SET_VRING_ENABLE, VringState(self.index, int(enable)).pack())

    def add(self, data: bytes, reply_len: int = 64) -> tuple[int, int]:
        """Queue one request (readable ``data``, ``reply_len`` writable bytes); returns the
        buffer addresses (request, reply)."""
        req = self.data + 0x100 * (self.slot % 16)
        rep = req + 0x1000              # another page: the dirty log tells them apart
        self.slot += 1
        self.ram.memory.write(req, data)
        self.queue.add([(req, len(data))] if data else [], [(rep, reply_len)] if reply_len else [], token=rep)
        return req, rep

    def kick_now(self) -> None:
        self.queue.publish()
        os.eventfd_write(self.kick, 1)

    def replies(self) -> list[bytes]:
        return [self.ram.memory.read(rep, n) for rep, n in self.queue.reap()]


def pump(backend: Backend, rounds: int = 20) -> None:
    """Run every ready handler of ``backend`` (kick fds, socket) until nothing is ready."""
    for _ in range(rounds):
        handlers = backend.watched()
        ready = select.select(list(handlers), [], [], 0)[0] if handlers else []
        if not ready:
            return
        for fd in ready:
            callback = backend.watched().get(fd)
            if callback is not None:
                callback()


def wait_for(predicate, timeout: float = TIMEOUT, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class BackendCase(unittest.TestCase):
    """An in-process front-end/back-end pair over Connection.pair(); fails on any fd leak."""

    device_class: type[Device] = Echo

    def setUp(self) -> None:
        self.fds_before = open_fds()
        self.addCleanup(self.check_no_leak)
        self.device = self.device_class()
        a, b = Connection.pair()
        self.backend = Backend(self.device, b)
        self.fe = Frontend(a, self.backend)
        self.ram = Ram()
        self.addCleanup(self.ram.close)
        self.addCleanup(self.backend.close)
        self.addCleanup(self.fe.close)

    def serve_instead(self, device: Device) -> None:
        """Replace the device under test (and its connection) by ``device``."""
        self.backend.close()
        self.fe.close()
        a, b = Connection.pair()
        self.device = device
        self.backend = Backend(device, b)
        self.addCleanup(self.backend.close)
        self.fe = Frontend(a, self.backend)
        self.addCleanup(self.fe.close)

    def check_no_leak(self) -> None:
        if hasattr(self.device, "close"):
            self.device.close()
        gc.collect()            # mmap keeps a dup of its fd until the mapping object is freed
        leaked = open_fds() - self.fds_before
        self.assertFalse(leaked, f"fds leaked: {sorted(leaked)}")

    def ring(self, index: int = 0, **kwargs) -> DriverRing:
        ring = DriverRing(self.ram, index, base=0x10000 * (index + 1), **kwargs)
        self.addCleanup(ring.close)
        return ring

    def set_memory(self) -> None:
        self.assertEqual(self.fe.ack(F.SET_MEM_TABLE, self.ram.table(), self.ram.fds), 0)

    def ready(self, *rings: DriverRing, features: int = DRIVER_FEATURES, protocol: int = QEMU_PROTOCOL) -> None:
        self.fe.negotiate(features, protocol)
        self.set_memory()
        for ring in rings:
            ring.setup(self.fe)

    def roundtrip(self, ring: DriverRing, *requests: bytes) -> list[bytes]:
        for data in requests:
            ring.add(data)
        ring.kick_now()
        pump(self.backend)
        self.assertTrue(fired(ring.call), "the call eventfd was not written")
        return ring.replies()


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------

class OfferTests(BackendCase):
    def test_features_offered(self) -> None:
        offered = self.fe.u64(F.GET_FEATURES)
        for bit in (VIRTIO_F_VERSION_1, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_EVENT_IDX, VHOST_F_LOG_ALL,
                    VHOST_USER_F_PROTOCOL_FEATURES, Echo.features):
            self.assertTrue(offered & bit, hex(bit))
        self.assertTrue(offered & VIRTIO_F_RING_PACKED)
        self.assertFalse(offered & VIRTIO_F_ACCESS_PLATFORM)

    def test_protocol_features_follow_the_hooks(self) -> None:
        offered = P(self.fe.u64(F.GET_PROTOCOL_FEATURES))
        base = (P.MQ | P.LOG_SHMFD | P.REPLY_ACK | P.BACKEND_REQ | P.BACKEND_SEND_FD | P.RESET_DEVICE
                | P.CONFIGURE_MEM_SLOTS | P.STATUS | P.INFLIGHT_SHMFD | P.CONFIG)
        self.assertEqual(offered, base)
        full = Backend(Full(), Connection.pair()[1])
        try:
            for extra in (P.DEVICE_STATE, P.RARP, P.NET_MTU, P.SHARED_OBJECT, P.SHMEM):
                self.assertTrue(full.offered_protocol_features & extra, extra)
        finally:
            full.device.close()
            full.close()
        rng = Backend(Rng(), Connection.pair()[1])
        self.assertFalse(rng.offered_protocol_features & P.CONFIG)      # no get_config: not offered
        rng.close()

    def test_queue_num_and_mem_slots(self) -> None:
        self.fe.send(F.SET_PROTOCOL_FEATURES, pack_u64(P.MQ | P.CONFIGURE_MEM_SLOTS))
        self.assertEqual(self.fe.u64(F.GET_QUEUE_NUM), 2)
        self.assertEqual(self.fe.u64(F.GET_MAX_MEM_SLOTS), MAX_MEM_SLOTS)
        self.assertEqual(MAX_MEM_SLOTS, 509)


class HandshakeTests(BackendCase):
    def test_qemu_order(self) -> None:
        """QEMU 7.2 (PEERS.md): realize, then driver ready, then stop; every byte checked."""
        fe = self.fe
        rings = [self.ring(0), self.ring(1)]
        # realize
        offered = fe.u64(F.GET_FEATURES)
        protocol = fe.u64(F.GET_PROTOCOL_FEATURES) & QEMU_PROTOCOL
        fe.send(F.SET_PROTOCOL_FEATURES, pack_u64(protocol))
        self.assertEqual(fe.u64(F.GET_QUEUE_NUM), 2)
        self.assertEqual(fe.u64(F.GET_MAX_MEM_SLOTS), 509)
        channel, channel_peer = socket.socketpair()
        self.addCleanup(channel_peer.close)
        self.assertEqual(fe.ack(F.SET_BACKEND_REQ_FD, b"", [channel.fileno()]), 0)
        channel.close()
        fe.send(F.SET_OWNER)
        self.assertEqual(fe.u64(F.GET_FEATURES), offered)
        for ring in rings:
            fe.send(F.SET_VRING_CALL, VringFd(ring.index, False).pack(), [ring.call])
            fe.send(F.SET_VRING_ERR, VringFd(ring.index, False).pack(), [ring.err])
        with fe.request(F.GET_CONFIG, Config(0, 8, 0, bytes(8)).pack()) as reply:
            self.assertEqual(Config.unpack(reply.payload).data, b"echo-cfg")
        # driver ready
        features = DRIVER_FEATURES & offered
        fe.send(F.SET_FEATURES, pack_u64(features))
        for ring in rings:
            fe.send(F.SET_VRING_CALL, VringFd(ring.index, False).pack(), [ring.call])
        for region, fd in zip(self.ram.regions, self.ram.fds):
            self.assertEqual(fe.ack(F.ADD_MEM_REG, region.pack_single(), [fd]), 0)
        for ring in rings:
            ring.setup(fe, need_reply=True)
        self.assertEqual(self.device.events[0], ("features", features))
        self.assertEqual(self.backend.features, features)
        self.assertEqual(self.backend.protocol_features, protocol)
        # requests on both queues
        self.assertEqual(self.roundtrip(rings[0], b"hello", b"world!"), [b"olleh\x00", b"!dlrow\x00"])
        self.assertEqual(self.roundtrip(rings[1], b"abc"), [b"cba\x01"])
        self.assertEqual(self.device.events[1:], [("started", 0), ("started", 1)])
        # stop
        for ring in rings:
            fe.send(F.SET_VRING_ENABLE, VringState(ring.index, 0).pack())
        with fe.request(F.GET_VRING_BASE, VringState(0, 0).pack()) as reply:
            self.assertEqual(VringState.unpack(reply.payload), (0, 2))
        with fe.request(F.GET_VRING_BASE, VringState(1, 0).pack()) as reply:
            self.assertEqual(VringState.unpack(reply.payload), (1, 1))
        self.assertEqual(self.device.events[-2:], [("stopped", 0), ("stopped", 1)])
        self.assertTrue(self.backend.suspended)
        self.assertFalse(fired(rings[0].err))

    def test_packed_base_with_only_the_avail_half(self) -> None:
        """DPDK sends a packed ring's SET_VRING_BASE as 0x8000 (avail half only; used = avail);
        QEMU sends all 32 bits. Both come back from GET_VRING_BASE as full positions."""
        fe = self.fe
        offered = fe.u64(F.GET_FEATURES)
        fe.send(F.SET_OWNER)
        self.assertEqual(fe.ack(F.SET_FEATURES, pack_u64((DRIVER_FEATURES | VIRTIO_F_RING_PACKED) & offered)), 0)
        for sent, kept in ((0x8005, 0x8005_8005), (0x8003_8005, 0x8003_8005), (0x0005, 0x0005)):
            with self.subTest(sent=hex(sent)):
                self.assertEqual(fe.ack(F.SET_VRING_BASE, VringState(0, sent).pack()), 0)
                with fe.request(F.GET_VRING_BASE, VringState(0, 0).pack()) as reply:
                    self.assertEqual(VringState.unpack(reply.payload), (0, kept))

    def test_dpdk_order(self) -> None:
        """DPDK virtio-user: SET_OWNER first, SET_VRING_CALL before SET_FEATURES, STATUS, and the
        ring addresses before the memory table (the queue is built lazily)."""
        self.backend.close()
        self.fe.close()
        a, b = Connection.pair()
        rng = Rng(seed=11)
        self.backend = Backend(rng, b)
        self.addCleanup(self.backend.close)
        fe = self.fe = Frontend(a, self.backend)
        self.addCleanup(fe.close)
        ring = self.ring(0)
        fe.send(F.SET_OWNER)
        offered = fe.u64(F.GET_FEATURES)
        protocol = fe.u64(F.GET_PROTOCOL_FEATURES) & DPDK_PROTOCOL
        self.assertEqual(protocol, DPDK_PROTOCOL)
        fe.send(F.SET_PROTOCOL_FEATURES, pack_u64(protocol))
        self.assertEqual(fe.u64(F.GET_QUEUE_NUM), 1)
        self.assertEqual(fe.ack(F.SET_VRING_CALL, VringFd(0, False).pack(), [ring.call]), 0)
        self.assertEqual(fe.ack(F.SET_FEATURES, pack_u64(DRIVER_FEATURES & offered)), 0)
        status = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
        self.assertEqual(fe.ack(F.SET_STATUS, pack_u64(status)), 0)
        self.assertEqual(fe.u64(F.GET_STATUS), status)
        self.assertEqual(fe.ack(F.SET_VRING_NUM, VringState(0, ring.size).pack()), 0)
        self.assertEqual(fe.ack(F.SET_VRING_BASE, VringState(0, 0).pack()), 0)
        self.assertEqual(fe.ack(F.SET_VRING_ADDR, ring.addr().pack()), 0)      # no memory yet
        self.assertEqual(fe.ack(F.SET_MEM_TABLE, self.ram.table(), self.ram.fds), 0)
        self.assertEqual(fe.ack(F.SET_VRING_KICK, VringFd(0, False).pack(), [ring.kick]), 0)
        self.assertEqual(fe.ack(F.SET_VRING_ENABLE, VringState(0, 1).pack()), 0)
        self.assertEqual(fe.ack(F.SET_STATUS, pack_u64(status | DeviceStatus.DRIVER_OK)), 0)
        self.assertEqual(fe.u64(F.GET_STATUS), 0xF)
        expect = random.Random(11)
        replies = self.roundtrip(ring, b"", b"")
        self.assertEqual(replies, [expect.randbytes(64), expect.randbytes(64)])

    def test_memory_by_slots(self) -> None:
        """ADD_MEM_REG / REM_MEM_REG with two memfd regions; the ring lives in the second."""
        self.ram.close()
        self.ram = Ram((0, 0x40000), (0x100000, 0x40000))
        self.addCleanup(self.ram.close)
        self.fe.negotiate()
        for region, fd in zip(self.ram.regions, self.ram.fds):
            self.assertEqual(self.fe.ack(F.ADD_MEM_REG, region.pack_single(), [fd]), 0)
        self.assertEqual(len(self.backend.memory.regions), 2)
        ring = DriverRing(self.ram, 0, base=0x100000)
        self.addCleanup(ring.close)
        ring.setup(self.fe)
        self.assertEqual(self.roundtrip(ring, b"slot"), [b"tols\x00"])
        self.assertEqual(self.fe.ack(F.REM_MEM_REG, self.ram.regions[0].pack_single()), 0)
        self.assertEqual(self.roundtrip(ring, b"still"), [b"llits\x00"])
        # REM_MEM_REG with an fd (old front-ends): accepted, the fd closed unused.
        self.assertEqual(self.fe.ack(F.REM_MEM_REG, self.ram.regions[1].pack_single(), [self.ram.fds[1]]), 0)
        self.assertEqual(self.backend.memory.regions, ())
        # The ring's memory is gone (a hotplug between REM and ADD): it waits, it is not broken.
        ring.add(b"later")
        ring.kick_now()
        pump(self.backend)
        self.assertTrue(self.backend.rings[0].unmapped)
        self.assertFalse(self.backend.rings[0].broken)
        self.assertEqual(self.fe.ack(F.ADD_MEM_REG, self.ram.regions[1].pack_single(), [self.ram.fds[1]]), 0)
        self.assertTrue(fired(ring.call))
        self.assertEqual(ring.replies(), [b"retal\x00"])
        self.assertEqual(self.fe.ack(F.REM_MEM_REG, self.ram.regions[1].pack_single()), 0)
        self.assertEqual(self.fe.ack(F.REM_MEM_REG, self.ram.regions[1].pack_single()), errno.EFAULT)
        self.assertIsInstance(self.backend.last_error, GuestMemoryError)

    def test_the_same_region_added_twice_is_shared(self) -> None:
        """QEMU's multi-queue vhost-user-net adds each region once per queue pair on one connection
        (a vhost_dev per pair): the same region again is one more user, not an overlap; it stays
        mapped until every user has removed it. A different region over it is still refused."""
        self.fe.negotiate()
        region, fd = self.ram.regions[0], self.ram.fds[0]
        for _ in range(2):
            self.assertEqual(self.fe.ack(F.ADD_MEM_REG, region.pack_single(), [fd]), 0)
        self.assertEqual(len(self.backend.memory.regions), 1)
        ring = DriverRing(self.ram, 0)
        self.addCleanup(ring.close)
        ring.setup(self.fe)
        self.assertEqual(self.fe.ack(F.REM_MEM_REG, region.pack_single()), 0)
        self.assertEqual(len(self.backend.memory.regions), 1)          # the other user still has it
        self.assertEqual(self.roundtrip(ring, b"slot"), [b"tols\x00"])
        self.assertEqual(self.fe.ack(F.REM_MEM_REG, region.pack_single()), 0)
        self.assertEqual(self.backend.memory.regions, ())
        moved = MemoryRegion(region.guest_phys_addr, region.memory_size, region.userspace_addr + 0x100000, 0)
        self.assertEqual(self.fe.ack(F.ADD_MEM_REG, region.pack_single(), [fd]), 0)
        self.assertEqual(self.fe.ack(F.ADD_MEM_REG, moved.pack_single(), [fd]), errno.EFAULT)

    def test_set_mem_table_replaces_and_rings_follow(self) -> None:
        ring = self.ring(0)
        self.ready(ring)
        self.assertEqual(self.roundtrip(ring, b"one"), [b"eno\x00"])
        old_queue = self.backend.rings[0].queue
        # The same RAM announced at other guest addresses... and user addresses: the ring (user
        # addresses) moves with it, the queue is rebuilt and goes on from where it was.
        moved = MemoryRegion(0x4000_0000, RAM_SIZE, UVA_BASE, 0)
        self.assertEqual(self.fe.ack(F.SET_MEM_TABLE, MemoryTable((moved,)).pack(), self.ram.fds), 0)
        self.assertEqual(self.backend.memory.regions[0].gpa, 0x4000_0000)
        self.assertIsNot(self.backend.rings[0].queue, old_queue)      # rebuilt for the new addresses
        self.assertEqual(self.backend.rings[0].queue.desc_addr, 0x4000_0000 + ring.lay["desc"])
        del old_queue
        # The driver still speaks in the old guest addresses, so point its buffers at the new ones.
        ring.data += 0x4000_0000
        self.ram.memory.add_region(0x4000_0000, RAM_SIZE, fd=self.ram.fds[0])
        self.assertEqual(self.roundtrip(ring, b"two"), [b"owt\x00"])
        with self.fe.request(F.GET_VRING_BASE, VringState(0, 0).pack()) as reply:
            self.assertEqual(VringState.unpack(reply.payload).num, 2)


class RingStateTests(BackendCase):
    def test_get_vring_base_stops_keeps_state_and_kick_resumes(self) -> None:
        ring = self.ring(0)
        self.ready(ring)
        self.assertEqual(self.roundtrip(ring, b"a", b"b", b"c"), [b"a\x00", b"b\x00", b"c\x00"])
        vq = self.backend.rings[0].queue
        with self.fe.request(F.GET_VRING_BASE, VringState(0, 0).pack()) as reply:
            self.assertEqual(VringState.unpack(reply.payload), (0, 3))
        state = self.backend.rings[0]
        self.assertFalse(state.started)
        self.assertTrue(state.enabled)                   # the enable state is remembered
        self.assertIs(state.queue, vq)                   # stopped, not reset
        self.assertTrue(self.backend.suspended)
        # A stopped ring is not touched, whatever else happens (messages, polls, enable).
        ring.add(b"d")
        ring.queue.publish()
        self.fe.send(F.SET_VRING_ENABLE, VringState(0, 1).pack())
        self.backend.poll()
        self.assertEqual(ring.queue.reap(), [])
        with self.fe.request(F.GET_VRING_BASE, VringState(0, 0).pack()) as reply:
            self.assertEqual(VringState.unpack(reply.payload), (0, 3))      # still 3: nothing consumed
        # Stopped for good: the kick fd is dropped (libvhost-user, rust-vmm, DPDK), so a stray kick on
        # it does nothing, even with SET_VRING_BASE sent.
        self.assertIsNone(state.kick_fd)
        self.assertNotIn(ring.kick, self.backend.watched())
        self.fe.send(F.SET_VRING_BASE, VringState(0, 3).pack())
        os.eventfd_write(ring.kick, 1)
        pump(self.backend)
        self.assertFalse(state.started)
        self.assertEqual(ring.queue.reap(), [])
        # SET_VRING_KICK re-arms it; its kick starts it again, resuming at 3.
        self.fe.send(F.SET_VRING_KICK, VringFd(0, False).pack(), [ring.kick])
        pump(self.backend)
        self.assertTrue(state.started)
        self.assertEqual(ring.replies(), [b"d\x00"])
        with self.fe.request(F.GET_VRING_BASE, VringState(0, 0).pack()) as reply:
            self.assertEqual(VringState.unpack(reply.payload), (0, 4))
        # Without SET_VRING_BASE the kept state is used.
        self.fe.send(F.SET_VRING_KICK, VringFd(0, False).pack(), [ring.kick])
        self.assertEqual(self.roundtrip(ring, b"e"), [b"e\x00"])
        self.assertEqual([e for e in self.device.events if e[0] in ("started", "stopped")],
                         [("started", 0), ("stopped", 0), ("started", 0), ("stopped", 0), ("started", 0)])

    def test_ring_starts_on_kick_not_before(self) -> None:
        ring = self.ring(0)
        self.ready(ring)
        state = self.backend.rings[0]
        self.assertTrue(state.enabled)
        self.assertFalse(state.started)
        self.assertIsNone(state.queue)                   # built lazily, when first processed
        ring.add(b"x")
        ring.queue.publish()
        self.backend.poll()
        self.assertFalse(state.started)
        self.assertEqual(ring.queue.reap(), [])
        os.eventfd_write(ring.kick, 1)
        pump(self.backend)
        self.assertTrue(state.started)
        self.assertEqual(ring.replies(), [b"x\x00"])

    def test_rings_enabled_at_once_without_protocol_features(self) -> None:
        rings = [self.ring(0), self.ring(1)]
        features = DRIVER_FEATURES & ~VHOST_USER_F_PROTOCOL_FEATURES
        self.fe.negotiate(features)
        self.assertTrue(all(r.enabled for r in self.backend.rings))
        self.set_memory()
        for ring in rings:
            ring.setup(self.fe, enable=None)            # no SET_VRING_ENABLE (it would be refused)
        self.assertEqual(self.roundtrip(rings[0], b"legacy"), [b"ycagel\x00"])
        self.assertEqual(self.roundtrip(rings[1], b"too"), [b"oot\x01"])
        self.assertEqual(self.fe.ack(F.SET_VRING_ENABLE, VringState(0, 0).pack()), errno.EPROTO)
        self.assertIsInstance(self.backend.last_error, NotNegotiatedError)

    def test_with_protocol_features_rings_start_disabled(self) -> None:
        ring = self.ring(0)
        self.ready(ring)
        self.fe.send(F.SET_VRING_ENABLE, VringState(0, 0).pack())
        self.assertFalse(self.backend.rings[0].enabled)

    def test_started_but_disabled_leaves_chains_until_enabled(self) -> None:
        ring = self.ring(0)
        self.fe.negotiate()
        self.set_memory()
        ring.setup(self.fe, enable=None)
        ring.add(b"wait")
        ring.kick_now()
        pump(self.backend)
        state = self.backend.rings[0]
        self.assertTrue(state.started)
        self.assertFalse(state.enabled)
        self.assertEqual(ring.queue.reap(), [])          # no side effects while disabled
        self.assertFalse(fired(ring.call))
        self.fe.send(F.SET_VRING_ENABLE, VringState(0, 1).pack())     # no new kick needed
        self.assertTrue(fired(ring.call))
        self.assertEqual(ring.replies(), [b"tiaw\x00"])

    def test_disabled_ring_discard_hook(self) -> None:
        class Tx(Echo):
            def process_disabled(self, queue, vq):
                self.discard(queue, vq)

        self.backend.close()
        self.fe.close()
        a, b = Connection.pair()
        self.device = Tx()
        self.backend = Backend(self.device, b)
        self.addCleanup(self.backend.close)
        self.fe = Frontend(a, self.backend)
        self.addCleanup(self.fe.close)
        ring = self.ring(0)
        self.fe.negotiate()
        self.set_memory()
        ring.setup(self.fe, enable=None)
        ring.add(b"dropped")
        ring.kick_now()
        pump(self.backend)
        self.assertEqual(ring.queue.reap(), [(ring.data + 0x1000, 0)])  # used with 0 bytes, not echoed

    def test_poll_mode_kick_nofd(self) -> None:
        ring = self.ring(0)
        self.fe.negotiate()
        self.set_memory()
        for request, payload in ((F.SET_VRING_NUM, VringState(0, 8).pack()),
                                 (F.SET_VRING_BASE, VringState(0, 0).pack()),
                                 (F.SET_VRING_ADDR, ring.addr().pack()), (F.SET_VRING_ENABLE, VringState(0, 1).pack())):
            self.fe.send(request, payload)
        self.fe.send(F.SET_VRING_CALL, VringFd(0, False).pack(), [ring.call])
        self.assertEqual(self.backend.poll_interval, None)
        self.fe.send(F.SET_VRING_KICK, VringFd(0, True).pack())
        self.assertTrue(self.backend.rings[0].started)            # no kick will come: started now
        self.assertEqual(self.backend.poll_interval, POLL_INTERVAL)
        ring.add(b"polled")
        ring.queue.publish()                                       # no kick
        self.backend.poll()
        self.assertEqual(ring.replies(), [b"dellop\x00"])
        ring.add(b"after a message")
        ring.queue.publish()
        self.fe.u64(F.GET_FEATURES)                                # processed after every message
        self.assertEqual(ring.replies(), [b"egassem a retfa\x00"])

    def test_reset_device(self) -> None:
        ring = self.ring(0)
        self.ready(ring)
        self.roundtrip(ring, b"x")
        self.assertEqual(self.fe.ack(F.RESET_DEVICE), 0)
        state = self.backend.rings[0]
        self.assertEqual((state.started, state.enabled, state.size, state.kick_fd, state.queue),
                         (False, False, 0, None, None))
        self.assertEqual(self.backend.features, 0)
        self.assertIn(("reset",), self.device.events)
        self.assertEqual(len(self.backend.memory.regions), 1)      # the connection's memory stays
        self.assertEqual(set(self.backend.watched()), {self.backend.fileno(), self.backend._completions.fd})   # no kick fd

    def test_reset_owner_disables_rings(self) -> None:
        ring = self.ring(0)
        self.ready(ring)
        self.fe.send(F.RESET_OWNER)
        self.assertFalse(self.backend.rings[0].enabled)


class ReplyAckTests(BackendCase):
    device_class = Full

    def test_every_request_with_need_reply(self) -> None:
        """Each of the 44 requests with NEED_REPLY: exactly one answer -- the explicit reply where
        the request has one, else a u64 that is 0 on success and the errno on failure."""
        fe, seen = self.fe, set()
        ring = self.ring(0)

        def ack(request, payload=b"", fds=(), expect=0):
            seen.add(request)
            self.assertEqual(fe.ack(request, payload, fds), expect, request)
            self.assertFalse(fe.pending(), f"{request.name}: more than one answer")

        def explicit(request, payload=b"", fds=(), validate=True):
            seen.add(request)
            reply = fe.request(request, payload, fds, need_reply=True, validate=validate)
            self.assertFalse(fe.pending(), f"{request.name}: more than one answer")
            self.addCleanup(reply.close)
            return reply

        offered = explicit(F.GET_FEATURES).u64()
        protocol = P(explicit(F.GET_PROTOCOL_FEATURES).u64()) & ~P.INBAND_NOTIFICATIONS
        ack(F.SET_PROTOCOL_FEATURES, pack_u64(protocol))
        ack(F.SET_OWNER)
        ack(F.SET_FEATURES, pack_u64(offered & ~VIRTIO_F_RING_PACKED))
        ack(F.RESET_OWNER)
        self.assertEqual(explicit(F.GET_QUEUE_NUM).u64(), 2)
        self.assertEqual(explicit(F.GET_MAX_MEM_SLOTS).u64(), 509)
        ack(F.SET_MEM_TABLE, self.ram.table(), self.ram.fds)
        extra_fd = memfd(0x10000)
        extra = MemoryRegion(0x200000, 0x10000, UVA_BASE + 0x200000, 0)
        ack(F.ADD_MEM_REG, extra.pack_single(), [extra_fd])
        ack(F.REM_MEM_REG, extra.pack_single())
        os.close(extra_fd)
        log_fd = memfd(0x1000)
        self.assertEqual(explicit(F.SET_LOG_BASE, Log(0x1000, 0).pack(), [log_fd]).u64(), 0)
        os.close(log_fd)
        ack(F.SET_LOG_FD, b"", [ring.err])
        ack(F.SET_VRING_NUM, VringState(0, 8).pack())
        ack(F.SET_VRING_BASE, VringState(0, 0).pack())
        ack(F.SET_VRING_ADDR, ring.addr().pack())
        ack(F.SET_VRING_KICK, VringFd(0, False).pack(), [ring.kick])
        ack(F.SET_VRING_CALL, VringFd(0, False).pack(), [ring.call])
        ack(F.SET_VRING_ERR, VringFd(0, False).pack(), [ring.err])
        ack(F.SET_VRING_ENABLE, VringState(0, 1).pack())
        ack(F.VRING_KICK, VringState(0, 0).pack(), expect=errno.EPROTO)       # INBAND not negotiated
        self.assertEqual(VringState.unpack(explicit(F.GET_VRING_BASE, VringState(0, 0).pack()).payload), (0, 0))
        ack(F.SEND_RARP, b"\x52\x54\x00\x12\x34\x56\x00\x00")
        ack(F.NET_SET_MTU, pack_u64(1500))
        ack(F.NET_SET_MTU, pack_u64(10), expect=errno.EINVAL)                 # the device refuses it
        a, b = socket.socketpair()
        ack(F.SET_BACKEND_REQ_FD, b"", [a.fileno()])
        a.close()
        self.addCleanup(b.close)
        iotlb = IotlbMsg(0, 0x1000, UVA_BASE, 3, 2).pack()
        self.assertEqual(explicit(F.IOTLB_MSG, iotlb).u64(), errno.EPROTO)     # no ACCESS_PLATFORM
        ack(F.SET_VRING_ENDIAN, VringState(0, 0).pack(), expect=errno.EPROTO)  # CROSS_ENDIAN not offered
        self.assertEqual(Config.unpack(explicit(F.GET_CONFIG, Config(0, 4, 0, bytes(4)).pack()).payload).data, b"echo")
        ack(F.SET_CONFIG, Config(8, 2, 0, b"hi").pack())
        ack(F.SET_CONFIG, Config(0, 2, 0, b"no").pack(), expect=errno.EOPNOTSUPP)
        ack(F.CLOSE_CRYPTO_SESSION, pack_u64(1), expect=errno.EPROTO)
        advise = explicit(F.POSTCOPY_ADVISE, validate=False)                 # the error: empty, no fd
        self.assertEqual((advise.payload, advise.fds), (b"", []))
        ack(F.POSTCOPY_LISTEN, expect=errno.EPROTO)
        self.assertEqual(explicit(F.POSTCOPY_END).u64(), errno.EPROTO)
        reply = explicit(F.GET_INFLIGHT_FD, Inflight(0, 0, 2, 8).pack())
        inflight = Inflight.unpack(reply.payload)
        self.assertEqual((inflight.num_queues, inflight.queue_size, inflight.mmap_offset), (2, 8, 0))
        self.assertGreater(inflight.mmap_size, 0)
        ack(F.SET_INFLIGHT_FD, reply.payload, reply.fds)
        gpu_a, gpu_b = socket.socketpair()
        ack(F.GPU_SET_SOCKET, b"", [gpu_a.fileno()], expect=errno.EOPNOTSUPP)
        gpu_a.close()
        gpu_b.close()
        ack(F.SET_STATUS, pack_u64(0xF))
        self.assertEqual(explicit(F.GET_STATUS).u64(), 0xF)
        shared = explicit(F.GET_SHARED_OBJECT, SharedObject(self.device.uuid).pack())
        self.assertEqual((shared.u64(), len(shared.fds)), (0, 1))
        self.assertEqual(os.fstat(shared.fds[0]).st_ino, os.fstat(self.device.shared_fd).st_ino)
        r, w = os.pipe()
        self.assertEqual(explicit(F.SET_DEVICE_STATE_FD, DeviceState(0, 0).pack(), [w]).u64(),
                         VHOST_USER_VRING_NOFD_MASK)
        os.close(w)
        with os.fdopen(r, "rb") as pipe:
            self.assertEqual(pipe.read(), self.device.state)
        self.assertEqual(explicit(F.CHECK_DEVICE_STATE).u64(), 0)
        config = ShmemConfig.unpack(explicit(F.GET_SHMEM_CONFIG).payload)
        self.assertEqual((config.nregions, config.memory_sizes[:3]), (1, (0, 0x10000, 0)))
        ack(F.RESET_DEVICE)
        # The one with a value reply and nothing to say: the connection is closed (no answer).
        seen.add(F.CREATE_CRYPTO_SESSION)
        fe.send(F.CREATE_CRYPTO_SESSION, bytes(16), need_reply=True)
        self.assertTrue(fe.peer_closed(0))
        self.assertTrue(self.backend.closed)
        self.assertEqual(seen, set(FrontendRequest))

    def test_explicit_reply_is_not_doubled(self) -> None:
        self.fe.send(F.SET_PROTOCOL_FEATURES, pack_u64(P.REPLY_ACK))
        with self.fe.request(F.GET_FEATURES, need_reply=True) as reply:
            self.assertEqual(reply.u64(), self.backend.offered_features)
        self.assertFalse(self.fe.pending())

    def test_no_answer_without_need_reply(self) -> None:
        self.fe.send(F.SET_OWNER)
        self.fe.send(F.SET_VRING_NUM, VringState(9, 8).pack())     # rejected, but nobody asked
        self.assertFalse(self.fe.pending())
        self.assertIsInstance(self.backend.last_error, ProtocolError)


class ConfigTests(BackendCase):
    def test_get_and_set_config(self) -> None:
        self.fe.negotiate()
        with self.fe.request(F.GET_CONFIG, Config(0, 16, 0, bytes(16)).pack()) as reply:
            self.assertEqual(Config.unpack(reply.payload), (0, 16, 0, b"echo-cfg" + bytes(8)))
        self.assertEqual(self.fe.ack(F.SET_CONFIG, Config(10, 3, 0, b"xyz").pack()), 0)
        with self.fe.request(F.GET_CONFIG, Config(8, 8, 0, bytes(8)).pack()) as reply:
            self.assertEqual(Config.unpack(reply.payload), (8, 8, 0, b"\x00\x00xyz\x00\x00\x00"))
        # Read-only field: refused with the errno (EOPNOTSUPP), the config unchanged.
        self.assertEqual(self.fe.ack(F.SET_CONFIG, Config(0, 4, 0, b"XXXX").pack()), errno.EOPNOTSUPP)
        self.assertEqual(bytes(self.device.config[:4]), b"echo")

    def test_get_config_error_is_an_empty_reply(self) -> None:
        self.fe.negotiate()
        with self.fe.request(F.GET_CONFIG, Config(8, 32, 0, bytes(32)).pack()) as reply:
            self.assertEqual(reply.payload, b"")        # the device refused: zero-size payload
        self.assertFalse(self.backend.closed)
        self.assertEqual(self.fe.u64(F.GET_QUEUE_NUM), 2)

    def test_get_config_without_config_feature(self) -> None:
        self.fe.negotiate(protocol=QEMU_PROTOCOL & ~P.CONFIG)
        with self.fe.request(F.GET_CONFIG, Config(0, 4, 0, bytes(4)).pack()) as reply:
            self.assertEqual(reply.payload, b"")
        self.assertIsInstance(self.backend.last_error, NotNegotiatedError)


class NotificationTests(BackendCase):
    def test_config_change_held_while_suspended(self) -> None:
        ring = self.ring(0)
        channel, peer = Connection.pair(requests=BackendRequest)
        self.addCleanup(peer.close)
        self.ready(ring)
        self.fe.send(F.SET_BACKEND_REQ_FD, b"", [channel.fileno()])
        channel.close()
        self.assertFalse(self.backend.notify_config_change())     # all rings stopped: held back
        self.assertFalse(select.select([peer.fileno()], [], [], 0)[0])
        self.roundtrip(ring, b"go")                                # a ring starts: sent
        with peer.recv() as msg:
            self.assertEqual((msg.request, msg.payload), (BackendRequest.CONFIG_CHANGE_MSG, b""))
        self.assertTrue(self.backend.notify_config_change())       # running: sent at once
        with peer.recv() as msg:
            self.assertEqual(msg.request, BackendRequest.CONFIG_CHANGE_MSG)

    def test_config_change_needs_config_and_channel(self) -> None:
        self.fe.negotiate(protocol=QEMU_PROTOCOL & ~P.CONFIG)
        with self.assertRaises(NotNegotiatedError):
            self.backend.notify_config_change()

    def test_inband_only_where_the_device_asks_for_it(self) -> None:
        """QEMU 7.2 acks INBAND_NOTIFICATIONS but implements neither BACKEND_VRING_CALL nor _ERR:
        offered only by a device that asks for it."""
        self.assertFalse(self.fe.u64(F.GET_PROTOCOL_FEATURES) & P.INBAND_NOTIFICATIONS)
        self.serve_instead(InbandEcho())
        self.assertTrue(self.fe.u64(F.GET_PROTOCOL_FEATURES) & P.INBAND_NOTIFICATIONS)

    def test_inband_kick_and_call(self) -> None:
        self.serve_instead(InbandEcho())
        ring = self.ring(0)
        protocol = QEMU_PROTOCOL | P.INBAND_NOTIFICATIONS
        self.fe.negotiate(protocol=protocol)
        self.assertEqual(self.backend.protocol_features, protocol)
        self.set_memory()
        channel, peer = Connection.pair(requests=BackendRequest)
        self.fe.send(F.SET_BACKEND_REQ_FD, b"", [channel.fileno()])
        channel.close()
        for request, payload in ((F.SET_VRING_NUM, VringState(0, 8).pack()),
                                 (F.SET_VRING_BASE, VringState(0, 0).pack()),
                                 (F.SET_VRING_ADDR, ring.addr().pack()), (F.SET_VRING_ENABLE, VringState(0, 1).pack())):
            self.fe.send(request, payload)
        calls = []

        def front_end_channel():          # answers each in-band call, as REPLY_ACK requires
            with peer:
                while True:
                    try:
                        msg = peer.recv()
                    except DisconnectedError:
                        return
                    calls.append((msg.request, VringState.unpack(msg.payload), msg.need_reply))
                    peer.reply_u64(msg, 0)

        thread = threading.Thread(target=front_end_channel)
        thread.start()
        ring.add(b"inband")
        ring.queue.publish()
        self.fe.send(F.VRING_KICK, VringState(0, 0).pack())        # starts the ring and processes it
        self.assertEqual(ring.replies(), [b"dnabni\x00"])
        self.backend.close()
        thread.join(TIMEOUT)
        self.assertEqual(calls, [(BackendRequest.VRING_CALL, (0, 0), True)])

    def test_inband_needs_backend_req_and_reply_ack(self) -> None:
        self.serve_instead(InbandEcho())
        self.assertEqual(self.fe.ack(F.SET_PROTOCOL_FEATURES, pack_u64(P.INBAND_NOTIFICATIONS | P.REPLY_ACK)),
                         errno.EPROTO)
        self.assertTrue(self.fe.peer_closed(0))                    # then the spec's "should close"
        self.assertIsInstance(self.backend.last_error, ProtocolError)


class DataPathErrorTests(BackendCase):
    def test_handle_errors_use_the_chain_with_zero_bytes(self) -> None:
        ring = self.ring(0)
        self.ready(ring)
        with self.assertLogs("vhost_min.device", "WARNING") as logs:
            replies = self.roundtrip(ring, b"raise-vhost", b"raise-bug", b"ok")
        self.assertEqual(replies, [b"", b"", b"ko\x00"])
        self.assertFalse(self.backend.rings[0].broken)
        self.assertTrue(any("asked to fail" in line for line in logs.output))
        self.assertTrue(any("handle() raised" in line for line in logs.output))

    def test_bad_length_from_handle(self) -> None:
        class Liar(Echo):
            def handle(self, queue, readable, writable):
                return 10_000

        self.backend.close()
        self.fe.close()
        a, b = Connection.pair()
        self.backend = Backend(Liar(), b)
        self.addCleanup(self.backend.close)
        self.fe = Frontend(a, self.backend)
        self.addCleanup(self.fe.close)
        ring = self.ring(0)
        self.ready(ring)
        with self.assertLogs("vhost_min.device", "WARNING"):
            self.assertEqual(self.roundtrip(ring, b"x"), [b""])

    def test_driver_bug_breaks_the_ring_and_signals_err(self) -> None:
        ring = self.ring(0)
        self.ready(ring)
        self.roundtrip(ring, b"fine")
        # The driver publishes a head beyond the queue size.
        avail = ring.lay["driver"]
        self.ram.memory.write(avail + 4 + 2 * 1, (200).to_bytes(2, "little"))
        self.ram.memory.write(avail + 2, (2).to_bytes(2, "little"))
        os.eventfd_write(ring.kick, 1)
        with self.assertLogs("vhost_min.backend", "ERROR"):
            pump(self.backend)
        self.assertTrue(self.backend.rings[0].broken)
        self.assertIsInstance(self.backend.last_error, VirtqueueError)
        self.assertEqual(fired(ring.err), 1)
        self.fe.send(F.SET_PROTOCOL_FEATURES, pack_u64(QEMU_PROTOCOL | P.STATUS))
        self.assertTrue(self.fe.u64(F.GET_STATUS) & DeviceStatus.DEVICE_NEEDS_RESET)
        os.eventfd_write(ring.kick, 1)
        pump(self.backend)                                          # no longer processed
        self.assertFalse(fired(ring.err))
        # Setting the ring up again clears it: it is rebuilt and looked at at once -- the bad
        # head is still there, so it breaks again; resuming past it (SET_VRING_BASE) works.
        self.fe.send(F.SET_VRING_ADDR, ring.addr().pack())
        self.assertEqual(fired(ring.err), 1)
        self.fe.send(F.SET_VRING_BASE, VringState(0, 2).pack())
        self.assertIsNone(self.backend.rings[0].broken)
        self.assertEqual(self.backend.rings[0].queue.get_base(), 2)
        self.assertFalse(fired(ring.err))

    def test_process_exception_breaks_only_that_ring(self) -> None:
        class Flaky(Echo):
            def process(self, queue, vq):
                if queue == 1:
                    raise RuntimeError("device bug in process()")
                return super().process(queue, vq)

        self.backend.close()
        self.fe.close()
        a, b = Connection.pair()
        self.backend = Backend(Flaky(), b)
        self.addCleanup(self.backend.close)
        self.fe = Frontend(a, self.backend)
        self.addCleanup(self.fe.close)
        rings = [self.ring(0), self.ring(1)]
        self.ready(*rings)
        rings[1].add(b"x")
        with self.assertLogs("vhost_min.backend", "ERROR"):
            rings[1].kick_now()
            pump(self.backend)
        self.assertTrue(self.backend.rings[1].broken)
        self.assertEqual(fired(rings[1].err), 1)
        self.assertEqual(self.roundtrip(rings[0], b"alive"), [b"evila\x00"])
        self.assertFalse(self.backend.closed)


class LogAndStateTests(BackendCase):
    device_class = Full

    def test_dirty_log(self) -> None:
        ring = self.ring(0)
        self.ready(ring, features=DRIVER_FEATURES | VHOST_F_LOG_ALL)
        log_fd = memfd(0x1000)
        self.addCleanup(os.close, log_fd)
        with self.fe.request(F.SET_LOG_BASE, Log(0x1000, 0).pack(), [log_fd]) as reply:
            self.assertEqual(reply.u64(), 0)
        used_log = 0x80000                      # log_guest_addr: where used-ring writes are logged
        self.fe.send(F.SET_VRING_ADDR, ring.addr(VHOST_VRING_F_LOG, used_log).pack())
        req, rep = ring.add(b"logged")
        ring.kick_now()
        pump(self.backend)
        bitmap = os.pread(log_fd, 0x1000, 0)

        def dirty(gpa):
            page = gpa // 0x1000
            return bool(bitmap[page // 8] >> (page % 8) & 1)

        self.assertTrue(dirty(rep))             # the reply buffer
        self.assertFalse(dirty(req))            # read, not written
        self.assertTrue(dirty(used_log))        # the used ring, at log_guest_addr
        self.assertFalse(dirty(ring.lay["device"]))

    def test_device_state_save_and_load(self) -> None:
        self.fe.negotiate(protocol=QEMU_PROTOCOL | P.DEVICE_STATE)
        r, w = os.pipe()
        with self.fe.request(F.SET_DEVICE_STATE_FD, DeviceState(1, 0).pack(), [r]) as reply:
            self.assertEqual(reply.u64(), VHOST_USER_VRING_NOFD_MASK)
        os.close(r)
        os.write(w, b"new state")
        os.close(w)
        self.assertEqual(self.fe.u64(F.CHECK_DEVICE_STATE), 0)
        self.assertEqual(self.device.loaded, b"new state")
        self.assertEqual(self.fe.u64(F.CHECK_DEVICE_STATE), errno.EPROTO)    # nothing to check

    def test_device_state_check_does_not_hold_up_the_loop(self) -> None:
        """CHECK_DEVICE_STATE while the front-end still holds its end of the pipe (found by
        tests/fuzz.py: the loop, and every connection it serves, waited 30 s): answered from
        poll() once the transfer ends, the loop free meanwhile."""
        self.fe.negotiate(protocol=QEMU_PROTOCOL | P.DEVICE_STATE)
        r, w = os.pipe()
        with self.fe.request(F.SET_DEVICE_STATE_FD, DeviceState(1, 0).pack(), [r]) as reply:
            self.assertEqual(reply.u64(), VHOST_USER_VRING_NOFD_MASK)
        os.close(r)
        start = time.monotonic()
        self.fe.send(F.CHECK_DEVICE_STATE)
        self.assertLess(time.monotonic() - start, 2.0)
        self.assertFalse(self.fe.pending())                 # not answered yet
        self.assertEqual(self.backend.poll_interval, POLL_INTERVAL)
        self.assertEqual(self.fe.u64(F.GET_FEATURES) & Echo.features, Echo.features)   # still served
        os.write(w, b"late state")
        os.close(w)
        deadline = time.monotonic() + TIMEOUT
        while not self.fe.pending() and time.monotonic() < deadline:
            self.backend.poll()
            time.sleep(0.01)
        reply = self.fe.conn.recv()
        self.assertEqual((reply.request, reply.u64()), (F.CHECK_DEVICE_STATE, 0))
        self.assertEqual(self.device.loaded, b"late state")
        self.assertIsNone(self.backend.poll_interval)

    def test_device_state_only_while_suspended(self) -> None:
        ring = self.ring(0)
        self.ready(ring, protocol=QEMU_PROTOCOL | P.DEVICE_STATE)
        self.roundtrip(ring, b"running")
        r, w = os.pipe()
        with self.fe.request(F.SET_DEVICE_STATE_FD, DeviceState(0, 0).pack(), [w]) as reply:
            self.assertEqual(reply.u64(), errno.EPROTO | VHOST_USER_VRING_NOFD_MASK)
        self.assertIn("suspended", str(self.backend.last_error))
        os.close(w)
        self.assertEqual(os.read(r, 1), b"")     # our copy of the write end was closed
        os.close(r)


class PackedTests(BackendCase):
    def test_packed_ring_end_to_end(self) -> None:
        ring = self.ring(0, packed=True)
        self.ready(ring, features=DRIVER_FEATURES | VIRTIO_F_RING_PACKED)
        self.assertEqual(type(self.backend._queue_for(self.backend.rings[0])).__name__, "PackedDeviceQueue")
        self.assertEqual(self.roundtrip(ring, b"packed", b"ring"), [b"dekcap\x00", b"gnir\x00"])
        with self.fe.request(F.GET_VRING_BASE, VringState(0, 0).pack()) as reply:
            base = VringState.unpack(reply.payload).num
        self.assertEqual(base, encode_base(4, 1, 4, 1))          # 2 chains of 2 descriptors each
        self.assertEqual(base, ring.queue.get_base())            # what the driver says
        self.fe.send(F.SET_VRING_BASE, VringState(0, base).pack())
        self.fe.send(F.SET_VRING_KICK, VringFd(0, False).pack(), [ring.kick])   # GET_VRING_BASE dropped it
        self.assertEqual(self.roundtrip(ring, b"again"), [b"niaga\x00"])


class InflightTests(BackendCase):
    def _crash_holding(self, *payloads: bytes):
        """A back-end that pops ``payloads`` and never completes them, then "crashes"; a new
        back-end gets the same inflight region (base 0: the used index, as QEMU does when
        GET_VRING_BASE could not be asked). Returns the ring, set up on the new back-end, unkicked."""
        class Stalls(Echo):
            def process(self, queue, vq):
                vq.pop_batch()              # popped, never completed

        self.backend.close()
        self.fe.close()
        a, b = Connection.pair()
        self.backend = Backend(Stalls(), b)
        fe = Frontend(a, self.backend)
        ring = self.ring(0)
        fe.negotiate()
        self.assertEqual(fe.ack(F.SET_MEM_TABLE, self.ram.table(), self.ram.fds), 0)
        with fe.request(F.GET_INFLIGHT_FD, Inflight(0, 0, 2, ring.size).pack()) as reply:
            inflight, inflight_fd = Inflight.unpack(reply.payload), reply.take_fd()
        self.addCleanup(os.close, inflight_fd)
        fe.send(F.SET_INFLIGHT_FD, inflight.pack(), [inflight_fd])
        ring.setup(fe)
        for payload in payloads:
            ring.add(payload)
        ring.kick_now()
        pump(self.backend)
        self.assertEqual(ring.queue.reap(), [])
        self.backend.close()                 # the back-end "crashes"
        fe.close()
        a, b = Connection.pair()
        self.backend = Backend(self.device, b)
        self.addCleanup(self.backend.close)
        self.fe = fe = Frontend(a, self.backend)
        self.addCleanup(fe.close)
        fe.negotiate()
        self.set_memory()
        fe.send(F.SET_INFLIGHT_FD, inflight.pack(), [inflight_fd])
        ring.setup(fe)
        return ring

    def test_requests_in_flight_are_resubmitted_after_a_restart(self) -> None:
        """A device that crashes with requests in flight: the next backend (same inflight fd)
        handles them again, the driver gets every reply once."""
        ring = self._crash_holding(b"first", b"second")
        ring.add(b"third")
        ring.kick_now()
        pump(self.backend)
        self.assertTrue(fired(ring.call))
        self.assertEqual(ring.replies(), [b"tsrif\x00", b"dnoces\x00", b"driht\x00"])

    def test_a_restarted_backend_kicks_itself_for_requests_in_flight(self) -> None:
        """A front-end that does not kick after handing the region back (QEMU's notifier happens
        to start signalled, ours kicks): the driver waits for exactly the requests in flight and
        will not kick again, so the back-end must look at the ring by itself."""
        ring = self._crash_holding(b"first")  # and no kick from the driver after the restart
        pump(self.backend)
        self.assertTrue(fired(ring.call))
        self.assertEqual(ring.replies(), [b"tsrif\x00"])


class IotlbTests(BackendCase):
    def test_rings_translate_through_the_iotlb(self) -> None:
        class Iommu(Echo):
            features = Echo.features | VIRTIO_F_ACCESS_PLATFORM

        self.backend.close()
        self.fe.close()
        a, b = Connection.pair()
        self.backend = Backend(Iommu(), b)
        self.addCleanup(self.backend.close)
        self.fe = fe = Frontend(a, self.backend)
        self.addCleanup(fe.close)
        ring = self.ring(0)
        fe.negotiate(DRIVER_FEATURES | VIRTIO_F_ACCESS_PLATFORM)
        self.set_memory()
        channel, peer = Connection.pair(requests=BackendRequest)
        self.addCleanup(peer.close)
        fe.send(F.SET_BACKEND_REQ_FD, b"", [channel.fileno()])
        channel.close()
        # IOVA == guest address here (the ring addresses too), mapped 64 KiB at a time on demand.
        ring.setup(fe, uva=0)
        ring.add(b"iommu")
        ring.kick_now()
        for _ in range(10):
            pump(self.backend)
            if not select.select([peer.fileno()], [], [], 0)[0]:
                break
            with peer.recv() as miss_msg:
                miss = IotlbMsg.unpack(miss_msg.payload)
            self.assertEqual((miss_msg.request, miss.type), (BackendRequest.IOTLB_MSG, 1))
            page = miss.iova & ~0xFFFF
            with fe.request(F.IOTLB_MSG, IotlbMsg(page, 0x10000, UVA_BASE + page, 3, 2).pack()) as reply:
                self.assertEqual(reply.u64(), 0)
        self.assertEqual(ring.replies(), [b"ummoi\x00"])
        with fe.request(F.IOTLB_MSG, IotlbMsg(0, 0x1000, 0, 0, 1).pack()) as reply:   # a MISS from the front-end?
            self.assertEqual(reply.u64(), errno.EPROTO)


    def test_vIOMMU_page_entries_and_the_dirty_log_in_guest_physical_pages(self) -> None:
        """As QEMU's intel-iommu does it: IOVAs unrelated to guest addresses, one 4 KiB IOTLB entry
        per page on demand, a ring of 1024 entries (its descriptor table spans four entries), and
        dirty logging on: the log marks guest-physical pages, never IOVA pages."""
        class Iommu(Echo):
            features = Echo.features | VIRTIO_F_ACCESS_PLATFORM

        self.serve_instead(Iommu())
        iova_base = 0xFFF0_0000                   # IOVA = iova_base + gpa
        iova_memory = GuestMemory()
        self.addCleanup(iova_memory.clear)
        for region, fd in zip(self.ram.regions, self.ram.fds):
            iova_memory.add_region(iova_base + region.guest_phys_addr, region.memory_size, fd=fd)
        driver_view = type("IovaRam", (), {"memory": iova_memory})()
        ring = DriverRing(driver_view, 0, size=1024, base=iova_base + 0x10000)
        self.addCleanup(ring.close)
        fe = self.fe
        fe.negotiate(DRIVER_FEATURES | VIRTIO_F_ACCESS_PLATFORM | VHOST_F_LOG_ALL)
        self.set_memory()
        log_fd = memfd(0x1000)
        self.addCleanup(os.close, log_fd)
        with fe.request(F.SET_LOG_BASE, Log(0x1000, 0).pack(), [log_fd]) as reply:
            self.assertEqual(reply.u64(), 0)
        channel, peer = Connection.pair(requests=BackendRequest)
        self.addCleanup(peer.close)
        fe.send(F.SET_BACKEND_REQ_FD, b"", [channel.fileno()])
        channel.close()
        ring.setup(fe, uva=0)
        used_iova = ring.lay["device"]
        fe.send(F.SET_VRING_ADDR, ring.addr(VHOST_VRING_F_LOG, used_iova, uva=0).pack())  # log address: an IOVA
        req, rep = ring.add(b"viommu")
        ring.kick_now()
        misses = 0
        for _ in range(40):
            pump(self.backend)
            if not select.select([peer.fileno()], [], [], 0)[0]:
                break
            with peer.recv() as miss_msg:
                miss = IotlbMsg.unpack(miss_msg.payload)
            misses += 1
            page = miss.iova & ~0xFFF
            gpa = page - iova_base
            with fe.request(F.IOTLB_MSG, IotlbMsg(page, 0x1000, UVA_BASE + gpa, 3, 2).pack()) as reply:
                self.assertEqual(reply.u64(), 0)
        self.assertEqual(ring.replies(), [b"ummoiv\x00"])
        self.assertGreaterEqual(misses, 6)             # 4 descriptor pages, avail, used, buffers...
        self.assertGreater(len(self.backend.iotlb), 4)
        bitmap = os.pread(log_fd, 0x1000, 0)

        def dirty(gpa: int) -> bool:
            page = gpa // 0x1000
            return bool(bitmap[page // 8] >> (page % 8) & 1)

        self.assertTrue(dirty(rep - iova_base))        # the reply, at its guest-physical page
        self.assertTrue(dirty(used_iova - iova_base))  # the used ring, translated from its IOVA
        self.assertFalse(dirty(req - iova_base))
        pages = {i * 8 + bit for i, byte in enumerate(bitmap) for bit in range(8) if byte >> bit & 1}
        avail_event = used_iova + 4 + 8 * 1024             # after the 1024 used elements, a page further
        self.assertEqual(pages, {(a - iova_base) // 0x1000 for a in (rep, used_iova, avail_event)})


    def _iommu_ring(self, packed: bool, device: Device | None = None):
        """A ring behind an IOTLB (IOVA == guest address, 4 KiB entries on demand, as intel-iommu
        hands them out) and the back-end channel's other end."""
        class Iommu(Echo):
            features = Echo.features | VIRTIO_F_ACCESS_PLATFORM | VIRTIO_F_RING_PACKED

        self.serve_instead(device or Iommu())
        ring = self.ring(0, packed=packed)
        features = DRIVER_FEATURES | VIRTIO_F_ACCESS_PLATFORM | (VIRTIO_F_RING_PACKED if packed else 0)
        with self.assertLogs("vhost_min.backend", logging.INFO) as logs:
            self.fe.negotiate(features)
        self.assertIn(f"features {features:#x} negotiated", "\n".join(logs.output))   # what peer tests read
        self.set_memory()
        channel, peer = Connection.pair(requests=BackendRequest)
        self.addCleanup(peer.close)
        self.fe.send(F.SET_BACKEND_REQ_FD, b"", [channel.fileno()])
        channel.close()
        ring.setup(self.fe, uva=0)
        return ring, peer

    def _invalidate_everything(self) -> None:
        """QEMU 7.2's global device-IOTLB flush, as intel-iommu sends it (around the interrupt range)."""
        for iova, size in ((0, 0xFEE0_0000), (0xFEF0_0000, (1 << 64) - 0xFEF0_0000)):
            with self.fe.request(F.IOTLB_MSG, IotlbMsg(iova, size, 0, 0, VHOST_IOTLB_INVALIDATE).pack()) as reply:
                self.assertEqual(reply.u64(), 0)

    def _answer_misses(self, peer: Connection) -> list[int]:
        """Run the back-end, answering each BACKEND_IOTLB_MSG miss with its page; the IOVAs asked."""
        asked = []
        for _ in range(40):
            pump(self.backend)
            if not select.select([peer.fileno()], [], [], 0)[0]:
                return asked
            with peer.recv() as miss_msg:
                miss = IotlbMsg.unpack(miss_msg.payload)
            self.assertEqual((miss_msg.request, miss.type), (BackendRequest.IOTLB_MSG, VHOST_IOTLB_MISS))
            asked.append(miss.iova)
            page = miss.iova & ~0xFFF
            with self.fe.request(F.IOTLB_MSG, IotlbMsg(page, 0x1000, UVA_BASE + page, 3, 2).pack()) as reply:
                self.assertEqual(reply.u64(), 0)
        self.fail(f"the back-end kept asking: {[hex(a) for a in asked]}")

    def check_ring_entries_invalidated_are_asked_for_again(self, packed: bool) -> None:
        """QEMU 7.2 behind intel-iommu flushes a device's whole IOTLB (a global device-IOTLB
        invalidation: [0, 0xfee00000) and [0xfef00000, 2^64)) while the rings stay in use: the
        ring's own pages must be asked for again with BACKEND_IOTLB_MSG and the ring go on once
        the updates arrive -- not break with "not inside one memory region: IOTLB miss"."""
        ring, peer = self._iommu_ring(packed)
        ring.add(b"before")
        ring.kick_now()
        self._answer_misses(peer)
        self.assertEqual(ring.replies(), [b"erofeb\x00"])
        with self.assertLogs("vhost_min.backend", logging.DEBUG) as logs:
            for iova, size in ((0, 0xFEE0_0000), (0xFEF0_0000, (1 << 64) - 0xFEF0_0000)):
                with self.fe.request(F.IOTLB_MSG, IotlbMsg(iova, size, 0, 0, VHOST_IOTLB_INVALIDATE).pack()) as reply:
                    self.assertEqual(reply.u64(), 0)
        self.assertIn("IOTLB invalidate 0x0+0xfee00000", "\n".join(logs.output))
        self.assertEqual(len(self.backend.iotlb), 0)
        ring.add(b"after")
        ring.kick_now()
        with self.assertLogs("vhost_min.backend", logging.DEBUG) as logs:
            asked = self._answer_misses(peer)
        # One line a page each way, so DEBUG: a strict vIOMMU guest misses hundreds a MiB.
        levels = {record.getMessage().split(": ", 1)[1]: record.levelname for record in logs.records}
        self.assertEqual(levels.get(f"ring 0: IOTLB miss at {asked[0]:#x}, asking the front-end"), "DEBUG")
        self.assertEqual(levels.get(f"IOTLB update {asked[0] & ~0xFFF:#x}+0x1000 perm 3"), "DEBUG")
        self.assertEqual(ring.replies(), [b"retfa\x00"])
        self.assertFalse(self.backend.rings[0].broken)
        self.assertFalse(fired(ring.err, 0), "the ring signalled an error")
        self.assertEqual(asked[0] & ~0xFFF, ring.lay["desc"] & ~0xFFF, [hex(a) for a in asked])

    def test_a_completion_posted_after_a_flush_waits_for_the_used_rings_page(self) -> None:
        """An asynchronous device completes a chain after a flush took the used ring's translation
        away: the completion is kept, the page asked for, and it is pushed when the update comes
        (not dropped as chains the ring does not hold)."""
        held = []

        class Holding(Echo):
            features = Echo.features | VIRTIO_F_ACCESS_PLATFORM

            def process(self, queue, vq):
                held.extend(vq.pop_batch())
                return False

        ring, peer = self._iommu_ring(False, Holding())
        ring.add(b"held")
        ring.kick_now()
        self._answer_misses(peer)
        self.assertEqual(len(held), 1)
        self._invalidate_everything()
        head, _readable, writable = held.pop()
        self.backend.post_used(0, [(head, scatter(b"dleh", writable))])
        asked = self._answer_misses(peer)
        self.assertIn(ring.lay["device"] & ~0xFFF, [iova & ~0xFFF for iova in asked])
        self.assertEqual(ring.replies(), [b"dleh"])
        self.assertTrue(fired(ring.call))
        self.assertEqual(self.backend.rings[0].queue.in_flight, 0)
        self.assertFalse(self.backend.rings[0].broken)

    def test_split_ring_entries_invalidated_are_asked_for_again(self) -> None:
        self.check_ring_entries_invalidated_are_asked_for_again(packed=False)

    def test_packed_ring_entries_invalidated_are_asked_for_again(self) -> None:
        self.check_ring_entries_invalidated_are_asked_for_again(packed=True)


class AsyncioTests(BackendCase):
    def test_backend_under_asyncio(self) -> None:
        ring = self.ring(0)
        fe_conn = self.fe.conn
        self.fe.backend = None                # the loop drives the backend, not the test
        results = {}

        async def main():
            loop = asyncio.get_running_loop()
            self.backend.attach(loop.add_reader, loop.remove_reader)

            def front_end():
                fe = Frontend(fe_conn)
                fe.negotiate()
                self.assertEqual(fe.ack(F.SET_MEM_TABLE, self.ram.table(), self.ram.fds), 0)
                ring.setup(fe, need_reply=True)
                ring.add(b"asyncio")
                ring.kick_now()
                fired(ring.call, TIMEOUT)
                results["replies"] = ring.replies()
                fe_conn.close()

            await loop.run_in_executor(None, front_end)
            for _ in range(100):
                if self.backend.closed:
                    break
                await asyncio.sleep(0.01)

        asyncio.run(main())
        self.assertEqual(results["replies"], [b"oicnysa\x00"])
        self.assertTrue(self.backend.closed)


class ServeTests(unittest.TestCase):
    def use_both(self, ram: Ram, echo_path: str, rng_path: str, attempt: int) -> None:
        """Connect to both devices, set them up, check one request each, disconnect."""
        fe_echo, fe_rng = Frontend.connect(echo_path), Frontend.connect(rng_path)
        ring_echo, ring_rng = DriverRing(ram, 0, base=0x10000), DriverRing(ram, 0, base=0x40000)
        try:
            for fe, ring in ((fe_echo, ring_echo), (fe_rng, ring_rng)):
                fe.negotiate()
                self.assertEqual(fe.ack(F.SET_MEM_TABLE, ram.table(), ram.fds), 0)
                ring.setup(fe, need_reply=True)
            ring_echo.add(f"try {attempt}".encode())
            ring_rng.add(b"", 32)
            ring_rng.add(b"", 16)
            ring_echo.kick_now()
            ring_rng.kick_now()
            self.assertTrue(fired(ring_echo.call, TIMEOUT))
            self.assertEqual(ring_echo.replies(), [f"try {attempt}"[::-1].encode() + b"\x00"])
            self.assertTrue(fired(ring_rng.call, TIMEOUT))
            expect = random.Random(7)                   # a fresh Rng per connection
            self.assertEqual(ring_rng.replies(), [expect.randbytes(32), expect.randbytes(16)])
        finally:
            for closable in (fe_echo, fe_rng, ring_echo, ring_rng):
                closable.close()

    def test_two_devices_one_loop_disconnect_and_reconnect(self) -> None:
        fds_before = open_fds()
        with tempfile.TemporaryDirectory() as tmp:
            echo_path, rng_path = os.path.join(tmp, "echo.sock"), os.path.join(tmp, "rng.sock")
            echo = Echo()
            stop = threading.Event()
            thread = threading.Thread(target=serve, args=([(echo, echo_path), (Rng, rng_path)],),
                                      kwargs={"stop_event": stop})
            thread.start()
            try:
                wait_for(lambda: os.path.exists(echo_path) and os.path.exists(rng_path), what="the sockets")
                ram = Ram()
                try:
                    for attempt in range(3):            # connect, use, disconnect; and again
                        self.use_both(ram, echo_path, rng_path, attempt)
                        wait_for(lambda: echo.backend is None, what="the echo backend to go")
                finally:
                    ram.close()
            finally:
                stop.set()
                thread.join(TIMEOUT)
            self.assertFalse(thread.is_alive())
            self.assertFalse(os.path.exists(echo_path))
        gc.collect()
        self.assertEqual(open_fds() - fds_before, set())

    def test_instance_serves_one_front_end_at_a_time(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "one.sock")
            server = Server()
            self.addCleanup(server.close)
            echo = Echo()
            server.add(echo, path)
            first = Frontend.connect(path)
            self.addCleanup(first.close)
            server.step(0.1)
            self.assertIsNotNone(echo.backend)
            second = Frontend.connect(path)       # waits in the backlog
            self.addCleanup(second.close)
            second.conn.send(F.GET_FEATURES)
            server.step(0.1)
            self.assertEqual(len(server.backends), 1)
            self.assertFalse(second.pending())     # not served while the first is connected
            first.close()
            for _ in range(3):
                server.step(0.1)
            with second.conn.recv() as reply:      # served now, by a backend for the same device
                self.assertEqual(reply.u64() & Echo.features, Echo.features)
            self.assertEqual(len(server.backends), 1)
            self.assertIs(echo.backend, server.backends[0])
            self.assertEqual(server.served, 2)

    def test_inherited_connected_fd_and_once(self) -> None:
        a, b = socket.socketpair()
        fe = Frontend(Connection(a))
        thread = threading.Thread(target=serve, args=(Echo,), kwargs={"fd": b.detach(), "once": True})
        thread.start()
        self.assertEqual(fe.u64(F.GET_FEATURES) & Echo.features, Echo.features)
        fe.close()
        thread.join(TIMEOUT)
        self.assertFalse(thread.is_alive())


class ConformanceTests(BackendCase):
    """What real front-ends expect where the spec leaves room (libvhost-user's and QEMU's ways)."""

    def test_set_vring_call_signals_the_new_fd_at_once(self) -> None:
        """libvhost-user writes a new call eventfd at once ("in case of I/O hang after
        reconnecting"): a driver waiting for a first interrupt, or one a dead back-end owed it, gets it."""
        self.fe.negotiate()
        call = eventfd()
        self.addCleanup(os.close, call)
        self.fe.send(F.SET_VRING_CALL, VringFd(1, False).pack(), [call])
        self.assertEqual(fired(call), 1)
        self.fe.send(F.SET_VRING_CALL, VringFd(1, True).pack())     # poll mode: no fd to signal
        self.assertEqual(fired(call), 0)

    def test_iotlb_miss_only_with_access_platform(self) -> None:
        """The spec sends BACKEND_IOTLB_MSG only when VIRTIO_F_ACCESS_PLATFORM was negotiated."""
        self.fe.negotiate()
        channel, peer = Connection.pair(requests=BackendRequest)
        self.addCleanup(peer.close)
        self.fe.send(F.SET_BACKEND_REQ_FD, b"", [channel.fileno()])
        channel.close()
        with self.assertRaises(NotNegotiatedError):
            self.backend.send_iotlb_msg(IotlbMsg(0x1000, 0, 0, VHOST_ACCESS_RO, VHOST_IOTLB_MISS))
        self.assertFalse(select.select([peer.fileno()], [], [], 0)[0], "sent anyway")

    def test_set_vring_enable_between_set_protocol_features_and_set_features(self) -> None:
        """QEMU 7.2's vhost-user netdev enables its rings during realize, after
        SET_PROTOCOL_FEATURES and before SET_FEATURES: accepted, and the rings work."""
        ring = self.ring(0)
        offered = self.fe.u64(F.GET_FEATURES)
        self.assertEqual(self.fe.ack(F.SET_VRING_ENABLE, VringState(0, 1).pack()), errno.EPROTO)   # too early
        self.assertIsInstance(self.backend.last_error, NotNegotiatedError)
        self.fe.send(F.SET_PROTOCOL_FEATURES, pack_u64(self.fe.u64(F.GET_PROTOCOL_FEATURES) & QEMU_PROTOCOL))
        self.backend.last_error = None
        for index, enable in ((0, 1), (1, 1), (1, 0)):
            self.assertEqual(self.fe.ack(F.SET_VRING_ENABLE, VringState(index, enable).pack()), 0)
        self.assertIsNone(self.backend.last_error)
        self.assertEqual([r.enabled for r in self.backend.rings], [True, False])
        self.fe.send(F.SET_FEATURES, pack_u64(DRIVER_FEATURES & offered))
        self.set_memory()
        ring.setup(self.fe, enable=None)
        self.assertEqual(self.roundtrip(ring, b"net"), [b"ten\x00"])

    def test_inband_call_never_blocks_the_loop(self) -> None:
        """A front-end that never answers an in-band VRING_CALL (REPLY_ACK is implied) costs the
        loop BACKEND_REQUEST_TIMEOUT once: then the channel is dropped and serving goes on."""
        import vhost_min.backend as backend_module
        self.serve_instead(InbandEcho())
        ring = self.ring(0)
        self.fe.negotiate(protocol=QEMU_PROTOCOL | P.INBAND_NOTIFICATIONS)
        self.set_memory()
        channel, silent = socket.socketpair()
        self.addCleanup(silent.close)
        saved = backend_module.BACKEND_REQUEST_TIMEOUT
        backend_module.BACKEND_REQUEST_TIMEOUT = 0.2
        try:
            self.fe.send(F.SET_BACKEND_REQ_FD, b"", [channel.fileno()])
        finally:
            backend_module.BACKEND_REQUEST_TIMEOUT = saved
        channel.close()
        for request, payload in ((F.SET_VRING_NUM, VringState(0, 8).pack()), (F.SET_VRING_BASE, VringState(0, 0).pack()),
                                 (F.SET_VRING_ADDR, ring.addr().pack()), (F.SET_VRING_ENABLE, VringState(0, 1).pack())):
            self.fe.send(request, payload)
        ring.add(b"inband")
        ring.queue.publish()
        kick = threading.Thread(target=self.fe.send, args=(F.VRING_KICK, VringState(0, 0).pack()), daemon=True)
        with self.assertLogs("vhost_min.backend", "WARNING") as logs:
            kick.start()
            kick.join(TIMEOUT)
        self.assertFalse(kick.is_alive(), "the loop is stuck waiting for the front-end's answer")
        self.assertIn("did not answer within 0.2 s", "\n".join(logs.output))
        self.assertIsNone(self.backend.channel)
        self.assertEqual(ring.replies(), [b"dnabni\x00"])
        self.assertEqual(self.fe.u64(F.GET_QUEUE_NUM), 2)           # still serving

    def test_get_shared_object_with_no_payload_as_qemu_sends_it(self) -> None:
        """QEMU sends GET_SHARED_OBJECT with size 0: read as the nil UUID (libvhost-user's zeroed
        buffer), answered like any other."""
        class NilExporter(Full):
            def get_shared_object(self, uuid_):
                if uuid_ != uuid.UUID(int=0):
                    raise VhostError(f"no object {uuid_}", errno.ENOENT)
                return self.shared_fd

        self.serve_instead(NilExporter())
        self.fe.negotiate(protocol=QEMU_PROTOCOL | P.SHARED_OBJECT)
        with self.fe.request(F.GET_SHARED_OBJECT, b"") as reply:
            self.assertEqual(reply.u64(), 0)
            fd = reply.take_fd()
        self.assertEqual(os.fstat(fd).st_ino, os.fstat(self.device.shared_fd).st_ino)
        os.close(fd)
        with self.fe.request(F.GET_SHARED_OBJECT, uuid.uuid4().bytes) as reply:
            self.assertEqual((reply.u64(), reply.fds), (errno.ENOENT, []))


class ThreadedEcho(Echo):
    """An asynchronous device: process() hands each chain to a worker thread, which answers it
    after a pause and posts the completion (Backend.post_used); stopped() waits for the worker
    to finish what the queue holds, as device.py's contract asks."""

    def __init__(self, pause: float = 0.01) -> None:
        super().__init__()
        self.pause = pause
        self.handled = 0
        self.outstanding = [0] * self.num_queues
        self.lock = threading.Condition()
        self.jobs: list = []
        self.worker = threading.Thread(target=self._work, daemon=True)
        self.running = True
        self.worker.start()

    def close(self) -> None:
        with self.lock:
            self.running = False
            self.lock.notify_all()
        self.worker.join(TIMEOUT)

    def process(self, queue, vq):
        while True:
            chains = vq.pop_batch()
            if not chains:
                return False
            with self.lock:
                self.outstanding[queue] += len(chains)
                self.jobs += [(queue, chain) for chain in chains]
                self.lock.notify_all()

    def _work(self) -> None:
        while True:
            with self.lock:
                while self.running and not self.jobs:
                    self.lock.wait()
                if not self.running:
                    return
                queue, (head, readable, writable) = self.jobs.pop(0)
            time.sleep(self.pause)
            written = self.handle(queue, readable, writable)
            self.backend.post_used(queue, [(head, written)])
            with self.lock:
                self.handled += 1
                self.outstanding[queue] -= 1
                self.lock.notify_all()

    def stopped(self, queue):
        with self.lock:
            self.lock.wait_for(lambda: not self.outstanding[queue], TIMEOUT)
        super().stopped(queue)


class AsyncDeviceTests(BackendCase):
    """Devices that complete from other threads: the loop pushes what they post, and a ring
    stops (or its queue is rebuilt) only after the device has finished what it holds."""

    device_class = ThreadedEcho

    def pump_until(self, ring: DriverRing, count: int) -> list[bytes]:
        replies: list[bytes] = []

        def more() -> bool:
            pump(self.backend)
            replies.extend(ring.replies())
            return len(replies) >= count
        wait_for(more, what=f"{count} replies")
        return replies

    def test_completions_from_another_thread(self) -> None:
        ring = self.ring(0)
        self.ready(ring)
        for data in (b"one", b"two", b"three"):
            ring.add(data)
        ring.kick_now()
        pump(self.backend)
        self.assertEqual(sorted(self.pump_until(ring, 3)), sorted([b"eno\x00", b"owt\x00", b"eerht\x00"]))
        self.assertTrue(fired(ring.call))

    def test_get_vring_base_waits_for_what_the_device_holds(self) -> None:
        ring = self.ring(0, size=16)
        self.ready(ring)
        for i in range(6):
            ring.add(b"req%d" % i)
        ring.kick_now()
        pump(self.backend)                              # popped and handed to the worker
        self.assertEqual(self.backend.rings[0].queue.in_flight, 6)
        with self.fe.request(F.GET_VRING_BASE, VringState(0, 0).pack()) as reply:
            self.assertEqual(VringState.unpack(reply.payload), (0, 6))
        # Everything was completed, pushed and signalled before the answer: nothing more comes.
        self.assertEqual(self.backend.rings[0].queue.in_flight, 0)
        self.assertTrue(fired(ring.call))
        self.assertEqual(sorted(ring.replies()), sorted(b"%dqer\x00" % i for i in range(6)))
        self.assertEqual(self.device.events[-1], ("stopped", 0))

    def test_queue_rebuilt_only_after_the_device_finished(self) -> None:
        """SET_VRING_NUM drops the queue while chains are in flight: the device finishes them into
        the old queue first; the new queue continues the used index (no collision, nothing twice)."""
        ring = self.ring(0)
        self.ready(ring)
        for i in range(4):
            ring.add(b"a%d" % i)
        ring.kick_now()
        pump(self.backend)
        old = self.backend.rings[0].queue
        self.fe.send(F.SET_VRING_NUM, VringState(0, ring.size).pack())
        self.assertEqual(old.in_flight, 0)
        self.assertIsNot(self.backend.rings[0].queue, old)
        self.assertEqual(sorted(ring.replies()), sorted(b"%da\x00" % i for i in range(4)))
        ring.add(b"after")
        ring.kick_now()
        self.assertEqual(self.pump_until(ring, 1), [b"retfa\x00"])
        self.assertEqual(self.device.handled, 5)

    def test_inflight_chains_held_by_the_device_are_not_resubmitted(self) -> None:
        ring = self.ring(0)
        self.fe.negotiate()
        self.set_memory()
        with self.fe.request(F.GET_INFLIGHT_FD, Inflight(0, 0, 2, ring.size).pack()) as reply:
            inflight, fd = Inflight.unpack(reply.payload), reply.take_fd()
        self.fe.send(F.SET_INFLIGHT_FD, inflight.pack(), [fd])
        os.close(fd)
        ring.setup(self.fe)
        for i in range(3):
            ring.add(b"b%d" % i)
        ring.kick_now()
        pump(self.backend)
        self.fe.send(F.SET_VRING_ADDR, ring.addr(uva=UVA_BASE).pack())      # same addresses: kept
        self.fe.send(F.SET_VRING_NUM, VringState(0, ring.size).pack())       # rebuilt
        ring.add(b"c")
        ring.kick_now()
        replies = sorted(self.pump_until(ring, 4))
        pump(self.backend)
        self.assertEqual(replies, sorted([b"0b\x00", b"1b\x00", b"2b\x00", b"c\x00"]))
        self.assertEqual(self.device.handled, 4)                             # none handled twice
        self.assertEqual(ring.replies(), [])

    def test_post_used_after_close_is_ignored(self) -> None:
        ring = self.ring(0)
        self.ready(ring)
        self.backend.close()
        self.backend.post_used(0, [(0, 0)])         # no error, no write to a closed fd
        with self.assertRaises(ValueError):
            self.backend.post_used(7, [])


class FdEcho(Echo):
    """An asynchronous device whose completions arrive on an fd of its own (as io_uring's
    eventfd): process() holds the chains; writing ``done_fd`` makes the callback answer them."""

    def __init__(self) -> None:
        super().__init__()
        self.done_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.held: list = []
        self._watched = {self.done_fd: self._on_done}

    def close(self) -> None:
        if self.done_fd >= 0:
            os.close(self.done_fd)
            self.done_fd = -1

    def watched(self):
        return self._watched

    def process(self, queue, vq):
        self.held += [(queue, chain) for chain in vq.pop_batch()]
        return False

    def _on_done(self) -> None:
        os.eventfd_read(self.done_fd)
        held, self.held = self.held, []
        for queue, (head, readable, writable) in held:
            self.backend.post_used(queue, [(head, self.handle(queue, readable, writable))])

    def stopped(self, queue):
        if self.held:
            self._on_done_now()
        super().stopped(queue)

    def _on_done_now(self) -> None:
        os.eventfd_write(self.done_fd, 1)
        self._on_done()


class DeviceFdTests(BackendCase):
    """Device.watched(): the back-end watches the device's own fds, calls the device in its loop,
    and pushes what the callback posted when it returns, without waking itself up for it."""

    device_class = FdEcho

    def test_the_device_fd_is_watched_and_its_completions_pushed_at_once(self) -> None:
        ring = self.ring(0)
        self.ready(ring)
        self.assertIn(self.device.done_fd, self.backend.watched())
        for data in (b"one", b"two"):
            ring.add(data)
        ring.kick_now()
        pump(self.backend)
        self.assertEqual((len(self.device.held), ring.replies()), (2, []))
        os.eventfd_write(self.device.done_fd, 1)
        self.backend.watched()[self.device.done_fd]()
        # pushed and signalled by the time the callback returned; the loop was not woken for it
        self.assertEqual(sorted(ring.replies()), [b"eno\x00", b"owt\x00"])
        self.assertTrue(fired(ring.call))
        self.assertEqual(fired(self.backend._completions.fd), 0)
        # a post from another thread while the loop is elsewhere still wakes it
        ring.add(b"three")
        ring.kick_now()
        pump(self.backend)
        worker = threading.Thread(target=self.device._on_done_now)
        worker.start()
        worker.join(TIMEOUT)
        self.assertTrue(select.select([self.backend._completions.fd], [], [], TIMEOUT)[0])
        pump(self.backend)
        self.assertEqual(ring.replies(), [b"eerht\x00"])

    def test_gone_from_the_watched_fds_once_closed(self) -> None:
        self.backend.close()
        self.assertEqual(self.backend.watched(), {})


if __name__ == "__main__":
    unittest.main()
