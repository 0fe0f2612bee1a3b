"""virtio-blk (virtio 1.3 §5.2): the request and config layouts, a device over a raw image file or
block device, and the client a frontend uses to talk to any vhost-user-blk back-end.

Read top to bottom: the facts of linux/virtio_blk.h (feature bits, request types, status values,
``struct virtio_blk_config``, the request header and discard/write-zeroes segments), then
:class:`BlockImage` (the image and every request type on it, usable without any vhost machinery),
:class:`BlkDevice` (the vhost-user device: features and config space around a BlockImage) and
:class:`BlkClient` (the driver side, through real virtqueues).

A request chain is ``{le32 type, le32 ioprio, le64 sector}`` device-readable, then data (readable
for writes, writable for reads), then one device-writable status byte, the last byte of the chain.
Data moves with ``os.preadv`` / ``os.pwritev`` straight between the image and guest memory views,
or, with an asynchronous engine (aio.py: io_uring or a thread pool), through :meth:`BlockImage.start`
and :meth:`BlockImage.finish` around the engine's operation.

Cache modes (``cache=``, as qemu-storage-daemon's ``cache.direct`` / ``cache.writeback``):
``writeback`` (the page cache; writes are stable after FLUSH), ``writethrough`` (every write is
stable before it completes: RWF_DSYNC, or fdatasync where pwritev2 flags are refused) and ``none``
(O_DIRECT, writeback semantics: the disk's own cache needs FLUSH). Under O_DIRECT guest buffers
are used in place when their address and length are multiples of the file's direct-I/O alignment
(:attr:`BlockImage.align`); others are copied through an aligned bounce buffer (counted in
:attr:`BlockImage.bounced`), and a request whose offset or length is not aligned goes through a
second, buffered fd (counted in :attr:`BlockImage.buffered`).

FLUSH on an asynchronous engine is submitted at once, beside whatever is in flight (QEMU's
virtio-blk does the same): virtio 1.3 §5.2.6.2 asks a flush to cover the writes *completed* before
it was sent, and a write is completed for the driver only once we have reaped its completion
from the engine, so the fdatasync (IORING_OP_FSYNC with IORING_FSYNC_DATASYNC) starts after it
finished and covers it. Writes still in flight when the flush arrives are not the driver's to
count on, exactly as with a disk's own queue.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
import time
from typing import NamedTuple

from . import aio as _aio
from .device import Device
from .user import VHOST_SET_CONFIG_TYPE_MIGRATION, ProtocolFeature
from .ioctl import _IO
from .memory import address_of, libc
from .errors import NotNegotiatedError, NotSupportedError, VhostError, VirtqueueError
from .virtio import DeviceId, DeviceStatus, VirtioFeature

__all__ = ["VirtioBlkFeature", "VirtioBlkType", "VirtioBlkStatus", "BlkConfig", "VIRTIO_BLK_CONFIG",
           "VIRTIO_BLK_CONFIG_OFFSETS", "VIRTIO_BLK_OUTHDR", "VIRTIO_BLK_DISCARD_WRITE_ZEROES", "VIRTIO_BLK_ID_BYTES",
           "VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP", "SECTOR_SIZE", "BlockImage", "BlkDevice", "BLK_DRIVER_FEATURES",
           "BlkClient", "BlkRequest", "BlkCompletion", "BlkRequestError", "CACHE_MODES", "AIO_MODES",
           "BLK_STATE", "BLK_STATE_MAGIC", "BLK_STATE_VERSION", "BlkStateError"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# linux/virtio_blk.h
# --------------------------------------------------------------------------------------------

class VirtioBlkFeature(enum.IntFlag):
    """Block device feature bits (virtio 1.3 §5.2.3), as masks."""

    VIRTIO_BLK_F_BARRIER = 1 << 0         # legacy: request barriers
    VIRTIO_BLK_F_SIZE_MAX = 1 << 1        # size_max: largest single data segment
    VIRTIO_BLK_F_SEG_MAX = 1 << 2         # seg_max: most data segments per request
    VIRTIO_BLK_F_GEOMETRY = 1 << 4        # legacy disk geometry
    VIRTIO_BLK_F_RO = 1 << 5              # the disk is read-only
    VIRTIO_BLK_F_BLK_SIZE = 1 << 6        # blk_size: the logical block size
    VIRTIO_BLK_F_SCSI = 1 << 7            # legacy: SCSI packet commands
    VIRTIO_BLK_F_FLUSH = 1 << 9           # VIRTIO_BLK_T_FLUSH (legacy name VIRTIO_BLK_F_WCE)
    VIRTIO_BLK_F_TOPOLOGY = 1 << 10       # physical_block_exp, alignment_offset, min/opt_io_size
    VIRTIO_BLK_F_CONFIG_WCE = 1 << 11     # wce: the driver toggles writeback / writethrough
    VIRTIO_BLK_F_MQ = 1 << 12             # num_queues request queues
    VIRTIO_BLK_F_DISCARD = 1 << 13        # VIRTIO_BLK_T_DISCARD and its limits
    VIRTIO_BLK_F_WRITE_ZEROES = 1 << 14   # VIRTIO_BLK_T_WRITE_ZEROES and its limits
    VIRTIO_BLK_F_LIFETIME = 1 << 15       # VIRTIO_BLK_T_GET_LIFETIME (spec only; not in this header)
    VIRTIO_BLK_F_SECURE_ERASE = 1 << 16   # VIRTIO_BLK_T_SECURE_ERASE and its limits
    VIRTIO_BLK_F_ZONED = 1 << 17          # zoned block device (spec; newer headers)


VIRTIO_BLK_F_SIZE_MAX = VirtioBlkFeature.VIRTIO_BLK_F_SIZE_MAX
VIRTIO_BLK_F_SEG_MAX = VirtioBlkFeature.VIRTIO_BLK_F_SEG_MAX
VIRTIO_BLK_F_RO = VirtioBlkFeature.VIRTIO_BLK_F_RO
VIRTIO_BLK_F_BLK_SIZE = VirtioBlkFeature.VIRTIO_BLK_F_BLK_SIZE
VIRTIO_BLK_F_FLUSH = VirtioBlkFeature.VIRTIO_BLK_F_FLUSH
VIRTIO_BLK_F_TOPOLOGY = VirtioBlkFeature.VIRTIO_BLK_F_TOPOLOGY
VIRTIO_BLK_F_CONFIG_WCE = VirtioBlkFeature.VIRTIO_BLK_F_CONFIG_WCE
VIRTIO_BLK_F_MQ = VirtioBlkFeature.VIRTIO_BLK_F_MQ
VIRTIO_BLK_F_DISCARD = VirtioBlkFeature.VIRTIO_BLK_F_DISCARD
VIRTIO_BLK_F_WRITE_ZEROES = VirtioBlkFeature.VIRTIO_BLK_F_WRITE_ZEROES


class VirtioBlkType(enum.IntEnum):
    """virtio_blk_outhdr.type (virtio 1.3 §5.2.6)."""

    VIRTIO_BLK_T_IN = 0
    VIRTIO_BLK_T_OUT = 1
    VIRTIO_BLK_T_SCSI_CMD = 2             # legacy
    VIRTIO_BLK_T_FLUSH = 4
    VIRTIO_BLK_T_GET_ID = 8
    VIRTIO_BLK_T_GET_LIFETIME = 10        # spec only
    VIRTIO_BLK_T_DISCARD = 11
    VIRTIO_BLK_T_WRITE_ZEROES = 13
    VIRTIO_BLK_T_SECURE_ERASE = 14


VIRTIO_BLK_T_IN = VirtioBlkType.VIRTIO_BLK_T_IN
VIRTIO_BLK_T_OUT = VirtioBlkType.VIRTIO_BLK_T_OUT
VIRTIO_BLK_T_FLUSH = VirtioBlkType.VIRTIO_BLK_T_FLUSH
VIRTIO_BLK_T_GET_ID = VirtioBlkType.VIRTIO_BLK_T_GET_ID
VIRTIO_BLK_T_DISCARD = VirtioBlkType.VIRTIO_BLK_T_DISCARD
VIRTIO_BLK_T_WRITE_ZEROES = VirtioBlkType.VIRTIO_BLK_T_WRITE_ZEROES
_T_IN, _T_OUT = int(VIRTIO_BLK_T_IN), int(VIRTIO_BLK_T_OUT)    # plain ints for the hot path


class VirtioBlkStatus(enum.IntEnum):
    """The request's final status byte."""

    VIRTIO_BLK_S_OK = 0
    VIRTIO_BLK_S_IOERR = 1                # device or driver error
    VIRTIO_BLK_S_UNSUPP = 2               # request type (or flag) not supported


VIRTIO_BLK_S_OK = VirtioBlkStatus.VIRTIO_BLK_S_OK
VIRTIO_BLK_S_IOERR = VirtioBlkStatus.VIRTIO_BLK_S_IOERR
VIRTIO_BLK_S_UNSUPP = VirtioBlkStatus.VIRTIO_BLK_S_UNSUPP

VIRTIO_BLK_ID_BYTES = 20                        #: GET_ID's NUL-padded ASCII id string
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 0x00000001  #: segment flag: write zeroes may deallocate
SECTOR_SIZE = 512                               #: the protocol's unit, whatever blk_size says (SECTOR_SHIFT 9)

#: struct virtio_blk_outhdr {le32 type; le32 ioprio (virtio 1.x: reserved); le64 sector}
VIRTIO_BLK_OUTHDR = struct.Struct("<IIQ")
#: struct virtio_blk_discard_write_zeroes {le64 sector; le32 num_sectors; le32 flags}
VIRTIO_BLK_DISCARD_WRITE_ZEROES = struct.Struct("<QII")

# struct virtio_blk_config, field by field (None: padding the device leaves zero).
_CONFIG_FIELDS = (
    ("capacity", "Q"),                  # 512-byte sectors, always present
    ("size_max", "I"),                  # VIRTIO_BLK_F_SIZE_MAX
    ("seg_max", "I"),                   # VIRTIO_BLK_F_SEG_MAX
    ("cylinders", "H"),                 # geometry, VIRTIO_BLK_F_GEOMETRY
    ("heads", "B"),
    ("sectors", "B"),
    ("blk_size", "I"),                  # VIRTIO_BLK_F_BLK_SIZE
    ("physical_block_exp", "B"),        # topology, VIRTIO_BLK_F_TOPOLOGY
    ("alignment_offset", "B"),
    ("min_io_size", "H"),
    ("opt_io_size", "I"),
    ("wce", "B"),                       # VIRTIO_BLK_F_CONFIG_WCE (the spec's "writeback")
    (None, "x"),                        # unused
    ("num_queues", "H"),                # VIRTIO_BLK_F_MQ
    ("max_discard_sectors", "I"),       # VIRTIO_BLK_F_DISCARD
    ("max_discard_seg", "I"),
    ("discard_sector_alignment", "I"),
    ("max_write_zeroes_sectors", "I"),  # VIRTIO_BLK_F_WRITE_ZEROES
    ("max_write_zeroes_seg", "I"),
    ("write_zeroes_may_unmap", "B"),
    (None, "3x"),                       # unused1[3]
    ("max_secure_erase_sectors", "I"),  # VIRTIO_BLK_F_SECURE_ERASE
    ("max_secure_erase_seg", "I"),
    ("secure_erase_sector_alignment", "I"),
)
#: struct virtio_blk_config (72 bytes), little-endian as virtio 1.x says
VIRTIO_BLK_CONFIG = struct.Struct("<" + "".join(code for _, code in _CONFIG_FIELDS))
#: offsetof(struct virtio_blk_config, <field>) for every field
VIRTIO_BLK_CONFIG_OFFSETS = {
    name: struct.calcsize("<" + "".join(code for _, code in _CONFIG_FIELDS[:i]))
    for i, (name, _) in enumerate(_CONFIG_FIELDS) if name is not None}


class BlkConfig(NamedTuple):
    """struct virtio_blk_config as values (fields a feature does not cover stay 0)."""

    capacity: int = 0
    size_max: int = 0
    seg_max: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    blk_size: int = 0
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    wce: int = 0
    num_queues: int = 0
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0
    max_secure_erase_sectors: int = 0
    max_secure_erase_seg: int = 0
    secure_erase_sector_alignment: int = 0

    def pack(self) -> bytes:
        return VIRTIO_BLK_CONFIG.pack(*self)

    @classmethod
    def unpack(cls, data: bytes) -> BlkConfig:
        """From a config read that may be shorter than the struct (fields past it read as 0)."""
        data = bytes(data[:VIRTIO_BLK_CONFIG.size])
        return cls._make(VIRTIO_BLK_CONFIG.unpack(data.ljust(VIRTIO_BLK_CONFIG.size, b"\0")))


assert tuple(VIRTIO_BLK_CONFIG_OFFSETS) == BlkConfig._fields and VIRTIO_BLK_CONFIG.size == 72


# --------------------------------------------------------------------------------------------
# fallocate(2) (linux/falloc.h): the stdlib has only posix_fallocate, which cannot punch holes
# --------------------------------------------------------------------------------------------

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_fallocate = getattr(libc, "fallocate64", None) or libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

# fallocate errnos that mean "this file (system) cannot do that mode here", not "the disk failed"
_FALLOC_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV, errno.ENOTTY})


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); OSError with the errno on failure."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(mode={mode:#x}): {os.strerror(err)}")


# --------------------------------------------------------------------------------------------
# Scatter-gather helpers (the views are memoryview slices of guest memory)
# --------------------------------------------------------------------------------------------

#: Most views one preadv / pwritev takes (sysconf(_SC_IOV_MAX), 1024 on Linux); longer lists are split.
IOV_MAX = (os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 0) or 1024
if IOV_MAX < 1:
    IOV_MAX = 1024
_ZEROS = memoryview(bytes(1 << 20))      # shared source for writing zeros, never copied


def _skip(views: list[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes."""
    for i, v in enumerate(views):
        if n < len(v):
            return [v[n:], *views[i + 1:]] if n else views[i:]
        n -= len(v)
    return []


def _gather(views: list[memoryview], n: int) -> tuple[bytes | None, list[memoryview]]:
    """The first ``n`` bytes of ``views`` (None if they hold fewer) and the views after them."""
    buf = bytearray()
    for i, v in enumerate(views):
        need = n - len(buf)
        if len(v) >= need:
            buf += v[:need]
            return bytes(buf), _skip(views[i:], need)
        buf += v
    return None, []


def _split_status(writable: list[memoryview]) -> tuple[list[memoryview], memoryview]:
    """(data views, status view): the status is the last byte of the device-writable part."""
    for i in range(len(writable) - 1, -1, -1):
        v = writable[i]
        if len(v):
            data = writable[:i]
            if len(v) > 1:
                data.append(v[:-1])
            return data, v[-1:]
    raise VirtqueueError("virtio-blk request without a device-writable status byte")


def _nbytes(views: list[memoryview]) -> int:
    return sum(map(len, views))


def _readv(fd: int, views: list[memoryview], offset: int, length: int, done: int = 0) -> None:
    """Finish filling ``views`` from ``fd`` at ``offset`` after a first preadv moved ``done``
    bytes (short transfers, more than IOV_MAX views); past the end of the file reads as zeros."""
    views, offset, length = _skip(views, done), offset + done, length - done
    while length:
        n = os.preadv(fd, views[:IOV_MAX], offset)
        if n == 0:                       # end of file (the image shrank under us)
            for v in views:
                v[:] = bytes(len(v))
            return
        views, offset, length = _skip(views, n), offset + n, length - n


def _writev(fd: int, views: list[memoryview], offset: int, length: int, flags: int, done: int = 0) -> None:
    """Finish writing ``views`` to ``fd`` at ``offset`` after a first pwritev moved ``done``
    bytes (``flags``: os.RWF_DSYNC for writethrough)."""
    views, offset, length = _skip(views, done), offset + done, length - done
    while length:
        n = os.pwritev(fd, views[:IOV_MAX], offset, flags)
        if n == 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        views, offset, length = _skip(views, n), offset + n, length - n


# --------------------------------------------------------------------------------------------
# The image and its requests
# --------------------------------------------------------------------------------------------

#: Magic numbers of disk image formats that are not raw, where QEMU's block drivers probe them
#: (offset, bytes, format): served as a raw disk, their metadata would be the guest's disk.
IMAGE_MAGICS = (
    (0, b"QFI\xfb", "qcow2"),
    (0, b"QED\x00", "qed"),
    (0, b"KDMV", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk descriptor"),
    (0x40, b"\x7f\x10\xda\xbe", "vdi"),           # le32 0xbeda107f
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc (VHD)"),
    (0, b"LUKS\xba\xbe", "LUKS"),
)
_MAGIC_BYTES = max(offset + len(magic) for offset, magic, _ in IMAGE_MAGICS)


def image_format(head: bytes) -> str | None:
    """The non-raw image format whose magic ``head`` (an image's first bytes) starts with, or None."""
    for offset, magic, name in IMAGE_MAGICS:
        if head[offset:offset + len(magic)] == magic:
            return name
    return None


#: cache= of BlockImage / BlkDevice and --cache of the blk command (qemu-storage-daemon's
#: cache.direct=on is "none", cache.writeback=off is "writethrough").
CACHE_MODES = ("writeback", "writethrough", "none")
#: aio= of BlkDevice and --aio of the blk command: who runs reads, writes and flushes.
AIO_MODES = ("io_uring", "threads", "sync")
#: BlkDevice.engine_poll_us: busy-polling (Device.poll_us) for a device on io_uring; override per
#: server with Server(poll_us=...) or --poll-us.
ENGINE_POLL_US = 128

# ioctl BLKSSZGET (linux/fs.h _IO(0x12, 104)): a block device's logical sector size, an int
BLKSSZGET = _IO(0x12, 104)


def _direct_alignment(fd: int, st: os.stat_result) -> int:
    """The alignment O_DIRECT needs on ``fd``: a block device's logical block size (BLKSSZGET);
    for a file, the smallest of 512 .. 4096 bytes that an aligned O_DIRECT read accepts."""
    if stat.S_ISBLK(st.st_mode):
        size = ctypes.c_int(0)
        fcntl.ioctl(fd, BLKSSZGET, size)
        if size.value >= SECTOR_SIZE:
            return size.value
    probe = mmap.mmap(-1, 4096)
    view = memoryview(probe)
    try:
        for size in (512, 1024, 2048, 4096):
            try:
                os.preadv(fd, [view[:size]], 0)
                return size
            except OSError as exc:
                if exc.errno != errno.EINVAL or size == 4096:
                    raise
    finally:
        view.release()
        probe.close()
    return 4096


class AsyncIo:
    """One read, write or flush between :meth:`BlockImage.start` and :meth:`BlockImage.finish`:
    what the engine is to do (op, fd, offset, views, RWF flags) and how to answer the chain."""

    __slots__ = ("op", "fd", "offset", "length", "views", "guest", "status", "used", "flags")

    def __init__(self, op, fd, offset, length, views, guest, status, used, flags) -> None:
        self.op, self.fd, self.offset, self.length, self.views = op, fd, offset, length, views
        self.guest, self.status, self.used, self.flags = guest, status, used, flags


class BlockImage:
    """A raw disk image (regular file or block device) and the virtio-blk requests on it.

    :meth:`handle` executes one request chain given as views; it is all a device needs and
    can run on any number of queues at once (requests are stateless and positional, so every
    queue shares the one fd). The discard / write-zeroes limits below are what the config space
    advertises and what requests are checked against.
    """

    #: Most sectors one DISCARD segment may name; QEMU's BDRV_REQUEST_MAX_SECTORS. Punching a
    #: hole costs the same whatever its size.
    max_discard_sectors = (1 << 31) - 1 >> 9
    #: Most sectors one WRITE_ZEROES segment may name: 32 MiB bounds how long one request can hold
    #: the loop when the file system cannot zero a range without writing it.
    max_write_zeroes_sectors = 1 << 16
    #: Most segments in one DISCARD / WRITE_ZEROES request: one, as QEMU's virtio-blk and
    #: qemu-storage-daemon advertise (Linux then sends one range per request).
    max_discard_seg = 1
    max_write_zeroes_seg = 1

    def __init__(self, path: str | os.PathLike, *, read_only: bool = False, serial: str | bytes | None = None,
                 block_size: int = SECTOR_SIZE, cache: str = "writeback") -> None:
        if not (isinstance(block_size, int) and SECTOR_SIZE <= block_size <= 65536
                and block_size & (block_size - 1) == 0):
            raise ValueError(f"block_size must be a power of two from 512 to 65536, not {block_size!r}")
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, not {cache!r}")
        ident = serial.encode("ascii") if isinstance(serial, str) else bytes(serial or b"")
        if len(ident) > VIRTIO_BLK_ID_BYTES:
            raise ValueError(f"serial {serial!r} is longer than {VIRTIO_BLK_ID_BYTES} bytes")
        self.path = os.fspath(path)
        self.read_only = bool(read_only)
        self.block_size = block_size
        self.serial = ident
        self._id = ident.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
        #: The cache mode asked for: "writeback", "writethrough" or "none" (O_DIRECT).
        self.cache = cache
        #: Writeback cache (True: writes may sit in the page cache until FLUSH) or writethrough
        #: (False: every write and write-zeroes is stable before it completes). The driver may
        #: switch it (``wce``); cache="writethrough" is where it starts and returns at reset.
        self.writeback = cache != "writethrough"
        self._no_rwf = False     # set when pwritev2 flags (RWF_DSYNC) turn out unsupported
        #: O_DIRECT (cache="none") and its alignment: buffer addresses, lengths and file offsets
        #: must be multiples of it (1 without O_DIRECT).
        self.direct = cache == "none"
        self.align = 1
        #: Requests copied through an aligned bounce buffer (O_DIRECT, guest buffers unaligned).
        self.bounced = 0
        #: Requests served by the buffered fd (O_DIRECT, offset or length unaligned).
        self.buffered = 0
        #: Most views one request may pass to the I/O engine as they are (more are bounced).
        self.max_views = IOV_MAX
        #: True where the engine needs buffer addresses (io_uring): read-only views are bounced.
        self.need_addresses = False
        self._bounce_pool: dict[int, list[memoryview]] = {}
        self.fd = -1
        self._buffered_fd = -1
        try:
            self.fd = os.open(self.path, (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC)
            st = os.fstat(self.fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise OSError(errno.EINVAL, "not a regular file or block device")
            size = os.lseek(self.fd, 0, os.SEEK_END)     # st_size is 0 for block devices
            head = os.pread(self.fd, _MAGIC_BYTES, 0)
        except OSError as exc:
            self.close()
            raise VhostError(f"cannot use disk image {self.path!r}: {exc.strerror}", exc.errno) from None
        if size < SECTOR_SIZE:
            self.close()
            raise VhostError(f"disk image {self.path!r} is {size} bytes: a disk needs at least one "
                             f"{SECTOR_SIZE}-byte sector", errno.EINVAL)
        found = image_format(head)
        if found:
            log.warning("%s looks like a %s image, not a raw disk: the guest will see its metadata as disk "
                        "contents (convert it with qemu-img convert -O raw)", self.path, found)
        if size % SECTOR_SIZE:
            log.warning("%s: its last %d bytes are not a whole %d-byte sector; the guest cannot reach them",
                        self.path, size % SECTOR_SIZE, SECTOR_SIZE)
        #: The disk's size in 512-byte sectors (a partial last sector is not part of the disk).
        self.capacity = size // SECTOR_SIZE
        self._end = self.capacity * SECTOR_SIZE
        # Discards are most useful in whole file-system blocks (a partial block is only zeroed).
        granule = st.st_blksize if 0 < st.st_blksize <= 1 << 20 and st.st_blksize & (st.st_blksize - 1) == 0 else 0
        #: discard_sector_alignment, in sectors
        self.discard_sector_alignment = max(block_size, granule) // SECTOR_SIZE
        self._fallocate_ok = {FALLOC_FL_PUNCH_HOLE: True, FALLOC_FL_ZERO_RANGE: True, 0: True}
        if self.direct:
            self._open_direct(st)
            if self.block_size < self.align:
                # the guest then sends aligned requests (Linux takes blk_size as its logical block size)
                self.block_size = self.align
                self.discard_sector_alignment = max(self.discard_sector_alignment, self.align // SECTOR_SIZE)

    def _open_direct(self, st: os.stat_result) -> None:
        """cache="none": reopen with O_DIRECT (the buffered fd stays, for unaligned requests) and
        find the alignment: BLKSSZGET for a block device, a probe of aligned reads for a file."""
        try:
            fd = os.open(self.path, (os.O_RDONLY if self.read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as exc:
            self.close()
            if exc.errno == errno.EINVAL:
                raise VhostError(f"cannot use disk image {self.path!r} with cache=none: its file system refuses "
                                 f"O_DIRECT (use cache writeback or writethrough)", exc.errno) from None
            raise VhostError(f"cannot use disk image {self.path!r} with O_DIRECT: {exc.strerror}", exc.errno) from None
        self._buffered_fd, self.fd = self.fd, fd
        try:
            self.align = _direct_alignment(fd, st)
        except OSError as exc:
            self.close()
            raise VhostError(f"cannot use disk image {self.path!r} with cache=none: an O_DIRECT read fails "
                             f"({exc.strerror})", exc.errno) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._buffered_fd >= 0:
            os.close(self._buffered_fd)
            self._buffered_fd = -1
        self._bounce_pool.clear()

    def __enter__(self) -> BlockImage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fileno(self) -> int:
        return self.fd

    def __repr__(self) -> str:
        return (f"BlockImage({self.path!r}, capacity={self.capacity}, block_size={self.block_size}, "
                f"read_only={self.read_only}, cache={self.cache!r})")

    # -- requests ------------------------------------------------------------------------------
    def handle(self, readable: list[memoryview], writable: list[memoryview]) -> int:
        """Execute one request chain; returns the used length: every device-writable byte, the
        status byte included, whatever the outcome -- what QEMU's virtio-blk and
        qemu-storage-daemon report, and what makes the dirty log cover the status byte at the
        end of a failed request.

        A malformed request is answered VIRTIO_BLK_S_IOERR; only a chain with no status byte to
        answer in raises :class:`VirtqueueError` (the ring's business, not the disk's).
        """
        parsed = self._parse(readable, writable)
        if parsed.__class__ is int:
            return parsed
        type_, sector, out, inp, status = parsed
        if type_ == _T_IN:
            status[0] = self._read(sector, out, inp)
        elif type_ == _T_OUT:
            status[0] = self._write(sector, out, inp)
        else:
            handler = self._HANDLERS.get(type_)
            status[0] = VIRTIO_BLK_S_UNSUPP if handler is None else handler(self, sector, out, inp)
        return _nbytes(inp) + 1

    def _parse(self, readable: list[memoryview], writable: list[memoryview]):
        """(type, sector, data out, data in, status view), or the used length of a request
        answered IOERR for a header that is not there."""
        if writable and len(writable[-1]) == 1:         # the status byte in its own descriptor
            inp, status = writable[:-1], writable[-1]
        else:
            inp, status = _split_status(writable)
        first = readable[0] if readable else b""
        if len(first) == 16:                            # the header in its own descriptor
            type_, _, sector = VIRTIO_BLK_OUTHDR.unpack(first)
            return type_, sector, readable[1:], inp, status
        header, out = _gather(readable, VIRTIO_BLK_OUTHDR.size)
        if header is None:
            status[0] = VIRTIO_BLK_S_IOERR
            return _nbytes(writable)
        type_, _, sector = VIRTIO_BLK_OUTHDR.unpack(header)
        return type_, sector, out, inp, status

    def _range_ok(self, sector: int, length: int) -> bool:
        return not length % SECTOR_SIZE and sector * SECTOR_SIZE + length <= self._end

    def _read(self, sector: int, out: list[memoryview], inp: list[memoryview]) -> int:
        """VIRTIO_BLK_T_IN: preadv straight into the writable views."""
        if out and _nbytes(out):
            return VIRTIO_BLK_S_IOERR
        length = sum(map(len, inp))
        offset = sector * SECTOR_SIZE
        if length % SECTOR_SIZE or offset + length > self._end:
            return VIRTIO_BLK_S_IOERR
        fd, views, guest = self._io_target(offset, length, inp, False) if self.direct else (self.fd, inp, None)
        try:
            done = os.preadv(fd, views, offset) if len(views) <= IOV_MAX else 0
            if done != length:
                _readv(fd, views, offset, length, done)
        except OSError as exc:
            log.warning("%s: read of %d bytes at sector %d failed: %s", self.path, length, sector, exc)
            return VIRTIO_BLK_S_IOERR
        finally:
            if guest is not None:
                self._unbounce(views[0], guest, True)
        return VIRTIO_BLK_S_OK

    def _write(self, sector: int, out: list[memoryview], inp: list[memoryview]) -> int:
        """VIRTIO_BLK_T_OUT: pwritev straight from the readable views."""
        if self.read_only or (inp and _nbytes(inp)):
            return VIRTIO_BLK_S_IOERR
        length = sum(map(len, out))
        offset = sector * SECTOR_SIZE
        if length % SECTOR_SIZE or offset + length > self._end:
            return VIRTIO_BLK_S_IOERR
        flags = 0 if self.writeback or self._no_rwf else os.RWF_DSYNC
        fd, views, guest = self._io_target(offset, length, out, True) if self.direct else (self.fd, out, None)
        try:
            try:
                done = os.pwritev(fd, views, offset, flags) if len(views) <= IOV_MAX else 0
            except OSError as exc:
                if not flags or exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                # No pwritev2 flags here (old kernels, gVisor, qemu-user): writethrough becomes
                # a plain write followed by fdatasync, from now on.
                self._no_rwf, flags, done = True, 0, 0
            if done != length:
                _writev(fd, views, offset, length, flags, done)
            if self._no_rwf and not self.writeback:
                os.fdatasync(fd)
        except OSError as exc:
            log.warning("%s: write of %d bytes at sector %d failed: %s", self.path, length, sector, exc)
            return VIRTIO_BLK_S_IOERR
        finally:
            if guest is not None:
                self._unbounce(views[0], guest, False)
        return VIRTIO_BLK_S_OK

    # -- O_DIRECT: aligned buffers ---------------------------------------------------------------
    def _io_target(self, offset: int, length: int, views: list[memoryview], write: bool):
        """(fd, views to pass it, guest views a bounce buffer stands for or None). Without
        O_DIRECT: the fd and the guest's views, unless the engine cannot take them as they are
        (too many, or read-only for io_uring)."""
        mask = self.align - 1
        if self.direct:
            if offset & mask or length & mask:
                self.buffered += 1
                return self._buffered_fd, views, None
            for v in views:
                if len(v) & mask:
                    break
                try:
                    if address_of(v) & mask:
                        break
                except TypeError:           # a read-only mapping: no address to give
                    break
            else:
                if len(views) <= self.max_views:
                    return self.fd, views, None
        elif len(views) <= self.max_views and not (self.need_addresses and write and any(v.readonly for v in views)):
            return self.fd, views, None
        self.bounced += 1
        buf = self._bounce(length)
        if write:
            at = 0
            for v in views:
                buf[at:at + len(v)] = v
                at += len(v)
        return self.fd, [buf], views

    def _bounce(self, length: int) -> memoryview:
        """A page-aligned buffer of ``length`` bytes (anonymous memory, reused)."""
        size = -(-max(length, 1) // mmap.PAGESIZE) * mmap.PAGESIZE
        pool = self._bounce_pool.get(size)
        if pool:
            return pool.pop()[:length]
        return memoryview(mmap.mmap(-1, size))[:length]

    def _unbounce(self, buf: memoryview, guest: list[memoryview], read: bool) -> None:
        """After a bounced request: a read's bytes to the guest's views; the buffer back to the pool."""
        if read:
            at = 0
            for v in guest:
                v[:] = buf[at:at + len(v)]
                at += len(v)
        base = buf.obj
        pool = self._bounce_pool.setdefault(len(base), [])
        if len(pool) < 64:
            pool.append(memoryview(base))

    # -- asynchronous requests (an engine of aio.py does the I/O) --------------------------------
    def start(self, readable: list[memoryview], writable: list[memoryview]):
        """The first half of :meth:`handle` for an engine: an :class:`AsyncIo` for a read, write
        or flush (hand it to the engine, then :meth:`finish`), or the used length of a request
        answered now (every other type, and every malformed one)."""
        parsed = self._parse(readable, writable)
        if parsed.__class__ is int:
            return parsed
        type_, sector, out, inp, status = parsed
        used = _nbytes(inp) + 1
        if type_ == _T_IN or type_ == _T_OUT:
            data, bad = (inp, out) if type_ == _T_IN else (out, inp)
            length = _nbytes(data)
            offset = sector * SECTOR_SIZE
            if (bad and _nbytes(bad)) or length % SECTOR_SIZE or offset + length > self._end or (
                    type_ == _T_OUT and self.read_only):
                status[0] = VIRTIO_BLK_S_IOERR
                return used
            if not length:
                status[0] = VIRTIO_BLK_S_OK
                return used
            write = type_ == _T_OUT
            fd, views, guest = self._io_target(offset, length, data, write)
            flags = os.RWF_DSYNC if write and not (self.writeback or self._no_rwf) else 0
            return AsyncIo(_aio.OP_WRITE if write else _aio.OP_READ, fd, offset, length, views, guest, status,
                           used, flags)
        if type_ == VIRTIO_BLK_T_FLUSH:
            return AsyncIo(_aio.OP_FSYNC, self.fd, 0, 0, [], None, status, used, 0)
        handler = self._HANDLERS.get(type_)
        status[0] = VIRTIO_BLK_S_UNSUPP if handler is None else handler(self, sector, out, inp)
        return used

    def finish(self, io: AsyncIo, res: int) -> int:
        """The second half: ``res`` is what the engine reported (bytes moved or -errno). Writes
        the status byte (a short transfer is finished here, synchronously) and returns the used
        length."""
        op, views = io.op, io.views
        try:
            if res < 0:
                if op == _aio.OP_WRITE and io.flags and -res in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    self._no_rwf = True          # no RWF_DSYNC here: write, then fdatasync
                    _writev(io.fd, views, io.offset, io.length, 0)
                    os.fdatasync(io.fd)
                else:
                    raise OSError(-res, os.strerror(-res))
            elif op == _aio.OP_READ:
                if res != io.length:
                    _readv(io.fd, views, io.offset, io.length, res)
                if io.guest is not None:
                    self._unbounce(views[0], io.guest, True)
                    io.guest = None
            elif op == _aio.OP_WRITE:
                if res != io.length:
                    _writev(io.fd, views, io.offset, io.length, io.flags, res)
                if self._no_rwf and not self.writeback:
                    os.fdatasync(io.fd)
            io.status[0] = VIRTIO_BLK_S_OK
        except OSError as exc:
            what = "flush" if op == _aio.OP_FSYNC else (
                f"{'read' if op == _aio.OP_READ else 'write'} of {io.length} bytes at offset {io.offset}")
            log.warning("%s: %s failed: %s", self.path, what, exc.strerror or exc)
            io.status[0] = VIRTIO_BLK_S_IOERR
        if io.guest is not None:
            self._unbounce(views[0], io.guest, False)
        return io.used

    def _flush(self, sector: int, out: list[memoryview], inp: list[memoryview]) -> int:
        """VIRTIO_BLK_T_FLUSH: every completed write becomes stable (fdatasync)."""
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            log.warning("%s: flush failed: %s", self.path, exc)
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK

    def _get_id(self, sector: int, out: list[memoryview], inp: list[memoryview]) -> int:
        """VIRTIO_BLK_T_GET_ID: the serial, NUL-padded to 20 bytes (or as much as fits)."""
        if out and _nbytes(out):
            return VIRTIO_BLK_S_IOERR
        ident, done = self._id, 0
        for v in inp:
            take = min(len(v), VIRTIO_BLK_ID_BYTES - done)
            v[:take] = ident[done:done + take]
            done += take
            if done == VIRTIO_BLK_ID_BYTES:
                break
        return VIRTIO_BLK_S_OK if done else VIRTIO_BLK_S_IOERR

    def _segments(self, out: list[memoryview], inp: list[memoryview], max_seg: int, max_sectors: int,
                  allowed_flags: int) -> tuple[int, list[tuple[int, int, int]]]:
        """Parse and check DISCARD / WRITE_ZEROES segments: (status, [(offset, length, flags)]).

        Checked in the order QEMU's virtio-blk and qemu-storage-daemon check them, so a request
        breaking several rules gets their answer: more segments than advertised UNSUPP (drivers
        and test suites probe with two); a payload that is not whole segments IOERR; per segment
        num_sectors beyond the maximum or a range past the capacity IOERR, then unknown flags
        UNSUPP and UNMAP on a discard UNSUPP (the spec's MUSTs)."""
        if self.read_only or (inp and _nbytes(inp)):
            return VIRTIO_BLK_S_IOERR, []
        size = VIRTIO_BLK_DISCARD_WRITE_ZEROES.size
        length = _nbytes(out)
        if length > max_seg * size:
            return VIRTIO_BLK_S_UNSUPP, []
        if not length or length % size:
            return VIRTIO_BLK_S_IOERR, []
        segments = []
        for sector, num_sectors, flags in VIRTIO_BLK_DISCARD_WRITE_ZEROES.iter_unpack(b"".join(out)):
            if num_sectors > max_sectors or not self._range_ok(sector, num_sectors * SECTOR_SIZE):
                return VIRTIO_BLK_S_IOERR, []
            if flags & ~allowed_flags:
                return VIRTIO_BLK_S_UNSUPP, []
            if num_sectors:
                segments.append((sector * SECTOR_SIZE, num_sectors * SECTOR_SIZE, flags))
        return VIRTIO_BLK_S_OK, segments

    def _discard(self, sector: int, out: list[memoryview], inp: list[memoryview]) -> int:
        """VIRTIO_BLK_T_DISCARD: punch holes where the file system can (a hint; never an error
        when it cannot). The UNMAP flag is not allowed on discards."""
        result, segments = self._segments(out, inp, self.max_discard_seg, self.max_discard_sectors, 0)
        try:
            for offset, length, _ in segments:
                self._try_fallocate(FALLOC_FL_PUNCH_HOLE, offset, length)
        except OSError as exc:
            log.warning("%s: discard failed: %s", self.path, exc)
            return VIRTIO_BLK_S_IOERR
        return result

    def _write_zeroes(self, sector: int, out: list[memoryview], inp: list[memoryview]) -> int:
        """VIRTIO_BLK_T_WRITE_ZEROES: the ranges read back as zeros afterwards, whatever the file
        system supports; with UNMAP the blocks may be deallocated."""
        result, segments = self._segments(out, inp, self.max_write_zeroes_seg, self.max_write_zeroes_sectors,
                                          VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
        try:
            for offset, length, flags in segments:
                self._zero(offset, length, bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
            if segments and not self.writeback:
                os.fdatasync(self.fd)
        except OSError as exc:
            log.warning("%s: write zeroes failed: %s", self.path, exc)
            return VIRTIO_BLK_S_IOERR
        return result

    _HANDLERS = {VIRTIO_BLK_T_FLUSH: _flush, VIRTIO_BLK_T_GET_ID: _get_id,
                 VIRTIO_BLK_T_DISCARD: _discard, VIRTIO_BLK_T_WRITE_ZEROES: _write_zeroes}

    def _try_fallocate(self, mode: int, offset: int, length: int) -> bool:
        """fallocate(mode | KEEP_SIZE); False when this file (system) does not support the mode."""
        if not self._fallocate_ok[mode]:
            return False
        try:
            fallocate(self.fd, mode | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in _FALLOC_UNSUPPORTED:
                raise
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):    # EINVAL may be this range's alignment
                self._fallocate_ok[mode] = False
            return False
        return True

    def _zero(self, offset: int, length: int, unmap: bool) -> None:
        """Make [offset, offset + length) read as zeros: punch (if allowed), else zero the range
        keeping it allocated, else punch and re-allocate (tmpfs), else write zeros."""
        if unmap and self._try_fallocate(FALLOC_FL_PUNCH_HOLE, offset, length):
            return
        if self._try_fallocate(FALLOC_FL_ZERO_RANGE, offset, length):
            return
        if self._try_fallocate(FALLOC_FL_PUNCH_HOLE, offset, length):
            self._try_fallocate(0, offset, length)      # best effort: keep the blocks provisioned
            return
        chunk = len(_ZEROS)
        while length:
            n = min(length, 64 * chunk)
            views = [_ZEROS] * (n // chunk) + ([_ZEROS[:n % chunk]] if n % chunk else [])
            _writev(self.fd, views, offset, n, 0)
            offset, length = offset + n, length - n


# --------------------------------------------------------------------------------------------
# The vhost-user device
# --------------------------------------------------------------------------------------------

_refusal_logged = False
#: statfs.f_type of file systems whose files io_uring_enter may block on instead of going async
#: (linux/magic.h): FUSE (seen: a held FUSE read stalled io_uring_enter, so the whole loop).
FUSE_SUPER_MAGIC = 0x65735546
_INLINE_BLOCKING_FS = frozenset({FUSE_SUPER_MAGIC})


def _fs_type(fd: int) -> int | None:
    """fstatfs(2)'s f_type for ``fd`` (the first field of struct statfs, a native long), or None."""
    buf = ctypes.create_string_buffer(256)           # struct statfs is 120 bytes on 64-bit Linux
    if libc.fstatfs(fd, buf) != 0:
        return None
    return struct.unpack_from("@l", buf)[0] & 0xFFFFFFFF


def _make_engine(aio: str | None, cache: str, fd: int = -1):
    """The engine for ``aio`` (None: the best available, see BlkDevice). io_uring refused
    (ENOSYS, EPERM: seccomp, sysctl kernel.io_uring_disabled) falls back to the thread pool,
    logged once per process. On a file system that blocks inline (``fd``'s, _INLINE_BLOCKING_FS)
    every io_uring operation goes to the kernel's workers (IOSQE_ASYNC)."""
    global _refusal_logged
    if aio is None:
        aio = "io_uring" if cache == "none" else "sync"
    if aio == "sync":
        return None
    if aio == "io_uring":
        try:
            return _aio.UringEngine(force_async=fd >= 0 and _fs_type(fd) in _INLINE_BLOCKING_FS)
        except _aio.IoUringError as exc:
            if not _refusal_logged:
                _refusal_logged = True
                log.warning("io_uring is not available (%s): a thread pool does the asynchronous I/O", exc)
    return _aio.ThreadEngine()


# --------------------------------------------------------------------------------------------
# Device state (vhost-user DEVICE_STATE: SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE)
#
# What a stopped virtio-blk device carries to a new back-end that the front-end does not replay
# itself: the cache mode the driver chose through ``wce`` (VIRTIO_BLK_F_CONFIG_WCE). Requests
# are stateless and none is in flight once every ring is stopped (GET_VRING_BASE waits for them);
# rings, memory and features are the front-end's to replay. The disk's shape travels too, so a
# state is never loaded into a back-end serving another disk.
# --------------------------------------------------------------------------------------------

#: The first 8 bytes of every blk state blob.
BLK_STATE_MAGIC = b"VMINBLK\0"
#: The layout :data:`BLK_STATE` describes; a blob of another version is refused.
BLK_STATE_VERSION = 1
#: {8s magic; le16 version; le16 flags; le32 blk_size; le64 capacity (512-byte sectors);
#: le16 num_queues; le16 reserved (0)}, 28 bytes.
BLK_STATE = struct.Struct("<8sHHIQHH")
BLK_STATE_F_WCE = 1 << 0            #: flags: writeback cache (``wce`` = 1)
BLK_STATE_F_RO = 1 << 1             #: flags: the disk is read-only (VIRTIO_BLK_F_RO)
_BLK_STATE_FLAGS = BLK_STATE_F_WCE | BLK_STATE_F_RO


class BlkStateError(VhostError):
    """A device state blob this back-end cannot load: short, foreign, of another version, or
    saved for another disk. Nothing of it was applied."""

    default_errno = errno.EINVAL


class BlkDevice(Device):
    """A vhost-user-blk device over a raw image: ``serve(BlkDevice("disk.img"), "/tmp/blk.sock")``
    and QEMU's ``-device vhost-user-blk-pci,chardev=...`` sees a disk of the image's size.

    Features offered (QEMU's vhost-user-blk passes each of these through): SEG_MAX, BLK_SIZE,
    FLUSH and CONFIG_WCE (writeback cache by default, the guest may switch to writethrough);
    RO when ``read_only``, else DISCARD and WRITE_ZEROES; MQ when ``num_queues`` > 1; and
    VIRTIO_F_ACCESS_PLATFORM, so a guest behind a vIOMMU can use it (``iommu_platform=on``).

    ``cache`` is BlockImage's (CACHE_MODES). ``aio`` says who does reads, writes and flushes:
    "sync" (the loop thread, Device's default process()), "io_uring" or "threads" (an engine of
    aio.py: process() submits everything a kick brought in one commit, the engine's eventfd is in
    :meth:`watched`, completions go to the used ring as the disk finishes them, one batch per queue
    per sweep). None picks io_uring for cache="none" (the thread pool where io_uring is refused,
    logged once) and sync otherwise: a page-cache hit costs less done in place than submitted.
    """

    device_id = DeviceId.BLOCK
    #: Chains per pop / push / signal. Small, so the driver reaps and refills the first requests
    #: of a deep queue while we read the rest: 256 (Device's default) moves the whole window in
    #: lockstep and halved IOPS at queue depth 32 (python3 -m bench blk).
    batch_size = 8

    def __init__(self, image_path: str | os.PathLike, *, read_only: bool = False, num_queues: int = 1,
                 serial: str | bytes | None = None, block_size: int = SECTOR_SIZE, seg_max: int = 254,
                 cache: str = "writeback", aio: str | None = None) -> None:
        if not (isinstance(num_queues, int) and 1 <= num_queues <= 0xFFFF):
            raise ValueError(f"num_queues must be 1..65535, not {num_queues!r}")
        if not (isinstance(seg_max, int) and 1 <= seg_max <= 0xFFFFFFFF):
            raise ValueError(f"seg_max must be a positive u32, not {seg_max!r}")
        if aio is not None and aio not in AIO_MODES:
            raise ValueError(f"aio must be one of {', '.join(AIO_MODES)} (or None: the best available), not {aio!r}")
        super().__init__()
        self.image = BlockImage(image_path, read_only=read_only, serial=serial, block_size=block_size, cache=cache)
        #: The I/O engine (aio.UringEngine or aio.ThreadEngine), None for synchronous I/O in the loop.
        self.engine = None
        try:
            self.engine = _make_engine(aio, cache, self.image.fd)
        except BaseException:
            self.image.close()
            raise
        #: What runs reads, writes and flushes: "io_uring", "threads" or "sync".
        self.aio = self.engine.name if self.engine is not None else "sync"
        if self.engine is not None:
            self.poll_us = self.engine_poll_us if self.aio == "io_uring" else 0
            self.image.max_views = self.engine.max_views
            self.image.need_addresses = self.aio == "io_uring"
            self._watched = {self.engine.fileno(): self._on_io}
        else:
            self._watched = {}
        self.num_queues = num_queues
        self.seg_max = seg_max
        # VIRTIO_F_ACCESS_PLATFORM: QEMU refuses iommu_platform=on with a device that lacks it, and
        # masks it off itself where its device has iommu_platform=off.
        features = (VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_CONFIG_WCE
                    | VirtioFeature.VIRTIO_F_ACCESS_PLATFORM)
        if read_only:
            features |= VIRTIO_BLK_F_RO
        else:
            features |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES
        if num_queues > 1:
            features |= VIRTIO_BLK_F_MQ
        self.features = int(features)

    def close(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.close()          # waits for what is in flight: the views stay valid until then
        self.image.close()

    def __enter__(self) -> BlkDevice:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def config(self) -> BlkConfig:
        """The config space as values."""
        image = self.image
        discard = not image.read_only
        return BlkConfig(
            capacity=image.capacity, seg_max=self.seg_max, blk_size=image.block_size,
            wce=int(image.writeback), num_queues=self.num_queues,
            max_discard_sectors=image.max_discard_sectors if discard else 0,
            max_discard_seg=image.max_discard_seg if discard else 0,
            discard_sector_alignment=image.discard_sector_alignment if discard else 0,
            max_write_zeroes_sectors=image.max_write_zeroes_sectors if discard else 0,
            max_write_zeroes_seg=image.max_write_zeroes_seg if discard else 0,
            write_zeroes_may_unmap=int(discard))

    def get_config(self, offset: int, size: int) -> bytes:
        """VHOST_USER_GET_CONFIG: ``size`` bytes of struct virtio_blk_config from ``offset``."""
        if offset < 0 or size < 0 or offset + size > VIRTIO_BLK_CONFIG.size:
            raise VhostError(f"virtio-blk config read of {size} bytes at offset {offset} is outside the "
                             f"{VIRTIO_BLK_CONFIG.size}-byte struct virtio_blk_config", errno.EINVAL)
        return self.config().pack()[offset:offset + size]

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        """VHOST_USER_SET_CONFIG: the driver may write only ``wce`` (VIRTIO_BLK_F_CONFIG_WCE): 1
        writeback, 0 writethrough. A migration write (flags VHOST_SET_CONFIG_TYPE_MIGRATION) may
        cover the read-only fields too; of those bytes only ``wce`` is taken."""
        wce = VIRTIO_BLK_CONFIG_OFFSETS["wce"]
        end = offset + len(data)
        if flags == VHOST_SET_CONFIG_TYPE_MIGRATION and 0 <= offset <= wce < end <= VIRTIO_BLK_CONFIG.size:
            writeback = bool(data[wce - offset])
        elif offset != wce or len(data) != 1:
            raise NotSupportedError(f"virtio-blk config write of {len(data)} bytes at offset {offset}: "
                                    f"only wce (1 byte at offset {wce}) is writable")
        else:
            writeback = bool(data[0])
        self.image.writeback = writeback
        if self._loaded_writeback is not None:    # after a state load the driver's latest choice holds
            self._loaded_writeback = writeback

    def features_set(self, features: int) -> None:
        """After SET_FEATURES: a driver that did not take FLUSH cannot flush, so every write must be
        stable on completion (virtio 1.3 §5.2.6.2); one that did starts in writeback mode (unless
        cache="writethrough")."""
        loaded = self._loaded_writeback       # a loaded state outlives the SET_FEATURES that follows it
        default = self.image.cache != "writethrough" if loaded is None else loaded
        self.image.writeback = bool(features & VIRTIO_BLK_F_FLUSH) and default

    def reset(self) -> None:
        """RESET_DEVICE or the front-end went away: the cache mode's default until the next negotiation."""
        self._loaded_writeback = None
        self.image.writeback = self.image.cache != "writethrough"

    # -- device state (DEVICE_STATE) ------------------------------------------------------------
    _loaded_writeback: bool | None = None   # the cache mode of the last state loaded, until reset

    def save_state(self, file) -> None:
        """VHOST_USER_SET_DEVICE_STATE_FD, save: the cache mode and the disk's shape (BLK_STATE)."""
        image = self.image
        flags = (BLK_STATE_F_WCE if image.writeback else 0) | (BLK_STATE_F_RO if image.read_only else 0)
        file.write(BLK_STATE.pack(BLK_STATE_MAGIC, BLK_STATE_VERSION, flags, image.block_size, image.capacity,
                                  self.num_queues, 0))

    def load_state(self, file) -> None:
        """VHOST_USER_SET_DEVICE_STATE_FD, load: check the blob whole, then take its cache mode;
        BlkStateError (nothing applied) for a short, foreign, other-version or other-disk blob.
        The mode outlives a SET_FEATURES that follows (QEMU negotiates after loading) until reset."""
        data = file.read(BLK_STATE.size + 1)
        self._loaded_writeback = self.image.writeback = self.parse_state(data)

    def parse_state(self, data: bytes) -> bool:
        """The writeback mode a state blob carries, once every field is checked against this device."""
        size = BLK_STATE.size
        if not data:
            raise BlkStateError("virtio-blk device state is empty: the source saved nothing")
        if data[:len(BLK_STATE_MAGIC)] != BLK_STATE_MAGIC:
            raise BlkStateError(f"not a vhost_min virtio-blk device state: it starts with {bytes(data[:8])!r}, "
                                f"not {BLK_STATE_MAGIC!r}")
        if len(data) < len(BLK_STATE_MAGIC) + 2:
            raise BlkStateError(f"virtio-blk device state of {len(data)} bytes ends inside its header")
        version = int.from_bytes(data[8:10], "little")
        if version != BLK_STATE_VERSION:
            raise BlkStateError(f"virtio-blk device state version {version}: this back-end reads version "
                                f"{BLK_STATE_VERSION}", errno.EPROTONOSUPPORT)
        if len(data) != size:
            raise BlkStateError(f"virtio-blk device state version {version} is {size} bytes, not "
                                f"{'more' if len(data) > size else len(data)}")
        _magic, _version, flags, blk_size, capacity, num_queues, reserved = BLK_STATE.unpack(data)
        if flags & ~_BLK_STATE_FLAGS or reserved:
            raise BlkStateError(f"virtio-blk device state has unknown flags {flags & ~_BLK_STATE_FLAGS:#x} "
                                f"or a non-zero reserved field {reserved:#x}")
        image = self.image
        theirs = (capacity, blk_size, bool(flags & BLK_STATE_F_RO), num_queues)
        ours = (image.capacity, image.block_size, image.read_only, self.num_queues)
        if theirs != ours:
            names = ("capacity (sectors)", "blk_size", "read-only", "num_queues")
            diff = ", ".join(f"{n} {a} here, {b} in the state" for n, a, b in zip(names, ours, theirs) if a != b)
            raise BlkStateError(f"virtio-blk device state was saved for another disk than {image.path!r}: {diff}")
        return bool(flags & BLK_STATE_F_WCE)

    def handle(self, queue: int, readable: list[memoryview], writable: list[memoryview]) -> int:
        """One request chain from any queue (they all share the image)."""
        return self.image.handle(readable, writable)

    # -- asynchronous I/O (aio="io_uring" / "threads") -----------------------------------------
    def watched(self) -> dict:
        """The engine's completion eventfd, for the transport's loop."""
        return self._watched

    #: Chains popped, and handed to the kernel in one io_uring_enter, per batch with an engine.
    #: Small, for the reason of ``batch_size``: a disk that completes what one notification
    #: brought as one batch (a virtual disk does) otherwise runs the whole window in lockstep
    #: with the driver. O_DIRECT 4 KiB reads at depth 32: 64 gave 37-45k IOPS, 16 55-57k,
    #: 8 52-61k, 4 65-66k; 2 and 1 pay an io_uring_enter (a virtual disk's notification, ~18 us)
    #: too often: 46-56k.
    async_batch = 4
    #: Busy-polling (Device.poll_us) for completions and kicks on io_uring. On this project's
    #: 2-core virtual machines a completion's wake-up from sleep cost ~23 us of a 4 KiB O_DIRECT
    #: read's ~105 us. The wait for a completion there is 25-100 us (median 55-70): QEMU's
    #: IOThread default of 32 us is outlasted by most (9-12k IOPS at depth 1), 64 us by a third
    #: (10-11k), 128 us by 1 in 150 (11-15k, 1.05-1.12x qemu-storage-daemon in the same run).
    #: Never with the thread pool: a worker needs the GIL the spinning loop holds to hand its
    #: completion back (5.6-6.1k IOPS at depth 1 without polling, 3.9k with 128 us).
    engine_poll_us = ENGINE_POLL_US

    def process(self, queue: int, vq) -> bool | None:
        """Pop what the driver made available, start reads / writes / flushes on the engine
        (one commit for all), answer the other requests now; completions already there (page
        cache hits finish inside io_uring_enter) are pushed with the answered ones."""
        engine = self.engine
        if engine is None:
            return super().process(queue, vq)
        start, submit, fail = self.image.start, engine.submit, self._chain_failed
        done = []
        again = True
        try:
            for _ in range(self.max_batches):
                chains = vq.pop_batch(self.async_batch)
                if not chains:
                    again = False
                    break
                for head, readable, writable in chains:
                    try:
                        io = start(readable, writable)
                    except Exception as exc:   # noqa: BLE001 (a chain without a status byte)
                        fail(queue, head, exc)
                        done.append((head, 0))
                        continue
                    if io.__class__ is int:
                        done.append((head, io))
                    else:
                        submit(io.op, io.fd, io.offset, io.views, io.flags, (queue, head, io))
                engine.commit()             # the disk starts on these while the next batch is read
        finally:
            # also when pop_batch raised (an IOTLB miss, a driver error): what was popped is
            # submitted or answered, never held
            self._commit_and_push(queue, vq, done)
        return again

    def _commit_and_push(self, queue: int, vq, done: list[tuple[int, int]]) -> None:
        engine = self.engine
        engine.commit()
        posted = self._reap()           # what completed inside the commit (page-cache hits)
        done += posted.pop(queue, ())
        backend = self.backend
        if backend is not None:
            for other, chains in posted.items():
                backend.post_used(other, chains)
        if done and vq.push_batch(done) and backend is not None:
            backend.signal_used(queue)

    def _reap(self) -> dict[int, list[tuple[int, int]]]:
        """Finish every completion the engine has: queue -> [(head, used length)]."""
        finish = self.image.finish
        by_queue: dict[int, list[tuple[int, int]]] = {}
        reaped = self.engine.reap()
        while reaped:
            for (queue, head, io), res in reaped:
                by_queue.setdefault(queue, []).append((head, finish(io, res)))
            self.engine.commit()        # operations that waited for a slot
            reaped = self.engine.reap()
        return by_queue

    def poll_ready(self) -> bool:
        """Busy-polling: the engine has completions (no system call to find out)."""
        engine = self.engine
        return engine is not None and engine.ready()

    def poll(self) -> None:
        """Busy-polling: the engine's completions are taken now, as their eventfd would have."""
        if self.engine is not None:
            self._on_io()

    def _on_io(self) -> None:
        """The engine's eventfd is readable (loop thread): one post_used batch per queue."""
        backend = self.backend
        self.engine.clear_signal()
        for queue, done in self._reap().items():
            if backend is not None:
                backend.post_used(queue, done)

    def stopped(self, queue: int) -> None:
        """Complete everything in flight (every queue shares the engine) before returning."""
        engine = self.engine
        if engine is None:
            return
        finish = self.image.finish
        by_queue: dict[int, list[tuple[int, int]]] = {}
        for (q, head, io), res in engine.drain():
            by_queue.setdefault(q, []).append((head, finish(io, res)))
        for q, done in by_queue.items():
            if self.backend is not None:
                self.backend.post_used(q, done)


# --------------------------------------------------------------------------------------------
# The driver side
# --------------------------------------------------------------------------------------------

#: Device features BlkClient knows how to use (it takes these when it negotiates).
BLK_DRIVER_FEATURES = (VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_RO | VIRTIO_BLK_F_BLK_SIZE
                       | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_CONFIG_WCE | VIRTIO_BLK_F_MQ | VIRTIO_BLK_F_DISCARD
                       | VIRTIO_BLK_F_WRITE_ZEROES)
#: How much config space the client reads: everything before the secure-erase fields, which it
#: does not use and which back-ends written before them do not have (what QEMU reads too).
BLK_CONFIG_READ_SIZE = VIRTIO_BLK_CONFIG_OFFSETS["max_secure_erase_sectors"]

_STATUS_PENDING = 0xFF                      # in the status byte until the device writes one


class BlkRequestError(VhostError):
    """The device answered a request with VIRTIO_BLK_S_IOERR or VIRTIO_BLK_S_UNSUPP (``status``)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message, errno.EOPNOTSUPP if status == VIRTIO_BLK_S_UNSUPP else errno.EIO)
        self.status = status


class BlkRequest(NamedTuple):
    """One request for :meth:`BlkClient.submit`; build it with the class methods. Offsets and
    lengths are in bytes (multiples of 512 for the protocol's sectors)."""

    type: int                               # VIRTIO_BLK_T_*
    offset: int = 0
    length: int = 0                         # IN: bytes to read; DISCARD / WRITE_ZEROES: bytes of the range
    data: bytes | memoryview | None = None  # OUT: the bytes to write
    flags: int = 0                          # WRITE_ZEROES: VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    tag: object = None                      # comes back in the completion (default: the request itself)

    @classmethod
    def read(cls, offset: int, length: int, tag: object = None) -> BlkRequest:
        return cls(VIRTIO_BLK_T_IN, offset, length, tag=tag)

    @classmethod
    def write(cls, offset: int, data: bytes | memoryview, tag: object = None) -> BlkRequest:
        return cls(VIRTIO_BLK_T_OUT, offset, len(data), data, tag=tag)

    @classmethod
    def flush(cls, tag: object = None) -> BlkRequest:
        return cls(VIRTIO_BLK_T_FLUSH, tag=tag)

    @classmethod
    def get_id(cls, tag: object = None) -> BlkRequest:
        return cls(VIRTIO_BLK_T_GET_ID, length=VIRTIO_BLK_ID_BYTES, tag=tag)

    @classmethod
    def discard(cls, offset: int, length: int, tag: object = None) -> BlkRequest:
        return cls(VIRTIO_BLK_T_DISCARD, offset, length, tag=tag)

    @classmethod
    def write_zeroes(cls, offset: int, length: int, unmap: bool = False, tag: object = None) -> BlkRequest:
        return cls(VIRTIO_BLK_T_WRITE_ZEROES, offset, length,
                   flags=VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if unmap else 0, tag=tag)


class BlkCompletion(NamedTuple):
    """A finished request: ``data`` is what an IN or GET_ID returned, a view of the request's
    buffer in guest memory that stays valid until the next :meth:`BlkClient.submit`."""

    tag: object
    status: int                             # VIRTIO_BLK_S_*, or 0xFF: used without a status written
    used: int                               # the used length the device reported
    data: memoryview | None


class BlkClient:
    """The driver side of virtio-blk over a vhost-user :class:`~vhost_min.frontend.Frontend`, with
    real virtqueues in shared guest memory: ``read`` / ``write`` / ``flush`` / ``get_id`` /
    ``discard`` / ``write_zeroes`` one at a time, or ``submit`` + ``complete`` with up to
    ``depth`` requests in flight.

    It brings up what the front-end has not: negotiation (FRONTEND_FEATURES plus
    :data:`BLK_DRIVER_FEATURES`, and the device status when STATUS is negotiated), guest memory
    (room for every queue the device has), and the queue ``queue_index``. Each request is laid out
    as Linux lays it out: header, data and status in separate descriptors (one indirect descriptor
    with ``indirect=True``). Requests of more than ``max_io`` bytes are split by the sync methods.
    """

    def __init__(self, frontend, *, queue_index: int = 0, queue_size: int = 128, depth: int | None = None,
                 max_io: int = 128 << 10, packed: bool | None = None, indirect: bool = False,
                 timeout: float | None = None) -> None:
        from .frontend import FRONTEND_FEATURES     # the front-end loads only when a client is made
        if max_io <= 0 or max_io % SECTOR_SIZE:
            raise ValueError(f"max_io must be a positive multiple of {SECTOR_SIZE}, not {max_io}")
        self.frontend = fe = frontend
        self.queue_index = queue_index
        self.timeout = timeout
        bring_up = fe.features is None
        if bring_up:
            # VIRTIO_F_RING_PACKED makes every ring packed: taken only when asked for
            ring = FRONTEND_FEATURES & ~VirtioFeature.VIRTIO_F_RING_PACKED | (
                VirtioFeature.VIRTIO_F_RING_PACKED if packed else 0)
            fe.negotiate(ring | BLK_DRIVER_FEATURES)
            if fe.protocol_features & ProtocolFeature.STATUS:
                fe.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK)
        self.features = fe.features
        negotiated_packed = bool(self.features & VirtioFeature.VIRTIO_F_RING_PACKED)
        if packed is not None and bool(packed) != negotiated_packed:
            raise VhostError(f"packed={packed}, but VIRTIO_F_RING_PACKED was "
                             f"{'' if negotiated_packed else 'not '}negotiated", errno.EINVAL)
        #: The device's config space as read after negotiation.
        self.config = BlkConfig.unpack(fe.get_config(0, BLK_CONFIG_READ_SIZE))
        config, features = self.config, self.features
        # Data segments per request: size_max bounds each, seg_max bounds how many.
        seg_size = config.size_max if features & VIRTIO_BLK_F_SIZE_MAX and config.size_max else max_io
        seg_max = config.seg_max if features & VIRTIO_BLK_F_SEG_MAX and config.seg_max else 1 << 16
        self.max_io = min(max_io, seg_size * seg_max) // SECTOR_SIZE * SECTOR_SIZE
        if not self.max_io:
            raise VhostError(f"the device's size_max {config.size_max} and seg_max {config.seg_max} leave no "
                             f"room for a {SECTOR_SIZE}-byte request")
        self._seg_size = seg_size
        per_request = 2 + -(-self.max_io // seg_size)       # header + data segments + status
        if indirect and not features & VirtioFeature.VIRTIO_F_INDIRECT_DESC:
            raise VhostError("indirect=True needs VIRTIO_F_INDIRECT_DESC, which was not negotiated", errno.EINVAL)
        self.indirect = bool(indirect)
        most = queue_size if indirect else queue_size // per_request
        self.depth = most if depth is None else depth
        if not 1 <= self.depth <= most:
            raise ValueError(f"depth {depth} is outside 1..{most} for a queue of {queue_size} with "
                             f"{per_request} descriptors per request")
        # Guest memory: one slot per request in flight (header, status byte, data buffer).
        need = self.depth * (VIRTIO_BLK_OUTHDR.size + 1 + self.max_io) + (64 << 10) + 16 * queue_size * (
            per_request if indirect else 1) * 2
        if fe.memory is None:
            queues = config.num_queues if features & VIRTIO_BLK_F_MQ and config.num_queues else 1
            fe.setup_memory(need * queues)
        self.memory = fe.memory
        self._headers = fe.alloc(self.depth * VIRTIO_BLK_OUTHDR.size, 16)
        self._statuses = fe.alloc(self.depth, 16)
        self._buffers = fe.alloc(self.depth * self.max_io, 4096)
        self.queue = fe.setup_queue(queue_index, queue_size, packed=negotiated_packed,
                                    indirect_max=per_request if indirect else 0)
        if bring_up and fe.protocol_features & ProtocolFeature.STATUS:
            fe.set_status(DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
                          | DeviceStatus.DRIVER_OK)
        self._header_view = self.memory.view(self._headers, self.depth * VIRTIO_BLK_OUTHDR.size)
        self._status_view = self.memory.view(self._statuses, self.depth)
        self._buffer_view = self.memory.view(self._buffers, self.depth * self.max_io)
        self._free = list(range(self.depth - 1, -1, -1))
        self._inflight: dict[int, BlkRequest] = {}
        self._done: list[BlkCompletion] = []         # completions a sync call reaped for others

    # -- properties of the disk ------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """The disk's size in 512-byte sectors."""
        return self.config.capacity

    @property
    def size(self) -> int:
        """The disk's size in bytes."""
        return self.config.capacity * SECTOR_SIZE

    @property
    def block_size(self) -> int:
        return self.config.blk_size if self.features & VIRTIO_BLK_F_BLK_SIZE and self.config.blk_size else SECTOR_SIZE

    @property
    def read_only(self) -> bool:
        return bool(self.features & VIRTIO_BLK_F_RO)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def set_writeback(self, writeback: bool) -> None:
        """Switch the device's cache mode through the ``wce`` config field (VIRTIO_BLK_F_CONFIG_WCE)."""
        self._need(VIRTIO_BLK_F_CONFIG_WCE, "switching the cache mode")
        self.frontend.set_config(VIRTIO_BLK_CONFIG_OFFSETS["wce"], bytes([int(bool(writeback))]))
        self.config = self.config._replace(wce=int(bool(writeback)))

    def _need(self, feature: int, what: str) -> None:
        if not self.features & feature:
            raise NotNegotiatedError(f"{what} needs {VirtioBlkFeature(feature).name}, which was not negotiated")

    # -- asynchronous interface ------------------------------------------------------------------
    def submit(self, requests) -> int:
        """Place requests on the queue (each in a free slot), publish them once and kick if the
        device wants it. Returns how many were placed: fewer than given when the slots ran out."""
        placed = 0
        try:
            for request in requests:
                if not self._free:
                    break
                self._place(request)
                placed += 1
        finally:
            if placed:
                self.frontend.publish(self.queue_index)
        return placed

    def _place(self, request: BlkRequest) -> None:
        type_, offset, length = request.type, request.offset, request.length
        if offset < 0 or offset % SECTOR_SIZE or length < 0:
            raise ValueError(f"offset {offset} is not a multiple of {SECTOR_SIZE} (or length {length} < 0)")
        if type_ in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT) and length > self.max_io:
            raise ValueError(f"a request moves at most max_io={self.max_io} bytes, not {length}")
        if type_ in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES) and (
                length % SECTOR_SIZE or length // SECTOR_SIZE > 0xFFFFFFFF):
            raise ValueError(f"a {_type_name(type_)} range is a multiple of {SECTOR_SIZE} bytes and at most "
                             f"2^32 - 1 sectors, not {length} bytes")
        slot = self._free.pop()
        try:
            self._fill(slot, request)
        except BaseException:
            self._free.append(slot)
            raise
        self._inflight[slot] = request

    def _fill(self, slot: int, request: BlkRequest) -> None:
        """Write the request into its slot and add the chain: header | data | status."""
        type_, offset, length = request.type, request.offset, request.length
        header = self._headers + slot * VIRTIO_BLK_OUTHDR.size
        buffer = self._buffers + slot * self.max_io
        sector = offset // SECTOR_SIZE if type_ in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT) else 0
        VIRTIO_BLK_OUTHDR.pack_into(self._header_view, slot * VIRTIO_BLK_OUTHDR.size, type_, 0, sector)
        self._status_view[slot] = _STATUS_PENDING
        readable, writable = [(header, VIRTIO_BLK_OUTHDR.size)], []
        view = self._buffer_view[slot * self.max_io:(slot + 1) * self.max_io]
        if type_ == VIRTIO_BLK_T_IN:
            writable = self._segments(buffer, length)
        elif type_ == VIRTIO_BLK_T_OUT:
            view[:length] = request.data
            readable += self._segments(buffer, length)
        elif type_ == VIRTIO_BLK_T_GET_ID:
            writable = [(buffer, VIRTIO_BLK_ID_BYTES)]
        elif type_ in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            VIRTIO_BLK_DISCARD_WRITE_ZEROES.pack_into(view, 0, offset // SECTOR_SIZE, length // SECTOR_SIZE,
                                                      request.flags)
            readable.append((buffer, VIRTIO_BLK_DISCARD_WRITE_ZEROES.size))
        writable.append((self._statuses + slot, 1))
        self.queue.add(readable, writable, slot, indirect=self.indirect)

    def _segments(self, gpa: int, length: int) -> list[tuple[int, int]]:
        step = self._seg_size
        return [(gpa + at, min(step, length - at)) for at in range(0, length, step)]

    def complete(self, min_count: int = 1, timeout: float | None = None) -> list[BlkCompletion]:
        """Reap finished requests, waiting (up to ``timeout``, default the front-end's) until at
        least ``min_count`` are in hand (0: never wait). VhostError(ETIMEDOUT) when they are not."""
        done, self._done = self._done, []
        got = self._reap()
        done += got
        if len(done) >= min_count or not self._inflight:
            return done
        wait = self.frontend.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while len(done) < min_count and self._inflight:
            # Sleep only after a reap that found nothing (the rings' reap re-arms used_event and
            # re-reads used.idx behind a full barrier, so nothing used meanwhile goes unsignalled).
            if not got:
                left = deadline - time.monotonic()
                if left <= 0 or not self.frontend.wait_call(self.queue_index, left):
                    self._done = done
                    raise VhostError(f"virtio-blk queue {self.queue_index}: {self.in_flight} requests still in "
                                     f"flight after {wait} s", errno.ETIMEDOUT)
            got = self._reap()
            done += got
        return done

    def _reap(self) -> list[BlkCompletion]:
        out = []
        status_view, buffer_view, max_io = self._status_view, self._buffer_view, self.max_io
        for slot, used in self.queue.reap():
            request = self._inflight.pop(slot)
            self._free.append(slot)
            status = status_view[slot]
            data = None
            if request.type == VIRTIO_BLK_T_IN:
                data = buffer_view[slot * max_io:slot * max_io + request.length]
            elif request.type == VIRTIO_BLK_T_GET_ID:
                data = buffer_view[slot * max_io:slot * max_io + VIRTIO_BLK_ID_BYTES]
            out.append(BlkCompletion(request if request.tag is None else request.tag, status, used, data))
        return out

    # -- synchronous interface -------------------------------------------------------------------
    def _run(self, requests: list[BlkRequest]) -> list[BlkCompletion]:
        """Submit ``requests`` (tags replaced by their index), wait for all of them; completions of
        other requests that arrive meanwhile are kept for the next complete(). Raises
        BlkRequestError for the first that failed."""
        run = object()
        mine = [r._replace(tag=_SyncTag(run, i)) for i, r in enumerate(requests)]
        results: list[BlkCompletion | None] = [None] * len(mine)
        sent = waiting = 0
        while sent < len(mine) or waiting:
            if sent < len(mine) and self._free:
                n = self.submit(mine[sent:])
                sent, waiting = sent + n, waiting + n
                continue
            others = []
            for c in self.complete(1, self.timeout):
                if type(c.tag) is _SyncTag and c.tag.run is run:
                    # copy out now: the slot's buffer is reused by the next submit
                    results[c.tag.index] = c._replace(data=None if c.data is None else bytes(c.data))
                    waiting -= 1
                else:
                    others.append(c)
            self._done += others
        for request, c in zip(requests, results):
            if c.status != VIRTIO_BLK_S_OK:
                what = (f"virtio-blk {_type_name(request.type)} of {request.length} bytes at offset "
                        f"{request.offset}")
                if c.status == _STATUS_PENDING:
                    raise VhostError(f"{what}: the device used the request ({c.used} bytes) without writing a "
                                     f"status byte", errno.EPROTO)
                raise BlkRequestError(f"{what}: the device answered {_status_name(c.status)}", c.status)
        return results

    def _chunks(self, offset: int, length: int) -> list[tuple[int, int]]:
        if offset < 0 or length < 0 or offset % SECTOR_SIZE or length % SECTOR_SIZE:
            raise ValueError(f"offset {offset} and length {length} must be non-negative multiples of {SECTOR_SIZE}")
        return [(offset + at, min(self.max_io, length - at)) for at in range(0, length, self.max_io)] or [(offset, 0)]

    def read(self, offset: int, length: int) -> bytes:
        """VIRTIO_BLK_T_IN: ``length`` bytes at byte ``offset``."""
        done = self._run([BlkRequest.read(at, n) for at, n in self._chunks(offset, length)])
        return b"".join(c.data for c in done)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """VIRTIO_BLK_T_OUT: ``data`` at byte ``offset``."""
        data = memoryview(data).cast("B")
        self._run([BlkRequest.write(at, data[at - offset:at - offset + n])
                   for at, n in self._chunks(offset, len(data))])

    def flush(self) -> None:
        """VIRTIO_BLK_T_FLUSH: every completed write is stable."""
        self._need(VIRTIO_BLK_F_FLUSH, "flush")
        self._run([BlkRequest.flush()])

    def get_id(self) -> str:
        """VIRTIO_BLK_T_GET_ID: the device's serial ('' when it has none)."""
        data = self._run([BlkRequest.get_id()])[0].data
        return data.split(b"\0", 1)[0].decode("ascii", "replace")

    def discard(self, offset: int, length: int) -> None:
        """VIRTIO_BLK_T_DISCARD of a byte range (split by the device's max_discard_sectors)."""
        self._need(VIRTIO_BLK_F_DISCARD, "discard")
        self._run([BlkRequest.discard(at, n) for at, n in
                   self._ranges(offset, length, self.config.max_discard_sectors)])

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """VIRTIO_BLK_T_WRITE_ZEROES of a byte range: it reads back as zeros (``unmap``: the
        device may deallocate it)."""
        self._need(VIRTIO_BLK_F_WRITE_ZEROES, "write zeroes")
        self._run([BlkRequest.write_zeroes(at, n, unmap) for at, n in
                   self._ranges(offset, length, self.config.max_write_zeroes_sectors)])

    def _ranges(self, offset: int, length: int, max_sectors: int) -> list[tuple[int, int]]:
        if offset < 0 or length <= 0 or offset % SECTOR_SIZE or length % SECTOR_SIZE:
            raise ValueError(f"offset {offset} and length {length} must be multiples of {SECTOR_SIZE}, length > 0")
        step = max(max_sectors, 1) * SECTOR_SIZE
        return [(offset + at, min(step, length - at)) for at in range(0, length, step)]


class _SyncTag(NamedTuple):
    run: object                             # one per sync call: a late completion of an abandoned
    index: int                              # call is never taken for a later call's


def _type_name(type_: int) -> str:
    try:
        return VirtioBlkType(type_).name
    except ValueError:
        return f"request type {type_}"


def _status_name(status: int) -> str:
    try:
        return VirtioBlkStatus(status).name
    except ValueError:
        return f"status {status}"
