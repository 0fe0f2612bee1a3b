"""The packed virtqueue (virtio 1.3 "Packed Virtqueues", VIRTIO_F_RING_PACKED), device and driver side.

One descriptor ring carries both directions: the driver makes a descriptor available by writing
its flags with AVAIL equal to its wrap counter and USED the inverse; the device overwrites the
first slot it has not used yet with a used descriptor (AVAIL == USED == its wrap counter), one per
chain, and skips as many slots as that chain occupied.  Two 4-byte event suppression structures
(driver area: the driver's wishes about interrupts; device area: the device's about kicks) take
the place of the split ring's flags and event indices.

:class:`PackedDeviceQueue` and :class:`PackedDriverQueue` have the same API as the split ring's
``SplitDeviceQueue`` / ``SplitDriverQueue`` (vhost_min.vring), so a backend can use either.

Where the spec leaves room (section names of "Packed Virtqueues"):
  * an INDIRECT descriptor must be its chain's only one ("Indirect Descriptors": drivers MUST NOT
    put one in a NEXT-linked list; the split ring allows direct descriptors before it);
  * in an indirect table only WRITE counts; NEXT and ids are ignored, INDIRECT is refused;
  * every descriptor of a chain must be available, not just the head ("Next Flag: Descriptor
    Chaining": all flags are set in every descriptor), and a chain is at most the queue size;
  * a used descriptor has WRITE iff bytes were written, and the driver reads its len only then
    ("Write Flag", "Element Address and Length");
  * event flags DESC without EVENT_IDX, and the reserved 3, count as ENABLE: notify, never stall.
"""

from __future__ import annotations

import array
import struct
import sys
from typing import Sequence

from .errors import GuestMemoryError, VirtqueueError
from .memory import IOTLBMiss, GuestMemory, barriers
from .virtio import (PACKED_DESC_ALIGN, PACKED_EVENT_ALIGN, RING_EVENT_FLAGS_DESC,
                     RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE, VIRTQ_DESC_F_AVAIL,
                     VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_USED, VIRTQ_DESC_F_WRITE,
                     VIRTQ_DESC_SIZE, VIRTQ_MAX_SIZE, VRING_PACKED_EVENT_F_WRAP_CTR, misaligned_ring_part,
                     packed_ring_sizes, vring_need_event)
from .vring import MAX_INDIRECT_ENTRIES

__all__ = ["PackedDeviceQueue", "PackedDriverQueue", "PVIRTQ_DESC", "PVIRTQ_EVENT_SUPPRESS", "encode_base",
           "decode_base"]

#: struct pvirtq_desc {le64 addr; le32 len; le16 id; le16 flags} ("The Virtqueue Descriptor Format").
PVIRTQ_DESC = struct.Struct("<QIHH")
_DESC_REST = struct.Struct("<QIH")              # addr, len, id: the rest of a descriptor whose flags were read
#: struct pvirtq_event_suppress {le16 desc (off: 15, wrap: 1); le16 flags (2 bits)}
#: ("Event Suppression Structure Format").
PVIRTQ_EVENT_SUPPRESS = struct.Struct("<HH")

_NEXT, _WRITE, _INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
_AVAIL, _USED = VIRTQ_DESC_F_AVAIL, VIRTQ_DESC_F_USED
_BOTH = _AVAIL | _USED                        # the two bits that say available / used
_EVENT_WRAP = 1 << VRING_PACKED_EVENT_F_WRAP_CTR
_EVENT_OFF = _EVENT_WRAP - 1
_EVENT_DESC = RING_EVENT_FLAGS_DESC << 16      # the flags half of an event structure read as one le32
_EVENT_DISABLE = RING_EVENT_FLAGS_DISABLE << 16
_EVENT_ENABLE = RING_EVENT_FLAGS_ENABLE << 16
_MAX_LEN = 0xFFFFFFFF
_EMPTY = memoryview(bytearray())               # what a zero-length descriptor maps to (as in vring)
_CHAIN_FLAGS = 0xFFFF & ~(_NEXT | _WRITE)      # a fast-path descriptor's flags but NEXT and WRITE: AVAIL/USED

# Indices into the descriptor ring viewed as le64 (q), le32 (i) and le16 (h) arrays, for slot s:
#   q[2s] = addr, q[2s+1] = len | id << 32 | flags << 48; i[4s+2] = len; h[8s+6] = id, h[8s+7] = flags.


#: Indirect tables of up to this many bytes (256 entries) take _parse's fast path.
_FAST_TABLE_BYTES = 256 * VIRTQ_DESC_SIZE
_ADDR_LEN = struct.Struct("<QI4x").iter_unpack        # each descriptor's addr and len
_TABLE_SHAPES: dict[int, tuple] = {}


def _table_shapes(length: int) -> tuple:
    """For an indirect table of ``length`` bytes, compiled once per length: a struct reading every
    entry's flags, and the flag tuples of well-formed tables (readable entries, flags 0, then
    writable ones, WRITE) mapped to their count of readable entries."""
    shape = _TABLE_SHAPES.get(length)
    if shape is None:
        n = length // VIRTQ_DESC_SIZE
        shapes = {(0,) * r + (_WRITE,) * (n - r): r for r in range(n + 1)}
        shape = _TABLE_SHAPES[length] = (struct.Struct("<" + "14xH" * n).unpack, shapes)
    return shape


def encode_base(avail_idx: int, avail_wrap: int, used_idx: int, used_wrap: int) -> int:
    """The packed ring's VHOST_USER_GET/SET_VRING_BASE ``num``: bits 0-14 next avail index,
    15 its wrap counter, 16-30 used index, 31 used wrap counter."""
    return avail_idx | (avail_wrap & 1) << 15 | used_idx << 16 | (used_wrap & 1) << 31


def decode_base(num: int) -> tuple[int, int, int, int]:
    """(avail_idx, avail_wrap, used_idx, used_wrap) from a packed ring's vring base ``num``."""
    return num & 0x7FFF, num >> 15 & 1, num >> 16 & 0x7FFF, num >> 31 & 1


class _LittleEndianArray:
    """``memoryview.cast(code)`` for big-endian hosts: the same indexing, little-endian items."""

    __slots__ = ("_buf", "_item")

    def __init__(self, buf: memoryview, code: str) -> None:
        self._buf, self._item = buf, struct.Struct("<" + code)

    def __getitem__(self, index: int) -> int:
        return self._item.unpack_from(self._buf, index * self._item.size)[0]

    def __setitem__(self, index: int, value: int) -> None:
        self._item.pack_into(self._buf, index * self._item.size, value)


def _cast(view: memoryview, code: str):
    """An array of little-endian ``code`` items over ``view``: a zero-cost cast on little-endian hosts."""
    return view.cast(code) if sys.byteorder == "little" else _LittleEndianArray(view, code)


class _PackedRing:
    """What both sides share: geometry checks, the ring's memory views and their revalidation."""

    def __init__(self, memory, size: int, desc_addr: int, driver_area: int, device_area: int) -> None:
        if not isinstance(size, int) or not 1 <= size <= VIRTQ_MAX_SIZE:
            raise VirtqueueError(f"packed queue size {size!r} is not in 1..{VIRTQ_MAX_SIZE}")
        problem = misaligned_ring_part(desc_addr, driver_area, device_area, packed=True)
        if problem:
            raise VirtqueueError(problem)
        self.memory, self.size = memory, size
        self.desc_addr, self.driver_area, self.device_area = desc_addr, driver_area, device_area
        self._fast = isinstance(memory, GuestMemory)   # else an IOTLB: always the slow path
        b = barriers()
        self._mb, self._rmb, self._wmb = b.full, b.read, b.write
        self.broken = False
        self._reason = ""
        self._map()

    def _view(self, addr: int, length: int, write: bool) -> memoryview:
        return self.memory.view(addr, length) if self._fast else self.memory.view(addr, length, write)

    def _map(self) -> None:
        """(Re)resolve the ring parts; called again whenever memory.generation changes."""
        ring_bytes, driver_bytes, device_bytes = packed_ring_sizes(self.size)
        try:
            ring = self._view(self.desc_addr, ring_bytes, True)
            driver = self._view(self.driver_area, driver_bytes, self._is_driver)
            device = self._view(self.device_area, device_bytes, True)
        except IOTLBMiss:
            raise                      # invalidated ring pages: asked for again, then retried
        except GuestMemoryError as exc:
            raise GuestMemoryError(f"packed ring of size {self.size} (desc {self.desc_addr:#x}, driver "
                                   f"{self.driver_area:#x}, device {self.device_area:#x}): {exc}") from None
        self._q, self._i, self._h = _cast(ring, "Q"), _cast(ring, "I"), _cast(ring, "H")
        self._ring = ring
        self._driver_event, self._device_event = _cast(driver, "I"), _cast(device, "I")
        self._generation = self.memory.generation

    def _fail(self, exc: Exception) -> Exception:
        """Mark the queue broken (first reason wins) and hand back ``exc`` to raise."""
        if not self.broken:
            self.broken, self._reason = True, str(exc)
        return exc

    def _broken(self) -> VirtqueueError:
        return VirtqueueError(f"queue is broken: {self._reason}")

    @property
    def broken_reason(self) -> str | None:
        """Why the queue broke (the first error), or None."""
        return self._reason if self.broken else None


# --------------------------------------------------------------------------------------------
# Device side
# --------------------------------------------------------------------------------------------

class PackedDeviceQueue(_PackedRing):
    """The device (backend) side of a packed virtqueue.

    ``driver_area`` / ``device_area`` are the driver and device event suppression structures.
    Chains come out of :meth:`pop_batch` as ``(buffer_id, readable_views, writable_views)``;
    :meth:`push_batch` hands them back with the number of bytes written.  Any ring rule the
    driver breaks raises :class:`VirtqueueError` (or :class:`GuestMemoryError` for addresses)
    naming the slot, and breaks the queue: every later pop or push raises too.

    ``log_used_addr`` is the guest-physical address of the descriptor ring for dirty logging
    (vhost-user's log_guest_addr); it defaults to ``desc_addr``.
    """

    _is_driver = False

    def __init__(self, memory, size: int, desc_addr: int, driver_area: int, device_area: int, *,
                 event_idx: bool = False, indirect: bool = True, log=None, log_used_addr: int | None = None,
                 inflight=None) -> None:
        super().__init__(memory, size, desc_addr, driver_area, device_area)
        self.event_idx, self.indirect = bool(event_idx), bool(indirect)
        self.inflight = inflight
        self._avail_slot, self._avail_wrap = 0, 1    # wrap counters start at 1
        self._used_slot, self._used_wrap = 0, 1
        self._ndescs = [0] * size       # per buffer id: ring slots its chain occupies; 0 = not in flight
        self._occupied = 0              # ring slots popped and not used yet
        self._orphans = 0               # of those, slots set_base found in flight (see resubmit)
        self.in_flight = 0
        self.set_log(log, log_used_addr)
        self._notify = True             # kicks wanted (the driver zeroed the area: ENABLE)
        self._event_off = -1            # off|wrap last written in DESC mode, -1 = none
        self._event_fenced = True       # no event store since the last full barrier
        self._rs, self._re, self._rv = 1, 0, None   # region cache (start, end, view); empty

    def _map(self) -> None:
        super()._map()
        self._rs, self._re, self._rv = 1, 0, None

    def set_log(self, log, log_used_addr: int | None = None) -> None:
        """Start (a DirtyLog) or stop (None) dirty logging: pushes then mark the written parts of
        device-writable buffers and the used descriptors' ring slots at ``log_used_addr`` (the
        descriptor ring's guest-physical address; default ``desc_addr``).  Chains popped before
        logging started are not remembered and so not marked."""
        self.log = log
        self.log_used_addr = self.desc_addr if log_used_addr is None else log_used_addr
        self._written = [None] * self.size if log is not None else None   # per id: writable (gpa, len)

    # -- popping -------------------------------------------------------------------------------
    def pop(self):
        """The next available chain as ``(buffer_id, readable_views, writable_views)``, or None."""
        chains = self._pop(1, True)
        return chains[0] if chains else None

    def pop_batch(self, max_chains: int = 256) -> list[tuple[int, list[memoryview], list[memoryview]]]:
        """Up to ``max_chains`` available chains, each ``(buffer_id, readable_views, writable_views)``
        (zero-copy slices of guest memory; a zero-length descriptor gives an empty view)."""
        return self._pop(max_chains, True)

    def pop_descriptors(self, max_chains: int = 256) -> list[tuple[int, list[tuple[int, int, bool]]]]:
        """Like :meth:`pop_batch` but untranslated: ``(buffer_id, [(addr, len, device_writable), ...])``
        with indirect tables expanded, for callers that translate addresses themselves."""
        return self._pop(max_chains, False)

    def _pop(self, max_chains: int, translate: bool) -> list:
        if self.broken:
            raise self._broken()
        if self.memory.generation != self._generation:
            self._map()
        out: list = []
        while len(out) < max_chains:
            limit = self.size if self._rmb is None else self._visible_slots()
            drained = self._parse(out, max_chains, limit, translate)
            if drained is None:           # the budget is spent, or an IOTLB miss stopped us
                break
            if not drained:               # weakly ordered host: look past what the scan saw
                continue
            if not (self._notify and self.event_idx):
                break
            if not self._move_avail_event() and self._event_fenced:
                break                     # the event stood here behind a barrier: that scan was the re-check
            # Full barrier: the event offset must be visible to the driver before we look at the ring
            # again (store -> load).  Otherwise a chain published right now sees the old offset, is
            # not kicked, and is not seen by us either: the queue would sit with work in it.  Also
            # when the event did not move: a pop that stopped at its budget moved it without one.
            self._mb()
            self._event_fenced = True
        if out and self._notify and self.event_idx:
            self._move_avail_event()
        return out

    def _visible_slots(self) -> int:
        """Weakly ordered hosts: count the slots whose flags say available, then one read barrier,
        so every descriptor read afterwards is at least as new as the flags that exposed it."""
        h, n, slot = self._h, self.size, self._avail_slot
        expect = _AVAIL if self._avail_wrap else _USED
        count = 0
        while count < n and h[slot * 8 + 7] & _BOTH == expect:
            count += 1
            slot += 1
            if slot == n:
                slot, expect = 0, expect ^ _BOTH
        if count:
            self._rmb()
        return count

    def _parse(self, out: list, max_chains: int, limit: int, translate: bool):
        """Pop chains into ``out`` from the next avail slot.  Returns True when it stopped at a slot
        that is not available, False at ``limit`` slots (only used on weakly ordered hosts), None
        when ``max_chains`` is reached or an IOTLB miss stopped it before a chain."""
        n, q, h, ring, read_rest = self.size, self._q, self._h, self._ring, _DESC_REST.unpack_from
        ndescs, written, inflight = self._ndescs, self._written, self.inflight
        read_desc = PVIRTQ_DESC.unpack_from
        direct_fast = translate and inflight is None and written is None
        indirect_fast, table_shapes = direct_fast and self.indirect, _TABLE_SHAPES
        slot, occupied = self._avail_slot, self._occupied
        expect = _AVAIL if self._avail_wrap else _USED
        rs, re, rv = self._rs, self._re, self._rv     # the region cache, refreshed after each slow path
        count = start = len(out)
        seen = 0
        head, head_expect = slot, expect
        result = None
        try:
            while count < max_chains:
                head, head_expect = slot, expect
                # Flags first: only they say whether the rest of the descriptor is the driver's.
                f = h[slot * 8 + 7]
                if f & _BOTH != expect:
                    result = True
                    break
                if seen >= limit:
                    result = False
                    break
                if not f & (_NEXT | _INDIRECT):
                    # One descriptor, the common case: everything inline.
                    addr, ln, bid = read_rest(ring, slot << 4)
                    if bid >= n or ndescs[bid] or occupied >= n:
                        raise self._chain_error(slot, head, bid, 1, occupied)
                    if translate:
                        if not ln:
                            views = [_EMPTY]
                        elif rs <= addr and addr + ln <= re:
                            views = [rv[addr - rs:addr + ln - rs]]
                        else:
                            views = self._translate(slot, addr, ln, f & _WRITE)
                            rs, re, rv = self._rs, self._re, self._rv
                        item = (bid, [], views) if f & _WRITE else (bid, views, [])
                    else:
                        item = (bid, [(addr, ln, bool(f & _WRITE))])
                    if inflight is not None:           # recorded before the chain counts as popped
                        inflight.on_pop_packed(head, [(addr, ln, bid, f)])
                    out.append(item)
                    ndescs[bid] = 1
                    occupied += 1
                    if written is not None:
                        written[bid] = [(addr, ln)] if f & _WRITE else []
                    slot += 1
                    if slot == n:
                        slot, expect = 0, expect ^ _BOTH
                    seen += 1
                    count += 1
                    continue

                if f & (_NEXT | _INDIRECT) == _INDIRECT and indirect_fast:
                    # One descriptor pointing at an indirect table (a virtio-blk request from
                    # Linux). The tables drivers write, in the cached region: readable entries
                    # (flags 0) then writable ones (WRITE), no other bit, every buffer in the
                    # region, are checked by one struct call and read by one iterator. Any other
                    # table, or a broken rule, takes the general walk below.
                    addr, ln, bid = read_rest(ring, slot << 4)
                    shape = table_shapes.get(ln)
                    if shape is None and ln and not ln & 15 and ln <= _FAST_TABLE_BYTES:
                        shape = _table_shapes(ln)
                    if (shape is not None and rs <= addr and addr + ln <= re and bid < n and not ndescs[bid]
                            and occupied < n):
                        table = rv[addr - rs:addr - rs + ln]
                        nread = shape[1].get(shape[0](table))
                        if nread is not None:
                            views = []
                            total = 0
                            for a, ln in _ADDR_LEN(table):
                                if rs <= a and a + ln <= re:
                                    total += ln
                                    views.append(rv[a - rs:a + ln - rs])
                                else:
                                    break
                            else:
                                if total <= _MAX_LEN:
                                    out.append((bid, views[:nread], views[nread:]))
                                    ndescs[bid] = 1
                                    occupied += 1
                                    slot += 1
                                    if slot == n:
                                        slot, expect = 0, expect ^ _BOTH
                                    seen += 1
                                    count += 1
                                    continue

                if direct_fast and not f & _INDIRECT:
                    # A chain of direct descriptors (a virtio-blk request without indirect tables):
                    # each read by one struct call, its flags exactly this lap's AVAIL/USED with
                    # NEXT or WRITE, every buffer in the cached region, readable ones first. Any
                    # other chain, broken rules included, takes the general walk below from its head.
                    addr, ln, bid = read_rest(ring, slot << 4)
                    readable, writable = [], []
                    s, e, fl, k, total = slot, expect, f, 1, ln
                    while ln and rs <= addr and addr + ln <= re:
                        if fl & _WRITE:
                            writable.append(rv[addr - rs:addr + ln - rs])
                        elif writable:
                            break
                        else:
                            readable.append(rv[addr - rs:addr + ln - rs])
                        s += 1
                        if s == n:              # checked here, not per descriptor: at most two laps
                            if k > n:
                                break
                            s, e = 0, e ^ _BOTH
                        if not fl & _NEXT:
                            if bid < n and not ndescs[bid] and occupied + k <= n and total <= _MAX_LEN:
                                out.append((bid, readable, writable))
                                ndescs[bid] = k
                                occupied += k
                                seen += k
                                count += 1
                                slot, expect, k = s, e, 0
                            break
                        addr, ln, bid, fl = read_desc(ring, s << 4)
                        if fl & _CHAIN_FLAGS != e:
                            break
                        k += 1
                        total += ln
                    if not k:
                        continue

                # A chain of several descriptors, or one pointing at an indirect table.
                readable: list = []
                writable: list = readable if not translate else []
                log = [] if written is not None else None
                raw = [] if inflight is not None else None
                total = k = 0
                saw_write = False
                while True:
                    addr, w = q[slot * 2], q[slot * 2 + 1]
                    if k:
                        f = w >> 48
                        if f & _BOTH != expect:
                            raise self._fail(VirtqueueError(
                                f"packed ring slot {slot}: descriptor {k} of the chain at slot {head} is "
                                f"not available (flags {f:#06x})"))
                    ln = w & _MAX_LEN
                    k += 1
                    if raw is not None:
                        raw.append((addr, ln, w >> 32 & 0xFFFF, f))
                    if f & _INDIRECT:
                        if f & _NEXT:
                            raise self._fail(VirtqueueError(
                                f"packed ring slot {slot}: INDIRECT together with NEXT (flags {f:#06x})"))
                        if k > 1:
                            raise self._fail(VirtqueueError(
                                f"packed ring slot {slot}: INDIRECT descriptor inside the NEXT chain at slot "
                                f"{head} (flags {f:#06x})"))
                        if not self.indirect:
                            raise self._fail(VirtqueueError(
                                f"packed ring slot {slot}: INDIRECT but VIRTIO_F_INDIRECT_DESC was not "
                                f"negotiated (flags {f:#06x})"))
                        total = self._indirect(slot, addr, ln, readable, writable, log, translate)
                        rs, re, rv = self._rs, self._re, self._rv
                    else:
                        total += ln
                        if f & _WRITE:
                            saw_write = True
                            if log is not None:
                                log.append((addr, ln))
                            if not translate:
                                writable.append((addr, ln, True))
                            elif not ln:
                                writable.append(_EMPTY)
                            elif rs <= addr and addr + ln <= re:
                                writable.append(rv[addr - rs:addr + ln - rs])
                            else:
                                writable += self._translate(slot, addr, ln, True)
                                rs, re, rv = self._rs, self._re, self._rv
                        else:
                            if saw_write:
                                raise self._fail(VirtqueueError(
                                    f"packed ring slot {slot}: device-readable descriptor after a writable one "
                                    f"in the chain at slot {head} (flags {f:#06x})"))
                            if not translate:
                                readable.append((addr, ln, False))
                            elif not ln:
                                readable.append(_EMPTY)
                            elif rs <= addr and addr + ln <= re:
                                readable.append(rv[addr - rs:addr + ln - rs])
                            else:
                                readable += self._translate(slot, addr, ln, False)
                                rs, re, rv = self._rs, self._re, self._rv
                    slot += 1
                    if slot == n:
                        slot, expect = 0, expect ^ _BOTH
                    if not f & _NEXT:
                        break
                    if k >= n:
                        raise self._fail(VirtqueueError(
                            f"packed ring slot {(slot - 1) % n}: the chain at slot {head} is longer than the "
                            f"queue size {n} (NEXT is still set, flags {f:#06x})"))
                bid = w >> 32 & 0xFFFF          # the buffer id lives in the chain's last descriptor
                if bid >= n or ndescs[bid] or occupied + k > n:
                    raise self._chain_error((slot - 1) % n, head, bid, k, occupied)
                if total > _MAX_LEN:
                    raise self._fail(VirtqueueError(
                        f"packed ring slot {head}: the chain's lengths add up to {total:#x}, beyond 2^32-1"))
                if inflight is not None:
                    inflight.on_pop_packed(head, raw)
                out.append((bid, readable, writable) if translate else (bid, readable))
                ndescs[bid] = k
                occupied += k
                if written is not None:
                    written[bid] = log
                seen += k
                count += 1
        except IOTLBMiss:
            # The chain stays available: the caller resolves the miss and pops it again.
            slot, expect = head, head_expect
            self._save_avail(slot, expect, occupied, count - start)
            if not out:
                raise
            return None
        self._save_avail(slot, expect, occupied, count - start)
        return result

    def _save_avail(self, slot: int, expect: int, occupied: int, popped: int) -> None:
        self._avail_slot, self._avail_wrap = slot, int(expect == _AVAIL)
        self._occupied = occupied
        self.in_flight += popped

    def _chain_error(self, slot: int, head: int, bid: int, k: int, occupied: int) -> Exception:
        if bid >= self.size:
            return self._fail(VirtqueueError(
                f"packed ring slot {slot}: buffer id {bid} is not below the queue size {self.size}"))
        if self._ndescs[bid]:
            return self._fail(VirtqueueError(
                f"packed ring slot {slot}: buffer id {bid} is made available again while still in flight"))
        return self._fail(VirtqueueError(
            f"packed ring slot {head}: the driver made {k} more descriptor(s) available while "
            f"{occupied} of {self.size} slots are still in flight (ring overrun)"))

    def _translate(self, slot: int, addr: int, length: int, write) -> list[memoryview]:
        """The slow path for a buffer the region cache misses: views from memory (or the IOTLB),
        and a refreshed cache."""
        memory = self.memory
        try:
            views = memory.segments(addr, length) if self._fast else memory.segments(addr, length, bool(write))
        except IOTLBMiss:
            raise
        except GuestMemoryError as exc:
            raise self._fail(GuestMemoryError(
                f"{self._where(slot)}: buffer {addr:#x}+{length:#x} is outside guest memory ({exc})")) from None
        if self._fast:
            region = memory.region_at(addr)
            self._rs, self._re, self._rv = region.gpa, region.end, region.view
        return views

    @staticmethod
    def _where(slot: int) -> str:
        return f"packed ring slot {slot}" if slot >= 0 else "resubmitted chain"

    def _indirect(self, slot: int, addr: int, length: int, readable: list, writable: list,
                  log: list | None, translate: bool) -> int:
        """Expand the indirect table at ``addr`` into the chain's lists; returns the bytes it describes."""
        if not length or length % VIRTQ_DESC_SIZE:
            raise self._fail(VirtqueueError(
                f"{self._where(slot)}: indirect table length {length} is not a non-zero multiple of 16"))
        entries = length // VIRTQ_DESC_SIZE
        if entries > MAX_INDIRECT_ENTRIES:
            raise self._fail(VirtqueueError(
                f"{self._where(slot)}: indirect table of {entries} descriptors, more than "
                f"{MAX_INDIRECT_ENTRIES}"))
        rs, re, rv = self._rs, self._re, self._rv
        if rs <= addr and addr + length <= re:          # the table in the cached region
            table = rv[addr - rs:addr - rs + length]
        else:
            views = self._translate(slot, addr, length, False)
            table = views[0] if len(views) == 1 else b"".join(views)
            rs, re, rv = self._rs, self._re, self._rv
        total = 0
        saw_write = False
        for e, (a, ln, _, f) in enumerate(PVIRTQ_DESC.iter_unpack(table)):
            if f & _INDIRECT:
                raise self._fail(VirtqueueError(
                    f"{self._where(slot)}: entry {e} of the indirect table at {addr:#x} has INDIRECT set "
                    f"(flags {f:#06x}); tables do not nest"))
            total += ln
            if f & _WRITE:
                saw_write = True
                if log is not None:
                    log.append((a, ln))
                target = writable
            elif saw_write:
                raise self._fail(VirtqueueError(
                    f"{self._where(slot)}: entry {e} of the indirect table at {addr:#x} is "
                    f"device-readable after a writable entry (flags {f:#06x})"))
            else:
                target = readable
            if not translate:
                target.append((a, ln, bool(f & _WRITE)))
            elif rs <= a and a + ln <= re:
                target.append(rv[a - rs:a + ln - rs])
            elif not ln:
                target.append(_EMPTY)
            else:
                target += self._translate(slot, a, ln, f & _WRITE)
                rs, re, rv = self._rs, self._re, self._rv
        return total

    # -- pushing -------------------------------------------------------------------------------
    def push(self, head_id: int, written_len: int) -> bool:
        """Return one chain to the driver; True when the driver wants an interrupt (signal call)."""
        return self.push_batch(((head_id, written_len),))

    def push_batch(self, used: Sequence[tuple[int, int]]) -> bool:
        """Return chains as ``(buffer_id, written_len)`` in completion order: one used descriptor each,
        made visible together; True when the driver wants an interrupt for them."""
        if self.broken:
            raise self._broken()
        if self.memory.generation != self._generation:
            self._map()
        if not isinstance(used, (list, tuple)):
            used = list(used)
        if not used:
            return False
        n, ndescs = self.size, self._ndescs
        first = self._used_slot
        wrap = _BOTH if self._used_wrap else 0          # used: AVAIL == USED == the wrap counter
        # Check everything before writing anything: a bad id must never reach the ring. Each
        # chain's used descriptor is made here as one le64 (len | id << 32 | flags << 48), with
        # the flags of this lap: a chain the batch puts in the next lap gets AVAIL/USED flipped.
        written_flags, empty_flags = (wrap | _WRITE) << 48, wrap << 48
        counts: list[int] = []
        words: list[int] = []
        count, word = counts.append, words.append
        try:
            for bid, ln in used:
                if bid < 0 or ln < 0 or ln > _MAX_LEN:
                    raise IndexError
                c = ndescs[bid]                 # IndexError past the queue size
                if not c:
                    raise IndexError            # not in flight, or twice in this batch
                count(c)
                ndescs[bid] = 0
                word(ln | bid << 32 | written_flags if ln else bid << 32 | empty_flags)
        except (TypeError, ValueError, IndexError):
            self._undo(used, counts)
            raise self._push_error(used) from None
        inflight = self.inflight
        if inflight is not None:
            ids = [bid for bid, _ in used]
            inflight.before_publish(ids)

        q, h = self._q, self._h
        advanced = sum(counts)
        stride = counts[0]
        bid, ln = used[0]
        # The first used descriptor: len and id now, its flags last of all (they publish the batch).
        self._i[first * 4 + 2] = ln
        h[first * 8 + 6] = bid
        first_flags = words[0] >> 48
        # The others complete, flags included: the driver reads them only after the first one.
        # (A crash before the first one's flags leaves them behind: see clear_stale_used.)
        if len(used) > 1:
            if first + advanced <= n and counts.count(stride) == len(counts) and type(q) is memoryview:
                # One lap, every chain the same number of slots (the common case): one strided store.
                q[(first + stride) * 2 + 1:(first + advanced) * 2:stride * 2] = array.array("Q", words[1:])
            else:                       # slot by slot, the flags of the lap each one is in
                slot, lap = first, 0
                for j in range(1, len(used)):
                    slot += counts[j - 1]
                    if slot >= n:               # at most once: a batch frees at most n slots
                        slot, lap = slot - n, _BOTH << 48
                    q[slot * 2 + 1] = words[j] ^ lap
        slot, used_wrap = first + advanced, self._used_wrap
        if slot >= n:
            slot, used_wrap = slot - n, used_wrap ^ 1
        if self._wmb is not None:
            # Write barrier: every used descriptor of the batch (and the inflight record) must be
            # visible before the first one's flags tell the driver to read them.
            self._wmb()
        h[first * 8 + 7] = first_flags
        self._used_slot, self._used_wrap = slot, used_wrap
        self._occupied -= advanced
        self.in_flight -= len(used)
        if inflight is not None:
            inflight.after_publish(ids, slot, self._used_wrap)
        if self.log is not None:
            self._log_used(used, counts, first)
        # Full barrier: the used flags must be visible before we read the driver's event suppression
        # (store -> load); otherwise the driver may re-enable interrupts, see no used buffer, and
        # we read its old DISABLE: nobody wakes it.
        self._mb()
        return self._need_event(self._driver_event[0], slot, self._used_wrap, advanced)

    def _undo(self, used, counts: list[int]) -> None:
        for (bid, _), count in zip(used, counts):
            self._ndescs[bid] = count

    def _push_error(self, used) -> VirtqueueError:
        """What is wrong with a push that failed push_batch's checks (nothing was written): the
        first id not in flight (or given twice), the first length that is not a u32, else the shape."""
        n, ndescs, seen = self.size, self._ndescs, set()
        try:
            for bid, ln in used:
                if not (isinstance(bid, int) and 0 <= bid < n and ndescs[bid]) or bid in seen:
                    return VirtqueueError(f"push: buffer id {bid!r} is not in flight (the caller's bug, not the "
                                          f"driver's: the queue stays usable)")
                if not (isinstance(ln, int) and 0 <= ln <= _MAX_LEN):
                    return VirtqueueError(f"push: written length {ln!r} for buffer id {bid} is not a u32")
                seen.add(bid)
        except (TypeError, ValueError):
            pass
        return VirtqueueError(f"push: {used!r} is not a sequence of (buffer_id, written_len) pairs")

    def _need_event(self, event: int, new: int, wrap: int, advanced: int) -> bool:
        """The event suppression test for ``advanced`` slots just written up to ``new`` (with the
        wrap counter ``wrap``): DISABLE -> no, DESC (with EVENT_IDX) -> was the slot passed, else yes."""
        flags = event >> 16 & 3
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return True                          # ENABLE; also the reserved 3 and DESC without EVENT_IDX
        # Count slots on one line: this lap is [0, n), the previous lap [-n, 0).  The batch spans
        # [new - advanced, new); an event offset from the previous lap moves down by n.
        off = event & _EVENT_OFF
        if (event >> VRING_PACKED_EVENT_F_WRAP_CTR & 1) != wrap:
            off -= self.size
        return vring_need_event(off, new, new - advanced)

    def _log_used(self, used, counts, slot: int) -> None:
        """Dirty-log what a push wrote: the buffers up to written_len and the used descriptors."""
        log, written, n, ring = self.log, self._written, self.size, self.log_used_addr
        for (bid, ln), count in zip(used, counts):
            for gpa, size in written[bid] or ():
                if ln <= 0:
                    break
                log.mark(gpa, min(size, ln))
                ln -= size
            written[bid] = None
            log.mark(ring + slot * VIRTQ_DESC_SIZE, VIRTQ_DESC_SIZE)
            slot = (slot + count) % n

    # -- notifications -------------------------------------------------------------------------
    def disable_notifications(self) -> None:
        """Ask the driver not to kick (device area flags = RING_EVENT_FLAGS_DISABLE)."""
        self._notify, self._event_off = False, -1
        if self.broken:
            return
        if self.memory.generation != self._generation:
            self._map()
        self._device_event[0] = _EVENT_DISABLE

    def enable_notifications(self) -> bool:
        """Ask for kicks again (DESC at the next avail slot with EVENT_IDX, else ENABLE); True when
        chains are already available, which the caller must handle as no kick will come for them."""
        if self.broken:
            raise self._broken()
        if self.memory.generation != self._generation:
            self._map()
        self._notify = True
        if self.event_idx:
            self._event_off = -1
            self._move_avail_event()
        else:
            self._device_event[0] = _EVENT_ENABLE
        # Full barrier: the enable must be visible before we re-read the ring (store -> load), the
        # mirror image of the driver's barrier between publishing and reading our flags.
        self._mb()
        self._event_fenced = True
        return self._h[self._avail_slot * 8 + 7] & _BOTH == (_AVAIL if self._avail_wrap else _USED)

    def _move_avail_event(self) -> bool:
        """DESC mode: ask for a kick when the driver makes our next avail slot available.  One le32
        store writes offset, wrap and flags together.  True when the event moved."""
        off = self._avail_slot | self._avail_wrap << VRING_PACKED_EVENT_F_WRAP_CTR
        if off == self._event_off:
            return False
        self._device_event[0] = off | _EVENT_DESC
        self._event_off, self._event_fenced = off, False
        return True

    def pending(self) -> int:
        """How many complete chains are available and not popped yet (a snapshot)."""
        if self.broken:
            raise self._broken()
        if self.memory.generation != self._generation:
            self._map()
        h, n, slot = self._h, self.size, self._avail_slot
        expect = _AVAIL if self._avail_wrap else _USED
        chains = seen = 0
        while seen < n - self._occupied and h[slot * 8 + 7] & _BOTH == expect:
            if self._rmb is not None:
                self._rmb()              # the chain's other flags are at least as new as its head's
            while True:
                f = h[slot * 8 + 7]
                if f & _BOTH != expect:
                    return chains
                seen += 1
                slot += 1
                if slot == n:
                    slot, expect = 0, expect ^ _BOTH
                if not f & _NEXT:
                    chains += 1
                    break
                if seen >= n:
                    return chains
        return chains

    # -- state ---------------------------------------------------------------------------------
    def get_base(self) -> int:
        """VHOST_USER_GET_VRING_BASE ``num``: next avail index and used index with their wrap counters."""
        return encode_base(self._avail_slot, self._avail_wrap, self._used_slot, self._used_wrap)

    def set_base(self, num: int) -> None:
        """VHOST_USER_SET_VRING_BASE: continue from ``num`` (see :func:`encode_base`).

        Slots between the used and the avail index belong to chains popped before and not used;
        they stay occupied (their buffer ids are unknown here) so the ring is never overrun."""
        if not isinstance(num, int) or not 0 <= num <= 0xFFFFFFFF:
            raise ValueError(f"vring base {num!r} is not a u32")
        avail, avail_wrap, used, used_wrap = decode_base(num)
        n = self.size
        if avail >= n or used >= n:
            raise VirtqueueError(f"vring base {num:#010x}: avail index {avail} or used index {used} is not "
                                 f"below the queue size {n}")
        # Position on a line of two laps: wrap counter 1 on even laps, 0 on odd ones.
        occupied = ((avail + (0 if avail_wrap else n)) - (used + (0 if used_wrap else n))) % (2 * n)
        if occupied > n:
            raise VirtqueueError(f"vring base {num:#010x}: the used index is ahead of the avail index")
        self._avail_slot, self._avail_wrap, self._used_slot, self._used_wrap = avail, avail_wrap, used, used_wrap
        self._ndescs = [0] * n
        self._occupied = self._orphans = occupied
        self.in_flight, self._event_off = 0, -1
        if self._written is not None:
            self._written = [None] * n

    def clear_stale_used(self) -> int:
        """After a crash, right after :meth:`set_base` from the inflight region: make every slot
        set_base left in flight read as not used; returns how many it changed.

        :meth:`push_batch` writes a batch's later used descriptors whole and the first one's flags
        last, so the driver sees the batch at once. A device that dies in between leaves those
        later descriptors reading as used in slots that, the batch rolled back (its chains in
        flight again), lie past the used index. Once the restarted device publishes the slot
        before one, the driver would take it as a completion the restarted device never gave,
        and that device's own completion later, in another slot, as an id not in flight. The
        driver owns no slot in [used, avail) and reads none until the device publishes the one
        before it, so the available pattern of the slot's lap (AVAIL == wrap, USED != wrap) can
        be written there safely. Idempotent: a crash during recovery is recovered again.
        (Resubmitted chains pushed as one batch, as Device.complete does, overwrite every stale
        slot before their head publishes; completed in several batches, as an asynchronous
        device may, they would not.)"""
        if self.broken:
            raise self._broken()
        if self.memory.generation != self._generation:
            self._map()
        h, n, log = self._h, self.size, self.log
        slot, wrap = self._used_slot, self._used_wrap
        cleared = 0
        for _ in range(self._occupied):
            f = h[slot * 8 + 7]
            if f & _BOTH == (_BOTH if wrap else 0):
                h[slot * 8 + 7] = f & ~_BOTH | (_AVAIL if wrap else _USED)
                cleared += 1
                if log is not None:
                    log.mark(self.log_used_addr + slot * VIRTQ_DESC_SIZE, VIRTQ_DESC_SIZE)
            slot += 1
            if slot == n:
                slot, wrap = 0, wrap ^ 1
        return cleared

    def resubmit(self, descriptors: Sequence[tuple[int, int, int, int]]
                 ) -> tuple[int, list[memoryview], list[memoryview]]:
        """Take back a chain a previous backend popped and never used, given the ring descriptors
        (addr, len, id, flags) inflight tracking saved (InflightPacked.resubmit), after
        :meth:`set_base`: checked like a popped chain, in flight again in slots set_base left
        occupied.  Returns it like :meth:`pop`."""
        if self.broken:
            raise self._broken()
        if self.memory.generation != self._generation:
            self._map()
        k = len(descriptors)
        bid = descriptors[-1][2] if k else -1
        if not 1 <= k <= self._orphans:            # the caller's mistake: the queue stays usable
            raise VirtqueueError(f"resubmit: a chain of {k} descriptor(s) does not fit the {self._orphans} "
                                 f"slots set_base left in flight")
        if not 0 <= bid < self.size or self._ndescs[bid]:
            raise VirtqueueError(f"resubmit: buffer id {bid} is out of range or already in flight")
        readable: list = []
        writable: list = []
        log = [] if self._written is not None else None
        total = 0
        saw_write = False
        for e, (addr, ln, _, f) in enumerate(descriptors):
            if f & _INDIRECT:
                if k > 1 or f & _NEXT or not self.indirect:
                    raise self._fail(VirtqueueError(
                        f"resubmit: buffer id {bid}: INDIRECT descriptor {e} is not allowed here "
                        f"(flags {f:#06x})"))
                total = self._indirect(-1, addr, ln, readable, writable, log, True)
                continue
            if bool(f & _NEXT) != (e < k - 1):
                raise self._fail(VirtqueueError(
                    f"resubmit: buffer id {bid}: NEXT does not end the chain at its last descriptor "
                    f"(descriptor {e}, flags {f:#06x})"))
            total += ln
            if f & _WRITE:
                saw_write = True
                if log is not None:
                    log.append((addr, ln))
                writable += self._translate(-1, addr, ln, True) if ln else [_EMPTY]
            elif saw_write:
                raise self._fail(VirtqueueError(
                    f"resubmit: buffer id {bid}: readable descriptor {e} after a writable one"))
            else:
                readable += self._translate(-1, addr, ln, False) if ln else [_EMPTY]
        if total > _MAX_LEN:
            raise self._fail(VirtqueueError(
                f"resubmit: buffer id {bid}: lengths add up to {total:#x}, beyond 2^32-1"))
        self._ndescs[bid] = k
        self._orphans -= k
        self.in_flight += 1
        if self._written is not None:
            self._written[bid] = log
        return bid, readable, writable


# --------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------

def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


class PackedDriverQueue(_PackedRing):
    """The driver (frontend) side of a packed virtqueue, which owns the ring memory.

    :meth:`add` places a chain (or one descriptor pointing at an indirect table in
    ``indirect_area``, ``indirect_max`` entries per buffer id); :meth:`publish` makes what was
    added visible and says whether to kick; :meth:`reap` collects used buffers and checks every
    id the device returns (a lying device breaks the queue).
    """

    _is_driver = True

    def _map(self) -> None:
        super()._map()
        self._table = None                 # this driver's indirect tables, indirect_max entries per id
        if self.indirect_max:
            self._table = _cast(self._view(self.indirect_area, self.size * self.indirect_max * VIRTQ_DESC_SIZE,
                                           True), "Q")

    @staticmethod
    def layout(size: int, base_gpa: int, indirect_max: int = 0) -> dict:
        """Aligned addresses for the ring parts from ``base_gpa`` on: desc, driver, device, indirect
        (``size * indirect_max`` 16-byte entries, None without) and end."""
        if not isinstance(size, int) or not 1 <= size <= VIRTQ_MAX_SIZE:
            raise VirtqueueError(f"packed queue size {size!r} is not in 1..{VIRTQ_MAX_SIZE}")
        ring_bytes, driver_bytes, device_bytes = packed_ring_sizes(size)
        desc = _align(base_gpa, PACKED_DESC_ALIGN)
        driver = _align(desc + ring_bytes, PACKED_EVENT_ALIGN)
        device = _align(driver + driver_bytes, PACKED_EVENT_ALIGN)
        end = device + device_bytes
        indirect = None
        if indirect_max:
            indirect = _align(end, PACKED_DESC_ALIGN)
            end = indirect + size * indirect_max * VIRTQ_DESC_SIZE
        return dict(desc=desc, driver=driver, device=device, indirect=indirect, end=end)

    def __init__(self, memory, size: int, desc_addr: int, driver_area: int, device_area: int, *,
                 event_idx: bool = False, indirect_area: int | None = None, indirect_max: int = 0) -> None:
        if indirect_max and (indirect_area is None or indirect_area % PACKED_DESC_ALIGN):
            raise VirtqueueError(f"indirect area {indirect_area!r} is missing or not 16-byte aligned")
        self.indirect_area, self.indirect_max = indirect_area, indirect_max
        super().__init__(memory, size, desc_addr, driver_area, device_area)
        self.event_idx = bool(event_idx)
        # The spec: "The descriptor ring is zero-initialized"; zeroed event areas mean ENABLE.
        ring_bytes, _, _ = packed_ring_sizes(size)
        self._view(desc_addr, ring_bytes, True)[:] = bytes(ring_bytes)
        self._driver_event[0] = 0
        self._device_event[0] = 0
        self._avail_slot, self._avail_bits = 0, _AVAIL    # wrap counter 1: AVAIL set, USED clear
        self._used_slot, self._used_wrap = 0, 1
        self._free_ids = list(range(size - 1, -1, -1))
        self._ndescs = [0] * size       # per buffer id: ring slots its chain occupies; 0 = free
        self._tokens: list = [None] * size
        self._capacity = [0] * size     # per buffer id: device-writable bytes offered
        self.num_free = size
        self.in_flight = 0              # chains added and not reaped yet
        self._added = 0                 # slots added since the last publish
        self._first = None              # (slot, flags) of the first chain added since then
        self._interrupts = True
        self._event_off = -1

    def add(self, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]], token=None, *,
            indirect: bool = False) -> int:
        """Place a buffer of device-readable then device-writable ``(gpa, len)`` elements; returns its
        buffer id.  It becomes visible at the next :meth:`publish`; ``token`` (default: the id) comes
        back from :meth:`reap`."""
        if self.broken:
            raise self._broken()
        if self.memory.generation != self._generation:
            self._map()
        nr = len(readable)
        if nr + len(writable) == 1 and not indirect and self.num_free:     # one descriptor: kept short
            (a, ln), = readable or writable
            if not 0 <= ln <= _MAX_LEN or not 0 <= a < 1 << 64:
                raise ValueError(f"element {a:#x}+{ln:#x} does not fit a descriptor")
            bid = self._free_ids.pop()
            slot, bits = self._avail_slot, self._avail_bits
            flags = bits if nr else bits | _WRITE
            self._q[slot * 2] = a
            if self._first is None:                 # the batch's first chain: flags wait for publish()
                self._i[slot * 4 + 2] = ln
                self._h[slot * 8 + 6] = bid
                self._first = (slot, flags)
            else:
                self._q[slot * 2 + 1] = ln | bid << 32 | flags << 48
            slot += 1
            if slot == self.size:
                slot, self._avail_bits = 0, bits ^ _BOTH
            self._avail_slot = slot
            self._ndescs[bid] = 1
            self._tokens[bid] = bid if token is None else token
            self._capacity[bid] = 0 if nr else ln
            self.num_free -= 1
            self.in_flight += 1
            self._added += 1
            return bid
        segments = [(a, ln, 0) for a, ln in readable] + [(a, ln, _WRITE) for a, ln in writable]
        k = len(segments)
        if not k:
            raise ValueError("a buffer needs at least one element")
        for a, ln, _ in segments:
            if not 0 <= ln <= _MAX_LEN or not 0 <= a < 1 << 64:
                raise ValueError(f"element {a:#x}+{ln:#x} does not fit a descriptor")
        if sum(ln for _, ln, _ in segments) > _MAX_LEN:
            raise ValueError("a buffer's elements add up to more than 2^32-1 bytes")
        if indirect and k > self.indirect_max:
            raise VirtqueueError(f"{k} elements do not fit an indirect table of {self.indirect_max}")
        need = 1 if indirect else k
        if need > self.num_free:
            raise VirtqueueError(f"queue full: {need} descriptor(s) needed, {self.num_free} free")
        bid = self._free_ids.pop()
        q, n = self._q, self.size
        slot, bits = self._avail_slot, self._avail_bits
        if indirect:
            table, base = self._table, bid * self.indirect_max * 2
            for e, (a, ln, wflag) in enumerate(segments):
                table[base + e * 2] = a
                table[base + e * 2 + 1] = ln | wflag << 48
            segments = [(self.indirect_area + bid * self.indirect_max * VIRTQ_DESC_SIZE, k * VIRTQ_DESC_SIZE,
                         _INDIRECT)]
        head, head_flags = slot, None
        last = len(segments) - 1
        for e, (a, ln, flag) in enumerate(segments):
            flags = bits | flag | (_NEXT if e < last else 0)
            q[slot * 2] = a
            if e:
                q[slot * 2 + 1] = ln | bid << 32 | flags << 48
            else:
                # The head's flags wait: writing them makes the whole chain the device's.
                self._i[slot * 4 + 2] = ln
                self._h[slot * 8 + 6] = bid
                head_flags = flags
            slot += 1
            if slot == n:
                slot, bits = 0, bits ^ _BOTH
        if self._first is None:
            self._first = (head, head_flags)
        else:
            # Not the first chain of this batch: the device reaches it only through the first
            # one, whose flags publish() writes after a write barrier, so these can go now.
            self._h[head * 8 + 7] = head_flags
        self._avail_slot, self._avail_bits = slot, bits
        self._ndescs[bid] = need
        self._tokens[bid] = bid if token is None else token
        self._capacity[bid] = sum(ln for _, ln in writable)
        self.num_free -= need
        self.in_flight += 1
        self._added += need
        return bid

    def publish(self) -> bool:
        """Make every chain added since the last call visible; True when the device wants a kick."""
        if self.broken:
            raise self._broken()
        if self._first is None:
            return False
        slot, flags = self._first
        self._first = None
        if self._wmb is not None:
            # Write barrier: every descriptor added (the later chains' flags too) must be visible
            # before the first head's flags hand the batch to the device.
            self._wmb()
        self._h[slot * 8 + 7] = flags
        added, self._added = self._added, 0
        # Full barrier: the head's flags must be visible before we read the device's event
        # suppression (store -> load), or a device re-enabling kicks and finding nothing is missed.
        self._mb()
        event = self._device_event[0]
        event_flags = event >> 16 & 3
        if event_flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if event_flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return True
        off = event & _EVENT_OFF
        if (event >> VRING_PACKED_EVENT_F_WRAP_CTR & 1) != int(self._avail_bits == _AVAIL):
            off -= self.size                 # the event is in the previous lap: same line as old/new
        return vring_need_event(off, self._avail_slot, self._avail_slot - added)

    def reap(self, max: int | None = None) -> list[tuple[object, int]]:  # noqa: A002 (the shared API's name)
        """Used buffers in completion order as ``(token, written_len)``; frees their descriptors.
        A used descriptor whose id is not in flight, or claims more bytes than were offered,
        breaks the queue (a lying device)."""
        if self.broken:
            raise self._broken()
        if self.memory.generation != self._generation:
            self._map()
        n, q, h = self.size, self._q, self._h
        ndescs, tokens, capacity, free_ids = self._ndescs, self._tokens, self._capacity, self._free_ids
        budget = n if max is None else max
        out: list = []
        slot, wrap = self._used_slot, _BOTH if self._used_wrap else 0
        rmb = self._rmb
        freed = counted = 0
        while True:
            try:
                while len(out) < budget:
                    f = h[slot * 8 + 7]
                    if f & _BOTH != wrap:
                        break
                    if rmb is not None:
                        rmb()                # id and len are read after the flags that published them
                    w = q[slot * 2 + 1]
                    bid, ln = w >> 32 & 0xFFFF, w & _MAX_LEN
                    count = ndescs[bid] if bid < n else 0
                    if not count:
                        raise self._fail(VirtqueueError(
                            f"packed ring slot {slot}: the device used buffer id {bid}, which is not in flight"))
                    written = ln if f & _WRITE else 0
                    if written > capacity[bid]:
                        raise self._fail(VirtqueueError(
                            f"packed ring slot {slot}: the device wrote {written} bytes into buffer id {bid}, "
                            f"which offered {capacity[bid]}"))
                    ndescs[bid] = 0
                    free_ids.append(bid)
                    freed += count
                    out.append((tokens[bid], written))
                    tokens[bid] = None
                    slot += count
                    if slot >= n:
                        slot, wrap = slot - n, wrap ^ _BOTH
            finally:                         # also when a lying device stops us half way
                self._used_slot, self._used_wrap = slot, int(wrap == _BOTH)
                self.num_free += freed
                self.in_flight -= len(out) - counted
                freed, counted = 0, len(out)
            if len(out) >= budget or not (self._interrupts and self.event_idx and self._move_used_event()):
                return out
            # Full barrier: the new event offset must be visible before we look at the ring again
            # (store -> load), else a buffer used right now is neither signalled nor seen.
            self._mb()

    # -- notifications -------------------------------------------------------------------------
    def disable_interrupts(self) -> None:
        """Ask the device not to interrupt (driver area flags = RING_EVENT_FLAGS_DISABLE)."""
        self._interrupts, self._event_off = False, -1
        self._driver_event[0] = _EVENT_DISABLE

    def enable_interrupts(self) -> bool:
        """Ask for interrupts again (DESC at the next used slot with EVENT_IDX, else ENABLE); True
        when used buffers are already there, which the caller must reap as no interrupt will come."""
        if self.broken:
            raise self._broken()
        self._interrupts = True
        if self.event_idx:
            self._event_off = -1
            self._move_used_event()
        else:
            self._driver_event[0] = _EVENT_ENABLE
        # Full barrier: the enable must be visible before we re-read the ring (store -> load).
        self._mb()
        return self._h[self._used_slot * 8 + 7] & _BOTH == (_BOTH if self._used_wrap else 0)

    def _move_used_event(self) -> bool:
        off = self._used_slot | self._used_wrap << VRING_PACKED_EVENT_F_WRAP_CTR
        if off == self._event_off:
            return False
        self._driver_event[0] = off | _EVENT_DESC
        self._event_off = off
        return True

    def get_base(self) -> int:
        """The same encoding as :meth:`PackedDeviceQueue.get_base`: where the driver is."""
        return encode_base(self._avail_slot, int(self._avail_bits == _AVAIL), self._used_slot, self._used_wrap)
