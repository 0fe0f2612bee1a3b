"""Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD): the shared region in which a
vhost-user back-end records what it popped, so that after a crash and restart it can resubmit
exactly the requests it had not completed, in the order it had fetched them.

Layout and algorithms are the vhost-user spec's section "Inflight I/O tracking" (QEMU
docs/interop/vhost-user.rst). The region is shared only between processes on one host, so its
structs are in the host's C layout and byte order, like every vhost-user payload: the
``ctypes.Structure`` mirrors below are named like the spec's C structs and define it (their
``sizeof`` and field offsets *are* the layout), and the trackers access the region through
native-order ``memoryview.cast`` views derived from them. A queue region is sized as
libvhost-user and DPDK size it (header + desc[], rounded up to 64 bytes), so a region can be
handed between those back-ends and ours.

Who calls what:
    * back-end, VHOST_USER_GET_INFLIGHT_FD: ``fd, size = allocate(nq, qsz, packed)``, map it with
      :class:`InflightRegion`, reply with the fd (mmap_offset 0), close the fd;
    * back-end, VHOST_USER_SET_INFLIGHT_FD: ``InflightRegion(fd, size, offset, nq, qsz, packed)``;
    * when a ring starts: ``t = region.queue(i)``; ``t.init()`` if not ``t.initialized``, else
      ``t.reconcile(...)``, ``q.set_base(t.vring_base())`` and ``t.resubmit()``;
    * the ring calls the hooks (``on_pop`` / ``on_pop_packed``, ``before_publish``,
      ``after_publish``) on every pop and push.

The region survives a crash of the back-end process, not of the host: every store below is a
plain store into a MAP_SHARED page, and whatever a process stored before it died is what the
next one reads, in program order; that is all the spec's step ordering relies on.
"""

from __future__ import annotations

import array
import ctypes
import errno as _errno
import fcntl
import os
from typing import Callable, Sequence

from .errors import VhostError, VirtqueueError
from .memory import map_fd
from .virtio import VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED, VIRTQ_MAX_SIZE

__all__ = [
    "INFLIGHT_VERSION", "INFLIGHT_ALIGNMENT", "InflightError", "DescStateSplit", "QueueRegionSplit",
    "DescStatePacked", "QueueRegionPacked", "queue_region_size", "allocate", "InflightRegion",
    "InflightSplit", "InflightPacked",
]

#: QueueRegion*.version of an initialised region; 0 means "never initialised" (spec).
INFLIGHT_VERSION = 1
#: Each queue region is rounded up to this many bytes (libvhost-user's and DPDK's INFLIGHT_ALIGNMENT).
INFLIGHT_ALIGNMENT = 64


class InflightError(VhostError):
    """An inflight region that cannot be used: corrupt contents, sizes that do not fit, hooks
    called out of order."""

    default_errno = _errno.EINVAL


# --------------------------------------------------------------------------------------------
# Layout: the spec's C structs, in the host's C layout (native alignment and byte order).
# --------------------------------------------------------------------------------------------

class DescStateSplit(ctypes.Structure):
    """One descriptor's state in a split queue region (16 bytes)."""

    _fields_ = [
        ("inflight", ctypes.c_uint8),       # 1 while the head descriptor is in flight
        ("padding", ctypes.c_uint8 * 5),
        ("next", ctypes.c_uint16),          # link of the last-batch list
        ("counter", ctypes.c_uint64),       # fetch order (head descriptors only)
    ]


class QueueRegionSplit(ctypes.Structure):
    """A split queue region: 16-byte header, then ``desc[desc_num]`` at offset 16."""

    _fields_ = [
        ("features", ctypes.c_uint64),      # region feature flags; the spec defines none (0)
        ("version", ctypes.c_uint16),       # INFLIGHT_VERSION; 0 = uninitialised
        ("desc_num", ctypes.c_uint16),      # = queue size
        ("last_batch_head", ctypes.c_uint16),
        ("used_idx", ctypes.c_uint16),      # used ring idx after the last completed batch
        ("desc", DescStateSplit * 0),       # flexible array member
    ]


class DescStatePacked(ctypes.Structure):
    """One entry of a packed queue region (32 bytes): a saved ring descriptor, and for the head
    entry of a chain its length, last entry, fetch order and inflight flag."""

    _fields_ = [
        ("inflight", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
        ("next", ctypes.c_uint16),          # next entry (free list, or the rest of a chain)
        ("last", ctypes.c_uint16),          # head only: last entry of the chain
        ("num", ctypes.c_uint16),           # head only: descriptors in the chain
        ("counter", ctypes.c_uint64),       # head only: fetch order
        ("id", ctypes.c_uint16),            # the descriptor as read from the ring
        ("flags", ctypes.c_uint16),
        ("len", ctypes.c_uint32),
        ("addr", ctypes.c_uint64),
    ]


class QueueRegionPacked(ctypes.Structure):
    """A packed queue region: 29 bytes of header fields, C tail padding to 32 (``desc`` is 8-byte
    aligned; rust-vmm/vhost#88 got this wrong), then ``desc[desc_num]`` at offset 32."""

    _fields_ = [
        ("features", ctypes.c_uint64),
        ("version", ctypes.c_uint16),
        ("desc_num", ctypes.c_uint16),
        ("free_head", ctypes.c_uint16),
        ("old_free_head", ctypes.c_uint16),
        ("used_idx", ctypes.c_uint16),
        ("old_used_idx", ctypes.c_uint16),
        ("used_wrap_counter", ctypes.c_uint8),
        ("old_used_wrap_counter", ctypes.c_uint8),
        ("padding", ctypes.c_uint8 * 7),
        ("desc", DescStatePacked * 0),
    ]


def queue_region_size(queue_size: int, packed: bool = False) -> int:
    """Bytes of one queue's region: header + queue_size entries, rounded up to 64.

    Equal to libvhost-user's ``vu_inflight_queue_size`` (split) and DPDK's
    ``get_pervq_shm_size_split/packed`` for every queue size.
    """
    if not 1 <= queue_size <= VIRTQ_MAX_SIZE:
        raise InflightError(f"inflight queue size {queue_size} is outside 1..{VIRTQ_MAX_SIZE}")
    region, state = (QueueRegionPacked, DescStatePacked) if packed else (QueueRegionSplit, DescStateSplit)
    size = region.desc.offset + queue_size * ctypes.sizeof(state)
    return -(-size // INFLIGHT_ALIGNMENT) * INFLIGHT_ALIGNMENT


def _check_num_queues(num_queues: int) -> None:
    if not 1 <= num_queues <= 0xFFFF:
        raise InflightError(f"inflight num_queues {num_queues} is outside 1..65535")


def allocate(num_queues: int, queue_size: int, packed: bool = False) -> tuple[int, int]:
    """VHOST_USER_GET_INFLIGHT_FD: a zero-filled sealed memfd for ``num_queues`` queue regions.

    Returns ``(fd, mmap_size)``; the fd is the caller's (send it, then close it). Sealed against
    growing and shrinking (and further sealing), as libvhost-user does, so no peer can truncate
    it under a mapping.
    """
    _check_num_queues(num_queues)
    size = num_queues * queue_region_size(queue_size, packed)
    try:
        fd = os.memfd_create("vhost-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as exc:
        raise InflightError(f"memfd_create for the inflight region failed: {exc.strerror}", exc.errno) from None
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    except OSError as exc:
        os.close(fd)
        raise InflightError(f"cannot size and seal the {size}-byte inflight region: {exc.strerror}",
                            exc.errno) from None
    return fd, size


class InflightRegion:
    """A mapped inflight region (VHOST_USER_SET_INFLIGHT_FD, or the result of :func:`allocate`):
    ``num_queues`` queue regions, one :class:`InflightSplit` / :class:`InflightPacked` each.

    The fd passed in stays the caller's; the region keeps its own duplicate (``fileno()``) for as
    long as it is open, e.g. for a front-end that hands it to a restarted back-end.
    """

    def __init__(self, fd: int, mmap_size: int, mmap_offset: int, num_queues: int, queue_size: int,
                 packed: bool = False) -> None:
        _check_num_queues(num_queues)
        self.queue_region_size = queue_region_size(queue_size, packed)
        need = num_queues * self.queue_region_size
        if mmap_size < need:
            raise InflightError(f"inflight mmap_size {mmap_size:#x} is smaller than {num_queues} "
                                f"{'packed' if packed else 'split'} queue regions of size {queue_size} "
                                f"({need:#x} bytes)")
        self.mmap_size, self.mmap_offset = mmap_size, mmap_offset
        self.num_queues, self.queue_size, self.packed = num_queues, queue_size, packed
        self._view = map_fd(fd, mmap_size, mmap_offset)
        try:
            self._fd = os.dup(fd)
        except OSError as exc:
            self._view.release()
            raise InflightError(f"cannot keep the inflight region fd {fd}: {exc.strerror}", exc.errno) from None
        self._queues: list[InflightSplit | InflightPacked | None] = [None] * num_queues

    def queue(self, index: int) -> InflightSplit | InflightPacked:
        """The tracker of queue ``index`` (the same object on every call)."""
        if self._fd < 0:
            raise InflightError("the inflight region is closed", _errno.EBADF)
        if not 0 <= index < self.num_queues:
            raise InflightError(f"inflight queue {index} does not exist (num_queues {self.num_queues})")
        tracker = self._queues[index]
        if tracker is None:
            start = index * self.queue_region_size
            view = self._view[start:start + self.queue_region_size]
            cls = InflightPacked if self.packed else InflightSplit
            try:
                tracker = self._queues[index] = cls(view, self.queue_size, index=index)
            except InflightError:
                view.release()
                raise
        return tracker

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        """Unmap the region and close the region's fd; trackers handed out become unusable."""
        if self._fd < 0:
            return
        for tracker in self._queues:
            if tracker is not None:
                tracker._release()
        self._view.release()     # unmapped once no view someone else took is alive
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> InflightRegion:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"InflightRegion(num_queues={self.num_queues}, queue_size={self.queue_size}, "
                f"packed={self.packed}, mmap_size={self.mmap_size:#x}, fd={self._fd})")


# --------------------------------------------------------------------------------------------
# Trackers
# --------------------------------------------------------------------------------------------

# Header fields, as indices into the u16 (or byte) view of a queue region.
def _u16(region, field: str) -> int:
    offset = getattr(region, field).offset
    assert offset % 2 == 0, field
    return offset // 2


_VERSION = _u16(QueueRegionSplit, "version")
_DESC_NUM = _u16(QueueRegionSplit, "desc_num")
assert (_VERSION, _DESC_NUM) == (_u16(QueueRegionPacked, "version"), _u16(QueueRegionPacked, "desc_num"))
_S_LAST_BATCH_HEAD = _u16(QueueRegionSplit, "last_batch_head")
_S_USED_IDX = _u16(QueueRegionSplit, "used_idx")
_P_FREE_HEAD = _u16(QueueRegionPacked, "free_head")
_P_OLD_FREE_HEAD = _u16(QueueRegionPacked, "old_free_head")
_P_USED_IDX = _u16(QueueRegionPacked, "used_idx")
_P_OLD_USED_IDX = _u16(QueueRegionPacked, "old_used_idx")
_P_USED_WRAP = QueueRegionPacked.used_wrap_counter.offset            # byte indices
_P_OLD_USED_WRAP = QueueRegionPacked.old_used_wrap_counter.offset

_NO_ENTRY = 0xFFFFFFFF      # buffer id not in flight
_AVAIL_USED = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED


class _Tracker:
    """What both trackers share: the header views, one strided "column" view per desc[] field
    (``self._d_next[i]`` is desc[i].next), validation."""

    _region: type = QueueRegionSplit
    _state: type = DescStateSplit
    _columns: tuple[str, ...] = ()

    def __init__(self, view, queue_size: int, index: int | None) -> None:
        queue_region_size(queue_size)             # range check
        view = memoryview(view).cast("B")
        need = self._region.desc.offset + queue_size * ctypes.sizeof(self._state)
        if view.readonly or len(view) < need:
            raise InflightError(f"{self._where(index)}needs a writable view of at least {need} bytes "
                                f"for queue size {queue_size}, got {len(view)}"
                                f"{' (read-only)' if view.readonly else ''}")
        self.queue_size, self.index = queue_size, index
        self._b = view = view[:need]      # need is a multiple of 16: every cast below fits
        self._h = view.cast("H")
        self._q = view.cast("Q")
        words = {1: view, 2: self._h, 4: view.cast("I"), 8: self._q}
        self._views = list(words.values())
        stride, types = ctypes.sizeof(self._state), dict(self._state._fields_)
        for name in self._columns:
            width = ctypes.sizeof(types[name])
            start = (self._region.desc.offset + getattr(self._state, name).offset) // width
            column = words[width][start:start + stride // width * queue_size:stride // width]
            setattr(self, "_d_" + name, column)
            self._views.append(column)
        self._counter = 0

    @staticmethod
    def _where(index: int | None) -> str:
        return "inflight region: " if index is None else f"inflight region of queue {index}: "

    def _fail(self, message: str) -> InflightError:
        return InflightError(self._where(self.index) + message)

    def _release(self) -> None:
        for view in reversed(self._views):
            view.release()

    @property
    def features(self) -> int:
        return self._q[0]

    @property
    def version(self) -> int:
        return self._h[_VERSION]

    @property
    def desc_num(self) -> int:
        return self._h[_DESC_NUM]

    @property
    def initialized(self) -> bool:
        """True once the region holds state (version != 0): reconcile, do not init."""
        return self._h[_VERSION] != 0

    def _zero(self, features: int) -> None:
        """First half of init(): everything zero, features set, version still 0."""
        self._b[:] = bytes(len(self._b))
        self._q[0] = features
        self._h[_DESC_NUM] = self.queue_size
        self._counter = 0

    def _check_header(self) -> None:
        version, desc_num = self.version, self.desc_num
        if version != INFLIGHT_VERSION:
            what = "is not initialised" if version == 0 else "has an unknown layout"
            raise self._fail(f"{what} (version {version}, expected {INFLIGHT_VERSION})")
        if desc_num != self.queue_size:
            raise self._fail(f"desc_num {desc_num} does not match the queue size {self.queue_size}")

    def _inflight_flags(self) -> bytes:
        flags = self._d_inflight.tobytes()
        bad = flags.translate(None, b"\x00\x01")
        if bad:
            entry = next(i for i, f in enumerate(flags) if f > 1)
            raise self._fail(f"{'descriptor' if self._state is DescStateSplit else 'entry'} {entry} has "
                             f"inflight = {flags[entry]} (only 0 and 1 are valid)")
        return flags

    def _restart_counter(self) -> None:
        """The spec's global counter continues after the largest one recorded."""
        top = max(self._d_counter.tolist(), default=-1) + 1
        if top >= 1 << 64:
            raise self._fail("a descriptor counter is 2^64-1; the counter cannot continue")
        self._counter = top


class InflightSplit(_Tracker):
    """Inflight tracking of one split virtqueue (QueueRegionSplit in ``view``).

    Hooks, in the order the split ring calls them: :meth:`on_pop` for every chain popped;
    :meth:`before_publish` with a batch's heads before the ring stores used.idx, and
    :meth:`after_publish` after. On restart: :meth:`reconcile`, then :meth:`resubmit`.
    """

    _region, _state = QueueRegionSplit, DescStateSplit
    _columns = ("inflight", "next", "counter")

    def __init__(self, view, queue_size: int, *, index: int | None = None) -> None:
        super().__init__(view, queue_size, index)
        if self.initialized:
            self._restart_counter()

    def __repr__(self) -> str:
        return (f"InflightSplit(queue_size={self.queue_size}, index={self.index}, version={self.version}, "
                f"used_idx={self.used_idx}, last_batch_head={self.last_batch_head})")

    @property
    def last_batch_head(self) -> int:
        return self._h[_S_LAST_BATCH_HEAD]

    @property
    def used_idx(self) -> int:
        return self._h[_S_USED_IDX]

    def init(self, features: int = 0) -> None:
        """Start afresh (the ring starts with nothing in flight): zero every state, then the
        header, version last. ``features`` are the region's own flags, of which the spec defines
        none: leave it 0."""
        self._zero(features)
        self._h[_VERSION] = INFLIGHT_VERSION

    # -- hooks (hot path: the ring has validated every head) ----------------------------------
    def on_pop(self, head: int) -> None:
        """"When receiving available buffers": desc[head].counter = counter++, inflight = 1."""
        counter = self._counter
        self._counter = counter + 1
        self._d_counter[head] = counter
        self._d_inflight[head] = 1

    def before_publish(self, heads: Sequence[int]) -> None:
        """"Supplying used buffers" steps 1-3 for a batch: chain the heads into the last-batch
        list (desc[h].next = last_batch_head; last_batch_head = h). Call before used.idx moves."""
        h, nxt = self._h, self._d_next
        last = h[_S_LAST_BATCH_HEAD]
        for head in heads:
            nxt[head] = last
            last = head
        h[_S_LAST_BATCH_HEAD] = last

    def after_publish(self, heads: Sequence[int], used_idx: int) -> None:
        """Steps 6-7, once used.idx = ``used_idx`` is published: clear each head's inflight flag,
        then record ``used_idx``."""
        flags = self._d_inflight
        for head in heads:
            flags[head] = 0
        self._h[_S_USED_IDX] = used_idx & 0xFFFF

    # -- reconnect ------------------------------------------------------------------------------
    def reconcile(self, ring_used_idx: int) -> None:
        """"When reconnecting" step 1, given the idx now in the used ring: if the recorded used_idx
        lags it, the batch from last_batch_head was published before the crash: mark it done."""
        self._check_header()
        h, nxt, size = self._h, self._d_next, self.queue_size
        ring_used_idx &= 0xFFFF
        used_idx, first = h[_S_USED_IDX], h[_S_LAST_BATCH_HEAD]
        batch = (ring_used_idx - used_idx) & 0xFFFF
        if batch:
            if batch > size:
                raise self._fail(f"used ring idx {ring_used_idx} is {batch} entries past the recorded "
                                 f"used_idx {used_idx}, more than the queue size {size}")
            heads, seen, head = [], bytearray(size), first
            for n in range(batch):
                if head >= size:
                    raise self._fail(f"entry {n} of the last batch is descriptor {head}, outside the "
                                     f"queue of {size} (last_batch_head {first})")
                if seen[head]:
                    raise self._fail(f"the last batch list from last_batch_head {first} loops back to "
                                     f"descriptor {head} after {n} of {batch} entries")
                seen[head] = 1
                heads.append(head)
                head = nxt[head]
            for head in heads:
                self._d_inflight[head] = 0
            h[_S_USED_IDX] = ring_used_idx
        self._restart_counter()

    def resubmit(self) -> list[int]:
        """Step 2 (after :meth:`reconcile`): the heads still in flight, in fetch (counter) order.
        The descriptor table still holds their chains: the driver cannot reuse them until used."""
        self._check_header()
        counters = self._d_counter.tolist()
        pending = sorted((counters[head], head) for head, flag in enumerate(self._inflight_flags()) if flag)
        return [head for _, head in pending]

    def vring_base(self) -> int:
        """Where the ring resumes reading the avail ring after :meth:`reconcile`: used_idx plus the
        chains still in flight (libvhost-user's rule; the front-end's SET_VRING_BASE cannot know
        it after a crash). For the ring's ``set_base``."""
        self._check_header()
        return (self._h[_S_USED_IDX] + self._inflight_flags().count(1)) & 0xFFFF


class InflightPacked(_Tracker):
    """Inflight tracking of one packed virtqueue (QueueRegionPacked in ``view``).

    The region keeps a copy of every descriptor popped (the ring's slots are overwritten by used
    descriptors), in entries taken from a free list. Hooks: :meth:`on_pop_packed` per chain;
    :meth:`before_publish` with a batch's buffer ids before the ring writes the flags of the
    batch's first used descriptor, :meth:`after_publish` after. On restart: :meth:`reconcile`,
    then :meth:`resubmit`.
    """

    _region, _state = QueueRegionPacked, DescStatePacked
    _columns = ("inflight", "next", "last", "num", "counter", "id", "flags", "len", "addr")

    def __init__(self, view, queue_size: int, *, index: int | None = None) -> None:
        super().__init__(view, queue_size, index)
        self._by_id = [_NO_ENTRY] * queue_size     # buffer id -> head entry (rebuilt by reconcile)
        self._publishing: list[int] = []           # head entries between before_ and after_publish
        if self.initialized:
            self._restart_counter()

    def __repr__(self) -> str:
        return (f"InflightPacked(queue_size={self.queue_size}, index={self.index}, version={self.version}, "
                f"free_head={self.free_head}, used_idx={self.used_idx}, "
                f"used_wrap_counter={self.used_wrap_counter})")

    free_head = property(lambda self: self._h[_P_FREE_HEAD])
    old_free_head = property(lambda self: self._h[_P_OLD_FREE_HEAD])
    used_idx = property(lambda self: self._h[_P_USED_IDX])
    old_used_idx = property(lambda self: self._h[_P_OLD_USED_IDX])
    used_wrap_counter = property(lambda self: self._b[_P_USED_WRAP])
    old_used_wrap_counter = property(lambda self: self._b[_P_OLD_USED_WRAP])

    def init(self, features: int = 0) -> None:
        """Start afresh: every entry on the free list (desc[i].next = i + 1; queue_size ends it),
        used index 0, both wrap counters 1 (the ring's initial device wrap counter), as DPDK
        initialises it; version last."""
        self._zero(features)
        self._d_next[:] = array.array("H", range(1, self.queue_size + 1))
        self._b[_P_USED_WRAP] = self._b[_P_OLD_USED_WRAP] = 1
        self._h[_VERSION] = INFLIGHT_VERSION
        self._by_id = [_NO_ENTRY] * self.queue_size
        self._publishing = []

    # -- hooks ----------------------------------------------------------------------------------
    def on_pop_packed(self, head_slot: int, descriptors: Sequence[tuple[int, int, int, int]]) -> None:
        """"When receiving available buffers", for one chain: ``descriptors`` are its
        (addr, len, id, flags) as read from the ring (one for an indirect chain), from ring slot
        ``head_slot`` on. They are copied into free entries; the head entry gets num, last,
        counter and inflight; then free_head and old_free_head move past the chain, which
        commits it (a crash before that leaves the entries on the free list)."""
        size = self.queue_size
        buffer_id = descriptors[-1][2]         # the buffer id is the chain's last descriptor's
        if buffer_id >= size:
            raise VirtqueueError(f"packed chain at slot {head_slot}: buffer id {buffer_id} is not "
                                 f"below the queue size {size}")
        if self._by_id[buffer_id] != _NO_ENTRY:
            raise VirtqueueError(f"packed chain at slot {head_slot}: buffer id {buffer_id} is already in flight")
        h, nxt, ids, flags_, lens, addrs = (self._h, self._d_next, self._d_id, self._d_flags,
                                            self._d_len, self._d_addr)
        head = free = h[_P_OLD_FREE_HEAD]
        last = num = 0
        for addr, length, desc_id, flags in descriptors:
            if free >= size:
                raise self._fail(f"no free entry for descriptor {num} of the chain at slot {head_slot} "
                                 f"(free list ends at {free}; more than {size} descriptors in flight?)")
            addrs[free] = addr
            lens[free] = length
            ids[free] = desc_id
            flags_[free] = flags
            last = free
            num += 1
            free = nxt[free]
        self._d_last[head] = last
        self._d_num[head] = num
        counter = self._counter
        self._counter = counter + 1
        self._d_counter[head] = counter
        self._d_inflight[head] = 1
        h[_P_FREE_HEAD] = free
        h[_P_OLD_FREE_HEAD] = free
        self._by_id[buffer_id] = head

    def before_publish(self, ids: Sequence[int], used_idx: int | None = None,
                       used_wrap: int | None = None) -> None:
        """"Supplying used buffers" steps 1-6 for a batch of buffer ids: give each chain's entries
        back to the free list, then move used_idx / used_wrap_counter to where the ring's will be
        after the batch (from the chains' lengths, unless given). Call before the ring writes the
        flags of the batch's first used descriptor."""
        h, by_id, size = self._h, self._by_id, self.queue_size
        nxt, lasts, nums = self._d_next, self._d_last, self._d_num
        heads, taken = self._publishing, []
        free = h[_P_FREE_HEAD]
        total = 0
        for buffer_id in ids:
            head = by_id[buffer_id] if 0 <= buffer_id < size else _NO_ENTRY
            if head == _NO_ENTRY:         # undo the map changes; the links written are harmless
                for undo in reversed(taken):
                    by_id[undo] = heads.pop()
                raise self._fail(f"buffer id {buffer_id} is not in flight")
            by_id[buffer_id] = _NO_ENTRY
            taken.append(buffer_id)
            heads.append(head)
            nxt[lasts[head]] = free
            free = head
            total += nums[head]
        h[_P_FREE_HEAD] = free
        if used_idx is None:
            used_idx, used_wrap = h[_P_USED_IDX] + total, self._b[_P_USED_WRAP]
            while used_idx >= size:
                used_idx -= size
                used_wrap ^= 1
        self._b[_P_USED_WRAP] = used_wrap
        h[_P_USED_IDX] = used_idx

    def after_publish(self, ids: Sequence[int], used_idx: int, used_wrap: int) -> None:
        """Steps 8-9, once the ring has published the batch (``used_idx`` / ``used_wrap``: the
        ring's device-side index and wrap counter now): clear the heads' inflight flags, then
        old_free_head, old_used_wrap_counter, old_used_idx = the current ones."""
        b, h, flags = self._b, self._h, self._d_inflight
        for head in self._publishing:
            flags[head] = 0
        self._publishing = []
        recorded = (h[_P_USED_IDX], b[_P_USED_WRAP])
        if recorded != (used_idx, used_wrap):
            h[_P_USED_IDX], b[_P_USED_WRAP] = used_idx, used_wrap
        h[_P_OLD_FREE_HEAD] = h[_P_FREE_HEAD]
        b[_P_OLD_USED_WRAP] = used_wrap
        h[_P_OLD_USED_IDX] = used_idx
        if recorded != (used_idx, used_wrap):
            raise self._fail(f"the ring's used index and wrap ({used_idx}, {used_wrap}) after buffers "
                             f"{list(ids)} differ from {recorded}, computed from the chains' lengths "
                             f"given to on_pop_packed")

    # -- reconnect ------------------------------------------------------------------------------
    def reconcile(self, ring_flags: int | Callable[[int], int]) -> None:
        """"When reconnecting" steps 1-3. ``ring_flags``: the flags of the ring descriptor at
        :attr:`old_used_idx`, or a callable that reads them given that slot (consulted only if a
        batch was in progress). Those flags say whether the ring published the batch (commit it)
        or not (roll it back); then the free list's inflight flags are cleared and the buffer-id
        map rebuilt."""
        self._check_header()
        h, b, size = self._h, self._b, self.queue_size
        for name, value, limit in (
                ("free_head", h[_P_FREE_HEAD], size), ("old_free_head", h[_P_OLD_FREE_HEAD], size),
                ("used_idx", h[_P_USED_IDX], size - 1), ("old_used_idx", h[_P_OLD_USED_IDX], size - 1),
                ("used_wrap_counter", b[_P_USED_WRAP], 1), ("old_used_wrap_counter", b[_P_OLD_USED_WRAP], 1)):
            if value > limit:
                raise self._fail(f"{name} {value} is out of range (at most {limit})")
        old_used, old_wrap = h[_P_OLD_USED_IDX], b[_P_OLD_USED_WRAP]
        if (h[_P_USED_IDX], b[_P_USED_WRAP]) != (old_used, old_wrap):
            flags = ring_flags(old_used) if callable(ring_flags) else ring_flags
            # Until the device writes a used descriptor there, the slot holds an available one of
            # the same lap: AVAIL == wrap counter, USED != wrap counter.
            available = VIRTQ_DESC_F_AVAIL if old_wrap else VIRTQ_DESC_F_USED
            if flags & _AVAIL_USED != available:              # published: commit the batch
                h[_P_OLD_FREE_HEAD] = h[_P_FREE_HEAD]
                b[_P_OLD_USED_WRAP] = b[_P_USED_WRAP]
                h[_P_OLD_USED_IDX] = h[_P_USED_IDX]
        h[_P_FREE_HEAD] = h[_P_OLD_FREE_HEAD]                 # roll back anything in progress
        b[_P_USED_WRAP] = b[_P_OLD_USED_WRAP]
        h[_P_USED_IDX] = h[_P_OLD_USED_IDX]
        nxt, inflight = self._d_next, self._d_inflight
        on_free_list = bytearray(size)
        entry, n = h[_P_FREE_HEAD], 0
        while entry != size:
            if entry > size:
                raise self._fail(f"free list entry {n} is {entry}, outside the queue of {size}")
            if on_free_list[entry]:
                raise self._fail(f"the free list loops back to entry {entry} after {n} entries")
            on_free_list[entry] = 1
            inflight[entry] = 0
            entry = nxt[entry]
            n += 1
        by_id = [_NO_ENTRY] * size
        for _, head, entries in self._chains(on_free_list):
            buffer_id = self._d_id[entries[-1]]
            if buffer_id >= size or by_id[buffer_id] != _NO_ENTRY:
                raise self._fail(f"the chain at entry {head} has buffer id {buffer_id}, "
                                 f"{'out of range' if buffer_id >= size else 'already used by another chain'}")
            by_id[buffer_id] = head
        self._by_id, self._publishing = by_id, []
        self._restart_counter()

    def resubmit(self) -> list[list[tuple[int, int, int, int]]]:
        """Step 4 (after :meth:`reconcile`): the chains still in flight, in fetch (counter) order,
        each as the (addr, len, id, flags) descriptors saved from the ring."""
        self._check_header()
        addrs, lens, ids, flags = self._d_addr, self._d_len, self._d_id, self._d_flags
        return [[(addrs[e], lens[e], ids[e], flags[e]) for e in entries] for _, _, entries in self._chains()]

    def vring_base(self) -> int:
        """The ring's state after :meth:`reconcile`, in the VHOST_USER_SET_VRING_BASE encoding of
        packed rings (bits 0-14 last avail idx, 15 avail wrap, 16-30 used idx, 31 used wrap): the
        device resumes reading at used_idx plus the slots of the chains still in flight."""
        self._check_header()
        size, used, wrap = self.queue_size, self._h[_P_USED_IDX], self._b[_P_USED_WRAP]
        avail, avail_wrap = used + sum(len(entries) for _, _, entries in self._chains()), wrap
        while avail >= size:
            avail -= size
            avail_wrap ^= 1
        return avail | avail_wrap << 15 | used << 16 | wrap << 31

    def _chains(self, on_free_list: bytearray | None = None) -> list[tuple[int, int, list[int]]]:
        """(counter, head, entries) of every chain in flight, in counter order, each walked and
        checked: num in 1..queue_size, entries in range, ending at ``last``, no entry in two
        chains (nor on the free list, when given)."""
        size, nxt, nums, lasts, counters = (self.queue_size, self._d_next, self._d_num, self._d_last,
                                            self._d_counter)
        taken = bytearray(on_free_list) if on_free_list is not None else bytearray(size)
        chains = []
        for head, flag in enumerate(self._inflight_flags()):
            if not flag:
                continue
            num, last = nums[head], lasts[head]
            if not 1 <= num <= size:
                raise self._fail(f"the chain at entry {head} has num = {num} descriptors")
            entries, entry = [], head
            for n in range(num):
                if entry >= size:
                    raise self._fail(f"descriptor {n} of the chain at entry {head} is entry {entry}, "
                                     f"outside the queue of {size}")
                if taken[entry]:
                    raise self._fail(f"entry {entry} of the chain at entry {head} also belongs to "
                                     f"another chain or to the free list")
                taken[entry] = 1
                entries.append(entry)
                if n + 1 < num:
                    entry = nxt[entry]
            if entry != last:
                raise self._fail(f"the chain at entry {head} ends at entry {entry} after {num} "
                                 f"descriptors, but its last is {last}")
            chains.append((counters[head], head, entries))
        chains.sort()
        return chains
