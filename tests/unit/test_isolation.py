"""One stalled or hostile front-end must not hurt the others (issue 10, "Load and isolation").

One Server in this process, real sockets: a blk device (a temporary image) on one socket, Echo
devices (one per connection) on another for raw peers that misbehave -- a message stopped after a
partial header, after a header carrying fds, in the middle of its payload; replies never read while
requests flood in; the back-end channel never read. Meanwhile our Frontend brings a blk device up
and writes and reads the image through it, and the stalled peers, when they finish their message
later, are answered as if they had never paused; their fds are closed if they leave instead.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import select
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
import unittest
from unittest import mock

import vhost_min.backend as backend_module
from tests import support
from tests.support import memfd, open_fds
from tests.unit.test_backend import QEMU_PROTOCOL, BackendCase, Echo, eventfd, fired, wait_for
from vhost_min.backend import Server
from vhost_min.blk import BlkClient, BlkDevice
from vhost_min.errors import VhostError
from vhost_min.frontend import Frontend
from vhost_min.user import (HEADER, VHOST_USER_MAX_QUEUED, VHOST_USER_NEED_REPLY_MASK, VHOST_USER_VERSION,
                            BackendRequest, Connection, FrontendRequest, MemoryRegion, MemoryTable, ProtocolFeature,
                            VringFd, VringState)

F, P = FrontendRequest, ProtocolFeature
TIMEOUT = 10.0
SECTORS = 256
#: struct ioctl SIOCOUTQ (= TIOCOUTQ, asm-generic/ioctls.h): bytes the peer has not read yet.
SIOCOUTQ = 0x5411


_QUIET = logging.NullHandler()


def setUpModule() -> None:
    logging.getLogger("vhost_min.backend").addHandler(_QUIET)      # the drops below are expected


def tearDownModule() -> None:
    logging.getLogger("vhost_min.backend").removeHandler(_QUIET)


def header(request: int, size: int, *, need_reply: bool = False) -> bytes:
    return HEADER.pack(request, VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if need_reply else 0), size)


def unread(sock: socket.socket) -> int:
    """What we sent on ``sock`` that the other end has not read (SIOCOUTQ), from the kernel."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0" * 4))[0]


class IsolationCase(unittest.TestCase):
    """A Server thread with a blk device and a raw-peer socket; no fd or thread left afterwards."""

    def setUp(self) -> None:
        self.fds_before = open_fds()
        self.addCleanup(self.check_no_leak)
        self.work = tempfile.mkdtemp(prefix="vhost-min-iso-")
        self.addCleanup(shutil.rmtree, self.work, True)
        self.image = os.path.join(self.work, "disk.img")
        with open(self.image, "wb") as f:
            f.write(os.urandom(SECTORS * 512))
        self.blk_sock = os.path.join(self.work, "blk.sock")
        self.raw_sock = os.path.join(self.work, "raw.sock")
        self.server = Server()
        self.device = BlkDevice(self.image)
        self.server.add(self.device, self.blk_sock)
        self.server.add(Echo, self.raw_sock)           # a device per raw peer
        self.addCleanup(self.device.close)         # after the loop has ended (cleanups run last first)
        support.run_server(self, self.server, TIMEOUT)

    def check_no_leak(self) -> None:
        leaked = open_fds() - self.fds_before
        self.assertFalse(leaked, f"fds leaked: {sorted(leaked)}")

    def raw(self) -> Connection:
        """A raw front-end connection to the Echo socket (we write its bytes by hand)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.connect(self.raw_sock)
        conn = Connection(sock)
        self.addCleanup(conn.close)
        return conn

    def sent_and_taken(self, conn: Connection, data: bytes, fds=()) -> None:
        """Send ``data`` (fds on its first byte) and wait until the server has read all of it."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.assertEqual(conn.sock.sendmsg([data], ancillary), len(data))
        wait_for(lambda: unread(conn.sock) == 0, TIMEOUT, "the server to read what was sent")

    def blk_io(self, offset: int) -> None:
        """A whole bring-up with our Frontend on the blk socket, then a write and a read checked
        against the image file; the server must serve it while other peers misbehave."""
        data = os.urandom(8192)
        with Frontend.connect(self.blk_sock, timeout=TIMEOUT) as fe:
            client = BlkClient(fe)
            self.assertEqual(client.capacity, SECTORS)
            client.write(offset, data)
            self.assertEqual(client.read(offset, len(data)), data)
        with open(self.image, "rb") as f:
            self.assertEqual(os.pread(f.fileno(), len(data), offset), data)

    def errors(self) -> str:
        return "\n".join(f"{type(e).__name__}: {e}" for e in list(self.server.errors))


class StalledMessageTests(IsolationCase):
    def test_stalled_peers_wait_others_are_served_then_they_are_answered(self) -> None:
        """Three peers stop inside a message: after 5 header bytes, after a header carrying an
        eventfd, in the middle of a payload. A blk front-end comes and goes meanwhile, with real
        I/O. Then each stalled peer sends the rest and gets the answer it asked for."""
        in_header = self.raw()
        self.sent_and_taken(in_header, header(F.GET_FEATURES, 0)[:5])
        call = eventfd()
        self.addCleanup(os.close, call)
        with_fd = self.raw()
        self.sent_and_taken(with_fd, header(F.SET_VRING_CALL, 8, need_reply=True), [call])
        in_payload = self.raw()
        num = VringState(0, 64).pack()
        self.sent_and_taken(in_payload, header(F.SET_VRING_NUM, 8, need_reply=True) + num[:3])

        self.blk_io(4096)
        self.blk_io(65536)                              # and another connection after that one

        in_header.sock.sendall(header(F.GET_FEATURES, 0)[5:])
        with in_header.recv() as reply:
            self.assertEqual((reply.request, reply.is_reply), (F.GET_FEATURES, True))
            self.assertTrue(reply.u64() & Echo.features)
        with_fd.sock.sendall(VringFd(0, False).pack())
        with with_fd.recv() as reply:
            self.assertEqual((reply.request, reply.u64()), (F.SET_VRING_CALL, 0))
        # The fd that came with the header is the call fd now: SET_VRING_CALL signals it at once.
        self.assertEqual(fired(call, TIMEOUT), 1)
        in_payload.sock.sendall(num[3:])
        with in_payload.recv() as reply:
            self.assertEqual((reply.request, reply.u64()), (F.SET_VRING_NUM, 0))
        self.assertEqual(self.errors(), "")

    def test_fds_of_a_message_in_part_are_closed_when_the_peer_leaves(self) -> None:
        """A SET_MEM_TABLE header with 8 memfds and no payload: the server holds 8 more fds while
        it waits (and serves a blk front-end meanwhile); they are closed when the peer leaves."""
        regions = [memfd(4096) for _ in range(8)]
        for fd in regions:
            self.addCleanup(os.close, fd)
        table = MemoryTable(tuple(MemoryRegion(i << 20, 4096, 0x7F00_0000_0000 + (i << 20), 0)
                                  for i in range(8))).pack()
        peer = self.raw()
        peer.request(F.GET_FEATURES).close()            # accepted and served: its socket is counted
        before = open_fds()
        self.sent_and_taken(peer, header(F.SET_MEM_TABLE, len(table), need_reply=True), regions)
        received = open_fds() - before
        self.assertEqual(len(received), 8, "the server holds the 8 memfds of the message in part")
        self.blk_io(0)
        peer.close()
        wait_for(lambda: not open_fds() & received, TIMEOUT, "the server to close the fds it held")
        self.assertEqual(self.errors(), "")             # a peer that leaves is no error

    def test_a_stall_is_dropped_after_the_deadline_an_idle_peer_is_not(self) -> None:
        """STALL_TIMEOUT (made short here): a peer stopped inside a header is dropped with the
        reason; a peer idle between messages for longer than that is still served."""
        with mock.patch.object(backend_module, "STALL_TIMEOUT", 0.3):
            idle = self.raw()
            idle.send(F.GET_FEATURES)
            idle.recv().close()
            stalled = self.raw()
            self.sent_and_taken(stalled, header(F.GET_FEATURES, 0)[:7])
            self.assertEqual(stalled.sock.recv(1), b"", "the stalled peer was not dropped")
            self.assertIn("sent a message in part (7 of 12 header bytes) and nothing more", self.errors())
            self.assertEqual([e.errno for e in self.server.errors], [errno.ETIMEDOUT])
            time.sleep(0.5)                             # idle for longer than STALL_TIMEOUT
            with idle.request(F.GET_FEATURES) as reply:
                self.assertTrue(reply.u64() & Echo.features)
            self.blk_io(0)


class FloodTests(IsolationCase):
    def test_a_peer_that_never_reads_its_replies_is_dropped(self) -> None:
        """GET_FEATURES without end, never reading an answer: the replies the socket buffers do
        not hold wait in a queue of at most VHOST_USER_MAX_QUEUED bytes, then the peer is dropped
        with the reason; a blk front-end is served in the middle of the flood and after it."""
        flood = self.raw()
        flood.sock.setblocking(False)
        burst = header(F.GET_FEATURES, 0) * 64
        sent = 0
        deadline = time.monotonic() + 6 * TIMEOUT
        io_done = False
        while True:
            try:
                sent += flood.sock.send(burst, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                select.select([], [flood.sock], [], 0.05)
            except (BrokenPipeError, ConnectionResetError):
                break                                   # dropped
            if not io_done and sent > 64 * len(burst):
                self.blk_io(8192)                       # in the middle of the flood
                io_done = True
            self.assertLess(time.monotonic(), deadline, f"the flood was not stopped ({sent} bytes sent)")
        self.assertTrue(io_done)
        self.assertIn("the peer does not read what we send", self.errors())
        self.assertIn(f"at most {VHOST_USER_MAX_QUEUED} bytes", self.errors())
        self.assertEqual([e.errno for e in self.server.errors], [errno.ENOBUFS])
        self.blk_io(16384)

    def test_replies_left_unread_are_dropped_after_the_deadline(self) -> None:
        """A peer that sends 2000 requests at once (more answers than the socket buffers take,
        fewer than the queue bound) and never reads: dropped after STALL_TIMEOUT."""
        with mock.patch.object(backend_module, "STALL_TIMEOUT", 0.3):
            peer = self.raw()
            peer.sock.sendall(header(F.GET_FEATURES, 0) * 2000)
            wait_for(lambda: self.server.errors, TIMEOUT, "the peer to be dropped")
            self.assertIn("took none of our", self.errors())
            self.assertEqual([e.errno for e in self.server.errors], [errno.ETIMEDOUT])
            self.blk_io(0)


class ConnectionTests(unittest.TestCase):
    """user.Connection's non-blocking side on its own: the output queue and the partial message."""

    def setUp(self) -> None:
        fds = open_fds()
        self.addCleanup(lambda: self.assertEqual(open_fds(), fds, "fd leak"))
        self.a, self.b = Connection.pair()
        self.addCleanup(self.a.close)
        self.addCleanup(self.b.close)
        self.b.sock.settimeout(TIMEOUT)

    def test_queued_replies_keep_their_order_and_fds(self) -> None:
        """More replies than the socket buffers hold, an eventfd on every 100th: the receiver gets
        every one in order, each fd on its own message (told apart by the eventfd's count)."""
        self.a.make_nonblocking(max_queued=1 << 20, max_queued_fds=64)
        n = 3000
        for i in range(n):
            if i % 100:
                self.a.send(F.GET_FEATURES, struct.pack("=Q", i), reply=True)
            else:
                fd = os.eventfd(i + 1, os.EFD_CLOEXEC)
                self.a.send(F.GET_FEATURES, struct.pack("=Q", i), [fd], reply=True)
                os.close(fd)                        # the queue keeps its own duplicate
        self.assertGreater(self.a.pending_output, 0, "the socket buffers took everything: no queue tested")
        for i in range(n):
            self.a.flush()
            with self.b.recv() as msg:
                self.assertEqual(msg.u64(), i)
                self.assertEqual(len(msg.fds), 0 if i % 100 else 1, i)
                if msg.fds:
                    self.assertEqual(os.eventfd_read(msg.fds[0]), i + 1)
        self.assertTrue(self.a.flush())
        self.assertEqual(self.a.pending_output, 0)

    def test_queue_bound(self) -> None:
        self.a.make_nonblocking(max_queued=4096)
        with self.assertRaises(VhostError) as caught:
            for _ in range(100_000):
                self.a.send(F.GET_FEATURES, bytes(8), reply=True)
        self.assertEqual(caught.exception.errno, errno.ENOBUFS)
        self.assertLessEqual(self.a.pending_output, 4096)
        with self.assertRaises(VhostError):             # unusable from then on
            self.a.send(F.GET_FEATURES, bytes(8), reply=True)

    def test_recv_finishes_what_recv_nowait_started(self) -> None:
        self.b.make_nonblocking()
        data = header(F.SET_VRING_NUM, 8) + VringState(1, 64).pack()
        self.a.sock.sendall(data[:10])
        self.assertIsNone(self.b.recv_nowait())
        self.assertEqual(self.b.partial, "10 of 12 header bytes")
        self.a.sock.sendall(data[10:15])
        self.assertIsNone(self.b.recv_nowait())
        self.assertEqual(self.b.partial, "3 of 8 payload bytes of VHOST_USER_SET_VRING_NUM")
        later = threading.Timer(0.1, self.a.sock.sendall, (data[15:],))
        later.start()
        try:
            with self.b.recv() as msg:                  # waits for the rest
                self.assertEqual((msg.request, VringState.unpack(msg.payload)), (F.SET_VRING_NUM, (1, 64)))
        finally:
            later.join()
        self.assertIsNone(self.b.partial)

    def test_request_sends_its_queue_then_waits_for_the_answer(self) -> None:
        """request() on a non-blocking connection whose queue is not empty: the queue goes out
        first, then the answer is waited for (at most ``timeout`` per wait)."""
        self.a.make_nonblocking(timeout=TIMEOUT)
        n = 3000
        for i in range(n):
            self.a.send(F.SET_VRING_NUM, VringState(0, i).pack())
        self.assertGreater(self.a.pending_output, 0)

        def answer() -> None:
            for i in range(n):
                with self.b.recv() as msg:
                    assert VringState.unpack(msg.payload).num == i, msg
            with self.b.recv() as msg:
                self.b.reply_u64(msg, 0x1234)
        peer = threading.Thread(target=answer)
        peer.start()
        try:
            with self.a.request(F.GET_FEATURES) as reply:
                self.assertEqual(reply.u64(), 0x1234)
        finally:
            peer.join(TIMEOUT)
        self.assertEqual(self.a.pending_output, 0)
        self.a.make_nonblocking(timeout=0.1)
        with self.assertRaises(TimeoutError):           # nobody answers now
            self.a.request(F.GET_FEATURES)


class AssemblyTests(BackendCase):
    """The in-process pair of test_backend: bytes handed to the backend one at a time."""

    def handle(self) -> bool:
        """backend.handle_message(), failing (not hanging) if it waits for bytes that are not there."""
        def on_alarm(_signum, _frame):
            raise TimeoutError("handle_message() waited for the rest of the message")
        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, 2.0)
        try:
            return self.backend.handle_message()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def feed(self, data: bytes, fds=()) -> None:
        """``data`` one byte per handle_message() (``fds`` on the first); nothing may be answered
        before the last byte."""
        for i in range(len(data)):
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds and not i else []
            self.fe.conn.sock.sendmsg([data[i:i + 1]], ancillary)
            self.assertTrue(self.handle(), f"closed after byte {i}")
            if i < len(data) - 1:
                self.assertFalse(self.fe.pending(), f"answered after byte {i} of {len(data)}")

    def test_byte_by_byte(self) -> None:
        self.feed(header(F.GET_FEATURES, 0))
        with self.fe.conn.recv() as reply:
            self.assertEqual(reply.u64(), self.backend.offered_features)
        call = eventfd()
        self.addCleanup(os.close, call)
        self.feed(header(F.SET_VRING_CALL, 8, need_reply=True) + VringFd(0, False).pack(), [call])
        with self.fe.conn.recv() as reply:
            self.assertEqual((reply.request, reply.u64()), (F.SET_VRING_CALL, 0))
        self.assertEqual(fired(call), 1)
        self.feed(header(F.SET_VRING_NUM, 8, need_reply=True) + VringState(1, 32).pack())
        with self.fe.conn.recv() as reply:
            self.assertEqual(reply.u64(), 0)
        self.assertEqual(self.backend.rings[1].size, 32)

    def test_one_message_per_call_the_rest_waits(self) -> None:
        """Two whole messages and half a third in one write: one answer per handle_message(),
        the half message kept until its end comes."""
        self.fe.conn.sock.sendall(header(F.GET_PROTOCOL_FEATURES, 0) * 2 + header(F.GET_FEATURES, 0)[:6])
        for _ in range(2):
            self.assertTrue(self.handle())
            self.assertTrue(self.fe.pending())
            with self.fe.conn.recv() as reply:
                self.assertEqual((reply.request, reply.u64()), (F.GET_PROTOCOL_FEATURES,
                                                                self.backend.offered_protocol_features))
        self.assertTrue(self.handle())
        self.assertFalse(self.fe.pending())
        self.fe.conn.sock.sendall(header(F.GET_FEATURES, 0)[6:])
        self.assertTrue(self.handle())
        with self.fe.conn.recv() as reply:
            self.assertEqual(reply.request, F.GET_FEATURES)


class BackendChannelTests(BackendCase):
    def test_a_channel_nobody_reads_never_blocks(self) -> None:
        """Back-end requests without an answer (CONFIG_CHANGE_MSG) on a channel the front-end
        never reads: queued, never waited for; past the bound the channel is dropped."""
        self.fe.negotiate(protocol=QEMU_PROTOCOL)
        ours, silent = socket.socketpair()
        self.addCleanup(silent.close)
        self.fe.send(F.SET_BACKEND_REQ_FD, b"", [ours.fileno()])
        ours.close()
        self.assertIsNotNone(self.backend.channel)
        sent = 0
        with self.assertRaises(VhostError) as caught:
            while sent < 1_000_000:
                self.backend.backend_request(BackendRequest.CONFIG_CHANGE_MSG)
                sent += 1
        self.assertIn("the peer does not read what we send", str(caught.exception))
        self.assertEqual(caught.exception.errno, errno.ENOBUFS)
        self.assertIsNone(self.backend.channel)
        self.assertEqual(self.fe.u64(F.GET_QUEUE_NUM), 2)           # the main socket is still served


class SealTests(BackendCase):
    """A region's fd a front-end could shrink under us (SIGBUS at our next access) is logged."""

    def table_with(self, fd: int) -> None:
        table = MemoryTable((MemoryRegion(0, 1 << 20, 0x7F00_0000_0000, 0),)).pack()
        self.assertEqual(self.fe.ack(F.SET_MEM_TABLE, table, [fd]), 0)

    def test_unsealed_memfd_is_logged_a_sealed_one_is_not(self) -> None:
        fd = memfd(1 << 20)
        self.addCleanup(os.close, fd)
        with self.assertLogs("vhost_min.backend", logging.INFO) as logs:
            self.table_with(fd)
        self.assertIn("region at guest 0x0 (0x100000 bytes): its fd is not sealed against shrinking",
                      "\n".join(logs.output))
        # As QEMU's memory-backend-memfd sends it (seal=on: GROW, SHRINK, SEAL): nothing to say.
        sealed = os.memfd_create("sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self.addCleanup(os.close, sealed)
        os.ftruncate(sealed, 1 << 20)
        fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        with self.assertNoLogs("vhost_min.backend", logging.INFO):
            self.table_with(sealed)

if __name__ == "__main__":
    unittest.main()
