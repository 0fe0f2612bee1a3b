"""The tracer (vhost_min.trace) between peers of our own, in one process.

- Scripted peers on raw user.Connection sockets send every front-end request (1-44) and every
  back-end request (1-10) through it, each with its payload and fds: what one side received is
  what the other sent, byte for byte, and each fd is the same open file (same inode) -- except the
  SET_BACKEND_REQ_FD socket, which the tracer swaps for its own socketpair so the channel is traced.
- Each request kind's decoded fields, flags and reply matching, as the records show them.
- Our Frontend against our back-end framework through it: data path, the back-end channel traced.
- Bad input: a peer that closes inside a header, inside a payload, a back-end that closes (or
  sends half its reply) while a reply is owed, a header announcing more than the protocol's
  maximum: the tracer says who closed, forwards nothing half, leaves no fd open, and serves on.
- One direction stalled never holds up the other; a request of our own (inject) goes between the
  front-end's and its reply comes back to us alone.
- The command: `python3 -m vhost_min trace --once --json` relays one session, prints one JSON
  object per line, and exits 0 when a peer disconnects mid-message.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import uuid

from tests import support
from tests.support import memfd, open_fds
from vhost_min.errors import DisconnectedError
from vhost_min.trace import BACKEND, BACKEND_CHANNEL, FRONTEND, MAIN, Record, SessionEvent, Tracer
from vhost_min.user import (BACKEND_REQUESTS, FRONTEND_REQUESTS, HEADER, VHOST_IOTLB_MISS, VHOST_IOTLB_UPDATE,
                            VHOST_USER_MAX_PAYLOAD, BackendRequest, Config, Connection, DeviceState, FrontendRequest,
                            Inflight, IotlbMsg, Listener, Log, MemoryRegion, MemoryTable, SharedObject, ShmemConfig,
                            ShmemMap, VringAddr, VringArea, VringFd, VringState, pack_u64)

F, B = FrontendRequest, BackendRequest
TIMEOUT = 5.0
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UUID = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC)


def identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


class TracerTestCase(unittest.TestCase):
    """A Tracer in a thread between ``self.listen`` and ``self.backend_path``; its events in
    ``self.events``. No fd of the test process may be left open when a test ends."""

    def setUp(self) -> None:
        self.fds_before = open_fds()
        self.addCleanup(self.check_no_leak)
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.listen = os.path.join(self.tmp.name, "trace.sock")
        self.backend_path = os.path.join(self.tmp.name, "backend.sock")
        self.events: list = []
        self.lock = threading.Lock()

    def check_no_leak(self) -> None:
        leaked = open_fds() - self.fds_before
        self.assertFalse(leaked, f"fds left open: {sorted(leaked)}")

    def start_tracer(self) -> Tracer:
        def report(event) -> None:
            with self.lock:
                self.events.append(event)
        tracer = Tracer(self.listen, self.backend_path, report)
        support.run_server(self, tracer, TIMEOUT)
        return tracer

    def records(self, channel: str | None = None) -> list[Record]:
        with self.lock:
            return [e for e in self.events if isinstance(e, Record) and channel in (None, e.channel)]

    def closes(self) -> list[SessionEvent]:
        with self.lock:
            return [e for e in self.events if isinstance(e, SessionEvent) and e.event == "closed"]

    def wait_for(self, condition, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}; events: {[getattr(e, 'name', e) for e in self.events]}")
            time.sleep(0.01)

    def scripted_pair(self) -> tuple[Connection, Connection]:
        """A raw front-end connected through the tracer, and the back-end connection it got."""
        listener = getattr(self, "listener", None)
        if listener is None:
            listener = self.listener = Listener(self.backend_path)
            self.addCleanup(listener.close)
            listener._sock.settimeout(TIMEOUT)
        frontend = Connection.connect(self.listen)
        self.addCleanup(frontend.close)
        backend = listener.accept()
        self.addCleanup(backend.close)
        for conn in (frontend, backend):
            conn.sock.settimeout(TIMEOUT)
        return frontend, backend


# --------------------------------------------------------------------------------------------
# Every message, byte for byte, fd for fd
# --------------------------------------------------------------------------------------------

def frontend_script(fd) -> list[tuple[int, bytes, list[int], bool, bytes | None, list[int]]]:
    """(request, payload, fds, need_reply, reply payload or None, reply fds) for every front-end
    request; ``fd(kind)`` makes an fd the test closes."""
    region = MemoryRegion(0x0, 0x10000, 0x7f0000000000, 0)
    config = Config(0, 4, 0, bytes(4))
    return [
        (F.GET_FEATURES, b"", [], False, pack_u64(1 << 32 | 1 << 30), []),
        (F.SET_FEATURES, pack_u64(1 << 32 | 1 << 30), [], True, pack_u64(0), []),
        (F.SET_OWNER, b"", [], False, None, []),
        (F.RESET_OWNER, b"", [], False, None, []),
        (F.SET_MEM_TABLE, MemoryTable((region, region._replace(guest_phys_addr=0x10000))).pack(),
         [fd("memfd"), fd("memfd")], True, pack_u64(0), []),
        (F.SET_LOG_BASE, Log(0x1000, 0).pack(), [fd("memfd")], False, pack_u64(0), []),
        (F.SET_LOG_FD, b"", [fd("eventfd")], False, None, []),
        (F.SET_VRING_NUM, VringState(0, 256).pack(), [], False, None, []),
        (F.SET_VRING_ADDR, VringAddr(0, 0, 0x7f0000001000, 0x7f0000003000, 0x7f0000002000, 0).pack(), [], False,
         None, []),
        (F.SET_VRING_BASE, VringState(0, 7).pack(), [], False, None, []),
        (F.GET_VRING_BASE, VringState(0, 0).pack(), [], False, VringState(0, 42).pack(), []),
        (F.SET_VRING_KICK, VringFd(0, False).pack(), [fd("eventfd")], False, None, []),
        (F.SET_VRING_CALL, VringFd(1, True).pack(), [], False, None, []),
        (F.SET_VRING_ERR, VringFd(0, False).pack(), [fd("eventfd")], False, None, []),
        (F.GET_PROTOCOL_FEATURES, b"", [], False, pack_u64(0x8f2b), []),
        (F.SET_PROTOCOL_FEATURES, pack_u64(0x8f2b), [], False, None, []),
        (F.GET_QUEUE_NUM, b"", [], False, pack_u64(2), []),
        (F.SET_VRING_ENABLE, VringState(0, 1).pack(), [], False, None, []),
        (F.SEND_RARP, bytes.fromhex("525400123456") + bytes(2), [], False, None, []),
        (F.NET_SET_MTU, pack_u64(1500), [], False, None, []),
        (F.SET_BACKEND_REQ_FD, b"", [fd("socket")], True, pack_u64(0), []),
        (F.IOTLB_MSG, IotlbMsg(0x1000, 0x1000, 0x7f0000001000, 3, VHOST_IOTLB_UPDATE).pack(), [], False,
         pack_u64(0), []),
        (F.SET_VRING_ENDIAN, VringState(0, 1).pack(), [], False, None, []),
        (F.GET_CONFIG, config.pack(), [], False, config._replace(data=b"abcd").pack(), []),
        (F.SET_CONFIG, Config(0, 2, 0, b"xy").pack(), [], False, None, []),
        (F.CREATE_CRYPTO_SESSION, b"\x01\x02\x03", [], False, pack_u64(9), []),
        (F.CLOSE_CRYPTO_SESSION, pack_u64(9), [], False, None, []),
        (F.POSTCOPY_ADVISE, b"", [], False, b"", [fd("eventfd")]),
        (F.POSTCOPY_LISTEN, b"", [], True, pack_u64(0), []),
        (F.POSTCOPY_END, b"", [], False, pack_u64(0), []),
        (F.GET_INFLIGHT_FD, Inflight(0, 0, 2, 256).pack(), [], False, Inflight(0x2000, 0, 2, 256).pack(),
         [fd("memfd")]),
        (F.SET_INFLIGHT_FD, Inflight(0x2000, 0, 2, 256).pack(), [fd("memfd")], False, None, []),
        (F.GPU_SET_SOCKET, b"", [fd("socket")], False, None, []),
        (F.RESET_DEVICE, b"", [], False, None, []),
        (F.VRING_KICK, VringState(0, 3).pack(), [], False, None, []),
        (F.GET_MAX_MEM_SLOTS, b"", [], False, pack_u64(32), []),
        (F.ADD_MEM_REG, region.pack_single(), [fd("memfd")], True, pack_u64(0), []),
        (F.REM_MEM_REG, region.pack_single(), [], True, pack_u64(0), []),
        (F.SET_STATUS, pack_u64(0xf), [], False, None, []),
        (F.GET_STATUS, b"", [], False, pack_u64(0xf), []),
        (F.GET_SHARED_OBJECT, SharedObject(UUID).pack(), [], False, pack_u64(0), [fd("memfd")]),
        (F.SET_DEVICE_STATE_FD, DeviceState(0, 0).pack(), [fd("pipe")], False, pack_u64(0x100), []),
        (F.CHECK_DEVICE_STATE, b"", [], False, pack_u64(0), []),
        (F.GET_SHMEM_CONFIG, b"", [], False, ShmemConfig(1, (0x100000,)).pack(), []),
    ]


def backend_script(fd) -> list[tuple[int, bytes, list[int], bool, bytes | None, list[int]]]:
    """The same for every back-end request, sent on the SET_BACKEND_REQ_FD channel."""
    return [
        (B.IOTLB_MSG, IotlbMsg(0x3000, 0, 0, 1, VHOST_IOTLB_MISS).pack(), [], False, None, []),
        (B.CONFIG_CHANGE_MSG, b"", [], True, pack_u64(0), []),
        (B.VRING_HOST_NOTIFIER_MSG, VringArea(1, 0x1000, 0).pack(), [fd("memfd")], False, None, []),
        (B.VRING_CALL, VringState(0, 0).pack(), [], False, None, []),
        (B.VRING_ERR, VringState(1, 0).pack(), [], False, None, []),
        (B.SHARED_OBJECT_ADD, SharedObject(UUID).pack(), [], False, None, []),
        (B.SHARED_OBJECT_REMOVE, SharedObject(UUID).pack(), [], False, None, []),
        (B.SHARED_OBJECT_LOOKUP, SharedObject(UUID).pack(), [], False, pack_u64(0), [fd("memfd")]),
        (B.SHMEM_MAP, ShmemMap(0, 0, 0x1000, 0x1000, 1).pack(), [fd("memfd")], False, None, []),
        (B.SHMEM_UNMAP, ShmemMap(0, 0, 0x1000, 0x1000, 0).pack(), [], False, None, []),
    ]


class ByteExactTests(TracerTestCase):
    def make_fd(self, kind: str) -> int:
        if kind == "memfd":
            fd = memfd(0x10000)
        elif kind == "eventfd":
            fd = eventfd()
        elif kind == "pipe":
            fd, w = os.pipe2(os.O_CLOEXEC)
            self.addCleanup(os.close, w)
        else:
            a, b = socket.socketpair()
            self.addCleanup(a.close)
            fd = b.detach()
        self.addCleanup(os.close, fd)
        return fd

    def exchange(self, asker: Connection, answerer: Connection, script) -> dict:
        """Send each scripted message from ``asker``; check what ``answerer`` got; answer it when
        scripted; check what ``asker`` got back. Returns the fds received, by request."""
        received = {}
        for request, payload, fds, need_reply, reply, reply_fds in script:
            with self.subTest(request=request.name):
                asker.send(request, payload, fds, need_reply=need_reply)
                msg = answerer.recv()
                self.assertEqual((msg.request, msg.flags, msg.payload),
                                 (request, 0x1 | (0x8 if need_reply else 0), payload))
                got = msg.take_fds()
                received[request] = got
                for f in got:
                    self.addCleanup(os.close, f)
                if request != F.SET_BACKEND_REQ_FD:
                    self.assertEqual([identity(f) for f in got], [identity(f) for f in fds], "not the same files")
                if reply is None:
                    continue
                answerer.send(request, reply, reply_fds, reply=True)
                with asker.recv() as answer:
                    self.assertEqual((answer.request, answer.flags, answer.payload), (request, 0x5, reply))
                    self.assertEqual([identity(f) for f in answer.fds], [identity(f) for f in reply_fds])
        return received

    def test_every_request_both_channels_byte_exact_with_fds(self) -> None:
        self.start_tracer()
        frontend, backend = self.scripted_pair()
        channel_ours, channel_theirs = socket.socketpair()
        self.addCleanup(channel_ours.close)
        self.addCleanup(channel_theirs.close)

        def fd(kind: str) -> int:
            return channel_theirs.fileno() if kind == "socket" and not self.handed else self.make_fd(kind)
        self.handed = False
        script = frontend_script(fd)
        # SET_BACKEND_REQ_FD hands over the test's own channel socket; GPU_SET_SOCKET some other one.
        index = next(i for i, m in enumerate(script) if m[0] == F.SET_BACKEND_REQ_FD)
        script[index] = script[index][:2] + ([channel_theirs.fileno()],) + script[index][3:]
        self.handed = True
        received = self.exchange(frontend, backend, script)

        # The back-end got a socket, but not the front-end's: one end of the tracer's socketpair.
        (backend_channel_fd,) = received[F.SET_BACKEND_REQ_FD]
        self.assertNotEqual(identity(backend_channel_fd), identity(channel_theirs.fileno()))
        backend_channel = Connection(socket.socket(fileno=os.dup(backend_channel_fd)), requests=BackendRequest)
        self.addCleanup(backend_channel.close)
        frontend_channel = Connection(channel_ours, requests=BackendRequest)
        for conn in (backend_channel, frontend_channel):
            conn.sock.settimeout(TIMEOUT)
        self.exchange(backend_channel, frontend_channel, backend_script(self.make_fd))

        # An unknown code passes too, its payload shown as hex.
        frontend.send(99, b"\xde\xad")
        with backend.recv() as msg:
            self.assertEqual((msg.request, msg.payload), (99, b"\xde\xad"))

        self.wait_for(lambda: any(r.request == 99 for r in self.records()), "every record")
        self.check_records()

    def check_records(self) -> None:
        main, channel = self.records(MAIN), self.records(BACKEND_CHANNEL)
        requests = [r for r in main if not r.is_reply]
        self.assertEqual([r.request for r in requests], list(FrontendRequest) + [99])
        self.assertEqual({r.request for r in channel if not r.is_reply}, set(BackendRequest))
        self.assertTrue(all(r.sender == FRONTEND for r in requests))
        self.assertTrue(all(r.sender == BACKEND for r in channel if not r.is_reply))
        # What the spec says each request is owed, and every reply matched with it.
        for r in main + channel:
            with self.subTest(record=r.name, reply=r.is_reply):
                if r.request == 99:
                    self.assertEqual(r.fields, {"hex": "dead"})
                    self.assertEqual(r.problems, ["request 99 is not a front-end request the protocol defines"])
                    continue
                self.assertEqual(r.problems, [])
                if r.is_reply:
                    self.assertEqual((r.answers, r.matched), (r.name, True))
                    asked = next(q for q in main + channel if q.name == r.name and not q.is_reply)
                    self.assertEqual(r.answer_kind, asked.expects)
                else:
                    spec = (FRONTEND_REQUESTS if r.channel == MAIN else BACKEND_REQUESTS)[r.request]
                    self.assertEqual(r.expects, ("reply" if spec.reply else "ack") if spec.reply_due(r.flags)
                                     else None)
                if r.name != "VHOST_USER_CREATE_CRYPTO_SESSION":    # QEMU-internal layout: hex
                    self.assertNotIn("hex", r.fields)       # every other kind decoded by name

        def fields(request, reply=False, records=main):
            return next(r for r in records if r.name == request.spec_name and r.is_reply == reply).fields

        self.assertEqual(fields(F.GET_FEATURES, True)["features_names"],
                         ["VHOST_USER_F_PROTOCOL_FEATURES", "VIRTIO_F_VERSION_1"])
        table = fields(F.SET_MEM_TABLE)
        self.assertEqual(table["nregions"], 2)
        self.assertEqual(table["regions"][1], {"guest_phys_addr": 0x10000, "memory_size": 0x10000,
                                               "userspace_addr": 0x7f0000000000, "mmap_offset": 0})
        self.assertEqual(fields(F.SET_VRING_ADDR)["used_user_addr"], 0x7f0000003000)
        self.assertEqual(fields(F.SET_VRING_CALL), {"index": 1, "nofd": True})
        self.assertEqual(fields(F.GET_VRING_BASE, True), {"index": 0, "num": 42})
        self.assertEqual(fields(F.GET_PROTOCOL_FEATURES, True)["protocol_features_names"][:4],
                         ["MQ", "LOG_SHMFD", "REPLY_ACK", "BACKEND_REQ"])
        self.assertEqual(fields(F.SEND_RARP), {"mac": "52:54:00:12:34:56"})
        self.assertEqual(fields(F.IOTLB_MSG)["type"], VHOST_IOTLB_UPDATE)
        self.assertEqual(fields(F.GET_CONFIG, True), {"offset": 0, "size": 4, "flags": 0, "data": b"abcd".hex()})
        self.assertEqual(fields(F.GET_INFLIGHT_FD, True)["mmap_size"], 0x2000)
        self.assertEqual(fields(F.ADD_MEM_REG)["memory_size"], 0x10000)
        self.assertEqual(fields(F.SET_STATUS)["status_names"], ["ACKNOWLEDGE", "DRIVER", "DRIVER_OK", "FEATURES_OK"])
        self.assertEqual(fields(F.GET_SHARED_OBJECT), {"uuid": str(UUID)})
        self.assertEqual(fields(F.SET_DEVICE_STATE_FD, True), {"status": 0x100})
        self.assertEqual(fields(F.GET_SHMEM_CONFIG, True), {"nregions": 1, "memory_sizes": {"0": 0x100000}})
        self.assertEqual(fields(B.VRING_HOST_NOTIFIER_MSG, records=channel),
                         {"index": 1, "nofd": False, "size_bytes": 0x1000, "offset_bytes": 0})
        self.assertEqual(fields(B.SHMEM_MAP, records=channel)["flags"], 1)
        # fds described by what they are.
        by_name = {r.name: r for r in main + channel if not r.is_reply}
        self.assertEqual(len(by_name["VHOST_USER_SET_MEM_TABLE"].fds), 2)
        self.assertTrue(all(t.startswith("/memfd:vhost-min-test") for t in by_name["VHOST_USER_SET_MEM_TABLE"].fds))
        self.assertEqual(by_name["VHOST_USER_SET_VRING_KICK"].fds, ("anon_inode:[eventfd]",))
        self.assertTrue(by_name["VHOST_USER_SET_BACKEND_REQ_FD"].fds[0].startswith("socket:["))
        self.assertTrue(by_name["VHOST_USER_SET_DEVICE_STATE_FD"].fds[0].startswith("pipe:["))
        self.assertEqual(len(by_name["VHOST_USER_BACKEND_SHMEM_MAP"].fds), 1)
        # The records' bytes are the bytes: header + payload.
        for r in main + channel:
            self.assertEqual(r.wire[:HEADER.size], HEADER.pack(int(r.request), r.flags, len(r.payload)))
        # Text and JSON renderings of each.
        for r in main + channel:
            self.assertIn(r.name, r.text())
            self.assertEqual(json.loads(json.dumps(r.as_dict()))["request"], r.name)

    def test_what_the_spec_refuses_is_still_forwarded_as_it_came_and_reported(self) -> None:
        """A tracer shows what the peers do, it does not police them: a header with version 2 and
        a reserved flag bit, a payload of the wrong size, and 12 fds (the spec allows 8) all reach
        the other side unchanged, each with its problem in the record."""
        self.start_tracer()
        frontend, backend = self.scripted_pair()
        odd = HEADER.pack(F.SET_OWNER, 0x102, 0)
        short = HEADER.pack(F.SET_VRING_NUM, 0x1, 4) + b"\x01\x02\x03\x04"
        fds = [eventfd() for _ in range(12)]
        for fd in fds:
            self.addCleanup(os.close, fd)
        many = HEADER.pack(F.SET_OWNER, 0x1, 0)
        frontend.sock.sendall(odd)
        frontend.sock.sendall(short)
        frontend.sock.sendmsg([many], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds))])
        got, received = b"", []
        while len(got) < len(odd + short + many):
            data, ancdata, _, _ = backend.sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
            self.assertTrue(data)
            got += data
            for _, _, fd_data in ancdata:
                received += [int.from_bytes(fd_data[i:i + 4], sys.byteorder) for i in range(0, len(fd_data), 4)]
        for fd in received:
            self.addCleanup(os.close, fd)
        self.assertEqual(got, odd + short + many)
        self.assertEqual([identity(fd) for fd in received], [identity(fd) for fd in fds])
        self.wait_for(lambda: len(self.records()) == 3, "three records")
        odd_record, short_record, many_record = self.records()
        self.assertEqual(odd_record.problems, ["header version 2, expected 1", "reserved flag bits 0x100 set"])
        self.assertEqual(short_record.problems, ["payload not decodable: vring state: payload is 4 bytes, expected 8",
                                                 "VHOST_USER_SET_VRING_NUM: payload is 4 bytes, expected 8"])
        self.assertEqual(short_record.fields, {"hex": "01020304"})
        self.assertEqual(many_record.problems, ["VHOST_USER_SET_OWNER: carries 12 fds, expected 0"])
        self.assertEqual(len(many_record.fds), 12)

    def test_a_reply_to_the_wrong_request_is_flagged(self) -> None:
        self.start_tracer()
        frontend, backend = self.scripted_pair()
        frontend.send(F.GET_FEATURES)
        backend.recv().close()
        backend.send(F.GET_PROTOCOL_FEATURES, pack_u64(0), reply=True)
        frontend.recv().close()
        backend.send(F.GET_STATUS, pack_u64(0), reply=True)        # nothing owed any more
        frontend.recv().close()
        self.wait_for(lambda: len(self.records()) == 3, "three records")
        _, wrong, unsolicited = self.records()
        self.assertEqual((wrong.answers, wrong.matched), ("VHOST_USER_GET_FEATURES", False))
        self.assertIn("the reply owed was to VHOST_USER_GET_FEATURES", wrong.problems)
        self.assertIn("NOT the one owed", wrong.text())
        self.assertEqual(unsolicited.matched, False)
        self.assertIn("a reply when no request was waiting for one", unsolicited.problems)


class BackendChannelTests(TracerTestCase):
    def hand_over(self, frontend: Connection, backend: Connection) -> tuple[Connection, Connection]:
        """SET_BACKEND_REQ_FD: (the front-end's end, the back-end's end) of the relayed channel."""
        ours, theirs = socket.socketpair()
        frontend.send(F.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
        theirs.close()
        with backend.recv() as msg:
            channel = Connection(socket.socket(fileno=msg.take_fd()), requests=BackendRequest)
        mine = Connection(ours, requests=BackendRequest)
        for conn in (channel, mine):
            self.addCleanup(conn.close)
            conn.sock.settimeout(TIMEOUT)
        return mine, channel

    def test_a_second_channel_lives_on_when_the_first_closes(self) -> None:
        self.start_tracer()
        frontend, backend = self.scripted_pair()
        first_fe, first_be = self.hand_over(frontend, backend)
        second_fe, second_be = self.hand_over(frontend, backend)
        first_be.close()                                    # as libvhost-user does with the old one
        with self.assertRaises(DisconnectedError):
            first_fe.recv()
        second_be.send(B.CONFIG_CHANGE_MSG, need_reply=True)
        with second_fe.recv() as msg:
            self.assertEqual(msg.request, B.CONFIG_CHANGE_MSG)
        second_fe.send(B.CONFIG_CHANGE_MSG, pack_u64(0), reply=True)
        with second_be.recv() as reply:
            self.assertEqual(reply.u64(), 0)
        self.wait_for(lambda: len(self.records(BACKEND_CHANNEL)) == 2, "the second channel's records")
        (closed,) = self.closes()
        self.assertEqual((closed.channel, closed.by, closed.detail),
                         (BACKEND_CHANNEL, BACKEND, "the backend closed the connection"))
        request, reply = self.records(BACKEND_CHANNEL)
        self.assertEqual((request.expects, reply.answers, reply.answer_kind, reply.matched),
                         ("ack", "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG", "ack", True))
        self.assertIn("ack of VHOST_USER_BACKEND_CONFIG_CHANGE_MSG: matched", reply.text())
        frontend.close()                                    # the session ends, the second channel with it
        with self.assertRaises(DisconnectedError):
            second_be.recv()
        self.wait_for(lambda: len(self.closes()) == 3, "the session's end")
        self.assertEqual([(c.channel, c.by) for c in self.closes()[1:]],
                         [(MAIN, FRONTEND), (BACKEND_CHANNEL, "tracer")])


class InjectTests(TracerTestCase):
    def test_a_request_of_our_own_between_the_frontends(self) -> None:
        """inject(): the back-end gets our request between two of the front-end's, its reply comes
        to our callback only, and the front-end's own traffic goes on as if nothing happened."""
        tracer = self.start_tracer()
        frontend, backend = self.scripted_pair()
        frontend.send(F.SET_OWNER)
        backend.recv().close()
        got = []
        answered = threading.Event()

        def on_reply(record) -> None:
            got.append(record)
            answered.set()
        tracer.call_soon(lambda: tracer.inject(0, F.GET_STATUS, b"", on_reply))
        with backend.recv() as msg:
            self.assertEqual((msg.request, msg.flags, msg.payload), (F.GET_STATUS, 0x1, b""))
        backend.send(F.GET_STATUS, pack_u64(0xf), reply=True)
        self.assertTrue(answered.wait(TIMEOUT))
        self.assertEqual((got[0].request, got[0].payload), (F.GET_STATUS, pack_u64(0xf)))
        frontend.send(F.GET_FEATURES)
        with backend.recv() as msg:
            self.assertEqual(msg.request, F.GET_FEATURES)
        backend.send(F.GET_FEATURES, pack_u64(1), reply=True)
        with frontend.recv() as reply:                  # the first thing the front-end receives
            self.assertEqual((reply.request, reply.u64()), (F.GET_FEATURES, 1))
        self.wait_for(lambda: len(self.records()) == 3, "three records")
        self.assertEqual([r.name for r in self.records()], ["VHOST_USER_SET_OWNER", "VHOST_USER_GET_FEATURES",
                                                           "VHOST_USER_GET_FEATURES"])
        # A session that is gone answers None at once.
        tracer.call_soon(lambda: tracer.inject(7, F.GET_STATUS, b"", on_reply))
        self.wait_for(lambda: len(got) == 2, "the refusal")
        self.assertIsNone(got[1])


# --------------------------------------------------------------------------------------------
# Our front-end and our back-end through the tracer
# --------------------------------------------------------------------------------------------

class OurPeersTests(TracerTestCase):
    def test_frontend_and_backend_through_the_tracer(self) -> None:
        from tests.unit.test_frontend import UpperDevice
        from vhost_min.backend import Server
        from vhost_min.frontend import Frontend

        logging.getLogger("vhost_min.backend").setLevel(logging.CRITICAL)
        self.addCleanup(logging.getLogger("vhost_min.backend").setLevel, logging.NOTSET)
        device = UpperDevice()
        server = Server()
        server.add(device, self.backend_path)
        support.run_server(self, server, TIMEOUT)
        self.start_tracer()
        with Frontend.connect(self.listen, timeout=TIMEOUT) as fe:
            fe.negotiate()
            fe.setup_memory(1 << 18)
            fe.setup_queue(0, 16)
            q = fe.queue(0)
            src, dst = fe.alloc(5), fe.alloc(5)
            fe.memory.write(src, b"hello")
            q.add([(src, 5)], [(dst, 5)], token="t")
            fe.publish(0)
            deadline, done = time.monotonic() + TIMEOUT, []
            while not done and time.monotonic() < deadline:
                fe.wait_call(0, timeout=0.5)
                done = q.reap()
            self.assertEqual(done, [("t", 5)])
            self.assertEqual(fe.memory.read(dst, 5), b"HELLO")          # the data path never saw the tracer
            device.backend.notify_config_change()                      # on the back-end channel
            deadline = time.monotonic() + TIMEOUT
            while not fe.config_changes and time.monotonic() < deadline:
                fe.wait_call(0, timeout=0.05)
            self.assertEqual(fe.config_changes, 1)
            self.assertEqual(fe.stop(), {0: 1})
        self.wait_for(lambda: len(self.closes()) == 2, "the session's end")
        records = self.records()
        names = [r.name.removeprefix("VHOST_USER_") for r in records if not r.is_reply]
        for expected in ("GET_FEATURES", "SET_BACKEND_REQ_FD", "SET_FEATURES", "SET_VRING_KICK", "GET_VRING_BASE"):
            self.assertIn(expected, names)
        self.assertTrue({"SET_MEM_TABLE", "ADD_MEM_REG"} & set(names))
        self.assertIn("BACKEND_CONFIG_CHANGE_MSG", names)
        change = next(r for r in records if r.name == "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG")
        self.assertEqual((change.channel, change.sender), (BACKEND_CHANNEL, BACKEND))
        self.assertEqual([p for r in records for p in r.problems], [])
        self.assertTrue(all(r.matched for r in records if r.is_reply))
        kick = next(r for r in records if r.request == F.SET_VRING_KICK)
        self.assertEqual(kick.fds, ("anon_inode:[eventfd]",))
        closes = {c.channel: c for c in self.closes()}      # the front-end closes its channel first
        self.assertEqual((closes[MAIN].by, closes[MAIN].owed), (FRONTEND, []))
        self.assertEqual((closes[BACKEND_CHANNEL].by, closes[BACKEND_CHANNEL].owed), (FRONTEND, []))


# --------------------------------------------------------------------------------------------
# Bad input: peers that go away mid-message, oversized messages
# --------------------------------------------------------------------------------------------

class BadInputTests(TracerTestCase):
    def assert_backend_gets_nothing(self, backend: Connection) -> None:
        with self.assertRaises(DisconnectedError) as caught:
            backend.recv()
        self.assertEqual(str(caught.exception), "peer closed the connection")   # not even a byte

    def assert_serves_on(self) -> None:
        """A fresh session relays a message after the broken one."""
        frontend, backend = self.scripted_pair()
        frontend.send(F.SET_OWNER)
        with backend.recv() as msg:
            self.assertEqual(msg.request, F.SET_OWNER)

    def test_frontend_closes_inside_a_header(self) -> None:
        self.start_tracer()
        frontend, backend = self.scripted_pair()
        frontend.sock.sendall(HEADER.pack(F.SET_VRING_NUM, 1, 8)[:6])
        frontend.close()
        self.assert_backend_gets_nothing(backend)
        self.wait_for(self.closes, "the close")
        (closed,) = self.closes()
        self.assertEqual((closed.by, closed.channel), (FRONTEND, MAIN))
        self.assertEqual(closed.detail, "the frontend closed the connection in the middle of a message header "
                                        "(6 of 12 bytes): not forwarded")
        self.assertEqual(closed.partial, {"header_bytes": 6, "fds": 0})
        self.assertEqual(self.records(), [])
        self.assert_serves_on()

    def test_frontend_sends_a_whole_header_and_no_payload(self) -> None:
        self.start_tracer()
        frontend, backend = self.scripted_pair()
        frontend.sock.sendall(HEADER.pack(F.SET_MEM_TABLE, 0x9, 40))
        frontend.close()
        self.assert_backend_gets_nothing(backend)
        self.wait_for(self.closes, "the close")
        (closed,) = self.closes()
        self.assertEqual((closed.by, closed.detail), (FRONTEND, "the frontend closed the connection in the middle of "
                                                                "VHOST_USER_SET_MEM_TABLE (0 of 40 payload bytes): "
                                                                "not forwarded"))
        self.assert_serves_on()

    def test_frontend_closes_inside_a_payload_with_its_fd(self) -> None:
        self.start_tracer()
        frontend, backend = self.scripted_pair()
        kick = eventfd()
        self.addCleanup(os.close, kick)
        data = HEADER.pack(F.SET_VRING_ADDR, 1, 40) + bytes(10)
        frontend.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, kick.to_bytes(4, sys.byteorder))])
        frontend.close()
        self.assert_backend_gets_nothing(backend)
        self.wait_for(self.closes, "the close")
        (closed,) = self.closes()
        self.assertEqual(closed.by, FRONTEND)
        self.assertIn("in the middle of VHOST_USER_SET_VRING_ADDR (10 of 40 payload bytes): not forwarded",
                      closed.detail)
        self.assertEqual(closed.partial, {"header_bytes": 12, "fds": 1, "request": "VHOST_USER_SET_VRING_ADDR",
                                          "size": 40, "payload_bytes": 10})
        self.assertIn("closed by the frontend", closed.text())
        self.assert_serves_on()     # and the fd it held is closed: check_no_leak

    def test_backend_closes_while_a_reply_is_owed(self) -> None:
        self.start_tracer()
        frontend, backend = self.scripted_pair()
        frontend.send(F.GET_VRING_BASE, VringState(0, 0).pack())
        backend.recv().close()
        backend.close()
        with self.assertRaises(DisconnectedError):
            frontend.recv()
        self.wait_for(self.closes, "the close")
        (closed,) = self.closes()
        self.assertEqual((closed.by, closed.detail, closed.owed),
                         (BACKEND, "the backend closed the connection", ["VHOST_USER_GET_VRING_BASE"]))
        self.assertIn("reply still owed to VHOST_USER_GET_VRING_BASE", closed.text())
        self.assertEqual(closed.as_dict()["owed"], ["VHOST_USER_GET_VRING_BASE"])
        self.assert_serves_on()

    def test_backend_closes_halfway_through_its_reply(self) -> None:
        self.start_tracer()
        frontend, backend = self.scripted_pair()
        frontend.send(F.GET_FEATURES)
        backend.recv().close()
        backend.sock.sendall(HEADER.pack(F.GET_FEATURES, 0x5, 8) + bytes(3))
        backend.close()
        with self.assertRaises(DisconnectedError) as caught:
            frontend.recv()
        self.assertEqual(str(caught.exception), "peer closed the connection")   # no half reply reached it
        self.wait_for(self.closes, "the close")
        (closed,) = self.closes()
        self.assertEqual((closed.by, closed.owed), (BACKEND, ["VHOST_USER_GET_FEATURES"]))
        self.assertIn("in the middle of VHOST_USER_GET_FEATURES (3 of 8 payload bytes)", closed.detail)
        self.assert_serves_on()

    def test_a_header_beyond_the_maximum_payload_ends_the_session_unforwarded(self) -> None:
        self.start_tracer()
        frontend, backend = self.scripted_pair()
        frontend.send(F.SET_OWNER)
        backend.recv().close()
        frontend.sock.sendall(HEADER.pack(F.SET_CONFIG, 1, 1 << 20) + bytes(64))
        self.assert_backend_gets_nothing(backend)
        with self.assertRaises(DisconnectedError):
            frontend.recv()
        self.wait_for(self.closes, "the close")
        (closed,) = self.closes()
        self.assertEqual(closed.by, "tracer")
        self.assertEqual(closed.detail, f"the frontend sent a VHOST_USER_SET_CONFIG header announcing {1 << 20} "
                                        f"payload bytes, beyond the protocol's {VHOST_USER_MAX_PAYLOAD}: nothing of "
                                        f"it was forwarded")
        self.assertEqual([r.name for r in self.records()], ["VHOST_USER_SET_OWNER"])
        self.assert_serves_on()

    def test_no_backend_to_connect_to(self) -> None:
        tracer = self.start_tracer()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.settimeout(TIMEOUT)
        sock.connect(self.listen)
        self.assertEqual(sock.recv(1), b"")                 # hung up on at once
        self.wait_for(self.closes, "the refusal")
        self.assertEqual(self.closes()[0].by, "tracer")
        self.assertIn(f"cannot connect to the back-end at {self.backend_path}", tracer.failures[0])


class NoHeadOfLineBlockingTests(TracerTestCase):
    def test_a_stalled_direction_does_not_hold_up_the_other(self) -> None:
        """The front-end stops reading its back-end channel while the back-end floods it: the
        tracer holds one message, stops reading the flood, and still relays the main socket both
        ways -- and then the whole flood, in order, once the front-end reads again."""
        self.start_tracer()
        frontend, backend = self.scripted_pair()
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        frontend.send(F.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
        theirs.close()
        with backend.recv() as msg:
            channel = Connection(socket.socket(fileno=msg.take_fd()), requests=BackendRequest)
        self.addCleanup(channel.close)
        channel.sock.setblocking(False)
        sent = 0
        with self.assertRaises(BlockingIOError):
            while sent < 100000:
                channel.sock.send(HEADER.pack(B.VRING_CALL, 1, 8) + VringState(0, sent).pack())
                sent += 1
        self.assertGreater(sent, 100)                       # both socket buffers and the tracer's one message
        for i in range(20):
            frontend.send(F.GET_VRING_BASE, VringState(i, 0).pack())
            with backend.recv() as msg:
                self.assertEqual(VringState.unpack(msg.payload).index, i)
            backend.send(F.GET_VRING_BASE, VringState(i, i).pack(), reply=True)
            with frontend.recv() as reply:
                self.assertEqual(VringState.unpack(reply.payload), (i, i))
        drained = Connection(ours, requests=BackendRequest)
        drained.sock.settimeout(TIMEOUT)
        for i in range(sent):
            with drained.recv() as msg:
                self.assertEqual(VringState.unpack(msg.payload).num, i)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------

class CommandTests(TracerTestCase):
    def run_command(self, *args: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH")))))
        proc = subprocess.Popen([sys.executable, "-m", "vhost_min", "trace", "--listen", self.listen, "--connect",
                                 self.backend_path, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, text=True)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        deadline = time.monotonic() + 10
        while not os.path.exists(self.listen):
            self.assertIsNone(proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
            self.assertLess(time.monotonic(), deadline, "the tracer did not listen")
            time.sleep(0.02)
        return proc

    def test_json_lines_and_a_clean_exit_when_the_backend_closes_mid_message(self) -> None:
        proc = self.run_command("--json", "--once")
        frontend, backend = self.scripted_pair()
        table = memfd(0x1000)
        self.addCleanup(os.close, table)
        frontend.send(F.GET_FEATURES)
        backend.recv().close()
        backend.send(F.GET_FEATURES, pack_u64(1 << 32), reply=True)
        frontend.recv().close()
        frontend.send(F.SET_MEM_TABLE, MemoryTable((MemoryRegion(0, 0x1000, 0x7f0000000000, 0),)).pack(), [table],
                      need_reply=True)
        backend.recv().close()
        backend.sock.sendall(HEADER.pack(F.SET_MEM_TABLE, 0x5, 8)[:5])    # half a header, then gone
        backend.close()
        out, err = proc.communicate(timeout=TIMEOUT)
        self.assertEqual((proc.returncode, err), (0, ""))
        lines = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([line.get("request", line.get("event")) for line in lines],
                         ["open", "VHOST_USER_GET_FEATURES", "VHOST_USER_GET_FEATURES", "VHOST_USER_SET_MEM_TABLE",
                          "closed"])
        table_line = lines[3]
        self.assertEqual((table_line["direction"], table_line["flag_names"], table_line["expects"]),
                         ("frontend->backend", ["NEED_REPLY"], "ack"))
        self.assertEqual(table_line["fields"]["regions"][0]["userspace_addr"], 0x7f0000000000)
        self.assertTrue(table_line["fds"][0]["target"].startswith("/memfd:vhost-min-test"))
        self.assertEqual(lines[2]["reply"], {"to": "VHOST_USER_GET_FEATURES", "kind": "reply", "matched": True})
        closed = lines[-1]
        self.assertEqual((closed["by"], closed["owed"]), ("backend", ["VHOST_USER_SET_MEM_TABLE"]))
        self.assertEqual(closed["partial"], {"header_bytes": 5, "fds": 0})

    def test_text_output_and_sigterm(self) -> None:
        proc = self.run_command()
        frontend, backend = self.scripted_pair()
        frontend.send(F.SET_VRING_NUM, VringState(1, 256).pack())
        backend.recv().close()
        frontend.close()
        deadline = time.monotonic() + TIMEOUT
        out = ""
        while "closed by the frontend" not in out and time.monotonic() < deadline:
            out += proc.stdout.readline()
        proc.terminate()
        rest, err = proc.communicate(timeout=TIMEOUT)
        self.assertEqual((proc.returncode, err), (0, ""))
        lines = (out + rest).splitlines()
        self.assertEqual(lines[0], f"vhost-min: tracing {self.listen} -> {self.backend_path}")
        self.assertRegex(lines[2], r"^#0 +[0-9.]+s frontend->backend VHOST_USER_SET_VRING_NUM  flags=0x1  index=1  "
                                   r"num=256$")
        self.assertRegex(lines[3], r"^#0 +[0-9.]+s -- closed by the frontend: the frontend closed the connection$")

    def test_once_with_no_backend_is_one_line_and_status_1(self) -> None:
        proc = self.run_command("--once")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.settimeout(TIMEOUT)
        sock.connect(self.listen)
        self.assertEqual(sock.recv(1), b"")
        out, err = proc.communicate(timeout=TIMEOUT)
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(err, f"vhost-min: cannot connect to the back-end at {self.backend_path}: No such file or "
                              f"directory; front-end disconnected\n")
        self.assertIn("closed by the tracer: cannot connect", out)
        self.assertFalse(os.path.exists(self.listen), "the listening socket was left behind")

    def test_a_listen_path_that_is_not_a_socket_is_one_line(self) -> None:
        with open(self.listen, "w"):
            pass
        proc = subprocess.run([sys.executable, "-m", "vhost_min", "trace", "--listen", self.listen, "--connect",
                               self.backend_path], capture_output=True, text=True, timeout=30,
                              env=dict(os.environ, PYTHONPATH=ROOT))
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(proc.stderr, f"vhost-min: {self.listen} exists and is not a socket; refusing to replace it\n")


if __name__ == "__main__":
    unittest.main()
