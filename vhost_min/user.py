"""vhost-user: the wire format and the connection that carries it.

Read top to bottom: constants and enums (request codes, protocol feature bits), payload layouts,
the per-request table (payload shape, fds, feature gate, reply), the message header, and the
AF_UNIX connection that moves messages and SCM_RIGHTS file descriptors. The front-end and the
back-end framework are built on these, further down this file.

Spec: QEMU docs/interop/vhost-user.rst. Every number is in host byte order, so every layout here
is a ``struct.Struct`` with ``=`` (native order, standard sizes, no implicit padding); padding is
written out as ``x`` so the sizes below are the sizes on the wire.
"""

from __future__ import annotations

import array
import enum
import errno
import os
import select
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple, Union

from .errors import DisconnectedError, NotNegotiatedError, ProtocolError, VhostError
from .virtio import VHOST_USER_F_PROTOCOL_FEATURES  # noqa: F401 (re-exported)
from .memory import VHOST_ACCESS_RO, VHOST_ACCESS_RW, VHOST_ACCESS_WO  # noqa: F401 (vhost_iotlb_msg perm)

if TYPE_CHECKING:
    import uuid                 # imported where a UUID is built: SharedObject.unpack

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

# VHOST_USER_F_PROTOCOL_FEATURES (virtio feature bit 30) lives in virtio.py with the other feature
# bits; like every feature constant in vhost_min it is a mask (1 << 30), not a bit number.

VHOST_USER_HDR_SIZE = 12            #: request, flags, size: three native u32
VHOST_USER_VERSION_MASK = 0x3       #: flags bits 0-1: protocol version
VHOST_USER_VERSION = 0x1            #: the only version there is
VHOST_USER_REPLY_MASK = 0x4         #: flags bit 2: this message is a reply
VHOST_USER_NEED_REPLY_MASK = 0x8    #: flags bit 3: the sender waits for an answer (REPLY_ACK)
#: Flags bits 4-31 are reserved; a message with any of them set is rejected (as rust-vmm does).
VHOST_USER_RESERVED_FLAGS = 0xFFFFFFFF & ~(VHOST_USER_VERSION_MASK | VHOST_USER_REPLY_MASK
                                           | VHOST_USER_NEED_REPLY_MASK)

#: Regions in one SET_MEM_TABLE, and so fds in one message (libvhost-user's limit; the spec caps
#: BACKEND_SEND_FD messages at 8 fds too). More regions need CONFIGURE_MEM_SLOTS (ADD_MEM_REG).
VHOST_MEMORY_BASELINE_NREGIONS = 8
VHOST_USER_MAX_FDS = VHOST_MEMORY_BASELINE_NREGIONS

#: Default bound on a received payload. The largest payload in the spec is the GET_SHMEM_CONFIG
#: reply (2056 bytes), then SET_CONFIG / GET_CONFIG (12 + 256) and SET_MEM_TABLE (8 + 8 * 32);
#: 4096 matches rust-vmm's MAX_MSG_SIZE and leaves room for all of them.
VHOST_USER_MAX_PAYLOAD = 4096

#: Default bounds on what a non-blocking connection (Connection.make_nonblocking) keeps queued
#: for a peer that does not read: bytes beyond what the socket buffers hold, and duplicated fds.
#: A front-end waits for each reply it needs, so a few hundred bytes is already a lot.
VHOST_USER_MAX_QUEUED = 64 * 1024
VHOST_USER_MAX_QUEUED_FDS = 4 * VHOST_USER_MAX_FDS

#: Size of the config-space header {offset, size, flags} before the bytes of GET/SET_CONFIG.
VHOST_USER_CONFIG_HDR_SIZE = 12
#: Largest config access: QEMU's VHOST_USER_MAX_CONFIG_SIZE and libvhost-user's buffer are 256
#: bytes (rust-vmm allows offset + size <= 4096). Every virtio device config fits in 256.
VHOST_USER_MAX_CONFIG_SIZE = 256
VHOST_SET_CONFIG_TYPE_FRONTEND = 0   #: SET_CONFIG flags: a write of driver-writable fields
VHOST_SET_CONFIG_TYPE_MIGRATION = 1  #: SET_CONFIG flags: live migration; read-only fields allowed

#: SET_VRING_KICK/CALL/ERR u64 (and the u64 of a vring area): bits 0-7 the vring index,
#: bit 8 "no fd in the ancillary data" (poll instead). Bits 9-63 are not defined.
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 0x100
#: SET_DEVICE_STATE_FD reply u64: bits 0-7 error (0 = success), bit 8 (the same NOFD mask) set
#: when the back-end returns no fd of its own.
VHOST_USER_DEVICE_STATE_ERROR_MASK = 0xFF

#: SET_DEVICE_STATE_FD {direction, phase} values (QEMU's VhostDeviceStateDirection / Phase).
VHOST_TRANSFER_STATE_DIRECTION_SAVE = 0   #: back-end writes its state (migration source)
VHOST_TRANSFER_STATE_DIRECTION_LOAD = 1   #: back-end reads its state (migration destination)
VHOST_TRANSFER_STATE_PHASE_STOPPED = 0    #: guest stopped, device suspended

#: struct vhost_iotlb_msg (Linux uapi vhost_types.h) type values; IOTLB_MSG and BACKEND_IOTLB_MSG
#: carry the kernel's struct unchanged. Its perm values (VHOST_ACCESS_*) live with the IOTLB in memory.py.
VHOST_IOTLB_MISS = 1
VHOST_IOTLB_UPDATE = 2
VHOST_IOTLB_INVALIDATE = 3
VHOST_IOTLB_ACCESS_FAIL = 4
VHOST_IOTLB_BATCH_BEGIN = 5   # kernel only (vhost-vdpa batching), never on a vhost-user socket
VHOST_IOTLB_BATCH_END = 6

#: GET_SHMEM_CONFIG: memory_sizes[] has one slot per shmid (array index = shmid).
VHOST_USER_MAX_SHMEM_REGIONS = 256
#: BACKEND_SHMEM_MAP flags bit 0: map read-write (clear: read-only).
VHOST_USER_FLAG_MAP_RW = 0x1


# --------------------------------------------------------------------------------------------
# Request codes and protocol features
# --------------------------------------------------------------------------------------------

class FrontendRequest(enum.IntEnum):
    """Front-end -> back-end requests on the main socket; member ``X`` is the spec's VHOST_USER_X.

    0 (NONE) is not a request (libvhost-user exits on it); it is deliberately not a member.
    """

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4               # deprecated: ignore, or disable all rings
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21       # formerly VHOST_USER_SET_SLAVE_REQ_FD
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44

    @property
    def spec_name(self) -> str:
        return f"VHOST_USER_{self.name}"


class BackendRequest(enum.IntEnum):
    """Back-end -> front-end requests on the SET_BACKEND_REQ_FD socket; ``X`` is VHOST_USER_BACKEND_X.

    Formerly VHOST_USER_SLAVE_X. Codes 11/12 (MEM_READ/MEM_WRITE) were only ever proposed.
    """

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10

    @property
    def spec_name(self) -> str:
        return f"VHOST_USER_BACKEND_{self.name}"


class ProtocolFeature(enum.IntFlag):
    """VHOST_USER_PROTOCOL_F_* as masks (``X`` is VHOST_USER_PROTOCOL_F_X), negotiated with
    GET/SET_PROTOCOL_FEATURES.

    Renames and renumbering: SLAVE_REQ -> BACKEND_REQ (5), SLAVE_SEND_FD -> BACKEND_SEND_FD (10);
    bit 4 is "MTU" in the spec's list and NET_MTU in QEMU. SHMEM was proposed as bit 20, moved to
    21 when GET_VRING_BASE_INFLIGHT took 20, and landed at 22 when GPA_ADDRESSES took 21
    (rust-vmm vhost 0.16 still has SHMEM at 21; fixed in rust-vmm PR #367).
    """

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17                  # regions grow by {u32 xen_mmap_flags, u32 domid}; unsupported
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19
    GET_VRING_BASE_INFLIGHT = 1 << 20   # GET_VRING_BASE may return with requests still in flight
    GPA_ADDRESSES = 1 << 21             # ring and region addresses are guest-physical
    SHMEM = 1 << 22


NO_FEATURES = ProtocolFeature(0)

# Spec names, written out so `grep VHOST_USER_SET_VRING_ADDR` lands here.
VHOST_USER_GET_FEATURES = FrontendRequest.GET_FEATURES
VHOST_USER_SET_FEATURES = FrontendRequest.SET_FEATURES
VHOST_USER_SET_OWNER = FrontendRequest.SET_OWNER
VHOST_USER_RESET_OWNER = FrontendRequest.RESET_OWNER
VHOST_USER_SET_MEM_TABLE = FrontendRequest.SET_MEM_TABLE
VHOST_USER_SET_LOG_BASE = FrontendRequest.SET_LOG_BASE
VHOST_USER_SET_LOG_FD = FrontendRequest.SET_LOG_FD
VHOST_USER_SET_VRING_NUM = FrontendRequest.SET_VRING_NUM
VHOST_USER_SET_VRING_ADDR = FrontendRequest.SET_VRING_ADDR
VHOST_USER_SET_VRING_BASE = FrontendRequest.SET_VRING_BASE
VHOST_USER_GET_VRING_BASE = FrontendRequest.GET_VRING_BASE
VHOST_USER_SET_VRING_KICK = FrontendRequest.SET_VRING_KICK
VHOST_USER_SET_VRING_CALL = FrontendRequest.SET_VRING_CALL
VHOST_USER_SET_VRING_ERR = FrontendRequest.SET_VRING_ERR
VHOST_USER_GET_PROTOCOL_FEATURES = FrontendRequest.GET_PROTOCOL_FEATURES
VHOST_USER_SET_PROTOCOL_FEATURES = FrontendRequest.SET_PROTOCOL_FEATURES
VHOST_USER_GET_QUEUE_NUM = FrontendRequest.GET_QUEUE_NUM
VHOST_USER_SET_VRING_ENABLE = FrontendRequest.SET_VRING_ENABLE
VHOST_USER_SEND_RARP = FrontendRequest.SEND_RARP
VHOST_USER_NET_SET_MTU = FrontendRequest.NET_SET_MTU
VHOST_USER_SET_BACKEND_REQ_FD = FrontendRequest.SET_BACKEND_REQ_FD
VHOST_USER_IOTLB_MSG = FrontendRequest.IOTLB_MSG
VHOST_USER_SET_VRING_ENDIAN = FrontendRequest.SET_VRING_ENDIAN
VHOST_USER_GET_CONFIG = FrontendRequest.GET_CONFIG
VHOST_USER_SET_CONFIG = FrontendRequest.SET_CONFIG
VHOST_USER_CREATE_CRYPTO_SESSION = FrontendRequest.CREATE_CRYPTO_SESSION
VHOST_USER_CLOSE_CRYPTO_SESSION = FrontendRequest.CLOSE_CRYPTO_SESSION
VHOST_USER_POSTCOPY_ADVISE = FrontendRequest.POSTCOPY_ADVISE
VHOST_USER_POSTCOPY_LISTEN = FrontendRequest.POSTCOPY_LISTEN
VHOST_USER_POSTCOPY_END = FrontendRequest.POSTCOPY_END
VHOST_USER_GET_INFLIGHT_FD = FrontendRequest.GET_INFLIGHT_FD
VHOST_USER_SET_INFLIGHT_FD = FrontendRequest.SET_INFLIGHT_FD
VHOST_USER_GPU_SET_SOCKET = FrontendRequest.GPU_SET_SOCKET
VHOST_USER_RESET_DEVICE = FrontendRequest.RESET_DEVICE
VHOST_USER_VRING_KICK = FrontendRequest.VRING_KICK
VHOST_USER_GET_MAX_MEM_SLOTS = FrontendRequest.GET_MAX_MEM_SLOTS
VHOST_USER_ADD_MEM_REG = FrontendRequest.ADD_MEM_REG
VHOST_USER_REM_MEM_REG = FrontendRequest.REM_MEM_REG
VHOST_USER_SET_STATUS = FrontendRequest.SET_STATUS
VHOST_USER_GET_STATUS = FrontendRequest.GET_STATUS
VHOST_USER_GET_SHARED_OBJECT = FrontendRequest.GET_SHARED_OBJECT
VHOST_USER_SET_DEVICE_STATE_FD = FrontendRequest.SET_DEVICE_STATE_FD
VHOST_USER_CHECK_DEVICE_STATE = FrontendRequest.CHECK_DEVICE_STATE
VHOST_USER_GET_SHMEM_CONFIG = FrontendRequest.GET_SHMEM_CONFIG

VHOST_USER_BACKEND_IOTLB_MSG = BackendRequest.IOTLB_MSG
VHOST_USER_BACKEND_CONFIG_CHANGE_MSG = BackendRequest.CONFIG_CHANGE_MSG
VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG = BackendRequest.VRING_HOST_NOTIFIER_MSG
VHOST_USER_BACKEND_VRING_CALL = BackendRequest.VRING_CALL
VHOST_USER_BACKEND_VRING_ERR = BackendRequest.VRING_ERR
VHOST_USER_BACKEND_SHARED_OBJECT_ADD = BackendRequest.SHARED_OBJECT_ADD
VHOST_USER_BACKEND_SHARED_OBJECT_REMOVE = BackendRequest.SHARED_OBJECT_REMOVE
VHOST_USER_BACKEND_SHARED_OBJECT_LOOKUP = BackendRequest.SHARED_OBJECT_LOOKUP
VHOST_USER_BACKEND_SHMEM_MAP = BackendRequest.SHMEM_MAP
VHOST_USER_BACKEND_SHMEM_UNMAP = BackendRequest.SHMEM_UNMAP

VHOST_USER_PROTOCOL_F_MQ = ProtocolFeature.MQ
VHOST_USER_PROTOCOL_F_LOG_SHMFD = ProtocolFeature.LOG_SHMFD
VHOST_USER_PROTOCOL_F_RARP = ProtocolFeature.RARP
VHOST_USER_PROTOCOL_F_REPLY_ACK = ProtocolFeature.REPLY_ACK
VHOST_USER_PROTOCOL_F_NET_MTU = ProtocolFeature.NET_MTU
VHOST_USER_PROTOCOL_F_MTU = ProtocolFeature.NET_MTU       # the spec's list calls bit 4 MTU
VHOST_USER_PROTOCOL_F_BACKEND_REQ = ProtocolFeature.BACKEND_REQ
VHOST_USER_PROTOCOL_F_CROSS_ENDIAN = ProtocolFeature.CROSS_ENDIAN
VHOST_USER_PROTOCOL_F_CRYPTO_SESSION = ProtocolFeature.CRYPTO_SESSION
VHOST_USER_PROTOCOL_F_PAGEFAULT = ProtocolFeature.PAGEFAULT
VHOST_USER_PROTOCOL_F_CONFIG = ProtocolFeature.CONFIG
VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD = ProtocolFeature.BACKEND_SEND_FD
VHOST_USER_PROTOCOL_F_HOST_NOTIFIER = ProtocolFeature.HOST_NOTIFIER
VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD = ProtocolFeature.INFLIGHT_SHMFD
VHOST_USER_PROTOCOL_F_RESET_DEVICE = ProtocolFeature.RESET_DEVICE
VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS = ProtocolFeature.INBAND_NOTIFICATIONS
VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS = ProtocolFeature.CONFIGURE_MEM_SLOTS
VHOST_USER_PROTOCOL_F_STATUS = ProtocolFeature.STATUS
VHOST_USER_PROTOCOL_F_XEN_MMAP = ProtocolFeature.XEN_MMAP
VHOST_USER_PROTOCOL_F_SHARED_OBJECT = ProtocolFeature.SHARED_OBJECT
VHOST_USER_PROTOCOL_F_DEVICE_STATE = ProtocolFeature.DEVICE_STATE
VHOST_USER_PROTOCOL_F_GET_VRING_BASE_INFLIGHT = ProtocolFeature.GET_VRING_BASE_INFLIGHT
VHOST_USER_PROTOCOL_F_GPA_ADDRESSES = ProtocolFeature.GPA_ADDRESSES
VHOST_USER_PROTOCOL_F_SHMEM = ProtocolFeature.SHMEM

Request = Union[FrontendRequest, BackendRequest]


def request_name(code: int) -> str:
    """The spec name of a request code, or ``request N`` for a code no enum knows."""
    names = _SPEC_NAMES.get(type(code))
    return names[code] if names is not None else f"request {code}"


#: Each request enum's members -> their spec names, made once (an enum's ``name`` is a slow property).
_SPEC_NAMES = {enum_type: {m: m.spec_name for m in enum_type} for enum_type in (FrontendRequest, BackendRequest)}


# --------------------------------------------------------------------------------------------
# Payload layouts
# --------------------------------------------------------------------------------------------

HEADER = struct.Struct("=III")                 #: VhostUserHeader {u32 request, flags, size}
U64 = struct.Struct("=Q")                      #: a single u64
VRING_STATE = struct.Struct("=II")             #: struct vhost_vring_state {index, num}
VRING_ADDR = struct.Struct("=IIQQQQ")          #: struct vhost_vring_addr (40; no "size" field)
MEMORY_REGION = struct.Struct("=QQQQ")         #: VhostUserMemoryRegion (32)
MEMORY_HDR = struct.Struct("=I4x")             #: VhostUserMemory {u32 nregions, u32 padding}
MEM_REG_MSG = struct.Struct("=8xQQQQ")         #: VhostUserMemRegMsg {u64 padding, region} (40)
LOG = struct.Struct("=QQ")                     #: VhostUserLog {mmap_size, mmap_offset}
CONFIG_HDR = struct.Struct("=III")             #: VhostUserConfig {offset, size, flags} + bytes
VRING_AREA = struct.Struct("=QQQ")             #: VhostUserVringArea {u64 index|flags, size, offset}
INFLIGHT = struct.Struct("=QQHH4x")            #: VhostUserInflight, C tail padding included (24)
SHARED = struct.Struct("=16s")                 #: VhostUserShared {u8 uuid[16]}
DEVICE_STATE = struct.Struct("=II")            #: VhostUserTransferDeviceState {direction, phase}
SHMEM_CONFIG = struct.Struct(f"=I4x{VHOST_USER_MAX_SHMEM_REGIONS}Q")  #: VhostUserShMemConfig (2056)
SHMEM_MAP = struct.Struct("=B7xQQQQ")          #: VhostUserMMap {u8 shmid, 7 pad, 4 x u64} (40)
IOTLB_MSG = struct.Struct("=QQQBB6x")          #: struct vhost_iotlb_msg (32)

assert HEADER.size == VHOST_USER_HDR_SIZE and CONFIG_HDR.size == VHOST_USER_CONFIG_HDR_SIZE


def _unpack(layout: struct.Struct, payload: bytes, what: str) -> tuple:
    """``layout.unpack`` that reports a wrong size as the peer's ProtocolError, not struct.error."""
    if len(payload) != layout.size:
        raise ProtocolError(f"{what}: payload is {len(payload)} bytes, expected {layout.size}")
    return layout.unpack(payload)


def _wire(layout: struct.Struct, what: str) -> Callable[[type], type]:
    """Class decorator for a NamedTuple whose fields are ``layout``'s values, in order: it adds
    ``pack()`` and ``unpack(payload, what=what)``, the latter raising ProtocolError on a wrong size.

    Payloads that are not one flat struct (a u64 with flag bits, a header plus an array or bytes)
    write their own pack/unpack instead.
    """
    def decorate(cls):
        assert len(cls._fields) == len(layout.unpack(bytes(layout.size))), f"{cls.__name__} vs its layout"

        def pack(self) -> bytes:
            return layout.pack(*self)

        def unpack(cls, payload: bytes, what: str = what):
            return cls._make(_unpack(layout, payload, what))

        pack.__qualname__, unpack.__qualname__ = f"{cls.__qualname__}.pack", f"{cls.__qualname__}.unpack"
        pack.__doc__ = f"The {layout.size} wire bytes of this {cls.__name__}."
        unpack.__doc__ = f"A {cls.__name__} from exactly {layout.size} payload bytes."
        cls.pack, cls.unpack = pack, classmethod(unpack)
        return cls
    return decorate


def pack_u64(value: int) -> bytes:
    """A u64 payload (SET_FEATURES, SET_STATUS, every REPLY_ACK answer...)."""
    return U64.pack(value)


def unpack_u64(payload: bytes, what: str = "u64 payload") -> int:
    return _unpack(U64, payload, what)[0]


@_wire(VRING_STATE, "vring state")
class VringState(NamedTuple):
    """struct vhost_vring_state: SET_VRING_NUM/BASE/ENABLE/ENDIAN, GET_VRING_BASE, VRING_KICK."""

    index: int
    num: int


@_wire(VRING_ADDR, "vring address")
class VringAddr(NamedTuple):
    """struct vhost_vring_addr for SET_VRING_ADDR: user addresses (IOVAs with ACCESS_PLATFORM)."""

    index: int
    flags: int          # bit 0 VHOST_VRING_F_LOG: log used-ring writes at log_guest_addr
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int


class VringFd(NamedTuple):
    """The u64 of SET_VRING_KICK/CALL/ERR: vring index (bits 0-7), no-fd flag (bit 8)."""

    index: int
    nofd: bool

    def pack(self) -> bytes:
        return U64.pack(encode_vring_fd(self.index, self.nofd))

    @classmethod
    def unpack(cls, payload: bytes, what: str = "vring fd index") -> VringFd:
        return cls._make(decode_vring_fd(unpack_u64(payload, what), what))


def encode_vring_fd(index: int, nofd: bool) -> int:
    if not 0 <= index <= VHOST_USER_VRING_IDX_MASK:
        raise ValueError(f"vring index {index} does not fit in 8 bits")
    return index | (VHOST_USER_VRING_NOFD_MASK if nofd else 0)


def decode_vring_fd(value: int, what: str = "vring fd index") -> tuple[int, bool]:
    """Split a vring-index u64 into (index, nofd); bits 9-63 are not defined and must be 0."""
    if value & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
        raise ProtocolError(f"{what}: undefined bits set in {value:#x} (only bits 0-8 have a meaning)")
    return value & VHOST_USER_VRING_IDX_MASK, bool(value & VHOST_USER_VRING_NOFD_MASK)


@_wire(MEMORY_REGION, "memory region")
class MemoryRegion(NamedTuple):
    """VhostUserMemoryRegion: one fd-backed region of guest memory (SET_MEM_TABLE, ADD/REM_MEM_REG)."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def pack_single(self) -> bytes:
        """The "single memory region description" of ADD_MEM_REG / REM_MEM_REG (u64 padding first)."""
        return MEM_REG_MSG.pack(*self)

    @classmethod
    def unpack_single(cls, payload: bytes, what: str = "single memory region") -> MemoryRegion:
        return cls._make(_unpack(MEM_REG_MSG, payload, what))


class MemoryTable(NamedTuple):
    """VhostUserMemory for SET_MEM_TABLE: up to 8 regions, one fd each, in the same order."""

    regions: tuple[MemoryRegion, ...]

    def pack(self) -> bytes:
        if len(self.regions) > VHOST_MEMORY_BASELINE_NREGIONS:
            raise ValueError(f"SET_MEM_TABLE carries at most {VHOST_MEMORY_BASELINE_NREGIONS} regions, "
                             f"not {len(self.regions)} (use ADD_MEM_REG beyond that)")
        return MEMORY_HDR.pack(len(self.regions)) + b"".join(MEMORY_REGION.pack(*r) for r in self.regions)

    @classmethod
    def unpack(cls, payload: bytes, what: str = "VHOST_USER_SET_MEM_TABLE") -> MemoryTable:
        count = _memory_table_count(payload, what)
        regions = MEMORY_REGION.iter_unpack(payload[MEMORY_HDR.size:MEMORY_HDR.size + count * MEMORY_REGION.size])
        return cls(tuple(MemoryRegion._make(region) for region in regions))


def _memory_table_count(payload: bytes, what: str) -> int:
    if len(payload) < MEMORY_HDR.size:
        raise ProtocolError(f"{what}: payload is {len(payload)} bytes, shorter than the {MEMORY_HDR.size}-byte header")
    (count,) = MEMORY_HDR.unpack_from(payload)
    if count > VHOST_MEMORY_BASELINE_NREGIONS:
        raise ProtocolError(f"{what}: {count} regions, at most {VHOST_MEMORY_BASELINE_NREGIONS} allowed")
    expected = MEMORY_HDR.size + count * MEMORY_REGION.size
    if len(payload) != expected:
        raise ProtocolError(f"{what}: payload is {len(payload)} bytes, expected {expected} for {count} regions")
    return count


@_wire(LOG, "log description")
class Log(NamedTuple):
    """VhostUserLog for SET_LOG_BASE: the dirty bitmap is [mmap_offset, +mmap_size) of the fd."""

    mmap_size: int
    mmap_offset: int


class Config(NamedTuple):
    """VhostUserConfig for GET_CONFIG / SET_CONFIG: ``size`` bytes of device config at ``offset``."""

    offset: int
    size: int
    flags: int          # VHOST_SET_CONFIG_TYPE_FRONTEND or _MIGRATION
    data: bytes

    def pack(self) -> bytes:
        if len(self.data) != self.size:
            raise ValueError(f"config data is {len(self.data)} bytes but size says {self.size}")
        return CONFIG_HDR.pack(self.offset, self.size, self.flags) + bytes(self.data)

    @classmethod
    def unpack(cls, payload: bytes, what: str = "config space") -> Config:
        offset, size, flags = _config_header(payload, what)
        return cls(offset, size, flags, bytes(payload[CONFIG_HDR.size:]))


def _config_header(payload: bytes, what: str) -> tuple[int, int, int]:
    if len(payload) < CONFIG_HDR.size:
        raise ProtocolError(f"{what}: payload is {len(payload)} bytes, shorter than the "
                            f"{CONFIG_HDR.size}-byte config header")
    offset, size, flags = CONFIG_HDR.unpack_from(payload)
    if offset + size > VHOST_USER_MAX_CONFIG_SIZE:
        raise ProtocolError(f"{what}: offset {offset} + size {size} exceeds the "
                            f"{VHOST_USER_MAX_CONFIG_SIZE}-byte config space")
    if len(payload) != CONFIG_HDR.size + size:
        raise ProtocolError(f"{what}: payload is {len(payload)} bytes, expected "
                            f"{CONFIG_HDR.size} + size {size}")
    return offset, size, flags


@_wire(VRING_AREA, "vring area")
class VringArea(NamedTuple):
    """VhostUserVringArea for BACKEND_VRING_HOST_NOTIFIER_MSG: u64 = index | NOFD, mmap size/offset."""

    u64: int
    size: int
    offset: int

    @property
    def index(self) -> int:
        return self.u64 & VHOST_USER_VRING_IDX_MASK

    @property
    def nofd(self) -> bool:
        return bool(self.u64 & VHOST_USER_VRING_NOFD_MASK)


@_wire(INFLIGHT, "inflight description")
class Inflight(NamedTuple):
    """VhostUserInflight for GET/SET_INFLIGHT_FD; 24 bytes on the wire (4 bytes of tail padding)."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int


class SharedObject(NamedTuple):
    """VhostUserShared: a UUID whose first three fields are big-endian, i.e. RFC 4122 byte order."""

    uuid: uuid.UUID

    def pack(self) -> bytes:
        return self.uuid.bytes

    @classmethod
    def unpack(cls, payload: bytes, what: str = "shared object") -> SharedObject:
        """From 16 payload bytes; an empty payload (QEMU's GET_SHARED_OBJECT) is the nil UUID."""
        import uuid                     # here, not at the top: few devices share objects, uuid costs ~1 ms
        return cls(uuid.UUID(bytes=_unpack(SHARED, payload or bytes(SHARED.size), what)[0]))


@_wire(DEVICE_STATE, "device state transfer parameters")
class DeviceState(NamedTuple):
    """VhostUserTransferDeviceState for SET_DEVICE_STATE_FD: VHOST_TRANSFER_STATE_* values."""

    direction: int
    phase: int


class ShmemConfig(NamedTuple):
    """VhostUserShMemConfig, the GET_SHMEM_CONFIG reply: sizes indexed by shmid (0 = unused).

    ``nregions`` counts the regions in use; it is not a prefix length of ``memory_sizes``.
    """

    nregions: int
    memory_sizes: tuple[int, ...]

    def pack(self) -> bytes:
        sizes = tuple(self.memory_sizes)
        if len(sizes) > VHOST_USER_MAX_SHMEM_REGIONS:
            raise ValueError(f"at most {VHOST_USER_MAX_SHMEM_REGIONS} shared memory regions")
        return SHMEM_CONFIG.pack(self.nregions, *sizes, *(0,) * (VHOST_USER_MAX_SHMEM_REGIONS - len(sizes)))

    @classmethod
    def unpack(cls, payload: bytes, what: str = "shared memory config") -> ShmemConfig:
        fields = _unpack(SHMEM_CONFIG, payload, what)
        return cls(fields[0], fields[1:])


@_wire(SHMEM_MAP, "shared memory mapping")
class ShmemMap(NamedTuple):
    """VhostUserMMap for BACKEND_SHMEM_MAP / SHMEM_UNMAP: map [fd_offset, +len) at shm_offset of shmid."""

    shmid: int
    fd_offset: int
    shm_offset: int
    len: int
    flags: int          # VHOST_USER_FLAG_MAP_RW


@_wire(IOTLB_MSG, "IOTLB message")
class IotlbMsg(NamedTuple):
    """struct vhost_iotlb_msg (IOTLB_MSG, BACKEND_IOTLB_MSG): VHOST_IOTLB_* type, VHOST_ACCESS_* perm."""

    iova: int
    size: int
    uaddr: int
    perm: int
    type: int


# --------------------------------------------------------------------------------------------
# The request table: payload shape, fds, feature gate and reply of every request
# --------------------------------------------------------------------------------------------

class VirtioGate(enum.Enum):
    """A virtio-feature precondition of a request (the bits other than 30 are defined in virtio.py)."""

    PROTOCOL_FEATURES_OFFERED = "VHOST_USER_F_PROTOCOL_FEATURES offered in the GET_FEATURES reply"
    PROTOCOL_FEATURES = "VHOST_USER_F_PROTOCOL_FEATURES negotiated with SET_FEATURES"
    ACCESS_PLATFORM = "VIRTIO_F_ACCESS_PLATFORM (IOMMU_PLATFORM) negotiated"


#: A payload-dependent rule: (spec, payload, number of fds) -> None, or raise ProtocolError.
PayloadCheck = Callable[["RequestSpec", bytes, int], None]


class RequestSpec(NamedTuple):
    """What the spec says about one request: the one place the front-end and back-end look it up.

    ``size`` is the exact request payload size, or None when ``check`` (or nothing, for
    CREATE_CRYPTO_SESSION) decides. ``fds`` bounds the SCM_RIGHTS fds; ``check`` adds rules that
    depend on the payload (fds == nregions, fd present iff the NOFD bit is clear).
    ``features`` must all be negotiated (SET_PROTOCOL_FEATURES), ``fd_features`` too when fds are
    passed, and ``virtio_gate`` names a virtio-feature precondition.
    ``reply`` means the request is always answered; any other request is answered with a u64
    (0 = success) only when it carries NEED_REPLY. ``reply_size`` / ``reply_fds`` / ``reply_check``
    describe the answer, whichever it is (so 8 bytes, no fds, for a REPLY_ACK answer).
    """

    request: Request
    size: int | None
    fds: tuple[int, int] = (0, 0)
    features: ProtocolFeature = NO_FEATURES
    fd_features: ProtocolFeature = NO_FEATURES
    virtio_gate: VirtioGate | None = None
    reply: bool = False
    reply_size: int | None = U64.size
    reply_fds: tuple[int, int] = (0, 0)
    check: PayloadCheck | None = None
    reply_check: PayloadCheck | None = None

    @property
    def name(self) -> str:
        return self.request.spec_name

    def validate(self, payload: bytes, nfds: int) -> None:
        """Check a received request's payload size and fd count; ProtocolError names what is wrong."""
        _check_shape(self, "", payload, nfds, self.size, self.fds, self.check)

    def validate_reply(self, payload: bytes, nfds: int) -> None:
        """Check the answer to this request (its explicit reply, or the u64 of a REPLY_ACK)."""
        _check_shape(self, " reply", payload, nfds, self.reply_size, self.reply_fds, self.reply_check)

    def missing(self, negotiated: ProtocolFeature | int, nfds: int = 0) -> ProtocolFeature:
        """The protocol features this request (with ``nfds`` fds) needs but ``negotiated`` lacks."""
        # Plain int arithmetic: an IntFlag operator costs a microsecond, and every message asks.
        needed = int(self.features) | (int(self.fd_features) if nfds else 0)
        lacking = needed & ~int(negotiated)
        return ProtocolFeature(lacking) if lacking else NO_FEATURES

    def require(self, negotiated: ProtocolFeature | int, nfds: int = 0) -> None:
        """Raise NotNegotiatedError unless every protocol feature this request needs is negotiated."""
        if not self.features and not (nfds and self.fd_features):
            return                              # most requests need no protocol feature
        lacking = self.missing(negotiated, nfds)
        if lacking:
            names = "|".join(f"VHOST_USER_PROTOCOL_F_{f.name}" for f in ProtocolFeature if f & lacking)
            raise NotNegotiatedError(f"{self.name} needs {names}, which was not negotiated")

    def reply_due(self, flags: int) -> bool:
        """Whether the receiver of a request with these header flags must answer it.

        Always for ``reply`` requests; otherwise when NEED_REPLY is set. Like libvhost-user this
        does not insist on REPLY_ACK: QEMU sets NEED_REPLY on POSTCOPY_LISTEN/END regardless, and a
        sender that sets the bit blocks until it gets its answer.
        """
        return self.reply or bool(flags & VHOST_USER_NEED_REPLY_MASK)


def _check_shape(spec: RequestSpec, what: str, payload: bytes, nfds: int, size: int | None,
                 fds: tuple[int, int], check: PayloadCheck | None) -> None:
    lo, hi = fds
    if not lo <= nfds <= hi:
        allowed = f"{lo}" if lo == hi else f"{lo} to {hi}"
        raise ProtocolError(f"{spec.name}{what}: carries {nfds} fds, expected {allowed}")
    if size is not None and len(payload) != size:
        raise ProtocolError(f"{spec.name}{what}: payload is {len(payload)} bytes, expected {size}")
    if check is not None:
        check(spec, payload, nfds)


def _check_mem_table(spec: RequestSpec, payload: bytes, nfds: int) -> None:
    count = _memory_table_count(payload, spec.name)
    if nfds != count:
        raise ProtocolError(f"{spec.name}: {count} regions but {nfds} fds (one fd per region, in order)")


def _check_fd_by_nofd_bit(spec: RequestSpec, value: int, nfds: int) -> None:
    _index, nofd = decode_vring_fd(value, spec.name)
    if nofd and nfds:
        raise ProtocolError(f"{spec.name}: the NOFD bit is set in {value:#x} but an fd was passed")
    if not nofd and not nfds:
        raise ProtocolError(f"{spec.name}: no fd passed and the NOFD bit is clear in {value:#x}")


def _check_vring_fd(spec: RequestSpec, payload: bytes, nfds: int) -> None:
    _check_fd_by_nofd_bit(spec, U64.unpack(payload)[0], nfds)


def _check_host_notifier(spec: RequestSpec, payload: bytes, nfds: int) -> None:
    _check_fd_by_nofd_bit(spec, VRING_AREA.unpack(payload)[0], nfds)


def _check_config(spec: RequestSpec, payload: bytes, nfds: int) -> None:
    _config_header(payload, spec.name)


def _check_config_reply(spec: RequestSpec, payload: bytes, nfds: int) -> None:
    if payload:                         # an empty GET_CONFIG reply is the back-end's error signal
        _config_header(payload, f"{spec.name} reply")


def _check_shared_object_request(spec: RequestSpec, payload: bytes, nfds: int) -> None:
    if len(payload) not in (0, SHARED.size):
        raise ProtocolError(f"{spec.name}: payload is {len(payload)} bytes, expected {SHARED.size} (or 0, as "
                            f"QEMU sends it)")


def _check_device_state_reply(spec: RequestSpec, payload: bytes, nfds: int) -> None:
    value = U64.unpack(payload)[0]
    failed, nofd = value & VHOST_USER_DEVICE_STATE_ERROR_MASK, value & VHOST_USER_VRING_NOFD_MASK
    if nfds and (failed or nofd):
        raise ProtocolError(f"{spec.name} reply: {value:#x} says error or no fd, but an fd was passed")
    if not nfds and not failed and not nofd:
        raise ProtocolError(f"{spec.name} reply: {value:#x} promises an fd, but none was passed")


F, B, P = FrontendRequest, BackendRequest, ProtocolFeature
_GATE_PF_OFFERED, _GATE_PF, _GATE_IOMMU = (VirtioGate.PROTOCOL_FEATURES_OFFERED, VirtioGate.PROTOCOL_FEATURES,
                                           VirtioGate.ACCESS_PLATFORM)

_FRONTEND_SPECS = (
    RequestSpec(F.GET_FEATURES, 0, reply=True),
    RequestSpec(F.SET_FEATURES, U64.size),
    RequestSpec(F.SET_OWNER, 0),
    RequestSpec(F.RESET_OWNER, 0),
    # Replies (the back-end's mapping bases) only after POSTCOPY_LISTEN, without NEED_REPLY; the
    # front-end's "empty SET_MEM_TABLE" acknowledgement is u64 0, i.e. a valid 0-region table.
    RequestSpec(F.SET_MEM_TABLE, None, fds=(0, VHOST_MEMORY_BASELINE_NREGIONS), check=_check_mem_table),
    # The spec's "u64" request payload is wrong: QEMU sends VhostUserLog. Answered (only with
    # LOG_SHMFD, which gates it): libvhost-user replies 8 bytes, rust-vmm echoes the 16-byte log.
    RequestSpec(F.SET_LOG_BASE, LOG.size, fds=(1, 1), features=P.LOG_SHMFD, reply=True, reply_size=None),
    RequestSpec(F.SET_LOG_FD, 0, fds=(1, 1)),
    RequestSpec(F.SET_VRING_NUM, VRING_STATE.size),
    RequestSpec(F.SET_VRING_ADDR, VRING_ADDR.size),
    RequestSpec(F.SET_VRING_BASE, VRING_STATE.size),
    RequestSpec(F.GET_VRING_BASE, VRING_STATE.size, reply=True, reply_size=VRING_STATE.size),
    RequestSpec(F.SET_VRING_KICK, U64.size, fds=(0, 1), check=_check_vring_fd),
    RequestSpec(F.SET_VRING_CALL, U64.size, fds=(0, 1), check=_check_vring_fd),
    RequestSpec(F.SET_VRING_ERR, U64.size, fds=(0, 1), check=_check_vring_fd),
    RequestSpec(F.GET_PROTOCOL_FEATURES, 0, virtio_gate=_GATE_PF_OFFERED, reply=True),
    RequestSpec(F.SET_PROTOCOL_FEATURES, U64.size, virtio_gate=_GATE_PF_OFFERED),
    RequestSpec(F.GET_QUEUE_NUM, 0, features=P.MQ, reply=True),
    RequestSpec(F.SET_VRING_ENABLE, VRING_STATE.size, virtio_gate=_GATE_PF),
    RequestSpec(F.SEND_RARP, U64.size, features=P.RARP),         # first 6 bytes: the guest's MAC
    RequestSpec(F.NET_SET_MTU, U64.size, features=P.NET_MTU),
    RequestSpec(F.SET_BACKEND_REQ_FD, 0, fds=(1, 1), features=P.BACKEND_REQ),
    # The spec asks only for ACCESS_PLATFORM; misses come back on the back-end channel, so it is
    # useless without BACKEND_REQ (QEMU refuses an IOMMU without BACKEND_REQ and REPLY_ACK).
    RequestSpec(F.IOTLB_MSG, IOTLB_MSG.size, features=P.BACKEND_REQ, virtio_gate=_GATE_IOMMU, reply=True),
    RequestSpec(F.SET_VRING_ENDIAN, VRING_STATE.size, features=P.CROSS_ENDIAN),
    # The request carries size zeroed bytes; the reply must be as long, or empty on error.
    RequestSpec(F.GET_CONFIG, None, features=P.CONFIG, check=_check_config, reply=True, reply_size=None,
                reply_check=_check_config_reply),
    RequestSpec(F.SET_CONFIG, None, features=P.CONFIG, check=_check_config),
    # VhostUserCryptoSession is QEMU-internal (its size follows QEMU's structs): not checked here.
    RequestSpec(F.CREATE_CRYPTO_SESSION, None, features=P.CRYPTO_SESSION, reply=True, reply_size=None),
    RequestSpec(F.CLOSE_CRYPTO_SESSION, U64.size, features=P.CRYPTO_SESSION),
    RequestSpec(F.POSTCOPY_ADVISE, 0, features=P.PAGEFAULT, reply=True, reply_size=0, reply_fds=(1, 1)),
    RequestSpec(F.POSTCOPY_LISTEN, 0, features=P.PAGEFAULT),     # QEMU sets NEED_REPLY on it
    RequestSpec(F.POSTCOPY_END, 0, features=P.PAGEFAULT, reply=True),
    # The spec lists the reply payload as "N/A" but also as always answered: inflight + 1 fd.
    RequestSpec(F.GET_INFLIGHT_FD, INFLIGHT.size, features=P.INFLIGHT_SHMFD, reply=True,
                reply_size=INFLIGHT.size, reply_fds=(1, 1)),
    RequestSpec(F.SET_INFLIGHT_FD, INFLIGHT.size, fds=(1, 1), features=P.INFLIGHT_SHMFD),
    RequestSpec(F.GPU_SET_SOCKET, 0, fds=(1, 1)),
    RequestSpec(F.RESET_DEVICE, 0, features=P.RESET_DEVICE),
    RequestSpec(F.VRING_KICK, VRING_STATE.size, features=P.INBAND_NOTIFICATIONS),
    RequestSpec(F.GET_MAX_MEM_SLOTS, 0, features=P.CONFIGURE_MEM_SLOTS, reply=True),
    # Like SET_MEM_TABLE, answered with the mapping base after POSTCOPY_LISTEN.
    RequestSpec(F.ADD_MEM_REG, MEM_REG_MSG.size, fds=(1, 1), features=P.CONFIGURE_MEM_SLOTS),
    # Should carry no fd; one is accepted (and must be closed unused) for old front-ends.
    RequestSpec(F.REM_MEM_REG, MEM_REG_MSG.size, fds=(0, 1), features=P.CONFIGURE_MEM_SLOTS),
    RequestSpec(F.SET_STATUS, U64.size, features=P.STATUS),
    RequestSpec(F.GET_STATUS, 0, features=P.STATUS, reply=True),
    # The spec says 16 bytes; QEMU sends size 0 (it fills the UUID in but never sets hdr.size), which
    # libvhost-user reads as the nil UUID of its zeroed buffer: both are accepted.
    RequestSpec(F.GET_SHARED_OBJECT, None, features=P.SHARED_OBJECT, reply=True, reply_fds=(0, 1),
                check=_check_shared_object_request),
    RequestSpec(F.SET_DEVICE_STATE_FD, DEVICE_STATE.size, fds=(1, 1), features=P.DEVICE_STATE, reply=True,
                reply_fds=(0, 1), reply_check=_check_device_state_reply),
    RequestSpec(F.CHECK_DEVICE_STATE, 0, features=P.DEVICE_STATE, reply=True),
    RequestSpec(F.GET_SHMEM_CONFIG, 0, features=P.SHMEM, reply=True, reply_size=SHMEM_CONFIG.size),
)

# Every back-end request needs BACKEND_REQ (the channel exists only with it); fds on the channel
# need BACKEND_SEND_FD. Non-reply requests are answered only with NEED_REPLY (and REPLY_ACK).
_BACKEND_SPECS = (
    RequestSpec(B.IOTLB_MSG, IOTLB_MSG.size, virtio_gate=_GATE_IOMMU),
    RequestSpec(B.CONFIG_CHANGE_MSG, 0, features=P.CONFIG),
    RequestSpec(B.VRING_HOST_NOTIFIER_MSG, VRING_AREA.size, fds=(0, 1), features=P.HOST_NOTIFIER,
                fd_features=P.BACKEND_SEND_FD, check=_check_host_notifier),
    RequestSpec(B.VRING_CALL, VRING_STATE.size, features=P.INBAND_NOTIFICATIONS),
    RequestSpec(B.VRING_ERR, VRING_STATE.size, features=P.INBAND_NOTIFICATIONS),
    RequestSpec(B.SHARED_OBJECT_ADD, SHARED.size, features=P.SHARED_OBJECT),
    RequestSpec(B.SHARED_OBJECT_REMOVE, SHARED.size, features=P.SHARED_OBJECT),
    # Answered with u64 0 + the dma-buf fd, or non-zero and no fd.
    RequestSpec(B.SHARED_OBJECT_LOOKUP, SHARED.size, features=P.SHARED_OBJECT, reply=True, reply_fds=(0, 1)),
    RequestSpec(B.SHMEM_MAP, SHMEM_MAP.size, fds=(1, 1), features=P.SHMEM, fd_features=P.BACKEND_SEND_FD),
    RequestSpec(B.SHMEM_UNMAP, SHMEM_MAP.size, features=P.SHMEM),
)

#: FrontendRequest -> RequestSpec, for every front-end request 1-44.
FRONTEND_REQUESTS: Mapping[FrontendRequest, RequestSpec] = MappingProxyType({s.request: s for s in _FRONTEND_SPECS})
#: BackendRequest -> RequestSpec, for every back-end request 1-10.
BACKEND_REQUESTS: Mapping[BackendRequest, RequestSpec] = MappingProxyType({s.request: s for s in _BACKEND_SPECS})
del F, B, P

assert set(FRONTEND_REQUESTS) == set(FrontendRequest) and set(BACKEND_REQUESTS) == set(BackendRequest)


def lookup(code: int, table: Mapping[Request, RequestSpec] = FRONTEND_REQUESTS) -> RequestSpec:
    """The spec of request ``code`` in ``table``; ProtocolError for a code the table lacks."""
    spec = table.get(code)
    if spec is None:
        side = "back-end" if table is BACKEND_REQUESTS else "front-end"
        raise ProtocolError(f"request {int(code)} is not a {side} request the protocol defines")
    return spec


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------

class Message:
    """One received message. It owns ``fds`` until they are taken: close() closes what is left."""

    __slots__ = ("request", "flags", "payload", "fds")

    def __init__(self, request: int, flags: int, payload: bytes, fds: list[int] | None = None) -> None:
        self.request = request          # a FrontendRequest / BackendRequest when the code is known
        self.flags = flags
        self.payload = payload
        self.fds: list[int] = [] if fds is None else fds

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_REPLY_MASK)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    @property
    def name(self) -> str:
        return request_name(self.request)

    def u64(self) -> int:
        """The payload as a u64 (feature masks, REPLY_ACK answers, GET_* replies)."""
        return unpack_u64(self.payload, self.name)

    def take_fds(self) -> list[int]:
        """Hand the fds over to the caller, who must close them."""
        fds, self.fds = self.fds, []
        return fds

    def take_fd(self) -> int | None:
        """Hand over the single fd (None if there is none); ProtocolError if there are several."""
        if len(self.fds) > 1:
            raise ProtocolError(f"{self.name}: {len(self.fds)} fds where at most one was expected")
        return self.take_fds()[0] if self.fds else None

    def close(self) -> None:
        """Close the fds nobody took (unused, rejected, or REM_MEM_REG's legacy fd)."""
        if self.fds:                    # most messages carry none, and every one is closed
            _close_all(self.take_fds())

    def __enter__(self) -> Message:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Message({self.name}, flags={self.flags:#x}, size={len(self.payload)}, fds={self.fds})"


def check_message(msg: Message, table: Mapping[Request, RequestSpec] = FRONTEND_REQUESTS,
                  negotiated: ProtocolFeature | int | None = None) -> RequestSpec:
    """Validate a received request against ``table`` (and the ``negotiated`` protocol features,
    if given) and return its spec; on any violation close the message's fds and raise."""
    try:
        spec = table.get(msg.request) or lookup(msg.request, table)
        if msg.flags & VHOST_USER_REPLY_MASK:
            raise ProtocolError(f"{spec.name}: a request arrived with the REPLY flag set")
        nfds = len(msg.fds)
        _check_shape(spec, "", msg.payload, nfds, spec.size, spec.fds, spec.check)
        if negotiated is not None and (spec.features or nfds and spec.fd_features):
            spec.require(negotiated, nfds)
    except BaseException:
        msg.close()
        raise
    return spec


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# Connection
# --------------------------------------------------------------------------------------------

_FD_BYTES = array.array("i").itemsize
# Plain ints: socket's flag enums cost a call per operation.
_MSG_CTRUNC, _MSG_CMSG_CLOEXEC, _MSG_NOSIGNAL = int(socket.MSG_CTRUNC), int(socket.MSG_CMSG_CLOEXEC), int(socket.MSG_NOSIGNAL)
_MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
#: Each request code space's members by code (a dict lookup, where calling the enum is a slow path).
_MEMBERS = {enum_type: {int(m): m for m in enum_type} for enum_type in (FrontendRequest, BackendRequest)}


def _members_of(requests: type[enum.IntEnum]) -> dict[int, enum.IntEnum]:
    """``requests``' members by code, made once per enum."""
    members = _MEMBERS.get(requests)
    if members is None:
        members = _MEMBERS[requests] = {int(m): m for m in requests}
    return members


class _Partial:
    """A message read in part by Connection.recv_nowait: the header bytes and fds so far, then
    (header complete, checked) the payload so far; ``since`` is when its first byte arrived."""

    __slots__ = ("header", "fds", "request", "flags", "size", "payload", "got", "since")

    def __init__(self) -> None:
        self.header = b""
        self.fds: list[int] = []
        self.request = self.flags = 0
        self.size = -1                          # -1 until the header is complete
        self.payload: bytearray | None = None
        self.got = 0
        self.since = time.monotonic()

    def __repr__(self) -> str:
        fds = f" ({len(self.fds)} fds)" if self.fds else ""
        if self.size < 0:
            return f"{len(self.header)} of {VHOST_USER_HDR_SIZE} header bytes{fds}"
        return f"{self.got} of {self.size} payload bytes of {request_name(self.request)}{fds}"


class Connection:
    """One vhost-user stream: messages and their SCM_RIGHTS fds over an AF_UNIX SOCK_STREAM socket.

    ``requests`` names the code space the socket carries (FrontendRequest on the main socket,
    BackendRequest on the SET_BACKEND_REQ_FD channel); received codes become its members.
    After a peer broke the framing (bad header, truncated message, wrong reply) the connection
    refuses further use: close it (the spec's answer to a wrong message).
    """

    def __init__(self, sock: socket.socket, *, requests: type[FrontendRequest] | type[BackendRequest] = FrontendRequest,
                 max_payload: int = VHOST_USER_MAX_PAYLOAD, max_fds: int = VHOST_USER_MAX_FDS) -> None:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise ValueError(f"vhost-user needs an AF_UNIX SOCK_STREAM socket, not {sock!r}")
        self._sock = sock
        self.requests = requests
        self._members = _members_of(requests)   # codes -> members, for _check_header
        self.max_payload = max_payload
        self.max_fds = max_fds
        # Room for one more fd than allowed, so max_fds + 1 is reported as "too many", not truncation.
        self._cmsg_space = socket.CMSG_SPACE((max_fds + 1) * _FD_BYTES)
        self._send_lock = threading.Lock()
        self._recv_lock = threading.RLock()     # also held across request(): send, then its reply
        self._failure: VhostError | None = None
        self._partial: _Partial | None = None   # recv_nowait: the message read in part
        # make_nonblocking: what the kernel did not take yet, [data, duplicated fds] per message.
        self._out: deque[list] | None = None
        self._out_bytes = self._out_fds = 0
        self._out_since: float | None = None    # when the queue last made progress (None: empty)
        self.max_queued = VHOST_USER_MAX_QUEUED
        self.max_queued_fds = VHOST_USER_MAX_QUEUED_FDS
        self._wait_ms = -1                      # make_nonblocking(timeout=): poll() bound of blocking calls

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def connect(cls, path: str | os.PathLike, **kwargs) -> Connection:
        """Connect to a listening vhost-user socket (client role); OSError if nobody listens."""
        path = check_socket_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock, **kwargs)

    @classmethod
    def from_fd(cls, fd: int, **kwargs) -> Connection:
        """Adopt an already-connected socket fd (``--fd=N``, socket activation); it becomes ours."""
        sock = socket.socket(fileno=fd)
        try:
            conn = cls(sock, **kwargs)
        except BaseException:
            sock.detach()                       # not ours after all: leave the caller's fd open
            raise
        sock.set_inheritable(False)
        return conn

    @classmethod
    def pair(cls, **kwargs) -> tuple[Connection, Connection]:
        """Two connected ends (socketpair), for tests and in-process front-end/back-end pairs."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(a, **kwargs), cls(b, **kwargs)

    # -- fd ownership -------------------------------------------------------------------------

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def sock(self) -> socket.socket:
        """The underlying socket (for event loops that want it rather than fileno())."""
        return self._sock

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0

    def close(self) -> None:
        """Close the socket, and the fds of a message read in part or queued for sending."""
        partial, self._partial = self._partial, None
        if partial is not None:
            _close_all(partial.fds)
        if self._out:
            for _data, fds in self._out:
                _close_all(fds)
            self._out.clear()
            self._out_bytes = self._out_fds = 0
            self._out_since = None
        self._sock.close()

    # -- never waiting (a loop serving many peers) ----------------------------------------------

    def make_nonblocking(self, *, max_queued: int = VHOST_USER_MAX_QUEUED,
                         max_queued_fds: int = VHOST_USER_MAX_QUEUED_FDS, timeout: float | None = None) -> None:
        """Never let this peer hold up the caller: the socket becomes non-blocking, recv_nowait()
        assembles messages across reads, and send() queues what the kernel does not take at once
        -- at most ``max_queued`` bytes and ``max_queued_fds`` fds, beyond which send() raises
        VhostError (ENOBUFS) and the connection is unusable; flush() sends the queue. The blocking
        calls (recv, request) still work; with ``timeout`` each of their waits ends in TimeoutError."""
        self._sock.setblocking(False)
        self.max_queued, self.max_queued_fds = max_queued, max_queued_fds
        self._wait_ms = -1 if timeout is None else max(0, round(timeout * 1000))
        if self._out is None:
            self._out = deque()

    @property
    def timeout(self) -> float | None:
        """How long each wait of a blocking call lasts on a non-blocking connection (None: no bound)."""
        return None if self._wait_ms < 0 else self._wait_ms / 1000

    @property
    def pending_output(self) -> int:
        """Bytes send() queued that the peer has not taken yet (make_nonblocking)."""
        return self._out_bytes

    @property
    def output_stalled_since(self) -> float | None:
        """time.monotonic() when queued output last made progress; None when nothing is queued."""
        return self._out_since

    @property
    def partial_since(self) -> float | None:
        """time.monotonic() when the first byte of a message read in part arrived; None between messages."""
        partial = self._partial
        return None if partial is None else partial.since

    @property
    def partial(self) -> str | None:
        """What arrived so far of a message read in part (for log lines); None between messages."""
        partial = self._partial
        return None if partial is None else repr(partial)

    def flush(self) -> bool:
        """Send what send() queued, as far as the socket takes it now; True when nothing is left.
        DisconnectedError if the peer is gone."""
        with self._send_lock:
            out = self._out
            if not out:
                return True
            try:
                while out:
                    entry = out[0]
                    data, fds = entry
                    sent = self._send_nowait(data, fds)
                    if not sent:
                        return False
                    self._out_bytes -= sent
                    self._out_since = time.monotonic()
                    if fds:                     # delivered with the first byte
                        entry[1] = []
                        self._out_fds -= len(fds)
                        _close_all(fds)
                    if sent < len(data):
                        entry[0] = data[sent:]
                        return False
                    out.popleft()
            except VhostError as exc:
                self._failure = exc
                raise
            self._out_since = None
            return True

    def _send_nowait(self, data, fds: Sequence[int]) -> int:
        """One sendmsg that does not wait: the bytes the kernel took (0 when its buffer is full)."""
        try:
            if fds:
                return self._sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                                          _MSG_NOSIGNAL | _MSG_DONTWAIT)
            return self._sock.send(data, _MSG_NOSIGNAL | _MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 0
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise DisconnectedError(f"peer closed the connection while we were sending: {exc.strerror}",
                                    exc.errno) from exc

    def _send_queued(self, request: int, data: bytes, fds: Sequence[int]) -> None:
        """send() on a non-blocking connection: straight out when nothing waits before it (the
        kernel takes it all), else behind the queue, order of bytes and fds kept."""
        out = self._out
        if not out:
            sent = self._send_nowait(data, fds)
            if sent == len(data):
                return
            if sent:
                data, fds = data[sent:], ()     # the fds went with the first byte
            self._out_since = time.monotonic()
        if self._out_bytes + len(data) > self.max_queued or self._out_fds + len(fds) > self.max_queued_fds:
            raise VhostError(f"{request_name(request)}: the peer does not read what we send: {self._out_bytes} "
                             f"bytes and {self._out_fds} fds wait already (at most {self.max_queued} bytes and "
                             f"{self.max_queued_fds} fds)", errno.ENOBUFS)
        kept = [os.dup(fd) for fd in fds]       # the caller keeps its fds; ours go when sent
        out.append([memoryview(data), kept])
        self._out_bytes += len(data)
        self._out_fds += len(kept)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Connection fd={self.fileno()} {self.requests.__name__}>"

    # -- sending ------------------------------------------------------------------------------

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *, flags: int | None = None,
             reply: bool = False, need_reply: bool = False) -> None:
        """Send one message: header and payload in one sendmsg, the fds riding on the header.

        ``flags`` defaults to VHOST_USER_VERSION; ``reply`` / ``need_reply`` add their bits.
        The caller keeps ownership of ``fds`` (the kernel duplicates them into the peer).
        """
        if len(fds) > self.max_fds:
            raise ValueError(f"{request_name(request)}: {len(fds)} fds, at most {self.max_fds} per message")
        if flags is None:
            flags = VHOST_USER_VERSION
        if reply:
            flags |= VHOST_USER_REPLY_MASK
        if need_reply:
            flags |= VHOST_USER_NEED_REPLY_MASK
        data = HEADER.pack(int(request), flags, len(payload)) + bytes(payload)
        with self._send_lock:
            if self._failure is not None:
                self._check_usable()
            try:
                if self._out is None:
                    self._send_all(data, fds)
                else:
                    self._send_queued(request, data, fds)
            except VhostError as exc:
                self._failure = exc
                raise
            except BaseException as exc:
                self._failure = ProtocolError(f"sending {request_name(request)} failed: {exc!r}")
                raise

    def reply(self, msg: Message, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """Answer ``msg``: same request code, REPLY flag set, NEED_REPLY clear."""
        self.send(msg.request, payload, fds, reply=True)

    def reply_u64(self, msg: Message, value: int = 0) -> None:
        """Answer ``msg`` with a u64: the REPLY_ACK answer (0 = success) or a GET_* value."""
        self.send(msg.request, U64.pack(value), reply=True)

    def _send_all(self, data: bytes, fds: Sequence[int]) -> None:
        if not fds:                             # the common case: one send takes it all
            try:
                sent = self._sock.send(data, _MSG_NOSIGNAL)
            except (InterruptedError, BlockingIOError):
                sent = 0
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise DisconnectedError(f"peer closed the connection while we were sending: {exc.strerror}",
                                        exc.errno) from exc
            if sent == len(data):
                return
            data = data[sent:]
        view = memoryview(data)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        while view:
            try:
                if ancillary:
                    sent = self._retry(select.POLLOUT, self._sock.sendmsg, [view], ancillary, socket.MSG_NOSIGNAL)
                    ancillary = []                  # delivered with the first byte sent
                else:
                    sent = self._retry(select.POLLOUT, self._sock.send, view, socket.MSG_NOSIGNAL)
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise DisconnectedError(f"peer closed the connection while we were sending: {exc.strerror}",
                                        exc.errno) from exc
            view = view[sent:]

    # -- receiving ----------------------------------------------------------------------------

    def recv(self) -> Message:
        """Read one message: the header (and its fds) with recvmsg, then exactly ``size`` payload bytes.

        DisconnectedError on EOF (before or inside a message); ProtocolError for a bad version,
        reserved flag bits, a payload over ``max_payload``, more than ``max_fds`` fds or
        truncated ancillary data. Received fds are close-on-exec, and closed on every error.
        """
        with self._recv_lock:
            if self._failure is not None:
                self._check_usable()
            fds: list[int] = []
            progress = [False]                  # set once a byte of the message was consumed
            if self._partial is not None:           # recv_nowait() left a message in part: finish it
                return self._finish_partial()
            try:
                request, flags, size = self._check_header(self._recv_header(fds, progress), len(fds))
                payload = self._recv_exact(size, request) if size else b""
            except BaseException as exc:
                _close_all(fds)
                if isinstance(exc, VhostError):
                    self._failure = exc
                elif progress[0]:                # e.g. a timeout inside a message: framing lost
                    self._failure = ProtocolError(f"receiving a message failed midway: {exc!r}")
                raise
            return Message(request, flags, payload, fds)

    def recv_nowait(self) -> Message | None:
        """Read what the socket holds, without waiting: the next message once it is complete, else
        None (what arrived is kept -- header bytes, their fds, payload -- for the next call).

        A whole message that is there takes two reads, as with recv(); the same checks and errors.
        Meant for a socket without a timeout (make_nonblocking() sees to it): Python waits up to
        a socket timeout before each read.
        """
        with self._recv_lock:
            if self._failure is not None:
                self._check_usable()
            try:
                return self._assemble()
            except BaseException as exc:
                partial, self._partial = self._partial, None
                if partial is not None:
                    _close_all(partial.fds)
                self._failure = exc if isinstance(exc, VhostError) else ProtocolError(
                    f"receiving a message failed midway: {exc!r}")
                raise

    def _assemble(self) -> Message | None:
        """recv_nowait's work: advance the message in part as far as the socket allows. A message
        that is all there and carries no fds (most are) is read without a _Partial."""
        sock = self._sock
        p = self._partial
        if p is None:
            data, ancdata, msg_flags = self._recv_header_bytes(VHOST_USER_HDR_SIZE)
            if data is None:
                return None
            if len(data) == VHOST_USER_HDR_SIZE and not ancdata and not msg_flags & _MSG_CTRUNC:
                header = data
                request, flags, size = self._check_header(header, 0)
                if not size:
                    return Message(request, flags, b"", [])
                fds: list[int] = []
            else:
                p = _Partial()
                if not self._take_header_bytes(p, data, ancdata, msg_flags) and self._read_header(p) is None:
                    return None
        elif p.size < 0 and self._read_header(p) is None:
            return None
        if p is not None:
            header, request, flags, size, fds = p.header, p.request, p.flags, p.size, p.fds
        if size and (p is None or p.payload is None):     # the payload is usually there, in one piece
            reset = None
            try:
                data = sock.recv(size, _MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                data = None
            except ConnectionResetError as exc:
                data, reset = None, exc
            if data is not None and len(data) == size:
                self._partial = None
                return Message(request, flags, data, fds)
            if p is None:                               # kept for the next call: now it needs a _Partial
                p = _Partial()
                p.header, p.request, p.flags, p.size, p.fds = header, request, flags, size, fds
            if reset is not None:
                raise DisconnectedError(f"peer reset the connection inside {p!r}: {reset.strerror}",
                                        reset.errno) from reset
            if data is not None and not data:
                raise DisconnectedError(f"peer closed the connection after {p!r}")
            p.payload = bytearray(size)
            self._partial = p
            if not data:
                return None                     # nothing of the payload yet
            p.payload[:len(data)] = data
            p.got = len(data)
        if p.got < size:
            view = memoryview(p.payload)
            while p.got < size:
                try:
                    n = sock.recv_into(view[p.got:], 0, _MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    return None
                except ConnectionResetError as exc:
                    raise DisconnectedError(f"peer reset the connection inside {p!r}: {exc.strerror}",
                                            exc.errno) from exc
                if not n:
                    raise DisconnectedError(f"peer closed the connection after {p!r}")
                p.got += n
        self._partial = None
        return Message(p.request, p.flags, bytes(p.payload) if size else b"", p.fds)

    def _recv_header_bytes(self, count: int) -> tuple:
        """One recvmsg of up to ``count`` header bytes and their fds: (data, ancdata, flags), or
        (None, None, 0) when the socket has nothing now."""
        try:
            data, ancdata, msg_flags, _addr = self._sock.recvmsg(count, self._cmsg_space,
                                                                 _MSG_CMSG_CLOEXEC | _MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None, None, 0
        except ConnectionResetError as exc:
            raise DisconnectedError(f"peer reset the connection: {exc.strerror}", exc.errno) from exc
        return data, ancdata, msg_flags

    def _take_header_bytes(self, p: _Partial, data: bytes, ancdata: list, msg_flags: int) -> bool:
        """Add one read of header bytes (and the fds that rode on them) to ``p``, which then owns
        those fds; True once the header is complete (and checked)."""
        if ancdata:
            self._partial = p                   # p owns the fds now: closed if this goes wrong
            _collect_fds(ancdata, p.fds)
            if len(p.fds) > self.max_fds and len(p.header) + len(data) < VHOST_USER_HDR_SIZE:
                raise ProtocolError(f"{len(p.fds)} fds, at most {self.max_fds} per message (with "
                                    f"{len(p.header) + len(data)} header bytes)")
        if msg_flags & _MSG_CTRUNC:
            raise ProtocolError(f"ancillary data truncated: the peer sent more than {self.max_fds} fds")
        if not data:
            where = f" after {p!r}" if p.header or p.fds else ""
            raise DisconnectedError(f"peer closed the connection{where}")
        p.header += data
        if len(p.header) < VHOST_USER_HDR_SIZE:
            self._partial = p
            return False
        p.request, p.flags, p.size = self._check_header(p.header, len(p.fds))
        return True

    def _read_header(self, p: _Partial) -> _Partial | None:
        """Read the rest of ``p``'s header; ``p`` once it is complete, None if the socket ran dry."""
        while True:
            data, ancdata, msg_flags = self._recv_header_bytes(VHOST_USER_HDR_SIZE - len(p.header))
            if data is None:
                return None
            if self._take_header_bytes(p, data, ancdata, msg_flags):
                return p

    def _finish_partial(self) -> Message:
        """recv() after recv_nowait() left a message in part: wait for the rest of it."""
        while True:
            msg = self.recv_nowait()
            if msg is not None:
                return msg
            self._wait(select.POLLIN)

    def _check_header(self, header: bytes, nfds: int) -> tuple[int, int, int]:
        """(request, flags, size) of a received header, checked: the version, the reserved flag
        bits, ``size`` against max_payload and the fd count against max_fds (ProtocolError)."""
        code, flags, size = HEADER.unpack(header)
        request = self._members.get(code, code)     # unknown codes stay ints: the dispatcher rejects them
        version = flags & VHOST_USER_VERSION_MASK
        if version != VHOST_USER_VERSION:
            raise ProtocolError(f"{request_name(request)}: header version {version} (flags {flags:#x}), "
                                f"expected {VHOST_USER_VERSION}")
        if flags & VHOST_USER_RESERVED_FLAGS:
            raise ProtocolError(f"{request_name(request)}: reserved header flag bits "
                                f"{flags & VHOST_USER_RESERVED_FLAGS:#x} set")
        if size > self.max_payload:
            raise ProtocolError(f"{request_name(request)}: payload of {size} bytes exceeds the "
                                f"{self.max_payload}-byte limit")
        if nfds > self.max_fds:
            raise ProtocolError(f"{request_name(request)}: {nfds} fds, at most {self.max_fds} per message")
        return request, flags, size

    def request(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *,
                need_reply: bool = False) -> Message:
        """Send a request and return its reply (for requests that get one, or with ``need_reply``).

        The reply must carry the same request code and the REPLY flag; its size is whatever the
        peer sent (SET_LOG_BASE: 8 bytes from libvhost-user, 16 from rust-vmm), to be checked with
        ``RequestSpec.validate_reply``. The caller owns the reply's fds.
        """
        with self._recv_lock:
            self.send(request, payload, fds, need_reply=need_reply)
            while not self.flush():             # make_nonblocking: the request must be out first
                self._wait(select.POLLOUT)
            msg = self.recv()
        if msg.request != request or not msg.is_reply:
            msg.close()
            error = ProtocolError(f"waiting for the reply to {request_name(request)}, got {msg!r}")
            self._failure = error
            raise error
        return msg

    def _recv_header(self, fds: list[int], progress: list[bool]) -> bytes:
        header = b""
        while len(header) < VHOST_USER_HDR_SIZE:
            try:
                data, ancdata, msg_flags, _addr = self._retry(select.POLLIN, self._sock.recvmsg,
                                                              VHOST_USER_HDR_SIZE - len(header), self._cmsg_space,
                                                              _MSG_CMSG_CLOEXEC)
            except ConnectionResetError as exc:
                raise DisconnectedError(f"peer reset the connection: {exc.strerror}", exc.errno) from exc
            if ancdata:
                _collect_fds(ancdata, fds)
            if msg_flags & _MSG_CTRUNC:
                raise ProtocolError(f"ancillary data truncated: the peer sent more than {self.max_fds} fds")
            if not data:
                where = f" after {len(header)} of {VHOST_USER_HDR_SIZE} header bytes" if header else ""
                raise DisconnectedError(f"peer closed the connection{where}")
            header += data
            progress[0] = True
        return header

    def _recv_exact(self, size: int, request: int) -> bytes:
        try:
            data = self._sock.recv(size)        # the common case: the payload is there, in one piece
        except (InterruptedError, BlockingIOError):
            data = b""                          # nothing yet: the loop below waits for it
        except ConnectionResetError as exc:
            raise DisconnectedError(f"peer reset the connection inside {request_name(request)}: "
                                    f"{exc.strerror}", exc.errno) from exc
        else:
            if len(data) == size:
                return data
            if not data:
                raise DisconnectedError(f"peer closed the connection after 0 of {size} payload bytes "
                                        f"of {request_name(request)}")
        payload = bytearray(size)
        payload[:len(data)] = data
        got = len(data)
        view = memoryview(payload)
        while got < size:
            try:
                n = self._retry(select.POLLIN, self._sock.recv_into, view[got:])
            except ConnectionResetError as exc:
                raise DisconnectedError(f"peer reset the connection inside {request_name(request)}: "
                                        f"{exc.strerror}", exc.errno) from exc
            if n == 0:
                raise DisconnectedError(f"peer closed the connection after {got} of {size} payload bytes "
                                        f"of {request_name(request)}")
            got += n
        return bytes(payload)

    def _retry(self, events: int, call: Callable, *args):
        """``call(*args)`` on our socket, retried after EINTR and, on a non-blocking socket, after
        polling for ``events`` on EAGAIN: a message once started is finished, not dropped."""
        while True:
            try:
                return call(*args)
            except InterruptedError:
                continue
            except BlockingIOError:
                self._wait(events)

    def _wait(self, events: int) -> None:
        """Wait until our socket is ready for ``events``: TimeoutError after make_nonblocking's
        ``timeout``, if one was given."""
        poller = select.poll()
        poller.register(self._sock.fileno(), events)
        if not poller.poll(self._wait_ms) and self._wait_ms >= 0:
            raise TimeoutError(errno.ETIMEDOUT, f"the peer did not answer within {self._wait_ms} ms")

    def _check_usable(self) -> None:
        failure = self._failure
        if failure is None:
            return
        if isinstance(failure, DisconnectedError):
            raise DisconnectedError(f"connection already lost: {failure}")
        raise ProtocolError(f"connection unusable after an earlier error: {failure}")


def _collect_fds(ancdata: list[tuple[int, int, bytes]], fds: list[int]) -> None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[:len(data) - len(data) % _FD_BYTES])
            fds.extend(received)


#: sun_path holds 108 bytes with the terminating NUL (Linux's UNIX_PATH_MAX): the longest path is 107.
UNIX_PATH_MAX = 107


def check_socket_path(path: str | os.PathLike) -> str:
    """The path as a str, or a VhostError (ENAMETOOLONG) naming the limit when AF_UNIX cannot hold it.

    Python's socket module says only "AF_UNIX path too long" (no errno, no limit, no path)."""
    path = os.fspath(path)
    length = len(os.fsencode(path))
    if length > UNIX_PATH_MAX:
        raise VhostError(f"socket path is {length} bytes, longer than AF_UNIX allows ({UNIX_PATH_MAX}): "
                         f"{path}", errno.ENAMETOOLONG)
    return path


class Listener:
    """A listening vhost-user socket (server role): ``accept()`` returns a Connection.

    A stale socket file at ``path`` (nobody accepting on it) is replaced; a live one or a non-socket
    file is an error. close() removes the socket file if it is still ours.
    """

    def __init__(self, path: str | os.PathLike, *, backlog: int = 1, **connection_kwargs) -> None:
        self.path = check_socket_path(path)
        self._connection_kwargs = connection_kwargs
        self._identity: tuple[int, int] | None = None
        abstract = self.path.startswith("\0")
        if not abstract:
            _remove_stale_socket(self.path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            temporary = f"{self.path}.{os.getpid()}.tmp"
            if abstract or len(os.fsencode(temporary)) > UNIX_PATH_MAX:
                # No room for the temporary name (or no file at all): bind in place.
                self._sock.bind(self.path)
                self._sock.listen(backlog)
                if not abstract:
                    st = os.stat(self.path)
                    self._identity = (st.st_dev, st.st_ino)
            else:
                # Bind under a temporary name, listen, then rename into place: the socket file
                # appears only once it accepts, so a peer that waits for the file never meets a
                # bound-but-not-listening socket (ECONNREFUSED).
                _remove_stale_socket(temporary)
                self._sock.bind(temporary)
                try:
                    self._sock.listen(backlog)
                    os.rename(temporary, self.path)
                except BaseException:
                    os.unlink(temporary)
                    raise
                st = os.stat(self.path)
                self._identity = (st.st_dev, st.st_ino)
        except BaseException:
            self.close()
            raise

    def accept(self) -> Connection:
        """Wait for a peer and return its Connection (blocking unless the socket was made non-blocking)."""
        sock, _addr = self._sock.accept()
        return Connection(sock, **self._connection_kwargs)

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        if self._identity is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._identity:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            self._identity = None
        self._sock.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Listener {self.path!r} fd={self.fileno()}>"


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file nobody listens on; refuse to touch a live socket or any other file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise VhostError(f"{path} exists and is not a socket; refusing to replace it", errno.EEXIST)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        try:
            os.unlink(path)                      # stale: left behind by a process that is gone
        except FileNotFoundError:
            pass
        return
    except TimeoutError:
        pass                                     # a full backlog: someone is there, just busy
    except OSError as exc:
        raise VhostError(f"{path}: cannot tell whether it is in use: {exc.strerror}", exc.errno) from exc
    finally:
        probe.close()
    raise VhostError(f"{path} is in use: another process is listening on it", errno.EADDRINUSE)
