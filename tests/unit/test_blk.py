"""virtio-blk (vhost_min.blk): the header's facts, every request type against a temporary image
(checked with os.pread of the image file), the device's features and config space, and our
BlkClient against our BlkDevice over a real vhost-user connection."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time
import unittest
from unittest import mock

from tests.support import open_fds, require
from vhost_min import blk
from vhost_min.blk import (SECTOR_SIZE, VIRTIO_BLK_CONFIG, VIRTIO_BLK_CONFIG_OFFSETS, VIRTIO_BLK_DISCARD_WRITE_ZEROES,
                           VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_OUTHDR, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
                           VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
                           VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
                           VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, BlkConfig, BlockImage, VirtioBlkFeature,
                           VirtioBlkStatus, VirtioBlkType)
from vhost_min.backend import Server
from vhost_min.errors import NotNegotiatedError, NotSupportedError, VhostError, VirtqueueError
from vhost_min.frontend import Frontend
from vhost_min.virtio import VIRTIO_F_RING_PACKED, VirtioFeature

HEADER = "/usr/include/linux/virtio_blk.h"

# offsetof(struct virtio_blk_config, field), read off linux/virtio_blk.h (packed, 72 bytes)
GOLDEN_OFFSETS = {
    "capacity": 0, "size_max": 8, "seg_max": 12, "cylinders": 16, "heads": 18, "sectors": 19,
    "blk_size": 20, "physical_block_exp": 24, "alignment_offset": 25, "min_io_size": 26, "opt_io_size": 28,
    "wce": 32, "num_queues": 34, "max_discard_sectors": 36, "max_discard_seg": 40,
    "discard_sector_alignment": 44, "max_write_zeroes_sectors": 48, "max_write_zeroes_seg": 52,
    "write_zeroes_may_unmap": 56, "max_secure_erase_sectors": 60, "max_secure_erase_seg": 64,
    "secure_erase_sector_alignment": 68,
}
C_NAMES = {"cylinders": "geometry.cylinders", "heads": "geometry.heads", "sectors": "geometry.sectors"}



def assert_writethrough(test, flags: list, fdatasync) -> None:
    """A writethrough write asked for RWF_DSYNC; where pwritev2 flags are unsupported (old kernels,
    qemu-user) it was retried without them and followed by fdatasync."""
    test.assertEqual(flags[0], os.RWF_DSYNC)
    if flags[1:]:
        test.assertEqual(flags[1:], [0])
        test.assertTrue(fdatasync.called)

class HeaderFactsTest(unittest.TestCase):
    def test_config_layout_golden(self):
        self.assertEqual(VIRTIO_BLK_CONFIG.size, 72)
        self.assertEqual(VIRTIO_BLK_CONFIG_OFFSETS, GOLDEN_OFFSETS)
        self.assertEqual(VIRTIO_BLK_OUTHDR.size, 16)
        self.assertEqual(VIRTIO_BLK_DISCARD_WRITE_ZEROES.size, 16)
        self.assertEqual(VIRTIO_BLK_ID_BYTES, 20)

    def test_config_pack_places_each_field_at_its_offset(self):
        for i, name in enumerate(BlkConfig._fields):
            packed = BlkConfig(**{name: 1}).pack()
            self.assertEqual(packed.index(1), GOLDEN_OFFSETS[name], name)
            self.assertEqual(BlkConfig.unpack(packed), BlkConfig(**{name: 1}))
        self.assertEqual(BlkConfig.unpack(BlkConfig(capacity=7, seg_max=3).pack()[:16]),
                         BlkConfig(capacity=7, seg_max=3))

    def test_constants_match_the_header(self):
        require(os.path.exists(HEADER), HEADER, "apt-get install -y linux-libc-dev")
        with open(HEADER) as f:
            defines = dict(re.findall(r"^#define\s+(VIRTIO_BLK_\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", f.read(), re.M))
        features = {k: int(v, 0) for k, v in defines.items() if k.startswith("VIRTIO_BLK_F_")}
        self.assertGreaterEqual(len(features), 14)
        for name, bit in features.items():
            self.assertEqual(VirtioBlkFeature[name], 1 << bit, name)
        for name, value in defines.items():
            if name.startswith("VIRTIO_BLK_T_") and name != "VIRTIO_BLK_T_BARRIER":
                self.assertEqual(VirtioBlkType[name], int(value, 0), name)
            elif name.startswith("VIRTIO_BLK_S_"):
                self.assertEqual(VirtioBlkStatus[name], int(value, 0), name)
        self.assertEqual(int(defines["VIRTIO_BLK_ID_BYTES"]), VIRTIO_BLK_ID_BYTES)
        self.assertEqual(int(defines["VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP"], 0), VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)

    def test_layouts_match_the_compiler(self):
        cc = shutil.which("cc") or shutil.which("gcc")
        require(bool(cc) and os.path.exists(HEADER), f"a C compiler and {HEADER}",
                "apt-get install -y gcc linux-libc-dev")
        fields = [(name, C_NAMES.get(name, name)) for name in GOLDEN_OFFSETS]
        program = "#include <stddef.h>\n#include <stdio.h>\n#include <linux/virtio_blk.h>\nint main(void) {\n"
        for name, cname in fields:
            program += f'printf("{name} %zu\\n", offsetof(struct virtio_blk_config, {cname}));\n'
        program += ('printf("sizeof %zu %zu %zu\\n", sizeof(struct virtio_blk_config), '
                    'sizeof(struct virtio_blk_outhdr), sizeof(struct virtio_blk_discard_write_zeroes));\n'
                    "return 0; }\n")
        with tempfile.TemporaryDirectory() as work:
            src, exe = os.path.join(work, "layout.c"), os.path.join(work, "layout")
            with open(src, "w") as f:
                f.write(program)
            subprocess.run([cc, "-o", exe, src], check=True, capture_output=True)
            out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout.split("\n")
        got = dict(line.split(" ", 1) for line in out if line)
        self.assertEqual(got.pop("sizeof"), f"{VIRTIO_BLK_CONFIG.size} {VIRTIO_BLK_OUTHDR.size} "
                                            f"{VIRTIO_BLK_DISCARD_WRITE_ZEROES.size}")
        self.assertEqual({k: int(v) for k, v in got.items()}, VIRTIO_BLK_CONFIG_OFFSETS)


# --------------------------------------------------------------------------------------------
# Requests as chains of bytearray-backed views
# --------------------------------------------------------------------------------------------

def views(*sizes: int) -> list[memoryview]:
    return [memoryview(bytearray(n)) for n in sizes]


def header(type_: int, sector: int = 0, split: tuple[int, ...] = ()) -> list[memoryview]:
    """The 16-byte request header as views, cut at the offsets in ``split``."""
    raw = VIRTIO_BLK_OUTHDR.pack(type_, 0, sector)
    cuts = [0, *split, len(raw)]
    return [memoryview(bytearray(raw[a:b])) for a, b in zip(cuts, cuts[1:])]


@contextlib.contextmanager
def pwritev_flags():
    """Record the flags of every os.pwritev (only the flags: the views would keep guest memory
    mapped, and its fd open, for as long as the record lives)."""
    flags = []
    real = os.pwritev

    def spy(fd, buffers, offset, flag=0):
        flags.append(flag)
        return real(fd, buffers, offset, flag)
    with mock.patch("os.pwritev", spy):
        yield flags


def segments(*segs: tuple[int, int, int]) -> list[memoryview]:
    return [memoryview(bytearray(b"".join(VIRTIO_BLK_DISCARD_WRITE_ZEROES.pack(*s) for s in segs)))]


class ImageTestCase(unittest.TestCase):
    SECTORS = 64

    def setUp(self):
        self.rng = random.Random(20261126)          # fixed: every run sees the same bytes
        fd, self.path = tempfile.mkstemp(prefix="vhost-min-blk-", suffix=".img")
        self.original = self.rng.randbytes(self.SECTORS * SECTOR_SIZE)
        os.write(fd, self.original)
        os.close(fd)
        fds = open_fds()
        self.addCleanup(os.unlink, self.path)
        # cleanups run last-in first-out: this check runs after every other cleanup
        self.addCleanup(lambda: self.assertEqual(open_fds(), fds, "fd leak"))
        self.image = BlockImage(self.path, serial="vhost-min-0001")
        self.addCleanup(lambda: self.image.close())

    def disk(self, offset: int = 0, length: int | None = None) -> bytes:
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), self.SECTORS * SECTOR_SIZE if length is None else length, offset)

    def run_chain(self, readable, writable, image=None) -> tuple[int, int]:
        """(status byte, used length)."""
        used = (image or self.image).handle(readable, writable)
        return writable[-1][-1], used


class RequestTest(ImageTestCase):
    def test_capacity_and_open_mode(self):
        self.assertEqual(self.image.capacity, self.SECTORS)
        self.assertEqual(fcntl.fcntl(self.image.fileno(), fcntl.F_GETFL) & os.O_ACCMODE, os.O_RDWR)
        self.assertTrue(fcntl.fcntl(self.image.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC)

    def test_in(self):
        data = views(1024, 512)
        status = views(1)
        self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_IN, 3), data + status), (VIRTIO_BLK_S_OK, 1537))
        self.assertEqual(bytes(data[0]) + bytes(data[1]), self.original[3 * 512:6 * 512])

    def test_in_status_is_last_byte_of_a_data_view(self):
        buf = views(2 * 512 + 1)
        self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_IN, 10), buf), (VIRTIO_BLK_S_OK, 1025))
        self.assertEqual(bytes(buf[0][:1024]), self.original[10 * 512:12 * 512])

    def test_in_header_split_and_data_in_three_views(self):
        data = views(100, 700, 224)
        status, used = self.run_chain(header(VIRTIO_BLK_T_IN, 63 - 1, split=(5,)), data + views(1))
        self.assertEqual((status, used), (VIRTIO_BLK_S_OK, 1025))
        self.assertEqual(b"".join(map(bytes, data)), self.original[62 * 512:])

    def test_out_header_split_across_two_and_data_across_three(self):
        payload = self.rng.randbytes(1024)
        data = [memoryview(bytearray(payload[:100])), memoryview(bytearray(payload[100:800])),
                memoryview(bytearray(payload[800:]))]
        readable = header(VIRTIO_BLK_T_OUT, 7, split=(5,)) + data
        self.assertEqual(self.run_chain(readable, views(1)), (VIRTIO_BLK_S_OK, 1))
        expected = self.original[:7 * 512] + payload + self.original[9 * 512:]
        self.assertEqual(self.disk(), expected)

    def test_header_and_data_in_one_view(self):
        payload = self.rng.randbytes(512)
        raw = bytes(header(VIRTIO_BLK_T_OUT, 1)[0]) + payload
        self.assertEqual(self.run_chain([memoryview(bytearray(raw))], views(1)), (VIRTIO_BLK_S_OK, 1))
        self.assertEqual(self.disk(512, 512), payload)

    def test_header_split_byte_by_byte(self):
        data = views(512)
        status, _ = self.run_chain(header(VIRTIO_BLK_T_IN, 5, split=tuple(range(1, 16))), data + views(1))
        self.assertEqual(status, VIRTIO_BLK_S_OK)
        self.assertEqual(bytes(data[0]), self.original[5 * 512:6 * 512])

    def test_more_views_than_iov_max(self):
        n = (blk.IOV_MAX + 100) // 64 * 64             # 8-byte views, whole sectors in all
        payload = self.rng.randbytes(n * 8)
        data = [memoryview(bytearray(payload[i * 8:(i + 1) * 8])) for i in range(n)]
        self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_OUT, 1) + data, views(1)), (VIRTIO_BLK_S_OK, 1))
        self.assertEqual(self.disk(512, len(payload)), payload)
        back = views(*([8] * n))
        self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_IN, 1), back + views(1)),
                         (VIRTIO_BLK_S_OK, len(payload) + 1))
        self.assertEqual(b"".join(map(bytes, back)), payload)

    def test_in_and_out_use_guest_memory_directly(self):
        with mock.patch("os.preadv", wraps=os.preadv) as preadv, mock.patch("os.pwritev", wraps=os.pwritev) as pwritev:
            data = views(512)
            self.run_chain(header(VIRTIO_BLK_T_IN, 2), data + views(1))
            self.assertIs(preadv.call_args.args[1][0], data[0])
            self.run_chain(header(VIRTIO_BLK_T_OUT, 2) + data, views(1))
            self.assertIs(pwritev.call_args.args[1][0], data[0])
            self.assertEqual(pwritev.call_args.args[3], 0)

    def test_writethrough_writes_are_dsync(self):
        self.image.writeback = False
        with pwritev_flags() as flags, mock.patch("os.fdatasync", wraps=os.fdatasync) as fdatasync:
            self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_OUT, 2) + views(512), views(1))[0], VIRTIO_BLK_S_OK)
        assert_writethrough(self, flags, fdatasync)

    def test_writethrough_without_pwritev2_flags_falls_back_to_fdatasync(self):
        self.image.writeback = False
        real = os.pwritev

        def no_flags(fd, buffers, offset, flags=0):
            if flags:
                raise OSError(errno.EOPNOTSUPP, "Operation not supported")
            return real(fd, buffers, offset)

        with mock.patch("os.pwritev", no_flags), mock.patch("os.fdatasync", wraps=os.fdatasync) as fdatasync:
            for _ in range(2):
                self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_OUT, 2) + views(512), views(1))[0],
                                 VIRTIO_BLK_S_OK)
        self.assertEqual(fdatasync.call_count, 2)

    def test_short_read_at_end_of_file_is_zero_filled(self):
        os.truncate(self.path, 10 * 512 + 100)      # the image shrank after it was opened
        data = views(1024)
        data[0][:] = b"\xff" * 1024
        self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_IN, 10), data + views(1)), (VIRTIO_BLK_S_OK, 1025))
        self.assertEqual(bytes(data[0]), self.original[10 * 512:10 * 512 + 100] + bytes(924))

    def test_flush(self):
        with mock.patch("os.fdatasync") as fdatasync:
            self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_FLUSH), views(1)), (VIRTIO_BLK_S_OK, 1))
        fdatasync.assert_called_once_with(self.image.fileno())
        self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_FLUSH), views(1)), (VIRTIO_BLK_S_OK, 1))
        with mock.patch("os.fdatasync", side_effect=OSError(errno.EIO, "EIO")), self.assertLogs("vhost_min.blk"):
            self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_FLUSH), views(1)), (VIRTIO_BLK_S_IOERR, 1))

    def test_get_id(self):
        ident = views(20)
        self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_GET_ID), ident + views(1)), (VIRTIO_BLK_S_OK, 21))
        self.assertEqual(bytes(ident[0]), b"vhost-min-0001".ljust(20, b"\0"))
        split = views(7, 13, 1)
        self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_GET_ID), split), (VIRTIO_BLK_S_OK, 21))
        self.assertEqual(bytes(split[0]) + bytes(split[1]), b"vhost-min-0001".ljust(20, b"\0"))
        with BlockImage(self.path, serial="A" * 20) as image:
            ident = views(20)
            self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_GET_ID), ident + views(1), image)[0], VIRTIO_BLK_S_OK)
            self.assertEqual(bytes(ident[0]), b"A" * 20)     # 20 bytes: no NUL terminator
        with BlockImage(self.path) as image:                 # no serial: an empty id
            ident = views(20)
            ident[0][:] = b"\xff" * 20
            self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_GET_ID), ident + views(1), image)[0], VIRTIO_BLK_S_OK)
            self.assertEqual(bytes(ident[0]), bytes(20))
        self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_GET_ID), views(1)), (VIRTIO_BLK_S_IOERR, 1))
        with self.assertRaises(ValueError):
            BlockImage(self.path, serial="x" * 21)

    def test_discard(self):
        fs_block = os.statvfs(self.path).f_bsize
        per_block = fs_block // 512
        self.assertEqual(self.image.discard_sector_alignment, max(1, os.fstat(self.image.fileno()).st_blksize // 512))
        before = os.stat(self.path).st_blocks
        for start in (per_block, 3 * per_block):             # one range per request (max_discard_seg 1)
            readable = header(VIRTIO_BLK_T_DISCARD) + segments((start, per_block, 0))
            self.assertEqual(self.run_chain(readable, views(1)), (VIRTIO_BLK_S_OK, 1))
        # a discard only promises the data outside the ranges is kept; this file system punched holes
        self.assertEqual(self.disk(0, fs_block), self.original[:fs_block])
        self.assertEqual(self.disk(2 * fs_block, fs_block), self.original[2 * fs_block:3 * fs_block])
        self.assertEqual(self.disk(4 * fs_block), self.original[4 * fs_block:])
        if self.image._fallocate_ok[blk.FALLOC_FL_PUNCH_HOLE]:
            self.assertLess(os.stat(self.path).st_blocks, before)
            self.assertEqual(self.disk(fs_block, fs_block), bytes(fs_block))

    def test_discard_refusals(self):
        """Answered as QEMU's virtio-blk and qemu-storage-daemon answer (tests/peers check it against
        qemu-storage-daemon itself): more segments than advertised UNSUPP, not IOERR."""
        ok = (0, 8, 0)
        self.assertEqual(self.image.max_discard_seg, 1)
        cases = [
            ("UNMAP flag on a discard", segments((0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)), VIRTIO_BLK_S_UNSUPP),
            ("unknown flag", segments((0, 8, 2)), VIRTIO_BLK_S_UNSUPP),
            ("past the end", segments((self.SECTORS - 4, 8, 0)), VIRTIO_BLK_S_IOERR),
            ("past the end with an unknown flag", segments((self.SECTORS - 4, 8, 2)), VIRTIO_BLK_S_IOERR),
            ("too many sectors", segments((0, self.image.max_discard_sectors + 1, 0)), VIRTIO_BLK_S_IOERR),
            ("two segments", segments(ok, ok), VIRTIO_BLK_S_UNSUPP),
            ("two segments, one bad", segments(ok, (self.SECTORS - 4, 8, 0)), VIRTIO_BLK_S_UNSUPP),
            ("more than a segment", [memoryview(bytearray(20))], VIRTIO_BLK_S_UNSUPP),
            ("less than a segment", [memoryview(bytearray(10))], VIRTIO_BLK_S_IOERR),
            ("no segment", [], VIRTIO_BLK_S_IOERR),
        ]
        for what, payload, expected in cases:
            with self.subTest(what):
                self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_DISCARD) + payload, views(1)), (expected, 1))
                self.assertEqual(self.disk(), self.original)
        self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_DISCARD) + segments(ok), views(1))[0], VIRTIO_BLK_S_OK)

    def check_write_zeroes(self, unmap: bool, ranges=((3, 5), (20, 16))):
        flags = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP if unmap else 0
        for s, n in ranges:                 # one range per request; the segment split across two views
            payload = segments((s, n, flags))[0]
            readable = header(VIRTIO_BLK_T_WRITE_ZEROES, split=(9,)) + [payload[:5], payload[5:]]
            self.assertEqual(self.run_chain(readable, views(1)), (VIRTIO_BLK_S_OK, 1))
        expected = bytearray(self.original)
        for s, n in ranges:
            expected[s * 512:(s + n) * 512] = bytes(n * 512)
        self.assertEqual(self.disk(), bytes(expected))
        self.assertEqual(os.stat(self.path).st_size, len(self.original))

    def test_write_zeroes(self):
        self.check_write_zeroes(unmap=False)

    def test_write_zeroes_unmap(self):
        self.check_write_zeroes(unmap=True)

    def test_write_zeroes_without_fallocate_writes_zeros(self):
        self.image._fallocate_ok = dict.fromkeys(self.image._fallocate_ok, False)
        with mock.patch.object(blk, "fallocate", side_effect=AssertionError("fallocate called")):
            self.check_write_zeroes(unmap=True, ranges=((1, 2), (4, self.SECTORS - 4)))

    def test_write_zeroes_on_a_file_system_without_zero_range(self):
        real = blk.fallocate

        def no_zero_range(fd, mode, offset, length):     # tmpfs: PUNCH_HOLE yes, ZERO_RANGE no
            if mode & blk.FALLOC_FL_ZERO_RANGE:
                raise OSError(errno.EOPNOTSUPP, "no ZERO_RANGE")
            return real(fd, mode, offset, length)
        with mock.patch.object(blk, "fallocate", side_effect=no_zero_range) as fallocate:
            self.check_write_zeroes(unmap=False)
        self.assertFalse(self.image._fallocate_ok[blk.FALLOC_FL_ZERO_RANGE])
        modes = [c.args[1] for c in fallocate.call_args_list]
        self.assertIn(blk.FALLOC_FL_PUNCH_HOLE | blk.FALLOC_FL_KEEP_SIZE, modes)
        self.assertIn(blk.FALLOC_FL_KEEP_SIZE, modes)       # re-allocated: UNMAP was not allowed

    def test_write_zeroes_refusals(self):
        for what, payload, expected in [
            ("unknown flag", segments((0, 8, 4)), VIRTIO_BLK_S_UNSUPP),
            ("past the end", segments((self.SECTORS, 1, 0)), VIRTIO_BLK_S_IOERR),
            ("too many sectors", segments((0, self.image.max_write_zeroes_sectors + 1, 0)), VIRTIO_BLK_S_IOERR),
            ("two segments", segments(*[(0, 1, 0)] * (self.image.max_write_zeroes_seg + 1)), VIRTIO_BLK_S_UNSUPP),
            ("past the end with an unknown flag", segments((self.SECTORS, 1, 4)), VIRTIO_BLK_S_IOERR),
        ]:
            with self.subTest(what):
                self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_WRITE_ZEROES) + payload, views(1)), (expected, 1))
                self.assertEqual(self.disk(), self.original)

    def test_out_of_range(self):
        for what, type_, sector, length in [
            ("read past the end", VIRTIO_BLK_T_IN, self.SECTORS - 1, 1024),
            ("read at capacity", VIRTIO_BLK_T_IN, self.SECTORS, 512),
            ("write past the end", VIRTIO_BLK_T_OUT, self.SECTORS - 1, 1024),
            ("huge sector", VIRTIO_BLK_T_OUT, (1 << 64) - 1, 512),
            ("huge sector read", VIRTIO_BLK_T_IN, (1 << 64) - 1, 512),
        ]:
            with self.subTest(what):
                data = views(length)
                data[0][:] = b"\xaa" * length
                if type_ == VIRTIO_BLK_T_IN:
                    chain = header(type_, sector), data + views(1)
                else:
                    chain = header(type_, sector) + data, views(1)
                used = length + 1 if type_ == VIRTIO_BLK_T_IN else 1     # every writable byte, as QEMU
                self.assertEqual(self.run_chain(*chain), (VIRTIO_BLK_S_IOERR, used))
                self.assertEqual(bytes(data[0]), b"\xaa" * length)
                self.assertEqual(self.disk(), self.original)
        # the last sector itself is fine
        data = views(512)
        self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_IN, self.SECTORS - 1), data + views(1))[0], VIRTIO_BLK_S_OK)

    def test_unknown_types_are_unsupported(self):
        for type_ in (2, 3, 5, 10, 14, 15, 0x80000001, 0xFFFFFFFF):
            with self.subTest(type=type_):
                self.assertEqual(self.run_chain(header(type_) + views(512), views(1)), (VIRTIO_BLK_S_UNSUPP, 1))
        self.assertEqual(self.disk(), self.original)

    def test_malformed_chains(self):
        with self.assertRaises(VirtqueueError):
            self.image.handle(header(VIRTIO_BLK_T_IN), [])
        with self.assertRaises(VirtqueueError):
            self.image.handle(header(VIRTIO_BLK_T_IN), views(0, 0))
        with self.assertRaises(VirtqueueError):
            self.image.handle([], [])
        cases = [
            ("no header", [], views(512, 1)),
            ("header too short", [memoryview(bytearray(VIRTIO_BLK_OUTHDR.pack(0, 0, 0)[:10]))], views(512, 1)),
            ("header short over two views", header(VIRTIO_BLK_T_IN, split=(4,))[:1] + views(3), views(512, 1)),
            ("read not a multiple of 512", header(VIRTIO_BLK_T_IN), views(500, 1)),
            ("read with readable data", header(VIRTIO_BLK_T_IN) + views(512), views(512, 1)),
            ("write not a multiple of 512", header(VIRTIO_BLK_T_OUT) + views(100), views(1)),
            ("write with writable data", header(VIRTIO_BLK_T_OUT) + views(512), views(512, 1)),
            ("discard with writable data", header(VIRTIO_BLK_T_DISCARD) + segments((0, 1, 0)), views(16, 1)),
            ("get id with readable data", header(VIRTIO_BLK_T_GET_ID) + views(4), views(20, 1)),
        ]
        for what, readable, writable in cases:
            with self.subTest(what):
                self.assertEqual(self.run_chain(readable, writable), (VIRTIO_BLK_S_IOERR, sum(map(len, writable))))
                self.assertEqual(self.disk(), self.original)
        # an empty trailing view does not hide the status byte
        writable = views(512, 1, 0)
        self.assertEqual(self.image.handle(header(VIRTIO_BLK_T_IN), writable), 513)
        self.assertEqual(writable[1][0], VIRTIO_BLK_S_OK)

    def test_zero_length_read_and_write(self):
        self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_IN, 1), views(1)), (VIRTIO_BLK_S_OK, 1))
        self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_OUT, 1), views(1)), (VIRTIO_BLK_S_OK, 1))

    def test_host_io_error_is_ioerr(self):
        with mock.patch("os.preadv", side_effect=OSError(errno.EIO, "EIO")), self.assertLogs("vhost_min.blk"):
            self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_IN), views(512, 1)), (VIRTIO_BLK_S_IOERR, 513))
        with mock.patch("os.pwritev", side_effect=OSError(errno.ENOSPC, "ENOSPC")), self.assertLogs("vhost_min.blk"):
            self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_OUT) + views(512), views(1)), (VIRTIO_BLK_S_IOERR, 1))


class ReadOnlyTest(ImageTestCase):
    def setUp(self):
        super().setUp()
        self.image.close()
        self.image = BlockImage(self.path, read_only=True)

    def test_opened_read_only(self):
        self.assertEqual(fcntl.fcntl(self.image.fileno(), fcntl.F_GETFL) & os.O_ACCMODE, os.O_RDONLY)

    def test_reads_work(self):
        data = views(512)
        self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_IN, 4), data + views(1)), (VIRTIO_BLK_S_OK, 513))
        self.assertEqual(bytes(data[0]), self.original[4 * 512:5 * 512])
        self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_FLUSH), views(1)), (VIRTIO_BLK_S_OK, 1))

    def test_writes_are_refused(self):
        for what, readable in [
            ("write", header(VIRTIO_BLK_T_OUT, 4) + views(512)),
            ("discard", header(VIRTIO_BLK_T_DISCARD) + segments((0, 8, 0))),
            ("write zeroes", header(VIRTIO_BLK_T_WRITE_ZEROES) + segments((0, 8, 0))),
        ]:
            with self.subTest(what), mock.patch("os.pwritev") as pwritev, mock.patch.object(blk, "fallocate") as fa:
                self.assertEqual(self.run_chain(readable, views(1)), (VIRTIO_BLK_S_IOERR, 1))
                pwritev.assert_not_called()
                fa.assert_not_called()
        self.assertEqual(self.disk(), self.original)


def rwf_dsync_works(path: str) -> bool:
    """Whether pwritev2 takes RWF_DSYNC here (qemu-user refuses the flag: blk falls back then)."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        data = os.pread(fd, 1, 0)
        os.pwritev(fd, [data], 0, os.RWF_DSYNC)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class OpenTest(unittest.TestCase):
    def test_errors_name_the_path(self):
        fds = open_fds()
        with tempfile.TemporaryDirectory() as work:
            missing = os.path.join(work, "missing.img")
            with self.assertRaises(VhostError) as caught:
                BlockImage(missing)
            self.assertEqual(caught.exception.errno, errno.ENOENT)
            self.assertIn(missing, str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))
            with self.assertRaises(VhostError) as caught:
                BlockImage(work)                    # a directory
            self.assertIn(work, str(caught.exception))
            with self.assertRaises(VhostError):
                BlockImage(work, read_only=True)    # opens, but is not a disk
        self.assertEqual(open_fds(), fds)

    def test_block_size_and_capacity(self):
        with tempfile.NamedTemporaryFile() as f:
            f.truncate(10 * 512 + 300)              # a partial last sector is not part of the disk
            with self.assertLogs("vhost_min.blk", "WARNING"), BlockImage(f.name, block_size=4096) as image:
                self.assertEqual((image.capacity, image.block_size), (10, 4096))
            for bad in (0, 256, 1000, 3 * 512, 1 << 17):
                with self.assertRaises(ValueError):
                    BlockImage(f.name, block_size=bad)

    def test_images_under_one_sector_are_refused(self):
        with tempfile.NamedTemporaryFile() as f:
            for size in (0, 511):
                f.truncate(size)
                with self.assertRaises(VhostError) as caught:
                    BlockImage(f.name)
                self.assertEqual(caught.exception.errno, errno.EINVAL)
                self.assertIn(f"is {size} bytes", str(caught.exception))
                self.assertIn(f.name, str(caught.exception))

    def test_images_that_are_not_raw_and_unreachable_tails_are_warned_about(self):
        with tempfile.NamedTemporaryFile() as f:
            for offset, magic, name in blk.IMAGE_MAGICS:
                with self.subTest(format=name):
                    f.seek(0)
                    f.truncate(0)
                    f.write(bytes(offset) + magic)
                    f.truncate(1 << 16)
                    f.flush()
                    with self.assertLogs("vhost_min.blk", "WARNING") as logs, BlockImage(f.name):
                        pass
                    self.assertEqual(len(logs.output), 1, logs.output)
                    self.assertIn(f"looks like a {name} image", logs.output[0])
                    self.assertIn(f.name, logs.output[0])
            f.seek(0)
            f.write(bytes(512))                     # raw again: nothing to say
            f.flush()
            with self.assertNoLogs("vhost_min.blk", "WARNING"), BlockImage(f.name):
                pass
            f.truncate(10 * 512 + 300)
            with self.assertLogs("vhost_min.blk", "WARNING") as logs, BlockImage(f.name) as image:
                self.assertEqual(image.capacity, 10)
            self.assertIn("its last 300 bytes are not a whole 512-byte sector", logs.output[0])


class FailedRequestDirtyLogTest(unittest.TestCase):
    """Under the dirty log (migration) a failed request still writes its status byte, at the end of
    the chain: the page holding it must be marked, or the destination keeps a stale status."""

    def test_the_status_byte_page_of_a_failed_read_is_logged(self):
        from tests.unit.test_vring_split import MEM_SIZE, RingCase
        from vhost_min.memory import DirtyLog
        page = 0x1000
        with tempfile.NamedTemporaryFile() as f:
            f.truncate(8 * SECTOR_SIZE)
            image = BlockImage(f.name)
            self.addCleanup(image.close)
            case = RingCase()
            bitmap = bytearray(MEM_SIZE // page // 8)
            log = DirtyLog(memoryview(bitmap))
            case.setup_ring(log=log, log_used_addr=0x80000)
            self.addCleanup(case.doCleanups)
            header, data, status = 0x40000, 0x50000, 0x60000
            case.memory.write(header, VIRTIO_BLK_OUTHDR.pack(VIRTIO_BLK_T_IN, 0, 8))   # past the end
            head = case.driver.add([(header, 16)], [(data, 512), (status, 1)])
            case.driver.publish()
            (popped, readable, writable), = case.device.pop_batch()
            used = image.handle(readable, writable)
            case.device.push(popped, used)
            self.assertEqual(case.memory.read(status, 1)[0], VIRTIO_BLK_S_IOERR)
            self.assertEqual(case.driver.reap(), [(head, 513)])
            self.assertTrue(log.is_dirty(status), "the status byte's page is not in the dirty log")


class DeviceTest(ImageTestCase):
    """BlkDevice: what it offers and its config space, as the vhost-user back-end serves them."""

    def test_features(self):
        F = VirtioBlkFeature
        with blk.BlkDevice(self.path) as dev:
            self.assertEqual(dev.device_id, 2)
            self.assertEqual(dev.features, F.VIRTIO_BLK_F_SEG_MAX | F.VIRTIO_BLK_F_BLK_SIZE | F.VIRTIO_BLK_F_FLUSH
                             | F.VIRTIO_BLK_F_CONFIG_WCE | F.VIRTIO_BLK_F_DISCARD | F.VIRTIO_BLK_F_WRITE_ZEROES
                             | VirtioFeature.VIRTIO_F_ACCESS_PLATFORM)
        with blk.BlkDevice(self.path, read_only=True, num_queues=4) as dev:
            self.assertEqual(dev.num_queues, 4)
            self.assertEqual(dev.features, F.VIRTIO_BLK_F_SEG_MAX | F.VIRTIO_BLK_F_BLK_SIZE | F.VIRTIO_BLK_F_FLUSH
                             | F.VIRTIO_BLK_F_CONFIG_WCE | F.VIRTIO_BLK_F_RO | F.VIRTIO_BLK_F_MQ
                             | VirtioFeature.VIRTIO_F_ACCESS_PLATFORM)
        for bad in (0, 65536, "2"):
            with self.assertRaises(ValueError):
                blk.BlkDevice(self.path, num_queues=bad)

    def test_config_space(self):
        with blk.BlkDevice(self.path, num_queues=2, block_size=4096) as dev:
            raw = dev.get_config(0, VIRTIO_BLK_CONFIG.size)
            config = BlkConfig.unpack(raw)
            self.assertEqual(config.capacity, self.SECTORS)
            self.assertEqual(config.blk_size, 4096)
            self.assertEqual(config.seg_max, 254)
            self.assertEqual(config.num_queues, 2)
            self.assertEqual(config.wce, 1)
            self.assertEqual((config.max_discard_sectors, config.max_discard_seg), (0x3FFFFF, 1))
            # whole logical blocks, or whole file-system blocks when those are larger
            self.assertEqual(config.discard_sector_alignment,
                             max(4096, os.fstat(dev.image.fileno()).st_blksize) // 512)
            self.assertEqual((config.max_write_zeroes_sectors, config.max_write_zeroes_seg), (1 << 16, 1))
            self.assertEqual(config.write_zeroes_may_unmap, 1)
            self.assertEqual(raw[0:8], self.SECTORS.to_bytes(8, "little"))
            self.assertEqual(raw[33], 0)                      # unused
            self.assertEqual(raw[57:60], bytes(3))            # unused1
            self.assertEqual(dev.get_config(34, 2), (2).to_bytes(2, "little"))
            self.assertEqual(dev.get_config(0, 60), raw[:60])  # what QEMU reads
            for offset, size in ((0, 73), (72, 1), (70, 4), (-1, 2)):
                with self.assertRaises(VhostError):
                    dev.get_config(offset, size)
        with blk.BlkDevice(self.path, read_only=True) as dev:
            config = BlkConfig.unpack(dev.get_config(0, 72))
            self.assertEqual(config.max_discard_sectors | config.max_write_zeroes_sectors, 0)

    def test_cache_mode(self):
        with blk.BlkDevice(self.path) as dev:
            wce = VIRTIO_BLK_CONFIG_OFFSETS["wce"]
            dev.set_config(wce, b"\0", 0)
            self.assertFalse(dev.image.writeback)
            self.assertEqual(dev.get_config(wce, 1), b"\0")
            dev.set_config(wce, b"\1", 0)
            self.assertTrue(dev.image.writeback)
            for offset, data in ((0, bytes(8)), (wce, b"\0\0"), (wce - 1, b"\0\0")):
                with self.assertRaises(NotSupportedError):
                    dev.set_config(offset, data, 0)
            dev.set_config(0, bytes(dev.config()._replace(wce=0).pack()), 1)   # a migration write
            self.assertFalse(dev.image.writeback)
            # a driver without FLUSH cannot make writes stable: writethrough
            dev.features_set(int(VirtioBlkFeature.VIRTIO_BLK_F_SEG_MAX))
            self.assertFalse(dev.image.writeback)
            dev.features_set(int(VirtioBlkFeature.VIRTIO_BLK_F_FLUSH))
            self.assertTrue(dev.image.writeback)

    def test_handle_serves_every_queue(self):
        with blk.BlkDevice(self.path, num_queues=3) as dev:
            for queue in range(3):
                data = views(512)
                self.assertEqual(dev.handle(queue, header(VIRTIO_BLK_T_IN, queue), data + views(1)), 513)
                self.assertEqual(bytes(data[0]), self.original[queue * 512:(queue + 1) * 512])


class ServedImageCase(ImageTestCase):
    """BlkClient over our Frontend, BlkDevice served by our backend framework in a thread."""

    def setUp(self):
        super().setUp()
        self.Frontend = Frontend
        self.work = tempfile.mkdtemp(prefix="vhost-min-blk-")
        self.addCleanup(shutil.rmtree, self.work, True)
        self.socket = os.path.join(self.work, "blk.sock")
        self.stop = threading.Event()

    def serve(self, device):
        server = Server()
        server.add(device, self.socket)
        thread = threading.Thread(target=server.run, kwargs={"stop_event": self.stop}, daemon=True)
        thread.start()

        def finish():
            self.stop.set()
            thread.join(10)
            server.close()
            device.close()
            self.assertFalse(thread.is_alive())
        self.addCleanup(finish)
        return server

    def connect(self, **kwargs):
        fe = self.Frontend.connect(self.socket)
        self.addCleanup(fe.close)
        return fe, blk.BlkClient(fe, **kwargs)


class EndToEndTest(ServedImageCase):
    """The default device (sync I/O, writeback) end to end."""

    def test_write_read_flush(self):
        server = self.serve(blk.BlkDevice(self.path, serial="e2e-disk"))
        fe, client = self.connect()
        self.assertEqual(client.capacity, self.SECTORS)
        self.assertEqual(client.size, self.SECTORS * 512)
        self.assertFalse(client.read_only)
        self.assertEqual(client.get_id(), "e2e-disk")
        self.assertEqual(client.read(0, 4096), self.original[:4096])
        pattern = bytes(range(256)) * 16 * 3                 # 12 KiB at sector 9
        with mock.patch("os.fdatasync", wraps=os.fdatasync) as fdatasync:
            client.write(9 * 512, pattern)
            self.assertEqual(self.disk(9 * 512, len(pattern)), pattern)   # found in the image file
            client.flush()
        self.assertEqual(len(fdatasync.call_args_list), 1)
        self.assertEqual(client.read(9 * 512, len(pattern)), pattern)
        self.assertEqual(self.disk(0, 9 * 512), self.original[:9 * 512])
        self.assertEqual(self.disk(9 * 512 + len(pattern)), self.original[9 * 512 + len(pattern):])
        self.assertEqual(list(server.errors), [])

    def test_errors_and_the_other_requests(self):
        self.serve(blk.BlkDevice(self.path))
        fe, client = self.connect(max_io=4096)
        big = self.rng.randbytes(5 * 4096)                  # split into max_io requests
        client.write(4096, big)
        self.assertEqual(self.disk(4096, len(big)), big)
        self.assertEqual(client.read(4096, len(big)), big)
        with self.assertRaises(blk.BlkRequestError) as caught:
            client.read(self.SECTORS * 512, 512)
        self.assertEqual((caught.exception.status, caught.exception.errno), (VIRTIO_BLK_S_IOERR, errno.EIO))
        with self.assertRaises(blk.BlkRequestError) as caught:
            client._run([blk.BlkRequest(0x77)])
        self.assertEqual((caught.exception.status, caught.exception.errno), (VIRTIO_BLK_S_UNSUPP, errno.EOPNOTSUPP))
        client.write_zeroes(4096, 8192)
        client.write_zeroes(4096 + 8192, 4096, unmap=True)
        self.assertEqual(self.disk(4096, 12288), bytes(12288))
        self.assertEqual(client.read(4096, 12288), bytes(12288))
        client.discard(0, 4096)
        self.assertEqual(self.disk(16384, len(big) - 12288), big[12288:])
        client.set_writeback(False)
        with pwritev_flags() as flags, mock.patch("os.fdatasync", wraps=os.fdatasync) as fdatasync:
            client.write(0, bytes(512))
        assert_writethrough(self, flags, fdatasync)

    def test_queue_depth(self):
        self.serve(blk.BlkDevice(self.path, num_queues=2))
        fe, client = self.connect(queue_index=1, queue_size=64, depth=16, indirect=True)
        self.assertEqual(client.depth, 16)
        expected = {}
        requests = []
        for i in range(48):                                  # three times the depth
            data = bytes([i]) * 512
            requests.append(blk.BlkRequest.write(i * 512, data, tag=("w", i)))
            expected[i] = data
        done = []
        while requests or client.in_flight:
            requests = requests[client.submit(requests):]
            self.assertLessEqual(client.in_flight, 16)
            done += client.complete()
        self.assertEqual(sorted(c.tag for c in done), sorted(("w", i) for i in range(48)))
        self.assertTrue(all(c.status == VIRTIO_BLK_S_OK for c in done))
        self.assertEqual(self.disk(0, 48 * 512), b"".join(expected[i] for i in range(48)))
        self.assertEqual(client.submit([blk.BlkRequest.read(i * 512, 512, tag=i) for i in range(16)]), 16)
        self.assertEqual(client.submit([blk.BlkRequest.read(0, 512)]), 0)    # no free slot
        got = {}
        while len(got) < 16:
            for c in client.complete():
                got[c.tag] = bytes(c.data)
        self.assertEqual(got, {i: expected[i] for i in range(16)})
        with self.assertRaises(ValueError):                 # the data does not match the length
            client.submit([blk.BlkRequest(VIRTIO_BLK_T_OUT, 0, 512, b"short")])
        self.assertEqual((client.in_flight, client.free_slots), (0, 16))
        # a sync call in the middle keeps the completions that are not its own for complete()
        self.assertEqual(client.submit([blk.BlkRequest.read(512, 512, tag="async")]), 1)
        self.assertEqual(client.read(1024, 512), expected[2])
        (late,) = client.complete()
        self.assertEqual((late.tag, bytes(late.data)), ("async", expected[1]))
        self.assertEqual((client.in_flight, client.free_slots), (0, 16))

    def test_two_queues_share_the_disk(self):
        self.serve(blk.BlkDevice(self.path, num_queues=2))
        fe, first = self.connect()
        second = blk.BlkClient(fe, queue_index=1)
        self.assertEqual(fe.num_queues, 2)
        self.assertTrue(first.features & VirtioBlkFeature.VIRTIO_BLK_F_MQ)
        self.assertEqual(first.config.num_queues, 2)
        self.assertEqual(first.submit([blk.BlkRequest.write(0, b"1" * 512)]), 1)
        self.assertEqual(second.submit([blk.BlkRequest.write(512, b"2" * 512)]), 1)
        self.assertEqual([c.status for c in first.complete() + second.complete()], [VIRTIO_BLK_S_OK] * 2)
        self.assertEqual(self.disk(0, 1024), b"1" * 512 + b"2" * 512)
        self.assertEqual(second.read(0, 512), b"1" * 512)

    def test_packed_ring(self):
        self.serve(blk.BlkDevice(self.path))
        fe = self.Frontend.connect(self.socket)
        self.addCleanup(fe.close)
        self.assertTrue(fe.get_features() & VIRTIO_F_RING_PACKED)
        client = blk.BlkClient(fe, packed=True)
        client.write(512, b"P" * 1024)
        self.assertEqual(self.disk(512, 1024), b"P" * 1024)
        self.assertEqual(client.read(0, 2048), self.original[:512] + b"P" * 1024 + self.original[1536:2048])

    def test_read_only(self):
        self.serve(blk.BlkDevice(self.path, read_only=True))
        fe, client = self.connect()
        self.assertTrue(client.read_only)
        with self.assertRaises(blk.BlkRequestError):
            client.write(0, bytes(512))
        with self.assertRaises(NotNegotiatedError):
            client.discard(0, 512)
        self.assertEqual(self.disk(), self.original)


# --------------------------------------------------------------------------------------------
# cache= and aio=: O_DIRECT, io_uring, the thread pool
# --------------------------------------------------------------------------------------------

def direct_io_refused(path: str, flags: int, *args, _open=os.open, **kwargs):
    """os.open as on a file system without O_DIRECT (tmpfs before Linux 6.6): EINVAL."""
    if flags & os.O_DIRECT:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
    return _open(path, flags, *args, **kwargs)


@contextlib.contextmanager
def uring_rw_flags():
    """Record (opcode, rw_flags) of every SQE prepared (io_uring's pwritev flags)."""
    from vhost_min import aio
    seen = []
    real = aio.IoUring.prep

    def spy(self, opcode, fd, addr, length, offset, rw_flags, user_data):
        seen.append((opcode, rw_flags))
        return real(self, opcode, fd, addr, length, offset, rw_flags, user_data)
    with mock.patch.object(aio.IoUring, "prep", spy):
        yield seen


def run_async(image: BlockImage, engine, readable, writable) -> int:
    """One chain through start(), the engine and finish(); the used length."""
    io = image.start(readable, writable)
    if io.__class__ is int:
        return io
    engine.submit(io.op, io.fd, io.offset, io.views, io.flags, "token")
    engine.commit()
    ((token, res),) = engine.drain()
    return image.finish(io, res)


class CacheModeTest(ImageTestCase):
    """BlockImage(cache=...): O_DIRECT and its alignment, bounce buffers, writethrough."""

    def direct_image(self) -> BlockImage:
        image = BlockImage(self.path, cache="none")
        self.addCleanup(image.close)
        return image

    def test_cache_none_opens_o_direct_and_knows_its_alignment(self):
        image = self.direct_image()
        self.assertTrue(fcntl.fcntl(image.fd, fcntl.F_GETFL) & os.O_DIRECT)
        self.assertIn(image.align, (512, 1024, 2048, 4096))
        self.assertGreaterEqual(image.block_size, image.align)
        self.assertTrue(image.writeback)                   # cache.direct=on, cache.writeback=on
        with BlockImage(self.path, cache="writethrough") as image:
            self.assertFalse(image.writeback or image.direct or self.image.direct)

    def test_a_file_system_that_refuses_o_direct(self):
        with mock.patch("os.open", direct_io_refused), self.assertRaises(VhostError) as caught:
            BlockImage(self.path, cache="none")
        self.assertEqual(caught.exception.errno, errno.EINVAL)
        self.assertIn("refuses O_DIRECT", str(caught.exception))
        with self.assertRaises(ValueError):
            BlockImage(self.path, cache="directsync")

    def test_aligned_guest_buffers_are_used_in_place(self):
        image = self.direct_image()
        buf = mmap.mmap(-1, 8192)
        data = memoryview(buf)[:4096]
        status = views(1)
        self.assertEqual(image.handle(header(VIRTIO_BLK_T_IN, 8), [data] + status), 4097)
        self.assertEqual((status[0][0], bytes(data)), (VIRTIO_BLK_S_OK, self.original[4096:8192]))
        self.assertEqual((image.bounced, image.buffered), (0, 0))
        data.release()
        buf.close()

    def test_unaligned_guest_buffers_are_bounced(self):
        image = self.direct_image()
        data = views(512, 1024)                # bytearrays: not at an aligned address (or by chance)
        got = self.run_chain(header(VIRTIO_BLK_T_IN, 4), data + views(1), image)
        self.assertEqual(got, (VIRTIO_BLK_S_OK, 1537))
        self.assertEqual(b"".join(map(bytes, data)), self.original[2048:3584])
        pattern = self.rng.randbytes(1536)
        odd = [memoryview(bytearray(pattern[:100])), memoryview(bytearray(pattern[100:]))]
        self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_OUT, 10) + odd, views(1), image), (VIRTIO_BLK_S_OK, 1))
        self.assertEqual(self.disk(10 * 512, 1536), pattern)
        self.assertGreaterEqual(image.bounced, 1)

    def test_unaligned_offsets_go_through_the_buffered_fd(self):
        image = self.direct_image()
        image.align = 4096                    # as on a disk with 4 KiB logical blocks
        data = views(512)
        self.assertEqual(self.run_chain(header(VIRTIO_BLK_T_IN, 3), data + views(1), image), (VIRTIO_BLK_S_OK, 513))
        self.assertEqual(bytes(data[0]), self.original[1536:2048])
        self.assertEqual(image.buffered, 1)

    def test_a_buffer_across_a_memory_region_boundary(self):
        """GuestMemory.segments splits a buffer where it crosses into the next region: under
        O_DIRECT a split at an unaligned place is bounced, an aligned one used in place."""
        from vhost_min import aio
        from vhost_min.memory import GuestMemory
        image = self.direct_image()
        engines = [None, aio.ThreadEngine(2)] + ([aio.UringEngine(8)] if aio.io_uring_available()[0] else [])
        for engine in engines[1:]:
            self.addCleanup(engine.close)
        with GuestMemory() as memory:
            maps = [mmap.mmap(-1, 0x4000), mmap.mmap(-1, 0x4000)]
            memory.add_region(0, 0x4000, buffer=maps[0])
            memory.add_region(0x4000, 0x4000, buffer=maps[1])
            for engine in engines:
                for gpa, bounced in ((0x4000 - 1000, 1), (0x4000 - 2048, 0)):
                    with self.subTest(engine=getattr(engine, "name", "sync"), gpa=hex(gpa)):
                        before = image.bounced
                        pattern = self.rng.randbytes(4096)
                        memory.write(gpa, pattern)
                        data = memory.segments(gpa, 4096)
                        self.assertEqual(len(data), 2)
                        chain = (header(VIRTIO_BLK_T_OUT, 16) + data, views(1))
                        used = image.handle(*chain) if engine is None else run_async(image, engine, *chain)
                        self.assertEqual((used, chain[1][0][0]), (1, VIRTIO_BLK_S_OK))
                        self.assertEqual(self.disk(16 * 512, 4096), pattern)
                        memory.write(gpa, bytes(4096))
                        data = memory.segments(gpa, 4096)
                        chain = (header(VIRTIO_BLK_T_IN, 16), data + views(1))
                        used = image.handle(*chain) if engine is None else run_async(image, engine, *chain)
                        self.assertEqual((used, chain[1][-1][0]), (4097, VIRTIO_BLK_S_OK))
                        self.assertEqual(memory.read(gpa, 4096), pattern)
                        self.assertEqual(image.bounced - before, 2 * bounced)
                        del data, chain


class AsyncEngineTest(unittest.TestCase):
    def test_io_uring_refused_falls_back_to_threads_logged_once(self):
        """io_uring_setup failing as under seccomp or sysctl kernel.io_uring_disabled=2 (EPERM)."""
        from vhost_min import aio
        real = aio._syscall

        def refused(nr, *args):
            if nr == aio.SYS_io_uring_setup:
                ctypes.set_errno(errno.EPERM)
                return -1
            return real(nr, *args)
        fd, path = tempfile.mkstemp(prefix="vhost-min-blk-", suffix=".img")
        os.ftruncate(fd, 1 << 20)
        os.close(fd)
        self.addCleanup(os.unlink, path)
        with mock.patch.object(aio, "_syscall", refused), mock.patch.object(blk, "_refusal_logged", False), \
                self.assertLogs("vhost_min.blk", "WARNING") as logs:
            for _ in range(2):
                with blk.BlkDevice(path, cache="none", aio="io_uring") as device:
                    self.assertEqual(device.aio, "threads")
            with blk.BlkDevice(path, cache="none") as device:       # the default: io_uring, else threads
                self.assertEqual(device.aio, "threads")
        self.assertEqual(len(logs.output), 1, logs.output)
        self.assertIn("io_uring is not available", logs.output[0])
        self.assertIn(os.strerror(errno.EPERM), logs.output[0])

    def test_defaults(self):
        fd, path = tempfile.mkstemp(prefix="vhost-min-blk-", suffix=".img")
        os.ftruncate(fd, 1 << 20)
        os.close(fd)
        self.addCleanup(os.unlink, path)
        from vhost_min import aio
        with blk.BlkDevice(path) as device:
            self.assertEqual((device.aio, device.engine, device.watched()), ("sync", None, {}))
        with blk.BlkDevice(path, cache="none") as device:
            self.assertEqual(device.aio, "io_uring" if aio.io_uring_available()[0] else "threads")
            self.assertEqual(list(device.watched()), [device.engine.fileno()])
        with self.assertRaises(ValueError):
            blk.BlkDevice(path, aio="posix")


class BusyPollTest(ServedImageCase):
    """Busy-polling (Device.poll_us, Server.step): the window adapts as QEMU's IOThreads do (with
    poll-shrink 2), and a poll takes chains and completions that no fd announced; a device that
    leaves chains in the ring (a net device's receive buffers) is not work, so the loop does not
    spin on it."""

    def test_the_window_grows_while_events_come_within_it_and_shrinks_when_they_do_not(self):
        from vhost_min.backend import POLL_START_NS
        server = Server()
        self.addCleanup(server.close)
        max_ns = 64_000
        windows = []
        for waited in (60_000,) * 7:                         # each later than the window, within the maximum
            server._adapt_poll(waited, max_ns)
            windows.append(server._poll_ns)
        self.assertEqual(windows, [POLL_START_NS, 8000, 16000, 32000, 64000, 64000, 64000])
        server._adapt_poll(90_000, max_ns)                  # later than the maximum: halved
        self.assertEqual(server._poll_ns, 32_000)
        for _ in range(3):
            server._adapt_poll(90_000, max_ns)
        self.assertEqual(server._poll_ns, POLL_START_NS)
        server._adapt_poll(90_000, max_ns)                  # and below the first window: none
        self.assertEqual(server._poll_ns, 0)
        server._poll_ns = 32_000
        server._adapt_poll(20_000, max_ns)                  # found within the window: unchanged
        self.assertEqual(server._poll_ns, 32_000)

    def test_the_default_is_the_devices_and_the_server_overrides_it(self):
        from vhost_min import aio
        with blk.BlkDevice(self.path) as sync, blk.BlkDevice(self.path, aio="threads") as threaded:
            self.assertEqual((sync.poll_us, threaded.poll_us), (0, 0))   # the workers need the GIL
        if aio.io_uring_available()[0]:
            with blk.BlkDevice(self.path, aio="io_uring") as uring:
                self.assertEqual(uring.poll_us, blk.ENGINE_POLL_US)
        with self.assertRaises(ValueError):
            Server(poll_us=-1)

    def served_without_kicks(self, device, warm_up):
        """``device`` served by a Server whose loop this test steps itself once ``warm_up(client)``
        has run under the server's own thread (the ring is built by then), with the kick fds no
        longer watched: only a busy poll can find what the driver makes available."""
        server = Server(poll_us=10_000)
        self.addCleanup(server.close)
        self.addCleanup(device.close)
        server.add(device, self.socket)
        stop = threading.Event()
        thread = threading.Thread(target=server.run, kwargs={"stop_event": stop}, daemon=True)
        thread.start()
        fe, client = self.connect(queue_size=32, depth=4)
        warm_up(client)
        stop.set()
        thread.join(10)
        self.assertFalse(thread.is_alive())
        (backend,) = server.backends
        self.assertIsNotNone(backend.rings[0].queue)
        for ring in backend.rings:
            if ring.kick_fd is not None:
                server._remove_reader(ring.kick_fd)
        return server, backend, client

    def test_a_poll_takes_requests_no_kick_announced_and_their_completions(self):
        from vhost_min import aio
        for mode in ("threads", "io_uring"):
            if mode == "io_uring" and not aio.io_uring_available()[0]:
                continue
            with self.subTest(aio=mode):
                self.socket = os.path.join(self.work, f"poll-{mode}.sock")
                device = blk.BlkDevice(self.path, aio=mode)
                server, backend, client = self.served_without_kicks(
                    device, lambda client: self.assertEqual(client.read(0, 512), self.original[:512]))
                self.assertEqual(client.submit([blk.BlkRequest.read(3 * 512, 1024, tag="r")]), 1)
                server.poll_us = 0
                server.step(0.2)                        # not polling, nothing announces it: not done
                self.assertEqual(backend.rings[0].queue.pending(), 1)
                server.poll_us = 10_000                 # polling asked for (the thread pool's is 0)
                deadline = time.monotonic() + 10
                done = []
                while not done and time.monotonic() < deadline:
                    server._busy_poll(1_000_000)       # takes the chain, then (later) its completion
                    done = client.complete(0)
                (c,) = done
                self.assertEqual((c.tag, c.status, bytes(c.data)), ("r", VIRTIO_BLK_S_OK, self.original[1536:2560]))
                self.assertEqual(device.engine.in_flight, 0)

    def test_chains_a_device_leaves_in_the_ring_are_not_work(self):
        class Hoarder(blk.BlkDevice):
            def process(self, queue, vq):
                return None                             # leaves every chain where it is

        def warm_up(client):
            self.assertEqual(client.submit([blk.BlkRequest.read(0, 512)]), 1)
            deadline = time.monotonic() + 10            # the kick builds the ring; the chain stays
            while device.backend.rings[0].queue is None and time.monotonic() < deadline:
                time.sleep(0.01)

        device = Hoarder(self.path, aio="threads")
        server, backend, client = self.served_without_kicks(device, warm_up)
        self.assertEqual(backend.rings[0].queue.pending(), 1)
        self.assertFalse(backend.busy_poll())
        self.assertFalse(server._busy_poll(2_000_000))  # the whole window, then False: no spinning
        self.assertEqual(backend.rings[0].queue.pending(), 1)


class AsyncEndToEndTest(ServedImageCase):
    """BlkClient against BlkDevice under every aio x cache: the bytes in the image file, read
    back, a deep queue of mixed requests, flush, writethrough's RWF_DSYNC."""

    def combinations(self):
        from vhost_min import aio
        for mode in blk.AIO_MODES:
            if mode == "io_uring" and not aio.io_uring_available()[0]:
                continue
            for cache in blk.CACHE_MODES:
                yield mode, cache

    def test_every_aio_and_cache(self):
        for mode, cache in self.combinations():
            with self.subTest(aio=mode, cache=cache):
                self.check(mode, cache)

    def test_a_front_end_that_leaves_with_requests_in_flight(self):
        """The ring stops with reads in the engine: stopped() finishes them before the back-end
        reads the ring's base (nothing reported lost), and the device serves the next front-end."""
        for mode, cache in self.combinations():
            if mode == "sync" or cache != "none":
                continue
            with self.subTest(aio=mode), self.assertNoLogs("vhost_min", "ERROR"):
                self.socket = os.path.join(self.work, f"leave-{mode}.sock")
                self.stop = threading.Event()
                device = blk.BlkDevice(self.path, aio=mode, cache=cache)
                self.serve(device)
                fe, client = self.connect(queue_size=64, depth=32, indirect=True)
                self.assertEqual(client.submit([blk.BlkRequest.read(i * 512, 512) for i in range(32)]), 32)
                fe.close()
                fe, client = self.connect()
                self.assertEqual(client.read(0, 4096), self.original[:4096])
                self.assertEqual(device.engine.in_flight, 0)
                fe.close()
                self.stop.set()

    def check(self, mode: str, cache: str) -> None:
        self.socket = os.path.join(self.work, f"{mode}-{cache}.sock")
        self.stop = threading.Event()
        device = blk.BlkDevice(self.path, aio=mode, cache=cache, num_queues=2)
        self.assertEqual((device.aio, device.image.cache), (mode, cache))
        server = self.serve(device)
        fe, client = self.connect(queue_size=128, depth=32, indirect=True)
        other = blk.BlkClient(fe, queue_index=1, depth=4)
        pattern = self.rng.randbytes(12 * 1024)
        client.write(9 * 512, pattern)
        self.assertEqual(self.disk(9 * 512, len(pattern)), pattern)
        client.flush()
        self.assertEqual(client.read(9 * 512, len(pattern)), pattern)
        # a window deeper than the queue: writes of their own sectors, reads of untouched ones
        expect = bytearray(self.disk())
        requests = []
        for i in range(64):
            if i % 2:
                data = self.rng.randbytes(512)
                expect[(i // 2) * 512:(i // 2 + 1) * 512] = data
                requests.append(blk.BlkRequest.write((i // 2) * 512, data, tag=i))
            else:
                requests.append(blk.BlkRequest.read((32 + i // 2) * 512, 512, tag=i))
        self.assertEqual(other.submit([blk.BlkRequest.read(40 * 512, 512, tag="other")]), 1)
        got = {}
        while requests or client.in_flight:
            requests = requests[client.submit(requests):]
            for c in client.complete():
                self.assertEqual(c.status, VIRTIO_BLK_S_OK)
                got[c.tag] = None if c.data is None else bytes(c.data)
        self.assertEqual(sorted(got), list(range(64)))
        for i in range(0, 64, 2):
            self.assertEqual(got[i], bytes(expect[(32 + i // 2) * 512:(33 + i // 2) * 512]))
        self.assertEqual(self.disk(), bytes(expect))
        (c,) = other.complete()
        self.assertEqual((c.status, bytes(c.data)), (VIRTIO_BLK_S_OK, bytes(expect[40 * 512:41 * 512])))
        self.assertEqual(client.get_id(), "")
        with uring_rw_flags() as sqes, mock.patch("os.fdatasync", wraps=os.fdatasync) as fdatasync:
            client.flush()
        if mode == "io_uring":          # IORING_OP_FSYNC with IORING_FSYNC_DATASYNC, on the ring
            self.assertEqual((sqes, fdatasync.called), ([(3, 1)], False))
        else:
            self.assertEqual(len(fdatasync.call_args_list), 1)
        client.set_writeback(False)
        with pwritev_flags() as flags, uring_rw_flags() as sqes, \
                mock.patch("os.fdatasync", wraps=os.fdatasync) as fdatasync:
            client.write(0, bytes(4096))
        written = flags + [f for op, f in sqes if op in (23, 2)]          # IORING_OP_WRITE, _WRITEV
        if rwf_dsync_works(self.path):
            self.assertEqual(written[:1], [os.RWF_DSYNC])
        else:       # qemu-user, gVisor, old kernels: the flag is refused, then a write and fdatasync
            self.assertTrue(fdatasync.called, written)
        self.assertEqual(self.disk(0, 4096), bytes(4096))
        fe.close()
        self.stop.set()
        self.assertEqual(list(server.errors), [])


if __name__ == "__main__":
    unittest.main()
