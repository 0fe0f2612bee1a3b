"""Guest memory: regions mapped from fds, lookups by guest-physical, frontend-user and IO virtual
address, the dirty-page log, and the memory barriers CPython lacks.

Every access is bounds-checked against the region (or IOTLB entry) that covers it and handed out
as a zero-copy ``memoryview``; nothing here copies guest data unless asked to (``read``).
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
from stat import S_ISREG as _S_ISREG
from typing import Callable, NamedTuple

from .errors import GuestMemoryError, NotSupportedError, VhostError

PAGE_SIZE = mmap.PAGESIZE
#: Most regions a vhost-user backend offers (VHOST_USER_GET_MAX_MEM_SLOTS); QEMU's and lvu's number.
MAX_MEM_SLOTS = 509
#: The dirty log's page size (VHOST_LOG_PAGE in the spec, VHOST_PAGE_SIZE in linux/vhost_types.h).
VHOST_LOG_PAGE = 0x1000


# --------------------------------------------------------------------------------------------
# Memory ordering
#
# CPython executes each memoryview / struct access as a plain C load or store, in program order
# as far as the compiler is concerned (every access is an opaque call).  The CPU may still
# reorder them:
#   * x86-64 is TSO: loads are not reordered with loads, stores not with stores, so the read
#     barrier (avail idx before ring entries) and the write barrier (used entries before used
#     idx) cost nothing.  Only store->load needs a fence: publishing used idx, then reading
#     used_event / avail flags (and the driver's mirror image).
#   * aarch64 reorders all four: read, write and full barriers are real ``dmb`` instructions.
# A barrier is a tiny machine-code function called through ctypes (about 150 ns); where
# executable memory is refused, libatomic's atomic_thread_fence; as a last resort the
# membarrier(2) system call, whose kernel side is a full barrier.
# --------------------------------------------------------------------------------------------

_MACHINE = os.uname().machine
_X86_64 = _MACHINE in ("x86_64", "AMD64")
_AARCH64 = _MACHINE in ("aarch64", "arm64")

_CODE = {
    # mfence; ret                      / lock or byte [rdi], sil; ret
    "x86_64": {"full": b"\x0f\xae\xf0\xc3", "atomic_or8": b"\xf0\x40\x08\x37\xc3"},
    # dmb ish; ret / dmb ishld; ret / dmb ishst; ret
    # atomic_or8: ldaxrb w2,[x0]; orr w2,w2,w1; stlxrb w3,w2,[x0]; cbnz w3,-12; ret
    "aarch64": {
        "full": bytes.fromhex("bf3b03d5c0035fd6"),
        "read": bytes.fromhex("bf3903d5c0035fd6"),
        "write": bytes.fromhex("bf3a03d5c0035fd6"),
        "atomic_or8": bytes.fromhex("02fc5f084200012a02fc0308a3ffff35c0035fd6"),
    },
}


class Barriers(NamedTuple):
    """The barriers a ring or log needs; ``read``/``write`` are None where the CPU needs none."""

    full: Callable[[], None]
    read: Callable[[], None] | None
    write: Callable[[], None] | None
    #: (address, bits): *address |= bits, atomically; None where no atomic instruction is
    #: reachable (membarrier(2) only): the dirty log is then refused, never done racily.
    atomic_or8: Callable[[int, int], None] | None
    how: str                                  # which mechanism, for the docs and benchmarks


_barriers: Barriers | None = None
_code_page: mmap.mmap | None = None  # kept alive for the process's lifetime


def _machine_code_barriers() -> Barriers | None:
    """The barriers as machine code in a page of their own, mapped writable only while the code
    is written and then read-execute (W^X: SELinux's execmem, PaX and hardened kernels refuse a
    page both writable and executable). None where an executable mapping is refused."""
    global _code_page
    code = _CODE.get("x86_64" if _X86_64 else "aarch64" if _AARCH64 else "", None)
    if code is None:
        return None
    try:
        page = mmap.mmap(-1, PAGE_SIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError):
        return None
    base = ctypes.addressof(ctypes.c_char.from_buffer(page))
    offsets = {}
    offset = 0
    for name, blob in code.items():
        page[offset:offset + len(blob)] = blob
        offsets[name] = offset
        offset += 32
    if libc.mprotect(ctypes.c_void_p(base), PAGE_SIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
        page.close()                               # PROT_EXEC refused: the fallbacks
        return None
    if _AARCH64:   # make the new instructions visible to instruction fetch (libgcc's __clear_cache)
        from ctypes.util import find_library   # only here: it imports subprocess
        try:
            libgcc = ctypes.CDLL(find_library("gcc_s") or "libgcc_s.so.1")
            libgcc.__clear_cache(ctypes.c_void_p(base), ctypes.c_void_p(base + offset))
        except (OSError, AttributeError):
            page.close()
            return None
    _code_page = page        # never written again: read-execute for the life of the process
    funcs = {name: (ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_ubyte) if name == "atomic_or8"
                    else ctypes.CFUNCTYPE(None))(base + at) for name, at in offsets.items()}
    return Barriers(funcs["full"], funcs.get("read"), funcs.get("write"), funcs["atomic_or8"],
                    "machine code (mfence / lock or)" if _X86_64 else "machine code (dmb / ldaxrb-stlxrb)")


def _libatomic_barriers() -> Barriers | None:
    from ctypes.util import find_library   # only here: it imports subprocess
    name = find_library("atomic")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
        fence, fetch_or = lib.atomic_thread_fence, lib.__atomic_fetch_or_1
    except (OSError, AttributeError):
        return None
    fence.argtypes, fence.restype = [ctypes.c_int], None
    fetch_or.argtypes, fetch_or.restype = [ctypes.c_void_p, ctypes.c_ubyte, ctypes.c_int], ctypes.c_ubyte
    seq_cst = 5

    def full() -> None:
        fence(seq_cst)

    def atomic_or8(address: int, bits: int) -> None:
        fetch_or(address, bits, seq_cst)

    weak = None if _X86_64 else full
    return Barriers(full, weak, weak, atomic_or8, "libatomic atomic_thread_fence")


def _membarrier_barriers() -> Barriers:
    nr = {"x86_64": 324, "aarch64": 283}.get("x86_64" if _X86_64 else "aarch64" if _AARCH64 else "")
    if nr is None:
        raise VhostError(f"no memory barrier available on {_MACHINE}")
    register_private_expedited, private_expedited = 1 << 4, 1 << 3
    if libc.syscall(nr, register_private_expedited, 0, 0) != 0:
        raise VhostError(f"membarrier(2) unavailable: {os.strerror(ctypes.get_errno())}")

    def full() -> None:
        libc.syscall(nr, private_expedited, 0, 0)

    weak = None if _X86_64 else full
    # No atomic OR: a fenced read-modify-write would still lose bits the front-end sets meanwhile.
    return Barriers(full, weak, weak, None, "membarrier(2)")


def barriers() -> Barriers:
    """The process's barriers, set up on first use (not at import)."""
    global _barriers
    if _barriers is None:
        _barriers = _machine_code_barriers() or _libatomic_barriers() or _membarrier_barriers()
    return _barriers


# --------------------------------------------------------------------------------------------
# Regions
# --------------------------------------------------------------------------------------------

class MemoryRegion:
    """One contiguous piece of guest memory: ``size`` bytes at guest-physical ``gpa``.

    ``uva`` is the address the frontend uses for it (vhost-user sends ring addresses in it);
    ``view`` is a writable memoryview of exactly the region, whatever backs it.
    """

    __slots__ = ("gpa", "size", "uva", "mmap_offset", "end", "view")

    def __init__(self, gpa: int, size: int, uva: int, mmap_offset: int, view: memoryview) -> None:
        self.gpa, self.size, self.uva, self.mmap_offset = gpa, size, uva, mmap_offset
        self.end = gpa + size
        self.view = view

    def __repr__(self) -> str:
        return (f"MemoryRegion(gpa={self.gpa:#x}, size={self.size:#x}, uva={self.uva:#x}, "
                f"mmap_offset={self.mmap_offset:#x})")

    def close(self) -> None:
        """Forget the region; a mapping is unmapped once no view handed out earlier is alive."""
        self.view.release()


#: The package's one handle on the C library (mmap, fallocate, prctl...): functions the stdlib lacks.
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value


def map_fd(fd: int, size: int, offset: int = 0) -> memoryview:
    """mmap(2) ``size`` bytes of ``fd`` from ``offset`` (any alignment) MAP_SHARED and read-write,
    as a writable memoryview. The mapping lives as long as any view of it and is unmapped with
    the last one. Unlike ``mmap.mmap`` it keeps no duplicate of ``fd``: the caller may close it at
    once, and closing it really closes it (a memfd, a front-end's socket fd...)."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    skip = offset - start
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise GuestMemoryError(f"fd {fd} cannot be mapped: {exc.strerror}", exc.errno) from None
    if size <= 0 or offset < 0 or offset + size > 1 << 63:
        raise GuestMemoryError(f"cannot map {size:#x} bytes at fd offset {offset:#x}")
    # A regular file (memfd, tmpfs, hugetlbfs) must hold the whole mapping, an empty one too: a page
    # past its end raises SIGBUS at the first touch, which kills the process. Device files (DAX)
    # say size 0 and are not checked.
    file_size = st.st_size
    if _S_ISREG(st.st_mode) and offset + size > file_size:
        raise GuestMemoryError(f"mapping of {size:#x} bytes at fd offset {offset:#x} runs past the end of its "
                               f"file ({file_size:#x} bytes)")
    length = skip + size
    address = libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, start)
    if address is None or address == _MAP_FAILED:
        err = ctypes.get_errno()
        raise GuestMemoryError(f"cannot map {size:#x} bytes at fd offset {offset:#x}: {os.strerror(err)}", err)

    return memoryview(_mapping_type(length).from_address(address)).cast("B")[skip:]


_mapping_types: dict[int, type] = {}


def _mapping_type(length: int) -> type:
    """A ctypes byte array of ``length`` whose instances munmap themselves when collected; one
    type per length (made once: building a ctypes type costs more than the mmap itself)."""
    cls = _mapping_types.get(length)
    if cls is None:
        class _Mapping(ctypes.c_ubyte * length):
            def __del__(self, munmap=libc.munmap, addressof=ctypes.addressof, length=length) -> None:
                munmap(addressof(self), length)
        cls = _mapping_types[length] = _Mapping
    return cls


def address_of(view: memoryview) -> int:
    """The address of a writable buffer's first byte in this process (what the kernel's vhost and
    vDPA ioctls, and vhost-user's userspace_addr, call a user address)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class GuestMemory:
    """The guest's memory as a set of non-overlapping regions, looked up with bisect.

    Lookups by guest-physical address (descriptors), by frontend user address (vhost-user ring
    addresses) and, through :class:`IOTLB`, by IO virtual address. ``generation`` changes on
    every add or remove so a ring can revalidate what it cached.
    """

    def __init__(self, max_regions: int = MAX_MEM_SLOTS) -> None:
        self.max_regions = max_regions
        self.generation = 0
        self._regions: list[MemoryRegion] = []   # sorted by gpa
        self._starts: list[int] = []
        self._by_uva: list[MemoryRegion] = []     # sorted by uva
        self._uva_starts: list[int] = []

    # -- changes ------------------------------------------------------------------------------
    def add_region(self, gpa: int, size: int, *, fd: int | None = None, mmap_offset: int = 0,
                   uva: int | None = None, buffer=None) -> MemoryRegion:
        """Map ``size`` bytes of ``fd`` (MAP_SHARED, the fd may be closed afterwards) or wrap an
        existing writable ``buffer``, as guest-physical ``[gpa, gpa + size)``."""
        if size <= 0 or gpa < 0 or gpa + size > 1 << 64 or mmap_offset < 0:
            raise GuestMemoryError(f"invalid region gpa={gpa:#x} size={size:#x} mmap_offset={mmap_offset:#x}")
        uva = gpa if uva is None else uva
        if uva < 0 or uva + size > 1 << 64:
            raise GuestMemoryError(f"invalid region user address {uva:#x} size {size:#x}")
        if len(self._regions) >= self.max_regions:
            raise GuestMemoryError(f"too many memory regions (the limit is {self.max_regions})")
        i = bisect.bisect_left(self._starts, gpa)
        for neighbour in self._regions[max(i - 1, 0):i + 1]:
            if gpa < neighbour.end and neighbour.gpa < gpa + size:
                raise GuestMemoryError(f"region gpa={gpa:#x} size={size:#x} overlaps {neighbour!r}")
        j = bisect.bisect_left(self._uva_starts, uva)
        for neighbour in self._by_uva[max(j - 1, 0):j + 1]:
            if uva < neighbour.uva + neighbour.size and neighbour.uva < uva + size:
                raise GuestMemoryError(f"region uva={uva:#x} size={size:#x} overlaps {neighbour!r}")
        if (fd is None) == (buffer is None):
            raise GuestMemoryError("a region needs exactly one of fd and buffer")
        if fd is not None:
            view = map_fd(fd, size, mmap_offset)
        else:
            view = memoryview(buffer).cast("B")
            if view.readonly or len(view) < size:
                raise GuestMemoryError(f"buffer for region gpa={gpa:#x} is read-only or smaller than {size:#x}")
            view = view[:size]
        region = MemoryRegion(gpa, size, uva, mmap_offset, view)
        self._regions.insert(i, region)
        self._starts.insert(i, gpa)
        self._by_uva.insert(j, region)
        self._uva_starts.insert(j, uva)
        self.generation += 1
        return region

    def remove_region(self, gpa: int, size: int, uva: int | None = None) -> None:
        """Unmap the region that starts at ``gpa`` with exactly this size (and user address)."""
        i = bisect.bisect_left(self._starts, gpa)
        if i == len(self._starts) or self._starts[i] != gpa or self._regions[i].size != size or (
                uva is not None and self._regions[i].uva != uva):
            raise GuestMemoryError(f"no region gpa={gpa:#x} size={size:#x}"
                                   + (f" uva={uva:#x}" if uva is not None else ""))
        region = self._regions.pop(i)
        del self._starts[i]
        j = self._by_uva.index(region)
        del self._by_uva[j], self._uva_starts[j]
        self.generation += 1
        region.close()

    def clear(self) -> None:
        """Unmap every region (vhost-user SET_MEM_TABLE replaces the whole table)."""
        for region in self._regions:
            region.close()
        self._regions, self._starts, self._by_uva, self._uva_starts = [], [], [], []
        self.generation += 1

    close = clear

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.clear()

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(self._regions)

    # -- lookups ------------------------------------------------------------------------------
    def find(self, gpa: int) -> MemoryRegion | None:
        """The region containing guest-physical ``gpa``, or None (for hot paths that try first)."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            region = self._regions[i]
            if gpa < region.end:
                return region
        return None

    def region_at(self, gpa: int) -> MemoryRegion:
        """The region containing guest-physical ``gpa``."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            region = self._regions[i]
            if gpa < region.end:
                return region
        raise GuestMemoryError(f"guest address {gpa:#x} is outside every memory region")

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of ``[gpa, gpa + length)``, which must lie inside one region."""
        region = self.region_at(gpa)
        offset = gpa - region.gpa
        if length < 0 or offset + length > region.size:
            raise GuestMemoryError(f"guest buffer {gpa:#x}+{length:#x} runs past the end of {region!r}")
        return region.view[offset:offset + length]

    def segments(self, gpa: int, length: int) -> list[memoryview]:
        """Views covering ``[gpa, gpa + length)``, split where it crosses into an adjacent region."""
        if length < 0 or gpa + length > 1 << 64:
            raise GuestMemoryError(f"guest buffer {gpa:#x}+{length:#x} wraps the address space")
        out = []
        while True:
            region = self.region_at(gpa)
            offset = gpa - region.gpa
            take = min(length, region.size - offset)
            out.append(region.view[offset:offset + take])
            length -= take
            if not length:
                return out
            gpa += take

    def read(self, gpa: int, length: int) -> bytes:
        """Copy guest bytes out (for control paths; data paths use views)."""
        return b"".join(self.segments(gpa, length))

    def write(self, gpa: int, data) -> None:
        """Copy ``data`` into guest memory, across adjacent regions if needed."""
        data = memoryview(data).cast("B")
        pos = 0
        for seg in self.segments(gpa, len(data)):
            seg[:] = data[pos:pos + len(seg)]
            pos += len(seg)

    def gpa_for_uva(self, uva: int, length: int = 1) -> int:
        """Translate a frontend user address (vhost-user ring addresses) to guest-physical."""
        i = bisect.bisect_right(self._uva_starts, uva) - 1
        if i >= 0:
            region = self._by_uva[i]
            if uva + length <= region.uva + region.size:
                return region.gpa + (uva - region.uva)
        raise GuestMemoryError(f"frontend address {uva:#x}+{length:#x} is outside every memory region")


# --------------------------------------------------------------------------------------------
# IOTLB
# --------------------------------------------------------------------------------------------

VHOST_ACCESS_RO, VHOST_ACCESS_WO, VHOST_ACCESS_RW = 1, 2, 3   # linux/vhost_types.h perm values


class IOTLBMiss(GuestMemoryError):
    """No IOTLB entry covers this IOVA with this access (the device should report a miss)."""

    def __init__(self, iova: int, write: bool) -> None:
        super().__init__(f"IOTLB miss for {'write' if write else 'read'} at IOVA {iova:#x}")
        self.iova, self.write = iova, write


class IOTLB:
    """IO virtual address -> memory translations with permissions, for VIRTIO_F_ACCESS_PLATFORM
    and vDPA: ``update`` / ``invalidate`` as the vhost IOTLB messages say, and the same
    ``view`` / ``segments`` interface as :class:`GuestMemory` so rings work over either.

    Entries point into views given directly (VDUSE's mmapped bounce area) or at frontend user
    addresses resolved through ``memory`` (vhost-user's VHOST_IOTLB_UPDATE carries a uaddr); the
    latter remember their guest-physical address, so the dirty log can be kept in guest-physical
    pages (:meth:`gpa_ranges`). A vIOMMU hands out one entry per page: a buffer or ring part may
    span several, and ``view`` joins entries that are contiguous in memory into one view.
    """

    def __init__(self, memory: GuestMemory | None = None) -> None:
        self.memory = memory
        self.generation = 0
        self._starts: list[int] = []
        # (iova, end, view, perm, gpa or None, host address of the view or None), sorted, disjoint
        self._entries: list[tuple[int, int, memoryview, int, int | None, int | None]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def update(self, iova: int, size: int, uaddr: int, perm: int = VHOST_ACCESS_RW) -> None:
        """VHOST_IOTLB_UPDATE: map ``[iova, iova + size)`` to frontend user address ``uaddr``."""
        if self.memory is None:
            raise GuestMemoryError("this IOTLB has no guest memory to resolve user addresses in")
        gpa = self.memory.gpa_for_uva(uaddr, size)
        self._insert(iova, self.memory.view(gpa, size), perm, gpa)

    def update_view(self, iova: int, view: memoryview, perm: int = VHOST_ACCESS_RW) -> None:
        """Map ``[iova, iova + len(view))`` onto ``view``, replacing what overlapped it."""
        self._insert(iova, view, perm, None)

    def _insert(self, iova: int, view: memoryview, perm: int, gpa: int | None) -> None:
        size = len(view)
        if size <= 0 or iova < 0 or iova + size > 1 << 64 or perm not in (1, 2, 3):
            raise GuestMemoryError(f"invalid IOTLB update iova={iova:#x} size={size:#x} perm={perm}")
        try:
            host = address_of(view)
        except (TypeError, ValueError):    # read-only: never joined with a neighbour
            host = None
        self.invalidate(iova, size)
        i = bisect.bisect_left(self._starts, iova)
        self._starts.insert(i, iova)
        self._entries.insert(i, (iova, iova + size, view, perm, gpa, host))
        self.generation += 1

    def invalidate(self, iova: int, size: int) -> None:
        """VHOST_IOTLB_INVALIDATE: forget ``[iova, iova + size)``; entries that straddle it are
        trimmed. Only the entries it touches are looked at (bisect), not the whole table."""
        end = iova + size
        starts, entries = self._starts, self._entries
        first = bisect.bisect_right(starts, iova) - 1
        if first < 0 or entries[first][1] <= iova:
            first += 1
        last = bisect.bisect_left(starts, end)
        if first >= last:
            return
        kept = []
        for start, stop, view, perm, gpa, host in entries[first:last]:
            if start < iova:
                cut = iova - start
                kept.append((start, iova, view[:cut], perm, gpa, host))
            if stop > end:
                cut = end - start
                kept.append((end, stop, view[cut:], perm, None if gpa is None else gpa + cut,
                             None if host is None else host + cut))
        entries[first:last] = kept
        starts[first:last] = [e[0] for e in kept]
        self.generation += 1

    def _walk(self, iova: int, length: int, write: bool):
        """The entries covering ``[iova, iova + length)`` in order, with the piece each covers:
        (entry, offset into it, bytes). IOTLBMiss where none covers (or one lacks the permission)."""
        need = VHOST_ACCESS_WO if write else VHOST_ACCESS_RO
        starts, entries = self._starts, self._entries
        while length > 0:
            i = bisect.bisect_right(starts, iova) - 1
            entry = entries[i] if i >= 0 else None
            if entry is None or iova >= entry[1] or not entry[3] & need:
                raise IOTLBMiss(iova, write)
            take = min(length, entry[1] - iova)
            yield entry, iova - entry[0], take
            iova += take
            length -= take

    def segments(self, iova: int, length: int, write: bool = False) -> list[memoryview]:
        return [entry[2][offset:offset + take] for entry, offset, take in self._walk(iova, length, write)]

    def view(self, iova: int, length: int, write: bool = False) -> memoryview:
        """One view of ``[iova, iova + length)``: across several entries where they are contiguous
        in memory (a ring part behind a vIOMMU's page-sized entries); GuestMemoryError otherwise."""
        pieces = list(self._walk(iova, length, write))
        if len(pieces) == 1:
            entry, offset, take = pieces[0]
            return entry[2][offset:offset + take]
        first = pieces[0][0][5]
        expect = None if first is None else first + pieces[0][1]
        for entry, offset, take in pieces:
            if entry[5] is None or entry[5] + offset != expect:
                raise GuestMemoryError(f"IOVA buffer {iova:#x}+{length:#x} spans IOTLB entries that are not "
                                       f"contiguous in memory")
            expect += take
        return _joined(first + pieces[0][1], length, [entry[2] for entry, _, _ in pieces])

    def gpa_ranges(self, iova: int, length: int) -> list[tuple[int, int]]:
        """Guest-physical (address, length) pieces of ``[iova, iova + length)``, for the dirty log,
        which is kept in guest-physical pages even behind an IOMMU (the spec's log section)."""
        out = []
        for entry, offset, take in self._walk(iova, length, False):
            gpa = entry[4]
            if gpa is None:
                raise GuestMemoryError(f"IOVA {iova:#x} maps memory that has no guest-physical address")
            out.append((gpa + offset, take))
        return out


def _joined(address: int, length: int, keep: list[memoryview]) -> memoryview:
    """A view of ``length`` bytes at host ``address``, which the views in ``keep`` cover
    contiguously; the result keeps them (and so their mappings) alive."""
    class _Span(ctypes.c_ubyte * length):
        pass

    span = _Span.from_address(address)
    span._keep = keep
    return memoryview(span).cast("B")


class IOVALog:
    """The dirty log seen through an IOTLB: a ring logs IOVAs (descriptor addresses, the used
    ring's log address), this marks their guest-physical pages (VIRTIO_F_ACCESS_PLATFORM)."""

    def __init__(self, log: DirtyLog, iotlb: IOTLB) -> None:
        self.log, self.iotlb = log, iotlb

    def mark(self, iova: int, length: int) -> None:
        if length <= 0:
            return
        try:
            ranges = self.iotlb.gpa_ranges(iova, length)
        except GuestMemoryError as exc:
            # The driver unmapped a buffer the device still held: nothing left to translate.
            import logging
            logging.getLogger("vhost_min.memory").error("dirty log: IOVA %#x+%#x written but no longer mapped (%s); not logged", iova, length, exc)
            return
        for gpa, n in ranges:
            self.log.mark(gpa, n)


# --------------------------------------------------------------------------------------------
# Dirty log
# --------------------------------------------------------------------------------------------

class DirtyLog:
    """The live-migration dirty bitmap (VHOST_USER_SET_LOG_BASE / VHOST_SET_LOG_BASE): one bit per
    4 KiB guest page, page n at byte n // 8, bit n % 8, set with an atomic OR because the
    frontend and other devices clear and set bits in the same bitmap concurrently."""

    def __init__(self, view: memoryview) -> None:
        self.view = memoryview(view).cast("B")
        if self.view.readonly:
            raise GuestMemoryError("the dirty log must be writable")
        self._address = address_of(self.view)
        self._or = barriers().atomic_or8
        if self._or is None:
            raise NotSupportedError(f"no dirty log: it needs an atomic byte OR, and this process has only "
                                    f"{barriers().how} (no executable memory, no libatomic)")

    @classmethod
    def from_fd(cls, fd: int, size: int, offset: int = 0) -> DirtyLog:
        """The log in ``size`` bytes of ``fd`` from ``offset`` (the fd stays the caller's)."""
        return cls(map_fd(fd, size, offset))

    def mark(self, gpa: int, length: int) -> None:
        """Mark every page of ``[gpa, gpa + length)`` dirty."""
        if length <= 0:
            return
        first, last = gpa // VHOST_LOG_PAGE, (gpa + length - 1) // VHOST_LOG_PAGE
        if last // 8 >= len(self.view):
            raise GuestMemoryError(f"dirty log of {len(self.view)} bytes cannot cover guest address "
                                   f"{gpa + length - 1:#x}")
        page = first
        while page <= last:
            byte, bit = divmod(page, 8)
            if bit == 0 and last - page >= 7:    # a whole byte at once
                bits = 0xFF
                page += 8
            else:
                bits = 0
                while page <= last and page // 8 == byte:
                    bits |= 1 << (page % 8)
                    page += 1
            self._or(self._address + byte, bits)

    def is_dirty(self, gpa: int) -> bool:
        page = gpa // VHOST_LOG_PAGE
        return bool(self.view[page // 8] >> (page % 8) & 1)

    def close(self) -> None:
        self.view.release()
