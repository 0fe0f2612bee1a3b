"""A fuzzing harness, standard library only, shared by the unit test (tests/unit/test_fuzz.py, a
fixed seed and a fixed number of cases) and the bench (``python3 -m bench fuzz --minutes N``).

Three targets, each a function ``fuzz_X(rng, stats, budget)`` that runs cases until ``budget``
says stop and counts what it covered in ``stats``:

* :func:`fuzz_backend` -- a Backend on one end of a socket pair, fed a valid handshake (features,
  memory, rings) cut at a random depth, then valid and mutated messages of every request type
  (header fields, sizes, payload bytes, flags, truncation, appended bytes) carrying random fds
  (eventfds, memfds of odd sizes, pipe ends, /dev/null, sockets; right and wrong counts), with
  random ring contents kicked in between.
* :func:`fuzz_frontend` -- our Frontend's requests answered by a fake back-end whose replies
  (written before the request is sent, so one thread suffices) are mutated the same way, and
  back-end requests of every type, valid and mutated with random fds, on its back-end channel.
* :func:`fuzz_rings` -- split and packed device queues over memfd guest memory (one region, two
  adjacent, two apart), fed well-formed chains by our driver queue (direct and indirect, buffers
  across a region boundary) that are then corrupted at random: descriptors, single fields,
  indices, indirect tables (addresses inside, across and outside memory, loops, bad flags and
  lengths); pop_batch / pop_descriptors, then push_batch of random held heads in random order,
  sometimes with a bogus pair. A queue that breaks is reset and the case goes on.

Oracles (a violation raises :class:`FuzzFailure` with the seed and case to replay): nothing but
a VhostError escapes, and nothing logs an exception of another kind (the Backend and the
Frontend's channel catch everything and log it); no call outlives :data:`OPERATION_TIMEOUT`
(SIGALRM); no fd is left open after a case; every popped view lies inside one region of guest
memory, and on a ring not corrupted since its reset each chain has the byte counts our driver
added; a push of held heads is accepted and moves the used index (split) and the chains in
flight by exactly its length; a bogus push is refused and changes neither.

Replay: ``run(seed, {"backend": Budget(cases=N)})`` runs the same cases (one Random per target,
seeded from the seed and the target's name); a failure names the case that failed.
"""

from __future__ import annotations

import array
import collections
import ctypes
import errno
import gc
import logging
import os
import random
import select
import signal
import socket
import struct
import threading
import time
import traceback
from collections.abc import Callable

from vhost_min.backend import Backend, Device
from vhost_min.errors import VhostError
from vhost_min.frontend import Frontend
from vhost_min.memory import GuestMemory
from vhost_min.packed import PackedDeviceQueue, PackedDriverQueue
from vhost_min.user import (FRONTEND_REQUESTS, HEADER, U64, VHOST_USER_NEED_REPLY_MASK, VHOST_USER_REPLY_MASK,
                            VHOST_USER_VERSION, BACKEND_REQUESTS, BackendRequest, Config, Connection, DeviceState, FrontendRequest,
                            Inflight, IotlbMsg, Log, MemoryRegion, MemoryTable, ProtocolFeature, ShmemConfig,
                            ShmemMap, VringAddr, VringArea, VringFd, VringState)
from vhost_min.virtio import (VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC,
                              VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                              VIRTQ_DESC_F_WRITE, DeviceId)
from vhost_min.vring import SplitDeviceQueue, SplitDriverQueue

F, B, P = FrontendRequest, BackendRequest, ProtocolFeature

#: The longest any single call under test may take (a hang is a failure, not a slow run).
OPERATION_TIMEOUT = 10.0
#: Guest memory of the backend and frontend targets: one memfd region at guest address 0.
RAM_SIZE = 1 << 16
UVA_BASE = 0x7F31_0000_0000
#: Values that break code paths: zeros, all ones, sign bits, powers of two near limits.
INTERESTING = (0, 1, 2, 7, 8, 0xFF, 0x100, 0x1000, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFF_FFFF, 0x8000_0000,
               0xFFFF_FFFF, 0x1_0000_0000, 0x7FFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF,
               RAM_SIZE, RAM_SIZE - 1, UVA_BASE)
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")


class FuzzFailure(AssertionError):
    """An oracle was violated: the message names the target, the seed and the case."""


class Hang(BaseException):
    """Raised by SIGALRM inside a call that took longer than OPERATION_TIMEOUT (a BaseException,
    so the library's ``except Exception`` cannot swallow it)."""


class Stats:
    """What a run covered: counters per target (cases, messages, ring states, outcomes)."""

    def __init__(self) -> None:
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.seconds: collections.Counter = collections.Counter()

    def add(self, target: str, key: str, n: int = 1) -> None:
        self.counts[target][key] += n

    def rows(self) -> list[list]:
        return [[target, key, n] for target in sorted(self.counts) for key, n in sorted(self.counts[target].items())]

    def as_dict(self) -> dict:
        return {"counts": {t: dict(c) for t, c in self.counts.items()}, "seconds": dict(self.seconds)}


class Budget:
    """Stop after ``cases`` cases, ``seconds`` after the first look, or once ``until()`` is true,
    whichever comes first (``until`` looks at the Stats, e.g. "100,000 messages handled")."""

    def __init__(self, cases: int | None = None, seconds: float | None = None,
                 until: Callable[[], bool] | None = None) -> None:
        self.cases, self.seconds, self.until = cases, seconds, until
        self.deadline: float | None = None
        self.done = 0

    def more(self) -> bool:
        if self.cases is not None and self.done >= self.cases:
            return False
        if self.until is not None and self.until():
            return False
        if self.seconds is None:
            return True
        if self.deadline is None:
            self.deadline = time.monotonic() + self.seconds
        return time.monotonic() < self.deadline


# --------------------------------------------------------------------------------------------
# Oracles
# --------------------------------------------------------------------------------------------

class _Alarm:
    """SIGALRM after OPERATION_TIMEOUT seconds around a block; raises Hang (main thread only)."""

    def __init__(self, seconds: float = OPERATION_TIMEOUT) -> None:
        self.seconds = seconds
        self.armed = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> None:
        if self.armed:
            self.previous = signal.signal(signal.SIGALRM, _on_alarm)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)


def _on_alarm(signum, frame) -> None:
    raise Hang(f"a call took longer than {OPERATION_TIMEOUT} s")


class _ForeignLogged(logging.Handler):
    """Records every log record that carries an exception other than a VhostError (the Backend
    and Frontend catch everything; such a record is how a foreign exception shows)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and not isinstance(exc, VhostError) and not isinstance(exc, Hang):
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            self.found.append(f"{record.getMessage()}: {type(exc).__name__}: {exc}\n{text}")


class _Quiet:
    """Keep the library's (expected, numerous) log lines off stderr while fuzzing, and watch them."""

    def __enter__(self) -> _ForeignLogged:
        self.logger = logging.getLogger("vhost_min")
        self.handler = _ForeignLogged()
        self.saved = (self.logger.propagate, self.logger.level)
        self.logger.addHandler(self.handler)
        self.logger.propagate = False
        self.logger.setLevel(logging.DEBUG)
        return self.handler

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.propagate, level = self.saved
        self.logger.setLevel(level)


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _check_leaks(before: set[int], what: str, threads: int) -> None:
    """No fd opened since ``before`` is still open (after letting transfer threads finish)."""
    deadline = time.monotonic() + OPERATION_TIMEOUT
    while True:
        leaked = open_fds() - before
        if not leaked or time.monotonic() > deadline:
            break
        if threading.active_count() <= threads:
            gc.collect()
            leaked = open_fds() - before
            if not leaked:
                break
        time.sleep(0.01)
    if leaked:
        kinds = {}
        for fd in sorted(leaked):
            try:
                kinds[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                kinds[fd] = "?"
        raise FuzzFailure(f"{what}: fds left open: {kinds}")


def _foreign(exc: BaseException, what: str) -> FuzzFailure:
    """The failure for an exception that is not a VhostError (or a Hang), its traceback included."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if isinstance(exc, Hang):
        return FuzzFailure(f"{what}: hang: {exc}\n{text}")
    return FuzzFailure(f"{what}: {type(exc).__name__} escaped (not a VhostError): {exc}\n{text}")


# --------------------------------------------------------------------------------------------
# Random fds and mutations
# --------------------------------------------------------------------------------------------

def _random_fd(rng: random.Random, kind: str | None = None) -> tuple[str, int, list[int]]:
    """(kind, fd to send, every fd to close afterwards)."""
    kind = kind or rng.choice(("eventfd", "eventfd", "memfd", "memfd", "memfd0", "memfd_small", "pipe_r", "pipe_w",
                               "devnull", "socket"))
    if kind == "eventfd":
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        return kind, fd, [fd]
    if kind.startswith("memfd"):
        fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
        os.ftruncate(fd, {"memfd": RAM_SIZE, "memfd0": 0, "memfd_small": 100}[kind])
        return kind, fd, [fd]
    if kind.startswith("pipe"):
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        return kind, (r if kind == "pipe_r" else w), [r, w]
    if kind == "devnull":
        fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        return kind, fd, [fd]
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    fa, fb = a.detach(), b.detach()
    return kind, fb, [fa, fb]


def _fd_count(rng: random.Random, valid: tuple[int, int]) -> int:
    r = rng.random()
    if r < 0.75:
        return rng.randint(*valid)
    if r < 0.97:
        return rng.randint(0, 3)
    return rng.randint(4, 10)                   # near and past the 8-fd limit (9: too many; 10: truncated)


def _mutate_payload(rng: random.Random, payload: bytes) -> tuple[bytes, str]:
    """A changed payload (its header size follows it): one of several kinds, named."""
    data = bytearray(payload)
    kind = rng.choice(("bitflip", "byte", "field", "field", "resize", "empty", "random"))
    if kind == "bitflip" and data:
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == "byte" and data:
        data[rng.randrange(len(data))] = rng.choice((0, 0xFF, 0x80, 0x7F, 1))
    elif kind == "field" and len(data) >= 4:
        width = 8 if len(data) >= 8 and rng.random() < 0.6 else 4
        at = rng.randrange(0, len(data) - width + 1) & ~(width - 1)
        value = rng.choice(INTERESTING) if rng.random() < 0.8 else rng.getrandbits(width * 8)
        data[at:at + width] = (value & ((1 << width * 8) - 1)).to_bytes(width, "little")
    elif kind == "resize":
        if data and rng.random() < 0.5:
            del data[rng.randrange(len(data)):]
        else:
            data += rng.randbytes(rng.choice((1, 4, 8, 16, 40)))
    elif kind == "empty":
        data = bytearray()
    else:
        data = bytearray(rng.randbytes(rng.choice((0, 4, 8, 12, 16, 24, 32, 40, 268))))
    return bytes(data), kind


def _frame(rng: random.Random, request: int, flags: int, payload: bytes, *,
           framing: bool = True) -> tuple[bytes, bool, str]:
    """The wire bytes of one (possibly mutated) message: (bytes, framing intact, mutation).
    ``framing``: also mutations that break the framing (sizes, truncation, appended bytes, bad
    version or reserved flag bits), after which the connection cannot go on."""
    r = rng.random() if framing else rng.random() * 0.87
    if r < 0.3:
        return HEADER.pack(request, flags, len(payload)) + payload, True, "valid"
    if r < 0.67:
        payload, kind = _mutate_payload(rng, payload)
        return HEADER.pack(request, flags, len(payload)) + payload, True, "payload-" + kind
    if r < 0.77:
        request = rng.choice((0, rng.randint(45, 64), 0xFFFF_FFFF, rng.getrandbits(32), *range(1, 45)))
        return HEADER.pack(request, flags, len(payload)) + payload, True, "request"
    if r < 0.87:
        if rng.random() < 0.7 or not framing:   # the bits a peer may set, in the wrong place
            flags ^= rng.choice((VHOST_USER_REPLY_MASK, VHOST_USER_NEED_REPLY_MASK))
        else:                                   # version and reserved bits: the framing is gone
            flags = rng.choice((0, 2, 3, flags | 1 << rng.randrange(4, 32), rng.getrandbits(32)))
        return HEADER.pack(request, flags, len(payload)) + payload, True, "flags"
    if r < 0.91:
        size = rng.choice((len(payload) + 1, max(0, len(payload) - 1), 0, 4096, 4097, 0xFFFF_FFFF,
                           rng.randrange(0, 64)))
        return HEADER.pack(request, flags, size) + payload, False, "size"
    if r < 0.95:
        data = HEADER.pack(request, flags, len(payload)) + payload
        return data[:rng.randrange(0, len(data))], False, "truncate"
    data = HEADER.pack(request, flags, len(payload)) + payload
    return data + rng.randbytes(rng.randint(1, 20)), False, "append"


def _drain(sock: socket.socket) -> int:
    """Read whatever is waiting on ``sock`` (non-blocking), closing received fds; bytes read."""
    total = 0
    space = socket.CMSG_SPACE(16 * array.array("i").itemsize)
    while True:
        try:
            data, ancdata, _flags, _addr = sock.recvmsg(65536, space, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return total
        except OSError:
            return total
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
                for fd in fds:
                    os.close(fd)
        if not data:
            return total
        total += len(data)


def _send_raw(sock: socket.socket, data: bytes, fds: list[int]) -> bool:
    """sendmsg with the fds on the first byte; False when the peer is gone or nothing to send
    (fds with no byte cannot be sent)."""
    if not data:
        return True
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    try:
        sent = sock.sendmsg([data], ancillary, socket.MSG_NOSIGNAL)
        if sent < len(data):
            sock.sendall(data[sent:], socket.MSG_NOSIGNAL)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


# --------------------------------------------------------------------------------------------
# (a) The back-end's message handling
# --------------------------------------------------------------------------------------------

class FuzzDevice(Device):
    """Two queues, every optional hook (so every protocol feature is offered), a 16-byte config
    space; ``handle`` reads every readable byte and fills every writable one."""

    device_id = DeviceId.CONSOLE
    num_queues = 2
    features = 1 << 0

    def __init__(self) -> None:
        super().__init__()
        self.config = bytearray(16)

    def get_config(self, offset: int, size: int) -> bytes:
        if offset + size > len(self.config):
            raise VhostError(f"config read {offset}+{size} outside {len(self.config)} bytes", errno.EINVAL)
        return bytes(self.config[offset:offset + size])

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        if offset + len(data) > len(self.config):
            raise VhostError("config write outside the config space", errno.EINVAL)
        self.config[offset:offset + len(data)] = data

    def handle(self, queue, readable, writable):
        total = sum(len(bytes(v)) for v in readable)
        for view in writable:
            view[:] = bytes(len(view))
        return min(total, sum(len(v) for v in writable))

    def save_state(self, file):
        file.write(b"state" * 4)

    def load_state(self, file):
        file.read(64)

    def send_rarp(self, mac):
        pass

    def set_mtu(self, mtu):
        if mtu < 68:
            raise VhostError(f"MTU {mtu} too small", errno.EINVAL)

    def get_shared_object(self, uuid_):
        raise VhostError(f"no object {uuid_}", errno.ENOENT)

    def get_shmem_config(self):
        return [0, 0x10000]


#: Ring layout in the backend target's guest memory: ring i at RING_BASE + i * 0x2000.
_RING_BASE = 0x1000
_RING_SIZE = 8


def _ring_layout(index: int, packed: bool) -> dict:
    cls = PackedDriverQueue if packed else SplitDriverQueue
    return cls.layout(_RING_SIZE, _RING_BASE + index * 0x2000)


def _valid_messages(rng: random.Random, state: dict) -> list[tuple[int, bytes, tuple, int]]:
    """A valid message of every request type: (request, payload, fd kinds, flags)."""
    v = VHOST_USER_VERSION
    idx = rng.randrange(3)                          # queue 2 does not exist: a valid-looking bad index
    packed = state["packed"]
    lay = _ring_layout(idx % 2, packed)
    region = MemoryRegion(0, RAM_SIZE, UVA_BASE, 0)
    addr = VringAddr(idx, rng.choice((0, 0, 1)), UVA_BASE + lay["desc"], UVA_BASE + lay["device"],
                     UVA_BASE + lay["driver"], rng.choice((0, lay["device"])))
    base = rng.choice((0, 1, 3, 0x8000 | 0x80000000 if packed else 5))
    return [
        (F.GET_FEATURES, b"", (), v),
        (F.SET_FEATURES, U64.pack(state["features"]), (), v),
        (F.SET_OWNER, b"", (), v),
        (F.RESET_OWNER, b"", (), v),
        (F.SET_MEM_TABLE, MemoryTable((region,)).pack(), ("memfd",), v),
        (F.SET_LOG_BASE, Log(0x1000, 0).pack(), ("memfd",), v),
        (F.SET_LOG_FD, b"", ("eventfd",), v),
        (F.SET_VRING_NUM, VringState(idx, rng.choice((_RING_SIZE, 1, 3, 256, 0, 0x8000, 0x10000))).pack(), (), v),
        (F.SET_VRING_ADDR, addr.pack(), (), v),
        (F.SET_VRING_BASE, VringState(idx, base).pack(), (), v),
        (F.GET_VRING_BASE, VringState(idx, 0).pack(), (), v),
        (F.SET_VRING_KICK, VringFd(idx, False).pack(), ("eventfd",), v),
        (F.SET_VRING_CALL, VringFd(idx, False).pack(), ("eventfd",), v),
        (F.SET_VRING_ERR, VringFd(idx, False).pack(), ("eventfd",), v),
        (F.SET_VRING_KICK, VringFd(idx, True).pack(), (), v),
        (F.GET_PROTOCOL_FEATURES, b"", (), v),
        (F.SET_PROTOCOL_FEATURES, U64.pack(state["protocol"]), (), v),
        (F.GET_QUEUE_NUM, b"", (), v),
        (F.SET_VRING_ENABLE, VringState(idx, rng.randint(0, 1)).pack(), (), v),
        (F.SEND_RARP, U64.pack(0x1234_5678_9ABC), (), v),
        (F.NET_SET_MTU, U64.pack(rng.choice((1500, 10))), (), v),
        (F.SET_BACKEND_REQ_FD, b"", ("socket",), v),
        (F.IOTLB_MSG, IotlbMsg(0, RAM_SIZE, UVA_BASE, 3, rng.choice((1, 2, 3, 4))).pack(), (), v),
        (F.SET_VRING_ENDIAN, VringState(idx, 0).pack(), (), v),
        (F.GET_CONFIG, Config(0, 8, 0, bytes(8)).pack(), (), v),
        (F.SET_CONFIG, Config(8, 4, 0, b"abcd").pack(), (), v),
        (F.CREATE_CRYPTO_SESSION, bytes(16), (), v),
        (F.CLOSE_CRYPTO_SESSION, U64.pack(1), (), v),
        (F.POSTCOPY_ADVISE, b"", (), v),
        (F.POSTCOPY_LISTEN, b"", (), v),
        (F.POSTCOPY_END, b"", (), v),
        (F.GET_INFLIGHT_FD, Inflight(0, 0, 2, _RING_SIZE).pack(), (), v),
        (F.SET_INFLIGHT_FD, Inflight(RAM_SIZE // 2, 0, 2, _RING_SIZE).pack(), ("memfd",), v),
        (F.GPU_SET_SOCKET, b"", ("socket",), v),
        (F.RESET_DEVICE, b"", (), v),
        (F.VRING_KICK, VringState(idx, 0).pack(), (), v),
        (F.GET_MAX_MEM_SLOTS, b"", (), v),
        (F.ADD_MEM_REG, MemoryRegion(RAM_SIZE * 2, RAM_SIZE, UVA_BASE + RAM_SIZE * 2, 0).pack_single(),
         ("memfd",), v),
        (F.REM_MEM_REG, MemoryRegion(RAM_SIZE * 2, RAM_SIZE, UVA_BASE + RAM_SIZE * 2, 0).pack_single(), (), v),
        (F.SET_STATUS, U64.pack(rng.choice((0, 1, 3, 7, 11, 15, 0x40, 0xFF))), (), v),
        (F.GET_STATUS, b"", (), v),
        (F.GET_SHARED_OBJECT, bytes(16), (), v),
        (F.SET_DEVICE_STATE_FD, DeviceState(rng.randint(0, 1), 0).pack(), (rng.choice(("pipe_r", "pipe_w")),), v),
        (F.CHECK_DEVICE_STATE, b"", (), v),
        (F.GET_SHMEM_CONFIG, b"", (), v),
    ]


class _BackendSession:
    """One connection: a Backend fed in-process over a socket pair, fds and ring memory ours."""

    def __init__(self, rng: random.Random, stats: Stats) -> None:
        self.rng, self.stats = rng, stats
        self.front, back = Connection.pair()
        self.sock = self.front.sock
        self.sock.setblocking(False)
        self.device = FuzzDevice()
        self.backend = Backend(self.device, back)
        self.ram_fd = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.ram_fd, RAM_SIZE)
        self.ram = GuestMemory()
        self.ram.add_region(0, RAM_SIZE, fd=self.ram_fd)
        self.to_close: list[int] = [self.ram_fd]
        self.kicks: list[int] = []
        offered = self.backend.offered_features
        features = offered & (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | 1)
        features |= offered & rng.choice((0, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX,
                                          VIRTIO_F_RING_PACKED, VIRTIO_F_RING_PACKED | VIRTIO_F_EVENT_IDX))
        protocol = int(self.backend.offered_protocol_features)
        if rng.random() < 0.5:
            protocol &= rng.getrandbits(32) | P.REPLY_ACK
        self.state = {"features": features, "protocol": protocol, "packed": bool(features & VIRTIO_F_RING_PACKED)}

    def close(self) -> None:
        self.backend.close()
        self.front.close()
        self.ram.clear()
        for fd in self.to_close:
            try:
                os.close(fd)
            except OSError:
                pass

    def fds(self, kinds) -> list[int]:
        out = []
        for kind in kinds:
            if self.rng.random() < 0.15:
                kind = None                             # the wrong kind of file where one is due
            kind, fd, closing = _random_fd(self.rng, kind)
            if kind == "memfd" and self.rng.random() < 0.5:
                fd = os.dup(self.ram_fd)                # the guest's own memory, as a front-end sends it
                closing = closing + [fd]
            self.to_close.extend(closing)
            if kind == "eventfd":
                self.kicks.append(fd)
            out.append(fd)
        return out

    def step(self, data: bytes, fds: list[int], intact: bool) -> bool:
        """Send, let the backend handle what arrived, read its answers; False once it is closed."""
        ok = _send_raw(self.sock, data, fds)           # a broken frame may stop midway: the backend waits for the rest
        backend = self.backend
        while not backend.closed:
            if not select.select([backend.fileno()], [], [], 0)[0]:
                break
            with _Alarm():
                backend.handle_message()
            self.stats.add("backend", "messages handled")
            _drain(self.sock)
        _drain(self.sock)
        return not backend.closed and intact and ok

    def send(self, request: int, payload: bytes, kinds, flags: int) -> bool:
        fds = self.fds(kinds)
        return self.step(HEADER.pack(request, flags, len(payload)) + payload, fds, True)

    def handshake(self, depth: int) -> bool:
        """The valid bring-up, QEMU's order, cut after ``depth`` messages."""
        s, v = self.state, VHOST_USER_VERSION
        packed = s["packed"]
        msgs = [(F.GET_FEATURES, b"", ()), (F.SET_OWNER, b"", ()), (F.GET_PROTOCOL_FEATURES, b"", ()),
                (F.SET_PROTOCOL_FEATURES, U64.pack(s["protocol"]), ()),
                (F.SET_FEATURES, U64.pack(s["features"]), ()),
                (F.SET_MEM_TABLE, MemoryTable((MemoryRegion(0, RAM_SIZE, UVA_BASE, 0),)).pack(), ("memfd",))]
        for i in range(2):
            lay = _ring_layout(i, packed)
            base = (1 << 15 | 1 << 31) if packed else 0
            msgs += [(F.SET_VRING_NUM, VringState(i, _RING_SIZE).pack(), ()),
                     (F.SET_VRING_BASE, VringState(i, base).pack(), ()),
                     (F.SET_VRING_ADDR, VringAddr(i, 0, UVA_BASE + lay["desc"], UVA_BASE + lay["device"],
                                                  UVA_BASE + lay["driver"], 0).pack(), ()),
                     (F.SET_VRING_KICK, VringFd(i, False).pack(), ("eventfd",)),
                     (F.SET_VRING_CALL, VringFd(i, False).pack(), ("eventfd",)),
                     (F.SET_VRING_ERR, VringFd(i, False).pack(), ("eventfd",)),
                     (F.SET_VRING_ENABLE, VringState(i, 1).pack(), ())]
        for request, payload, kinds in msgs[:depth]:
            if request == F.SET_MEM_TABLE:
                fd = os.dup(self.ram_fd)
                self.to_close.append(fd)
                ok = self.step(HEADER.pack(request, v, len(payload)) + payload, [fd], True)
            else:
                ok = self.send(request, payload, kinds, v)
            if not ok:
                return False
        self.stats.add("backend", f"handshake depth {min(depth, len(msgs)) * 10 // len(msgs) * 10}%+")
        return True

    def scribble_rings(self) -> None:
        """Random descriptors and indices in the rings' memory (a hostile driver), then kicks."""
        rng = self.rng
        for i in range(2):
            lay = _ring_layout(i, self.state["packed"])
            for slot in range(_RING_SIZE):
                self.ram.write(lay["desc"] + 16 * slot, _random_desc(rng, RAM_SIZE, _RING_SIZE, self.state["packed"]))
            if not self.state["packed"]:
                self.ram.write(lay["driver"], _U16.pack(0) + _U16.pack(rng.choice((0, 1, 2, 8, 9, 0xFFFF,
                                                                                  rng.getrandbits(16)))))
                for slot in range(_RING_SIZE):
                    self.ram.write(lay["driver"] + 4 + 2 * slot, _U16.pack(rng.choice((0, 1, slot, 7, 8, 0xFFFF))))
        for fd in self.kicks:
            try:
                os.eventfd_write(fd, 1)
            except OSError:
                pass
        with _Alarm():
            for fd, callback in list(self.backend.watched().items()):
                if fd != self.backend.fileno():
                    callback()
            self.backend.poll()
        self.stats.add("backend", "ring kicks")


def fuzz_backend(rng: random.Random, stats: Stats, budget: Budget, messages_per_case: int = 40) -> None:
    """Cases of: a handshake cut at a random depth, then valid and mutated messages."""
    with _Quiet() as watch:
        while budget.more():
            case = budget.done
            budget.done += 1
            before, threads = open_fds(), threading.active_count()
            session = _BackendSession(rng, stats)
            what = f"backend case {case}"
            try:
                # Deep cases keep the framing intact and the connection open as long as they can;
                # the others try everything, and end early.
                deep = rng.random() < 0.7
                alive = session.handshake(rng.choice((0, 3, 6, 10, 13, 20, 20, 20, 20)))
                n = 0
                while alive and n < messages_per_case:
                    n += 1
                    if rng.random() < 0.08:
                        session.scribble_rings()
                        continue
                    candidates = _valid_messages(rng, session.state)
                    request, payload, kinds, flags = rng.choice(candidates)
                    spec = FRONTEND_REQUESTS[request]
                    if deep and spec.reply:
                        # A request owed a value closes the connection when refused: deep cases
                        # send only valid ones, and only those whose features were negotiated.
                        if spec.missing(session.backend.protocol_features):
                            continue
                        fds = session.fds(kinds)
                        data, intact, mutation = HEADER.pack(request, flags, len(payload)) + payload, True, "valid"
                    else:
                        count = _fd_count(rng, spec.fds)
                        kinds = (kinds + (None,) * count)[:count] if count != len(kinds) else kinds
                        fds = session.fds(kinds)
                        data, intact, mutation = _frame(rng, request, flags, payload, framing=not deep)
                    stats.add("backend", "messages sent")
                    stats.add("backend mutations", mutation)
                    stats.add("backend requests", FrontendRequest(request).name)
                    alive = session.step(data, fds, intact)
                stats.add("backend", "cases")
                if session.backend.closed:
                    stats.add("backend", "cases the backend closed")
                    reason = session.backend.last_error
                    stats.add("backend closed on", type(reason).__name__ if reason is not None else "?")
            except VhostError:
                stats.add("backend", "VhostError raised to the caller")
            except FuzzFailure:
                raise
            except BaseException as exc:
                raise _foreign(exc, what) from exc
            finally:
                session.close()
            if watch.found:
                raise FuzzFailure(f"{what}: the backend logged a foreign exception: {watch.found[0]}")
            if session.backend.last_error is not None and not isinstance(session.backend.last_error, VhostError):
                raise FuzzFailure(f"{what}: last_error {session.backend.last_error!r}")
            _check_leaks(before, what, threads)


# --------------------------------------------------------------------------------------------
# (b) The front-end's reply handling
# --------------------------------------------------------------------------------------------

def _frontend_calls(rng: random.Random, fe: Frontend) -> list[tuple[FrontendRequest, Callable[[], object], bytes]]:
    """(request, the Frontend call, a valid reply payload) for the requests that get answers."""
    idx = rng.randrange(2)
    region = MemoryRegion(0, RAM_SIZE, UVA_BASE, 0)
    return [
        (F.GET_FEATURES, fe.get_features, U64.pack(VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES)),
        (F.GET_PROTOCOL_FEATURES, fe.get_protocol_features, U64.pack(int(P.REPLY_ACK | P.MQ | P.CONFIG))),
        (F.GET_QUEUE_NUM, fe.get_queue_num, U64.pack(2)),
        (F.GET_MAX_MEM_SLOTS, fe.get_max_mem_slots, U64.pack(8)),
        (F.GET_STATUS, fe.get_status, U64.pack(0xF)),
        (F.GET_VRING_BASE, lambda: fe.get_vring_base(idx), VringState(idx, 3).pack()),
        (F.GET_CONFIG, lambda: fe.get_config(0, 8), Config(0, 8, 0, bytes(8)).pack()),
        (F.GET_INFLIGHT_FD, lambda: _close_fd(fe.get_inflight_fd(2, 8)[0]), Inflight(4096, 0, 2, 8).pack()),
        (F.GET_SHMEM_CONFIG, fe.get_shmem_config, ShmemConfig(1, (0x1000,)).pack()),
        (F.CHECK_DEVICE_STATE, fe.check_device_state, U64.pack(0)),
        (F.SET_DEVICE_STATE_FD, None, U64.pack(0x100)),
        (F.SET_LOG_BASE, None, U64.pack(0)),
        (F.SET_FEATURES, lambda: fe.set_features(VIRTIO_F_VERSION_1), U64.pack(0)),
        (F.SET_OWNER, fe.set_owner, U64.pack(0)),
        (F.SET_VRING_NUM, lambda: fe.set_vring_num(idx, 8), U64.pack(0)),
        (F.SET_MEM_TABLE, None, U64.pack(0)),
        (F.SET_VRING_ENABLE, lambda: fe.set_vring_enable(idx, True), U64.pack(0)),
        (F.SET_STATUS, lambda: fe.set_status(0xF), U64.pack(0)),
        (F.SET_VRING_ADDR, lambda: fe.set_vring_addr(VringAddr(idx, 0, 0x1000, 0x2000, 0x3000, 0)), U64.pack(0)),
        (F.REM_MEM_REG, lambda: fe.rem_mem_reg(region), U64.pack(0)),
    ]


def _backend_requests(rng: random.Random) -> list[tuple[BackendRequest, bytes, tuple]]:
    """A valid back-end request of every type for the front-end's channel: (request, payload, fd kinds)."""
    uuid = rng.randbytes(16)
    shmem = ShmemMap(rng.choice((0, 1, 2)), 0, rng.choice((0, 0x1000, 0xF000)), rng.choice((0x1000, 0x2000)),
                     rng.randint(0, 1))
    return [
        (B.IOTLB_MSG, IotlbMsg(rng.choice((0, 0x1000, 1 << 40)), 0x1000, 0, 3, rng.choice((1, 4, 2))).pack(), ()),
        (B.CONFIG_CHANGE_MSG, b"", ()),
        (B.VRING_HOST_NOTIFIER_MSG, VringArea(rng.choice((0, 1, 0x100)), 0x1000, 0).pack(),
         ("memfd",) if rng.random() < 0.5 else ()),
        (B.VRING_CALL, VringState(rng.randrange(3), 0).pack(), ()),
        (B.VRING_ERR, VringState(rng.randrange(3), 0).pack(), ()),
        (B.SHARED_OBJECT_ADD, uuid, ()),
        (B.SHARED_OBJECT_REMOVE, uuid, ()),
        (B.SHARED_OBJECT_LOOKUP, uuid, ()),
        (B.SHMEM_MAP, shmem.pack(), ("memfd",)),
        (B.SHMEM_UNMAP, shmem.pack(), ()),
    ]


def _fresh_frontend(rng: random.Random) -> tuple[Frontend, Connection, Connection]:
    ours, theirs = Connection.pair()
    fe = Frontend(ours, timeout=0.01)     # a truncated reply costs this long
    fe.offered_features = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | (1 << 33)
    fe.features = fe.offered_features if rng.random() < 0.9 else None
    fe.protocol_features = P(int(rng.choice((P(0), P.REPLY_ACK, P.REPLY_ACK | P.MQ | P.CONFIG | P.STATUS
                                             | P.CONFIGURE_MEM_SLOTS | P.INFLIGHT_SHMFD | P.SHMEM | P.DEVICE_STATE
                                             | P.LOG_SHMFD | P.PAGEFAULT,
                                             P.MQ | P.CONFIG | P.STATUS | P.CONFIGURE_MEM_SLOTS | P.INFLIGHT_SHMFD
                                             | P.SHMEM | P.DEVICE_STATE | P.LOG_SHMFD))))
    theirs.sock.setblocking(False)
    # The back-end channel, as SET_BACKEND_REQ_FD would have opened it.
    channel, channel_peer = Connection.pair(requests=BackendRequest)
    channel.sock.settimeout(fe.timeout)
    channel_peer.sock.setblocking(False)
    fe._channel = channel
    if rng.random() < 0.7:
        fe.protocol_features |= (P.BACKEND_REQ | P.BACKEND_SEND_FD | P.HOST_NOTIFIER | P.SHARED_OBJECT | P.SHMEM
                                 | P.INBAND_NOTIFICATIONS | P.CONFIG)
        fe.shmem_config = ShmemConfig(2, (0, 0x10000))
    return fe, theirs, channel_peer


def _close_fd(fd: int | None) -> None:
    """Close an fd a Frontend call handed to us (the caller's, by its docstring)."""
    if fd is not None:
        os.close(fd)


def fuzz_frontend(rng: random.Random, stats: Stats, budget: Budget, calls_per_case: int = 40) -> None:
    """Cases of: a Frontend with random negotiated state, each call answered by a mutated reply."""
    with _Quiet() as watch:
        while budget.more():
            case = budget.done
            budget.done += 1
            before, threads = open_fds(), threading.active_count()
            fe, peer, channel_peer = _fresh_frontend(rng)
            to_close: list[int] = []
            what = f"frontend case {case}"
            try:
                for _ in range(calls_per_case):
                    if rng.random() < 0.3:
                        # A back-end request on the channel, valid or mutated, with random fds.
                        request, payload, kinds = rng.choice(_backend_requests(rng))
                        spec = BACKEND_REQUESTS[request]
                        count = _fd_count(rng, spec.fds)
                        kinds = (tuple(kinds) + (None,) * count)[:count] if count != len(kinds) else kinds
                        fds = []
                        for kind in kinds:
                            _, fd, closing = _random_fd(rng, kind)
                            to_close += closing
                            fds.append(fd)
                        flags = VHOST_USER_VERSION | (VHOST_USER_NEED_REPLY_MASK if rng.random() < 0.5 else 0)
                        data, intact, mutation = _frame(rng, request, flags, payload)
                        stats.add("frontend channel mutations", mutation)
                        stats.add("frontend channel requests", request.name)
                        if not _send_raw(channel_peer.sock, data, fds) or not intact:
                            try:
                                channel_peer.sock.shutdown(socket.SHUT_WR)
                            except OSError:
                                pass
                        with _Alarm():
                            while fe._channel is not None and select.select([fe._channel.fileno()], [], [], 0)[0]:
                                fe.handle_backend_request()
                                stats.add("frontend", "back-end requests")
                        _drain(channel_peer.sock)
                        continue
                    calls = _frontend_calls(rng, fe)
                    request, call, reply = rng.choice(calls)
                    if call is None:
                        if request == F.SET_DEVICE_STATE_FD:
                            _, fd, closing = _random_fd(rng, "pipe_r")
                            to_close += closing
                            call = (lambda fd=fd: _close_fd(fe.set_device_state_fd(0, 0, fd)))
                        elif request == F.SET_LOG_BASE:
                            _, fd, closing = _random_fd(rng, "memfd")
                            to_close += closing
                            call = (lambda fd=fd: fe.set_log_base(fd, 4096))
                        else:
                            _, fd, closing = _random_fd(rng, "memfd")
                            to_close += closing
                            call = (lambda fd=fd: fe.set_mem_table([MemoryRegion(0, RAM_SIZE, UVA_BASE, 0)], [fd]))
                    # The answer goes first: a request answered by something else, mutated or not.
                    answered = rng.choice((request, request, request, rng.choice(list(FrontendRequest)),
                                           rng.getrandbits(32)))
                    spec = FRONTEND_REQUESTS[request]
                    kinds = [None] * _fd_count(rng, spec.reply_fds)
                    fds = []
                    for kind in kinds:
                        _, fd, closing = _random_fd(rng, kind)
                        to_close += closing
                        fds.append(fd)
                    data, intact, mutation = _frame(rng, answered, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, reply)
                    if rng.random() < 0.1:
                        data += data            # a second answer, unasked
                    stats.add("frontend mutations", mutation)
                    stats.add("frontend requests", request.name)
                    _send_raw(peer.sock, data, fds)
                    try:
                        with _Alarm():
                            call()
                    except VhostError:
                        stats.add("frontend", "VhostError")
                    else:
                        stats.add("frontend", "accepted")
                    stats.add("frontend", "replies")
                    _drain(peer.sock)
                    if fe._failure is not None or fe._conn is None or fe._channel is None or rng.random() < 0.05:
                        fe.close()
                        peer.close()
                        channel_peer.close()
                        fe, peer, channel_peer = _fresh_frontend(rng)
                        stats.add("frontend", "reconnects")
                stats.add("frontend", "cases")
            except FuzzFailure:
                raise
            except BaseException as exc:
                raise _foreign(exc, what) from exc
            finally:
                fe.close()
                peer.close()
                channel_peer.close()
                for fd in to_close:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            if watch.found:
                raise FuzzFailure(f"{what}: the frontend logged a foreign exception: {watch.found[0]}")
            _check_leaks(before, what, threads)


# --------------------------------------------------------------------------------------------
# (c) The virtqueue engine
# --------------------------------------------------------------------------------------------

def _random_address(rng: random.Random, mem_end: int) -> int:
    r = rng.random()
    if r < 0.6:
        return rng.randrange(0, mem_end)                          # inside
    if r < 0.75:
        return mem_end - rng.randint(1, 64)                       # near the end: across it with a length
    if r < 0.85:
        return rng.choice((mem_end, mem_end + 0x1000, 1 << 40, (1 << 64) - rng.randint(1, 4096)))   # outside
    return rng.choice((0, 0x1000, 0x2000, 0x3000))                 # on the rings themselves


def _random_length(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.7:
        return rng.randint(0, 512)
    return rng.choice((0, 1, 0x1000, 0xFFFF, 0x10000, 0x7FFF_FFFF, 0xFFFF_FFFF, rng.getrandbits(32)))


def _random_flags(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.8:
        return rng.choice((0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
                           VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT))
    return rng.getrandbits(16)


def _random_desc(rng: random.Random, mem_end: int, size: int, packed: bool) -> bytes:
    """One 16-byte descriptor (split: addr, len, flags, next; packed: addr, len, id, flags)."""
    addr, length = _random_address(rng, mem_end), _random_length(rng)
    flags = _random_flags(rng)
    other = rng.randrange(size) if rng.random() < 0.85 else rng.getrandbits(16)
    if packed:
        if rng.random() < 0.7:
            flags = (flags & ~(1 << 7 | 1 << 15)) | rng.choice((1 << 7, 1 << 15, 1 << 7 | 1 << 15, 0))
        return _DESC.pack(addr, length, other, flags)
    return _DESC.pack(addr, length, flags, other)


class _RingCase:
    """Guest memory (one region, or two adjacent or apart) with a ring of ``size`` at 0x1000,
    our driver queue filling it with well-formed chains that :meth:`corrupt` then breaks at random."""

    def __init__(self, rng: random.Random, packed: bool) -> None:
        self.rng, self.packed = rng, packed
        self.size = rng.choice((1, 2, 4, 8, 8, 16, 32, 256))
        layout = rng.choice(("one", "adjacent", "apart"))
        self.memory = GuestMemory()
        fd = os.memfd_create("fuzz-ring", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, 0x30000)
            self.memory.add_region(0, 0x20000, fd=fd)
            if layout == "adjacent":
                self.memory.add_region(0x20000, 0x10000, fd=fd, mmap_offset=0x20000)
            elif layout == "apart":
                self.memory.add_region(0x40000, 0x10000, fd=fd, mmap_offset=0x20000)
        finally:
            os.close(fd)
        self.mem_end = {"one": 0x20000, "adjacent": 0x30000, "apart": 0x50000}[layout]
        self.lay = (PackedDriverQueue if packed else SplitDriverQueue).layout(self.size, 0x1000, 4)
        self.event_idx = rng.random() < 0.5
        self.indirect = rng.random() < 0.8
        self.regions = [(r.gpa, r.end, ctypes.addressof(ctypes.c_char.from_buffer(r.view)))
                        for r in self.memory.regions]
        self.restart()

    def restart(self) -> None:
        """Fresh driver and device queues on the same memory (what a device reset does)."""
        lay = self.lay
        driver_cls, device_cls = ((PackedDriverQueue, PackedDeviceQueue) if self.packed
                                  else (SplitDriverQueue, SplitDeviceQueue))
        self.driver = driver_cls(self.memory, self.size, lay["desc"], lay["driver"], lay["device"],
                                 event_idx=self.event_idx, indirect_area=lay["indirect"], indirect_max=4)
        self.device = device_cls(self.memory, self.size, lay["desc"], lay["driver"], lay["device"],
                                 event_idx=self.event_idx, indirect=self.indirect)
        self.corrupted = False
        self.expected: dict[int, tuple[int, int]] = {}      # head -> (readable, writable) bytes added

    def close(self) -> None:
        self.memory.clear()

    def buffer(self) -> tuple[int, int]:
        """A buffer inside guest memory, sometimes across the boundary of two adjacent regions."""
        rng = self.rng
        length = rng.choice((0, 1, 64, 512, 4096)) if rng.random() < 0.9 else rng.randint(0, 0x3000)
        start = max(0x8000, self.lay["end"])
        if rng.random() < 0.07:
            addr = 0x20000 - rng.randint(0, 64)                    # at the end of region 0
        else:
            addr = rng.randrange(start, 0x1C000)
        return addr, length

    def fill(self) -> int:
        """The driver adds and publishes 0..4 well-formed chains."""
        rng, added = self.rng, 0
        for _ in range(rng.randint(0, 4)):
            readable = [self.buffer() for _ in range(rng.choice((0, 1, 1, 2, 3)))]
            writable = [self.buffer() for _ in range(rng.choice((0, 1, 1, 2)))]
            if not readable and not writable:
                writable = [self.buffer()]
            try:
                head = self.driver.add(readable, writable, indirect=rng.random() < 0.3)
            except VhostError:
                break                                               # full, or the driver's own limit
            self.expected[head] = (sum(n for _, n in readable), sum(n for _, n in writable))
            added += 1
        self.driver.publish()
        return added

    def corrupt(self) -> str:
        """One hostile change: a descriptor field, an index, an indirect table entry."""
        rng, lay, mem = self.rng, self.lay, self.memory
        self.corrupted = True
        what = rng.choice(("desc", "desc", "desc-field", "avail-idx", "avail-ring", "indirect", "used-idx"))
        if what == "desc":
            slot = rng.randrange(self.size)
            mem.write(lay["desc"] + 16 * slot, _random_desc(rng, self.mem_end, self.size, self.packed))
        elif what == "desc-field":
            slot = rng.randrange(self.size)
            at = lay["desc"] + 16 * slot + rng.choice((0, 8, 12, 14))
            width = 8 if (at - lay["desc"]) % 16 == 0 else 4 if (at - lay["desc"]) % 16 == 8 else 2
            value = rng.choice(INTERESTING + (rng.getrandbits(16), 1 << 7, 1 << 15, self.size, self.size - 1))
            mem.write(at, (value & ((1 << 8 * width) - 1)).to_bytes(width, "little"))
        elif what == "avail-idx" and not self.packed:
            mem.write(lay["driver"] + 2, _U16.pack(rng.choice((rng.getrandbits(16), self.size + 1, 0xFFFF))))
        elif what == "avail-ring" and not self.packed:
            mem.write(lay["driver"] + 4 + 2 * rng.randrange(self.size),
                      _U16.pack(rng.choice((self.size, 0xFFFF, rng.getrandbits(16)))))
        elif what == "indirect" and lay["indirect"]:
            n = rng.randint(1, 4)
            at = lay["indirect"] + 16 * rng.randrange(self.size * 4 - n + 1)
            mem.write(at, b"".join(_random_desc(rng, self.mem_end, n, False) for _ in range(n)))
        elif what == "used-idx":                # packed: the driver event suppression's flags instead
            what = "driver-event" if self.packed else what
            mem.write(lay["driver"] + 2 if self.packed else lay["device"] + 2, _U16.pack(rng.getrandbits(16)))
        else:                                   # the packed ring has no avail ring: a descriptor instead
            what = "desc"
            slot = rng.randrange(self.size)
            mem.write(lay["desc"] + 16 * slot, _random_desc(rng, self.mem_end, self.size, self.packed))
        return what

    def used_idx(self) -> int:
        return _U16.unpack(self.memory.read(self.lay["device"] + 2, 2))[0]

    def check_view(self, view: memoryview, what: str) -> None:
        """A non-empty popped view lies inside one region of guest memory."""
        if not len(view):
            return
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
        for gpa, end, base in self.regions:
            if base <= address and address + len(view) <= base + (end - gpa):
                return
        raise FuzzFailure(f"{what}: a view of {len(view)} bytes at {address:#x} lies outside guest memory")


def _ring_step(case: _RingCase, stats: Stats, target: str, held: dict, what: str) -> None:
    """One ring state: the driver adds chains, maybe a corruption, the device pops (every view
    checked), pushes some of what it holds (the used index checked), the driver reaps."""
    rng, vq = case.rng, case.device
    case.fill()
    if rng.random() < 0.25:
        stats.add(target, "corruption " + case.corrupt())
    stats.add(target, "ring states")
    popped = []
    try:
        with _Alarm():
            if rng.random() < 0.2:
                for head, descs in vq.pop_descriptors(rng.choice((1, 4, 256))):
                    if head in held:
                        raise FuzzFailure(f"{what}: head {head} popped twice without a push in between")
                    held[head] = sum(d[1] for d in descs if d[2])
                    stats.add(target, "chains popped")
            else:
                popped = vq.pop_batch(rng.choice((1, 2, 4, 256)))
    except VhostError as exc:
        stats.add(target, f"pop: {type(exc).__name__}")
    for head, readable, writable in popped:
        for view in readable:
            case.check_view(view, f"{what} head {head} readable")
        for view in writable:
            case.check_view(view, f"{what} head {head} writable")
        if head in held:
            raise FuzzFailure(f"{what}: head {head} popped twice without a push in between")
        got = (sum(len(v) for v in readable), sum(len(v) for v in writable))
        if not case.corrupted and got != case.expected.get(head):
            raise FuzzFailure(f"{what}: head {head} came out as {got} readable/writable bytes, our driver added "
                              f"{case.expected.get(head)}")
        if not case.corrupted:
            stats.add(target, "chains matched to what the driver added")
        held[head] = got[1]
        stats.add(target, "chains popped")
    # Push some held heads (random order), sometimes with a bogus pair in the batch.
    if held and rng.random() < 0.8:
        heads = rng.sample(sorted(held), rng.randint(1, len(held)))
        batch = [(h, rng.choice((0, held[h], rng.randint(0, held[h])))) for h in heads]
        bogus = rng.random() < 0.1
        if bogus:
            batch.insert(rng.randrange(len(batch) + 1),
                         rng.choice(((case.size + rng.getrandbits(8), 0), (heads[0], 0), (heads[0], -1),
                                     (heads[0], 1 << 32))))
        before = None if case.packed else vq.used_idx       # the device's own (the driver may scribble)
        in_flight = vq.in_flight
        try:
            with _Alarm():
                vq.push_batch(batch)
        except VhostError as exc:
            stats.add(target, f"push: {type(exc).__name__}")
            if not case.packed and not vq.broken and vq.used_idx != before:
                raise FuzzFailure(f"{what}: a refused push moved used.idx {before} -> {case.used_idx()}")
            if not vq.broken and vq.in_flight != in_flight:
                raise FuzzFailure(f"{what}: a refused push changed the chains in flight {in_flight} -> {vq.in_flight}")
            if not bogus and not vq.broken:
                raise FuzzFailure(f"{what}: a push of held chains {batch} was refused: {exc}")
        else:
            if bogus:
                raise FuzzFailure(f"{what}: a push with a head not in flight, twice or a bad length was accepted: "
                                  f"{batch}")
            for h in heads:
                del held[h]
            stats.add(target, "chains pushed", len(heads))
            if not case.packed and case.used_idx() != (before + len(heads)) & 0xFFFF:
                raise FuzzFailure(f"{what}: used.idx moved {before} -> {case.used_idx()} for {len(heads)} chains")
            if vq.in_flight != in_flight - len(heads):
                raise FuzzFailure(f"{what}: {len(heads)} chains pushed, in flight {in_flight} -> {vq.in_flight}")
    if rng.random() < 0.1:
        try:
            vq.enable_notifications() if rng.random() < 0.5 else vq.disable_notifications()
            vq.pending()
        except VhostError:
            pass
    try:
        case.driver.reap()
    except VhostError:
        if not case.corrupted:
            raise FuzzFailure(f"{what}: our driver refused what our device pushed on an uncorrupted ring")


def fuzz_rings(rng: random.Random, stats: Stats, budget: Budget, states_per_case: int = 40) -> None:
    """Cases of: split or packed memory with a driver and a device queue, ``states_per_case`` ring
    states each; a broken queue (or driver) is reset and the case goes on."""
    while budget.more():
        case_no = budget.done
        budget.done += 1
        packed = rng.random() < 0.5
        target = "packed ring" if packed else "split ring"
        what = f"{target} case {case_no}"
        case = _RingCase(rng, packed)
        try:
            held: dict[int, int] = {}
            for _ in range(states_per_case):
                _ring_step(case, stats, target, held, what)
                if case.device.broken or case.driver.broken:
                    stats.add(target, "queue broken, reset")
                    case.restart()
                    held.clear()
            stats.add(target, "cases")
        except FuzzFailure:
            raise
        except BaseException as exc:
            raise _foreign(exc, what) from exc
        finally:
            case.close()


# --------------------------------------------------------------------------------------------
# A whole run
# --------------------------------------------------------------------------------------------

TARGETS = {"backend": fuzz_backend, "frontend": fuzz_frontend, "rings": fuzz_rings}


def run(seed: int, budgets: dict[str, Budget], stats: Stats | None = None) -> Stats:
    """Each target in turn with its budget, from ``seed`` (one Random per target, so a target's
    cases do not depend on the others'). A FuzzFailure names the seed."""
    stats = stats or Stats()
    for name, budget in budgets.items():
        rng = random.Random(f"{seed}-{name}")
        start = time.monotonic()
        try:
            TARGETS[name](rng, stats, budget)
        except FuzzFailure as exc:
            raise FuzzFailure(f"seed {seed}: {exc}") from None
        finally:
            stats.seconds[name] += time.monotonic() - start
        stats.add(name, "cases run", budget.done)
    return stats


def summary(stats: Stats) -> dict:
    """The headline counts: messages the back-end handled, replies the front-end took, ring states."""
    return {"messages": stats.counts["backend"]["messages handled"],
            "fuzzed messages": stats.counts["backend"]["messages sent"],
            "replies": stats.counts["frontend"]["replies"],
            "ring states": stats.counts["split ring"]["ring states"] + stats.counts["packed ring"]["ring states"]}
