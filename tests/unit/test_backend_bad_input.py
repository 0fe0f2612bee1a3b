"""Bad input to the vhost-user back-end, one test per kind, all against one serve loop (a Server
in a thread). Each test asserts the precise exception, the error reply (or that the connection
was closed, where the spec or the broken framing requires it), that no fd is left open -- ours,
nor the ones sent with the bad message -- and that the loop then serves a fresh connection."""

from __future__ import annotations

import array
import errno
import gc
import os
import socket
import tempfile
import threading
import unittest

from tests.support import open_fds
from tests.unit.test_backend import (DRIVER_FEATURES, QEMU_PROTOCOL, RAM_SIZE, TIMEOUT, UVA_BASE, DriverRing, Echo,
                                     Frontend, InbandEcho, Ram, eventfd, fired, memfd, wait_for)
from vhost_min.backend import REGION_ALIGN, Server
from vhost_min.errors import GuestMemoryError, NotNegotiatedError, ProtocolError
from vhost_min.user import (HEADER, VHOST_USER_NEED_REPLY_MASK, VHOST_USER_REPLY_MASK, VHOST_USER_VERSION,
                            FrontendRequest, Inflight, MemoryRegion, MemoryTable, ProtocolFeature, VringAddr, VringFd,
                            VringState, pack_u64)
from vhost_min.virtio import VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_RING_PACKED, DeviceStatus

F, P = FrontendRequest, ProtocolFeature


class BadInputTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        cls.tmp = tempfile.TemporaryDirectory()
        cls.path = os.path.join(cls.tmp.name, "backend.sock")
        cls.server = Server()
        cls.server.add(Echo, cls.path)          # a fresh Echo device (2 queues) per connection
        cls.inband_path = os.path.join(cls.tmp.name, "inband.sock")
        cls.server.add(InbandEcho, cls.inband_path)     # Echo offering INBAND_NOTIFICATIONS
        cls.stop = threading.Event()
        cls.thread = threading.Thread(target=cls.server.run, kwargs={"stop_event": cls.stop}, daemon=True)
        cls.thread.start()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.stop.set()
        cls.thread.join(TIMEOUT)
        cls.server.close()
        cls.tmp.cleanup()

    def setUp(self) -> None:
        self.wait_idle()
        self.server.errors.clear()
        self.ram = Ram()
        self.addCleanup(self.ram.close)
        gc.collect()
        self.fds_before = open_fds()
        self.logs = self.assertLogs("vhost_min.backend", "INFO")    # the rejections, kept off stderr
        self.captured = self.logs.__enter__()
        self.addCleanup(self.logs.__exit__, None, None, None)

    # -- helpers -----------------------------------------------------------------------------------
    def connect(self, *, features: int | None = DRIVER_FEATURES, protocol: int = QEMU_PROTOCOL,
                path: str | None = None) -> Frontend:
        """A new connection, accepted by the server; negotiated unless ``features`` is None."""
        served = self.server.served
        fe = Frontend.connect(path or self.path)
        self.addCleanup(fe.close)
        wait_for(lambda: self.server.served > served, what="the server to accept")
        if features is not None:
            fe.negotiate(features, protocol)
        return fe

    def wait_idle(self) -> None:
        wait_for(lambda: not self.server.backends, what="the server to drop its connections")

    def error(self, cls: type[BaseException], text: str) -> None:
        """The first error the server recorded in this test is exactly ``cls`` and mentions
        ``text``; it was logged in one line naming the class."""
        wait_for(lambda: self.server.errors, what="the server to record an error")
        exc = self.server.errors[0]
        self.assertIs(type(exc), cls, repr(exc))
        self.assertIn(text, str(exc))
        self.logged(f"{cls.__name__}: ", text)

    def logged(self, *parts: str) -> None:
        """One line on logger vhost_min.backend contains every part."""
        def lines():
            return [r.getMessage() for r in list(self.captured.records) if all(p in r.getMessage() for p in parts)]
        wait_for(lines, what=f"a log line with {parts}")
        self.assertNotIn("\n", lines()[0])

    def still_open(self, fe: Frontend) -> None:
        """The bad message did not cost the connection: it answers the next request."""
        self.assertEqual(fe.u64(F.GET_FEATURES) & Echo.features, Echo.features)

    def closed(self, fe: Frontend) -> None:
        self.assertTrue(fe.peer_closed(), "the backend did not close the connection")

    def fds(self, n: int) -> list[int]:
        """``n`` eventfds to send with a message; :meth:`sent` closes our copies."""
        return [eventfd() for _ in range(n)]

    @staticmethod
    def sent(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)

    @staticmethod
    def send_raw(fe: Frontend, data: bytes, fds=()) -> None:
        """Bytes straight onto the socket, the fds on the first one (no checks of ours)."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        fe.conn.sock.sendmsg([data], ancillary)

    def finish(self, fe: Frontend) -> None:
        """Disconnect; every fd the backend received is closed; the loop serves a fresh
        connection (a handshake and one request through a ring) and leaks nothing either."""
        fe.close()
        self.wait_idle()
        gc.collect()
        self.assertEqual(open_fds() - self.fds_before, set(), "fds left open after the bad connection")
        self.serve_fresh_connection()
        self.wait_idle()
        gc.collect()
        self.assertEqual(open_fds() - self.fds_before, set(), "fds left open after the fresh connection")

    def serve_fresh_connection(self) -> None:
        fresh = self.connect()
        ring = DriverRing(self.ram, 0)
        try:
            self.assertEqual(fresh.ack(F.SET_MEM_TABLE, self.ram.table(), self.ram.fds), 0)
            ring.setup(fresh, need_reply=True)
            ring.add(b"fresh")
            ring.kick_now()
            self.assertTrue(fired(ring.call, TIMEOUT))
            self.assertEqual(ring.replies(), [b"hserf\x00"])
        finally:
            ring.close()
            fresh.close()

    # -- unknown requests ------------------------------------------------------------------------
    def test_unknown_request(self) -> None:
        fe = self.connect()
        fds = self.fds(1)
        fe.conn.send(99, b"\x01\x02", fds, need_reply=True)
        self.sent(fds)
        with fe.conn.recv() as reply:
            self.assertEqual((reply.request, reply.u64()), (99, errno.EPROTO))
        self.error(ProtocolError, "request 99 is not a front-end request the protocol defines")
        self.still_open(fe)
        self.finish(fe)

    def test_request_code_zero(self) -> None:
        fe = self.connect()
        fe.send(0)                                  # VHOST_USER_NONE: not a request
        self.error(ProtocolError, "request 0 is not a front-end request")
        self.still_open(fe)
        self.finish(fe)

    # -- sizes -------------------------------------------------------------------------------------
    def test_wrong_payload_size(self) -> None:
        fe = self.connect()
        self.assertEqual(fe.ack(F.SET_VRING_NUM, bytes(4)), errno.EPROTO)
        self.error(ProtocolError, "VHOST_USER_SET_VRING_NUM: payload is 4 bytes, expected 8")
        self.assertEqual(fe.ack(F.SET_FEATURES, bytes(12)), errno.EPROTO)
        self.assertEqual(fe.ack(F.SET_VRING_ADDR, bytes(48)), errno.EPROTO)
        self.assertEqual(fe.ack(F.SET_MEM_TABLE, bytes(7)), errno.EPROTO)
        self.still_open(fe)
        self.finish(fe)

    def test_wrong_payload_size_where_the_answer_is_a_value(self) -> None:
        fe = self.connect()
        fe.send(F.GET_VRING_BASE, bytes(4))         # a vring state is due and cannot say "error"
        self.closed(fe)
        self.error(ProtocolError, "VHOST_USER_GET_VRING_BASE: payload is 4 bytes, expected 8")
        self.finish(fe)

    def test_oversize_payload(self) -> None:
        fe = self.connect()
        self.send_raw(fe, HEADER.pack(F.SET_CONFIG, VHOST_USER_VERSION, 1 << 20))
        self.closed(fe)                             # the payload was never read: framing lost
        self.error(ProtocolError, "exceeds the 4096-byte limit")
        self.finish(fe)

    # -- fds ---------------------------------------------------------------------------------------
    def test_too_many_fds_for_any_message(self) -> None:
        fe = self.connect()
        fds = self.fds(9)                           # at most 8 fds ride on one message
        self.send_raw(fe, HEADER.pack(F.SET_VRING_CALL, VHOST_USER_VERSION, 8) + VringFd(0, False).pack(), fds)
        self.sent(fds)
        self.closed(fe)
        self.error(ProtocolError, "9 fds, at most 8 per message")
        self.finish(fe)

    def test_too_many_fds_for_the_request(self) -> None:
        fe = self.connect()
        fds = self.fds(2)
        self.assertEqual(fe.ack(F.SET_VRING_CALL, VringFd(0, False).pack(), fds), errno.EPROTO)
        self.error(ProtocolError, "VHOST_USER_SET_VRING_CALL: carries 2 fds, expected 0 to 1")
        fe.send(F.SET_VRING_ENABLE, VringState(0, 1).pack(), fds[:1])   # no fd allowed at all
        self.sent(fds)
        self.still_open(fe)
        self.finish(fe)

    def test_too_few_fds(self) -> None:
        fe = self.connect()
        ram2 = Ram((0, 0x10000), (0x100000, 0x10000))
        self.assertEqual(fe.ack(F.SET_MEM_TABLE, ram2.table(), ram2.fds[:1]), errno.EPROTO)
        ram2.close()
        self.error(ProtocolError, "VHOST_USER_SET_MEM_TABLE: 2 regions but 1 fds")
        self.assertEqual(fe.ack(F.SET_VRING_KICK, VringFd(0, False).pack()), errno.EPROTO)  # NOFD clear, no fd
        self.assertEqual(fe.ack(F.SET_LOG_FD), errno.EPROTO)
        self.still_open(fe)
        self.finish(fe)

    def test_fd_with_the_nofd_bit(self) -> None:
        fe = self.connect()
        fds = self.fds(1)
        self.assertEqual(fe.ack(F.SET_VRING_KICK, VringFd(0, True).pack(), fds), errno.EPROTO)
        self.sent(fds)
        self.error(ProtocolError, "the NOFD bit is set")
        self.still_open(fe)
        self.finish(fe)

    # -- the header --------------------------------------------------------------------------------
    def test_version_other_than_1(self) -> None:
        fe = self.connect()
        fds = self.fds(1)
        self.send_raw(fe, HEADER.pack(F.SET_VRING_CALL, 2, 8) + VringFd(0, False).pack(), fds)
        self.sent(fds)
        self.closed(fe)
        self.error(ProtocolError, "header version 2")
        self.finish(fe)

    def test_reserved_flag_bits(self) -> None:
        fe = self.connect()
        self.send_raw(fe, HEADER.pack(F.GET_FEATURES, VHOST_USER_VERSION | 0x100, 0))
        self.closed(fe)
        self.error(ProtocolError, "reserved header flag bits 0x100 set")
        self.finish(fe)

    def test_reply_flag_on_a_request(self) -> None:
        fe = self.connect()
        fe.send(F.SET_OWNER, flags=VHOST_USER_VERSION | VHOST_USER_REPLY_MASK | VHOST_USER_NEED_REPLY_MASK)
        with fe.conn.recv() as reply:
            self.assertEqual(reply.u64(), errno.EPROTO)
        self.error(ProtocolError, "a request arrived with the REPLY flag set")
        self.still_open(fe)
        self.finish(fe)

    def test_disconnect_mid_message(self) -> None:
        fe = self.connect()
        fds = self.fds(2)
        self.send_raw(fe, HEADER.pack(F.SET_VRING_ADDR, VHOST_USER_VERSION, 40) + bytes(10), fds)
        self.sent(fds)
        fe.close()
        self.logged("front-end disconnected (DisconnectedError: ",
                    "after 10 of 40 payload bytes of VHOST_USER_SET_VRING_ADDR")
        self.assertFalse(self.server.errors)        # a disconnect is not an error of the front-end's
        self.finish(fe)

    def test_disconnect_mid_header(self) -> None:
        fe = self.connect()
        fds = self.fds(1)
        self.send_raw(fe, HEADER.pack(F.SET_VRING_KICK, VHOST_USER_VERSION, 8)[:5], fds)
        self.sent(fds)
        fe.close()
        self.logged("front-end disconnected (DisconnectedError: ", "after 5 of 12 header bytes")
        self.assertFalse(self.server.errors)        # a disconnect is not an error of the front-end's
        self.finish(fe)

    # -- feature gates -----------------------------------------------------------------------------
    def test_set_vring_enable_without_protocol_features(self) -> None:
        fe = self.connect(features=DRIVER_FEATURES & ~VHOST_USER_F_PROTOCOL_FEATURES)
        self.assertEqual(fe.ack(F.SET_VRING_ENABLE, VringState(0, 1).pack()), errno.EPROTO)
        self.error(NotNegotiatedError, "VHOST_USER_SET_VRING_ENABLE needs VHOST_USER_F_PROTOCOL_FEATURES")
        self.still_open(fe)
        self.finish(fe)

    def test_protocol_feature_gate(self) -> None:
        fe = self.connect(protocol=QEMU_PROTOCOL & ~P.CONFIGURE_MEM_SLOTS)
        self.assertEqual(fe.ack(F.SET_STATUS, pack_u64(DeviceStatus.ACKNOWLEDGE)), errno.EPROTO)
        self.error(NotNegotiatedError, "VHOST_USER_SET_STATUS needs VHOST_USER_PROTOCOL_F_STATUS")
        self.assertEqual(fe.ack(F.ADD_MEM_REG, self.ram.regions[0].pack_single(), self.ram.fds), errno.EPROTO)
        self.still_open(fe)
        fe.send(F.GET_MAX_MEM_SLOTS)                # its answer is a value: closed instead
        self.closed(fe)
        self.finish(fe)

    def test_features_not_offered(self) -> None:
        fe = self.connect(features=None)
        fe.send(F.SET_PROTOCOL_FEATURES, pack_u64(P.REPLY_ACK | P.STATUS))
        self.assertEqual(fe.ack(F.SET_FEATURES, pack_u64(DRIVER_FEATURES | 1 << 50)), errno.EPROTO)
        self.error(ProtocolError, "bits 0x4000000000000 were not offered")
        self.assertEqual(fe.ack(F.SET_PROTOCOL_FEATURES, pack_u64(P.REPLY_ACK | P.PAGEFAULT)), errno.EPROTO)
        fe.send(F.SET_STATUS, pack_u64(DeviceStatus.FEATURES_OK))
        self.assertEqual(fe.u64(F.GET_STATUS), 0)   # FEATURES_OK does not stick after a refusal
        self.finish(fe)

    def test_inband_notifications_without_backend_req(self) -> None:
        fe = self.connect(features=None, path=self.inband_path)
        self.assertEqual(fe.ack(F.SET_PROTOCOL_FEATURES, pack_u64(P.INBAND_NOTIFICATIONS | P.REPLY_ACK)),
                         errno.EPROTO)
        self.closed(fe)                             # "the back-end should close the connection"
        self.error(ProtocolError, "INBAND_NOTIFICATIONS without BACKEND_REQ and REPLY_ACK")
        self.finish(fe)

    # -- memory regions ----------------------------------------------------------------------------
    def test_overlapping_regions(self) -> None:
        fe = self.connect()
        fds = [memfd(0x20000), memfd(0x20000)]
        regions = (MemoryRegion(0, 0x20000, UVA_BASE, 0), MemoryRegion(0x10000, 0x20000, UVA_BASE + 0x100000, 0))
        self.assertEqual(fe.ack(F.SET_MEM_TABLE, MemoryTable(regions).pack(), fds), errno.EFAULT)
        self.error(GuestMemoryError, "regions overlap in guest addresses: 0x0+0x20000 and 0x10000+0x20000")
        same_uva = (MemoryRegion(0, 0x20000, UVA_BASE, 0), MemoryRegion(0x100000, 0x20000, UVA_BASE + 0x10000, 0))
        self.assertEqual(fe.ack(F.SET_MEM_TABLE, MemoryTable(same_uva).pack(), fds), errno.EFAULT)
        # One at a time with ADD_MEM_REG: the second overlaps the first.
        self.assertEqual(fe.ack(F.ADD_MEM_REG, regions[0].pack_single(), fds[:1]), 0)
        self.assertEqual(fe.ack(F.ADD_MEM_REG, regions[1].pack_single(), fds[1:]), errno.EFAULT)
        self.sent(fds)
        self.still_open(fe)
        self.finish(fe)

    def test_unaligned_region(self) -> None:
        """Regions must be 4 KiB aligned in guest address, size, user address and mmap offset; QEMU
        and DPDK only send page-aligned regions (a non-zero, aligned mmap offset is fine)."""
        fe = self.connect()
        fd = memfd(0x40000)
        good = MemoryRegion(0x100000, 0x10000, UVA_BASE + 0x100000, 0x20000)
        for bad, what in ((good._replace(mmap_offset=0x20800), "mmap offset 0x20800"),
                          (good._replace(guest_phys_addr=0x100200), "guest address 0x100200"),
                          (good._replace(memory_size=0x10001), "size 0x10001"),
                          (good._replace(userspace_addr=UVA_BASE + 0x100004),
                           f"user address {UVA_BASE + 0x100004:#x}")):
            self.server.errors.clear()
            self.assertEqual(fe.ack(F.ADD_MEM_REG, bad.pack_single(), [fd]), errno.EFAULT)
            self.error(GuestMemoryError, f"{what} is not {REGION_ALIGN:#x}-byte aligned")
        self.assertEqual(fe.ack(F.SET_MEM_TABLE, MemoryTable((good._replace(memory_size=0),)).pack(), [fd]),
                         errno.EFAULT)
        self.assertEqual(fe.ack(F.ADD_MEM_REG, good.pack_single(), [fd]), 0)
        self.sent([fd])
        self.still_open(fe)
        self.finish(fe)

    def test_region_beyond_its_file(self) -> None:
        fe = self.connect()
        fd = memfd(0x10000)
        region = MemoryRegion(0, 0x20000, UVA_BASE, 0)
        self.assertEqual(fe.ack(F.SET_MEM_TABLE, MemoryTable((region,)).pack(), [fd]), errno.EFAULT)
        self.sent([fd])
        self.error(GuestMemoryError, "runs past the end of its file")
        self.finish(fe)

    def test_region_in_an_empty_file(self) -> None:
        """An empty memfd (found by tests/fuzz.py): refused like any file too short for its region.
        It used to be mapped, its size 0 taken for "unknown", and the first ring read killed the
        process with SIGBUS."""
        fe = self.connect()
        fd = memfd(0)
        self.assertEqual(fe.ack(F.SET_MEM_TABLE, self.ram.table(), [fd]), errno.EFAULT)
        self.sent([fd])
        self.error(GuestMemoryError, "runs past the end of its file (0x0 bytes)")
        self.still_open(fe)
        self.finish(fe)

    def test_remove_unknown_region(self) -> None:
        fe = self.connect()
        self.assertEqual(fe.ack(F.REM_MEM_REG, self.ram.regions[0].pack_single()), errno.EFAULT)
        self.error(GuestMemoryError, "no region gpa=0x0")
        self.finish(fe)

    # -- rings -------------------------------------------------------------------------------------
    def test_ring_addresses_outside_memory(self) -> None:
        fe = self.connect()
        self.assertEqual(fe.ack(F.SET_MEM_TABLE, self.ram.table(), self.ram.fds), 0)
        fe.send(F.SET_VRING_NUM, VringState(0, 8).pack())
        beyond = UVA_BASE + RAM_SIZE
        addr = VringAddr(0, 0, UVA_BASE + 0x10000, beyond, UVA_BASE + 0x10080, 0)
        self.assertEqual(fe.ack(F.SET_VRING_ADDR, addr.pack()), errno.EFAULT)
        self.error(GuestMemoryError, f"vring 0: device area (used ring) at user address {beyond:#x}")
        # The used ring straddling the end of memory is outside too.
        straddle = addr._replace(used_user_addr=beyond - 0x20)
        self.assertEqual(fe.ack(F.SET_VRING_ADDR, straddle.pack()), errno.EFAULT)
        self.assertIsNone(self.server.backends[0].rings[0].addr)
        self.still_open(fe)
        self.finish(fe)

    def test_misaligned_ring_addresses(self) -> None:
        fe = self.connect()
        good = VringAddr(0, 0, UVA_BASE + 0x10000, UVA_BASE + 0x10100, UVA_BASE + 0x10080, 0)
        for bad, text in ((good._replace(desc_user_addr=UVA_BASE + 0x10008), "descriptor table address"),
                          (good._replace(used_user_addr=UVA_BASE + 0x10102), "used ring address"),
                          (good._replace(avail_user_addr=UVA_BASE + 0x10081), "available ring address")):
            self.server.errors.clear()
            self.assertEqual(fe.ack(F.SET_VRING_ADDR, bad.pack()), errno.EPROTO)
            self.error(ProtocolError, text)
        self.assertEqual(fe.ack(F.SET_VRING_ADDR, good._replace(flags=2).pack()), errno.EPROTO)
        self.assertEqual(fe.ack(F.SET_VRING_ADDR, good.pack()), 0)
        self.finish(fe)

    def test_vring_index_out_of_range(self) -> None:
        fe = self.connect()
        self.assertEqual(fe.ack(F.SET_VRING_NUM, VringState(2, 8).pack()), errno.EPROTO)
        self.error(ProtocolError, "VHOST_USER_SET_VRING_NUM: vring index 2 out of range: Echo has 2 queue(s)")
        fds = self.fds(1)
        self.assertEqual(fe.ack(F.SET_VRING_KICK, VringFd(200, False).pack(), fds), errno.EPROTO)
        self.sent(fds)
        self.assertEqual(fe.ack(F.SET_VRING_ENABLE, VringState(7, 1).pack()), errno.EPROTO)
        self.still_open(fe)
        fe.send(F.GET_VRING_BASE, VringState(2, 0).pack())     # answered with a value: closed instead
        self.closed(fe)
        self.finish(fe)

    def test_bad_ring_size(self) -> None:
        fe = self.connect()
        for num, text in ((0, "size 0 is not in 1..1024"), (2048, "size 2048 is not in 1..1024"),
                          (12, "size 12 is not a power of two")):
            self.server.errors.clear()
            self.assertEqual(fe.ack(F.SET_VRING_NUM, VringState(0, num).pack()), errno.EPROTO)
            self.error(ProtocolError, text)
        self.finish(fe)

    def test_bad_enable_value(self) -> None:
        fe = self.connect()
        self.assertEqual(fe.ack(F.SET_VRING_ENABLE, VringState(0, 2).pack()), errno.EPROTO)
        self.error(ProtocolError, "num 2 is neither 0 nor 1")
        self.finish(fe)

    def test_inflight_region_of_the_other_ring_layout(self) -> None:
        """A region handed over for split rings, then SET_FEATURES switching to packed (found by
        tests/fuzz.py): the packed ring is refused with a ProtocolError, not a TypeError from
        feeding a split tracker the packed reconnect rule."""
        fe = self.connect()
        self.assertEqual(fe.ack(F.SET_MEM_TABLE, self.ram.table(), self.ram.fds), 0)
        with fe.request(F.GET_INFLIGHT_FD, Inflight(0, 0, 2, 8).pack()) as reply:
            inflight, fd = Inflight.unpack(reply.payload), reply.take_fd()
        self.assertEqual(fe.ack(F.SET_INFLIGHT_FD, inflight.pack(), [fd]), 0)
        os.close(fd)
        ring = DriverRing(self.ram, 0)
        ring.setup(fe, need_reply=True)
        ring.add(b"split")
        ring.kick_now()
        self.assertTrue(fired(ring.call, TIMEOUT))          # the region now has history
        self.assertEqual(fe.ack(F.SET_FEATURES, pack_u64(DRIVER_FEATURES | VIRTIO_F_RING_PACKED)), 0)
        ring.kick_now()
        self.error(ProtocolError, "inflight region has split queue regions but ring 0 is packed")
        self.assertTrue(all(isinstance(e, ProtocolError) for e in self.server.errors), self.server.errors)
        ring.close()
        self.finish(fe)


if __name__ == "__main__":
    unittest.main()
