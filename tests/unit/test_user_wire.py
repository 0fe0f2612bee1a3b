"""vhost-user wire format and connection (vhost_min.user): golden numbers and layouts, payload
round trips, fd passing, and every way a peer can break the framing."""

from __future__ import annotations

import array
import errno
import fcntl
import os
import signal
import socket
import struct
import tempfile
import threading
import time
import unittest
import uuid

from tests.support import open_fds
from vhost_min import user as vu
from vhost_min.errors import DisconnectedError, NotNegotiatedError, ProtocolError, VhostError
from vhost_min.user import (BACKEND_REQUESTS, FRONTEND_REQUESTS, BackendRequest, Config, Connection,
                            DeviceState, FrontendRequest, Inflight, IotlbMsg, Listener, Log, MemoryRegion,
                            MemoryTable, Message, ProtocolFeature, SharedObject, ShmemConfig, ShmemMap,
                            VringAddr, VringArea, VringFd, VringState)

# Numbers straight from docs/interop/vhost-user.rst (and the SHMEM / GPA_ADDRESSES additions).
FRONTEND_GOLDEN = {
    "GET_FEATURES": 1, "SET_FEATURES": 2, "SET_OWNER": 3, "RESET_OWNER": 4, "SET_MEM_TABLE": 5,
    "SET_LOG_BASE": 6, "SET_LOG_FD": 7, "SET_VRING_NUM": 8, "SET_VRING_ADDR": 9, "SET_VRING_BASE": 10,
    "GET_VRING_BASE": 11, "SET_VRING_KICK": 12, "SET_VRING_CALL": 13, "SET_VRING_ERR": 14,
    "GET_PROTOCOL_FEATURES": 15, "SET_PROTOCOL_FEATURES": 16, "GET_QUEUE_NUM": 17, "SET_VRING_ENABLE": 18,
    "SEND_RARP": 19, "NET_SET_MTU": 20, "SET_BACKEND_REQ_FD": 21, "IOTLB_MSG": 22, "SET_VRING_ENDIAN": 23,
    "GET_CONFIG": 24, "SET_CONFIG": 25, "CREATE_CRYPTO_SESSION": 26, "CLOSE_CRYPTO_SESSION": 27,
    "POSTCOPY_ADVISE": 28, "POSTCOPY_LISTEN": 29, "POSTCOPY_END": 30, "GET_INFLIGHT_FD": 31,
    "SET_INFLIGHT_FD": 32, "GPU_SET_SOCKET": 33, "RESET_DEVICE": 34, "VRING_KICK": 35,
    "GET_MAX_MEM_SLOTS": 36, "ADD_MEM_REG": 37, "REM_MEM_REG": 38, "SET_STATUS": 39, "GET_STATUS": 40,
    "GET_SHARED_OBJECT": 41, "SET_DEVICE_STATE_FD": 42, "CHECK_DEVICE_STATE": 43, "GET_SHMEM_CONFIG": 44,
}
BACKEND_GOLDEN = {
    "IOTLB_MSG": 1, "CONFIG_CHANGE_MSG": 2, "VRING_HOST_NOTIFIER_MSG": 3, "VRING_CALL": 4, "VRING_ERR": 5,
    "SHARED_OBJECT_ADD": 6, "SHARED_OBJECT_REMOVE": 7, "SHARED_OBJECT_LOOKUP": 8, "SHMEM_MAP": 9,
    "SHMEM_UNMAP": 10,
}
PROTOCOL_GOLDEN = {
    "MQ": 0, "LOG_SHMFD": 1, "RARP": 2, "REPLY_ACK": 3, "NET_MTU": 4, "BACKEND_REQ": 5, "CROSS_ENDIAN": 6,
    "CRYPTO_SESSION": 7, "PAGEFAULT": 8, "CONFIG": 9, "BACKEND_SEND_FD": 10, "HOST_NOTIFIER": 11,
    "INFLIGHT_SHMFD": 12, "RESET_DEVICE": 13, "INBAND_NOTIFICATIONS": 14, "CONFIGURE_MEM_SLOTS": 15,
    "STATUS": 16, "XEN_MMAP": 17, "SHARED_OBJECT": 18, "DEVICE_STATE": 19, "GET_VRING_BASE_INFLIGHT": 20,
    "GPA_ADDRESSES": 21, "SHMEM": 22,
}


def memfd_with(data: bytes) -> int:
    fd = os.memfd_create("vhost-min-test", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def raw_header(request: int, flags: int, size: int) -> bytes:
    return struct.pack("=III", request, flags, size)


class FdLeakCheck(unittest.TestCase):
    """Fails a test that leaves an fd open that it did not have at the start."""

    def setUp(self) -> None:
        self._fds_before = open_fds()
        self.addCleanup(self._check_no_leak)

    def _check_no_leak(self) -> None:
        leaked = open_fds() - self._fds_before
        self.assertFalse(leaked, f"fds leaked: {sorted(leaked)}")

    def pair(self, **kwargs) -> tuple[Connection, Connection]:
        a, b = Connection.pair(**kwargs)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        return a, b


class TestNumbers(unittest.TestCase):
    def test_frontend_request_numbers(self) -> None:
        self.assertEqual({r.name: r.value for r in FrontendRequest}, FRONTEND_GOLDEN)
        for name, value in FRONTEND_GOLDEN.items():
            self.assertEqual(getattr(vu, f"VHOST_USER_{name}"), value, name)
            self.assertEqual(FrontendRequest(value).spec_name, f"VHOST_USER_{name}")
        with self.assertRaises(ValueError):
            FrontendRequest(0)                  # VHOST_USER_NONE is not a request

    def test_backend_request_numbers(self) -> None:
        self.assertEqual({r.name: r.value for r in BackendRequest}, BACKEND_GOLDEN)
        for name, value in BACKEND_GOLDEN.items():
            self.assertEqual(getattr(vu, f"VHOST_USER_BACKEND_{name}"), value, name)
            self.assertEqual(BackendRequest(value).spec_name, f"VHOST_USER_BACKEND_{name}")

    def test_protocol_feature_bits(self) -> None:
        self.assertEqual({f.name: f.value for f in ProtocolFeature}, {k: 1 << v for k, v in PROTOCOL_GOLDEN.items()})
        for name, bit in PROTOCOL_GOLDEN.items():
            self.assertEqual(getattr(vu, f"VHOST_USER_PROTOCOL_F_{name}"), 1 << bit, name)
        # The renumbering history: SHMEM ended at 22, GPA_ADDRESSES took 21, GET_VRING_BASE_INFLIGHT 20.
        self.assertEqual(ProtocolFeature.SHMEM, 0x40_0000)
        self.assertEqual(ProtocolFeature.GPA_ADDRESSES, 0x20_0000)
        self.assertEqual(vu.VHOST_USER_PROTOCOL_F_MTU, ProtocolFeature.NET_MTU)

    def test_constants(self) -> None:
        self.assertEqual(vu.VHOST_USER_F_PROTOCOL_FEATURES, 1 << 30)
        self.assertEqual(vu.VHOST_USER_HDR_SIZE, 12)
        self.assertEqual((vu.VHOST_USER_VERSION_MASK, vu.VHOST_USER_VERSION), (0x3, 0x1))
        self.assertEqual((vu.VHOST_USER_REPLY_MASK, vu.VHOST_USER_NEED_REPLY_MASK), (0x4, 0x8))
        self.assertEqual(vu.VHOST_USER_RESERVED_FLAGS, 0xFFFFFFF0)
        self.assertEqual(vu.VHOST_MEMORY_BASELINE_NREGIONS, 8)
        self.assertEqual((vu.VHOST_USER_VRING_IDX_MASK, vu.VHOST_USER_VRING_NOFD_MASK), (0xFF, 0x100))
        self.assertEqual((vu.VHOST_USER_CONFIG_HDR_SIZE, vu.VHOST_USER_MAX_CONFIG_SIZE), (12, 256))

    def test_struct_sizes(self) -> None:
        golden = {"HEADER": 12, "U64": 8, "VRING_STATE": 8, "VRING_ADDR": 40, "MEMORY_REGION": 32,
                  "MEMORY_HDR": 8, "MEM_REG_MSG": 40, "LOG": 16, "CONFIG_HDR": 12, "VRING_AREA": 24,
                  "INFLIGHT": 24, "SHARED": 16, "DEVICE_STATE": 8, "SHMEM_CONFIG": 2056, "SHMEM_MAP": 40,
                  "IOTLB_MSG": 32}
        for name, size in golden.items():
            layout = getattr(vu, name)
            self.assertIsInstance(layout, struct.Struct)
            self.assertTrue(layout.format.startswith("="), f"{name} must use native order, standard sizes")
            self.assertEqual(layout.size, size, name)

    def test_header_layout(self) -> None:
        by_hand = struct.pack("=I", 9) + struct.pack("=I", 0x1 | 0x8) + struct.pack("=I", 40)
        self.assertEqual(vu.HEADER.pack(vu.VHOST_USER_SET_VRING_ADDR, 0x9, 40), by_hand)

    def test_header_on_the_wire(self) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with Connection(a) as conn, b:
            conn.send(FrontendRequest.SET_FEATURES, struct.pack("=Q", 0x1234), need_reply=True)
            self.assertEqual(b.recv(64), struct.pack("=IIIQ", 2, 0x9, 8, 0x1234))


class TestPayloads(unittest.TestCase):
    def test_round_trips(self) -> None:
        values = [
            VringState(3, 256),
            VringAddr(1, 1, 0x1000, 0x2000, 0x3000, 0x4000),
            VringFd(7, True),
            VringFd(255, False),
            MemoryRegion(0x1_0000_0000, 0x4000_0000, 0x7F00_0000_0000, 0x1000),
            Log(0x10000, 0x200),
            VringArea(2 | vu.VHOST_USER_VRING_NOFD_MASK, 4096, 0),
            Inflight(0x3000, 0, 4, 128),
            DeviceState(vu.VHOST_TRANSFER_STATE_DIRECTION_LOAD, vu.VHOST_TRANSFER_STATE_PHASE_STOPPED),
            ShmemMap(3, 0x1000, 0x20000, 0x4000, vu.VHOST_USER_FLAG_MAP_RW),
            IotlbMsg(0xFEE0_0000, 0x1000, 0x7F12_3456_0000, vu.VHOST_ACCESS_RW, vu.VHOST_IOTLB_UPDATE),
            Config(4, 8, vu.VHOST_SET_CONFIG_TYPE_MIGRATION, bytes(range(8))),
            SharedObject(uuid.UUID("12345678-9abc-def0-1122-334455667788")),
            MemoryTable(()),
            MemoryTable(tuple(MemoryRegion(i << 30, 1 << 30, 0x7F00_0000_0000 + (i << 30), 0) for i in range(8))),
        ]
        for value in values:
            with self.subTest(value=value):
                self.assertEqual(type(value).unpack(value.pack()), value)

    def test_single_region_round_trip(self) -> None:
        region = MemoryRegion(0x8000_0000, 0x1000_0000, 0x7F00_0000_0000, 0x40_0000)
        packed = region.pack_single()
        self.assertEqual(packed, bytes(8) + struct.pack("=QQQQ", *region))
        self.assertEqual(MemoryRegion.unpack_single(packed), region)

    def test_shmem_config(self) -> None:
        cfg = ShmemConfig(2, (0x10000, 0) + (0,) * 254)
        packed = cfg.pack()
        self.assertEqual(len(packed), 2056)
        self.assertEqual(packed[:16], struct.pack("=IIQ", 2, 0, 0x10000))
        self.assertEqual(ShmemConfig.unpack(packed), cfg)
        self.assertEqual(ShmemConfig(1, (4096,)).pack(), packed[:8].replace(b"\x02", b"\x01", 1)
                         + struct.pack("=Q", 4096) + bytes(255 * 8))

    def test_layout_details(self) -> None:
        self.assertEqual(Inflight(1, 2, 3, 4).pack(), struct.pack("=QQHH", 1, 2, 3, 4) + bytes(4))
        self.assertEqual(IotlbMsg(1, 2, 3, 3, 2).pack(), struct.pack("=QQQBB", 1, 2, 3, 3, 2) + bytes(6))
        self.assertEqual(ShmemMap(5, 1, 2, 3, 1).pack(), b"\x05" + bytes(7) + struct.pack("=QQQQ", 1, 2, 3, 1))
        self.assertEqual(MemoryTable((MemoryRegion(1, 2, 3, 4),)).pack(), struct.pack("=IIQQQQ", 1, 0, 1, 2, 3, 4))
        self.assertEqual(VringFd(5, True).pack(), struct.pack("=Q", 0x105))
        self.assertEqual(Config(0, 2, 0, b"\xaa\xbb").pack(), struct.pack("=III", 0, 2, 0) + b"\xaa\xbb")
        # VhostUserShared: the first three UUID fields big-endian, i.e. RFC 4122 bytes.
        self.assertEqual(SharedObject(uuid.UUID("01020304-0506-0708-090a-0b0c0d0e0f10")).pack(), bytes(range(1, 17)))

    def test_wrong_sizes_name_what_and_sizes(self) -> None:
        with self.assertRaisesRegex(ProtocolError, r"VHOST_USER_SET_VRING_ADDR: payload is 39 bytes, expected 40"):
            VringAddr.unpack(bytes(39), "VHOST_USER_SET_VRING_ADDR")
        for cls, size in ((VringState, 8), (Log, 16), (Inflight, 24), (DeviceState, 8), (ShmemMap, 40),
                          (IotlbMsg, 32), (VringArea, 24), (SharedObject, 16), (ShmemConfig, 2056)):
            with self.subTest(cls=cls.__name__):
                with self.assertRaises(ProtocolError) as cm:
                    cls.unpack(bytes(size + 1))
                self.assertEqual(cm.exception.errno, errno.EPROTO)
                self.assertIn(f"expected {size}", str(cm.exception))
        with self.assertRaises(ProtocolError):
            MemoryRegion.unpack_single(bytes(32))

    def test_memory_table_rules(self) -> None:
        with self.assertRaises(ValueError):
            MemoryTable((MemoryRegion(0, 1, 0, 0),) * 9).pack()
        with self.assertRaisesRegex(ProtocolError, "9 regions"):
            MemoryTable.unpack(struct.pack("=II", 9, 0) + bytes(9 * 32))
        with self.assertRaisesRegex(ProtocolError, "expected 72 for 2 regions"):
            MemoryTable.unpack(struct.pack("=II", 2, 0) + bytes(32))
        with self.assertRaisesRegex(ProtocolError, "shorter"):
            MemoryTable.unpack(bytes(4))

    def test_config_rules(self) -> None:
        with self.assertRaisesRegex(ProtocolError, "exceeds the 256-byte"):
            Config.unpack(struct.pack("=III", 0, 257, 0) + bytes(257))
        with self.assertRaisesRegex(ProtocolError, "exceeds the 256-byte"):
            Config.unpack(struct.pack("=III", 200, 60, 0) + bytes(60))
        with self.assertRaisesRegex(ProtocolError, "expected 12 \\+ size 8"):
            Config.unpack(struct.pack("=III", 0, 8, 0) + bytes(4))
        with self.assertRaises(ValueError):
            Config(0, 4, 0, b"ab").pack()

    def test_vring_fd_encoding(self) -> None:
        self.assertEqual(vu.encode_vring_fd(3, False), 3)
        self.assertEqual(vu.decode_vring_fd(0x1FF), (255, True))
        with self.assertRaises(ValueError):
            vu.encode_vring_fd(256, False)
        with self.assertRaisesRegex(ProtocolError, "undefined bits"):
            vu.decode_vring_fd(0x200)


class TestRequestTable(FdLeakCheck):
    def msg(self, request: int, payload: bytes = b"", nfds: int = 0, flags: int = 1) -> Message:
        return Message(request, flags, payload, [memfd_with(b"") for _ in range(nfds)])

    def test_table_covers_every_request(self) -> None:
        self.assertEqual(set(FRONTEND_REQUESTS), set(FrontendRequest))
        self.assertEqual(set(BACKEND_REQUESTS), set(BackendRequest))
        for spec in (*FRONTEND_REQUESTS.values(), *BACKEND_REQUESTS.values()):
            lo, hi = spec.fds
            self.assertLessEqual(hi, vu.VHOST_USER_MAX_FDS, spec.name)
            self.assertLessEqual(lo, hi, spec.name)

    def test_fixed_sizes(self) -> None:
        expected = {"SET_FEATURES": 8, "SET_VRING_NUM": 8, "SET_VRING_ADDR": 40, "GET_VRING_BASE": 8,
                    "SET_LOG_BASE": 16, "ADD_MEM_REG": 40, "REM_MEM_REG": 40, "GET_INFLIGHT_FD": 24,
                    "SET_DEVICE_STATE_FD": 8, "GET_SHARED_OBJECT": None, "IOTLB_MSG": 32, "GET_FEATURES": 0,
                    "GET_SHMEM_CONFIG": 0, "VRING_KICK": 8, "SET_MEM_TABLE": None, "GET_CONFIG": None}
        for name, size in expected.items():
            self.assertEqual(FRONTEND_REQUESTS[FrontendRequest[name]].size, size, name)
        self.assertEqual(FRONTEND_REQUESTS[FrontendRequest.GET_SHMEM_CONFIG].reply_size, 2056)

    def test_get_shared_object_with_the_uuid_or_without_it_as_qemu_sends_it(self) -> None:
        """QEMU sends GET_SHARED_OBJECT with size 0 (the UUID never reaches the wire): accepted, as
        the nil UUID libvhost-user reads from its zeroed buffer; 16 bytes as the spec says; nothing else."""
        spec = FRONTEND_REQUESTS[FrontendRequest.GET_SHARED_OBJECT]
        some = uuid.uuid4()
        for payload in (b"", some.bytes):
            spec.validate(payload, 0)
        self.assertEqual(vu.SharedObject.unpack(b"").uuid, uuid.UUID(int=0))
        self.assertEqual(vu.SharedObject.unpack(some.bytes).uuid, some)
        for bad in (b"\0", bytes(15), bytes(17)):
            with self.assertRaisesRegex(ProtocolError, "expected 16 .or 0"):
                spec.validate(bad, 0)

    def test_always_answered(self) -> None:
        answered = {name for name, spec in ((s.request.name, s) for s in FRONTEND_REQUESTS.values()) if spec.reply}
        self.assertEqual(answered, {
            "GET_FEATURES", "GET_PROTOCOL_FEATURES", "GET_VRING_BASE", "SET_LOG_BASE", "GET_QUEUE_NUM",
            "IOTLB_MSG", "GET_CONFIG", "CREATE_CRYPTO_SESSION", "POSTCOPY_ADVISE", "POSTCOPY_END",
            "GET_INFLIGHT_FD", "GET_MAX_MEM_SLOTS", "GET_STATUS", "GET_SHARED_OBJECT",
            "SET_DEVICE_STATE_FD", "CHECK_DEVICE_STATE", "GET_SHMEM_CONFIG"})
        self.assertEqual({s.request.name for s in BACKEND_REQUESTS.values() if s.reply}, {"SHARED_OBJECT_LOOKUP"})
        spec = FRONTEND_REQUESTS[FrontendRequest.SET_VRING_NUM]
        self.assertFalse(spec.reply_due(vu.VHOST_USER_VERSION))
        self.assertTrue(spec.reply_due(vu.VHOST_USER_VERSION | vu.VHOST_USER_NEED_REPLY_MASK))

    def test_fd_whitelist(self) -> None:
        allowed = {name: spec.fds for name, spec in ((s.request.name, s) for s in FRONTEND_REQUESTS.values())
                   if spec.fds != (0, 0)}
        self.assertEqual(allowed, {
            "SET_MEM_TABLE": (0, 8), "SET_LOG_BASE": (1, 1), "SET_LOG_FD": (1, 1), "SET_VRING_KICK": (0, 1),
            "SET_VRING_CALL": (0, 1), "SET_VRING_ERR": (0, 1), "SET_BACKEND_REQ_FD": (1, 1),
            "SET_INFLIGHT_FD": (1, 1), "GPU_SET_SOCKET": (1, 1), "ADD_MEM_REG": (1, 1), "REM_MEM_REG": (0, 1),
            "SET_DEVICE_STATE_FD": (1, 1)})

    def test_wrong_payload_size_for_fixed_size_request(self) -> None:
        msg = self.msg(FrontendRequest.SET_VRING_NUM, bytes(4))
        with self.assertRaisesRegex(ProtocolError, r"VHOST_USER_SET_VRING_NUM: payload is 4 bytes, expected 8"):
            vu.check_message(msg)

    def test_unknown_request(self) -> None:
        for code in (0, 45, 99):
            with self.subTest(code=code):
                msg = self.msg(code, nfds=1)
                with self.assertRaisesRegex(ProtocolError, f"request {code} is not a front-end request"):
                    vu.check_message(msg)
                self.assertEqual(msg.fds, [])   # closed (the leak check confirms)
        with self.assertRaisesRegex(ProtocolError, "back-end request"):
            vu.lookup(11, BACKEND_REQUESTS)

    def test_fd_count_rules(self) -> None:
        region = MemoryRegion(0, 0x1000, 0x7000_0000, 0)
        bad = [
            (FrontendRequest.SET_VRING_NUM, VringState(0, 256).pack(), 1, "carries 1 fds, expected 0"),
            (FrontendRequest.ADD_MEM_REG, region.pack_single(), 0, "carries 0 fds, expected 1"),
            (FrontendRequest.SET_MEM_TABLE, MemoryTable((region, region)).pack(), 1, "2 regions but 1 fds"),
            (FrontendRequest.SET_VRING_KICK, VringFd(0, True).pack(), 1, "NOFD bit is set"),
            (FrontendRequest.SET_VRING_CALL, VringFd(0, False).pack(), 0, "NOFD bit is clear"),
            (FrontendRequest.SET_VRING_ERR, struct.pack("=Q", 1 << 9), 0, "undefined bits"),
            (FrontendRequest.SET_MEM_TABLE, MemoryTable((region,) * 8).pack(), 9, "expected 0 to 8"),
        ]
        for request, payload, nfds, error in bad:
            with self.subTest(request=request.name, error=error):
                msg = self.msg(request, payload, nfds)
                with self.assertRaisesRegex(ProtocolError, error):
                    vu.check_message(msg)
                self.assertEqual(msg.fds, [])
        good = [
            (FrontendRequest.REM_MEM_REG, region.pack_single(), 1),     # legacy fd accepted
            (FrontendRequest.REM_MEM_REG, region.pack_single(), 0),
            (FrontendRequest.SET_MEM_TABLE, MemoryTable((region,) * 3).pack(), 3),
            (FrontendRequest.SET_MEM_TABLE, struct.pack("=Q", 0), 0),     # the postcopy ack
            (FrontendRequest.SET_VRING_KICK, VringFd(4, True).pack(), 0),
            (FrontendRequest.SET_VRING_KICK, VringFd(4, False).pack(), 1),
            (FrontendRequest.GET_CONFIG, Config(0, 16, 0, bytes(16)).pack(), 0),
        ]
        for request, payload, nfds in good:
            with self.subTest(request=request.name, nfds=nfds):
                with self.msg(request, payload, nfds) as msg:
                    self.assertEqual(vu.check_message(msg).request, request)

    def test_request_with_reply_flag_rejected(self) -> None:
        msg = self.msg(FrontendRequest.GET_FEATURES, flags=vu.VHOST_USER_VERSION | vu.VHOST_USER_REPLY_MASK)
        with self.assertRaisesRegex(ProtocolError, "REPLY flag"):
            vu.check_message(msg)

    def test_feature_gates(self) -> None:
        gates = {FrontendRequest.GET_QUEUE_NUM: ProtocolFeature.MQ, FrontendRequest.GET_CONFIG: ProtocolFeature.CONFIG,
                 FrontendRequest.ADD_MEM_REG: ProtocolFeature.CONFIGURE_MEM_SLOTS,
                 FrontendRequest.SET_BACKEND_REQ_FD: ProtocolFeature.BACKEND_REQ,
                 FrontendRequest.GET_INFLIGHT_FD: ProtocolFeature.INFLIGHT_SHMFD,
                 FrontendRequest.RESET_DEVICE: ProtocolFeature.RESET_DEVICE,
                 FrontendRequest.GET_STATUS: ProtocolFeature.STATUS,
                 FrontendRequest.CHECK_DEVICE_STATE: ProtocolFeature.DEVICE_STATE,
                 FrontendRequest.GET_SHARED_OBJECT: ProtocolFeature.SHARED_OBJECT,
                 FrontendRequest.GET_SHMEM_CONFIG: ProtocolFeature.SHMEM,
                 FrontendRequest.VRING_KICK: ProtocolFeature.INBAND_NOTIFICATIONS,
                 FrontendRequest.SET_LOG_BASE: ProtocolFeature.LOG_SHMFD,
                 FrontendRequest.POSTCOPY_LISTEN: ProtocolFeature.PAGEFAULT,
                 FrontendRequest.IOTLB_MSG: ProtocolFeature.BACKEND_REQ,
                 FrontendRequest.SET_VRING_NUM: ProtocolFeature(0)}
        for request, feature in gates.items():
            spec = FRONTEND_REQUESTS[request]
            self.assertEqual(spec.features, feature, request.name)
            spec.require(feature)
            if feature:
                with self.assertRaisesRegex(NotNegotiatedError, f"VHOST_USER_PROTOCOL_F_{feature.name}"):
                    spec.require(~feature & 0x7FFFFF)
        self.assertIs(FRONTEND_REQUESTS[FrontendRequest.IOTLB_MSG].virtio_gate, vu.VirtioGate.ACCESS_PLATFORM)
        self.assertIs(FRONTEND_REQUESTS[FrontendRequest.SET_VRING_ENABLE].virtio_gate, vu.VirtioGate.PROTOCOL_FEATURES)
        # On the back-end channel, fds need BACKEND_SEND_FD as well.
        spec = BACKEND_REQUESTS[BackendRequest.SHMEM_MAP]
        self.assertEqual(spec.missing(ProtocolFeature.SHMEM, nfds=1), ProtocolFeature.BACKEND_SEND_FD)
        spec.require(ProtocolFeature.SHMEM | ProtocolFeature.BACKEND_SEND_FD, nfds=1)
        msg = self.msg(BackendRequest.SHMEM_MAP, ShmemMap(0, 0, 0, 4096, 0).pack(), 1)
        with self.assertRaises(NotNegotiatedError):
            vu.check_message(msg, BACKEND_REQUESTS, negotiated=ProtocolFeature.SHMEM)
        self.assertEqual(msg.fds, [])

    def test_reply_validation(self) -> None:
        spec = FRONTEND_REQUESTS[FrontendRequest.SET_LOG_BASE]
        spec.validate_reply(bytes(8), 0)                 # libvhost-user
        spec.validate_reply(bytes(16), 0)                # rust-vmm
        get_config = FRONTEND_REQUESTS[FrontendRequest.GET_CONFIG]
        get_config.validate_reply(b"", 0)                # the error signal
        get_config.validate_reply(Config(0, 4, 0, bytes(4)).pack(), 0)
        with self.assertRaises(ProtocolError):
            get_config.validate_reply(bytes(11), 0)
        inflight = FRONTEND_REQUESTS[FrontendRequest.GET_INFLIGHT_FD]
        inflight.validate_reply(bytes(24), 1)
        with self.assertRaisesRegex(ProtocolError, "reply: carries 0 fds, expected 1"):
            inflight.validate_reply(bytes(24), 0)
        state = FRONTEND_REQUESTS[FrontendRequest.SET_DEVICE_STATE_FD]
        state.validate_reply(struct.pack("=Q", 0x100), 0)
        state.validate_reply(struct.pack("=Q", 0), 1)
        state.validate_reply(struct.pack("=Q", 0x101), 0)
        with self.assertRaisesRegex(ProtocolError, "promises an fd"):
            state.validate_reply(struct.pack("=Q", 0), 0)
        with self.assertRaisesRegex(ProtocolError, "error or no fd"):
            state.validate_reply(struct.pack("=Q", 1), 1)
        FRONTEND_REQUESTS[FrontendRequest.SET_VRING_NUM].validate_reply(bytes(8), 0)   # a REPLY_ACK answer


class TestConnection(FdLeakCheck):
    def test_round_trip_and_flags(self) -> None:
        a, b = self.pair()
        a.send(FrontendRequest.SET_VRING_NUM, VringState(1, 256).pack(), need_reply=True)
        msg = b.recv()
        self.assertIs(msg.request, FrontendRequest.SET_VRING_NUM)
        self.assertEqual(msg.flags, vu.VHOST_USER_VERSION | vu.VHOST_USER_NEED_REPLY_MASK)
        self.assertTrue(msg.need_reply)
        self.assertEqual(VringState.unpack(msg.payload), (1, 256))
        b.reply_u64(msg, 0)
        answer = a.recv()
        self.assertEqual((answer.request, answer.flags, answer.u64()), (FrontendRequest.SET_VRING_NUM, 0x5, 0))
        self.assertTrue(answer.is_reply)

    def test_fd_passing(self) -> None:
        a, b = self.pair()
        contents = [b"region zero", b"region one", b"region two"]
        sent = [memfd_with(c) for c in contents]
        try:
            regions = tuple(MemoryRegion(i << 20, 1 << 20, 0, 0) for i in range(3))
            a.send(FrontendRequest.SET_MEM_TABLE, MemoryTable(regions).pack(), sent)
        finally:
            for fd in sent:
                os.close(fd)
        with b.recv() as msg:
            vu.check_message(msg)
            self.assertEqual(len(msg.fds), 3)
            for fd, data in zip(msg.fds, contents):
                self.assertTrue(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC, "received fd not CLOEXEC")
                self.assertEqual(os.pread(fd, 100, 0), data)
            self.assertEqual(MemoryTable.unpack(msg.payload).regions, regions)
        self.assertEqual(msg.fds, [])

    def test_take_fd(self) -> None:
        a, b = self.pair()
        fd = memfd_with(b"log")
        a.send(FrontendRequest.SET_LOG_BASE, Log(3, 0).pack(), [fd])
        os.close(fd)
        msg = b.recv()
        mine = msg.take_fd()
        self.assertEqual(msg.fds, [])
        self.assertEqual(os.pread(mine, 3, 0), b"log")
        os.close(mine)
        msg.close()

    def write_raw(self, sock: socket.socket, data: bytes, fds: list[int] = ()) -> None:
        if fds:
            sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            sock.sendall(data)

    def raw_pair(self, **kwargs) -> tuple[socket.socket, Connection]:
        raw, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        conn = Connection(other, **kwargs)
        self.addCleanup(raw.close)
        self.addCleanup(conn.close)
        return raw, conn

    def assert_rejected(self, data: bytes, error: type[Exception], pattern: str, nfds: int = 0, **kwargs) -> None:
        raw, conn = self.raw_pair(**kwargs)
        before = open_fds()
        fds = [memfd_with(b"") for _ in range(nfds)]
        try:
            self.write_raw(raw, data, fds)
        finally:
            for fd in fds:
                os.close(fd)
        raw.shutdown(socket.SHUT_WR)
        with self.assertRaisesRegex(error, pattern):
            conn.recv()
        self.assertLessEqual(open_fds(), before, "received fds leaked")

    def test_rejects_bad_version(self) -> None:
        for flags, version in ((0x0, 0), (0x2, 2), (0x3, 3)):
            with self.subTest(version=version):
                self.assert_rejected(raw_header(1, flags, 0), ProtocolError, f"header version {version}", nfds=2)

    def test_rejects_reserved_flag(self) -> None:
        self.assert_rejected(raw_header(1, 0x11, 0), ProtocolError, "reserved header flag bits 0x10", nfds=1)
        self.assert_rejected(raw_header(1, 0x80000001, 0), ProtocolError, "reserved header flag bits 0x80000000")

    def test_rejects_oversize_payload(self) -> None:
        self.assert_rejected(raw_header(5, 1, 4097) + bytes(4097), ProtocolError,
                             "VHOST_USER_SET_MEM_TABLE: payload of 4097 bytes exceeds the 4096-byte limit", nfds=1)
        self.assert_rejected(raw_header(5, 1, 600) + bytes(600), ProtocolError, "600 bytes", max_payload=512)

    def test_rejects_too_many_fds(self) -> None:
        self.assert_rejected(raw_header(5, 1, 0), ProtocolError, "SET_MEM_TABLE: 9 fds, at most 8 per message", nfds=9)
        for nfds in (12, 200):                       # beyond the ancillary buffer: truncated, all closed
            with self.subTest(nfds=nfds):
                self.assert_rejected(raw_header(5, 1, 0), ProtocolError, "truncated: the peer sent more than 8 fds",
                                     nfds=nfds)
        self.assert_rejected(raw_header(5, 1, 0), ProtocolError, "3 fds, at most 2", nfds=3, max_fds=2)

    def test_eof_before_header(self) -> None:
        self.assert_rejected(b"", DisconnectedError, "peer closed the connection$")

    def test_eof_inside_header(self) -> None:
        self.assert_rejected(raw_header(1, 1, 0)[:7], DisconnectedError, "after 7 of 12 header bytes", nfds=1)

    def test_truncated_payload_then_eof(self) -> None:
        self.assert_rejected(raw_header(9, 1, 40) + bytes(20), DisconnectedError,
                             "after 20 of 40 payload bytes of VHOST_USER_SET_VRING_ADDR", nfds=1)

    def test_disconnected_error_is_vhost_error(self) -> None:
        a, b = self.pair()
        a.close()
        with self.assertRaises(VhostError) as cm:
            b.recv()
        self.assertIsInstance(cm.exception, DisconnectedError)
        self.assertEqual(cm.exception.errno, errno.ECONNRESET)
        with self.assertRaises(DisconnectedError):
            b.send(FrontendRequest.GET_FEATURES)

    def test_send_to_closed_peer(self) -> None:
        a, b = self.pair()
        b.close()
        with self.assertRaises(DisconnectedError):
            a.send(FrontendRequest.SET_OWNER)

    def test_latched_after_protocol_error(self) -> None:
        raw, conn = self.raw_pair()
        raw.sendall(raw_header(1, 0, 0) + raw_header(1, 1, 0))
        with self.assertRaises(ProtocolError):
            conn.recv()
        with self.assertRaisesRegex(ProtocolError, "unusable after an earlier error"):
            conn.recv()

    def test_unknown_code_is_delivered_as_int(self) -> None:
        raw, conn = self.raw_pair()
        raw.sendall(raw_header(77, 1, 0))
        msg = conn.recv()
        self.assertEqual(msg.request, 77)
        self.assertNotIsInstance(msg.request, FrontendRequest)
        with self.assertRaises(ProtocolError):
            vu.check_message(msg)

    def test_backend_channel_code_space(self) -> None:
        a, b = self.pair(requests=BackendRequest)
        a.send(BackendRequest.CONFIG_CHANGE_MSG, need_reply=True)
        msg = b.recv()
        self.assertIs(msg.request, BackendRequest.CONFIG_CHANGE_MSG)
        self.assertIs(vu.check_message(msg, BACKEND_REQUESTS).request, BackendRequest.CONFIG_CHANGE_MSG)

    def test_partial_writes_reassembled(self) -> None:
        raw, conn = self.raw_pair()
        payload = bytes(i % 251 for i in range(3000))
        data = raw_header(25, 1, len(payload)) + payload
        fd = memfd_with(b"with the first byte")

        def dribble() -> None:
            raw.sendmsg([data[:1]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            for i in range(1, len(data)):
                raw.send(data[i:i + 1])
                if i % 100 == 0:
                    time.sleep(0.001)

        writer = threading.Thread(target=dribble)
        writer.start()
        try:
            msg = conn.recv()
        finally:
            writer.join()
            os.close(fd)
        with msg:
            self.assertIs(msg.request, FrontendRequest.SET_CONFIG)
            self.assertEqual(msg.payload, payload)
            self.assertEqual(len(msg.fds), 1)
            self.assertEqual(os.pread(msg.fds[0], 64, 0), b"with the first byte")

    def test_nonblocking_send_waits_for_room(self) -> None:
        big = 1 << 20
        a, b = self.pair(max_payload=big)
        a.sock.setblocking(False)
        payload = os.urandom(big)
        fd = memfd_with(b"x")
        received: list[Message] = []
        reader = threading.Thread(target=lambda: received.append(b.recv()))
        reader.start()
        try:
            a.send(FrontendRequest.SET_CONFIG, payload, [fd])     # far more than the socket buffer
        finally:
            reader.join()
            os.close(fd)
        with received[0] as msg:
            self.assertEqual(msg.payload, payload)
            self.assertEqual(len(msg.fds), 1)

    def test_nonblocking_recv_finishes_the_message(self) -> None:
        raw, conn = self.raw_pair()
        conn.sock.setblocking(False)
        data = raw_header(2, 1, 8) + struct.pack("=Q", 42)
        raw.sendall(data[:5])
        timer = threading.Timer(0.05, raw.sendall, args=(data[5:],))
        timer.start()
        try:
            msg = conn.recv()
        finally:
            timer.join()
        self.assertEqual(msg.u64(), 42)

    def test_signals_do_not_break_a_message(self) -> None:
        raw, conn = self.raw_pair()
        ticks = []
        old = signal.signal(signal.SIGALRM, lambda *_: ticks.append(1))
        self.addCleanup(signal.signal, signal.SIGALRM, old)
        signal.setitimer(signal.ITIMER_REAL, 0.005, 0.005)
        self.addCleanup(signal.setitimer, signal.ITIMER_REAL, 0)
        data = raw_header(2, 1, 8) + struct.pack("=Q", 7)

        def slowly() -> None:
            for i in range(len(data)):
                time.sleep(0.01)
                raw.send(data[i:i + 1])

        writer = threading.Thread(target=slowly)
        writer.start()
        try:
            msg = conn.recv()                       # blocking reads interrupted by SIGALRM (EINTR)
        finally:
            writer.join()
        self.assertEqual(msg.u64(), 7)
        self.assertTrue(ticks)

    def test_send_rejects_too_many_fds(self) -> None:
        a, _b = self.pair()
        with self.assertRaises(ValueError):
            a.send(FrontendRequest.SET_MEM_TABLE, b"", list(range(9)))


class TestRequestReply(FdLeakCheck):
    def serve(self, conn: Connection, answer) -> threading.Thread:
        def run() -> None:
            msg = conn.recv()
            answer(conn, msg)
            msg.close()
        thread = threading.Thread(target=run)
        thread.start()
        self.addCleanup(thread.join)
        return thread

    def test_request_returns_reply(self) -> None:
        front, back = self.pair()
        self.serve(back, lambda c, m: c.reply_u64(m, 0x1_4000_0000))
        reply = front.request(FrontendRequest.GET_FEATURES)
        self.assertEqual(reply.u64(), 0x1_4000_0000)
        FRONTEND_REQUESTS[FrontendRequest.GET_FEATURES].validate_reply(reply.payload, len(reply.fds))

    def test_request_reads_whatever_size_comes(self) -> None:
        for size in (8, 16):
            with self.subTest(size=size):
                front, back = self.pair()
                self.serve(back, lambda c, m: c.reply(m, bytes(size)))
                fd = memfd_with(b"")
                try:
                    reply = front.request(FrontendRequest.SET_LOG_BASE, Log(4096, 0).pack(), [fd])
                finally:
                    os.close(fd)
                self.assertEqual(len(reply.payload), size)

    def test_reply_with_fd(self) -> None:
        front, back = self.pair()

        def answer(conn: Connection, msg: Message) -> None:
            fd = memfd_with(b"inflight")
            try:
                conn.reply(msg, Inflight(4096, 0, 1, 256).pack(), [fd])
            finally:
                os.close(fd)

        self.serve(back, answer)
        with front.request(FrontendRequest.GET_INFLIGHT_FD, Inflight(0, 0, 1, 256).pack()) as reply:
            FRONTEND_REQUESTS[FrontendRequest.GET_INFLIGHT_FD].validate_reply(reply.payload, len(reply.fds))
            self.assertEqual(os.pread(reply.fds[0], 8, 0), b"inflight")

    def test_reply_with_wrong_request_code(self) -> None:
        front, back = self.pair()
        self.serve(back, lambda c, m: c.send(FrontendRequest.GET_PROTOCOL_FEATURES, bytes(8), reply=True))
        with self.assertRaisesRegex(ProtocolError, "waiting for the reply to VHOST_USER_GET_FEATURES"):
            front.request(FrontendRequest.GET_FEATURES)

    def test_reply_without_reply_flag(self) -> None:
        front, back = self.pair()

        def answer(conn: Connection, msg: Message) -> None:
            fd = memfd_with(b"")
            try:
                conn.send(msg.request, bytes(8), [fd])      # REPLY flag missing; the fd must not leak
            finally:
                os.close(fd)

        self.serve(back, answer)
        with self.assertRaisesRegex(ProtocolError, "waiting for the reply"):
            front.request(FrontendRequest.GET_FEATURES)


class TestSocketRoles(FdLeakCheck):
    def setUp(self) -> None:
        super().setUp()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.path = os.path.join(tmp.name, "vhost-user.sock")

    def test_listen_connect_accept(self) -> None:
        with Listener(self.path) as listener:
            self.assertTrue(os.path.exists(self.path))
            with Connection.connect(self.path) as client, listener.accept() as server:
                client.send(FrontendRequest.SET_OWNER)
                self.assertIs(server.recv().request, FrontendRequest.SET_OWNER)
        self.assertFalse(os.path.exists(self.path), "Listener.close() must remove its socket file")

    def test_stale_socket_replaced(self) -> None:
        old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old.bind(self.path)
        old.close()                                  # the file stays behind, nobody listens
        with Listener(self.path) as listener:
            with Connection.connect(self.path), listener.accept():
                pass

    def test_live_socket_not_stolen(self) -> None:
        with Listener(self.path):
            with self.assertRaises(VhostError) as cm:
                Listener(self.path)
            self.assertEqual(cm.exception.errno, errno.EADDRINUSE)
            self.assertTrue(os.path.exists(self.path))

    def test_regular_file_not_replaced(self) -> None:
        with open(self.path, "w") as f:
            f.write("precious")
        with self.assertRaises(VhostError) as cm:
            Listener(self.path)
        self.assertEqual(cm.exception.errno, errno.EEXIST)
        with open(self.path) as f:
            self.assertEqual(f.read(), "precious")

    def test_close_leaves_a_successors_socket(self) -> None:
        first = Listener(self.path)
        os.unlink(self.path)
        with Listener(self.path):
            first.close()
            self.assertTrue(os.path.exists(self.path))

    def test_from_fd(self) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with Connection.from_fd(a.detach()) as conn, Connection(b) as peer:
            self.assertFalse(os.get_inheritable(conn.fileno()))
            peer.send(FrontendRequest.GET_FEATURES)
            self.assertIs(conn.recv().request, FrontendRequest.GET_FEATURES)

    def test_from_fd_refuses_other_sockets(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as inet:
            with self.assertRaises(ValueError):
                Connection.from_fd(inet.fileno())
            self.assertGreaterEqual(inet.fileno(), 0)
            os.fstat(inet.fileno())                 # still open: the caller keeps it

    def test_close_is_idempotent(self) -> None:
        a, b = Connection.pair()
        a.close()
        a.close()
        b.close()
        self.assertTrue(a.closed)


if __name__ == "__main__":
    unittest.main()
