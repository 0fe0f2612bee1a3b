"""Asynchronous file I/O for the blk device: io_uring driven through ctypes, and a thread pool of
preadv / pwritev / fdatasync that does the same job where io_uring is absent or refused.

Read top to bottom: the facts of linux/io_uring.h that we use (syscall numbers, opcodes, flags,
``struct io_uring_params`` and the SQE / CQE layouts), :class:`IoUring` (one ring: the SQ and CQ
rings and the SQE array mmap'd and read with struct / memoryview, like the virtqueues), then the
two engines with one interface, :class:`UringEngine` and :class:`ThreadEngine`:

* ``submit(op, fd, offset, views, flags, token)`` queues one operation (READ / WRITE / FSYNC);
  nothing reaches the kernel until ``commit()``, which submits everything queued in one
  io_uring_enter (or one hand-off to the workers): a kick's worth of requests is one system call.
* ``fileno()`` is an eventfd that becomes readable when operations complete (the ring's registered
  eventfd, IORING_REGISTER_EVENTFD; the pool's own); the owner watches it in its event loop and
  calls ``reap()``, which returns every completion there is as ``(token, result)``: the bytes moved,
  or ``-errno``, as a CQE's ``res``.
* ``ready()`` says without a system call whether ``reap()`` has something (for a loop that
  busy-polls before it sleeps); ``wait()`` blocks until at least one operation completes
  (draining a queue that stops).

Operations complete in whatever order the disk finishes them. Views must stay valid until their
operation is reaped: the kernel (or a worker) reads and writes them in place.
"""

from __future__ import annotations

import collections
import ctypes
import enum
import errno
import logging
import mmap
import os
import select
import struct
import threading
from collections.abc import Sequence

from .errors import VhostError
from .memory import address_of, barriers, libc

__all__ = ["IoUringOp", "IoUring", "IoUringError", "UringEngine", "ThreadEngine", "OP_READ", "OP_WRITE",
           "OP_FSYNC", "io_uring_available"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# linux/io_uring.h
# --------------------------------------------------------------------------------------------

# System call numbers (glibc sys/syscall.h spells them SYS_*): the same on x86-64 and aarch64 (and every other architecture): new system
# calls share one numbering since 5.1 (asm-generic/unistd.h; arch/x86/entry/syscalls/syscall_64.tbl).
SYS_io_uring_setup = 425
SYS_io_uring_enter = 426
SYS_io_uring_register = 427


class IoUringOp(enum.IntEnum):
    """io_uring_sqe.opcode (enum io_uring_op), the ones we use; the gaps are other operations."""

    IORING_OP_NOP = 0
    IORING_OP_READV = 1
    IORING_OP_WRITEV = 2
    IORING_OP_FSYNC = 3
    IORING_OP_READ = 22           # 5.6: one buffer, no iovec
    IORING_OP_WRITE = 23


IORING_FSYNC_DATASYNC = 1 << 0          #: fsync_flags: fdatasync rather than fsync
IORING_ENTER_GETEVENTS = 1 << 0         #: io_uring_enter: wait for min_complete completions
IORING_SETUP_CQSIZE = 1 << 3            #: io_uring_params.cq_entries is ours to choose
IORING_FEAT_SINGLE_MMAP = 1 << 0        #: the SQ and CQ rings share one mapping (5.4)
IORING_FEAT_NODROP = 1 << 1             #: completions past a full CQ are kept, not dropped (5.5)
IOSQE_ASYNC = 1 << 4                    #: io_uring_sqe.flags: issue from an io-wq worker, never inline (5.6)
IORING_REGISTER_EVENTFD = 4             #: io_uring_register: signal this eventfd on completions
IORING_OFF_SQ_RING = 0                  #: mmap offsets of the three areas
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000


class io_sqring_offsets(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32), ("ring_mask", ctypes.c_uint32),
                ("ring_entries", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("dropped", ctypes.c_uint32),
                ("array", ctypes.c_uint32), ("resv1", ctypes.c_uint32), ("user_addr", ctypes.c_uint64)]


class io_cqring_offsets(ctypes.Structure):
    _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32), ("ring_mask", ctypes.c_uint32),
                ("ring_entries", ctypes.c_uint32), ("overflow", ctypes.c_uint32), ("cqes", ctypes.c_uint32),
                ("flags", ctypes.c_uint32), ("resv1", ctypes.c_uint32), ("user_addr", ctypes.c_uint64)]


class io_uring_params(ctypes.Structure):
    _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("sq_thread_cpu", ctypes.c_uint32), ("sq_thread_idle", ctypes.c_uint32),
                ("features", ctypes.c_uint32), ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                ("sq_off", io_sqring_offsets), ("cq_off", io_cqring_offsets)]


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


#: struct io_uring_sqe (64 bytes): opcode, flags, ioprio, fd, off, addr, len, rw_flags (the union
#: holding fsync_flags too), user_data, buf_index, personality, splice_fd_in, addr3, __pad2[1]
IO_URING_SQE = struct.Struct("<BBHiQQIIQHHiQQ")
#: struct io_uring_cqe: user_data, res, flags
IO_URING_CQE = struct.Struct("<QiI")
assert IO_URING_SQE.size == 64 and IO_URING_CQE.size == 16 and ctypes.sizeof(io_uring_params) == 120

_syscall = libc.syscall
_syscall.restype = ctypes.c_long


class IoUringError(VhostError):
    """io_uring_setup / io_uring_enter / io_uring_register failed (``errno`` kept)."""


# --------------------------------------------------------------------------------------------
# One ring
# --------------------------------------------------------------------------------------------

class IoUring:
    """One io_uring instance: ``entries`` SQEs, twice as many CQEs. :meth:`prep` fills SQEs,
    :meth:`submit` hands them to the kernel in one io_uring_enter, :meth:`reap` reads the CQEs."""

    def __init__(self, entries: int = 128) -> None:
        params = io_uring_params(flags=IORING_SETUP_CQSIZE, cq_entries=2 * entries)
        fd = _syscall(SYS_io_uring_setup, ctypes.c_uint(entries), ctypes.byref(params))
        if fd < 0:
            err = ctypes.get_errno()
            raise IoUringError(f"io_uring_setup({entries}): {os.strerror(err)}", err)
        self.fd = fd
        self._maps: list[mmap.mmap] = []
        try:
            self._map(params)
        except BaseException:
            self.close()
            raise
        self.features = params.features
        self.sq_entries, self.cq_entries = params.sq_entries, params.cq_entries
        b = barriers()
        self._mb, self._rmb = b.full, b.read

    def _map(self, p: io_uring_params) -> None:
        sq_size = p.sq_off.array + p.sq_entries * 4
        cq_size = p.cq_off.cqes + p.cq_entries * IO_URING_CQE.size
        shared = bool(p.features & IORING_FEAT_SINGLE_MMAP)
        if shared:
            sq_size = cq_size = max(sq_size, cq_size)
        prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        sq = mmap.mmap(self.fd, sq_size, flags, prot, offset=IORING_OFF_SQ_RING)
        self._maps.append(sq)
        cq = sq if shared else mmap.mmap(self.fd, cq_size, flags, prot, offset=IORING_OFF_CQ_RING)
        if not shared:
            self._maps.append(cq)
        sqes = mmap.mmap(self.fd, p.sq_entries * IO_URING_SQE.size, flags, prot, offset=IORING_OFF_SQES)
        self._maps.append(sqes)
        self._sq32 = memoryview(sq).cast("I")
        self._cq32 = memoryview(cq).cast("I")
        self._cq = memoryview(cq)
        self._sqes = memoryview(sqes)
        so, co = p.sq_off, p.cq_off
        self._sq_tail_i, self._sq_head_i = so.tail // 4, so.head // 4
        self._sq_mask = self._sq32[so.ring_mask // 4]
        self._cq_head_i, self._cq_tail_i = co.head // 4, co.tail // 4
        self._cq_mask = self._cq32[co.ring_mask // 4]
        self._cqes = co.cqes
        # The SQ array maps ring slots to SQE indexes: the identity, once, so an SQE is written
        # at its ring slot and publishing is one store of the tail.
        array = so.array // 4
        for i in range(p.sq_entries):
            self._sq32[array + i] = i
        self._tail = self._sq32[self._sq_tail_i]
        self._submitted = self._tail           # the tail the kernel has seen

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        for view in ("_sq32", "_cq32", "_cq", "_sqes"):
            v = self.__dict__.pop(view, None)
            if v is not None:
                v.release()
        for m in self._maps:
            m.close()
        self._maps = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def register_eventfd(self, efd: int) -> None:
        """IORING_REGISTER_EVENTFD: ``efd`` is signalled whenever a CQE is posted."""
        arg = ctypes.c_int32(efd)
        if _syscall(SYS_io_uring_register, self.fd, IORING_REGISTER_EVENTFD, ctypes.byref(arg), 1) < 0:
            err = ctypes.get_errno()
            raise IoUringError(f"io_uring_register(IORING_REGISTER_EVENTFD): {os.strerror(err)}", err)

    @property
    def sq_space(self) -> int:
        """SQEs that can be prepared before the next :meth:`submit`."""
        return self.sq_entries - (self._tail - self._sq32[self._sq_head_i]) % (1 << 32)

    #: io_uring_sqe.flags of every SQE prepared (IOSQE_ASYNC: never issued inline).
    sqe_flags = 0

    def prep(self, opcode: int, fd: int, addr: int, length: int, offset: int, rw_flags: int, user_data: int) -> None:
        """Fill the next SQE (the caller keeps at most :attr:`sq_entries` prepared, see
        :attr:`sq_space`); not yet visible to the kernel."""
        tail = self._tail
        IO_URING_SQE.pack_into(self._sqes, (tail & self._sq_mask) * 64, opcode, self.sqe_flags, 0, fd, offset, addr,
                               length, rw_flags, user_data, 0, 0, 0, 0, 0)
        self._tail = (tail + 1) & 0xFFFFFFFF

    def submit(self, wait: int = 0) -> int:
        """Publish the prepared SQEs (the tail store: io_uring_enter is the barrier) and enter the
        kernel once: submit them, and with ``wait`` block until that many completions exist."""
        n = (self._tail - self._submitted) % (1 << 32)
        if not n and not wait:
            return 0
        self._sq32[self._sq_tail_i] = self._tail
        while True:
            got = _syscall(SYS_io_uring_enter, self.fd, n, wait, IORING_ENTER_GETEVENTS if wait else 0, None, 0)
            if got >= 0:
                break
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise IoUringError(f"io_uring_enter(to_submit={n}, min_complete={wait}): {os.strerror(err)}", err)
        self._submitted = (self._submitted + got) % (1 << 32)
        return got

    def ready(self) -> bool:
        """A CQE is waiting (two loads, no system call: for a loop that busy-polls)."""
        cq32 = self._cq32
        return cq32[self._cq_head_i] != cq32[self._cq_tail_i]

    def reap(self) -> list[tuple[int, int]]:
        """Every CQE there is, as (user_data, res), and the CQ head moved past them."""
        cq32, head_i = self._cq32, self._cq_head_i
        head = cq32[head_i]
        tail = cq32[self._cq_tail_i]
        if head == tail:
            return []
        if self._rmb is not None:     # the CQEs after the tail the kernel stored behind them
            self._rmb()
        cq, mask, base, unpack = self._cq, self._cq_mask, self._cqes, IO_URING_CQE.unpack_from
        out = []
        while head != tail:
            user_data, res, _ = unpack(cq, base + (head & mask) * 16)
            out.append((user_data, res))
            head = (head + 1) & 0xFFFFFFFF
        self._mb()                    # our CQE loads before the head store that frees them
        cq32[head_i] = head
        return out


_available: tuple[bool, str] | None = None


def io_uring_available() -> tuple[bool, str]:
    """(True, "") when this process may set up an io_uring, else (False, why): ENOSYS on old
    kernels, EPERM under seccomp or sysctl kernel.io_uring_disabled. Asked once."""
    global _available
    if _available is None:
        try:
            IoUring(4).close()
            _available = (True, "")
        except IoUringError as exc:
            _available = (False, str(exc))
    return _available


# --------------------------------------------------------------------------------------------
# The engines
# --------------------------------------------------------------------------------------------

OP_READ, OP_WRITE, OP_FSYNC = 0, 1, 2       #: what an engine is asked to do


class UringEngine:
    """Operations through one io_uring: SQEs prepared by :meth:`submit`, one io_uring_enter per
    :meth:`commit`; completions signal :meth:`fileno`. At most ``entries`` are in flight (the CQ
    has room for twice that); the rest wait in submission order and go in as others complete.

    io_uring_enter first tries each operation inline, trusting the file to return -EAGAIN rather
    than block; a file system that blocks anyway holds up the caller's loop (a FUSE file with
    direct I/O does: io_uring_enter -> fuse_direct_IO -> request_wait_answer, seen on Linux 6.18).
    ``force_async`` marks every SQE IOSQE_ASYNC: issued by the kernel's io-wq workers, never inline."""

    name = "io_uring"
    #: Most views one operation may have (an iovec array per SQE slot); the caller bounces more.
    max_views = 256

    def __init__(self, entries: int = 128, *, force_async: bool = False) -> None:
        self.in_flight = 0
        self._waiting: collections.deque = collections.deque()
        self.ring = IoUring(entries)
        if force_async:
            self.ring.sqe_flags = IOSQE_ASYNC
        self._efd = -1
        try:
            self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.ring.register_eventfd(self._efd)
        except BaseException:
            self.close()
            raise
        n = self.ring.sq_entries
        self._iovecs = (iovec * (n * self.max_views))()
        self._iov_base = ctypes.addressof(self._iovecs)
        self._slots: list[object] = [None] * n        # user_data -> (token, views): kept alive
        self._free = list(range(n - 1, -1, -1))

    def fileno(self) -> int:
        return self._efd

    def close(self) -> None:
        if self.ring.fd >= 0 and self.in_flight:
            self.drain()
        self.ring.close()
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1

    def submit(self, op: int, fd: int, offset: int, views: Sequence[memoryview], flags: int, token: object) -> None:
        """Queue one operation (it reaches the kernel at :meth:`commit`)."""
        if not self._free or self._waiting:
            self._waiting.append((op, fd, offset, views, flags, token))
            return
        self._prep(op, fd, offset, views, flags, token)

    def _prep(self, op, fd, offset, views, flags, token) -> None:
        slot = self._free.pop()
        try:
            self._prep_slot(slot, op, fd, offset, views, flags)
        except BaseException:           # e.g. a read-only buffer: nothing reached the ring
            self._free.append(slot)
            raise
        self._slots[slot] = (token, views)
        self.in_flight += 1

    def _prep_slot(self, slot, op, fd, offset, views, flags) -> None:
        if op == OP_FSYNC:
            self.ring.prep(IoUringOp.IORING_OP_FSYNC, fd, 0, 0, 0, IORING_FSYNC_DATASYNC, slot)
        elif len(views) == 1:
            v = views[0]
            self.ring.prep(IoUringOp.IORING_OP_READ if op == OP_READ else IoUringOp.IORING_OP_WRITE, fd,
                           address_of(v), len(v), offset, flags, slot)
        else:
            base = slot * self.max_views
            iov = self._iovecs
            for i, v in enumerate(views):
                entry = iov[base + i]
                entry.iov_base, entry.iov_len = address_of(v), len(v)
            self.ring.prep(IoUringOp.IORING_OP_READV if op == OP_READ else IoUringOp.IORING_OP_WRITEV, fd,
                           self._iov_base + base * ctypes.sizeof(iovec), len(views), offset, flags, slot)

    def commit(self) -> None:
        """Submit everything prepared, in one io_uring_enter."""
        self.ring.submit()

    def clear_signal(self) -> None:
        """Reset :meth:`fileno` (before :meth:`reap`, so that a completion after it signals again)."""
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass

    def ready(self) -> bool:
        """A completion is waiting to be reaped (no system call)."""
        return self.ring.ready()

    def reap(self) -> list[tuple[object, int]]:
        """Every completion there is, as (token, res); operations that waited for a slot are
        prepared (the caller commits them)."""
        cqes = self.ring.reap()
        if not cqes:
            return []
        slots, free = self._slots, self._free
        out = []
        for user_data, res in cqes:
            token = slots[user_data][0]
            slots[user_data] = None
            free.append(user_data)
            out.append((token, res))
        self.in_flight -= len(out)
        waiting = self._waiting
        while waiting and free:
            self._prep(*waiting.popleft())
        return out

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def wait(self) -> None:
        """Block until at least one operation has completed (commits what is prepared)."""
        self.ring.submit(wait=1)

    def drain(self) -> list[tuple[object, int]]:
        """Complete everything in flight or waiting; their completions."""
        out = []
        while self.in_flight or self._waiting:
            self.ring.submit()
            self.clear_signal()
            got = self.reap()
            if not got:
                self.wait()
            out += got
        return out


class ThreadEngine:
    """The same interface over a pool of threads running os.preadv / os.pwritev / os.fdatasync
    (they release the GIL, so up to ``workers`` operations are in the kernel at once); each
    completion is queued and :meth:`fileno` (an eventfd) signalled."""

    name = "threads"
    max_views = 1024        # IOV_MAX

    def __init__(self, workers: int = 32) -> None:
        self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._jobs: collections.deque = collections.deque()
        self._batch: list = []
        self._cond = threading.Condition(threading.Lock())
        self._done: list[tuple[object, int]] = []
        self._done_lock = threading.Lock()
        self._closing = False
        self.in_flight = 0
        self.waiting = 0
        self._threads = [threading.Thread(target=self._work, name=f"vhost-min-aio-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def fileno(self) -> int:
        return self._efd

    def submit(self, op: int, fd: int, offset: int, views: Sequence[memoryview], flags: int, token: object) -> None:
        self._batch.append((op, fd, offset, views, flags, token))

    def commit(self) -> None:
        batch, self._batch = self._batch, []
        if batch:
            self.in_flight += len(batch)
            with self._cond:
                self._jobs.extend(batch)
                self._cond.notify(len(batch))

    def _work(self) -> None:
        jobs, cond = self._jobs, self._cond
        while True:
            with cond:
                while not jobs:
                    if self._closing:
                        return
                    cond.wait()
                op, fd, offset, views, flags, token = jobs.popleft()
            try:
                if op == OP_READ:
                    res = os.preadv(fd, views, offset)
                elif op == OP_WRITE:
                    res = os.pwritev(fd, views, offset, flags) if flags else os.pwritev(fd, views, offset)
                else:
                    os.fdatasync(fd)
                    res = 0
            except OSError as exc:
                res = -(exc.errno or errno.EIO)
            with self._done_lock:
                self._done.append((token, res))
                first = len(self._done) == 1
            if first:      # one wake-up per batch the loop has not taken yet
                os.eventfd_write(self._efd, 1)

    def clear_signal(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            pass

    def ready(self) -> bool:
        """A completion is waiting to be reaped (no lock, no system call)."""
        return bool(self._done)

    def reap(self) -> list[tuple[object, int]]:
        with self._done_lock:
            out, self._done = self._done, []
        self.in_flight -= len(out)
        return out

    def wait(self) -> None:
        self.commit()
        select.select([self._efd], [], [])

    def drain(self) -> list[tuple[object, int]]:
        self.commit()
        out = []
        while self.in_flight:
            self.clear_signal()
            got = self.reap()
            if not got:
                self.wait()
            out += got
        return out

    def close(self) -> None:
        if self._efd < 0:
            return
        self.drain()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        os.close(self._efd)
        self._efd = -1
