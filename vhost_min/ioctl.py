"""Kernel vhost: the ioctl ABI of linux/vhost.h and linux/vhost_types.h, defined once, and one
class per device node (/dev/vhost-net, /dev/vhost-vsock, /dev/vhost-scsi) implementing
:class:`vhost_min.dataplane.Dataplane`.

Read top to bottom: the ``_IOC`` encoding, the ctypes mirrors of the uapi structs (named as in the
headers, so grep finds both), every ``VHOST_*`` ioctl number (:class:`VhostIoctl`, also exported as
module constants), the VHOST_BACKEND_F_* bits, the one call helper :func:`ioctl` that turns an
OSError into an :class:`~vhost_min.errors.IoctlError` naming the ioctl, then the device classes.

Encoding. Numbers are computed as the kernel's asm-generic ``_IOC`` does (dir << 30 | size << 16
| type << 8 | nr), with sizes from ``ctypes.sizeof`` so they follow the C compiler's layout on
each architecture: that is the encoding of x86-64, aarch64, riscv64 and s390x (and 32-bit arm,
i386, loongarch). powerpc, mips, sparc, alpha and parisc put direction and size elsewhere; there
the module still imports, and the first ioctl raises VhostError saying why.

Enable. These kernel devices have no per-ring enable, so ``set_vring_enable`` maps to each
device's own switch: :class:`VhostNet` attaches its backend (a tap or packet socket fd) to the
ring with VHOST_NET_SET_BACKEND and detaches it with VHOST_FILE_UNBIND; :class:`VhostVsock` runs
(VHOST_VSOCK_SET_RUNNING 1) once both its rings are enabled and stops when either is disabled;
:class:`VhostScsi` has no switch per ring (VHOST_SCSI_SET_ENDPOINT starts all of them) and raises
NotSupportedError.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import os
import select
from collections.abc import Sequence
from ctypes import c_char, c_int, c_uint, c_uint16, c_uint32, c_uint64, c_uint8, c_ushort

from .dataplane import Dataplane
from .errors import IoctlError, NotSupportedError, ProtocolError, VhostError
from .memory import VHOST_LOG_PAGE as VHOST_PAGE_SIZE  # noqa: F401 (the same fact, re-exported)
from .memory import address_of, map_fd
from .user import IotlbMsg, MemoryRegion, VringAddr, VringState

# --------------------------------------------------------------------------------------------
# The _IOC encoding (include/uapi/asm-generic/ioctl.h)
# --------------------------------------------------------------------------------------------

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS, _IOC_DIRBITS = 8, 8, 14, 2
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2

#: os.uname().machine prefixes of the architectures whose ioctl.h is not asm-generic's.
_OTHER_IOC_ENCODING = ("alpha", "mips", "parisc", "ppc", "powerpc", "sparc")
_MACHINE = os.uname().machine


def _IOC(dir: int, type: int, nr: int, size: int) -> int:  # noqa: A002 (the kernel's names)
    """An ioctl request number in the asm-generic layout; each field must fit its bits."""
    for what, value, bits in (("dir", dir, _IOC_DIRBITS), ("type", type, _IOC_TYPEBITS),
                              ("nr", nr, _IOC_NRBITS), ("size", size, _IOC_SIZEBITS)):
        if not 0 <= value < 1 << bits:
            raise ValueError(f"_IOC {what} {value:#x} does not fit in {bits} bits")
    return dir << _IOC_DIRSHIFT | size << _IOC_SIZESHIFT | type << _IOC_TYPESHIFT | nr << _IOC_NRSHIFT


def _IO(type: int, nr: int) -> int:  # noqa: A002
    return _IOC(_IOC_NONE, type, nr, 0)


def _IOR(type: int, nr: int, ctype: type) -> int:  # noqa: A002
    return _IOC(_IOC_READ, type, nr, ctypes.sizeof(ctype))


def _IOW(type: int, nr: int, ctype: type) -> int:  # noqa: A002
    return _IOC(_IOC_WRITE, type, nr, ctypes.sizeof(ctype))


def _IOWR(type: int, nr: int, ctype: type) -> int:  # noqa: A002
    return _IOC(_IOC_READ | _IOC_WRITE, type, nr, ctypes.sizeof(ctype))


# --------------------------------------------------------------------------------------------
# The uapi structs (linux/vhost_types.h), named as there
# --------------------------------------------------------------------------------------------

class vhost_vring_state(ctypes.Structure):  # noqa: N801
    """SET_VRING_NUM/BASE, GET_VRING_BASE, VRING_ENDIAN, BUSYLOOP_TIMEOUT, vDPA VRING_ENABLE/GROUP."""

    _fields_ = [("index", c_uint), ("num", c_uint)]


class vhost_vring_file(ctypes.Structure):  # noqa: N801
    """SET_VRING_KICK/CALL/ERR, NET_SET_BACKEND: a ring and an fd (VHOST_FILE_UNBIND to unbind)."""

    _fields_ = [("index", c_uint), ("fd", c_int)]


class vhost_vring_addr(ctypes.Structure):  # noqa: N801
    """SET_VRING_ADDR: user addresses of the ring parts; flags bit VHOST_VRING_F_LOG logs used writes."""

    _fields_ = [("index", c_uint), ("flags", c_uint), ("desc_user_addr", c_uint64), ("used_user_addr", c_uint64),
                ("avail_user_addr", c_uint64), ("log_guest_addr", c_uint64)]


class vhost_worker_state(ctypes.Structure):  # noqa: N801
    """NEW_WORKER (the kernel writes the id) and FREE_WORKER."""

    _fields_ = [("worker_id", c_uint)]


class vhost_vring_worker(ctypes.Structure):  # noqa: N801
    """ATTACH_VRING_WORKER and GET_VRING_WORKER: a ring and a worker id."""

    _fields_ = [("index", c_uint), ("worker_id", c_uint)]


class vhost_iotlb_msg(ctypes.Structure):  # noqa: N801
    """One IOTLB update, invalidation or miss: perm is VHOST_ACCESS_*, type VHOST_IOTLB_*."""

    _fields_ = [("iova", c_uint64), ("size", c_uint64), ("uaddr", c_uint64), ("perm", c_uint8), ("type", c_uint8)]


class _vhost_msg_union(ctypes.Union):  # noqa: N801 (the headers' anonymous union)
    _fields_ = [("iotlb", vhost_iotlb_msg), ("padding", c_uint8 * 64)]


class vhost_msg(ctypes.Structure):  # noqa: N801
    """What write() and read() carry on a vhost fd, v1: int type (VHOST_IOTLB_MSG), then the union."""

    _anonymous_ = ("_u",)
    _fields_ = [("type", c_int), ("_u", _vhost_msg_union)]


class vhost_msg_v2(ctypes.Structure):  # noqa: N801
    """The same, v2 (VHOST_BACKEND_F_IOTLB_MSG_V2): u32 type (VHOST_IOTLB_MSG_V2), u32 asid, union."""

    _anonymous_ = ("_u",)
    _fields_ = [("type", c_uint32), ("asid", c_uint32), ("_u", _vhost_msg_union)]


class vhost_features_array(ctypes.Structure):  # noqa: N801
    """GET/SET_FEATURES_ARRAY: ``count`` u64 words of features in the flexible array ``features``."""

    _fields_ = [("count", c_uint64), ("features", c_uint64 * 0)]


class vhost_memory_region(ctypes.Structure):  # noqa: N801
    """One region of SET_MEM_TABLE: guest-physical start, size, and its address in this process."""

    _fields_ = [("guest_phys_addr", c_uint64), ("memory_size", c_uint64), ("userspace_addr", c_uint64),
                ("flags_padding", c_uint64)]     # no flags are defined


class vhost_memory(ctypes.Structure):  # noqa: N801
    """SET_MEM_TABLE: ``nregions`` regions in the flexible array ``regions`` (:func:`vhost_memory_buffer`)."""

    _fields_ = [("nregions", c_uint32), ("padding", c_uint32), ("regions", vhost_memory_region * 0)]


class vhost_scsi_target(ctypes.Structure):  # noqa: N801
    """SCSI_SET/CLEAR_ENDPOINT: the target's WWPN (NUL-terminated, TRANSPORT_IQN_LEN bytes) and TPGT."""

    _fields_ = [("abi_version", c_int), ("vhost_wwpn", c_char * 224),
                ("vhost_tpgt", c_ushort), ("reserved", c_ushort)]


class vhost_vdpa_config(ctypes.Structure):  # noqa: N801
    """VDPA_GET/SET_CONFIG: ``len`` bytes of config space at ``off`` in the flexible array ``buf``."""

    _fields_ = [("off", c_uint32), ("len", c_uint32), ("buf", c_uint8 * 0)]


class vhost_vdpa_iova_range(ctypes.Structure):  # noqa: N801
    """VDPA_GET_IOVA_RANGE: the first and last IOVA the device can map."""

    _fields_ = [("first", c_uint64), ("last", c_uint64)]


def vhost_memory_buffer(regions: Sequence[MemoryRegion]) -> ctypes.Array:
    """A SET_MEM_TABLE argument: a vhost_memory header and ``len(regions)`` vhost_memory_region,
    in one buffer. ``flags_padding`` is 0 (the kernel defines no flags; MemoryRegion's mmap_offset
    is vhost-user's and is not sent)."""
    n = len(regions)
    buf = (c_char * (ctypes.sizeof(vhost_memory) + n * ctypes.sizeof(vhost_memory_region)))()
    vhost_memory.from_buffer(buf).nregions = n
    table = (vhost_memory_region * n).from_buffer(buf, ctypes.sizeof(vhost_memory))
    for i, region in enumerate(regions):
        gpa, size, uaddr = tuple(region)[:3]
        table[i] = vhost_memory_region(_u64(gpa, f"memory region {i} guest_phys_addr"),
                                       _u64(size, f"memory region {i} memory_size"),
                                       _u64(uaddr, f"memory region {i} userspace_addr"), 0)
    return buf


# --------------------------------------------------------------------------------------------
# Constants (linux/vhost.h, linux/vhost_types.h)
# --------------------------------------------------------------------------------------------

VHOST_VIRTIO = 0xAF                 #: the ioctl type ("magic") of every vhost and vhost-vdpa ioctl
VHOST_FILE_UNBIND = -1              #: vhost_vring_file.fd that unbinds the ring's eventfd or backend
VHOST_SCSI_ABI_VERSION = 1          #: what VHOST_SCSI_GET_ABI_VERSION answers (rev 1: tpgt ignored)
VHOST_IOTLB_MSG = 0x1               #: vhost_msg.type
VHOST_IOTLB_MSG_V2 = 0x2            #: vhost_msg_v2.type
VHOST_VRING_LITTLE_ENDIAN = 0       #: SET/GET_VRING_ENDIAN num (legacy devices only)
VHOST_VRING_BIG_ENDIAN = 1
VHOST_FORK_OWNER_KTHREAD = 0        #: SET/GET_FORK_FROM_OWNER: workers are kernel threads
VHOST_FORK_OWNER_TASK = 1           #: ... or tasks forked from the owner (the default)
# VHOST_PAGE_SIZE (the dirty log's page) is memory.VHOST_LOG_PAGE, imported above. VHOST_F_LOG_ALL,
# VHOST_NET_F_VIRTIO_NET_HDR and VHOST_VRING_F_LOG are in virtio.py, VHOST_IOTLB_* types in user.py,
# VHOST_ACCESS_* perms in memory.py: like every feature constant there they are masks, not bit numbers.


class VhostBackendFeature(enum.IntFlag):
    """GET/SET_BACKEND_FEATURES bits, as masks (the header defines bit numbers)."""

    VHOST_BACKEND_F_IOTLB_MSG_V2 = 1 << 1        # write/read vhost_msg_v2
    VHOST_BACKEND_F_IOTLB_BATCH = 1 << 2         # BATCH_BEGIN / BATCH_END hints
    VHOST_BACKEND_F_IOTLB_ASID = 1 << 3          # vhost_msg_v2.asid is honoured
    VHOST_BACKEND_F_SUSPEND = 1 << 4             # VHOST_VDPA_SUSPEND
    VHOST_BACKEND_F_RESUME = 1 << 5              # VHOST_VDPA_RESUME
    VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK = 1 << 6  # rings may be enabled after DRIVER_OK
    VHOST_BACKEND_F_DESC_ASID = 1 << 7           # VHOST_VDPA_GET_VRING_DESC_GROUP
    VHOST_BACKEND_F_IOTLB_PERSIST = 1 << 8       # mappings survive a device reset


globals().update(VhostBackendFeature.__members__)


# --------------------------------------------------------------------------------------------
# The ioctls (linux/vhost.h)
# --------------------------------------------------------------------------------------------

class VhostIoctl(enum.IntEnum):
    """Every vhost and vhost-vdpa ioctl of current Linux, computed from (dir, type, nr, size)."""

    VHOST_GET_FEATURES = _IOR(VHOST_VIRTIO, 0x00, c_uint64)
    VHOST_SET_FEATURES = _IOW(VHOST_VIRTIO, 0x00, c_uint64)
    VHOST_SET_OWNER = _IO(VHOST_VIRTIO, 0x01)
    VHOST_RESET_OWNER = _IO(VHOST_VIRTIO, 0x02)
    VHOST_SET_MEM_TABLE = _IOW(VHOST_VIRTIO, 0x03, vhost_memory)
    VHOST_SET_LOG_BASE = _IOW(VHOST_VIRTIO, 0x04, c_uint64)
    VHOST_SET_LOG_FD = _IOW(VHOST_VIRTIO, 0x07, c_int)
    VHOST_NEW_WORKER = _IOR(VHOST_VIRTIO, 0x08, vhost_worker_state)
    VHOST_FREE_WORKER = _IOW(VHOST_VIRTIO, 0x09, vhost_worker_state)

    VHOST_SET_VRING_NUM = _IOW(VHOST_VIRTIO, 0x10, vhost_vring_state)
    VHOST_SET_VRING_ADDR = _IOW(VHOST_VIRTIO, 0x11, vhost_vring_addr)
    VHOST_SET_VRING_BASE = _IOW(VHOST_VIRTIO, 0x12, vhost_vring_state)
    VHOST_GET_VRING_BASE = _IOWR(VHOST_VIRTIO, 0x12, vhost_vring_state)
    VHOST_SET_VRING_ENDIAN = _IOW(VHOST_VIRTIO, 0x13, vhost_vring_state)
    # sic: the kernel declares this getter (and the three below marked so) with _IOW, although it
    # writes the answer back; the number is what the kernel compares, so it is computed the same way.
    VHOST_GET_VRING_ENDIAN = _IOW(VHOST_VIRTIO, 0x14, vhost_vring_state)
    VHOST_ATTACH_VRING_WORKER = _IOW(VHOST_VIRTIO, 0x15, vhost_vring_worker)
    VHOST_GET_VRING_WORKER = _IOWR(VHOST_VIRTIO, 0x16, vhost_vring_worker)

    VHOST_SET_VRING_KICK = _IOW(VHOST_VIRTIO, 0x20, vhost_vring_file)
    VHOST_SET_VRING_CALL = _IOW(VHOST_VIRTIO, 0x21, vhost_vring_file)
    VHOST_SET_VRING_ERR = _IOW(VHOST_VIRTIO, 0x22, vhost_vring_file)
    VHOST_SET_VRING_BUSYLOOP_TIMEOUT = _IOW(VHOST_VIRTIO, 0x23, vhost_vring_state)
    VHOST_GET_VRING_BUSYLOOP_TIMEOUT = _IOW(VHOST_VIRTIO, 0x24, vhost_vring_state)  # sic: _IOW
    VHOST_SET_BACKEND_FEATURES = _IOW(VHOST_VIRTIO, 0x25, c_uint64)
    VHOST_GET_BACKEND_FEATURES = _IOR(VHOST_VIRTIO, 0x26, c_uint64)

    VHOST_NET_SET_BACKEND = _IOW(VHOST_VIRTIO, 0x30, vhost_vring_file)

    VHOST_SCSI_SET_ENDPOINT = _IOW(VHOST_VIRTIO, 0x40, vhost_scsi_target)
    VHOST_SCSI_CLEAR_ENDPOINT = _IOW(VHOST_VIRTIO, 0x41, vhost_scsi_target)
    VHOST_SCSI_GET_ABI_VERSION = _IOW(VHOST_VIRTIO, 0x42, c_int)  # sic: _IOW
    VHOST_SCSI_SET_EVENTS_MISSED = _IOW(VHOST_VIRTIO, 0x43, c_uint32)
    VHOST_SCSI_GET_EVENTS_MISSED = _IOW(VHOST_VIRTIO, 0x44, c_uint32)  # sic: _IOW

    VHOST_VSOCK_SET_GUEST_CID = _IOW(VHOST_VIRTIO, 0x60, c_uint64)
    VHOST_VSOCK_SET_RUNNING = _IOW(VHOST_VIRTIO, 0x61, c_int)

    VHOST_VDPA_GET_DEVICE_ID = _IOR(VHOST_VIRTIO, 0x70, c_uint32)
    VHOST_VDPA_GET_STATUS = _IOR(VHOST_VIRTIO, 0x71, c_uint8)
    VHOST_VDPA_SET_STATUS = _IOW(VHOST_VIRTIO, 0x72, c_uint8)
    VHOST_VDPA_GET_CONFIG = _IOR(VHOST_VIRTIO, 0x73, vhost_vdpa_config)
    VHOST_VDPA_SET_CONFIG = _IOW(VHOST_VIRTIO, 0x74, vhost_vdpa_config)
    VHOST_VDPA_SET_VRING_ENABLE = _IOW(VHOST_VIRTIO, 0x75, vhost_vring_state)
    VHOST_VDPA_GET_VRING_NUM = _IOR(VHOST_VIRTIO, 0x76, c_uint16)
    VHOST_VDPA_SET_CONFIG_CALL = _IOW(VHOST_VIRTIO, 0x77, c_int)
    VHOST_VDPA_GET_IOVA_RANGE = _IOR(VHOST_VIRTIO, 0x78, vhost_vdpa_iova_range)
    VHOST_VDPA_GET_CONFIG_SIZE = _IOR(VHOST_VIRTIO, 0x79, c_uint32)
    VHOST_VDPA_GET_AS_NUM = _IOR(VHOST_VIRTIO, 0x7A, c_uint)
    VHOST_VDPA_GET_VRING_GROUP = _IOWR(VHOST_VIRTIO, 0x7B, vhost_vring_state)
    VHOST_VDPA_SET_GROUP_ASID = _IOW(VHOST_VIRTIO, 0x7C, vhost_vring_state)
    VHOST_VDPA_SUSPEND = _IO(VHOST_VIRTIO, 0x7D)
    VHOST_VDPA_RESUME = _IO(VHOST_VIRTIO, 0x7E)
    VHOST_VDPA_GET_VRING_DESC_GROUP = _IOWR(VHOST_VIRTIO, 0x7F, vhost_vring_state)
    VHOST_VDPA_GET_VQS_COUNT = _IOR(VHOST_VIRTIO, 0x80, c_uint32)
    VHOST_VDPA_GET_GROUP_NUM = _IOR(VHOST_VIRTIO, 0x81, c_uint32)
    VHOST_VDPA_GET_VRING_SIZE = _IOWR(VHOST_VIRTIO, 0x82, vhost_vring_state)

    # 2025: features beyond bit 63 (virtio 1.4), and worker threads vs kthreads. The fork-owner
    # pair was renumbered from 0x83 late in review; these are the merged numbers.
    VHOST_GET_FEATURES_ARRAY = _IOR(VHOST_VIRTIO, 0x83, vhost_features_array)
    VHOST_SET_FEATURES_ARRAY = _IOW(VHOST_VIRTIO, 0x83, vhost_features_array)
    VHOST_SET_FORK_FROM_OWNER = _IOW(VHOST_VIRTIO, 0x84, c_uint8)
    VHOST_GET_FORK_FROM_OWNER = _IOR(VHOST_VIRTIO, 0x85, c_uint8)


globals().update(VhostIoctl.__members__)


# --------------------------------------------------------------------------------------------
# The call
# --------------------------------------------------------------------------------------------

def ioctl_name(request: int) -> str:
    """The uapi name of a vhost ioctl number, or its hex value."""
    try:
        return VhostIoctl(request).name
    except ValueError:
        return f"ioctl {request:#x}"


def ioctl_error(name: str, err: int) -> IoctlError:
    """The IoctlError for ``name`` failing with ``err``; ENOTTY means the kernel lacks it."""
    if err == errno.ENOTTY:
        return IoctlError(f"{name} is not supported by this kernel", err, ioctl=name)
    return IoctlError(f"{name} failed: {os.strerror(err)}", err, ioctl=name)


def check_encoding() -> None:
    """Raise VhostError on an architecture whose ioctl numbers are not asm-generic's."""
    if _MACHINE.startswith(_OTHER_IOC_ENCODING):
        raise VhostError(f"vhost_min computes ioctl numbers with the asm-generic _IOC layout; {_MACHINE} "
                         f"encodes direction and size differently, so no vhost ioctl is issued here",
                         errno.ENOSYS)


def ioctl(fd: int, request: int, arg: object = 0, *, name: str | None = None) -> int:
    """ioctl(2) on a vhost fd: ``arg`` is an int passed as is, or a writable buffer (a ctypes
    object) the kernel reads and may write back. Returns the ioctl's result; raises IoctlError
    naming the ioctl (``name``, or the VhostIoctl name of ``request``) with the kernel's errno."""
    check_encoding()
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise ioctl_error(name or ioctl_name(request), exc.errno) from None


# --------------------------------------------------------------------------------------------
# Argument checks (before the ioctl: ctypes would silently truncate what does not fit)
# --------------------------------------------------------------------------------------------

def _uint(value: object, bits: int, what: str) -> int:
    if not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise ValueError(f"{what} {value!r} is not an unsigned {bits}-bit integer")
    return value


def _u32(value: object, what: str) -> int:
    return _uint(value, 32, what)


def _u64(value: object, what: str) -> int:
    return _uint(value, 64, what)


def _fd_or_unbind(fd: int | None, what: str) -> int:
    """An fd for vhost_vring_file / SET_LOG_FD: None is VHOST_FILE_UNBIND, negatives are refused."""
    if fd is None:
        return VHOST_FILE_UNBIND
    if not isinstance(fd, int) or isinstance(fd, bool) or not 0 <= fd <= 0x7FFFFFFF:
        raise ValueError(f"{what} fd {fd!r} is not a file descriptor (None unbinds)")
    return fd


def encode_iotlb_msg(msg: IotlbMsg, *, v2: bool, asid: int = 0) -> ctypes.Structure:
    """The vhost_msg (v1) or vhost_msg_v2 that carries ``msg`` on a vhost fd."""
    body = vhost_iotlb_msg(_u64(msg.iova, "IOTLB iova"), _u64(msg.size, "IOTLB size"),
                           _u64(msg.uaddr, "IOTLB uaddr"), _uint(msg.perm, 8, "IOTLB perm"),
                           _uint(msg.type, 8, "IOTLB type"))
    if v2:
        out = vhost_msg_v2(type=VHOST_IOTLB_MSG_V2, asid=_u32(asid, "IOTLB asid"))
    elif asid:
        raise ValueError(f"asid {asid} needs a v2 message (VHOST_BACKEND_F_IOTLB_MSG_V2)")
    else:
        out = vhost_msg(type=VHOST_IOTLB_MSG)
    out.iotlb = body
    return out


def decode_iotlb_msg(data: bytes) -> tuple[IotlbMsg, int]:
    """(IotlbMsg, asid) from a vhost_msg or vhost_msg_v2 read from a vhost fd (asid 0 for v1)."""
    kind = c_uint32.from_buffer_copy(data[:4]).value if len(data) >= 4 else None
    layout = {VHOST_IOTLB_MSG: vhost_msg, VHOST_IOTLB_MSG_V2: vhost_msg_v2}.get(kind)
    if layout is None or len(data) < ctypes.sizeof(layout):
        raise ProtocolError(f"the kernel sent a {len(data)}-byte vhost message of type {kind!r}, "
                            f"neither a vhost_msg nor a vhost_msg_v2")
    raw = layout.from_buffer_copy(data[:ctypes.sizeof(layout)])
    t = raw.iotlb
    return IotlbMsg(t.iova, t.size, t.uaddr, t.perm, t.type), getattr(raw, "asid", 0)


_MSG_READ_SIZE = max(ctypes.sizeof(vhost_msg), ctypes.sizeof(vhost_msg_v2))


# --------------------------------------------------------------------------------------------
# The devices
# --------------------------------------------------------------------------------------------

class VhostKernel(Dataplane):
    """One open vhost device node: the ioctls every vhost device shares, as methods named after
    them. Memory regions' ``userspace_addr`` are addresses in this process (the kernel reads our
    mappings); ``fd=None`` for kick/call/err is VHOST_FILE_UNBIND. The object owns its fd:
    ``close()`` or a ``with`` block releases it (and the dirty-log mapping).

    Open ``path`` (default :attr:`DEVICE`) read-write and close-on-exec, or take ownership of an
    already open ``fd`` (one passed in by a management process)."""

    DEVICE = ""          #: the node opened when neither a path nor an fd is given
    MODULE = "vhost"     #: the kernel module that provides it (named when the node is missing)

    def __init__(self, path: str | None = None, *, fd: int | None = None) -> None:
        self._fd = -1
        self._log: memoryview | None = None
        self._acked_backend_features = 0
        if fd is not None:
            if path is not None:
                raise ValueError("give a device path or an open fd, not both")
            if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
                raise ValueError(f"{fd!r} is not a file descriptor")
            self.path = f"fd {fd}"
            self._fd = fd
            return
        path = path or self.DEVICE
        if not path:
            raise ValueError(f"{type(self).__name__} has no default device node: give a path or an fd")
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            hint = f" (is the {self.MODULE} module loaded?)" if exc.errno == errno.ENOENT else ""
            raise VhostError(f"cannot open {path}: {exc.strerror}{hint}", exc.errno) from None

    def __repr__(self) -> str:
        state = "closed" if self._fd < 0 else f"fd={self._fd}"
        return f"<{type(self).__name__} {self.path} {state}>"

    # -- the fd -----------------------------------------------------------------------------------
    def fileno(self) -> int:
        """The device fd (for poll: it is readable when an IOTLB miss is waiting)."""
        if self._fd < 0:
            raise VhostError(f"{self!r} is closed", errno.EBADF)
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        """Close the device (the kernel stops its rings and drops its state), then unmap the log."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        self._drop_log()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def _ioctl(self, request: VhostIoctl, arg: object = 0) -> int:
        if self._fd < 0:
            raise VhostError(f"{request.name} on a closed {type(self).__name__} ({self.path})", errno.EBADF)
        return ioctl(self._fd, request, arg, name=request.name)

    def _get_u64(self, request: VhostIoctl) -> int:
        value = c_uint64()
        self._ioctl(request, value)
        return value.value

    def _vring_state(self, request: VhostIoctl, index: int, num: int = 0) -> int:
        state = vhost_vring_state(_u32(index, "vring index"), _u32(num, f"{request.name} num"))
        self._ioctl(request, state)
        return state.num

    def _vring_file(self, request: VhostIoctl, index: int, fd: int | None) -> None:
        self._ioctl(request, vhost_vring_file(_u32(index, "vring index"), _fd_or_unbind(fd, request.name)))

    # -- device-wide ------------------------------------------------------------------------------
    def set_owner(self) -> None:
        """VHOST_SET_OWNER: this process owns the device (EBUSY if someone already does)."""
        self._ioctl(VhostIoctl.VHOST_SET_OWNER)

    def reset_owner(self) -> None:
        """VHOST_RESET_OWNER: stop everything and give ownership up."""
        self._ioctl(VhostIoctl.VHOST_RESET_OWNER)

    def get_features(self) -> int:
        """VHOST_GET_FEATURES: the virtio features (masks) the device offers."""
        return self._get_u64(VhostIoctl.VHOST_GET_FEATURES)

    def set_features(self, features: int) -> None:
        """VHOST_SET_FEATURES: the features the driver acknowledged (EOPNOTSUPP for others)."""
        self._ioctl(VhostIoctl.VHOST_SET_FEATURES, c_uint64(_u64(features, "features")))

    def get_features_array(self, count: int = 2) -> int:
        """VHOST_GET_FEATURES_ARRAY: every offered feature, bit 64 and up included, read as
        ``count`` u64 words."""
        buf = (c_uint64 * (1 + _uint(count, 16, "feature word count")))(count)
        self._features_array(VhostIoctl.VHOST_GET_FEATURES_ARRAY, buf)
        return sum(word << 64 * i for i, word in enumerate(buf[1:]))

    def set_features_array(self, features: int) -> None:
        """VHOST_SET_FEATURES_ARRAY: acknowledged features of any width, in u64 words."""
        if not isinstance(features, int) or features < 0:
            raise ValueError(f"features {features!r} are not a non-negative integer")
        count = max(1, -(-features.bit_length() // 64))
        words = [features >> 64 * i & (1 << 64) - 1 for i in range(count)]
        self._features_array(VhostIoctl.VHOST_SET_FEATURES_ARRAY, (c_uint64 * (1 + count))(count, *words))

    def _features_array(self, request: VhostIoctl, buf: ctypes.Array) -> None:
        try:
            self._ioctl(request, buf)
        except IoctlError as exc:
            # A kernel without these ioctls hands them to its per-ring handler, which reads the
            # word count as a ring index: ENOBUFS when it is not below the number of rings.
            if exc.errno != errno.ENOBUFS:
                raise
            raise IoctlError(f"{request.name} is not supported by this kernel (it read the word count "
                             f"as a ring index: ENOBUFS)", exc.errno, ioctl=request.name) from None

    def get_backend_features(self) -> VhostBackendFeature:
        """VHOST_GET_BACKEND_FEATURES: the VHOST_BACKEND_F_* bits the device offers."""
        return VhostBackendFeature(self._get_u64(VhostIoctl.VHOST_GET_BACKEND_FEATURES))

    def set_backend_features(self, features: int) -> None:
        """VHOST_SET_BACKEND_FEATURES: the bits acknowledged; with IOTLB_MSG_V2 acked,
        :meth:`send_iotlb_msg` writes vhost_msg_v2."""
        self._ioctl(VhostIoctl.VHOST_SET_BACKEND_FEATURES, c_uint64(_u64(features, "backend features")))
        self._acked_backend_features = features

    def set_mem_table(self, regions: Sequence[MemoryRegion], fds: Sequence[int] = ()) -> None:
        """VHOST_SET_MEM_TABLE: guest-physical ranges and where they are mapped in this process
        (``userspace_addr``). ``fds`` and ``mmap_offset`` are vhost-user's: the kernel ignores them."""
        self._ioctl(VhostIoctl.VHOST_SET_MEM_TABLE, vhost_memory_buffer(regions))

    def set_log_base(self, fd: int, mmap_size: int, mmap_offset: int = 0) -> None:
        """VHOST_SET_LOG_BASE with ``mmap_size`` bytes of ``fd`` from ``mmap_offset``, mapped
        MAP_SHARED here (the kernel sets bits through our mapping). The mapping lives until the
        next set_log_base or close(); the fd stays the caller's."""
        view = map_fd(fd, mmap_size, mmap_offset)
        try:
            self._set_log_base(address_of(view), view)
        except BaseException:
            view.release()
            raise

    def set_log_base_address(self, address: int) -> None:
        """VHOST_SET_LOG_BASE with a log the caller mapped at ``address`` in this process."""
        self._set_log_base(_u64(address, "log base address"), None)

    def _set_log_base(self, address: int, view: memoryview | None) -> None:
        self._ioctl(VhostIoctl.VHOST_SET_LOG_BASE, c_uint64(address))
        self._drop_log()
        self._log = view

    def _drop_log(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            log.release()      # unmapped with the last view of it

    def set_log_fd(self, fd: int | None) -> None:
        """VHOST_SET_LOG_FD: an eventfd the kernel signals after writing the log (None: none)."""
        self._ioctl(VhostIoctl.VHOST_SET_LOG_FD, c_int(_fd_or_unbind(fd, "VHOST_SET_LOG_FD")))

    def set_fork_from_owner(self, mode: int) -> None:
        """VHOST_SET_FORK_FROM_OWNER (before SET_OWNER): workers as VHOST_FORK_OWNER_TASK (forked
        from the owner, the default) or VHOST_FORK_OWNER_KTHREAD (kernel threads)."""
        self._ioctl(VhostIoctl.VHOST_SET_FORK_FROM_OWNER, c_uint8(_uint(mode, 8, "fork owner mode")))

    def get_fork_from_owner(self) -> int:
        """VHOST_GET_FORK_FROM_OWNER: VHOST_FORK_OWNER_TASK or VHOST_FORK_OWNER_KTHREAD."""
        value = c_uint8()
        self._ioctl(VhostIoctl.VHOST_GET_FORK_FROM_OWNER, value)
        return value.value

    # -- workers ----------------------------------------------------------------------------------
    def new_worker(self) -> int:
        """VHOST_NEW_WORKER: one more worker thread for this device; returns its id."""
        state = vhost_worker_state()
        self._ioctl(VhostIoctl.VHOST_NEW_WORKER, state)
        return state.worker_id

    def free_worker(self, worker_id: int) -> None:
        """VHOST_FREE_WORKER: free a worker no ring is attached to."""
        self._ioctl(VhostIoctl.VHOST_FREE_WORKER, vhost_worker_state(_u32(worker_id, "worker id")))

    def attach_vring_worker(self, index: int, worker_id: int) -> None:
        """VHOST_ATTACH_VRING_WORKER: ring ``index`` is served by worker ``worker_id`` from now on."""
        self._ioctl(VhostIoctl.VHOST_ATTACH_VRING_WORKER,
                    vhost_vring_worker(_u32(index, "vring index"), _u32(worker_id, "worker id")))

    def get_vring_worker(self, index: int) -> int:
        """VHOST_GET_VRING_WORKER: the id of the worker serving ring ``index``."""
        state = vhost_vring_worker(_u32(index, "vring index"), 0)
        self._ioctl(VhostIoctl.VHOST_GET_VRING_WORKER, state)
        return state.worker_id

    # -- per ring ---------------------------------------------------------------------------------
    def set_vring_num(self, index: int, num: int) -> None:
        """VHOST_SET_VRING_NUM: the ring's size."""
        self._vring_state(VhostIoctl.VHOST_SET_VRING_NUM, index, num)

    def set_vring_addr(self, addr: VringAddr) -> None:
        """VHOST_SET_VRING_ADDR: user addresses (in this process, or IOVAs with ACCESS_PLATFORM)
        of the ring parts, and with flags VHOST_VRING_F_LOG the used ring's guest address to log."""
        index, flags, desc, used, avail, log = addr
        self._ioctl(VhostIoctl.VHOST_SET_VRING_ADDR, vhost_vring_addr(
            _u32(index, "vring index"), _u32(flags, "vring address flags"), _u64(desc, "desc_user_addr"),
            _u64(used, "used_user_addr"), _u64(avail, "avail_user_addr"), _u64(log, "log_guest_addr")))

    def set_vring_base(self, index: int, num: int) -> None:
        """VHOST_SET_VRING_BASE: the avail index the ring resumes from."""
        self._vring_state(VhostIoctl.VHOST_SET_VRING_BASE, index, num)

    def get_vring_base(self, index: int) -> VringState:
        """VHOST_GET_VRING_BASE: the next avail index the device would have processed."""
        return VringState(index, self._vring_state(VhostIoctl.VHOST_GET_VRING_BASE, index))

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """VHOST_SET_VRING_KICK: the eventfd the driver writes after publishing buffers."""
        self._vring_file(VhostIoctl.VHOST_SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        """VHOST_SET_VRING_CALL: the eventfd the kernel writes after using buffers."""
        self._vring_file(VhostIoctl.VHOST_SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        """VHOST_SET_VRING_ERR: the eventfd the kernel writes when the ring cannot be accessed."""
        self._vring_file(VhostIoctl.VHOST_SET_VRING_ERR, index, fd)

    def set_vring_endian(self, index: int, big_endian: bool) -> None:
        """VHOST_SET_VRING_ENDIAN: a legacy (pre-VERSION_1) ring's byte order; only kernels built
        with CONFIG_VHOST_CROSS_ENDIAN_LEGACY have it."""
        self._vring_state(VhostIoctl.VHOST_SET_VRING_ENDIAN, index,
                          VHOST_VRING_BIG_ENDIAN if big_endian else VHOST_VRING_LITTLE_ENDIAN)

    def get_vring_endian(self, index: int) -> bool:
        """VHOST_GET_VRING_ENDIAN: True when the ring is big-endian."""
        return self._vring_state(VhostIoctl.VHOST_GET_VRING_ENDIAN, index) == VHOST_VRING_BIG_ENDIAN

    def set_vring_busyloop_timeout(self, index: int, timeout_us: int) -> None:
        """VHOST_SET_VRING_BUSYLOOP_TIMEOUT: how long the worker polls the ring before sleeping."""
        self._vring_state(VhostIoctl.VHOST_SET_VRING_BUSYLOOP_TIMEOUT, index, timeout_us)

    def get_vring_busyloop_timeout(self, index: int) -> int:
        """VHOST_GET_VRING_BUSYLOOP_TIMEOUT, in microseconds."""
        return self._vring_state(VhostIoctl.VHOST_GET_VRING_BUSYLOOP_TIMEOUT, index)

    # -- IOTLB (VIRTIO_F_ACCESS_PLATFORM) --------------------------------------------------------
    def send_iotlb_msg(self, msg: IotlbMsg, *, asid: int = 0, v2: bool | None = None) -> None:
        """write() one IOTLB message (UPDATE, INVALIDATE, BATCH_*) to the device: vhost_msg_v2
        when VHOST_BACKEND_F_IOTLB_MSG_V2 was acked here (or ``v2``), else vhost_msg."""
        if v2 is None:
            v2 = bool(self._acked_backend_features & VhostBackendFeature.VHOST_BACKEND_F_IOTLB_MSG_V2)
        raw = encode_iotlb_msg(msg, v2=v2, asid=asid)
        name = "VHOST_IOTLB_MSG_V2" if v2 else "VHOST_IOTLB_MSG"
        try:
            os.write(self.fileno(), raw)
        except OSError as exc:
            raise IoctlError(f"writing a {name} (type {msg.type}) failed: {exc.strerror}", exc.errno,
                             ioctl=name) from None

    def read_iotlb_msg(self) -> tuple[IotlbMsg, int] | None:
        """read() one message the kernel queued (a VHOST_IOTLB_MISS, with the IOVA and access it
        needs) as (IotlbMsg, asid), or None when none is waiting. Never blocks."""
        poller = select.poll()
        poller.register(self.fileno(), select.POLLIN)
        if not poller.poll(0):
            return None
        try:
            data = os.read(self._fd, _MSG_READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise IoctlError(f"reading a vhost IOTLB message failed: {exc.strerror}", exc.errno,
                             ioctl="VHOST_IOTLB_MSG") from None
        return decode_iotlb_msg(data)


class VhostNet(VhostKernel):
    """/dev/vhost-net: the kernel moves virtio-net frames between the rings (RX 0, TX 1) and a
    tap device or packet socket, the *backend*.

    ``set_vring_enable(i, True)`` is VHOST_NET_SET_BACKEND attaching ``backend_fd`` (given here or
    assigned later) to ring ``i``; ``False`` detaches it (VHOST_FILE_UNBIND), which stops the ring
    so GET_VRING_BASE is final. The backend fd stays the caller's: the kernel holds its own
    reference while attached. With a tap opened IFF_VNET_HDR the tap handles the virtio-net header
    (set its size to the driver's with TUNSETVNETHDRSZ); without it, negotiate
    VHOST_NET_F_VIRTIO_NET_HDR and the kernel adds and strips the header itself."""

    DEVICE = "/dev/vhost-net"
    MODULE = "vhost_net"
    RX_QUEUE, TX_QUEUE = 0, 1

    def __init__(self, path: str | None = None, *, fd: int | None = None, backend_fd: int | None = None) -> None:
        if backend_fd is not None:
            _fd_or_unbind(backend_fd, "backend")
        super().__init__(path, fd=fd)
        self.backend_fd = backend_fd

    def set_backend(self, index: int, fd: int | None) -> None:
        """VHOST_NET_SET_BACKEND: attach a tap or packet socket fd to ring ``index`` (None detaches)."""
        self._vring_file(VhostIoctl.VHOST_NET_SET_BACKEND, index, fd)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """Attach ``backend_fd`` to ring ``index`` (enable) or detach it (disable)."""
        if enable and self.backend_fd is None:
            raise VhostError(f"{self!r} has no backend to attach to ring {index}: set backend_fd to a tap "
                             f"or packet socket fd first", errno.EINVAL)
        self.set_backend(index, self.backend_fd if enable else None)


class VhostVsock(VhostKernel):
    """/dev/vhost-vsock: the kernel's AF_VSOCK host side of a guest's virtio-vsock device, rings
    RX 0 and TX 1 (the event queue, 2, is the VMM's). The device runs (VHOST_VSOCK_SET_RUNNING)
    while both rings are enabled with ``set_vring_enable``; :meth:`set_running` drives it directly."""

    DEVICE = "/dev/vhost-vsock"
    MODULE = "vhost_vsock"
    RX_QUEUE, TX_QUEUE = 0, 1

    def __init__(self, path: str | None = None, *, fd: int | None = None) -> None:
        super().__init__(path, fd=fd)
        self._enabled: set[int] = set()
        self._running = False

    def set_guest_cid(self, cid: int) -> None:
        """VHOST_VSOCK_SET_GUEST_CID: the guest's context id (3 and up; EADDRINUSE if taken)."""
        self._ioctl(VhostIoctl.VHOST_VSOCK_SET_GUEST_CID, c_uint64(_u64(cid, "guest CID")))

    def set_running(self, running: bool) -> None:
        """VHOST_VSOCK_SET_RUNNING: start (1) or stop (0) moving packets."""
        self._ioctl(VhostIoctl.VHOST_VSOCK_SET_RUNNING, c_int(1 if running else 0))
        self._running = bool(running)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """Mark ring ``index`` (0 or 1) enabled; SET_RUNNING 1 when both are, 0 when one is not."""
        if index not in (self.RX_QUEUE, self.TX_QUEUE):
            raise ValueError(f"vhost-vsock rings are {self.RX_QUEUE} (RX) and {self.TX_QUEUE} (TX), not {index!r}")
        enabled = self._enabled | {index} if enable else self._enabled - {index}
        want = enabled == {self.RX_QUEUE, self.TX_QUEUE}
        if want != self._running:
            self.set_running(want)
        self._enabled = enabled


class VhostScsi(VhostKernel):
    """/dev/vhost-scsi: virtio-scsi rings (control 0, event 1, requests 2...) served by a LIO
    target of the "vhost" fabric (configfs /sys/kernel/config/target/vhost/WWPN/tpgt_N).
    VHOST_SCSI_SET_ENDPOINT starts every ring at once; there is no per-ring enable."""

    DEVICE = "/dev/vhost-scsi"
    MODULE = "vhost_scsi"
    CONTROL_QUEUE, EVENT_QUEUE, REQUEST_QUEUE = 0, 1, 2
    #: vhost_wwpn's size (TRANSPORT_IQN_LEN), the NUL terminator included.
    WWPN_SIZE = vhost_scsi_target.vhost_wwpn.size

    def __init__(self, path: str | None = None, *, fd: int | None = None) -> None:
        super().__init__(path, fd=fd)
        self._endpoint: tuple[bytes, int] | None = None

    def _target(self, wwpn: str | bytes, tpgt: int) -> vhost_scsi_target:
        raw = wwpn.encode("utf-8") if isinstance(wwpn, str) else bytes(wwpn)
        if not raw.isascii() or b"\0" in raw or not 0 < len(raw) < self.WWPN_SIZE:
            raise ValueError(f"WWPN {wwpn!r} is not 1 to {self.WWPN_SIZE - 1} ASCII characters without NUL")
        return vhost_scsi_target(VHOST_SCSI_ABI_VERSION, raw, _uint(tpgt, 16, "TPGT"), 0)

    def set_endpoint(self, wwpn: str | bytes, tpgt: int = 0) -> None:
        """VHOST_SCSI_SET_ENDPOINT: serve the rings from the target ``wwpn`` (every TPG of it with
        a nexus; ABI 1 ignores ``tpgt``). The kernel answers ENODEV when no such target has a
        nexus, EFAULT before the memory table is set, EEXIST when the endpoint is already set."""
        target = self._target(wwpn, tpgt)
        self._ioctl(VhostIoctl.VHOST_SCSI_SET_ENDPOINT, target)
        self._endpoint = (target.vhost_wwpn, tpgt)

    def clear_endpoint(self, wwpn: str | bytes | None = None, tpgt: int | None = None) -> None:
        """VHOST_SCSI_CLEAR_ENDPOINT: stop serving ``wwpn`` (default: the one set here)."""
        if wwpn is None:
            if self._endpoint is None:
                raise VhostError(f"{self!r} has no endpoint set here: name the WWPN to clear", errno.EINVAL)
            wwpn = self._endpoint[0]
            tpgt = self._endpoint[1] if tpgt is None else tpgt
        self._ioctl(VhostIoctl.VHOST_SCSI_CLEAR_ENDPOINT, self._target(wwpn, tpgt or 0))
        self._endpoint = None

    def get_abi_version(self) -> int:
        """VHOST_SCSI_GET_ABI_VERSION: VHOST_SCSI_ABI_VERSION on every kernel since 2013."""
        value = c_int()
        self._ioctl(VhostIoctl.VHOST_SCSI_GET_ABI_VERSION, value)
        return value.value

    def set_events_missed(self, missed: bool) -> None:
        """VHOST_SCSI_SET_EVENTS_MISSED: whether hotplug events were lost (the guest rescans)."""
        self._ioctl(VhostIoctl.VHOST_SCSI_SET_EVENTS_MISSED, c_uint32(1 if missed else 0))

    def get_events_missed(self) -> bool:
        """VHOST_SCSI_GET_EVENTS_MISSED."""
        value = c_uint32()
        self._ioctl(VhostIoctl.VHOST_SCSI_GET_EVENTS_MISSED, value)
        return bool(value.value)

    def set_vring_enable(self, index: int, enable: bool) -> None:
        """Not a vhost-scsi operation: :meth:`set_endpoint` starts every ring, clear_endpoint stops them."""
        raise NotSupportedError(f"{type(self).__name__} has no per-ring enable: set_endpoint() starts every "
                                f"ring and clear_endpoint() stops them")


__all__ = [
    "ioctl", "ioctl_name", "ioctl_error", "check_encoding", "encode_iotlb_msg", "decode_iotlb_msg",
    "vhost_memory_buffer", "VhostIoctl", "VhostBackendFeature", "VhostKernel", "VhostNet", "VhostVsock",
    "VhostScsi", "vhost_vring_state", "vhost_vring_file", "vhost_vring_addr", "vhost_worker_state",
    "vhost_vring_worker", "vhost_iotlb_msg", "vhost_msg", "vhost_msg_v2", "vhost_features_array",
    "vhost_memory_region", "vhost_memory", "vhost_scsi_target", "vhost_vdpa_config", "vhost_vdpa_iova_range",
    "VHOST_VIRTIO", "VHOST_FILE_UNBIND", "VHOST_SCSI_ABI_VERSION", "VHOST_IOTLB_MSG", "VHOST_IOTLB_MSG_V2",
    "VHOST_PAGE_SIZE", "VHOST_VRING_LITTLE_ENDIAN", "VHOST_VRING_BIG_ENDIAN", "VHOST_FORK_OWNER_KTHREAD",
    "VHOST_FORK_OWNER_TASK", *VhostIoctl.__members__, *VhostBackendFeature.__members__,
]


# ============================================================================================
# VDUSE: the ABI of linux/vduse.h (a userspace program being a vDPA device), defined once.
# /dev/vduse/control creates and destroys devices; /dev/vduse/NAME carries the kernel's requests
# (read vduse_dev_request, write vduse_dev_response) and the per-device ioctls. The device
# itself is vhost_min/vdpa.py.
# ============================================================================================

VDUSE_BASE = 0x81                   #: the ioctl type ("magic") of every VDUSE ioctl
VDUSE_API_VERSION = 0               #: the API version VDUSE_SET_API_VERSION asks for
VDUSE_NAME_MAX = 256                #: vduse_dev_config.name and VDUSE_DESTROY_DEV's argument, NUL included
VDUSE_ACCESS_RO = 0x1               #: vduse_iotlb_entry.perm: the device may read
VDUSE_ACCESS_WO = 0x2               #: ... may write
VDUSE_ACCESS_RW = 0x3               #: ... both
VDUSE_EVENTFD_DEASSIGN = -1         #: vduse_vq_eventfd.fd that removes the kick eventfd
VDUSE_IOVA_CAP_UMEM = 1 << 0        #: vduse_iova_info.capability: the region accepts IOTLB_REG_UMEM
VDUSE_REQ_RESULT_OK = 0x00          #: vduse_dev_response.result
VDUSE_REQ_RESULT_FAILED = 0x01


class vduse_dev_config(ctypes.Structure):  # noqa: N801
    """VDUSE_CREATE_DEV: name, virtio ids, offered features, queue count and alignment, then
    ``config_size`` bytes of config space in the flexible array ``config``."""

    _fields_ = [("name", c_char * VDUSE_NAME_MAX), ("vendor_id", c_uint32), ("device_id", c_uint32),
                ("features", c_uint64), ("vq_num", c_uint32), ("vq_align", c_uint32),
                ("reserved", c_uint32 * 13), ("config_size", c_uint32), ("config", c_uint8 * 0)]


class vduse_iotlb_entry(ctypes.Structure):  # noqa: N801
    """VDUSE_IOTLB_GET_FD: in, the IOVA range [start, last]; out, the first overlapping region's
    [start, last], its mmap offset in the returned fd and VDUSE_ACCESS_* perm."""

    _fields_ = [("offset", c_uint64), ("start", c_uint64), ("last", c_uint64), ("perm", c_uint8)]


class vduse_config_data(ctypes.Structure):  # noqa: N801
    """VDUSE_DEV_SET_CONFIG: ``length`` bytes at ``offset`` of config space in the flexible array ``buffer``."""

    _fields_ = [("offset", c_uint32), ("length", c_uint32), ("buffer", c_uint8 * 0)]


class vduse_vq_config(ctypes.Structure):  # noqa: N801
    """VDUSE_VQ_SETUP: a queue's index and the largest size the driver may give it."""

    _fields_ = [("index", c_uint32), ("max_size", c_uint16), ("reserved", c_uint16 * 13)]


class vduse_vq_state_split(ctypes.Structure):  # noqa: N801
    """A split queue's state: the next avail index the device will read."""

    _fields_ = [("avail_index", c_uint16)]


class vduse_vq_state_packed(ctypes.Structure):  # noqa: N801
    """A packed queue's state: wrap counters and indices of both sides."""

    _fields_ = [("last_avail_counter", c_uint16), ("last_avail_idx", c_uint16),
                ("last_used_counter", c_uint16), ("last_used_idx", c_uint16)]


class _vduse_vq_state_union(ctypes.Union):  # noqa: N801 (the header's anonymous union)
    _fields_ = [("split", vduse_vq_state_split), ("packed", vduse_vq_state_packed)]


class vduse_vq_info(ctypes.Structure):  # noqa: N801
    """VDUSE_VQ_GET_INFO: a queue's size, ring IOVAs (desc, driver = avail, device = used), its
    state and whether the driver made it ready. The caller sets ``index``."""

    _anonymous_ = ("_u",)
    _fields_ = [("index", c_uint32), ("num", c_uint32), ("desc_addr", c_uint64), ("driver_addr", c_uint64),
                ("device_addr", c_uint64), ("_u", _vduse_vq_state_union), ("ready", c_uint8)]


class vduse_vq_eventfd(ctypes.Structure):  # noqa: N801
    """VDUSE_VQ_SETUP_KICKFD: a queue and the eventfd the kernel writes on a kick (or VDUSE_EVENTFD_DEASSIGN)."""

    _fields_ = [("index", c_uint32), ("fd", c_int)]


class vduse_iova_umem(ctypes.Structure):  # noqa: N801
    """VDUSE_IOTLB_REG_UMEM / DEREG_UMEM: page-aligned user memory backing an IOVA range."""

    _fields_ = [("uaddr", c_uint64), ("iova", c_uint64), ("size", c_uint64), ("reserved", c_uint64 * 3)]


class vduse_iova_info(ctypes.Structure):  # noqa: N801
    """VDUSE_IOTLB_GET_INFO: the first region overlapping [start, last] and its VDUSE_IOVA_CAP_* bits."""

    _fields_ = [("start", c_uint64), ("last", c_uint64), ("capability", c_uint64), ("reserved", c_uint64 * 3)]


class vduse_vq_state(ctypes.Structure):  # noqa: N801
    """GET_VQ_STATE's request (index only) and response (index and state)."""

    _anonymous_ = ("_u",)
    _fields_ = [("index", c_uint32), ("_u", _vduse_vq_state_union)]


class vduse_dev_status(ctypes.Structure):  # noqa: N801
    """SET_STATUS's request: the virtio device status byte the driver wrote."""

    _fields_ = [("status", c_uint8)]


class vduse_iova_range(ctypes.Structure):  # noqa: N801
    """UPDATE_IOTLB's request: the IOVA range [start, last] whose mappings changed."""

    _fields_ = [("start", c_uint64), ("last", c_uint64)]


class _vduse_dev_request_union(ctypes.Union):  # noqa: N801
    _fields_ = [("vq_state", vduse_vq_state), ("s", vduse_dev_status), ("iova", vduse_iova_range),
                ("padding", c_uint32 * 32)]


class vduse_dev_request(ctypes.Structure):  # noqa: N801
    """What read() on /dev/vduse/NAME gives: one request of VduseReqType with the id to answer."""

    _anonymous_ = ("_u",)
    _fields_ = [("type", c_uint32), ("request_id", c_uint32), ("reserved", c_uint32 * 4),
                ("_u", _vduse_dev_request_union)]


class _vduse_dev_response_union(ctypes.Union):  # noqa: N801
    _fields_ = [("vq_state", vduse_vq_state), ("padding", c_uint32 * 32)]


class vduse_dev_response(ctypes.Structure):  # noqa: N801
    """What write() on /dev/vduse/NAME takes: the request's id, VDUSE_REQ_RESULT_*, and for
    GET_VQ_STATE the queue's state."""

    _anonymous_ = ("_u",)
    _fields_ = [("request_id", c_uint32), ("result", c_uint32), ("reserved", c_uint32 * 4),
                ("_u", _vduse_dev_response_union)]


class VduseReqType(enum.IntEnum):
    """vduse_dev_request.type (enum vduse_req_type)."""

    VDUSE_GET_VQ_STATE = 0      # the queue's avail index (split) or wrap state (packed)
    VDUSE_SET_STATUS = 1        # the driver wrote the device status (0 resets)
    VDUSE_UPDATE_IOTLB = 2      # mappings in [start, last] changed: drop them, re-query with IOTLB_GET_FD


class VduseIoctl(enum.IntEnum):
    """Every VDUSE ioctl: control (/dev/vduse/control) 0x00-0x03, per device 0x10 and up."""

    VDUSE_GET_API_VERSION = _IOR(VDUSE_BASE, 0x00, c_uint64)
    VDUSE_SET_API_VERSION = _IOW(VDUSE_BASE, 0x01, c_uint64)
    VDUSE_CREATE_DEV = _IOW(VDUSE_BASE, 0x02, vduse_dev_config)
    VDUSE_DESTROY_DEV = _IOW(VDUSE_BASE, 0x03, c_char * VDUSE_NAME_MAX)

    VDUSE_IOTLB_GET_FD = _IOWR(VDUSE_BASE, 0x10, vduse_iotlb_entry)
    VDUSE_DEV_GET_FEATURES = _IOR(VDUSE_BASE, 0x11, c_uint64)
    VDUSE_DEV_SET_CONFIG = _IOW(VDUSE_BASE, 0x12, vduse_config_data)
    VDUSE_DEV_INJECT_CONFIG_IRQ = _IO(VDUSE_BASE, 0x13)
    VDUSE_VQ_SETUP = _IOW(VDUSE_BASE, 0x14, vduse_vq_config)
    VDUSE_VQ_GET_INFO = _IOWR(VDUSE_BASE, 0x15, vduse_vq_info)
    VDUSE_VQ_SETUP_KICKFD = _IOW(VDUSE_BASE, 0x16, vduse_vq_eventfd)
    VDUSE_VQ_INJECT_IRQ = _IOW(VDUSE_BASE, 0x17, c_uint32)
    VDUSE_IOTLB_REG_UMEM = _IOW(VDUSE_BASE, 0x18, vduse_iova_umem)
    VDUSE_IOTLB_DEREG_UMEM = _IOW(VDUSE_BASE, 0x19, vduse_iova_umem)
    VDUSE_IOTLB_GET_INFO = _IOWR(VDUSE_BASE, 0x1A, vduse_iova_info)


globals().update(VduseReqType.__members__)
globals().update(VduseIoctl.__members__)

__all__ += [  # noqa: PLE0605
    "VduseIoctl", "VduseReqType", "vduse_dev_config", "vduse_iotlb_entry", "vduse_config_data", "vduse_vq_config",
    "vduse_vq_state_split", "vduse_vq_state_packed", "vduse_vq_info", "vduse_vq_eventfd", "vduse_iova_umem",
    "vduse_iova_info", "vduse_vq_state", "vduse_dev_status", "vduse_iova_range", "vduse_dev_request",
    "vduse_dev_response", "VDUSE_BASE", "VDUSE_API_VERSION", "VDUSE_NAME_MAX", "VDUSE_ACCESS_RO",
    "VDUSE_ACCESS_WO", "VDUSE_ACCESS_RW", "VDUSE_EVENTFD_DEASSIGN", "VDUSE_IOVA_CAP_UMEM", "VDUSE_REQ_RESULT_OK",
    "VDUSE_REQ_RESULT_FAILED", *VduseReqType.__members__, *VduseIoctl.__members__,
]
