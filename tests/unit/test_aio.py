"""vhost_min.aio: the io_uring facts against the compiler's reading of linux/io_uring.h, and both
engines (io_uring, thread pool) doing real file I/O: bytes checked with os.pread, completions
matched to their tokens, more operations than the ring has slots, multi-view reads and writes,
fdatasync, errors as -errno."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import subprocess
import tempfile
import unittest

from tests.support import open_fds, require, seeded_random
from vhost_min import aio

HEADER = "/usr/include/linux/io_uring.h"


class HeaderFactsTest(unittest.TestCase):
    def test_layouts_and_numbers_match_the_compiler(self):
        cc = shutil.which("cc") or shutil.which("gcc")
        require(bool(cc) and os.path.exists(HEADER), f"a C compiler and {HEADER}",
                "apt-get install -y gcc linux-libc-dev")
        sqe = ("opcode", "flags", "ioprio", "fd", "off", "addr", "len", "rw_flags", "user_data", "buf_index",
               "personality", "splice_fd_in", "addr3")
        program = ("#include <stddef.h>\n#include <stdio.h>\n#include <sys/syscall.h>\n#include <linux/io_uring.h>\n"
                   "int main(void) {\n")
        for field in sqe:
            program += f'printf("sqe.{field} %zu\\n", offsetof(struct io_uring_sqe, {field}));\n'
        for struct_name, ctype in (("io_uring_params", aio.io_uring_params), ("io_sqring_offsets",
                                   aio.io_sqring_offsets), ("io_cqring_offsets", aio.io_cqring_offsets)):
            for field, _ in ctype._fields_:
                cfield = "resv2" if field == "user_addr" and struct_name != "io_uring_params" else field
                program += (f'printf("{struct_name}.{field} %zu\\n", '
                            f'offsetof(struct {struct_name}, {cfield}));\n')
        sizes = {"io_uring_sqe": aio.IO_URING_SQE.size, "io_uring_cqe": aio.IO_URING_CQE.size,
                 "io_uring_params": 120}
        for name in sizes:
            program += f'printf("sizeof.{name} %zu\\n", sizeof(struct {name}));\n'
        numbers = {name: int(getattr(aio, name)) for name in (
            "IORING_FSYNC_DATASYNC", "IORING_ENTER_GETEVENTS", "IORING_SETUP_CQSIZE", "IORING_FEAT_SINGLE_MMAP",
            "IORING_FEAT_NODROP", "IORING_REGISTER_EVENTFD", "IORING_OFF_SQ_RING", "IORING_OFF_CQ_RING",
            "IORING_OFF_SQES")}
        numbers.update({op.name: int(op) for op in aio.IoUringOp})
        numbers.update({f"__NR_io_uring_{n}": getattr(aio, f"SYS_io_uring_{n}") for n in ("setup", "enter", "register")})
        for name in numbers:
            program += f'printf("{name} %llu\\n", (unsigned long long)({name}));\n'
        program += "return 0; }\n"
        with tempfile.TemporaryDirectory() as work:
            src, exe = os.path.join(work, "layout.c"), os.path.join(work, "layout")
            with open(src, "w") as f:
                f.write(program)
            built = subprocess.run([cc, "-o", exe, src], capture_output=True, text=True)
            self.assertEqual(built.returncode, 0, built.stderr)
            out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout.split("\n")
        got = {k: int(v) for k, v in (line.split(" ", 1) for line in out if line)}
        ours = {f"sqe.{field}": offset for field, offset in zip(sqe, (0, 1, 2, 4, 8, 16, 24, 28, 32, 40, 42, 44, 48))}
        for struct_name, ctype in (("io_uring_params", aio.io_uring_params), ("io_sqring_offsets",
                                   aio.io_sqring_offsets), ("io_cqring_offsets", aio.io_cqring_offsets)):
            for field, _ in ctype._fields_:
                ours[f"{struct_name}.{field}"] = getattr(ctype, field).offset
        ours.update({f"sizeof.{name}": size for name, size in sizes.items()})
        ours.update(numbers)
        self.assertEqual(got, ours)
        # the SQE struct's field order is the one IO_URING_SQE packs
        packed = aio.IO_URING_SQE.pack(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 0)
        self.assertEqual((packed[0], packed[1], packed[24:28], packed[32:40]),
                         (1, 2, (7).to_bytes(4, "little"), (9).to_bytes(8, "little")))


class EngineTestCase(unittest.TestCase):
    """Each engine against a temporary file on the disk (O_DIRECT where it opens)."""

    def setUp(self):
        fds = open_fds()
        self.addCleanup(lambda: self.assertEqual(open_fds(), fds, "fd leak"))
        self.rng = seeded_random(self)
        fd, self.path = tempfile.mkstemp(prefix="vhost-min-aio-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
        os.write(fd, self.rng.randbytes(1 << 20))
        os.close(fd)
        self.addCleanup(os.unlink, self.path)

    def engines(self):
        made = [("threads", lambda: aio.ThreadEngine(4))]
        if aio.io_uring_available()[0]:
            made.insert(0, ("io_uring", lambda: aio.UringEngine(4)))      # 4 slots: the rest must wait
        return made

    def test_many_operations_through_few_slots(self):
        for name, make in self.engines():
            with self.subTest(engine=name):
                engine = make()
                fd = os.open(self.path, os.O_RDWR)
                try:
                    buffers = [memoryview(mmap.mmap(-1, 8192)) for _ in range(20)]
                    expect = {}
                    for i, buf in enumerate(buffers):          # writes of two views each (WRITEV)
                        data = self.rng.randbytes(8192)
                        buf[:] = data
                        expect[i] = data
                        engine.submit(aio.OP_WRITE, fd, i * 8192, [buf[:4096], buf[4096:]], 0, ("w", i))
                    engine.commit()
                    done = engine.drain()
                    self.assertEqual(sorted(done), sorted((("w", i), 8192) for i in range(20)))
                    engine.submit(aio.OP_FSYNC, fd, 0, [], 0, "sync")
                    engine.commit()
                    self.assertEqual(engine.drain(), [("sync", 0)])
                    for i in range(20):
                        self.assertEqual(os.pread(fd, 8192, i * 8192), expect[i])
                    for buf in buffers:
                        buf[:] = bytes(8192)
                    for i, buf in enumerate(buffers):          # reads of one view (READ)
                        engine.submit(aio.OP_READ, fd, (19 - i) * 8192, [buf], 0, i)
                    engine.commit()
                    self.assertEqual(sorted(engine.drain()), [(i, 8192) for i in range(20)])
                    for i, buf in enumerate(buffers):
                        self.assertEqual(bytes(buf), expect[19 - i])
                    self.assertEqual(engine.in_flight, 0)
                    del buf, buffers
                finally:
                    engine.close()
                    os.close(fd)

    def test_errors_come_back_as_negative_errno(self):
        for name, make in self.engines():
            with self.subTest(engine=name):
                engine = make()
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    buf = memoryview(mmap.mmap(-1, 4096))
                    engine.submit(aio.OP_WRITE, fd, 0, [buf], 0, "w")    # the fd is read-only
                    engine.commit()
                    self.assertEqual(engine.drain(), [("w", -errno.EBADF)])
                    del buf
                finally:
                    engine.close()
                    os.close(fd)

    def test_an_operation_refused_at_submit_is_not_left_in_flight(self):
        """A read into a read-only buffer raises at submit; nothing reached the ring, so drain()
        returns at once (it used to wait forever for a completion that could never come)."""
        if not aio.io_uring_available()[0]:
            self.skipTest("io_uring is not available here")
        engine = aio.UringEngine(4)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            with self.assertRaises(TypeError):
                engine.submit(aio.OP_READ, fd, 0, [memoryview(bytes(4096))], 0, "read-only")
            self.assertEqual((engine.in_flight, engine.drain()), (0, []))
            buf = memoryview(mmap.mmap(-1, 4096))
            for n in range(4):                        # every slot is still there
                engine.submit(aio.OP_READ, fd, n * 4096, [buf], 0, n)
            engine.commit()
            self.assertEqual(sorted(engine.drain()), [(n, 4096) for n in range(4)])
            del buf
        finally:
            engine.close()
            os.close(fd)

    def test_the_eventfd_says_when_to_reap(self):
        import select
        for name, make in self.engines():
            with self.subTest(engine=name):
                engine = make()
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    buf = memoryview(mmap.mmap(-1, 4096))
                    engine.submit(aio.OP_READ, fd, 4096, [buf], 0, "r")
                    engine.commit()
                    self.assertTrue(select.select([engine.fileno()], [], [], 10)[0])
                    engine.clear_signal()
                    got = engine.reap()
                    while not got:                    # a wake-up left from earlier finds nothing
                        select.select([engine.fileno()], [], [], 10)
                        engine.clear_signal()
                        got = engine.reap()
                    self.assertEqual(got, [("r", 4096)])
                    with open(self.path, "rb") as f:
                        self.assertEqual(bytes(buf), os.pread(f.fileno(), 4096, 4096))
                    del buf
                finally:
                    engine.close()
                    os.close(fd)


if __name__ == "__main__":
    unittest.main()
