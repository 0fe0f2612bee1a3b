"""vhost-user front-end: the side QEMU plays, driving a back-end over its socket.

Read top to bottom: defaults and result types, the guest memory the front-end owns (memfd
regions and an allocator for rings and data buffers), then :class:`Frontend` — one method per
front-end message (``get_features`` ... ``get_shmem_config``, REPLY_ACK added when negotiated),
the high-level steps built on them (``negotiate``, ``setup_memory``, ``setup_queue``, ``stop``,
``reconnect``, ``probe``), and the server of the back-end-request channel.

Every request is bounded by ``timeout``: a hung back-end costs a VhostError(ETIMEDOUT), never a
hang. While waiting for a reply the front-end also serves the back-end-request channel, so a
back-end that asks something (CONFIG_CHANGE_MSG with NEED_REPLY) in the middle of a request is
answered instead of deadlocking both sides.

Spec: QEMU docs/interop/vhost-user.rst; shared-object and SHMEM messages as in PROTOCOL-NOTES.md.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import logging
import mmap
import os
import select
import socket
import threading
import time
import uuid as uuid_module
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .dataplane import Dataplane
from .errors import (DisconnectedError, GuestMemoryError, NotNegotiatedError, NotSupportedError, ProtocolError,
                     VhostError)
from .memory import VHOST_LOG_PAGE, DirtyLog, GuestMemory, address_of, map_fd
from .user import (BACKEND_REQUESTS, FRONTEND_REQUESTS, HEADER, U64, VHOST_ACCESS_RW, VHOST_IOTLB_ACCESS_FAIL,
                   VHOST_IOTLB_MISS, VHOST_IOTLB_UPDATE, VHOST_MEMORY_BASELINE_NREGIONS,
                   VHOST_TRANSFER_STATE_DIRECTION_LOAD, VHOST_TRANSFER_STATE_DIRECTION_SAVE,
                   VHOST_TRANSFER_STATE_PHASE_STOPPED, VHOST_USER_DEVICE_STATE_ERROR_MASK, VHOST_USER_FLAG_MAP_RW,
                   VHOST_USER_MAX_CONFIG_SIZE, VHOST_USER_REPLY_MASK, VHOST_USER_VERSION, VHOST_USER_VERSION_MASK,
                   BackendRequest, Config, Connection, DeviceState, FrontendRequest, Inflight, IotlbMsg, Log,
                   MemoryRegion, MemoryTable, Message, ProtocolFeature, RequestSpec, SharedObject, ShmemConfig,
                   ShmemMap, VirtioGate, VringAddr, VringFd, VringState, check_message, check_socket_path)
from .virtio import (VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, VHOST_VRING_F_LOG, DeviceStatus, VirtioFeature)

__all__ = ["DEFAULT_TIMEOUT", "FRONTEND_FEATURES", "FRONTEND_PROTOCOL_FEATURES", "OPTIONAL_PROTOCOL_FEATURES",
           "PROBE_PROTOCOL_FEATURES", "Negotiated", "ProbeResult", "GuestRegion", "SharedObjects", "Frontend",
           "feature_names", "protocol_feature_names"]

log = logging.getLogger(__name__)

#: Seconds any one request (and connect, and a probe's first answer) may take.
DEFAULT_TIMEOUT = 5.0

#: Transport features negotiate() takes by default (with VHOST_USER_F_PROTOCOL_FEATURES) from what
#: the back-end offers. Opt-in, by passing them: VIRTIO_F_RING_PACKED (the ring format is
#: device-wide: once negotiated every ring is packed — QEMU's default is split too) and
#: VIRTIO_F_ACCESS_PLATFORM (ring addresses become IOVAs; we use IOVA = GPA and answer IOTLB misses
#: with identity mappings). VHOST_F_LOG_ALL is switched on by start_dirty_log().
FRONTEND_FEATURES = (VirtioFeature.VIRTIO_F_VERSION_1 | VirtioFeature.VIRTIO_F_INDIRECT_DESC
                     | VirtioFeature.VIRTIO_F_EVENT_IDX | VHOST_USER_F_PROTOCOL_FEATURES)

P = ProtocolFeature
#: Protocol features negotiated by default: each is one whose front-end duties this module fulfils.
FRONTEND_PROTOCOL_FEATURES = (P.MQ | P.LOG_SHMFD | P.REPLY_ACK | P.BACKEND_REQ | P.CONFIG | P.BACKEND_SEND_FD
                              | P.INFLIGHT_SHMFD | P.RESET_DEVICE | P.INBAND_NOTIFICATIONS | P.CONFIGURE_MEM_SLOTS
                              | P.STATUS | P.SHARED_OBJECT | P.DEVICE_STATE | P.SHMEM)
#: Negotiated only when asked for (their messages are plain wrappers: send_rarp, net_set_mtu,
#: set_vring_endian). PAGEFAULT (postcopy), CRYPTO_SESSION, HOST_NOTIFIER, XEN_MMAP,
#: GET_VRING_BASE_INFLIGHT and GPA_ADDRESSES are never negotiated.
OPTIONAL_PROTOCOL_FEATURES = P.RARP | P.NET_MTU | P.CROSS_ENDIAN
#: What probe() negotiates: exactly the features its GET_* requests need, nothing that changes behaviour.
PROBE_PROTOCOL_FEATURES = P.MQ | P.CONFIG | P.CONFIGURE_MEM_SLOTS
del P

_EFD_FLAGS = os.EFD_CLOEXEC | os.EFD_NONBLOCK
_RING_ALIGN = 64                    # covers every ring part's alignment (16 / 4 / 2)


def _round_up(value: int, align: int) -> int:
    return -(-value // align) * align


# --------------------------------------------------------------------------------------------
# Results and names
# --------------------------------------------------------------------------------------------

class Negotiated(NamedTuple):
    """What negotiate() settled on (also readable as Frontend attributes afterwards)."""

    features: int                           # acked with SET_FEATURES
    protocol_features: ProtocolFeature      # acked with SET_PROTOCOL_FEATURES (0 when not offered)
    num_queues: int | None                  # GET_QUEUE_NUM, with MQ
    max_mem_slots: int | None               # GET_MAX_MEM_SLOTS, with CONFIGURE_MEM_SLOTS


class ProbeResult(NamedTuple):
    """probe()'s read-only summary of a back-end (what the CLI's ``probe`` prints)."""

    features: int
    feature_names: tuple[str, ...]
    protocol_features: ProtocolFeature | None       # None: VHOST_USER_F_PROTOCOL_FEATURES not offered
    protocol_feature_names: tuple[str, ...]
    num_queues: int | None                          # None: MQ not offered
    max_mem_slots: int | None                       # None: CONFIGURE_MEM_SLOTS not offered
    config: bytes | None                            # None: CONFIG not offered (or every size refused)


_VIRTIO_NAMES = {int(f): f.name for f in VirtioFeature}
_VIRTIO_NAMES[VHOST_F_LOG_ALL] = "VHOST_F_LOG_ALL"


def feature_names(features: int, device_features: type[enum.IntFlag] | None = None) -> tuple[str, ...]:
    """Names of the virtio feature bits in ``features`` (device bits from ``device_features`` if
    given); bits nobody names come out as ``bit N``."""
    names = dict(_VIRTIO_NAMES)
    if device_features is not None:
        names.update({int(f): f.name for f in device_features})
    return tuple(names.get(1 << bit, f"bit {bit}") for bit in range(64) if features >> bit & 1)


def protocol_feature_names(features: int) -> tuple[str, ...]:
    """Names (ProtocolFeature members, i.e. VHOST_USER_PROTOCOL_F_<name>) of the bits in ``features``."""
    known = {int(f): f.name for f in ProtocolFeature}
    return tuple(known.get(1 << bit, f"bit {bit}") for bit in range(64) if features >> bit & 1)


# --------------------------------------------------------------------------------------------
# Guest memory the front-end owns
# --------------------------------------------------------------------------------------------

class GuestRegion:
    """One region of guest memory: a sealed memfd, mapped here; ``uva`` is our mapping's address,
    sent as userspace_addr the way QEMU sends its own virtual address."""

    __slots__ = ("gpa", "size", "uva", "fd", "mapping")

    def __init__(self, gpa: int, size: int) -> None:
        self.gpa, self.size, self.uva, self.mapping = gpa, size, 0, None
        self.fd = os.memfd_create(f"vhost_min-guest-{gpa:#x}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            # A back-end maps it too: sealed so nobody can shrink it under a mapping (SIGBUS).
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            self.mapping = map_fd(self.fd, size)    # keeps no duplicate of the memfd
            self.uva = address_of(self.mapping)
        except BaseException:
            self.close()
            raise

    @property
    def wire(self) -> MemoryRegion:
        """The region as SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG describe it (mmap offset 0)."""
        return MemoryRegion(self.gpa, self.size, self.uva, 0)

    def close(self) -> None:
        """Close the memfd; the mapping goes when the last view of it does."""
        self.mapping = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"GuestRegion(gpa={self.gpa:#x}, size={self.size:#x}, uva={self.uva:#x}, fd={self.fd})"


class _Allocator:
    """First-fit allocation of guest-physical ranges, never across a region boundary (a ring or
    buffer handed out here is always one contiguous view)."""

    def __init__(self) -> None:
        self._free: list[list[int]] = []        # sorted [start, end) ranges
        self._live: dict[int, int] = {}         # gpa -> size
        self._starts: set[int] = set()          # region starts: free ranges never merge across them

    def add_range(self, start: int, end: int) -> None:
        self._starts.add(start)
        self._free.append([start, end])
        self._free.sort()

    def remove_range(self, start: int, end: int) -> None:
        busy = [gpa for gpa in self._live if start <= gpa < end]
        if busy:
            raise GuestMemoryError(f"region {start:#x}..{end:#x} still holds allocations at "
                                   f"{', '.join(hex(g) for g in sorted(busy))}")
        self._free = [r for r in self._free if not start <= r[0] < end]
        self._starts.discard(start)

    def alloc(self, size: int, align: int) -> int:
        if size <= 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"allocation of {size} bytes aligned to {align}: size must be positive, "
                             f"align a power of two")
        for i, (start, end) in enumerate(self._free):
            at = _round_up(start, align)
            if at + size <= end:
                pieces = [r for r in ([start, at], [at + size, end]) if r[0] < r[1]]
                self._free[i:i + 1] = pieces
                self._live[at] = size
                return at
        raise GuestMemoryError(f"out of guest memory: no free {size}-byte range aligned to {align}")

    def free(self, gpa: int) -> None:
        size = self._live.pop(gpa, None)
        if size is None:
            raise ValueError(f"{gpa:#x} is not an allocation")
        rng = [gpa, gpa + size]
        i = 0
        while i < len(self._free) and self._free[i][0] < gpa:
            i += 1
        self._free.insert(i, rng)
        if i + 1 < len(self._free) and self._free[i + 1][0] == rng[1] and rng[1] not in self._starts:
            rng[1] = self._free.pop(i + 1)[1]
        if i > 0 and self._free[i - 1][1] == gpa and gpa not in self._starts:
            self._free[i - 1][1] = rng[1]
            del self._free[i]

    def size_of(self, gpa: int) -> int:
        return self._live[gpa]


@dataclass(eq=False)
class _Ring:
    """What the front-end keeps per virtqueue to program it again (resume, reconnect)."""

    index: int
    size: int
    packed: bool
    event_idx: bool
    area: int                   # the allocation holding the ring parts
    desc: int                   # guest-physical addresses of the parts
    driver: int
    device: int
    queue: object               # vring.SplitDriverQueue / packed.PackedDriverQueue
    kick: int = -1              # eventfds (ours; the back-end gets duplicates)
    call: int = -1
    err: int = -1
    base: int | None = None     # from GET_VRING_BASE (stop()); replayed by resume()/reconnect()
    started: bool = False
    inband_calls: int = 0       # BACKEND_VRING_CALL messages not yet consumed by wait_call()
    inband_errors: int = 0      # BACKEND_VRING_ERR messages not yet reported by wait_call()
    errors: int = 0             # error signals seen (eventfd or BACKEND_VRING_ERR)

    def close_fds(self) -> None:
        for name in ("kick", "call", "err"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


# --------------------------------------------------------------------------------------------
# Shared objects (virtio-dmabuf): the registry a front-end proxies for its back-ends
# --------------------------------------------------------------------------------------------

class SharedObjects:
    """UUID -> exporter: a dma-buf fd the host program registered (``add_fd``), or the
    :class:`Frontend` whose back-end announced it with BACKEND_SHARED_OBJECT_ADD. Share one
    instance between front-ends so one back-end's object can be looked up by another."""

    def __init__(self) -> None:
        self._table: dict[uuid_module.UUID, int | Frontend] = {}
        self._lock = threading.Lock()

    def add_fd(self, uuid: uuid_module.UUID, fd: int) -> None:
        """Register a dma-buf fd (duplicated: the caller keeps its own)."""
        dup = os.dup(fd)
        with self._lock:
            old = self._table.get(uuid)
            self._table[uuid] = dup
        if isinstance(old, int):
            os.close(old)

    def add_backend(self, uuid: uuid_module.UUID, owner: Frontend) -> None:
        with self._lock:
            old = self._table.get(uuid)
            if isinstance(old, int):
                os.close(old)
            self._table[uuid] = owner

    def remove(self, uuid: uuid_module.UUID, owner: Frontend | None = None) -> bool:
        """Forget ``uuid`` (only if ``owner`` exported it, when given); True if it was there."""
        with self._lock:
            entry = self._table.get(uuid)
            if entry is None or (owner is not None and entry is not owner):
                return False
            del self._table[uuid]
        if isinstance(entry, int):
            os.close(entry)
        return True

    def lookup(self, uuid: uuid_module.UUID) -> int | None:
        """A new fd for the object (the caller closes it), or None if nobody exports it."""
        with self._lock:
            entry = self._table.get(uuid)
        if entry is None:
            return None
        if isinstance(entry, int):
            return os.dup(entry)
        return entry.get_shared_object(uuid)

    def owner(self, uuid: uuid_module.UUID) -> int | Frontend | None:
        """The exporter of ``uuid``: its registered fd, its Frontend, or None."""
        return self._table.get(uuid)

    def drop_owner(self, owner: Frontend) -> None:
        with self._lock:
            for key in [k for k, v in self._table.items() if v is owner]:
                del self._table[key]

    def close(self) -> None:
        with self._lock:
            entries, self._table = list(self._table.values()), {}
        for entry in entries:
            if isinstance(entry, int):
                os.close(entry)

    def __contains__(self, uuid: uuid_module.UUID) -> bool:
        return uuid in self._table


# --------------------------------------------------------------------------------------------
# The front-end
# --------------------------------------------------------------------------------------------

def _connect_socket(path: str, timeout: float) -> socket.socket:
    """connect(2) to a vhost-user socket, with errors a person can act on."""
    path = check_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        raise VhostError(f"no vhost-user socket at {path}", errno.ENOENT) from None
    except ConnectionRefusedError:
        sock.close()
        raise VhostError(f"nothing listens on {path} (a socket left behind by a back-end that exited, "
                         f"or not a socket)", errno.ECONNREFUSED) from None
    except PermissionError:
        sock.close()
        raise VhostError(f"permission denied connecting to {path}", errno.EACCES) from None
    except TimeoutError:
        sock.close()
        raise VhostError(f"connecting to {path} timed out after {timeout} s (the back-end does not accept)",
                         errno.ETIMEDOUT) from None
    except OSError as exc:
        sock.close()
        raise VhostError(f"cannot connect to {path}: {exc.strerror}", exc.errno) from None
    return sock


class Frontend(Dataplane):
    """A vhost-user front-end on one back-end socket; it owns every fd it creates (the socket,
    the back-end channel, memfds, eventfds, the inflight and log fds): close() closes them all.

    Typical use::

        with Frontend.connect("/tmp/blk.sock") as fe:
            fe.negotiate()
            fe.setup_memory(1 << 20)
            q = fe.setup_queue(0, 128)
            buf = fe.alloc(4096)
            q.add([], [(buf, 4096)]); fe.publish(0)
            fe.wait_call(0, timeout=1.0); q.reap()
    """

    def __init__(self, connection: Connection, *, timeout: float = DEFAULT_TIMEOUT,
                 path: str | os.PathLike | None = None, shared_objects: SharedObjects | None = None) -> None:
        self.timeout = timeout
        self.path = os.fspath(path) if path is not None else None
        self._conn: Connection | None = connection
        connection.sock.settimeout(timeout)
        self._channel: Connection | None = None         # back-end-request channel (our end)
        self._failure: VhostError | None = None          # latched: the main connection is unusable
        self._lock = threading.RLock()                   # main connection + back-end channel
        self._in_request = 0
        self._deferred: list[Callable[[], None]] = []   # main-channel work asked for while waiting for a reply
        # What was negotiated (None: not yet).
        self.offered_features: int | None = None
        self.features: int | None = None
        self.offered_protocol_features: ProtocolFeature | None = None
        self.protocol_features = ProtocolFeature(0)
        self.num_queues: int | None = None
        self.max_mem_slots: int | None = None
        self.shmem_config: ShmemConfig | None = None
        self._wanted: tuple[int | None, int | None] | None = None
        # State to replay.
        self.memory: GuestMemory | None = None
        self.regions: list[GuestRegion] = []
        self._alloc = _Allocator()
        self._rings: dict[int, _Ring] = {}
        self._inflight: tuple[int, Inflight] | None = None
        self._status: int | None = None
        self._log: tuple[int, int, DirtyLog] | None = None     # fd, size, mapping
        # The back-end-request channel's state and callbacks.
        self.shared_objects = shared_objects if shared_objects is not None else SharedObjects()
        self._own_shared_objects = shared_objects is None
        self.shmem_mappings: dict[tuple[int, int], mmap.mmap] = {}   # (shmid, shm_offset) -> mapping
        self.config_changes = 0
        self.on_config_change: Callable[[], None] | None = None
        self.on_vring_call: Callable[[int], None] | None = None
        self.on_vring_err: Callable[[int], None] | None = None
        #: Called with each BACKEND_IOTLB_MSG (miss or access failure); default: identity-map the
        #: region holding the IOVA (IOVA = guest-physical address) with an IOTLB_MSG update.
        self.on_iotlb_msg: Callable[[IotlbMsg], None] | None = None

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def connect(cls, path: str | os.PathLike, *, timeout: float = DEFAULT_TIMEOUT, check: bool = True,
                shared_objects: SharedObjects | None = None) -> Frontend:
        """Connect to the back-end listening on ``path``.

        With ``check`` the peer must answer a VHOST_USER_GET_FEATURES (read-only, what QEMU sends
        first) within ``timeout``; a peer that closes or answers something else is not a vhost-user
        back-end: ProtocolError naming what came back.
        """
        path = os.fspath(path)
        sock = _connect_socket(path, timeout)
        try:
            conn = Connection(sock)
        except BaseException:
            sock.close()
            raise
        fe = cls(conn, timeout=timeout, path=path, shared_objects=shared_objects)
        try:
            if check:
                fe._check_peer()
        except BaseException:
            fe.close()
            raise
        return fe

    def _check_peer(self) -> None:
        """Send GET_FEATURES and look at the first bytes that come back before parsing them."""
        conn = self._usable()
        where = self.path or "the peer"
        closed = ProtocolError(f"{where} closed the connection without answering VHOST_USER_GET_FEATURES: "
                               f"not a vhost-user back-end, or one that refused this front-end")
        try:
            conn.send(FrontendRequest.GET_FEATURES)
        except DisconnectedError:
            raise closed from None
        if not _wait_readable(conn.fileno(), self.timeout):
            raise VhostError(f"{where}: no answer to VHOST_USER_GET_FEATURES within {self.timeout} s "
                             f"(is it a vhost-user back-end?)", errno.ETIMEDOUT)
        try:
            head = conn.sock.recv(64, socket.MSG_PEEK)
        except ConnectionResetError:
            head = b""
        if not head:
            raise closed
        if len(head) >= HEADER.size:
            code, flags, size = HEADER.unpack_from(head)
            if (code != FrontendRequest.GET_FEATURES or flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION
                    or not flags & VHOST_USER_REPLY_MASK or size != U64.size):
                raise ProtocolError(f"{where} is not a vhost-user back-end: it answered VHOST_USER_GET_FEATURES "
                                    f"with {head[:32]!r}")
        try:
            msg = conn.recv()
        except TimeoutError:
            raise ProtocolError(f"{where} is not a vhost-user back-end: it answered VHOST_USER_GET_FEATURES "
                                f"with {head!r} and then nothing") from None
        except (DisconnectedError, ProtocolError) as exc:
            raise ProtocolError(f"{where} is not a vhost-user back-end: it answered VHOST_USER_GET_FEATURES "
                                f"with {head!r} ({exc})") from None
        with msg:
            self.offered_features = msg.u64()

    # -- fd ownership ----------------------------------------------------------------------------
    def close(self) -> None:
        """Close every fd this front-end owns; safe to call twice, and after any error."""
        with self._lock:
            self._drop_connection()
            self._drop_rings()
            if self._log is not None:
                self._close_log()
            if self._inflight is not None:
                os.close(self._inflight[0])
                self._inflight = None
            for mapping in self.shmem_mappings.values():
                mapping.close()
            self.shmem_mappings.clear()
            if self._own_shared_objects:
                self.shared_objects.close()
            else:
                self.shared_objects.drop_owner(self)
            if self.memory is not None:
                self.memory.clear()
                self.memory = None
            for region in self.regions:
                region.close()
            self.regions = []
            self._alloc = _Allocator()

    def _drop_rings(self) -> None:
        for ring in self._rings.values():
            ring.close_fds()
            ring.queue = None
            if self.memory is not None:
                self._alloc.free(ring.area)
        self._rings.clear()

    def _drop_connection(self) -> None:
        """Close the socket and the back-end channel, keep everything that can be replayed."""
        for conn in (self._channel, self._conn):
            if conn is not None:
                conn.close()
        self._channel = self._conn = None
        self._failure = None
        self._deferred.clear()

    def __enter__(self) -> Frontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else f"fd={self._conn.fileno()}"
        return f"<Frontend {self.path or ''} {state}>"

    @property
    def connected(self) -> bool:
        """True while the main connection is open and has not failed."""
        return self._conn is not None and self._failure is None

    def fileno(self) -> int:
        """The back-end-request channel's fd: when it is readable, call handle_backend_request()."""
        if self._channel is None:
            raise VhostError("no back-end request channel (BACKEND_REQ not negotiated, or closed)", errno.ENOTCONN)
        return self._channel.fileno()

    # -- the request core ------------------------------------------------------------------------
    def _usable(self) -> Connection:
        conn = self._conn
        if conn is None:
            raise VhostError("the front-end is not connected (closed, or reconnect() needed)", errno.ENOTCONN)
        failure = self._failure
        if failure is not None:
            cls = DisconnectedError if isinstance(failure, DisconnectedError) else VhostError
            raise cls(f"the connection is unusable after an earlier error ({failure}); reconnect() or close()",
                      failure.errno)
        return conn

    def _fail(self, exc: VhostError) -> VhostError:
        if self._failure is None:
            self._failure = exc
        return exc

    def _gate(self, spec: RequestSpec, nfds: int) -> None:
        """NotNegotiatedError before sending a request whose features were not negotiated."""
        spec.require(self.protocol_features, nfds)
        gate = spec.virtio_gate
        if gate is VirtioGate.PROTOCOL_FEATURES_OFFERED:
            if self.offered_features is not None and not self.offered_features & VHOST_USER_F_PROTOCOL_FEATURES:
                raise NotNegotiatedError(f"{spec.name} needs VHOST_USER_F_PROTOCOL_FEATURES, which the back-end "
                                         f"does not offer")
        elif gate is VirtioGate.PROTOCOL_FEATURES:
            if self.features is None or not self.features & VHOST_USER_F_PROTOCOL_FEATURES:
                raise NotNegotiatedError(f"{spec.name} needs VHOST_USER_F_PROTOCOL_FEATURES acked with "
                                         f"VHOST_USER_SET_FEATURES")
        elif gate is VirtioGate.ACCESS_PLATFORM:
            if self.features is None or not self.features & VirtioFeature.VIRTIO_F_ACCESS_PLATFORM:
                raise NotNegotiatedError(f"{spec.name} needs VIRTIO_F_ACCESS_PLATFORM acked with "
                                         f"VHOST_USER_SET_FEATURES")

    def _request(self, request: FrontendRequest, payload: bytes = b"", fds: Sequence[int] = ()) -> Message | None:
        """Send one request; return its reply if it has one. With REPLY_ACK negotiated every other
        request carries NEED_REPLY and its u64 answer is checked (non-zero: VhostError)."""
        spec = FRONTEND_REQUESTS[request]
        self._gate(spec, len(fds))
        ack = not spec.reply and bool(self.protocol_features & ProtocolFeature.REPLY_ACK)
        with self._lock:
            conn = self._usable()
            self._in_request += 1
            try:
                try:
                    conn.send(request, payload, fds, need_reply=ack)
                    msg = self._await_reply(conn, spec) if spec.reply or ack else None
                except TimeoutError:
                    raise self._fail(VhostError(f"{spec.name}: the back-end did not answer within {self.timeout} s",
                                                errno.ETIMEDOUT)) from None
                except DisconnectedError as exc:
                    raise self._fail(DisconnectedError(f"{spec.name}: {exc}", exc.errno)) from None
                except ProtocolError as exc:
                    self._fail(exc)
                    raise
            finally:
                self._in_request -= 1
            self._run_deferred()
        if msg is None:
            return None
        try:
            spec.validate_reply(msg.payload, len(msg.fds))
            if ack:
                value = msg.u64()
                if value:
                    raise VhostError(f"{spec.name} failed: the back-end answered {value:#x}", errno.EIO)
                return None
        except BaseException:
            msg.close()
            raise
        return msg

    def _await_reply(self, conn: Connection, spec: RequestSpec) -> Message:
        """Wait (at most ``timeout``) for the reply to ``spec``, serving back-end requests meanwhile."""
        deadline = time.monotonic() + self.timeout
        while True:
            channel = self._channel
            poller = select.poll()
            poller.register(conn.fileno(), select.POLLIN)
            if channel is not None:
                poller.register(channel.fileno(), select.POLLIN)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            ready = dict(poller.poll(remaining * 1000))
            if channel is not None and channel.fileno() in ready:
                self._serve_channel()
            if conn.fileno() in ready:
                msg = conn.recv()           # a partial message is bounded by the socket timeout
                if msg.request != spec.request or not msg.is_reply:
                    msg.close()
                    raise ProtocolError(f"waiting for the reply to {spec.name}, got {msg!r}")
                return msg

    def _run_deferred(self) -> None:
        while self._deferred and self._in_request == 0:
            work = self._deferred.pop(0)
            try:
                work()
            except VhostError as exc:
                log.warning("deferred back-end request failed: %s", exc)

    def _u64(self, request: FrontendRequest, value: int | None = None) -> int | None:
        msg = self._request(request, b"" if value is None else U64.pack(value))
        if msg is None:
            return None
        with msg:
            return msg.u64()

    # -- one method per front-end message --------------------------------------------------------
    def get_features(self) -> int:
        """VHOST_USER_GET_FEATURES: the virtio features the back-end offers."""
        self.offered_features = self._u64(FrontendRequest.GET_FEATURES)
        return self.offered_features

    def set_features(self, features: int) -> None:
        """VHOST_USER_SET_FEATURES: ack ``features``."""
        self._u64(FrontendRequest.SET_FEATURES, features)
        self.features = features

    def set_owner(self) -> None:
        """VHOST_USER_SET_OWNER: this connection is the device's front-end."""
        self._request(FrontendRequest.SET_OWNER)

    def reset_owner(self) -> None:
        """VHOST_USER_RESET_OWNER (deprecated; back-ends ignore it or disable every ring)."""
        self._request(FrontendRequest.RESET_OWNER)

    def set_mem_table(self, regions: Sequence[MemoryRegion], fds: Sequence[int]) -> None:
        """VHOST_USER_SET_MEM_TABLE: the whole table (at most 8 regions), one fd per region in order."""
        if len(regions) != len(fds):
            raise ValueError(f"{len(regions)} regions but {len(fds)} fds")
        self._request(FrontendRequest.SET_MEM_TABLE, MemoryTable(tuple(regions)).pack(), fds)

    def add_mem_reg(self, region: MemoryRegion, fd: int) -> None:
        """VHOST_USER_ADD_MEM_REG: one more region (CONFIGURE_MEM_SLOTS)."""
        self._request(FrontendRequest.ADD_MEM_REG, region.pack_single(), [fd])

    def rem_mem_reg(self, region: MemoryRegion) -> None:
        """VHOST_USER_REM_MEM_REG: drop a region, named by gpa, user address and size (no fd)."""
        self._request(FrontendRequest.REM_MEM_REG, region.pack_single())

    def set_log_base(self, fd: int, mmap_size: int, mmap_offset: int = 0) -> None:
        """VHOST_USER_SET_LOG_BASE (LOG_SHMFD): the dirty bitmap. The reply's size is whatever the
        back-end sends (libvhost-user 8 bytes, rust-vmm 16): only its arrival counts."""
        msg = self._request(FrontendRequest.SET_LOG_BASE, Log(mmap_size, mmap_offset).pack(), [fd])
        if msg is not None:
            msg.close()

    def set_log_fd(self, fd: int) -> None:
        """VHOST_USER_SET_LOG_FD: an eventfd the back-end may signal after writing the log."""
        self._request(FrontendRequest.SET_LOG_FD, b"", [fd])

    def set_vring_num(self, index: int, num: int) -> None:
        """VHOST_USER_SET_VRING_NUM: the queue size."""
        self._request(FrontendRequest.SET_VRING_NUM, VringState(index, num).pack())

    def set_vring_addr(self, addr: VringAddr) -> None:
        """VHOST_USER_SET_VRING_ADDR: the ring parts' addresses (user addresses, or IOVAs)."""
        self._request(FrontendRequest.SET_VRING_ADDR, addr.pack())

    def set_vring_base(self, index: int, num: int) -> None:
        """VHOST_USER_SET_VRING_BASE: where the back-end resumes (split: next avail index; packed:
        avail and used indices with their wrap counters)."""
        self._request(FrontendRequest.SET_VRING_BASE, VringState(index, num).pack())

    def get_vring_base(self, index: int) -> VringState:
        """VHOST_USER_GET_VRING_BASE: stop the ring and return its base."""
        msg = self._request(FrontendRequest.GET_VRING_BASE, VringState(index, 0).pack())
        with msg:
            state = VringState.unpack(msg.payload, "VHOST_USER_GET_VRING_BASE reply")
        if state.index != index:
            raise ProtocolError(f"VHOST_USER_GET_VRING_BASE for vring {index} answered for vring {state.index}")
        return state

    def _vring_fd(self, request: FrontendRequest, index: int, fd: int | None) -> None:
        self._request(request, VringFd(index, fd is None).pack(), [] if fd is None else [fd])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """VHOST_USER_SET_VRING_KICK: the eventfd we kick (None: no fd, the back-end polls or gets
        in-band VRING_KICK). Starts the ring."""
        self._vring_fd(FrontendRequest.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """VHOST_USER_SET_VRING_CALL: the eventfd the back-end signals (None: in-band VRING_CALL)."""
        self._vring_fd(FrontendRequest.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        """VHOST_USER_SET_VRING_ERR: the eventfd the back-end signals on a ring error."""
        self._vring_fd(FrontendRequest.SET_VRING_ERR, index, fd)

    def get_protocol_features(self) -> ProtocolFeature:
        """VHOST_USER_GET_PROTOCOL_FEATURES."""
        self.offered_protocol_features = ProtocolFeature(self._u64(FrontendRequest.GET_PROTOCOL_FEATURES))
        return self.offered_protocol_features

    def set_protocol_features(self, features: ProtocolFeature | int) -> None:
        """VHOST_USER_SET_PROTOCOL_FEATURES; later requests follow what it acked (REPLY_ACK...)."""
        self._u64(FrontendRequest.SET_PROTOCOL_FEATURES, int(features))
        self.protocol_features = ProtocolFeature(features)

    def get_queue_num(self) -> int:
        """VHOST_USER_GET_QUEUE_NUM (MQ): the most queues the back-end supports."""
        self.num_queues = self._u64(FrontendRequest.GET_QUEUE_NUM)
        return self.num_queues

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """VHOST_USER_SET_VRING_ENABLE (needs VHOST_USER_F_PROTOCOL_FEATURES acked)."""
        self._request(FrontendRequest.SET_VRING_ENABLE, VringState(index, int(bool(enable))).pack())

    def send_rarp(self, mac: bytes) -> None:
        """VHOST_USER_SEND_RARP (RARP): announce the guest's MAC after migration."""
        if len(mac) != 6:
            raise ValueError(f"a MAC address is 6 bytes, not {len(mac)}")
        self._request(FrontendRequest.SEND_RARP, bytes(mac) + bytes(2))

    def net_set_mtu(self, mtu: int) -> None:
        """VHOST_USER_NET_SET_MTU (NET_MTU)."""
        self._u64(FrontendRequest.NET_SET_MTU, mtu)

    def set_backend_req_fd(self, fd: int) -> None:
        """VHOST_USER_SET_BACKEND_REQ_FD (BACKEND_REQ): the back-end's end of its request channel."""
        self._request(FrontendRequest.SET_BACKEND_REQ_FD, b"", [fd])

    def iotlb_msg(self, msg: IotlbMsg) -> None:
        """VHOST_USER_IOTLB_MSG: an IOTLB update or invalidation (VIRTIO_F_ACCESS_PLATFORM)."""
        reply = self._request(FrontendRequest.IOTLB_MSG, msg.pack())
        with reply:
            value = reply.u64()
        if value:
            raise VhostError(f"VHOST_USER_IOTLB_MSG failed: the back-end answered {value:#x}", errno.EIO)

    def set_vring_endian(self, index: int, big_endian: bool) -> None:
        """VHOST_USER_SET_VRING_ENDIAN (CROSS_ENDIAN, legacy devices only)."""
        self._request(FrontendRequest.SET_VRING_ENDIAN, VringState(index, int(bool(big_endian))).pack())

    def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:
        """VHOST_USER_GET_CONFIG (CONFIG): ``size`` bytes of device config space at ``offset``.
        An empty reply is the back-end's refusal: NotSupportedError."""
        if size <= 0 or offset < 0 or offset + size > VHOST_USER_MAX_CONFIG_SIZE:
            raise ValueError(f"config access {offset}+{size} is outside 1..{VHOST_USER_MAX_CONFIG_SIZE} bytes")
        msg = self._request(FrontendRequest.GET_CONFIG, Config(offset, size, flags, bytes(size)).pack())
        with msg:
            if not msg.payload:
                raise NotSupportedError(f"the back-end refused VHOST_USER_GET_CONFIG of {size} bytes at offset "
                                        f"{offset}")
            config = Config.unpack(msg.payload, "VHOST_USER_GET_CONFIG reply")
        if (config.offset, config.size) != (offset, size):
            raise ProtocolError(f"VHOST_USER_GET_CONFIG of {size} bytes at {offset} answered with {config.size} "
                                f"bytes at {config.offset}")
        return config.data

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        """VHOST_USER_SET_CONFIG (CONFIG): write device config space (flags 1: migration)."""
        data = bytes(data)
        self._request(FrontendRequest.SET_CONFIG, Config(offset, len(data), flags, data).pack())

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[int, Inflight]:
        """VHOST_USER_GET_INFLIGHT_FD (INFLIGHT_SHMFD): the back-end's inflight region; the fd is
        the caller's."""
        msg = self._request(FrontendRequest.GET_INFLIGHT_FD, Inflight(0, 0, num_queues, queue_size).pack())
        with msg:
            inflight = Inflight.unpack(msg.payload, "VHOST_USER_GET_INFLIGHT_FD reply")
            return msg.take_fd(), inflight

    def set_inflight_fd(self, fd: int, inflight: Inflight) -> None:
        """VHOST_USER_SET_INFLIGHT_FD (INFLIGHT_SHMFD): hand an inflight region (back) to the back-end."""
        self._request(FrontendRequest.SET_INFLIGHT_FD, inflight.pack(), [fd])

    def reset_device(self) -> None:
        """VHOST_USER_RESET_DEVICE (RESET_DEVICE): the device starts over. Our rings are torn down
        (eventfds closed, ring memory freed: set them up again; driver queues from before are
        stale), SHMEM mappings are dropped as the spec asks, the status is forgotten."""
        self._request(FrontendRequest.RESET_DEVICE)
        self._drop_rings()
        for mapping in self.shmem_mappings.values():
            mapping.close()
        self.shmem_mappings.clear()
        self._status = None

    def vring_kick(self, index: int) -> None:
        """VHOST_USER_VRING_KICK (INBAND_NOTIFICATIONS): an in-band kick."""
        self._request(FrontendRequest.VRING_KICK, VringState(index, 0).pack())

    def get_max_mem_slots(self) -> int:
        """VHOST_USER_GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS)."""
        self.max_mem_slots = self._u64(FrontendRequest.GET_MAX_MEM_SLOTS)
        return self.max_mem_slots

    def set_status(self, status: int) -> None:
        """VHOST_USER_SET_STATUS (STATUS): the virtio device status (replayed by reconnect())."""
        self._u64(FrontendRequest.SET_STATUS, int(status))
        self._status = int(status)

    def get_status(self) -> DeviceStatus:
        """VHOST_USER_GET_STATUS (STATUS)."""
        return DeviceStatus(self._u64(FrontendRequest.GET_STATUS))

    def get_shared_object(self, uuid: uuid_module.UUID) -> int:
        """VHOST_USER_GET_SHARED_OBJECT (SHARED_OBJECT): the dma-buf fd of an object this back-end
        exported (the caller closes it). VhostError when the back-end has none."""
        msg = self._request(FrontendRequest.GET_SHARED_OBJECT, SharedObject(uuid).pack())
        with msg:
            value, fd = msg.u64(), msg.take_fd()
        if value or fd is None:
            if fd is not None:
                os.close(fd)
            raise VhostError(f"VHOST_USER_GET_SHARED_OBJECT {uuid}: the back-end answered {value:#x} "
                             f"{'with' if fd is not None else 'without'} an fd", errno.ENOENT)
        return fd

    def set_device_state_fd(self, direction: int, phase: int, fd: int) -> int | None:
        """VHOST_USER_SET_DEVICE_STATE_FD (DEVICE_STATE): start a state transfer over ``fd`` (a
        pipe end). Returns the back-end's own fd to use instead (the caller's), or None."""
        msg = self._request(FrontendRequest.SET_DEVICE_STATE_FD, DeviceState(direction, phase).pack(), [fd])
        with msg:
            value, theirs = msg.u64(), msg.take_fd()
        if value & VHOST_USER_DEVICE_STATE_ERROR_MASK:
            raise VhostError(f"VHOST_USER_SET_DEVICE_STATE_FD: the back-end answered {value:#x} (failure)", errno.EIO)
        return theirs

    def check_device_state(self) -> None:
        """VHOST_USER_CHECK_DEVICE_STATE (DEVICE_STATE): did the transfer succeed? VhostError if not."""
        value = self._u64(FrontendRequest.CHECK_DEVICE_STATE)
        if value:
            reason = os.strerror(value) if value < 4096 else "failure"     # our back-ends answer an errno
            raise VhostError(f"VHOST_USER_CHECK_DEVICE_STATE: the back-end answered {value:#x} ({reason}): the "
                             f"state transfer failed (the back-end's log says why)", errno.EIO)

    def get_shmem_config(self) -> ShmemConfig:
        """VHOST_USER_GET_SHMEM_CONFIG (SHMEM): the size of each VIRTIO shared memory region by shmid."""
        msg = self._request(FrontendRequest.GET_SHMEM_CONFIG)
        with msg:
            self.shmem_config = ShmemConfig.unpack(msg.payload, "VHOST_USER_GET_SHMEM_CONFIG reply")
        return self.shmem_config

    # -- negotiation -----------------------------------------------------------------------------
    def negotiate(self, features: int | None = None, protocol_features: int | None = None) -> Negotiated:
        """GET_FEATURES, SET_OWNER, GET/SET_PROTOCOL_FEATURES, then what the acked protocol features
        call for (GET_QUEUE_NUM, GET_MAX_MEM_SLOTS, SET_BACKEND_REQ_FD, GET_SHMEM_CONFIG), and
        SET_FEATURES last.

        ``features``: the virtio features wanted (device bits included; default
        FRONTEND_FEATURES); VHOST_USER_F_PROTOCOL_FEATURES is always taken when offered.
        ``protocol_features``: default FRONTEND_PROTOCOL_FEATURES; anything outside
        FRONTEND_PROTOCOL_FEATURES | OPTIONAL_PROTOCOL_FEATURES is dropped. Both end up as the
        intersection with what the back-end offers.
        """
        self._wanted = (features, protocol_features)
        self.features, self.protocol_features = None, ProtocolFeature(0)    # a new connection starts bare
        offered = self.get_features()
        self.set_owner()
        wanted = FRONTEND_FEATURES if features is None else features
        acked = offered & (wanted | VHOST_USER_F_PROTOCOL_FEATURES)
        self.num_queues = self.max_mem_slots = self.shmem_config = None
        if offered & VHOST_USER_F_PROTOCOL_FEATURES:
            supported = FRONTEND_PROTOCOL_FEATURES | OPTIONAL_PROTOCOL_FEATURES
            want = FRONTEND_PROTOCOL_FEATURES if protocol_features is None else protocol_features & supported
            self.set_protocol_features(self.get_protocol_features() & want)
            proto = self.protocol_features
            if proto & ProtocolFeature.MQ:
                self.get_queue_num()
            if proto & ProtocolFeature.CONFIGURE_MEM_SLOTS:
                self.get_max_mem_slots()
            if proto & ProtocolFeature.BACKEND_REQ:
                self._open_backend_channel()
            if proto & ProtocolFeature.SHMEM:
                self.get_shmem_config()
        self.set_features(int(acked))
        return Negotiated(int(self.features), self.protocol_features, self.num_queues, self.max_mem_slots)

    def _open_backend_channel(self) -> None:
        ours, theirs = Connection.pair(requests=BackendRequest)
        try:
            self.set_backend_req_fd(theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.sock.settimeout(self.timeout)
        if self._channel is not None:
            self._channel.close()
        self._channel = ours

    def _need_features(self) -> int:
        if self.features is None:
            raise VhostError("negotiate() first: no features acked yet", errno.EINVAL)
        return self.features

    # -- guest memory ----------------------------------------------------------------------------
    def setup_memory(self, size: int, regions: int = 1, *, base_gpa: int = 0) -> GuestMemory:
        """Create ``size`` bytes of guest memory in ``regions`` memfd regions (each page-rounded,
        contiguous from ``base_gpa``), map them here and send them: ADD_MEM_REG per region when
        CONFIGURE_MEM_SLOTS is negotiated, else one SET_MEM_TABLE (at most 8 regions)."""
        if self.memory is not None:
            raise VhostError("guest memory is already set up (add_memory_region() adds more)", errno.EEXIST)
        if regions < 1 or size < regions:
            raise ValueError(f"{size} bytes cannot make {regions} regions")
        self._check_region_count(regions)
        each = _round_up(-(-size // regions), mmap.PAGESIZE)
        memory = GuestMemory(max_regions=max(regions, self.max_mem_slots or 0, VHOST_MEMORY_BASELINE_NREGIONS))
        created: list[GuestRegion] = []
        try:
            for i in range(regions):
                region = GuestRegion(base_gpa + i * each, each)
                created.append(region)
                memory.add_region(region.gpa, region.size, buffer=region.mapping, uva=region.uva)
        except BaseException:
            memory.clear()
            for region in created:
                region.close()
            raise
        self.memory, self.regions = memory, created
        for region in created:
            self._alloc.add_range(region.gpa, region.gpa + region.size)
        self._send_memory()
        return memory

    def _check_region_count(self, count: int) -> None:
        if self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            if self.max_mem_slots is not None and count > self.max_mem_slots:
                raise VhostError(f"{count} memory regions, but the back-end has {self.max_mem_slots} slots",
                                 errno.ENOSPC)
        elif count > VHOST_MEMORY_BASELINE_NREGIONS:
            raise VhostError(f"{count} memory regions need CONFIGURE_MEM_SLOTS (SET_MEM_TABLE carries at most "
                             f"{VHOST_MEMORY_BASELINE_NREGIONS})", errno.ENOSPC)

    def _send_memory(self) -> None:
        if self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            for region in self.regions:
                self.add_mem_reg(region.wire, region.fd)
        else:
            self.set_mem_table([r.wire for r in self.regions], [r.fd for r in self.regions])

    def add_memory_region(self, size: int) -> GuestRegion:
        """Hot-add a region after the highest one: ADD_MEM_REG, or a new SET_MEM_TABLE."""
        if self.memory is None:
            raise VhostError("setup_memory() first", errno.EINVAL)
        self._check_region_count(len(self.regions) + 1)
        gpa = max(r.gpa + r.size for r in self.regions)
        region = GuestRegion(gpa, _round_up(size, mmap.PAGESIZE))
        try:
            self.memory.add_region(region.gpa, region.size, buffer=region.mapping, uva=region.uva)
        except BaseException:
            region.close()
            raise
        self.regions.append(region)
        self._alloc.add_range(region.gpa, region.gpa + region.size)
        if self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
            self.add_mem_reg(region.wire, region.fd)
        else:
            self._send_memory()
        return region

    def remove_memory_region(self, gpa: int) -> None:
        """Hot-remove the (unused) region starting at ``gpa``: REM_MEM_REG, or a new SET_MEM_TABLE."""
        region = next((r for r in self.regions if r.gpa == gpa), None)
        if region is None or self.memory is None:
            raise GuestMemoryError(f"no region starts at {gpa:#x}")
        self._alloc.remove_range(region.gpa, region.gpa + region.size)
        self.regions.remove(region)
        try:
            if self.protocol_features & ProtocolFeature.CONFIGURE_MEM_SLOTS:
                self.rem_mem_reg(region.wire)
            else:
                self._send_memory()
        finally:
            self.memory.remove_region(region.gpa, region.size)
            region.close()

    def alloc(self, size: int, align: int = 16) -> int:
        """Allocate ``size`` bytes of guest memory (for data buffers); returns its guest address."""
        if self.memory is None:
            raise VhostError("setup_memory() first", errno.EINVAL)
        return self._alloc.alloc(size, align)

    def free(self, gpa: int) -> None:
        """Give back an allocation made by alloc()."""
        self._alloc.free(gpa)

    def _address(self, gpa: int) -> int:
        """What a ring address is on the wire: our user address, or the IOVA (= GPA) with ACCESS_PLATFORM."""
        if (self.features or 0) & VirtioFeature.VIRTIO_F_ACCESS_PLATFORM:
            return gpa
        region = self.memory.region_at(gpa)
        return region.uva + (gpa - region.gpa)

    # -- rings -----------------------------------------------------------------------------------
    def setup_queue(self, index: int, size: int, *, packed: bool | None = None, event_idx: bool | None = None,
                    indirect_max: int = 0, enable: bool = True):
        """Lay out virtqueue ``index`` in guest memory and program it: SET_VRING_NUM, SET_VRING_BASE,
        SET_VRING_ADDR, SET_VRING_CALL, SET_VRING_ERR, SET_VRING_KICK and (PROTOCOL_FEATURES)
        SET_VRING_ENABLE. Returns the driver queue (vring.SplitDriverQueue or
        packed.PackedDriverQueue); add chains to it, then publish(index) / wait_call(index).

        The ring format follows the negotiated features, which hold for every ring of the device:
        VIRTIO_F_RING_PACKED and VIRTIO_F_EVENT_IDX; ``packed`` / ``event_idx`` may only confirm them."""
        features = self._need_features()
        if self.memory is None:
            raise VhostError("setup_memory() before setup_queue()", errno.EINVAL)
        if index in self._rings:
            raise VhostError(f"vring {index} is already set up", errno.EEXIST)
        limit = self.num_queues if self.num_queues is not None else 256
        if not 0 <= index < min(limit, 256):
            raise ValueError(f"vring index {index} is outside 0..{min(limit, 256) - 1}")
        negotiated_packed = bool(features & VirtioFeature.VIRTIO_F_RING_PACKED)
        if packed is None:
            packed = negotiated_packed
        elif packed and not negotiated_packed:
            raise NotNegotiatedError("a packed ring needs VIRTIO_F_RING_PACKED, which was not negotiated")
        elif not packed and negotiated_packed:
            raise VhostError("VIRTIO_F_RING_PACKED was negotiated: every ring of the device is packed", errno.EINVAL)
        negotiated_event_idx = bool(features & VirtioFeature.VIRTIO_F_EVENT_IDX)
        if event_idx is None:
            event_idx = negotiated_event_idx
        elif event_idx and not negotiated_event_idx:
            raise NotNegotiatedError("event_idx needs VIRTIO_F_EVENT_IDX, which was not negotiated")
        elif not event_idx and negotiated_event_idx:
            raise VhostError("VIRTIO_F_EVENT_IDX was negotiated: every ring of the device uses it", errno.EINVAL)
        if indirect_max and not features & VirtioFeature.VIRTIO_F_INDIRECT_DESC:
            raise NotNegotiatedError("indirect descriptors need VIRTIO_F_INDIRECT_DESC, which was not negotiated")
        if packed:
            from .packed import PackedDriverQueue as cls
        else:
            from .vring import SplitDriverQueue as cls
        need = cls.layout(size, 0, indirect_max)["end"]
        area = self._alloc.alloc(need, _RING_ALIGN)
        ring = None
        try:
            parts = cls.layout(size, area, indirect_max)
            queue = cls(self.memory, size, parts["desc"], parts["driver"], parts["device"], event_idx=event_idx,
                        indirect_area=parts["indirect"], indirect_max=indirect_max)
            ring = _Ring(index, size, packed, event_idx, area, parts["desc"], parts["driver"], parts["device"], queue)
            ring.kick = os.eventfd(0, _EFD_FLAGS)
            ring.call = os.eventfd(0, _EFD_FLAGS)
            ring.err = os.eventfd(0, _EFD_FLAGS)
            self._rings[index] = ring
            self._program(ring, queue.get_base(), enable)
        except BaseException:
            self._rings.pop(index, None)
            if ring is not None:
                ring.close_fds()
            self._alloc.free(area)
            raise
        return queue

    def _vring_addr(self, ring: _Ring) -> VringAddr:
        flags = VHOST_VRING_F_LOG if self._log is not None else 0
        return VringAddr(ring.index, flags, self._address(ring.desc), self._address(ring.device),
                         self._address(ring.driver), ring.device)

    def _program(self, ring: _Ring, base: int, enable: bool = True) -> None:
        i = ring.index
        self.set_vring_num(i, ring.size)
        self.set_vring_base(i, base)
        self.set_vring_addr(self._vring_addr(ring))
        self.set_vring_call(i, ring.call)
        self.set_vring_err(i, ring.err)
        self.set_vring_kick(i, ring.kick)
        ring.started, ring.base = True, None
        if enable and (self.features or 0) & VHOST_USER_F_PROTOCOL_FEATURES:
            self.set_vring_enable(i, True)

    def queue(self, index: int):
        """The driver queue of vring ``index``."""
        return self._ring(index).queue

    def _ring(self, index: int) -> _Ring:
        ring = self._rings.get(index)
        if ring is None:
            raise VhostError(f"vring {index} is not set up", errno.EINVAL)
        return ring

    def kick(self, index: int) -> None:
        """Signal the kick eventfd of vring ``index``."""
        os.eventfd_write(self._ring(index).kick, 1)

    def publish(self, index: int) -> bool:
        """Publish what was added to vring ``index`` and kick if the device wants it; True if kicked."""
        ring = self._ring(index)
        if ring.queue.publish():
            os.eventfd_write(ring.kick, 1)
            return True
        return False

    def wait_call(self, index: int, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` (default: the front-end's) for vring ``index`` to be signalled, by
        its call eventfd or an in-band BACKEND_VRING_CALL; back-end requests are served meanwhile.
        True when signalled, False on timeout. VhostError when the back-end signals the ring's
        error eventfd (or BACKEND_VRING_ERR); DisconnectedError when the back-end hangs up."""
        ring = self._ring(index)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if ring.inband_errors:
                ring.inband_errors = 0
                raise VhostError(f"vring {index}: the back-end signalled an error (VHOST_USER_BACKEND_VRING_ERR)",
                                 errno.EIO)
            if ring.inband_calls:
                ring.inband_calls = 0
                return True
            poller = select.poll()
            poller.register(ring.call, select.POLLIN)
            poller.register(ring.err, select.POLLIN)
            channel, conn = self._channel, self._conn
            if channel is not None:
                poller.register(channel.fileno(), select.POLLIN)
            if conn is not None and not conn.closed:
                poller.register(conn.fileno(), 0)       # POLLHUP only: the back-end went away
            ready = dict(poller.poll(max(deadline - time.monotonic(), 0) * 1000))
            if ring.err in ready and _drain_eventfd(ring.err):
                ring.errors += 1
                raise VhostError(f"vring {index}: the back-end signalled an error (SET_VRING_ERR eventfd)", errno.EIO)
            if ring.call in ready and _drain_eventfd(ring.call):
                return True
            if channel is not None and channel.fileno() in ready:
                with self._lock:
                    self._serve_channel()
                continue
            if conn is not None and ready.get(conn.fileno(), 0) & (select.POLLHUP | select.POLLERR):
                raise self._fail(DisconnectedError("the back-end closed the connection"))
            if time.monotonic() >= deadline:
                return False

    def stop(self) -> dict[int, int]:
        """GET_VRING_BASE on every started ring (which stops it); returns {index: base}, also kept
        for resume() and reconnect()."""
        bases = {}
        for index, ring in sorted(self._rings.items()):
            if ring.started:
                ring.base = self.get_vring_base(index).num
                ring.started = False
            if ring.base is not None:
                bases[index] = ring.base
        return bases

    def resume(self) -> None:
        """Program every stopped ring again from its saved base (after stop()) and kick it."""
        for ring in sorted(self._rings.values(), key=lambda r: r.index):
            if not ring.started:
                self._program(ring, ring.base if ring.base is not None else self._resume_base(ring))
                self.kick(ring.index)

    def _resume_base(self, ring: _Ring) -> int:
        """Where a back-end that lost its state resumes: from the last chain it used, so chains it
        had not used are offered again (what QEMU does). Split: used.idx as it is in guest memory;
        unless the back-end has the inflight region to resubmit from, the chains it did not use
        are first published again from there in their order (SplitDriverQueue.requeue_unused), so
        one completed out of order neither hides a pending one nor runs twice.
        Packed: the driver's reaped position, as both the avail and the used position (reap
        before reconnecting for an exact one)."""
        if ring.packed:
            from .packed import decode_base, encode_base
            _avail, _avail_wrap, used, used_wrap = decode_base(ring.queue.get_base())
            return encode_base(used, used_wrap, used, used_wrap)
        used = int.from_bytes(self.memory.read(ring.device + 2, 2), "little")
        if self._inflight is not None and self.protocol_features & ProtocolFeature.INFLIGHT_SHMFD:
            return used
        return ring.queue.requeue_unused(used)

    # -- inflight, dirty log, device state -------------------------------------------------------
    def setup_inflight(self, num_queues: int, queue_size: int) -> Inflight:
        """GET_INFLIGHT_FD then SET_INFLIGHT_FD, as QEMU does before starting the rings; the fd is
        kept and handed to a restarted back-end by reconnect(). Call before setup_queue()."""
        fd, inflight = self.get_inflight_fd(num_queues, queue_size)
        try:
            self.set_inflight_fd(fd, inflight)
        except BaseException:
            os.close(fd)
            raise
        if self._inflight is not None:
            os.close(self._inflight[0])
        self._inflight = (fd, inflight)
        return inflight

    def start_dirty_log(self) -> DirtyLog:
        """Start dirty logging: a memfd bitmap for all guest memory (SET_LOG_BASE), VHOST_F_LOG_ALL
        (SET_FEATURES) and VHOST_VRING_F_LOG on every ring (SET_VRING_ADDR). Returns the bitmap."""
        features = self._need_features()
        if not (self.offered_features or 0) & VHOST_F_LOG_ALL:
            raise NotNegotiatedError("dirty logging needs VHOST_F_LOG_ALL, which the back-end does not offer")
        if self.memory is None:
            raise VhostError("setup_memory() first", errno.EINVAL)
        if self._log is not None:
            return self._log[2]
        pages = -(-max(r.gpa + r.size for r in self.regions) // VHOST_LOG_PAGE)
        size = _round_up(-(-pages // 8), mmap.PAGESIZE)
        fd = os.memfd_create("vhost_min-dirty-log", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self.set_log_base(fd, size, 0)
            self._log = (fd, size, DirtyLog.from_fd(fd, size))
        except BaseException:
            os.close(fd)
            raise
        self.set_features(features | VHOST_F_LOG_ALL)
        for ring in self._rings.values():
            if ring.started:
                self.set_vring_addr(self._vring_addr(ring))
        return self._log[2]

    def stop_dirty_log(self) -> None:
        """Switch logging off again (SET_FEATURES without VHOST_F_LOG_ALL, ring log flags cleared)."""
        if self._log is None:
            return
        self._close_log()
        self.set_features(self._need_features() & ~VHOST_F_LOG_ALL)
        for ring in self._rings.values():
            if ring.started:
                self.set_vring_addr(self._vring_addr(ring))

    def _close_log(self) -> None:
        fd, _size, dirty = self._log
        self._log = None
        dirty.close()
        os.close(fd)

    def save_device_state(self) -> bytes:
        """Migration source: SET_DEVICE_STATE_FD (save, stopped phase) over a pipe, read to EOF,
        CHECK_DEVICE_STATE. The rings must be stopped (stop()) first."""
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                theirs = self.set_device_state_fd(VHOST_TRANSFER_STATE_DIRECTION_SAVE,
                                                  VHOST_TRANSFER_STATE_PHASE_STOPPED, w)
            finally:
                os.close(w)
            if theirs is not None:
                os.close(r)
                r = theirs
            chunks = []
            while True:
                if not _wait_readable(r, self.timeout):
                    raise VhostError(f"device state: no data from the back-end within {self.timeout} s",
                                     errno.ETIMEDOUT)
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            os.close(r)
        self.check_device_state()
        return b"".join(chunks)

    def load_device_state(self, data: bytes) -> None:
        """Migration destination: SET_DEVICE_STATE_FD (load) over a pipe, write ``data``, EOF,
        CHECK_DEVICE_STATE."""
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                theirs = self.set_device_state_fd(VHOST_TRANSFER_STATE_DIRECTION_LOAD,
                                                  VHOST_TRANSFER_STATE_PHASE_STOPPED, r)
            finally:
                os.close(r)
            if theirs is not None:
                os.close(w)
                w = theirs
            view = memoryview(bytes(data))
            while view:
                poller = select.poll()
                poller.register(w, select.POLLOUT)
                if not poller.poll(self.timeout * 1000):
                    raise VhostError(f"device state: the back-end stopped reading for {self.timeout} s",
                                     errno.ETIMEDOUT)
                view = view[os.write(w, view):]
        finally:
            os.close(w)
        self.check_device_state()

    # -- reconnect -------------------------------------------------------------------------------
    def reconnect(self, timeout: float | None = None) -> Negotiated:
        """After the back-end restarted (a new listener on the same path): connect again (retrying
        for up to ``timeout``), redo the handshake and replay the state: the inflight fd
        (SET_INFLIGHT_FD), the memory table, every ring from its saved base (stop()) or, for a
        back-end that died, the used index in guest memory, its eventfds and enable; the device
        status and the dirty log (the same bitmap) if set. Each ring is kicked once at the end so
        the back-end looks at what is pending. A back-end that hangs up during all this (one still
        exiting when we connected, or dying again) is tried again until ``timeout``. The virtio
        features must come out as before (ProtocolError otherwise)."""
        if self.path is None:
            raise VhostError("reconnect() needs a front-end made by Frontend.connect(path)", errno.EINVAL)
        with self._lock:
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            before = self.features
            while True:
                self._drop_connection()
                try:
                    return self._attach(deadline, before)
                except DisconnectedError as exc:
                    if time.monotonic() >= deadline:
                        raise
                    # A ring programmed in the lost session resumes from its used index next time.
                    log.info("%s: the back-end hung up during the reconnect handshake (%s); trying again",
                             self.path, exc)
                    time.sleep(0.02)

    def migrate(self, path: str | os.PathLike, timeout: float | None = None) -> Negotiated:
        """Move the device to the back-end listening on ``path`` (another process on the same
        image), as a live migration's switch-over does: stop every ring here (GET_VRING_BASE: the
        back-end completes what it holds and says where each ring stands), save the device state
        (DEVICE_STATE, when negotiated), connect to ``path`` and replay as :meth:`reconnect` does,
        loading the state before any ring starts, then start each ring from its base. The source
        stays connected, stopped, until the destination runs; a destination that fails is dropped,
        the source resumed and the error raised. On success the source connection is closed."""
        path = os.fspath(path)
        with self._lock:
            bases = self.stop()
            try:
                state = (self.save_device_state() if self.protocol_features & ProtocolFeature.DEVICE_STATE
                         else None)
            except BaseException:
                self.resume()
                raise
            source = (self._conn, self._channel, self.path, self._wanted, self.features, self.protocol_features,
                      self.num_queues, self.max_mem_slots, self.shmem_config)
            self._conn = self._channel = None
            self._deferred.clear()
            self.path = path
            try:
                deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
                result = self._attach(deadline, source[4], state)
            except BaseException:
                self._drop_connection()
                (self._conn, self._channel, self.path, self._wanted, self.features, self.protocol_features,
                 self.num_queues, self.max_mem_slots, self.shmem_config) = source
                for index, ring in self._rings.items():    # some may have been started on the destination
                    ring.started, ring.base = False, bases.get(index)
                self.resume()
                raise
            for conn in source[:2]:
                if conn is not None:
                    conn.close()
            return result

    def _connect_again(self, deadline: float) -> None:
        """The new main connection, retried while nothing listens on the path yet (until ``deadline``)."""
        while True:
            try:
                sock = _connect_socket(self.path, self.timeout)
                break
            except VhostError as exc:
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
        try:
            self._conn = Connection(sock)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(self.timeout)

    def _attach(self, deadline: float, before: int | None, state: bytes | None = None) -> Negotiated:
        """Connect to :attr:`path` (retrying until ``deadline``), negotiate the features ``before``
        (what was acked last time) and replay everything; ``state``: a device state to load before
        the rings start."""
        self._connect_again(deadline)
        wanted_features, wanted_protocol = self._wanted or (None, None)
        if before is not None:
            wanted_features = before & ~VHOST_F_LOG_ALL
        result = self.negotiate(wanted_features, wanted_protocol)
        if before is not None and result.features != before & ~VHOST_F_LOG_ALL:
            lost = before & ~VHOST_F_LOG_ALL & ~result.features
            raise self._fail(ProtocolError(f"the restarted back-end acked features {result.features:#x}, not "
                                           f"{before & ~VHOST_F_LOG_ALL:#x} as before (lost: "
                                           f"{', '.join(feature_names(lost)) or 'none'})"))
        if self._log is not None:                     # the same bitmap: no dirty bit is lost
            fd, size, _dirty = self._log
            self.set_log_base(fd, size, 0)
            self.set_features(self.features | VHOST_F_LOG_ALL)
        if self._inflight is not None and self.protocol_features & ProtocolFeature.INFLIGHT_SHMFD:
            self.set_inflight_fd(*self._inflight)
        if self.memory is not None:
            self._check_region_count(len(self.regions))
            self._send_memory()
        if state is not None:
            if not self.protocol_features & ProtocolFeature.DEVICE_STATE:
                raise ProtocolError(f"{self.path} does not offer DEVICE_STATE: the source's device state "
                                    f"({len(state)} bytes) has nowhere to go")
            self.load_device_state(state)
        if self._status is not None and self.protocol_features & ProtocolFeature.STATUS:
            self.set_status(self._status)
        for ring in sorted(self._rings.values(), key=lambda r: r.index):
            base = ring.base if ring.base is not None else self._resume_base(ring)
            self._program(ring, base)
        for ring in self._rings.values():
            self.kick(ring.index)
        return result

    # -- probe -----------------------------------------------------------------------------------
    def probe(self, config_size: int | Callable[[int], Sequence[int]] | None = None,
              device_features: type[enum.IntFlag] | None = None) -> ProbeResult:
        """A read-only summary of the back-end, for ``vhost-min probe``.

        "As it found it" means: no SET_OWNER (the connection never claims the device), no
        SET_FEATURES, no memory, no rings, no back-end channel. What it sends: GET_FEATURES,
        GET_PROTOCOL_FEATURES, and SET_PROTOCOL_FEATURES with exactly the bits its queries need
        (MQ, CONFIGURE_MEM_SLOTS, CONFIG — per-connection state a back-end drops when the
        connection closes), then GET_QUEUE_NUM, GET_MAX_MEM_SLOTS and GET_CONFIG. The config size
        is not on the wire: ``config_size`` says it, or is a function of the offered features giving
        the sizes to try in order (the device type's layout: no request the back-end must refuse);
        with None, or when every size is refused, the largest size the back-end accepts (at most
        256) is found by halving, which a back-end may log as refused requests. Note one-shot back-ends (the C virtiofsd) exit when this
        connection closes, as they do for any front-end. Only on a fresh connection.
        """
        if self.features is not None:
            raise VhostError("probe() needs a fresh connection (this one has negotiated already)", errno.EINVAL)
        features = self.get_features()
        proto = None
        num_queues = max_slots = config = None
        if features & VHOST_USER_F_PROTOCOL_FEATURES:
            proto = self.get_protocol_features()
            self.set_protocol_features(proto & PROBE_PROTOCOL_FEATURES)
            if proto & ProtocolFeature.MQ:
                num_queues = self.get_queue_num()
            if proto & ProtocolFeature.CONFIGURE_MEM_SLOTS:
                max_slots = self.get_max_mem_slots()
            if proto & ProtocolFeature.CONFIG:
                config = self._probe_config(config_size(features) if callable(config_size) else config_size)
        return ProbeResult(features, feature_names(features, device_features), proto,
                           protocol_feature_names(proto or 0), num_queues, max_slots, config)

    def _probe_config(self, size: int | Sequence[int] | None) -> bytes | None:
        def attempt(n: int) -> bytes | None:
            try:
                return self.get_config(0, n)
            except NotSupportedError:
                return None

        if isinstance(size, int):
            return attempt(size)
        for candidate in size or ():
            data = attempt(candidate)
            if data is not None:
                return data
        data = attempt(VHOST_USER_MAX_CONFIG_SIZE)
        if data is not None:
            return data
        lo, hi, best = 0, VHOST_USER_MAX_CONFIG_SIZE, None      # lo: accepted (0 trivially), hi: refused
        while hi - lo > 1:
            mid = (lo + hi) // 2
            data = attempt(mid)
            if data is None:
                hi = mid
            else:
                lo, best = mid, data
        return best

    # -- the back-end-request channel ------------------------------------------------------------
    def handle_backend_request(self) -> bool:
        """Read and answer one back-end request (call when fileno() is readable). False when there
        is no channel (any more): the back-end closed it."""
        with self._lock:
            return self._serve_channel()

    def _serve_channel(self) -> bool:
        channel = self._channel
        if channel is None:
            return False
        try:
            msg = channel.recv()
        except DisconnectedError:
            self._close_channel()
            return False
        except TimeoutError:
            self._close_channel()
            log.warning("back-end request channel: a message stalled midway for %s s; channel closed", self.timeout)
            return False
        except ProtocolError as exc:
            self._close_channel()
            log.warning("back-end request channel closed: %s", exc)
            return False
        reply_fds: list[int] = []
        with msg:
            try:
                spec = check_message(msg, BACKEND_REQUESTS, self.protocol_features)
            except ProtocolError as exc:
                log.warning("back-end request rejected: %s", exc)
                if msg.need_reply:
                    self._answer(channel, msg, errno.EINVAL)
                return True
            try:
                value, reply_fds = self._backend_handlers[spec.request](self, msg)
            except VhostError as exc:
                log.warning("%s failed: %s", spec.name, exc)
                value = exc.errno or errno.EIO
            except Exception:                       # a user callback's bug must not kill the channel
                log.exception("%s handler raised", spec.name)
                value = errno.EIO
            try:
                if spec.reply_due(msg.flags):
                    self._answer(channel, msg, value, reply_fds)
            finally:
                for fd in reply_fds:
                    os.close(fd)
        return True

    def _answer(self, channel: Connection, msg: Message, value: int, fds: Sequence[int] = ()) -> None:
        try:
            channel.send(msg.request, U64.pack(value), fds, reply=True)
        except (VhostError, OSError) as exc:
            log.warning("cannot answer %s: %s", msg.name, exc)
            self._close_channel()

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    # Handlers: (self, msg) -> (u64 answer, fds to send with it). Each takes what fds it keeps.
    def _on_iotlb(self, msg: Message) -> tuple[int, list[int]]:
        iotlb = IotlbMsg.unpack(msg.payload, msg.name)
        if self.on_iotlb_msg is not None:
            self.on_iotlb_msg(iotlb)
            return 0, []
        if iotlb.type == VHOST_IOTLB_ACCESS_FAIL:
            log.warning("back-end reports an IOTLB access failure at IOVA %#x", iotlb.iova)
            return 0, []
        if iotlb.type != VHOST_IOTLB_MISS or self.memory is None:
            raise NotSupportedError(f"IOTLB message type {iotlb.type} is not handled")
        region = self.memory.region_at(iotlb.iova)          # identity IOMMU: IOVA = GPA
        update = IotlbMsg(region.gpa, region.size, region.uva, VHOST_ACCESS_RW, VHOST_IOTLB_UPDATE)
        if self._in_request:
            self._deferred.append(lambda: self.iotlb_msg(update))
        else:
            self.iotlb_msg(update)
        return 0, []

    def _on_config_change(self, msg: Message) -> tuple[int, list[int]]:
        self.config_changes += 1
        if self.on_config_change is not None:
            self.on_config_change()
        return 0, []

    def _on_vring_call(self, msg: Message) -> tuple[int, list[int]]:
        index = VringState.unpack(msg.payload, msg.name).index
        ring = self._ring(index)
        ring.inband_calls += 1
        if self.on_vring_call is not None:
            self.on_vring_call(index)
        return 0, []

    def _on_vring_err(self, msg: Message) -> tuple[int, list[int]]:
        index = VringState.unpack(msg.payload, msg.name).index
        ring = self._ring(index)
        ring.errors += 1
        ring.inband_errors += 1
        if self.on_vring_err is not None:
            self.on_vring_err(index)
        return 0, []

    def _on_shared_add(self, msg: Message) -> tuple[int, list[int]]:
        self.shared_objects.add_backend(SharedObject.unpack(msg.payload, msg.name).uuid, self)
        return 0, []

    def _on_shared_remove(self, msg: Message) -> tuple[int, list[int]]:
        found = self.shared_objects.remove(SharedObject.unpack(msg.payload, msg.name).uuid, self)
        return (0 if found else errno.ENOENT), []

    def _on_shared_lookup(self, msg: Message) -> tuple[int, list[int]]:
        uuid = SharedObject.unpack(msg.payload, msg.name).uuid
        if self._in_request and self.shared_objects.owner(uuid) is self:
            return errno.EBUSY, []          # our own main channel is busy waiting for a reply
        fd = self.shared_objects.lookup(uuid)
        return (0, [fd]) if fd is not None else (errno.ENOENT, [])

    def _on_shmem_map(self, msg: Message) -> tuple[int, list[int]]:
        m = ShmemMap.unpack(msg.payload, msg.name)
        fd = msg.take_fd()
        try:
            sizes = self.shmem_config.memory_sizes if self.shmem_config is not None else ()
            limit = sizes[m.shmid] if m.shmid < len(sizes) else 0
            if not m.len or m.shm_offset + m.len > limit:
                raise VhostError(f"SHMEM_MAP of {m.len:#x} bytes at {m.shm_offset:#x} does not fit shared memory "
                                 f"region {m.shmid} ({limit:#x} bytes)", errno.EINVAL)
            for (shmid, offset), mapping in self.shmem_mappings.items():
                if shmid == m.shmid and offset < m.shm_offset + m.len and m.shm_offset < offset + len(mapping):
                    raise VhostError(f"SHMEM_MAP at {m.shm_offset:#x} overlaps the mapping at {offset:#x}",
                                     errno.EEXIST)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if m.flags & VHOST_USER_FLAG_MAP_RW else 0)
            try:
                mapping = mmap.mmap(fd, m.len, mmap.MAP_SHARED, prot, offset=m.fd_offset)
            except (OSError, ValueError, OverflowError) as exc:     # OverflowError: beyond off_t / size_t
                raise VhostError(f"SHMEM_MAP: cannot map {m.len:#x} bytes at fd offset {m.fd_offset:#x}: {exc}",
                                 getattr(exc, "errno", None) or errno.EINVAL) from None
            self.shmem_mappings[(m.shmid, m.shm_offset)] = mapping
        finally:
            os.close(fd)
        return 0, []

    def _on_shmem_unmap(self, msg: Message) -> tuple[int, list[int]]:
        m = ShmemMap.unpack(msg.payload, msg.name)
        mapping = self.shmem_mappings.get((m.shmid, m.shm_offset))
        if mapping is None or len(mapping) != m.len:
            raise VhostError(f"SHMEM_UNMAP: no mapping of {m.len:#x} bytes at {m.shm_offset:#x} in region {m.shmid}",
                             errno.ENOENT)
        del self.shmem_mappings[(m.shmid, m.shm_offset)]
        mapping.close()
        return 0, []

    def _on_host_notifier(self, msg: Message) -> tuple[int, list[int]]:
        raise NotSupportedError("host notifiers are not supported")

    _backend_handlers = {
        BackendRequest.IOTLB_MSG: _on_iotlb,
        BackendRequest.CONFIG_CHANGE_MSG: _on_config_change,
        BackendRequest.VRING_HOST_NOTIFIER_MSG: _on_host_notifier,
        BackendRequest.VRING_CALL: _on_vring_call,
        BackendRequest.VRING_ERR: _on_vring_err,
        BackendRequest.SHARED_OBJECT_ADD: _on_shared_add,
        BackendRequest.SHARED_OBJECT_REMOVE: _on_shared_remove,
        BackendRequest.SHARED_OBJECT_LOOKUP: _on_shared_lookup,
        BackendRequest.SHMEM_MAP: _on_shmem_map,
        BackendRequest.SHMEM_UNMAP: _on_shmem_unmap,
    }


def _wait_readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(timeout, 0) * 1000))


def _drain_eventfd(fd: int) -> bool:
    """Consume an eventfd's count; False if it was already drained (a spurious wake-up)."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        return False
    return True
