"""Guest memory regions, IOTLB, dirty log and barriers (vhost_min.memory)."""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
import subprocess
import tempfile
import unittest
from unittest import mock

from tests.support import IN_CI, memfd, open_fds, require_commands, seeded_random
from vhost_min.errors import GuestMemoryError, NotSupportedError, VhostError
from vhost_min.memory import (IOTLB, MAX_MEM_SLOTS, VHOST_ACCESS_RO, VHOST_ACCESS_RW, VHOST_ACCESS_WO,
                              DirtyLog, GuestMemory, IOTLBMiss, barriers)


class RegionTest(unittest.TestCase):
    def setUp(self):
        self.fd = memfd(1 << 20)
        self.memory = GuestMemory()

    def tearDown(self):
        self.memory.clear()
        os.close(self.fd)

    def test_view_reads_and_writes_the_file(self):
        self.memory.add_region(0x10000, 0x4000, fd=self.fd, mmap_offset=0x2000)
        self.memory.view(0x10010, 4)[:] = b"abcd"
        self.assertEqual(os.pread(self.fd, 4, 0x2010), b"abcd")
        os.pwrite(self.fd, b"wxyz", 0x5ffc)
        self.assertEqual(bytes(self.memory.view(0x13ffc, 4)), b"wxyz")

    def test_unaligned_mmap_offset(self):
        self.memory.add_region(0x0, 0x100, fd=self.fd, mmap_offset=0x1234)
        os.pwrite(self.fd, b"Q", 0x1234 + 0x42)
        self.assertEqual(self.memory.read(0x42, 1), b"Q")

    def test_bounds(self):
        self.memory.add_region(0x1000, 0x1000, fd=self.fd)
        self.assertEqual(len(self.memory.view(0x1000, 0x1000)), 0x1000)
        for gpa, length in ((0xfff, 1), (0x1fff, 2), (0x2000, 1), (0x1000, 0x1001), (0x1000, -1)):
            with self.assertRaises(GuestMemoryError, msg=f"{gpa:#x}+{length}"):
                self.memory.view(gpa, length)
        with self.assertRaises(GuestMemoryError):
            self.memory.segments(0x1f00, 0x200)     # runs into a gap
        with self.assertRaises(GuestMemoryError):
            self.memory.segments(0xffffffffffffff00, 0x200)

    def test_adjacent_regions_give_segments(self):
        self.memory.add_region(0x0, 0x1000, fd=self.fd, mmap_offset=0x10000)
        self.memory.add_region(0x1000, 0x1000, fd=self.fd, mmap_offset=0x40000)
        segs = self.memory.segments(0xff0, 0x20)
        self.assertEqual([len(s) for s in segs], [0x10, 0x10])
        self.memory.write(0xff0, bytes(range(0x20)))
        self.assertEqual(os.pread(self.fd, 0x10, 0x10ff0), bytes(range(0x10)))
        self.assertEqual(os.pread(self.fd, 0x10, 0x40000), bytes(range(0x10, 0x20)))
        with self.assertRaises(GuestMemoryError):
            self.memory.view(0xff0, 0x20)   # one view cannot span two regions

    def test_overlaps_and_bad_regions_rejected(self):
        self.memory.add_region(0x10000, 0x10000, fd=self.fd, uva=0x7000_0000)
        for gpa, size, uva in ((0x8000, 0x8001, 0x1), (0x1ffff, 1, 0x2), (0x10000, 0x10, 0x3),
                               (0x0, 0x1000, 0x7000_ffff)):
            with self.assertRaises(GuestMemoryError):
                self.memory.add_region(gpa, size, fd=self.fd, uva=uva)
        for gpa, size in ((0, 0), (0, -1), (1 << 64, 1), ((1 << 64) - 1, 2)):
            with self.assertRaises(GuestMemoryError):
                self.memory.add_region(gpa, size, fd=self.fd)
        with self.assertRaises(GuestMemoryError):   # larger than the file behind it
            self.memory.add_region(0x100000, 2 << 20, fd=self.fd)
        with self.assertRaises(GuestMemoryError):
            self.memory.add_region(0x100000, 0x1000, fd=12345)
        with self.assertRaises(GuestMemoryError):
            self.memory.add_region(0x100000, 0x1000, buffer=b"read-only bytes")
        self.assertEqual(len(self.memory.regions), 1)

    def test_remove_region(self):
        before = self.memory.generation
        self.memory.add_region(0x0, 0x1000, fd=self.fd)
        self.memory.add_region(0x1000, 0x1000, fd=self.fd)
        with self.assertRaises(GuestMemoryError):
            self.memory.remove_region(0x0, 0x2000)
        self.memory.remove_region(0x0, 0x1000)
        with self.assertRaises(GuestMemoryError):
            self.memory.view(0x0, 1)
        self.assertEqual(len(self.memory.view(0x1000, 1)), 1)
        self.assertGreater(self.memory.generation, before + 2)

    def test_uva_translation(self):
        self.memory.add_region(0x0, 0x1000, fd=self.fd, uva=0x7f00_0000_0000)
        self.memory.add_region(0x100000, 0x1000, fd=self.fd, uva=0x5500_0000_0000)
        self.assertEqual(self.memory.gpa_for_uva(0x7f00_0000_0010), 0x10)
        self.assertEqual(self.memory.gpa_for_uva(0x5500_0000_0ff0, 0x10), 0x100ff0)
        with self.assertRaises(GuestMemoryError):
            self.memory.gpa_for_uva(0x5500_0000_0ff0, 0x11)
        with self.assertRaises(GuestMemoryError):
            self.memory.gpa_for_uva(0x1234)

    def test_hundreds_of_regions(self):
        rng = seeded_random(self)
        order = list(range(MAX_MEM_SLOTS))
        rng.shuffle(order)
        for i in order:
            self.memory.add_region(i * 0x2000, 0x1000, fd=self.fd, mmap_offset=(i % 200) * 0x1000)
        with self.assertRaises(GuestMemoryError):
            self.memory.add_region(1 << 40, 0x1000, fd=self.fd)
        for _ in range(2000):
            i = rng.randrange(MAX_MEM_SLOTS)
            self.assertEqual(self.memory.region_at(i * 0x2000 + 5).gpa, i * 0x2000)
            with self.assertRaises(GuestMemoryError):
                self.memory.region_at(i * 0x2000 + 0x1000)
        for i in order[:300]:
            self.memory.remove_region(i * 0x2000, 0x1000)
        self.assertEqual(len(self.memory.regions), MAX_MEM_SLOTS - 300)

    def test_no_fd_leak(self):
        before = open_fds()
        memory = GuestMemory()
        for i in range(20):
            memory.add_region(i * 0x1000, 0x1000, fd=self.fd)
        with self.assertRaises(GuestMemoryError):
            memory.add_region(0, 0x1000, fd=self.fd)
        memory.clear()
        self.assertEqual(open_fds(), before)


class IOTLBTest(unittest.TestCase):
    def setUp(self):
        self.fd = memfd(1 << 20)
        self.memory = GuestMemory()
        self.memory.add_region(0x0, 1 << 20, fd=self.fd, uva=0x7f00_0000_0000)
        self.tlb = IOTLB(self.memory)

    def tearDown(self):
        self.tlb = None
        self.memory.clear()
        os.close(self.fd)

    def test_translation_and_permissions(self):
        self.tlb.update(0xA000_0000, 0x2000, 0x7f00_0000_4000, VHOST_ACCESS_RO)
        self.tlb.update(0xB000_0000, 0x1000, 0x7f00_0000_8000, VHOST_ACCESS_WO)
        self.memory.write(0x4010, b"hello")
        self.assertEqual(bytes(self.tlb.view(0xA000_0010, 5)), b"hello")
        self.tlb.view(0xB000_0000, 16, write=True)[:5] = b"world"
        self.assertEqual(self.memory.read(0x8000, 5), b"world")
        with self.assertRaises(IOTLBMiss) as cm:
            self.tlb.view(0xA000_0000, 1, write=True)
        self.assertEqual(cm.exception.iova, 0xA000_0000)
        with self.assertRaises(IOTLBMiss):
            self.tlb.view(0xB000_0000, 1)
        with self.assertRaises(IOTLBMiss):
            self.tlb.view(0xA000_1ff0, 0x20)
        self.assertIsInstance(cm.exception, GuestMemoryError)

    def test_invalidate_trims(self):
        self.tlb.update(0x10000, 0x3000, 0x7f00_0000_0000, VHOST_ACCESS_RW)
        self.tlb.invalidate(0x11000, 0x1000)
        self.assertEqual(len(self.tlb.view(0x10000, 0x1000)), 0x1000)
        self.assertEqual(len(self.tlb.view(0x12000, 0x1000)), 0x1000)
        with self.assertRaises(IOTLBMiss):
            self.tlb.view(0x11800, 1)
        # A buffer crossing two entries comes back as two segments.
        self.tlb.update(0x11000, 0x1000, 0x7f00_0000_9000, VHOST_ACCESS_RW)
        self.assertEqual([len(s) for s in self.tlb.segments(0x10ff0, 0x20)], [0x10, 0x10])

    def test_page_sized_entries_join_into_one_view_where_contiguous(self):
        """A vIOMMU maps a 16 KiB descriptor table (queue size 1024) as four 4 KiB entries: one
        view over all four when they are contiguous in memory, a clear refusal when they are not."""
        base = 0x8000_0000
        for page in range(4):
            self.tlb.update(base + page * 0x1000, 0x1000, 0x7f00_0000_0000 + 0x20000 + page * 0x1000,
                            VHOST_ACCESS_RW)
        view = self.tlb.view(base + 0x10, 0x3ff0, write=True)
        self.assertEqual(len(view), 0x3ff0)
        view[0xff0:0x1010] = b"x" * 0x20                     # across an entry boundary
        self.assertEqual(self.memory.read(0x20000 + 0x1000, 0x10), b"x" * 0x10)
        self.assertEqual(view.cast("H")[0], 0)               # a ring can cast it
        self.assertEqual(len(self.tlb), 4)
        # Not contiguous in memory (pages swapped): refused, never a view of the wrong bytes.
        self.tlb.update(base + 0x1000, 0x1000, 0x7f00_0000_0000 + 0x50000, VHOST_ACCESS_RW)
        with self.assertRaisesRegex(GuestMemoryError, "not contiguous in memory"):
            self.tlb.view(base, 0x2000)
        self.assertEqual(len(self.tlb.segments(base, 0x2000)), 2)   # buffers still work as segments

    def test_gpa_ranges_for_the_dirty_log(self):
        self.tlb.update(0x10000, 0x1000, 0x7f00_0000_5000, VHOST_ACCESS_RW)
        self.tlb.update(0x11000, 0x1000, 0x7f00_0000_2000, VHOST_ACCESS_RW)
        self.assertEqual(self.tlb.gpa_ranges(0x10800, 0x1000), [(0x5800, 0x800), (0x2000, 0x800)])
        self.tlb.invalidate(0x10000, 0x900)                  # trimmed: its gpa moves with it
        self.assertEqual(self.tlb.gpa_ranges(0x10a00, 0x10), [(0x5a00, 0x10)])
        with self.assertRaises(IOTLBMiss):
            self.tlb.gpa_ranges(0x10000, 1)

    def test_invalidate_touches_only_what_it_covers(self):
        """Thousands of page entries (a vIOMMU's steady state): invalidating one page leaves the
        others as they were, and costs a bisect, not a rebuild of the table."""
        for page in range(4096):
            self.tlb.update(page << 12, 0x1000, 0x7f00_0000_0000 + ((page % 256) << 12), VHOST_ACCESS_RW)
        entries = list(self.tlb._entries)
        self.tlb.invalidate(100 << 12, 0x1000)
        self.assertEqual(len(self.tlb), 4095)
        self.assertEqual(self.tlb._entries, entries[:100] + entries[101:])
        self.assertIs(self.tlb._entries[100], entries[101])   # untouched entries are the same objects
        self.tlb.invalidate(0x50, 0x10)                      # inside an entry: split in two
        self.assertEqual([(e[0], e[1]) for e in self.tlb._entries[:2]], [(0, 0x50), (0x60, 0x1000)])
        self.tlb.invalidate(1 << 40, 0x1000)                 # nothing there: nothing changes
        self.assertEqual(len(self.tlb), 4096)

    def test_bad_updates(self):
        with self.assertRaises(GuestMemoryError):
            self.tlb.update(0x0, 0x1000, 0x1234, VHOST_ACCESS_RW)         # uaddr outside memory
        with self.assertRaises(GuestMemoryError):
            self.tlb.update(0x0, 0x1000, 0x7f00_0000_0000, 0)              # no permission
        with self.assertRaises(GuestMemoryError):
            self.tlb.update(0x0, 2 << 20, 0x7f00_0000_0000, VHOST_ACCESS_RW)


class DirtyLogTest(unittest.TestCase):
    def test_marks_pages(self):
        buf = bytearray(16)
        log = DirtyLog(memoryview(buf))
        log.mark(0x1000, 0x9000)            # pages 1..9
        self.assertEqual(buf[:3], bytes([0xFE, 0x03, 0x00]))
        log.mark(0x10fff, 2)                # pages 16 and 17
        self.assertEqual(buf[2], 0x03)
        log.mark(0x40000, 0x40000)          # pages 64..127: whole bytes
        self.assertEqual(buf[8:16], b"\xff" * 8)
        self.assertTrue(log.is_dirty(0x9fff))
        self.assertFalse(log.is_dirty(0xa000))
        log.mark(0x0, 0)                    # nothing
        self.assertFalse(log.is_dirty(0x0))
        with self.assertRaises(GuestMemoryError):
            log.mark(0x80000, 1)            # beyond what 16 bytes of log cover
        log.close()

    def test_atomic_or_from_two_processes(self):
        """Two processes set different bits of the same bytes; no bit is ever lost."""
        fd = memfd(4096)
        log = DirtyLog.from_fd(fd, 64)
        pid = os.fork()
        if pid == 0:
            try:
                for _ in range(3):
                    for page in range(0, 512, 2):       # even pages
                        log.mark(page * 0x1000, 1)
                os._exit(0)
            except BaseException:
                os._exit(1)
        for _ in range(3):
            for page in range(1, 512, 2):               # odd pages
                log.mark(page * 0x1000, 1)
        _, status = os.waitpid(pid, 0)
        self.assertEqual(status, 0)
        self.assertEqual(os.pread(fd, 64, 0), b"\xff" * 64)
        log.close()
        os.close(fd)


class BarrierTest(unittest.TestCase):
    def test_barriers_run(self):
        b = barriers()
        b.full()
        for fn in (b.read, b.write):
            if fn is not None:
                fn()
        cell = ctypes.create_string_buffer(1)
        b.atomic_or8(ctypes.addressof(cell), 0x21)
        b.atomic_or8(ctypes.addressof(cell), 0x84)
        self.assertEqual(cell.raw, b"\xa5")
        self.assertTrue(b.how)

    def test_the_code_page_is_never_writable_and_executable(self):
        """W^X: the barrier code runs from a read-execute page; no mapping of this process is
        both writable and executable because of us."""
        b = barriers()
        if not b.how.startswith("machine code"):
            self.skipTest(f"the barriers are {b.how}")
        address = ctypes.cast(b.full, ctypes.c_void_p).value
        with open("/proc/self/maps") as f:
            maps = [line.split() for line in f]
        holding = [m for m in maps if int(m[0].split("-")[0], 16) <= address < int(m[0].split("-")[1], 16)]
        self.assertEqual(len(holding), 1, holding)
        self.assertEqual(holding[0][1][:3], "r-x", holding[0])

    def test_where_exec_is_refused_the_fallbacks_serve(self):
        """mprotect(PROT_EXEC) refused (SELinux execmem, a hardened kernel): no machine code, the
        next mechanism takes over; without an atomic at all the dirty log is refused, not racy."""
        from vhost_min import memory
        with mock.patch.object(memory, "libc", mock.Mock(wraps=memory.libc)) as libc:
            libc.mprotect.return_value = -1
            self.assertIsNone(memory._machine_code_barriers())
        membarrier_only = memory._membarrier_barriers()
        membarrier_only.full()                                  # still a full barrier
        self.assertIsNone(membarrier_only.atomic_or8)
        with mock.patch.object(memory, "_barriers", membarrier_only):
            with self.assertRaises(NotSupportedError) as caught:
                DirtyLog(memoryview(bytearray(64)))
            self.assertIn("atomic byte OR", str(caught.exception))

    def test_store_buffering_litmus(self):
        """Dekker's store-buffering test, both sides racing from the same instant: each stores its
        flag, calls the barrier, loads the other's flag. Under sequential consistency at least one
        side sees the other's store; x86-64 lets a load pass an earlier store still in the store
        buffer, so without a full barrier both can read the old value. The control run, with a
        no-op in the barrier's place, must show that happen: it proves the test can fail."""
        if not _X86_64:
            self.skipTest("the litmus loop is x86-64 code (rdtsc, pause)")
        full = barriers()
        if not full.how.startswith("machine code"):
            self.skipTest(f"the barrier is {full.how}, not a C function a C loop can call")
        require_commands("gcc", install="apt-get install -y gcc")
        with tempfile.TemporaryDirectory(prefix="vhost_min-litmus-") as tmp:
            source, library = os.path.join(tmp, "litmus.c"), os.path.join(tmp, "litmus.so")
            with open(source, "w") as f:
                f.write(_LITMUS_C)
            subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", library, source], check=True, timeout=60,
                           capture_output=True)
            lib = ctypes.CDLL(library)
        lib.now.restype = ctypes.c_ulonglong
        fence = ctypes.cast(full.full, ctypes.c_void_p).value
        no_fence = ctypes.cast(lib.no_fence, ctypes.c_void_p).value
        reordered = [_store_buffering(lib, no_fence) for _ in range(3)]
        for _ in range(20):             # on a loaded machine the two sides may not run at once
            if any(reordered):
                break
            reordered.append(_store_buffering(lib, no_fence))
        if not any(reordered):
            # Both sides never ran at the same instant (other work on every core): without a control
            # that fails, a pass would prove nothing. In CI (nothing else running) that is a failure.
            message = f"the no-op control showed no reordering in {len(reordered)} runs (a loaded machine?)"
            if IN_CI:
                self.fail(message)
            self.skipTest(message)
        self.assertEqual([_store_buffering(lib, fence) for _ in range(3)], [0, 0, 0])


#: Each side waits for round r's start on the time-stamp counter (the same instant on both cores),
#: stores r in its flag, calls ``fence``, and records whether the other flag had reached r.
_LITMUS_C = r"""
typedef void (*fence_fn)(void);
void no_fence(void) {}
static inline unsigned long long tsc(void) {
    unsigned int lo, hi;
    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
    return ((unsigned long long)hi << 32) | lo;
}
unsigned long long now(void) { return tsc(); }
void side(unsigned long long start, unsigned long long step, volatile int *mine, volatile int *other,
          unsigned char *saw, int rounds, fence_fn fence) {
    for (int r = 1; r <= rounds; r++) {
        while (tsc() < start + step * r) __asm__ __volatile__("pause");
        *mine = r;
        fence();
        saw[r] = *other >= r;
    }
}
"""

_X86_64 = os.uname().machine == "x86_64"


def _store_buffering(lib: ctypes.CDLL, fence: int, rounds: int = 200_000) -> int:
    """Rounds in which both sides missed the other's store (forbidden with a full barrier)."""
    shm = mmap.mmap(-1, 4096 + 2 * (rounds + 1))
    base = ctypes.addressof(ctypes.c_char.from_buffer(shm))
    flags = (base, base + 128)                  # two cache lines
    saw = (base + 4096, base + 4096 + rounds + 1)
    start = lib.now() + 20_000_000              # a few ms: both children are running by then
    pids = []
    try:
        for side in (0, 1):
            pid = os.fork()
            if pid == 0:
                try:
                    lib.side(ctypes.c_ulonglong(start), ctypes.c_ulonglong(3000), ctypes.c_void_p(flags[side]),
                             ctypes.c_void_p(flags[1 - side]), ctypes.c_void_p(saw[side]), rounds,
                             ctypes.c_void_p(fence))
                finally:
                    os._exit(0)
            pids.append(pid)
    finally:
        for pid in pids:
            os.waitpid(pid, 0)
    a, b = shm[4096:4096 + rounds + 1], shm[4096 + rounds + 1:4096 + 2 * (rounds + 1)]
    missed = sum(1 for r in range(1, rounds + 1) if not a[r] and not b[r])
    del base
    shm.close()
    return missed

if __name__ == "__main__":
    unittest.main()
