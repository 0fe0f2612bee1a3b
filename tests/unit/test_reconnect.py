"""A front-end that goes away at every step of QEMU 7.2's vhost-user-blk handshake: our Server (a
BlkDevice on a socket, in this process) must be ready for the next front-end each time, with no fd
and no mapping of guest memory left behind, and the next full session must do real I/O.

The handshake is the one QEMU 7.2 really sends (recorded through a WireTap by
tests.peers.test_reconnect_peers, which checks it against :data:`QEMU_BLK_HANDSHAKE`): realize,
then the first start of the device up to DRIVER_OK. It is replayed here with raw messages, each
with QEMU's flags and fds, and cut off after every message, in the middle of every message (half
a header, a header alone with its fds, half a payload), and after a request whose reply is never
read; against a Server that listens and one in client mode.

Also here, our front-end's side of a restart: Frontend.reconnect() after a back-end died having
completed a chain out of order (no inflight region to resubmit from), and while back-ends hang up
in the middle of its handshake; SplitDriverQueue.requeue_unused on its own.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import os
import socket
import tempfile
import threading
import time
import unittest
from unittest import mock
from collections.abc import Callable, Iterator

from tests import support
from vhost_min.backend import Device, Server
from vhost_min.blk import BlkClient, BlkDevice
from vhost_min.frontend import Frontend
from vhost_min.memory import GuestMemory
from vhost_min.user import (FRONTEND_REQUESTS, HEADER, U64, VHOST_USER_NEED_REPLY_MASK, VHOST_USER_VERSION, Config,
                            Connection, FrontendRequest, Inflight, MemoryRegion, ProtocolFeature, VringAddr, VringFd,
                            VringState)
from vhost_min.vring import SplitDeviceQueue, SplitDriverQueue

F = FrontendRequest
P = ProtocolFeature
TIMEOUT = 10.0

#: What QEMU 7.2 sends a vhost-user-blk back-end (ours: it offers INFLIGHT_SHMFD, STATUS,
#: CONFIGURE_MEM_SLOTS and REPLY_ACK) on its first connection: ``-device vhost-user-blk-pci``
#: realizing, then the device's first start (SeaBIOS drives the disk first) up to DRIVER_OK.
#: Recorded from a real QEMU by tests.peers.test_reconnect_peers.
QEMU_BLK_HANDSHAKE = (
    # realize
    "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM", "GET_MAX_MEM_SLOTS",
    "SET_BACKEND_REQ_FD", "SET_OWNER", "GET_FEATURES", "SET_VRING_CALL", "SET_VRING_ERR", "GET_CONFIG",
    # the driver's start: features, inflight region, memory, the ring, DRIVER_OK
    "SET_FEATURES", "GET_STATUS", "SET_STATUS", "GET_INFLIGHT_FD", "SET_INFLIGHT_FD", "SET_VRING_CALL",
    "SET_FEATURES", "GET_STATUS", "ADD_MEM_REG", "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR",
    "SET_VRING_KICK", "SET_VRING_ENABLE", "GET_STATUS", "SET_STATUS",
)
#: Requests QEMU 7.2 sends with NEED_REPLY (as recorded; REPLY_ACK negotiated).
QEMU_NEED_REPLY = {"SET_BACKEND_REQ_FD", "ADD_MEM_REG"}
#: The virtio features QEMU 7.2 acks for Linux's virtio_blk on our back-end (as recorded).
QEMU_LINUX_FEATURES = 0x170006A44
#: QEMU 7.2's protocol-feature mask: every bit up to STATUS (16).
QEMU_PROTOCOL_FEATURE_MASK = (1 << 17) - 1
#: The messages of the handshake that are a header alone (SET_BACKEND_REQ_FD: and its fd).
WITHOUT_PAYLOAD = {"GET_FEATURES", "GET_PROTOCOL_FEATURES", "GET_QUEUE_NUM", "GET_MAX_MEM_SLOTS", "GET_STATUS",
                   "SET_OWNER", "SET_BACKEND_REQ_FD"}
QEMU_GET_CONFIG_SIZE = 57          # what vhost-user-blk-pci asks for
QUEUE_SIZE = 128
GUEST_MEMORY = 1 << 20
GUEST_UVA = 0x7F0000000000          # where "QEMU" says the guest memory is mapped
#: How a cut lands in message N: after the whole message (and its reply), or inside it.
CUTS = ("after", "half header", "header and fds only", "half payload", "reply unread")


class _Session:
    """One QEMU-like front-end connection with the fds it hands over (all closed by close())."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(TIMEOUT)
        self.conn = Connection(self.sock)
        self.fds: list[int] = []
        self.values: dict[str, int] = {}
        self.inflight: tuple[int, Inflight] | None = None
        self.memory = support.memfd(GUEST_MEMORY, "vhost-min-cut-guest")
        self.fds.append(self.memory)

    def eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.fds.append(fd)
        return fd

    def message(self, name: str) -> tuple[F, bytes, list[int]]:
        """QEMU's message ``name`` at this point of the handshake: request, payload, fds."""
        request = F[name]
        if name in WITHOUT_PAYLOAD and name != "SET_BACKEND_REQ_FD":
            return request, b"", []
        if name == "SET_PROTOCOL_FEATURES":
            return request, U64.pack(self.values["GET_PROTOCOL_FEATURES"] & QEMU_PROTOCOL_FEATURE_MASK), []
        if name == "SET_BACKEND_REQ_FD":
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            self.fds += [ours.detach(), theirs.detach()]
            return request, b"", [self.fds[-1]]
        if name in ("SET_VRING_CALL", "SET_VRING_ERR", "SET_VRING_KICK"):
            return request, VringFd(0, False).pack(), [self.eventfd()]
        if name == "GET_CONFIG":
            return request, Config(0, QEMU_GET_CONFIG_SIZE, 0, bytes(QEMU_GET_CONFIG_SIZE)).pack(), []
        if name == "SET_FEATURES":
            return request, U64.pack(self.values["GET_FEATURES"] & QEMU_LINUX_FEATURES), []
        if name == "SET_STATUS":            # FEATURES_OK, then (the ring set up) DRIVER_OK too
            return request, U64.pack(0xF if "SET_VRING_ENABLE" in self.values else 0x8), []
        if name == "GET_INFLIGHT_FD":
            return request, Inflight(0, 0, 1, QUEUE_SIZE).pack(), []
        if name == "SET_INFLIGHT_FD":
            fd, inflight = self.inflight
            return request, inflight.pack(), [fd]
        if name == "ADD_MEM_REG":
            region = MemoryRegion(0, GUEST_MEMORY, GUEST_UVA, 0)
            return request, bytes(8) + region.pack(), [self.memory]
        if name == "SET_VRING_NUM":
            return request, VringState(0, QUEUE_SIZE).pack(), []
        if name == "SET_VRING_BASE":
            return request, VringState(0, 0).pack(), []
        if name == "SET_VRING_ADDR":
            parts = SplitDriverQueue.layout(QUEUE_SIZE, 0x10000)
            return request, VringAddr(0, 0, GUEST_UVA + parts["desc"], GUEST_UVA + parts["device"],
                                      GUEST_UVA + parts["driver"], parts["device"]).pack(), []
        if name == "SET_VRING_ENABLE":
            return request, VringState(0, 1).pack(), []
        raise AssertionError(f"no QEMU message for {name}")

    def send(self, name: str, cut: str | None = None) -> None:
        """Send message ``name`` whole and read its reply, or (``cut``) only part of it."""
        request, payload, fds = self.message(name)
        flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if name in QEMU_NEED_REPLY else 0)
        wire = HEADER.pack(request, flags, len(payload)) + payload
        if cut == "half header":
            self.sock.sendall(wire[:HEADER.size // 2])
        elif cut == "header and fds only":
            socket.send_fds(self.sock, [wire[:HEADER.size]], fds)
        elif cut == "half payload":
            socket.send_fds(self.sock, [wire[:HEADER.size + len(payload) // 2]], fds)
        else:
            self.conn.send(request, payload, fds, flags=flags)
            if cut == "reply unread":
                return
            if FRONTEND_REQUESTS[request].reply or flags & VHOST_USER_NEED_REPLY_MASK:
                with self.conn.recv() as reply:
                    if name == "GET_INFLIGHT_FD":
                        self.inflight = (os.dup(reply.fds[0]), Inflight.unpack(reply.payload))
                        self.fds.append(self.inflight[0])
                    elif len(reply.payload) == U64.size:
                        self.values[name] = reply.u64()
            self.values.setdefault(name, 0)

    def close(self) -> None:
        self.conn.close()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def _applies(name: str, cut: str) -> bool:
    """Whether ``cut`` is a cut of its own for message ``name`` (not the same bytes as another)."""
    if cut in ("header and fds only", "half payload"):
        return name not in WITHOUT_PAYLOAD        # a header alone would be the whole message
    if cut == "reply unread":
        return FRONTEND_REQUESTS[F[name]].reply or name in QEMU_NEED_REPLY
    return True


def _mapped_memfds() -> int:
    """Mappings of memfds in this process (guest memory, inflight regions) right now."""
    with open("/proc/self/maps") as f:
        return sum("/memfd:" in line for line in f)


class HandshakeCutTest(unittest.TestCase):
    """QEMU's handshake cut at every step and inside every message, against one Server."""

    listen = True

    def setUp(self) -> None:
        tmp = tempfile.TemporaryDirectory(prefix="vhost-min-cut-")
        self.addCleanup(tmp.cleanup)
        self.path = os.path.join(tmp.name, "blk.sock")
        self.image = os.path.join(tmp.name, "disk.img")
        with open(self.image, "wb") as f:
            f.truncate(4 << 20)
        self.device = BlkDevice(self.image)
        self.addCleanup(self.device.close)
        self.server = Server()
        self.addCleanup(self.server.close)
        if not self.listen:
            # Client mode: the test listens, the server connects (again 10 ms after each hang-up).
            patcher = mock.patch("vhost_min.backend.RECONNECT_INTERVAL", 0.01)
            patcher.start()
            self.addCleanup(patcher.stop)
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.addCleanup(self.listener.close)
            self.listener.bind(self.path)
            self.listener.listen(1)
            self.listener.settimeout(TIMEOUT)
        self.server.add(self.device, self.path, listen=self.listen)
        stop = threading.Event()
        thread = threading.Thread(target=self.server.run, kwargs={"stop_event": stop}, daemon=True)
        thread.start()
        self.addCleanup(thread.join, TIMEOUT)
        self.addCleanup(stop.set)
        self.written: dict[int, bytes] = {}
        self.used = 0                       # client mode: the server's connections the test accepted

    def connect(self) -> socket.socket:
        """A connection to the back-end: ours to its socket, or (client mode) its own to ours."""
        if not self.listen:
            self.used += 1
            return self.listener.accept()[0]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        return sock

    def wait_idle(self) -> None:
        """Until the server has retired every connection the test used (it notices a hang-up on
        its loop). Listening: no connection left. Client mode: each retired connection made the
        server connect again, so the state to wait for is one fresh connection of its own, pending
        in the test's listener, as it was before the case."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            backends = list(self.server.backends)
            if self.listen and not backends:
                return
            if (not self.listen and self.server.served > self.used and len(backends) == 1
                    and not backends[0].closed):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the server still serves {backends} {TIMEOUT} s after the front-end left")
            time.sleep(0.005)

    def full_session(self, number: int) -> None:
        """A complete session from our own front-end: write 4 KiB of its own and read it back."""
        data = (b"%06d" % number) * 682 + b"\x5a" * 4
        with Frontend(Connection(self.connect()), timeout=TIMEOUT) as fe:
            client = BlkClient(fe, timeout=TIMEOUT)
            client.write(number * 4096, data)
            self.assertEqual(client.read(number * 4096, len(data)), data)
        self.written[number * 4096] = data

    @contextlib.contextmanager
    def nothing_left(self, what: str) -> Iterator[None]:
        gc.collect()        # garbage from earlier tests (a cycle holding guest memory) freed now, not mid-case
        fds, maps = support.open_fds(), _mapped_memfds()
        yield
        self.wait_idle()
        gc.collect()
        now = support.open_fds()
        self.assertEqual(len(now), len(fds), f"fds left open after {what}: {sorted(now - fds)}")
        self.assertEqual(_mapped_memfds(), maps, f"memfd mappings left after {what}")

    def cut_at(self, step: int, cut: str) -> None:
        session = _Session(self.connect())
        try:
            for name in QEMU_BLK_HANDSHAKE[:step]:
                session.send(name)
            if step < len(QEMU_BLK_HANDSHAKE):
                session.send(QEMU_BLK_HANDSHAKE[step], None if cut == "after" else cut)
        finally:
            session.close()

    def test_a_front_end_leaving_at_every_step_and_inside_every_message(self) -> None:
        self.full_session(0)                # the first session's lazy set-up (threads, rings) out of the way
        self.wait_idle()
        cases = [(step, cut) for step, name in enumerate(QEMU_BLK_HANDSHAKE) for cut in CUTS if _applies(name, cut)]
        cases.append((len(QEMU_BLK_HANDSHAKE), "after"))     # the whole handshake, then gone
        if not self.listen:
            cases = [(step, cut) for step, cut in cases if cut == "after"]   # how the server reconnects
        with self.assertNoLogs("vhost_min.backend", level="ERROR"):
            for number, (step, cut) in enumerate(cases, 1):
                what = (f"{cut} {QEMU_BLK_HANDSHAKE[step]} (message {step})" if step < len(QEMU_BLK_HANDSHAKE)
                        else "the whole handshake")
                with self.subTest(what), self.nothing_left(what):
                    self.cut_at(step, cut)
                    self.wait_idle()
                    self.full_session(number)
        self.assertGreater(len(cases), (2 if self.listen else 1) * len(QEMU_BLK_HANDSHAKE))
        # Every session's data is in the image.
        with open(self.image, "rb") as f:
            for offset, data in self.written.items():
                self.assertEqual(os.pread(f.fileno(), len(data), offset), data)


class ClientModeHandshakeCutTest(HandshakeCutTest):
    """The same against a Server in client mode (``add(..., listen=False)``, ``blk --connect``):
    after each hang-up it connects again and serves the next front-end."""

    listen = False



class CountingUpper(Device):
    """Writes the upper-case of what it reads, and counts how often it saw each request."""

    num_queues = 1

    def __init__(self, runs: collections.Counter) -> None:
        super().__init__()
        self.runs = runs

    def handle(self, queue: int, readable: list[memoryview], writable: list[memoryview]) -> int:
        data = b"".join(bytes(b) for b in readable)
        self.runs[data] += 1
        writable[0][:len(data)] = data.upper()
        return len(data)


class _RestartedServer(unittest.TestCase):
    """A Server of CountingUpper devices (one per connection) that a test can stop and start again
    on the same path, counting every request the devices saw."""

    def setUp(self) -> None:
        tmp = tempfile.TemporaryDirectory(prefix="vhost-min-crash-")
        self.addCleanup(tmp.cleanup)
        self.path = os.path.join(tmp.name, "dev.sock")
        self.runs: collections.Counter = collections.Counter()

    def start(self) -> Callable[[], None]:
        server = Server()
        server.add(lambda: CountingUpper(self.runs), self.path)
        return support.run_server(self, server, TIMEOUT)

    def connected(self) -> tuple[Callable[[], None], Frontend, object]:
        """The back-end started; our front-end connected, with 256 KiB of memory and ring 0 of 8."""
        finish = self.start()
        fe = Frontend.connect(self.path, timeout=TIMEOUT)
        self.addCleanup(fe.close)
        fe.negotiate()
        fe.setup_memory(1 << 18)
        return finish, fe, fe.setup_queue(0, 8)


class OutOfOrderCrashTest(_RestartedServer):
    """A back-end dies after completing a chain out of order, with no inflight region to resubmit
    from (qemu-storage-daemon offers none): reconnect() must get every pending chain run once by
    the restarted back-end, and none that was completed run again, even after the driver reused
    the completed chain's descriptors. (QEMU's rule, resume at the used index, loses the chain
    pending behind the completed one and runs a reused entry instead.)"""

    def test_pending_chains_run_once_and_completed_ones_not_again(self) -> None:
        finish, fe, q = self.connected()
        buffers: dict[bytes, int] = {}

        def add(text: bytes) -> None:
            src, dst = fe.alloc(len(text)), fe.alloc(len(text))
            fe.memory.write(src, text)
            buffers[text] = dst
            q.add([(src, len(text))], [(dst, len(text))], token=text)

        def reap_all(want: int) -> list[bytes]:
            done: list[bytes] = []
            deadline = time.monotonic() + TIMEOUT
            while len(done) < want and time.monotonic() < deadline:
                fe.wait_call(0, timeout=0.2)
                done += [token for token, _length in q.reap()]
            return done

        for i in range(5):                          # wrap the ring past its first lap
            add(b"warm-up %d" % i)
            fe.publish(0)
            self.assertEqual(reap_all(1), [b"warm-up %d" % i])
        finish()                                    # the back-end goes away with the ring idle...
        for text in (b"a", b"b", b"c", b"d"):
            add(text)
        fe.publish(0)
        # ...and, as it died, it had taken a, b and c and completed b only (this is what it did).
        dead = SplitDeviceQueue(fe.memory, 8, q.desc_addr, q.avail_addr, q.used_addr, event_idx=True)
        dead.set_base(5)
        taken = {bytes(readable[0]): (head, writable) for head, readable, writable in dead.pop_batch(3)}
        self.assertEqual(sorted(taken), [b"a", b"b", b"c"])
        head, writable = taken[b"b"]
        writable[0][:1] = b"B"
        dead.push(head, 1)
        self.assertEqual(q.reap(), [(b"b", 1)])     # the driver got b, and reuses its descriptors
        add(b"e")
        fe.publish(0)

        self.start()
        fe.reconnect(timeout=TIMEOUT)
        self.assertEqual(sorted(reap_all(4)), [b"a", b"c", b"d", b"e"])
        self.assertEqual(q.reap(), [])
        for text in (b"a", b"b", b"c", b"d", b"e"):
            self.assertEqual(fe.memory.read(buffers[text], 1), text.upper())
        self.assertEqual(self.runs, collections.Counter({**{b"warm-up %d" % i: 1 for i in range(5)},
                                                         b"a": 1, b"c": 1, b"d": 1, b"e": 1}))
        add(b"after")                               # and the ring goes on
        fe.publish(0)
        self.assertEqual(reap_all(1), [b"after"])


class HangUpDuringReconnectTest(_RestartedServer):
    """A back-end that accepts and hangs up while reconnect() is under way (one still exiting as
    we connect, or dying again at once): reconnect() tries again until its timeout and then
    serves. (QEMU 7.2 with reconnect=1 does not: after one such hang-up it still reconnects the
    socket every second but never sends the handshake again, and the guest's disk hangs.)"""

    def test_reconnect_survives_back_ends_that_hang_up_mid_handshake(self) -> None:
        finish, fe, q = self.connected()
        src, dst = fe.alloc(16), fe.alloc(16)

        def roundtrip(text: bytes) -> bytes:
            fe.memory.write(src, text)
            q.add([(src, len(text))], [(dst, len(text))], token=text)
            fe.publish(0)
            deadline = time.monotonic() + TIMEOUT
            while not (done := q.reap()) and time.monotonic() < deadline:
                fe.wait_call(0, timeout=0.2)
            self.assertEqual(done, [(text, len(text))])
            return fe.memory.read(dst, len(text))

        self.assertEqual(roundtrip(b"before"), b"BEFORE")
        finish()
        # In its place, a listener whose first connections end while reconnect() waits for an
        # answer: to GET_FEATURES, to GET_PROTOCOL_FEATURES, and to the fifth request after
        # those (REPLY_ACK "negotiated" here, every request waits for one).
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(4)
        hung_up: list[str] = []

        def impostor() -> None:
            with listener:
                for answers in (0, 1, 6):
                    sock, _ = listener.accept()
                    with Connection(sock) as conn:
                        while True:
                            with conn.recv() as msg:
                                if not (FRONTEND_REQUESTS[msg.request].reply or msg.need_reply):
                                    continue
                                if not answers:
                                    hung_up.append(msg.request.name)
                                    break
                                answers -= 1
                                value = {F.GET_FEATURES: fe.offered_features,
                                         F.GET_PROTOCOL_FEATURES: P.REPLY_ACK}.get(msg.request, 0)
                                conn.reply(msg, U64.pack(value))
            os.unlink(self.path)
            self.start()                                # and then the real one

        thread = threading.Thread(target=impostor, daemon=True)
        thread.start()
        fe.reconnect(timeout=TIMEOUT)
        thread.join(TIMEOUT)
        self.assertEqual(hung_up[:2], ["GET_FEATURES", "GET_PROTOCOL_FEATURES"])
        self.assertEqual(len(hung_up), 3)
        self.assertEqual(roundtrip(b"after"), b"AFTER")


class RequeueUnusedTest(unittest.TestCase):
    """SplitDriverQueue.requeue_unused on its own: the order of what it publishes again."""

    def _memory(self) -> tuple[GuestMemory, dict]:
        """64 KiB of guest memory and a 4-entry split ring's layout in it."""
        fd = support.memfd(1 << 16)
        self.addCleanup(os.close, fd)
        memory = GuestMemory()
        self.addCleanup(memory.clear)
        memory.add_region(0, 1 << 16, fd=fd)
        return memory, SplitDriverQueue.layout(4, 0)

    def test_a_head_pending_longer_than_a_lap_goes_first(self) -> None:
        memory, parts = self._memory()
        driver = SplitDriverQueue(memory, 4, parts["desc"], parts["driver"], parts["device"])
        device = SplitDeviceQueue(memory, 4, parts["desc"], parts["driver"], parts["device"])
        driver.add([(0x8000, 1)], [], token="w")        # head 0, completed at once: z gets head 0 later
        driver.add([(0x8000, 1)], [], token="x")        # head 1, taken by the device and never completed
        driver.publish()
        (w, _r, _w), _x = device.pop_batch()
        device.push(w, 0)
        self.assertEqual(driver.reap(), [("w", 0)])
        for i in range(5):                              # five more laps of one chain each: x's entry is overwritten
            driver.add([(0x8000, 1)], [], token=i)
            driver.publish()
            (head, _r, _w), = device.pop_batch()
            device.push(head, 0)
            self.assertEqual(driver.reap(), [(i, 0)])
        driver.add([(0x8000, 1)], [], token="z")        # published, never taken
        driver.publish()
        driver.add([(0x8000, 1)], [], token="held")     # added, not published
        self.assertEqual(driver.requeue_unused(), 6)    # the used index; x and z published again from there
        restarted = SplitDeviceQueue(memory, 4, parts["desc"], parts["driver"], parts["device"])
        restarted.set_base(6)
        heads = [head for head, _r, _w in restarted.pop_batch()]
        self.assertEqual(heads, [1, 0])                 # x then z (older first); "held" is not published yet
        for head in heads:
            restarted.push(head, 0)
        self.assertEqual(driver.reap(), [("x", 0), ("z", 0)])
        driver.publish()
        (head, _r, _w), = restarted.pop_batch()
        restarted.push(head, 0)
        self.assertEqual(driver.reap(), [("held", 0)])

    def test_a_ring_that_does_not_add_up_is_left_alone(self) -> None:
        memory, parts = self._memory()
        driver = SplitDriverQueue(memory, 4, parts["desc"], parts["driver"], parts["device"])
        for token in ("a", "b"):
            driver.add([(0x8000, 1)], [], token=token)
        driver.publish()
        avail = memory.read(parts["driver"], 12)
        self.assertEqual(driver.requeue_unused(3), 3)   # a used index past what was published: no change
        self.assertEqual(memory.read(parts["driver"], 12), avail)


if __name__ == "__main__":
    unittest.main()
