"""vhost-user tracer: a man in the middle that forwards everything unchanged and says what passed.

``Tracer(listen, connect, report)`` listens on ``listen`` for front-ends; for each one it connects
to the back-end at ``connect`` and relays both ways, message by message: the bytes as they came,
the SCM_RIGHTS fds with the message they came with (memory fds, eventfds, log and inflight fds
pass through as they are). SET_BACKEND_REQ_FD is the one exception: the socket it carries is kept
by the tracer and the back-end gets one end of a socketpair instead, so the back-end-request
channel is relayed, and traced, too. Every message is handed to ``report`` as a :class:`Record`:
direction, request, flags, payload fields by name (user.py's layouts), fds (what each one is,
/proc/self/fd's link), the spec's verdict on its shape, and for a reply whether it answers the
request that was owed. Session starts and ends are :class:`SessionEvent`\\ s, saying who closed.

One thread, one ``selectors`` loop over every socket, non-blocking both ways: each direction
buffers at most one message (header + payload, at most VHOST_USER_MAX_PAYLOAD) and stops reading
while the other side has not taken the previous one, so a slow or silent peer never holds up the
other direction or another session, and memory stays bounded. A header announcing a payload
beyond the protocol's maximum ends the session: nothing of that message is forwarded.

``python3 -m vhost_min trace --listen PATH --connect PATH [--json]`` is this, printing each record
as a line of text or JSON. tests/peers/launch.py's WireTap is this too, recording instead of
printing, and asking the back-end things of its own mid-session (:meth:`Tracer.inject`).
"""

from __future__ import annotations

import array
import collections
import json
import os
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Union

from .errors import ProtocolError, VhostError
from .frontend import feature_names, protocol_feature_names
from .user import (BACKEND_REQUESTS, FRONTEND_REQUESTS, HEADER, VHOST_USER_HDR_SIZE, VHOST_USER_MAX_PAYLOAD,
                   VHOST_USER_NEED_REPLY_MASK, VHOST_USER_REPLY_MASK, VHOST_USER_RESERVED_FLAGS,
                   VHOST_USER_VERSION, VHOST_USER_VERSION_MASK, BackendRequest, Config, DeviceState,
                   FrontendRequest, Inflight, IotlbMsg, Listener, Log, MemoryRegion, MemoryTable, SharedObject,
                   ShmemConfig, ShmemMap, VringAddr, VringArea, VringFd, VringState, check_socket_path,
                   request_name, unpack_u64)
from .virtio import DeviceStatus

FRONTEND, BACKEND = "frontend", "backend"
#: The two channels of a session: the socket the front-end connected to, and the back-end-request
#: channel the front-end hands over with SET_BACKEND_REQ_FD (back-end requests, front-end replies).
MAIN, BACKEND_CHANNEL = "main", "backend channel"

#: fds the tracer accepts in one message: the kernel's SCM_MAX_FD. More than the protocol allows
#: (8) is forwarded and reported; the room keeps the kernel from truncating (and closing) any.
SCM_MAX_FD = 253
_FD_BYTES = array.array("i").itemsize
_CMSG_SPACE = socket.CMSG_SPACE(SCM_MAX_FD * _FD_BYTES)
#: Messages relayed per socket per wake-up, so one busy peer does not starve the others.
_BURST = 64
#: Requests remembered as owing a reply, per channel: a peer that never answers costs no more.
_MAX_OWED = 256
_CODES = {FrontendRequest: {int(m): m for m in FrontendRequest}, BackendRequest: {int(m): m for m in BackendRequest}}


# --------------------------------------------------------------------------------------------
# What the tracer reports
# --------------------------------------------------------------------------------------------

@dataclass
class Record:
    """One message as it crossed the tracer, reported as it is forwarded (unchanged) to the other side.

    ``sender`` is FRONTEND or BACKEND, ``channel`` MAIN or BACKEND_CHANNEL. ``fields`` is the
    payload decoded by name (``{"hex": ...}`` where no layout applies); ``fds`` the link target of
    each fd as it passed. ``expects`` says what a request is owed ("reply", "ack" for NEED_REPLY,
    or None); ``answers`` names, for a reply, the request it was matched against (the oldest one
    owed on its channel), ``answer_kind`` what that request was owed ("reply" or "ack"), and
    ``matched`` whether the codes agree. ``problems`` lists what the spec would refuse (still
    forwarded).
    """

    session: int
    channel: str
    sender: str
    time: float
    request: int
    flags: int
    payload: bytes
    fds: tuple[str, ...] = ()
    fields: dict = field(default_factory=dict)
    expects: str | None = None
    answers: str | None = None
    answer_kind: str | None = None
    matched: bool | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The spec name (VHOST_USER_X, VHOST_USER_BACKEND_X) or ``request N`` for an unknown code."""
        return request_name(self.request)

    @property
    def receiver(self) -> str:
        return BACKEND if self.sender == FRONTEND else FRONTEND

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_REPLY_MASK)

    @property
    def wire(self) -> bytes:
        """The message's bytes as they were forwarded: header and payload."""
        return HEADER.pack(int(self.request), self.flags, len(self.payload)) + self.payload

    def as_dict(self) -> dict:
        d = {"session": self.session, "time": round(self.time, 6), "channel": self.channel,
             "direction": f"{self.sender}->{self.receiver}", "request": self.name, "code": int(self.request),
             "flags": self.flags, "flag_names": _flag_names(self.flags), "size": len(self.payload),
             "fields": self.fields, "fds": [{"target": t} for t in self.fds]}
        if self.expects:
            d["expects"] = self.expects
        if self.answers is not None:
            d["reply"] = {"to": self.answers, "kind": self.answer_kind, "matched": self.matched}
        if self.problems:
            d["problems"] = self.problems
        if self.notes:
            d["notes"] = self.notes
        return d

    def text(self) -> str:
        channel = " [backend channel]" if self.channel == BACKEND_CHANNEL else ""
        flags = "|".join(_flag_names(self.flags))
        parts = [f"#{self.session} {self.time:8.3f}s {self.sender}->{self.receiver}{channel} {self.name}",
                 f"flags={self.flags:#x}" + (f" ({flags})" if flags else "")]
        parts += [f"{k}={_show(k, v)}" for k, v in self.fields.items()]
        if self.fds:
            parts.append(f"fds={len(self.fds)} [{', '.join(self.fds)}]")
        if self.expects:
            parts.append(f"expects {self.expects}")
        if self.answers is not None:
            what = "ack of" if self.answer_kind == "ack" else "reply to"
            parts.append(f"{what} {self.answers}: {'matched' if self.matched else 'NOT the one owed'}")
        parts += [f"PROBLEM: {p}" for p in self.problems]
        parts += [f"note: {n}" for n in self.notes]
        return "  ".join(parts)


@dataclass
class SessionEvent:
    """A session began (``event`` "open"), or a channel ended ("closed"): ``by`` is FRONTEND,
    BACKEND or "tracer" (it refused a message), ``detail`` says how, ``owed`` lists the requests
    still waiting for a reply, ``partial`` describes a message cut off by the close."""

    session: int
    time: float
    event: str
    channel: str = MAIN
    by: str | None = None
    detail: str = ""
    owed: list[str] = field(default_factory=list)
    partial: dict | None = None

    def as_dict(self) -> dict:
        d = {"session": self.session, "time": round(self.time, 6), "event": self.event, "channel": self.channel}
        if self.by is not None:
            d["by"] = self.by
        if self.detail:
            d["detail"] = self.detail
        if self.owed:
            d["owed"] = self.owed
        if self.partial is not None:
            d["partial"] = self.partial
        return d

    def text(self) -> str:
        where = " backend channel" if self.channel == BACKEND_CHANNEL else ""
        line = f"#{self.session} {self.time:8.3f}s --{where} {self.event}"
        if self.by:
            line += f" by the {self.by}" if self.by != "tracer" else " by the tracer"
        if self.detail:
            line += f": {self.detail}"
        if self.owed:
            line += f"; reply still owed to {', '.join(self.owed)}"
        return line


Event = Union[Record, SessionEvent]


def _flag_names(flags: int) -> list[str]:
    names = []
    if flags & VHOST_USER_REPLY_MASK:
        names.append("REPLY")
    if flags & VHOST_USER_NEED_REPLY_MASK:
        names.append("NEED_REPLY")
    return names


#: Fields shown in hex in the text output (addresses, sizes, offsets, bit sets).
_HEX_FIELDS = frozenset({"features", "protocol_features", "status", "guest_phys_addr", "memory_size",
                         "userspace_addr", "mmap_offset", "mmap_size", "desc_user_addr", "used_user_addr",
                         "avail_user_addr", "log_guest_addr", "iova", "size_bytes", "uaddr", "fd_offset",
                         "shm_offset", "len", "offset_bytes", "u64"})


def _show(key: str, value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:#x}" if key in _HEX_FIELDS else str(value)
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return "[" + ", ".join("{" + " ".join(f"{k}={_show(k, v)}" for k, v in d.items()) + "}" for d in value) + "]"
    if isinstance(value, (list, tuple)):
        return "|".join(str(v) for v in value) if value else "-"
    return str(value)


# --------------------------------------------------------------------------------------------
# Payload decoding: one layout per request (and per reply), all from user.py
# --------------------------------------------------------------------------------------------

def _nothing(payload: bytes) -> dict:
    if payload:
        raise ProtocolError(f"expected no payload, got {len(payload)} bytes")
    return {}


def _u64(name: str, names: Callable[[int], tuple[str, ...]] | None = None) -> Callable[[bytes], dict]:
    def decode(payload: bytes) -> dict:
        value = unpack_u64(payload, name)
        d = {name: value}
        if names is not None:
            d[f"{name}_names"] = list(names(value))
        return d
    return decode


def _layout(cls) -> Callable[[bytes], dict]:
    return lambda payload: cls.unpack(payload)._asdict()


def _mem_table(payload: bytes) -> dict:
    regions = MemoryTable.unpack(payload).regions
    return {"nregions": len(regions), "regions": [r._asdict() for r in regions]}


def _mem_reg(payload: bytes) -> dict:
    return MemoryRegion.unpack_single(payload)._asdict()


def _config(payload: bytes) -> dict:
    if not payload:
        return {"error": "empty (the back-end's refusal)"}
    c = Config.unpack(payload)
    return {"offset": c.offset, "size": c.size, "flags": c.flags, "data": c.data.hex()}


def _log_reply(payload: bytes) -> dict:
    return _u64("status")(payload) if len(payload) == 8 else Log.unpack(payload)._asdict()


def _ack_or(decoder: Callable[[bytes], dict]) -> Callable[[bytes], dict]:
    """A REPLY_ACK u64, or (after POSTCOPY_LISTEN) the request's layout filled in by the back-end."""
    return lambda payload: _u64("status")(payload) if len(payload) == 8 else decoder(payload)


def _rarp(payload: bytes) -> dict:
    unpack_u64(payload, "VHOST_USER_SEND_RARP")
    return {"mac": ":".join(f"{b:02x}" for b in payload[:6])}


def _shared(payload: bytes) -> dict:
    return {"uuid": str(SharedObject.unpack(payload).uuid)}


def _shmem_config(payload: bytes) -> dict:
    c = ShmemConfig.unpack(payload)
    return {"nregions": c.nregions, "memory_sizes": {str(i): s for i, s in enumerate(c.memory_sizes) if s}}


def _vring_area(payload: bytes) -> dict:
    a = VringArea.unpack(payload)
    return {"index": a.index, "nofd": a.nofd, "size_bytes": a.size, "offset_bytes": a.offset}


def _status_names(value: int) -> tuple[str, ...]:
    return tuple(s.name for s in DeviceStatus if value & s)


_FEATURES = _u64("features", feature_names)
_PROTOCOL = _u64("protocol_features", protocol_feature_names)
_STATUS = _u64("status", _status_names)
_STATE, _STATE_ADDR, _VRING_FD = _layout(VringState), _layout(VringAddr), _layout(VringFd)
_F, _B = FrontendRequest, BackendRequest

#: request -> (decoder of the request's payload, decoder of its reply's). A reply not listed is the
#: u64 of a REPLY_ACK answer (0 = success).
_FRONTEND_DECODERS: dict[int, tuple[Callable, Callable | None]] = {
    _F.GET_FEATURES: (_nothing, _FEATURES),
    _F.SET_FEATURES: (_FEATURES, None),
    _F.SET_OWNER: (_nothing, None),
    _F.RESET_OWNER: (_nothing, None),
    _F.SET_MEM_TABLE: (_mem_table, _ack_or(_mem_table)),      # postcopy: the back-end's bases
    _F.SET_LOG_BASE: (_layout(Log), _log_reply),
    _F.SET_LOG_FD: (_nothing, None),
    _F.SET_VRING_NUM: (_STATE, None),
    _F.SET_VRING_ADDR: (_STATE_ADDR, None),
    _F.SET_VRING_BASE: (_STATE, None),
    _F.GET_VRING_BASE: (_STATE, _STATE),
    _F.SET_VRING_KICK: (_VRING_FD, None),
    _F.SET_VRING_CALL: (_VRING_FD, None),
    _F.SET_VRING_ERR: (_VRING_FD, None),
    _F.GET_PROTOCOL_FEATURES: (_nothing, _PROTOCOL),
    _F.SET_PROTOCOL_FEATURES: (_PROTOCOL, None),
    _F.GET_QUEUE_NUM: (_nothing, _u64("queues")),
    _F.SET_VRING_ENABLE: (_STATE, None),
    _F.SEND_RARP: (_rarp, None),
    _F.NET_SET_MTU: (_u64("mtu"), None),
    _F.SET_BACKEND_REQ_FD: (_nothing, None),
    _F.IOTLB_MSG: (_layout(IotlbMsg), None),
    _F.SET_VRING_ENDIAN: (_STATE, None),
    _F.GET_CONFIG: (_config, _config),
    _F.SET_CONFIG: (_config, None),
    _F.CLOSE_CRYPTO_SESSION: (_u64("session_id"), None),
    _F.POSTCOPY_ADVISE: (_nothing, _nothing),
    _F.POSTCOPY_LISTEN: (_nothing, None),
    _F.POSTCOPY_END: (_nothing, None),
    _F.GET_INFLIGHT_FD: (_layout(Inflight), _layout(Inflight)),
    _F.SET_INFLIGHT_FD: (_layout(Inflight), None),
    _F.GPU_SET_SOCKET: (_nothing, None),
    _F.RESET_DEVICE: (_nothing, None),
    _F.VRING_KICK: (_STATE, None),
    _F.GET_MAX_MEM_SLOTS: (_nothing, _u64("slots")),
    _F.ADD_MEM_REG: (_mem_reg, _ack_or(_mem_reg)),
    _F.REM_MEM_REG: (_mem_reg, None),
    _F.SET_STATUS: (_STATUS, None),
    _F.GET_STATUS: (_nothing, _STATUS),
    _F.GET_SHARED_OBJECT: (_shared, None),
    _F.SET_DEVICE_STATE_FD: (_layout(DeviceState), None),
    _F.CHECK_DEVICE_STATE: (_nothing, None),
    _F.GET_SHMEM_CONFIG: (_nothing, _shmem_config),
}
_BACKEND_DECODERS: dict[int, tuple[Callable, Callable | None]] = {
    _B.IOTLB_MSG: (_layout(IotlbMsg), None),
    _B.CONFIG_CHANGE_MSG: (_nothing, None),
    _B.VRING_HOST_NOTIFIER_MSG: (_vring_area, None),
    _B.VRING_CALL: (_STATE, None),
    _B.VRING_ERR: (_STATE, None),
    _B.SHARED_OBJECT_ADD: (_shared, None),
    _B.SHARED_OBJECT_REMOVE: (_shared, None),
    _B.SHARED_OBJECT_LOOKUP: (_shared, None),
    _B.SHMEM_MAP: (_layout(ShmemMap), None),
    _B.SHMEM_UNMAP: (_layout(ShmemMap), None),
}
del _F, _B
_ACK = _u64("status")
assert set(_FRONTEND_DECODERS) | {FrontendRequest.CREATE_CRYPTO_SESSION} == set(FrontendRequest)
assert set(_BACKEND_DECODERS) == set(BackendRequest)


def decode(channel: str, request: int, flags: int, payload: bytes) -> tuple[dict, list[str]]:
    """The payload's fields by name, and what is wrong with it (a code or a size the spec does
    not know: the bytes then come back as ``{"hex": ...}``)."""
    decoders = _FRONTEND_DECODERS if channel == MAIN else _BACKEND_DECODERS
    pair = decoders.get(request)
    reply = bool(flags & VHOST_USER_REPLY_MASK)
    if pair is None:
        known = isinstance(request, FrontendRequest if channel == MAIN else BackendRequest)
        problems = [] if known else [f"request {int(request)} is not a "
                                     f"{'front-end' if channel == MAIN else 'back-end'} request the protocol defines"]
        return ({"hex": payload.hex()} if payload else {}), problems
    decoder = (pair[1] or _ACK) if reply else pair[0]
    try:
        return decoder(payload), []
    except (VhostError, ValueError) as exc:
        return {"hex": payload.hex()}, [f"payload not decodable: {exc}"]


def fd_target(fd: int) -> str:
    """What an fd is, as /proc/self/fd shows it: /memfd:name (deleted), anon_inode:[eventfd], socket:[N]."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        return f"? ({exc.strerror})"


# --------------------------------------------------------------------------------------------
# The relay: one direction of one channel, and a session's sockets
# --------------------------------------------------------------------------------------------

class _Stream:
    """Messages from ``source`` to ``sink``: at most one being read and one being written."""

    def __init__(self, session: _Session, link: _Channel, sender: str, source: socket.socket,
                 sink: socket.socket) -> None:
        self.session, self.link, self.sender = session, link, sender
        self.channel = channel = link.kind
        self.source, self.sink = source, sink
        self.requests = FrontendRequest if channel == MAIN else BackendRequest
        self.table = FRONTEND_REQUESTS if channel == MAIN else BACKEND_REQUESTS
        self.header = bytearray()
        self.size = -1                          # payload size, once the header is in
        self.payload = bytearray()
        self.fds: list[int] = []                # received with the message being read
        self.out: memoryview | None = None      # bytes not yet written to the sink
        self.out_fds: list[int] = []            # sent with the first byte written, then closed
        self.injected: collections.deque[bytes] = collections.deque()     # Tracer.inject()'s messages

    @property
    def busy(self) -> bool:
        return self.out is not None

    def partial(self) -> dict | None:
        """The message cut off in the middle, if any: what of it had arrived."""
        if not self.header and not self.fds:
            return None
        d = {"header_bytes": len(self.header), "fds": len(self.fds)}
        if self.size >= 0:
            code = HEADER.unpack(bytes(self.header))[0]
            d.update(request=request_name(_CODES[self.requests].get(code, code)), size=self.size,
                     payload_bytes=len(self.payload))
        return d

    def discard(self) -> None:
        _close_all(self.fds)
        _close_all(self.out_fds)
        self.fds, self.out_fds, self.out = [], [], None
        self.injected.clear()


def _close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _Closed(Exception):
    """A channel ended while relaying: who closed it and how (raised inside the loop only)."""

    def __init__(self, by: str, detail: str) -> None:
        super().__init__(detail)
        self.by, self.detail = by, detail


class _Channel:
    """One connection relayed both ways: the main socket, or one back-end channel (a front-end may
    hand over a new one; each is its own _Channel). ``owed``: its requests still awaiting a reply."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.streams: list[_Stream] = []
        self.owed: collections.deque = collections.deque()


class _Session:
    """One front-end connection and its own back-end connection (and, later, back-end channels)."""

    def __init__(self, number: int, frontend: socket.socket, backend: socket.socket) -> None:
        self.number = number
        self.closed = False
        self.streams: dict[socket.socket, _Stream] = {}         # by the socket each reads from
        self.channels: list[_Channel] = []
        self.asked: collections.deque = collections.deque()     # (request, callback) of inject()
        self.main = self.add_channel(MAIN, frontend, backend)

    def add_channel(self, kind: str, frontend: socket.socket, backend: socket.socket) -> _Channel:
        for sock in (frontend, backend):
            sock.setblocking(False)
        link = _Channel(kind)
        link.streams = [_Stream(self, link, FRONTEND, frontend, backend),
                        _Stream(self, link, BACKEND, backend, frontend)]
        for stream in link.streams:
            self.streams[stream.source] = stream
        self.channels.append(link)
        return link


# --------------------------------------------------------------------------------------------
# The tracer
# --------------------------------------------------------------------------------------------

class Tracer:
    """Listen on ``listen``; relay each front-end to a new connection to ``connect``; hand every
    message and session event to ``report`` (called in the tracer's thread, as each is forwarded).

    ``run()`` serves until ``stop()`` (or, with ``once``, until the first session ends);
    ``fileno()`` and ``process()`` fit it into another event loop instead. Each session ends when
    either peer closes the main socket: the other one is closed too, as if they had been
    connected directly. ``sessions`` counts the front-ends accepted.
    """

    def __init__(self, listen: str, connect: str, report: Callable[[Event], None], *, once: bool = False) -> None:
        self.connect_path = check_socket_path(connect)
        self.report = report
        self.once = once
        self.sessions = 0
        self.failures: list[str] = []           # sessions that could not reach the back-end
        self._live: set[_Session] = set()
        self._ended = 0
        self._start = time.monotonic()
        self._selector = selectors.DefaultSelector()
        self._masks: dict[socket.socket, int] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping = False
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        try:
            self._listener = Listener(listen, backlog=8)
        except BaseException:
            self._selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise
        self.path = self._listener.path
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)

    # -- the loop -----------------------------------------------------------------------------

    def fileno(self) -> int:
        """Readable when :meth:`process` has something to do (the selector's own fd)."""
        return self._selector.fileno()

    @property
    def done(self) -> bool:
        """stop() was called, or (``once``) the first session has ended."""
        return self._stopping or (self.once and self._ended > 0 and not self._live)

    def run(self, stop_event: threading.Event | None = None) -> None:
        while not self.done and not (stop_event is not None and stop_event.is_set()):
            self.process(None if stop_event is None else 0.2)

    def stop(self) -> None:
        """Make run() return (safe from another thread or a signal handler)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def process(self, timeout: float | None = 0) -> None:
        """Handle whatever is ready (waiting up to ``timeout`` seconds, None: until something is)."""
        for key, events in self._selector.select(timeout):
            obj = key.fileobj
            if obj == self._wake_r:
                try:
                    os.read(self._wake_r, 64)
                except BlockingIOError:
                    pass
                while self._calls:
                    self._calls.popleft()()
            elif obj is self._listener:
                self._accept()
            else:
                stream = key.data
                if stream.session.closed or obj not in self._masks:
                    continue                    # ended earlier in this round
                self._ready(stream, events)

    def call_soon(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` in the tracer's thread, at its next turn (safe from any thread)."""
        self._calls.append(callback)
        try:
            os.write(self._wake_w, b"c")
        except OSError:
            pass

    def inject(self, session: int, request: int, payload: bytes, on_reply: Callable[[Record | None], None]) -> None:
        """Send a request of our own to ``session``'s back-end between two of the front-end's
        messages; its reply goes to ``on_reply`` (not to the front-end, nor to ``report``), or None
        if the session ends first. Call in the tracer's thread (see :meth:`call_soon`). For a tool
        or a test that asks the back-end something mid-session while the front-end is quiet: a
        reply is taken as ours only when no request of the front-end's is still owed one."""
        live = next((s for s in self._live if s.number == session), None)
        if live is None:
            on_reply(None)
            return
        stream = live.main.streams[0]          # front-end -> back-end
        live.asked.append((request, on_reply))
        stream.injected.append(HEADER.pack(int(request), VHOST_USER_VERSION, len(payload)) + bytes(payload))
        if not stream.busy:
            stream.out = memoryview(stream.injected.popleft())
            try:
                self._flush(stream)
            except _Closed as closed:
                self._close_channel(live, live.main, closed.by, closed.detail)
                return
        for s in live.main.streams:
            self._watch(s)

    def _now(self) -> float:
        return time.monotonic() - self._start

    def _accept(self) -> None:
        try:
            frontend = self._listener.accept().sock
        except (BlockingIOError, InterruptedError):
            return
        number, self.sessions = self.sessions, self.sessions + 1
        backend = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            backend.connect(self.connect_path)
        except OSError as exc:
            backend.close()
            frontend.close()
            detail = f"cannot connect to the back-end at {self.connect_path}: {exc.strerror}; front-end disconnected"
            self.failures.append(detail)
            self._ended += 1
            self.report(SessionEvent(number, self._now(), "closed", by="tracer", detail=detail))
            return
        session = _Session(number, frontend, backend)
        self._live.add(session)
        self.report(SessionEvent(number, self._now(), "open",
                                 detail=f"front-end connected; relaying to {self.connect_path}"))
        for stream in session.main.streams:
            self._watch(stream)

    def _watch(self, stream: _Stream) -> None:
        """Register ``stream``'s source socket: readable unless its sink is busy, writable while
        the stream coming the other way has bytes to write to it."""
        sock = stream.source
        back = stream.session.streams[stream.sink]
        mask = (0 if stream.busy else selectors.EVENT_READ) | (selectors.EVENT_WRITE if back.busy else 0)
        old = self._masks.get(sock)
        if mask == old:
            return
        if old is None:
            self._selector.register(sock, mask, stream)
        elif mask == 0:
            self._selector.unregister(sock)
        else:
            self._selector.modify(sock, mask, stream)
        if mask:
            self._masks[sock] = mask
        else:
            self._masks.pop(sock, None)

    def _ready(self, stream: _Stream, events: int) -> None:
        session = stream.session
        back = session.streams[stream.sink]
        try:
            if events & selectors.EVENT_WRITE:
                self._flush(back)               # what goes to this socket
            if events & selectors.EVENT_READ and not stream.busy:
                for _ in range(_BURST):
                    if not self._read(stream) or stream.busy:
                        break
        except _Closed as closed:
            self._close_channel(session, stream.link, closed.by, closed.detail)
            return
        if not session.closed:
            for s in stream.link.streams:
                if s.source.fileno() >= 0:
                    self._watch(s)

    # -- reading ------------------------------------------------------------------------------

    def _read(self, stream: _Stream) -> bool:
        """Read what is there of the current message; when it is whole, forward and report it.
        False when the socket has nothing more for now."""
        if stream.size < 0:
            want = VHOST_USER_HDR_SIZE - len(stream.header)
        else:
            want = stream.size - len(stream.payload)
        if want:
            try:
                data, ancdata, msg_flags, _ = stream.source.recvmsg(want, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return False
            except ConnectionResetError:
                data, ancdata, msg_flags = b"", [], 0
                reset = True
            else:
                reset = False
            for level, kind, fd_data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(fd_data[:len(fd_data) - len(fd_data) % _FD_BYTES])
                    stream.fds.extend(fds)
            if msg_flags & socket.MSG_CTRUNC:
                raise _Closed("tracer", f"the {stream.sender} sent more than {SCM_MAX_FD} fds with one message: "
                                        f"the kernel dropped some, so the message cannot be forwarded unchanged")
            if not data:
                raise _Closed(stream.sender, self._eof_detail(stream, reset))
            if stream.size < 0:
                stream.header += data
                if len(stream.header) < VHOST_USER_HDR_SIZE:
                    return True
                code, flags, size = HEADER.unpack(bytes(stream.header))
                if size > VHOST_USER_MAX_PAYLOAD:
                    name = request_name(_CODES[stream.requests].get(code, code))
                    raise _Closed("tracer", f"the {stream.sender} sent a {name} header announcing {size} payload "
                                            f"bytes, beyond the protocol's {VHOST_USER_MAX_PAYLOAD}: nothing of it "
                                            f"was forwarded")
                stream.size = size
            else:
                stream.payload += data
            if len(stream.payload) < stream.size:
                return True
        self._forward(stream)
        return True

    def _eof_detail(self, stream: _Stream, reset: bool) -> str:
        how = "reset the connection" if reset else "closed the connection"
        partial = stream.partial()
        if partial is None:
            return f"the {stream.sender} {how}"
        if "size" not in partial:
            return (f"the {stream.sender} {how} in the middle of a message header ({partial['header_bytes']} of "
                    f"{VHOST_USER_HDR_SIZE} bytes): not forwarded")
        return (f"the {stream.sender} {how} in the middle of {partial['request']} ({partial['payload_bytes']} of "
                f"{partial['size']} payload bytes): not forwarded")

    # -- forwarding ---------------------------------------------------------------------------

    def _forward(self, stream: _Stream) -> None:
        session = stream.session
        header, payload, fds = bytes(stream.header), bytes(stream.payload), stream.fds
        stream.header, stream.payload, stream.fds, stream.size = bytearray(), bytearray(), [], -1
        code, flags, _size = HEADER.unpack(header)
        request = _CODES[stream.requests].get(code, code)
        record = Record(session.number, stream.channel, stream.sender, self._now(), request, flags, payload,
                        tuple(fd_target(fd) for fd in fds))
        record.fields, record.problems = decode(stream.channel, request, flags, payload)
        self._check(stream, record, len(fds))
        new_channel = None
        out_fds = fds
        if (stream.channel == MAIN and request == FrontendRequest.SET_BACKEND_REQ_FD and stream.sender == FRONTEND
                and len(fds) == 1 and _is_unix_stream(fds[0])):
            # Keep the front-end's end of the channel; the back-end gets one end of our socketpair.
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            frontend_end = socket.socket(fileno=fds[0])
            out_fds = [theirs.detach()]
            new_channel = (frontend_end, ours)
            record.notes.append("the channel's socket is relayed by the tracer: the back-end got one end of a "
                                "socketpair of the tracer's, traced as the backend channel")
        if stream.sender == BACKEND and record.is_reply and session.asked and stream.link is session.main \
                and not session.main.owed and session.asked[0][0] == record.request:
            _close_all(fds)                     # the answer to inject(): its caller's, not the front-end's
            session.asked.popleft()[1](record)
            return
        stream.out = memoryview(header + payload)
        stream.out_fds = out_fds
        if new_channel is not None:
            new_channel = session.add_channel(BACKEND_CHANNEL, *new_channel)
        self.report(record)                     # before it reaches the other side, so a reader of the
        self._flush(stream)                     # reports never misses what a peer has already seen
        if new_channel is not None:
            for s in new_channel.streams:
                self._watch(s)

    def _flush(self, stream: _Stream) -> None:
        """Write what is pending to the sink, as far as it takes it now."""
        while stream.out is not None:
            try:
                if stream.out_fds:
                    sent = stream.sink.sendmsg([stream.out], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                               array.array("i", stream.out_fds))],
                                               socket.MSG_NOSIGNAL)
                    _close_all(stream.out_fds)  # the kernel holds its own references now
                    stream.out_fds = []
                else:
                    sent = stream.sink.send(stream.out, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return
            except (BrokenPipeError, ConnectionResetError):
                receiver = BACKEND if stream.sender == FRONTEND else FRONTEND
                raise _Closed(receiver, f"the {receiver} closed the connection (found while forwarding to it)") \
                    from None
            stream.out = stream.out[sent:] if sent < len(stream.out) else None
            if stream.out is None and stream.injected:
                stream.out = memoryview(stream.injected.popleft())

    # -- what is owed -------------------------------------------------------------------------

    def _check(self, stream: _Stream, record: Record, nfds: int) -> None:
        """The spec's view of the message, and the reply bookkeeping of its channel."""
        flags = record.flags
        version = flags & VHOST_USER_VERSION_MASK
        if version != VHOST_USER_VERSION:
            record.problems.append(f"header version {version}, expected {VHOST_USER_VERSION}")
        if flags & VHOST_USER_RESERVED_FLAGS:
            record.problems.append(f"reserved flag bits {flags & VHOST_USER_RESERVED_FLAGS:#x} set")
        owed = stream.link.owed
        spec = stream.table.get(record.request)
        requester = FRONTEND if stream.channel == MAIN else BACKEND
        if record.is_reply:
            if stream.sender == requester:
                record.problems.append(f"a reply from the {stream.sender}, who asks on this channel")
            if owed:
                expected, record.answer_kind = owed.popleft()
                record.answers = request_name(expected)
                record.matched = expected == record.request
                if not record.matched:
                    record.problems.append(f"the reply owed was to {request_name(expected)}")
            else:
                record.answers, record.matched = "nothing", False
                record.problems.append("a reply when no request was waiting for one")
            if spec is not None:
                try:
                    spec.validate_reply(record.payload, nfds)
                except ProtocolError as exc:
                    record.problems.append(str(exc))
            return
        if stream.sender != requester:
            record.problems.append(f"a request from the {stream.sender}, who only answers on this channel")
        if spec is None:
            return
        try:
            spec.validate(record.payload, nfds)
        except ProtocolError as exc:
            record.problems.append(str(exc))
        if spec.reply_due(flags):
            record.expects = "reply" if spec.reply else "ack"
            if len(owed) >= _MAX_OWED:
                owed.popleft()
            owed.append((record.request, record.expects))

    # -- ending -------------------------------------------------------------------------------

    def _close_channel(self, session: _Session, channel: _Channel, by: str, detail: str) -> None:
        """End ``channel`` (the main one ends the session, and with it every back-end channel)."""
        if channel not in session.channels:
            return
        ending = list(session.channels) if channel is session.main else [channel]
        for ch in ending:
            session.channels.remove(ch)
            streams = sorted(ch.streams, key=lambda s: s.sender != by)      # the closer first
            for s in streams:
                if s.busy and s.sink.fileno() >= 0:
                    try:
                        self._flush(s)              # what was whole still reaches the other side
                    except _Closed:
                        pass
            partial = next((p for p in (s.partial() for s in streams) if p is not None), None)
            owed = [request_name(r) for r, _kind in ch.owed]
            ch.owed.clear()
            if ch is session.main:
                while session.asked:
                    session.asked.popleft()[1](None)
            if ch is channel:
                event = SessionEvent(session.number, self._now(), "closed", ch.kind, by, detail, owed, partial)
            else:
                event = SessionEvent(session.number, self._now(), "closed", ch.kind, "tracer",
                                     "the session's main connection ended", owed, partial)
            for s in streams:
                s.discard()
                if s.source in self._masks:
                    self._selector.unregister(s.source)
                    del self._masks[s.source]
                s.source.close()
                del session.streams[s.source]
            self.report(event)
        if channel is session.main:
            session.closed = True
            self._live.discard(session)
            self._ended += 1

    def close(self) -> None:
        """End every session (reported as closed by the tracer) and stop listening."""
        for session in list(self._live):
            self._close_channel(session, session.main, "tracer", "the tracer stopped")
        self._selector.close()
        self._listener.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_unix_stream(fd: int) -> bool:
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
        probe = socket.socket(fileno=fd)
    except OSError:
        return False
    try:
        return probe.family == socket.AF_UNIX and probe.type == socket.SOCK_STREAM
    finally:
        probe.detach()


# --------------------------------------------------------------------------------------------
# The command's printer
# --------------------------------------------------------------------------------------------

def printer(out, as_json: bool = False) -> Callable[[Event], None]:
    """A ``report`` callback writing each event as one line (text, or one JSON object) to ``out``."""
    def report(event: Event) -> None:
        line = json.dumps(event.as_dict(), separators=(",", ":")) if as_json else event.text()
        try:
            out.write(line + "\n")
            out.flush()
        except BrokenPipeError:
            pass                                # `| head`: the relaying goes on regardless
    return report


__all__ = ["Tracer", "Record", "SessionEvent", "decode", "fd_target", "printer", "MAIN", "BACKEND_CHANNEL",
           "FRONTEND", "BACKEND"]
