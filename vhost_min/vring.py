"""The split virtqueue (virtio 1.3 §2.7): the device side a backend runs and the driver side a
frontend or userspace driver runs, both over guest memory shared with the other side.

Layout (virtio §2.7, "Virtqueue Layout"), Q a power of two, at most 32768::

    descriptor table  16*Q bytes, align 16   struct virtq_desc {le64 addr; le32 len; le16 flags; le16 next}
    available ring     6+2*Q bytes, align 2   {le16 flags; le16 idx; le16 ring[Q]; le16 used_event}
    used ring          6+8*Q bytes, align 4   {le16 flags; le16 idx; {le32 id; le32 len} ring[Q]; le16 avail_event}

The trailing ``used_event`` / ``avail_event`` words exist only with VIRTIO_F_EVENT_IDX; without it
the rings are two bytes shorter and only those bytes must be inside guest memory.

The device side trusts nothing the driver wrote: every index, length, flag and address is checked
before it is used, each field is read exactly once (so a driver changing memory under us cannot
make a checked value differ from the used one), and the first violation latches the queue broken
(the spec's DEVICE_NEEDS_RESET situation) with a message naming the head, the descriptor and the
bad value.

Words the other side reads while we write them (the indices, flags and event words) go through
``memoryview.cast("H")`` items, which CPython loads and stores with one memcpy of two bytes: a single
instruction on an aligned address, so never torn. ``struct.pack_into`` must not be used for them:
it zero-fills its target before writing the values, so the other side can read a transient 0 (an
index jumping back 65536 - n, a flag cleared). Structs are fine for what the other side does not
read concurrently (descriptors and used elements before they are published). Virtio 1.x rings are
little-endian; native words are used only on a little-endian host (x86-64 and aarch64 both are).
"""

from __future__ import annotations

import ctypes
import struct
import sys
from itertools import chain as _chain
from typing import Sequence

from .errors import GuestMemoryError, VirtqueueError
from .memory import GuestMemory, IOTLBMiss, barriers
from .virtio import (SPLIT_AVAIL_ALIGN, SPLIT_DESC_ALIGN, SPLIT_USED_ALIGN, VIRTQ_AVAIL_F_NO_INTERRUPT,
                     VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_SIZE,
                     VIRTQ_MAX_SIZE, VIRTQ_USED_F_NO_NOTIFY, misaligned_ring_part, split_ring_sizes,
                     vring_need_event)

__all__ = ["SplitDeviceQueue", "SplitDriverQueue", "MAX_INDIRECT_ENTRIES", "check_split_size"]

_DESC = struct.Struct("<QIHH")          # struct virtq_desc
_USED_ELEM = struct.Struct("<II")       # struct virtq_used_elem {le32 id; le32 len}
_U32_MAX = 0xFFFFFFFF
#: Largest indirect table accepted: a 16-bit ``next`` addresses 65536 entries (Linux vhost's limit).
MAX_INDIRECT_ENTRIES = 1 << 16

# Byte offsets inside the rings, and the same as indices of 16-bit words (the cast("H") views).
_USED_RING = 4                          # used elements start here
_ELEM_SIZE = 8                          # struct virtq_used_elem {le32 id; le32 len}
_FLAGS, _IDX, _RING = 0, 1, 2           # avail/used flags, idx, first avail ring entry (in words)

_EMPTY = memoryview(bytearray())        # what a zero-length descriptor maps to

_used_elem_structs: dict[int, struct.Struct] = {}

#: The fast path reads indirect tables of up to this many entries (larger ones, rare, take the
#: general walk); a virtio-blk request is a header, its data segments and a status byte.
_FAST_TABLE_ENTRIES = 256
_FAST_TABLE_BYTES = _FAST_TABLE_ENTRIES * VIRTQ_DESC_SIZE
_ADDR_LEN = struct.Struct("<QI4x").iter_unpack          # each descriptor's addr and len
_table_readers: dict[int, object] = {}
#: Well-formed indirect table shapes -> their count of device-readable entries (see _table_reader).
_TABLE_SHAPES: dict[tuple[int, ...], int] = {}


def _table_reader(length: int):
    """For an indirect table of ``length`` bytes (made once per length): ``read(buffer, offset)``
    gives the table's shape, (flags, next) of every entry but the last and the last one's flags.
    _TABLE_SHAPES gets the well-formed shapes of that length (a shape's length says its table's),
    each mapped to its count of device-readable entries; well-formed is what drivers write: walked
    in order (next = 1, 2, ...), NEXT on every entry but the last, readable (flags 0) before
    writable (WRITE), no INDIRECT and no other bit. Any other table is left to the general walk."""
    read = _table_readers.get(length)
    if read is None:
        n = length // VIRTQ_DESC_SIZE
        for readable in range(n + 1):
            flags = [VIRTQ_DESC_F_NEXT] * readable + [VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE] * (n - readable)
            flags[-1] &= ~VIRTQ_DESC_F_NEXT
            shape: list[int] = []
            for j, f in enumerate(flags):
                shape += (f, j + 1) if j + 1 < n else (f,)
            _TABLE_SHAPES[tuple(shape)] = readable
        read = _table_readers[length] = struct.Struct("<" + "12xHH" * (n - 1) + "12xH2x").unpack_from
    return read


def _used_elems(n: int) -> struct.Struct:
    """``n`` used elements as 2*n le32 (id, len, id, len, ...), compiled once per count."""
    s = _used_elem_structs.get(n)
    if s is None:
        s = _used_elem_structs[n] = struct.Struct(f"<{2 * n}I")
    return s


def check_split_size(size: int) -> None:
    """A split ring's size must be a power of two from 1 to 32768 (virtio §2.7)."""
    if not isinstance(size, int) or not 1 <= size <= VIRTQ_MAX_SIZE or size & (size - 1):
        raise VirtqueueError(f"split queue size {size!r} is not a power of two from 1 to {VIRTQ_MAX_SIZE}")


def _check_alignment(desc_addr: int, avail_addr: int, used_addr: int) -> None:
    problem = misaligned_ring_part(desc_addr, avail_addr, used_addr, packed=False)
    if problem:
        raise VirtqueueError(problem)


def _words(view: memoryview, what: str, align: int) -> memoryview:
    """A ring part as native 16-bit words (see the module docstring), refusing a host mapping
    whose alignment would let a word straddle two cache lines."""
    if sys.byteorder != "little":
        raise VirtqueueError("vhost_min's rings need a little-endian host")
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):   # read-only or empty: nothing to check
        address = 0
    if address % align:
        raise VirtqueueError(f"{what} is mapped at host address {address:#x}, not {align}-byte aligned: "
                             f"its index could not be accessed atomically")
    return view.cast("H")


def _where(idx: int, table: tuple[int, int] | None) -> str:
    """Names a descriptor in messages: in the descriptor table or in an indirect table."""
    if table is None:
        return f"descriptor {idx}"
    return f"descriptor {idx} of the indirect table at {table[0]:#x} (from descriptor {table[1]})"


def _ring_view(memory, what: str, addr: int, length: int, write: bool) -> memoryview:
    """One contiguous view of a ring part; the part must lie inside one region (or IOTLB entries
    contiguous in memory). An IOTLBMiss passes unchanged: the ring's pages were invalidated (a
    vIOMMU's global flush, say), and the caller asks for them again and retries."""
    try:
        if isinstance(memory, GuestMemory):
            return memory.view(addr, length)
        return memory.view(addr, length, write)
    except IOTLBMiss:
        raise
    except GuestMemoryError as exc:
        raise GuestMemoryError(f"{what} at {addr:#x} ({length} bytes) is not inside one memory region: "
                               f"{exc}", exc.errno) from None


class SplitDeviceQueue:
    """The device (backend) side of a split virtqueue: pop available chains, push used ones.

    ``driver_area`` is the available ring's address and ``device_area`` the used ring's, both in
    ``memory``'s address space (guest-physical for a :class:`GuestMemory`, IOVA for an IOTLB).
    The used index starts from what the used ring holds (a reconnecting backend resumes from
    the ring, as libvhost-user and vhost do); :meth:`set_base` sets only the next avail index.

    Notifications: the queue starts with driver notifications enabled. With EVENT_IDX, every
    pop that consumes entries moves ``avail_event`` to the new next-avail index, and a pop that
    finds nothing re-checks after a full barrier, so "pop until empty, then wait for a kick" is
    race-free; :meth:`disable_notifications` / :meth:`enable_notifications` give the classic
    suppress-while-polling loop.
    """

    def __init__(self, memory, size: int, desc_addr: int, driver_area: int, device_area: int, *,
                 event_idx: bool = False, indirect: bool = True, log=None, log_used_addr: int | None = None,
                 inflight=None) -> None:
        check_split_size(size)
        _check_alignment(desc_addr, driver_area, device_area)
        self.size = size
        self.desc_addr, self.avail_addr, self.used_addr = desc_addr, driver_area, device_area
        self.event_idx, self.indirect = bool(event_idx), bool(indirect)
        self.inflight = inflight
        self._memory = memory
        self._guest_memory = isinstance(memory, GuestMemory)
        b = barriers()
        self._mb, self._rmb, self._wmb = b.full, b.read, b.write
        self._broken: str | None = None
        self._heads: set[int] = set()                   # chains popped and not yet pushed
        self._writable_ranges: dict[int, list[tuple[int, int]]] = {}   # per head, only when logging
        self._notify = True
        self._next_avail = 0
        self._map()
        self._used_idx = self._used16[_IDX]
        self._log = None
        self.set_log(log, log_used_addr)

    # -- setup ---------------------------------------------------------------------------------
    def _map(self) -> None:
        """(Re)resolve the ring parts and forget the cached region (memory changed)."""
        desc_len, avail_len, used_len = split_ring_sizes(self.size, self.event_idx)
        memory = self._memory
        desc = _ring_view(memory, "descriptor table", self.desc_addr, desc_len, False)
        avail = _ring_view(memory, "available ring", self.avail_addr, avail_len, False)
        used = _ring_view(memory, "used ring", self.used_addr, used_len, True)
        self._avail16 = _words(avail, "available ring", SPLIT_AVAIL_ALIGN)
        self._used16 = _words(used, "used ring", SPLIT_USED_ALIGN)
        self._desc, self._avail, self._used = desc, avail, used
        # Last: a map that stopped half-way (an IOTLB miss) is tried again at the next look.
        self._generation = memory.generation
        # The fast path's region cache: [start, end) of the last region a buffer was found in.
        self._rstart, self._rend, self._rview = 0, 0, _EMPTY

    def _remap(self) -> None:
        try:
            self._map()
        except IOTLBMiss:
            raise                      # not broken: the caller reports the miss and retries
        except GuestMemoryError as exc:
            raise self._fail(exc) from None

    def set_log(self, log, log_used_addr: int | None = None) -> None:
        """Start (a DirtyLog) or stop (None) dirty logging: pushes then mark the written parts of
        device-writable buffers and the used-ring bytes, at ``log_used_addr`` (the used ring's
        guest-physical address, vhost_vring_addr.log_guest_addr; default ``device_area``).
        Chains popped before logging started are not remembered and so not marked. Over an
        IOTLB the addresses handed to ``log.mark`` are IOVAs: give a memory.IOVALog."""
        self._log = log
        self._log_used = self.used_addr if log_used_addr is None else log_used_addr
        self._writable_ranges.clear()
        self._slow = log is not None or not self._guest_memory

    # -- state ---------------------------------------------------------------------------------
    @property
    def broken(self) -> bool:
        """True once the driver broke a ring rule; every later pop and push raises."""
        return self._broken is not None

    @property
    def broken_reason(self) -> str | None:
        return self._broken

    @property
    def in_flight(self) -> int:
        """Chains popped and not yet pushed."""
        return len(self._heads)

    @property
    def used_idx(self) -> int:
        """The used index the next push publishes after (free-running, mod 2^16)."""
        return self._used_idx

    def get_base(self) -> int:
        """VHOST_GET_VRING_BASE for a split ring: the next available index to consume."""
        return self._next_avail

    def set_base(self, num: int) -> None:
        """VHOST_SET_VRING_BASE for a split ring: the next available index (low 16 bits of num).

        The used index is not set here: it is read from the used ring when the queue is built."""
        if not isinstance(num, int) or not 0 <= num <= _U32_MAX:
            raise ValueError(f"vring base {num!r} is not a u32")
        self._next_avail = num & 0xFFFF

    def _fail(self, exc: Exception) -> Exception:
        """Latch the queue broken with exc's message (the first reason wins) and return exc."""
        if self._broken is None:
            self._broken = str(exc)
        return exc

    def _check(self) -> None:
        if self._broken is not None:
            raise VirtqueueError(f"queue is broken: {self._broken}")
        if self._memory.generation != self._generation:
            self._remap()

    def _avail_count(self) -> int:
        """Entries the driver has made available past next_avail; more than Q is a driver bug."""
        avail_idx = self._avail16[_IDX]
        n = (avail_idx - self._next_avail) & 0xFFFF
        if n > self.size:
            raise self._too_far(avail_idx, n)
        return n

    def _too_far(self, avail_idx: int, n: int) -> VirtqueueError:
        return self._fail(VirtqueueError(
            f"avail idx {avail_idx} is {n} entries ahead of the next avail index {self._next_avail}, "
            f"more than the queue size {self.size}"))

    def pending(self) -> int:
        """Available chains not yet popped."""
        self._check()
        return self._avail_count()

    # -- notifications ---------------------------------------------------------------------------
    def _set_avail_event(self, value: int) -> None:
        self._used16[_RING + 4 * self.size] = value            # avail_event, after ring[Q]
        if self._log is not None:
            self._log.mark(self._log_used + _USED_RING + _ELEM_SIZE * self.size, 2)

    def _set_used_flags(self, value: int) -> None:
        self._used16[_FLAGS] = value
        if self._log is not None:
            self._log.mark(self._log_used, 2)

    def disable_notifications(self) -> None:
        """Ask the driver not to kick (used.flags NO_NOTIFY). With EVENT_IDX there is nothing to
        write: avail_event simply stops following next_avail, so the driver's check fails until
        its index comes round to it again (one spurious kick per 65536 buffers at most)."""
        self._notify = False
        if not self.event_idx and self._broken is None:
            self._set_used_flags(VIRTQ_USED_F_NO_NOTIFY)

    def enable_notifications(self) -> bool:
        """Ask the driver to kick again; True if chains are already available (the re-check that
        closes the race with a driver that published while notifications were off)."""
        self._check()
        self._notify = True
        if self.event_idx:
            self._set_avail_event(self._next_avail)
        else:
            self._set_used_flags(0)
        # Full barrier: our store (avail_event / used.flags) must be visible before we load
        # avail.idx again; the driver does the mirror image (store avail.idx, fence, load ours),
        # so one of us sees the other's store. Store->load reordering happens on x86-64 too
        # (store buffer), so this is an mfence there and a dmb ish on aarch64.
        self._mb()
        return self._avail_count() > 0

    # -- pop -------------------------------------------------------------------------------------
    def _take(self, max_chains: int) -> tuple[list[int], int]:
        """Read avail.idx once, then the ring entries it covers: (heads, new next_avail).
        Nothing is committed; the caller does that when every chain checked out."""
        if self._broken is not None or self._memory.generation != self._generation:
            self._check()
        nxt = self._next_avail
        avail_idx = self._avail16[_IDX]
        n = (avail_idx - nxt) & 0xFFFF
        if n > self.size:
            raise self._too_far(avail_idx, n)
        if not n:
            if not (self.event_idx and self._notify):
                return [], nxt
            # About to report "empty": make sure avail_event says "kick me at next_avail" and
            # re-check after a full barrier (store avail_event -> load avail.idx, see
            # enable_notifications), so a driver publishing right now cannot be missed.
            self._set_avail_event(nxt)
            self._mb()
            n = self._avail_count()
            if not n:
                return [], nxt
        if n > max_chains:
            n = max_chains
            if n <= 0:
                return [], nxt
        # Read barrier: the ring entries (and the descriptors they name) must be read after
        # avail.idx, which the driver stores after them (behind its write barrier). x86-64 never
        # reorders loads with loads (None there); aarch64 needs a dmb ishld.
        if self._rmb is not None:
            self._rmb()
        start = nxt & (self.size - 1)
        first = self.size - start
        ring = self._avail16
        if n <= first:
            heads = ring[_RING + start:_RING + start + n].tolist()
        else:
            heads = ring[_RING + start:_RING + self.size].tolist() + ring[_RING:_RING + n - first].tolist()
        return heads, (nxt + n) & 0xFFFF

    def _commit(self, heads: list[int], next_avail: int) -> None:
        """Record the popped heads as in flight and move next_avail (and avail_event) past them."""
        inflight = self._heads
        if len(heads) == 1:                          # one chain: one set operation
            head = heads[0]
            if head in inflight:
                raise self._fail(VirtqueueError(f"head {head} made available again while still in flight"))
            inflight.add(head)
        else:
            if not inflight.isdisjoint(heads):
                again = sorted(inflight.intersection(heads))
                raise self._fail(VirtqueueError(f"head {again[0]} made available again while still in flight"))
            before = len(inflight)
            inflight.update(heads)
            if len(inflight) != before + len(heads):
                seen: set[int] = set()
                dup = next(h for h in heads if h in seen or seen.add(h))
                raise self._fail(VirtqueueError(f"head {dup} made available twice in one batch"))
        self._next_avail = next_avail
        if self.event_idx and self._notify:
            self._set_avail_event(next_avail)
        if self.inflight is not None:
            on_pop = self.inflight.on_pop
            for head in heads:
                on_pop(head)

    def pop_batch(self, max_chains: int = 256) -> list[tuple[int, list[memoryview], list[memoryview]]]:
        """Up to ``max_chains`` available chains as (head, readable views, writable views).

        Views are zero-copy slices of guest memory; a buffer crossing into an adjacent region
        gives two views. One read of avail.idx per batch. A driver bug raises VirtqueueError
        (GuestMemoryError for a bad address) and breaks the queue; an IOTLBMiss leaves the
        whole batch available, so the caller can resolve the miss and pop again."""
        heads, next_avail = self._take(max_chains)
        if not heads:
            return []
        if self._slow:
            chains = [self._chain(head) for head in heads]
        else:
            # Fast path: a lone descriptor (flags exactly WRITE or 0: no NEXT, no INDIRECT, no
            # unknown bits) inside the region last hit; anything else takes the general path.
            # A head >= Q makes unpack_from run off the table (struct.error).
            unpack, desc, size = _DESC.unpack_from, self._desc, self.size
            rstart, rview = self._rstart, self._rview
            rsize = self._rend - rstart
            tables, shapes, indirect = _table_readers, _TABLE_SHAPES, self.indirect
            chains = []
            append = chains.append
            try:
                for head in heads:
                    addr, length, flags, nxt = unpack(desc, head << 4)
                    off = addr - rstart
                    end = off + length
                    if 0 <= off and end <= rsize:
                        if flags & ~2 == 4 and indirect:
                            # INDIRECT alone (its WRITE is ignored), the table in the cached region:
                            # one struct call reads its shape (see _table_reader), one iterator
                            # (addr, len) per entry; every buffer must lie in the region.
                            read = tables.get(length)
                            if read is None and length and not length & 15 and length <= _FAST_TABLE_BYTES:
                                read = _table_reader(length)
                            if read is not None:
                                nread = shapes.get(read(rview, off))
                                if nread is not None:
                                    views = []
                                    total = 0
                                    for addr, length in _ADDR_LEN(rview[off:end]):
                                        off = addr - rstart
                                        end = off + length
                                        if off < 0 or end > rsize:
                                            break
                                        total += length
                                        views.append(rview[off:end])
                                    else:
                                        if total <= _U32_MAX:
                                            append((head, views[:nread], views[nread:]))
                                            continue
                        if flags == 2:                          # VIRTQ_DESC_F_WRITE
                            append((head, [], [rview[off:end]]))
                            continue
                        if flags == 0:
                            append((head, [rview[off:end]], []))
                            continue
                        if flags & 1 and not flags & ~3:        # NEXT: walk a direct chain inline
                            readable, writable = ([], [rview[off:end]]) if flags & 2 else ([rview[off:end]], [])
                            total, count = length, 1
                            while True:
                                if count >= size or nxt >= size:   # a loop, or next out of range
                                    break
                                addr, length, flags, nxt = unpack(desc, nxt << 4)
                                off = addr - rstart
                                end = off + length
                                if flags & ~3 or off < 0 or end > rsize:
                                    break
                                total += length
                                if flags & 2:
                                    writable.append(rview[off:end])
                                elif writable:                   # readable after writable
                                    break
                                else:
                                    readable.append(rview[off:end])
                                count += 1
                                if not flags & 1:
                                    if total <= _U32_MAX:
                                        append((head, readable, writable))
                                        flags = -1
                                    break
                            if flags == -1:
                                continue
                    # Anything else, including every broken rule, which _chain reports precisely.
                    append(self._chain(head))
                    rstart, rview = self._rstart, self._rview
                    rsize = self._rend - rstart
            except struct.error:
                bad = next(h for h in heads if h >= self.size)
                raise self._fail(VirtqueueError(
                    f"head {bad} in the available ring is out of range for queue size {self.size}")) from None
        self._commit(heads, next_avail)
        return chains

    def pop(self) -> tuple[int, list[memoryview], list[memoryview]] | None:
        """One available chain, or None."""
        chains = self.pop_batch(1)
        return chains[0] if chains else None

    def pop_descriptors(self, max_chains: int = 256) -> list[tuple[int, list[tuple[int, int, bool]]]]:
        """Like :meth:`pop_batch` but untranslated: (head, [(addr, len, device_writable), ...]),
        fully validated except that addresses are not looked up, for callers that map them."""
        heads, next_avail = self._take(max_chains)
        if not heads:
            return []
        chains = []
        for head in heads:
            descs = self._walk(head)
            chains.append((head, [d[:3] for d in descs]))
            if self._log is not None:
                self._writable_ranges[head] = [(d[0], d[1]) for d in descs if d[2]]
        self._commit(heads, next_avail)
        return chains

    def resubmit(self, head: int) -> tuple[int, list[memoryview], list[memoryview]]:
        """Re-read the chain at ``head`` and mark it in flight without touching the available
        ring: for chains a previous backend popped but never completed (inflight tracking,
        VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD)."""
        self._check()
        if not isinstance(head, int) or not 0 <= head < self.size:
            raise VirtqueueError(f"head {head!r} is out of range for queue size {self.size}")
        if head in self._heads:
            raise VirtqueueError(f"head {head} is already in flight")
        chain = self._chain(head)
        self._heads.add(head)
        return chain

    def _walk(self, head: int) -> list[tuple[int, int, bool, int, tuple[int, int] | None]]:
        """Validate the chain at ``head``: [(addr, len, device_writable, index, table)] in chain
        order, ``table`` None for the descriptor table or (address, index of the descriptor that
        pointed at it) for an indirect table (only error messages use index and table).

        Rules (virtio §2.7.5 and §2.7.5.3): next < Q; at most Q descriptors (so a loop is caught
        by counting); with VIRTIO_F_INDIRECT_DESC, zero or more direct descriptors followed by one
        INDIRECT descriptor whose WRITE flag is ignored, which must not also have NEXT, whose
        table is a non-zero multiple of 16 bytes, holds no INDIRECT descriptor and is walked from
        entry 0 by next (bounded by its entry count); readable descriptors before writable ones;
        the chain's total length at most 2^32 - 1 (the used len is a le32)."""
        size = self.size
        unpack = _DESC.unpack_from
        table, limit, where = self._desc, size, None
        idx, count, total = head, 0, 0
        prev = None
        writable_seen = False
        descs: list[tuple[int, int, bool, int, tuple[int, int] | None]] = []
        while True:
            if idx >= limit:
                if prev is None:
                    msg = f"head {head} in the available ring is out of range for queue size {size}"
                else:
                    msg = (f"head {head}: {_where(*prev)} has next {idx}, out of range for "
                           + (f"an indirect table of {limit} entries" if where else f"queue size {size}"))
                raise self._fail(VirtqueueError(msg))
            count += 1
            if count > limit:
                raise self._fail(VirtqueueError(
                    f"head {head}: chain longer than " + (f"its indirect table of {limit} entries" if where
                                                          else f"the queue size {size}")
                    + f" (a loop: {_where(idx, where)} visited again)"))
            addr, length, flags, nxt = unpack(table, idx << 4)
            if flags & VIRTQ_DESC_F_INDIRECT:
                self._check_indirect(head, idx, where, flags, length)
                table = self._indirect_table(head, idx, addr, length)
                prev, where = (idx, where), (addr, idx)
                idx, count, limit = 0, 0, length // VIRTQ_DESC_SIZE
                continue
            total += length
            if total > _U32_MAX:
                raise self._fail(VirtqueueError(
                    f"head {head}: {_where(idx, where)} (len {length:#x}) takes the chain to {total:#x} "
                    f"bytes, more than 2^32 - 1"))
            if flags & VIRTQ_DESC_F_WRITE:
                writable_seen = True
                descs.append((addr, length, True, idx, where))
            elif writable_seen:
                raise self._fail(VirtqueueError(
                    f"head {head}: {_where(idx, where)} is device-readable but follows a device-writable one"))
            else:
                descs.append((addr, length, False, idx, where))
            if not flags & VIRTQ_DESC_F_NEXT:
                return descs
            prev, idx = (idx, where), nxt

    def _check_indirect(self, head: int, idx: int, where, flags: int, length: int) -> None:
        """The rules for a descriptor with INDIRECT (virtio §2.7.5.3.1)."""
        if where is not None:
            raise self._fail(VirtqueueError(
                f"head {head}: {_where(idx, where)} has INDIRECT inside an indirect table"))
        if not self.indirect:
            raise self._fail(VirtqueueError(
                f"head {head}: descriptor {idx} has INDIRECT but VIRTIO_F_INDIRECT_DESC was not negotiated"))
        if flags & VIRTQ_DESC_F_NEXT:
            raise self._fail(VirtqueueError(f"head {head}: descriptor {idx} has both INDIRECT and NEXT"))
        if not length or length % VIRTQ_DESC_SIZE or length > MAX_INDIRECT_ENTRIES * VIRTQ_DESC_SIZE:
            raise self._fail(VirtqueueError(
                f"head {head}: descriptor {idx} points at an indirect table of {length} bytes "
                f"(must be a non-zero multiple of 16, at most {MAX_INDIRECT_ENTRIES} entries)"))

    def _indirect_table(self, head: int, idx: int, addr: int, length: int):
        """The indirect table's bytes: a view when it lies in one region, else a copy."""
        try:
            if self._guest_memory:
                segs = self._memory.segments(addr, length)
            else:
                segs = self._memory.segments(addr, length, False)
        except IOTLBMiss:
            raise
        except GuestMemoryError as exc:
            raise self._fail(GuestMemoryError(
                f"head {head}: descriptor {idx} points at an indirect table {addr:#x}+{length:#x} outside "
                f"guest memory ({exc})", exc.errno)) from None
        return segs[0] if len(segs) == 1 else b"".join(segs)

    def _chain(self, head: int) -> tuple[int, list[memoryview], list[memoryview]]:
        """The general path: walk, check and translate one chain."""
        descs = self._walk(head)
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        rstart, rend, rview = self._rstart, self._rend, self._rview
        for addr, length, is_writable, idx, where in descs:
            if rstart <= addr and addr + length <= rend:        # inside the region last hit
                (writable if is_writable else readable).append(rview[addr - rstart:addr + length - rstart])
            else:
                (writable if is_writable else readable).extend(
                    self._views(head, idx, where, addr, length, is_writable))
                rstart, rend, rview = self._rstart, self._rend, self._rview
        if self._log is not None:
            self._writable_ranges[head] = [(d[0], d[1]) for d in descs if d[2]]
        return head, readable, writable

    def _views(self, head: int, idx: int, where, addr: int, length: int, write: bool) -> list[memoryview]:
        """Views of [addr, addr + length) outside the cached region (whose cache this updates).
        A zero-length buffer touches nothing, so its address is not looked up."""
        if not length:
            return [_EMPTY]
        memory = self._memory
        try:
            if not self._guest_memory:
                return memory.segments(addr, length, write)
            region = memory.find(addr)
            if region is not None and addr + length <= region.end:
                self._rstart, self._rend, self._rview = region.gpa, region.end, region.view
                return [region.view[addr - region.gpa:addr + length - region.gpa]]
            return memory.segments(addr, length)
        except IOTLBMiss:
            raise                  # not the driver's fault: nothing was committed, pop again later
        except GuestMemoryError as exc:
            raise self._fail(GuestMemoryError(
                f"head {head}: {_where(idx, where)} buffer {addr:#x}+{length:#x} is outside guest memory "
                f"({exc})", exc.errno)) from None

    # -- push ------------------------------------------------------------------------------------
    def push(self, head: int, written_len: int) -> bool:
        """Return one chain; True when the driver wants an interrupt (signal the call eventfd)."""
        return self.push_batch(((head, written_len),))

    def push_batch(self, done: Sequence[tuple[int, int]]) -> bool:
        """Return chains as (head, bytes written), publishing the used index once.

        True when the driver wants an interrupt for this batch. A head that is not in flight (or
        appears twice) or a length that is not a u32 raises VirtqueueError and changes nothing."""
        if self._broken is not None or self._memory.generation != self._generation:
            self._check()
        n = len(done)
        if not n:
            return False
        size, used = self.size, self._used
        old = self._used_idx
        start = old & (size - 1)
        first = size - start
        inflight = self._heads
        if n == 1 and self._log is None and self.inflight is None:
            # One chain: no flattening, one set operation. A bad pair changes nothing.
            try:
                head, written = done[0]
                inflight.remove(head)
            except (TypeError, ValueError, KeyError):
                raise self._push_error(done) from None
            try:
                _USED_ELEM.pack_into(used, _USED_RING + _ELEM_SIZE * start, head, written)
            except struct.error:
                inflight.add(head)
                raise self._push_error(done) from None
            new = (old + 1) & 0xFFFF
            if self._wmb is not None:
                self._wmb()                  # see below
            self._used16[_IDX] = new
            self._used_idx = new
            self._mb()                       # see below
            if self.event_idx:
                return vring_need_event(self._avail16[_RING + size], new, old)
            return not self._avail16[_FLAGS] & VIRTQ_AVAIL_F_NO_INTERRUPT
        flat = list(_chain.from_iterable(done))
        heads = flat[::2]
        if len(flat) != 2 * n or n > len(inflight) or not inflight.issuperset(heads):
            raise self._push_error(done)
        # pack_into zero-fills before it writes; harmless here: these slots are past used.idx,
        # where the driver does not look (and at most two runs: the ring may wrap once).
        try:
            if n <= first:
                (_used_elem_structs.get(n) or _used_elems(n)).pack_into(used, _USED_RING + _ELEM_SIZE * start, *flat)
            else:
                _used_elems(first).pack_into(used, _USED_RING + _ELEM_SIZE * start, *flat[:2 * first])
                _used_elems(n - first).pack_into(used, _USED_RING, *flat[2 * first:])
        except struct.error:
            raise self._push_error(done) from None
        before = len(inflight)
        inflight.difference_update(heads)
        if len(inflight) != before - n:            # a head twice in the batch: undo, change nothing
            inflight.update(heads)
            raise self._push_error(done)
        new = (old + n) & 0xFFFF
        if self.inflight is not None:
            self.inflight.before_publish(heads)
        # Write barrier: the used elements (and the data written into the buffers) must be
        # visible before the used index that publishes them. x86-64 keeps stores in order
        # (None there); aarch64 needs a dmb ishst.
        if self._wmb is not None:
            self._wmb()
        self._used16[_IDX] = new
        self._used_idx = new
        if self.inflight is not None:
            self.inflight.after_publish(heads, new)
        if self._log is not None:
            self._log_push(done, start, n)
        # Full barrier: the used.idx store must be visible before we load used_event / avail
        # flags, or we could skip an interrupt the driver asked for just after reading our old
        # index (store->load: an mfence even on x86-64, a dmb ish on aarch64).
        self._mb()
        if self.event_idx:
            return vring_need_event(self._avail16[_RING + size], new, old)      # used_event
        return not self._avail16[_FLAGS] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def _push_error(self, done) -> VirtqueueError:
        """The precise reason a push batch was refused (the queue is not marked broken: the
        driver did nothing wrong)."""
        seen: set[int] = set()
        for item in done:
            try:
                head, length = item
            except (TypeError, ValueError):
                return VirtqueueError(f"push item {item!r} is not a (head, written_len) pair")
            if not isinstance(head, int) or head not in self._heads:
                return VirtqueueError(f"head {head!r} is not in flight (pushed without being popped)")
            if head in seen:
                return VirtqueueError(f"head {head} pushed twice in one batch")
            if not isinstance(length, int) or not 0 <= length <= _U32_MAX:
                return VirtqueueError(f"written length {length!r} for head {head} is not a u32")
            seen.add(head)
        return VirtqueueError(f"push batch of {len(done)} chains refused")

    def _log_push(self, done, start: int, n: int) -> None:
        """Dirty-log what a push wrote: the buffers up to each written length, the used elements
        and the used index."""
        log, ranges = self._log, self._writable_ranges
        for head, written in done:
            for addr, length in ranges.pop(head, ()):
                if written <= 0:
                    break
                take = min(length, written)
                log.mark(addr, take)
                written -= take
        base = self._log_used + _USED_RING
        first = min(n, self.size - start)
        log.mark(base + _ELEM_SIZE * start, _ELEM_SIZE * first)
        if n > first:
            log.mark(base, _ELEM_SIZE * (n - first))
        log.mark(self._log_used + 2 * _IDX, 2)


class SplitDriverQueue:
    """The driver (frontend) side of a split virtqueue: it owns the ring memory, adds chains,
    publishes them, and reaps what the device used, checking that the device tells the truth.

    Indirect chains use a table of ``indirect_max`` entries per head in ``indirect_area``
    (``layout`` places one). The driver starts with interrupts enabled; with EVENT_IDX, reaping
    keeps ``used_event`` at the next used index, like Linux's virtio_ring."""

    @staticmethod
    def layout(size: int, base_gpa: int, indirect_max: int = 0) -> dict[str, int | None]:
        """Aligned addresses for a ring at ``base_gpa``: desc, driver (avail), device (used),
        indirect (``size * indirect_max`` descriptors, or None) and end (first byte after)."""
        check_split_size(size)
        desc_len, avail_len, used_len = split_ring_sizes(size)
        desc = -(-base_gpa // SPLIT_DESC_ALIGN) * SPLIT_DESC_ALIGN
        avail = desc + desc_len
        used = -(-(avail + avail_len) // SPLIT_USED_ALIGN) * SPLIT_USED_ALIGN
        end = used + used_len
        indirect = None
        if indirect_max:
            indirect = -(-end // SPLIT_DESC_ALIGN) * SPLIT_DESC_ALIGN
            end = indirect + size * indirect_max * VIRTQ_DESC_SIZE
        return {"desc": desc, "driver": avail, "device": used, "indirect": indirect, "end": end}

    def __init__(self, memory, size: int, desc_addr: int, driver_area: int, device_area: int, *,
                 event_idx: bool = False, indirect_area: int | None = None, indirect_max: int = 0) -> None:
        check_split_size(size)
        _check_alignment(desc_addr, driver_area, device_area)
        self.size = size
        self.event_idx = bool(event_idx)
        self.desc_addr, self.avail_addr, self.used_addr = desc_addr, driver_area, device_area
        desc_len, avail_len, used_len = split_ring_sizes(size, self.event_idx)
        self._desc = _ring_view(memory, "descriptor table", desc_addr, desc_len, True)
        self._avail = _ring_view(memory, "available ring", driver_area, avail_len, True)
        self._used = _ring_view(memory, "used ring", device_area, used_len, False)
        self._avail16 = _words(self._avail, "available ring", SPLIT_AVAIL_ALIGN)
        self._used16 = _words(self._used, "used ring", SPLIT_USED_ALIGN)
        self._indirect_max = indirect_max
        self._indirect = None
        if indirect_max:
            if not 1 <= indirect_max <= MAX_INDIRECT_ENTRIES or indirect_area is None or indirect_area % 16:
                raise VirtqueueError(f"indirect area {indirect_area!r} with {indirect_max} entries per "
                                     f"chain is not a 16-byte aligned address and 1..{MAX_INDIRECT_ENTRIES}")
            self._indirect = _ring_view(memory, "indirect area", indirect_area,
                                        size * indirect_max * VIRTQ_DESC_SIZE, True)
        self.indirect_area = indirect_area
        # The driver allocates the rings and zeroes them (virtio §2.7.10: used.flags starts at 0).
        for view in (self._desc, self._avail, self._used):
            view[:] = bytes(len(view))
        b = barriers()
        self._mb, self._rmb, self._wmb = b.full, b.read, b.write
        self._broken: str | None = None
        self._free = list(range(size - 1, -1, -1))    # a stack: descriptor 0 is handed out first
        self._state: list[tuple | None] = [None] * size   # per head: (token, descriptors, writable bytes)
        self._chains = 0
        self._avail_idx = 0        # the next index add() fills (shadow of avail.idx)
        self._published = 0        # avail.idx as last stored
        self._last_used = 0        # the next used element to reap
        self._interrupts = True

    # -- state ---------------------------------------------------------------------------------
    @property
    def broken(self) -> bool:
        """True once the device broke a ring rule (a lying used entry); every later call raises."""
        return self._broken is not None

    @property
    def num_free(self) -> int:
        """Free descriptors (an indirect chain takes one, a direct chain one per buffer)."""
        return len(self._free)

    @property
    def in_flight(self) -> int:
        """Chains added and not yet reaped."""
        return self._chains

    def get_base(self) -> int:
        """The available index a (re)started device resumes from, in SET_VRING_BASE's split
        encoding: every chain before it has been used (the used index reaped so far). A device's
        own GET_VRING_BASE is authoritative when chains were still in flight."""
        return self._last_used

    def _check(self) -> None:
        if self._broken is not None:
            raise VirtqueueError(f"queue is broken: {self._broken}")

    def _fail(self, exc: Exception) -> Exception:
        if self._broken is None:
            self._broken = str(exc)
        return exc

    # -- add / publish ---------------------------------------------------------------------------
    def add(self, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]], token=None, *,
            indirect: bool = False) -> int:
        """Place a chain of (gpa, len) buffers, device-readable ones first, and queue its head for
        :meth:`publish`. Returns the head; ``token`` (default: the head) comes back from reap."""
        self._check()
        nr = len(readable)
        k = nr + len(writable)
        free = self._free
        pack = _DESC.pack_into
        if k == 1 and not indirect and free:        # the common case, kept short
            head = free.pop()
            if nr:
                (addr, length), = readable
                flags, wcap = 0, 0
            else:
                (addr, length), = writable
                flags, wcap = VIRTQ_DESC_F_WRITE, length
            try:
                pack(self._desc, head << 4, addr, length, flags, 0)
            except struct.error:
                free.append(head)
                raise ValueError(f"buffer {addr!r}+{length!r} does not fit a descriptor") from None
            ids: tuple | list = (head,)
        else:
            if not k:
                raise ValueError("a chain needs at least one buffer")
            if indirect:
                if k > self._indirect_max:
                    raise VirtqueueError(f"{k} buffers do not fit an indirect table of {self._indirect_max}")
                if not free:
                    raise VirtqueueError("queue full")
                head = free.pop()
                ids = (head,)
                table, base, step = self._indirect, head * self._indirect_max * VIRTQ_DESC_SIZE, None
            else:
                if k > len(free):
                    raise VirtqueueError(f"queue full ({len(free)} free descriptors, {k} needed)")
                ids = free[:-k - 1:-1]           # taken in stack order
                del free[-k:]
                head = ids[0]
                table, base, step = self._desc, 0, ids
            wcap = total = 0
            try:
                for j, (addr, length) in enumerate(_chain(readable, writable)):
                    flags = VIRTQ_DESC_F_WRITE if j >= nr else 0
                    total += length
                    if j >= nr:
                        wcap += length
                    if step is None:       # indirect: entry j of this head's table, next = j + 1
                        at, nxt = base + j * VIRTQ_DESC_SIZE, j + 1 if j + 1 < k else 0
                    else:
                        at, nxt = step[j] * VIRTQ_DESC_SIZE, step[j + 1] if j + 1 < k else 0
                    pack(table, at, addr, length, flags | (VIRTQ_DESC_F_NEXT if j + 1 < k else 0), nxt)
                if total > _U32_MAX:
                    raise struct.error("chain total")
                if step is None:
                    pack(self._desc, head * VIRTQ_DESC_SIZE, self.indirect_area + base,
                         k * VIRTQ_DESC_SIZE, VIRTQ_DESC_F_INDIRECT, 0)
            except (struct.error, TypeError, ValueError):
                free.extend(reversed(ids))
                raise ValueError(f"chain {list(readable)!r} / {list(writable)!r} has a buffer that does "
                                 f"not fit a descriptor or totals more than 2^32 - 1 bytes") from None
        self._state[head] = (head if token is None else token, ids, wcap)
        self._chains += 1
        slot = self._avail_idx
        self._avail16[_RING + (slot & (self.size - 1))] = head
        self._avail_idx = (slot + 1) & 0xFFFF
        return head

    def publish(self) -> bool:
        """Make every chain added since the last publish available (one avail.idx store).
        True when the device wants a kick (write the kick eventfd)."""
        self._check()
        new, old = self._avail_idx, self._published
        if new == old:
            return False
        # Write barrier: descriptors and ring entries before the index that publishes them
        # (nothing on x86-64, whose stores stay in order; dmb ishst on aarch64).
        if self._wmb is not None:
            self._wmb()
        self._avail16[_IDX] = new
        self._published = new
        # Full barrier: store avail.idx -> load avail_event / used.flags (store->load, needed on
        # x86-64 too), mirror of the device's enable_notifications.
        self._mb()
        if self.event_idx:
            return vring_need_event(self._used16[_RING + 4 * self.size], new, old)    # avail_event
        return not self._used16[_FLAGS] & VIRTQ_USED_F_NO_NOTIFY

    # -- interrupts ------------------------------------------------------------------------------
    def _set_used_event(self, value: int) -> None:
        self._avail16[_RING + self.size] = value

    def disable_interrupts(self) -> None:
        """Ask the device not to interrupt: avail.flags NO_INTERRUPT, or with EVENT_IDX (where
        flags must stay 0) a used_event just behind the next used index."""
        self._interrupts = False
        if self.event_idx:
            self._set_used_event((self._last_used - 1) & 0xFFFF)
        else:
            self._avail16[_FLAGS] = VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_interrupts(self) -> bool:
        """Ask for interrupts again; True if used chains are already waiting (re-check)."""
        self._check()
        self._interrupts = True
        if self.event_idx:
            self._set_used_event(self._last_used)
        else:
            self._avail16[_FLAGS] = 0
        self._mb()     # store used_event / flags -> load used.idx (see publish)
        return self._used16[_IDX] != self._last_used

    # -- reap ------------------------------------------------------------------------------------
    def reap(self, max: int | None = None) -> list[tuple[object, int]]:   # noqa: A002 (the API's name)
        """Used chains in completion order as (token, written_len); their descriptors are freed.
        An id that is not an in-flight head, or a length beyond the chain's writable bytes, is
        a lying device: VirtqueueError, queue broken.

        With interrupts enabled, sleeping on the call eventfd is safe after any reap: it ends by
        re-arming used_event and re-reading used.idx behind a full barrier (taking what arrived
        meanwhile, up to ``max``), as the packed ring does."""
        out = self._reap_once(max)
        while out and self.event_idx and self._interrupts and (max is None or len(out) < max):
            more = self._reap_once(None if max is None else max - len(out))   # the empty case re-checks
            if not more:
                break
            out += more
        return out

    def _reap_once(self, max: int | None) -> list[tuple[object, int]]:   # noqa: A002
        """One pass of :meth:`reap`: what used.idx covers now."""
        self._check()
        last = self._last_used
        n = (self._used16[_IDX] - last) & 0xFFFF
        if not n:
            if not (self.event_idx and self._interrupts):
                return []
            self._set_used_event(last)
            self._mb()           # store used_event -> load used.idx, see enable_interrupts
            n = (self._used16[_IDX] - last) & 0xFFFF
            if not n:
                return []
        if n > self._chains:
            raise self._fail(VirtqueueError(
                f"used idx is {n} entries ahead of the last reaped ({last}) but only {self._chains} "
                f"chains are in flight"))
        if max is not None and n > max:
            n = max
            if n <= 0:
                return []
        # Read barrier: used elements after used.idx (nothing on x86-64, dmb ishld on aarch64).
        if self._rmb is not None:
            self._rmb()
        size, used = self.size, self._used
        start = last & (size - 1)
        first = size - start
        if n <= first:
            flat = _used_elems(n).unpack_from(used, _USED_RING + _ELEM_SIZE * start)
        else:
            flat = (_used_elems(first).unpack_from(used, _USED_RING + _ELEM_SIZE * start)
                    + _used_elems(n - first).unpack_from(used, _USED_RING))
        state, free = self._state, self._free
        out = []
        append = out.append
        for i in range(0, 2 * n, 2):
            head, length = flat[i], flat[i + 1]
            entry = state[head] if head < size else None
            if entry is None:
                self._chains -= i // 2
                self._last_used = (last + i // 2) & 0xFFFF
                raise self._fail(VirtqueueError(
                    f"used ring entry {(last + i // 2) & 0xFFFF} has id {head}, which is not a chain in flight"))
            token, ids, wcap = entry
            if length > wcap:
                self._chains -= i // 2
                self._last_used = (last + i // 2) & 0xFFFF
                raise self._fail(VirtqueueError(
                    f"used ring entry {(last + i // 2) & 0xFFFF} (id {head}) says {length} bytes written "
                    f"but the chain has {wcap} device-writable bytes"))
            state[head] = None
            free.extend(ids)
            append((token, length))
        self._chains -= n
        self._last_used = (last + n) & 0xFFFF
        if self.event_idx and self._interrupts:
            self._set_used_event(self._last_used)
        return out

    # -- a device that lost its state ------------------------------------------------------------
    def requeue_unused(self, used_idx: int | None = None) -> int:
        """For a device restarted without knowing where it stopped (no GET_VRING_BASE answer, no
        inflight region): make every published chain it has not used available again, right
        after the last used one, in the order they were first published, and return that
        position, the base for SET_VRING_BASE. ``used_idx``: the used index the device reached
        (default: the used ring's). Unpublished chains stay where add() put them.

        Resuming at the used index alone (QEMU's rule without an inflight region) is right only
        when the device used chains in the order it took them: after an out-of-order completion
        it would skip the chain still pending behind it, and take again an entry whose head the
        driver has since reused for a new chain (a request run twice). When the ring does not add
        up (a device that broke its rules), the used index is returned and nothing is moved."""
        self._check()
        size, mask = self.size, self.size - 1
        used = (self._used16[_IDX] if used_idx is None else used_idx) & 0xFFFF
        published, added = self._published, self._avail_idx
        unreaped = (used - self._last_used) & 0xFFFF
        unpublished = (added - published) & 0xFFFF
        if unreaped > self._chains or unreaped + unpublished > size:
            return used
        done = {_USED_ELEM.unpack_from(self._used, _USED_RING + _ELEM_SIZE * ((self._last_used + i) & mask))[0]
                for i in range(unreaped)}
        held = {self._avail16[_RING + ((published + i) & mask)] for i in range(unpublished)}
        pending = [head for head in range(size) if self._state[head] is not None and head not in done
                   and head not in held]
        if len(pending) != (published - used) & 0xFFFF:
            return used
        # Each pending head's latest entry among the published ones still in the ring is where it
        # was published; a head found nowhere there was published before all of them.
        age: dict[int, int] = {}
        wanted = set(pending)
        for back in range(1, size - unpublished + 1):
            head = self._avail16[_RING + ((published - back) & mask)]
            if head in wanted and head not in age:
                age[head] = back
        pending.sort(key=lambda head: (-age.get(head, size + 1), head))
        for i, head in enumerate(pending):
            self._avail16[_RING + ((used + i) & mask)] = head
        return used
