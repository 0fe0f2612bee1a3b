"""The kernel vhost ABI (vhost_min.ioctl): every ioctl number, struct size and field offset against
golden values and, where a C compiler is present, against <linux/vhost.h> itself; the error
mapping and fd ownership on real fds that are not vhost devices (/dev/null answers ENOTTY for real).

The devices themselves are proven in tests/kernel/test_kernel_vhost.py, inside a guest that has them.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import unittest
from unittest import mock

import vhost_min
from tests.support import memfd, open_fds, require
from vhost_min import ioctl as vi
from vhost_min.dataplane import Dataplane
from vhost_min.errors import IoctlError, NotSupportedError, ProtocolError, VhostError
from vhost_min.memory import VHOST_ACCESS_RO, VHOST_ACCESS_RW, VHOST_ACCESS_WO
from vhost_min.user import (VHOST_IOTLB_ACCESS_FAIL, VHOST_IOTLB_BATCH_BEGIN, VHOST_IOTLB_BATCH_END,
                            VHOST_IOTLB_INVALIDATE, VHOST_IOTLB_MISS, VHOST_IOTLB_UPDATE, IotlbMsg, MemoryRegion,
                            VringAddr)
from vhost_min.virtio import VHOST_F_LOG_ALL, VHOST_NET_F_VIRTIO_NET_HDR, VHOST_VRING_F_LOG

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: /work/shared/PROTOCOL-NOTES.md (c), computed there from the asm-generic _IOC layout.
GOLDEN_IOCTLS = {
    "VHOST_GET_FEATURES": 0x8008af00, "VHOST_SET_FEATURES": 0x4008af00,
    "VHOST_SET_OWNER": 0x0000af01, "VHOST_RESET_OWNER": 0x0000af02,
    "VHOST_SET_MEM_TABLE": 0x4008af03, "VHOST_SET_LOG_BASE": 0x4008af04, "VHOST_SET_LOG_FD": 0x4004af07,
    "VHOST_NEW_WORKER": 0x8004af08, "VHOST_FREE_WORKER": 0x4004af09,
    "VHOST_SET_VRING_NUM": 0x4008af10, "VHOST_SET_VRING_ADDR": 0x4028af11,
    "VHOST_SET_VRING_BASE": 0x4008af12, "VHOST_GET_VRING_BASE": 0xc008af12,
    "VHOST_SET_VRING_ENDIAN": 0x4008af13, "VHOST_GET_VRING_ENDIAN": 0x4008af14,
    "VHOST_ATTACH_VRING_WORKER": 0x4008af15, "VHOST_GET_VRING_WORKER": 0xc008af16,
    "VHOST_SET_VRING_KICK": 0x4008af20, "VHOST_SET_VRING_CALL": 0x4008af21, "VHOST_SET_VRING_ERR": 0x4008af22,
    "VHOST_SET_VRING_BUSYLOOP_TIMEOUT": 0x4008af23, "VHOST_GET_VRING_BUSYLOOP_TIMEOUT": 0x4008af24,
    "VHOST_SET_BACKEND_FEATURES": 0x4008af25, "VHOST_GET_BACKEND_FEATURES": 0x8008af26,
    "VHOST_NET_SET_BACKEND": 0x4008af30,
    "VHOST_SCSI_SET_ENDPOINT": 0x40e8af40, "VHOST_SCSI_CLEAR_ENDPOINT": 0x40e8af41,
    "VHOST_SCSI_GET_ABI_VERSION": 0x4004af42, "VHOST_SCSI_SET_EVENTS_MISSED": 0x4004af43,
    "VHOST_SCSI_GET_EVENTS_MISSED": 0x4004af44,
    "VHOST_VSOCK_SET_GUEST_CID": 0x4008af60, "VHOST_VSOCK_SET_RUNNING": 0x4004af61,
    "VHOST_VDPA_GET_DEVICE_ID": 0x8004af70, "VHOST_VDPA_GET_STATUS": 0x8001af71,
    "VHOST_VDPA_SET_STATUS": 0x4001af72, "VHOST_VDPA_GET_CONFIG": 0x8008af73,
    "VHOST_VDPA_SET_CONFIG": 0x4008af74, "VHOST_VDPA_SET_VRING_ENABLE": 0x4008af75,
    "VHOST_VDPA_GET_VRING_NUM": 0x8002af76, "VHOST_VDPA_SET_CONFIG_CALL": 0x4004af77,
    "VHOST_VDPA_GET_IOVA_RANGE": 0x8010af78, "VHOST_VDPA_GET_CONFIG_SIZE": 0x8004af79,
    "VHOST_VDPA_GET_AS_NUM": 0x8004af7a, "VHOST_VDPA_GET_VRING_GROUP": 0xc008af7b,
    "VHOST_VDPA_SET_GROUP_ASID": 0x4008af7c, "VHOST_VDPA_SUSPEND": 0x0000af7d,
    "VHOST_VDPA_RESUME": 0x0000af7e, "VHOST_VDPA_GET_VRING_DESC_GROUP": 0xc008af7f,
    "VHOST_VDPA_GET_VQS_COUNT": 0x8004af80, "VHOST_VDPA_GET_GROUP_NUM": 0x8004af81,
    "VHOST_VDPA_GET_VRING_SIZE": 0xc008af82,
    "VHOST_GET_FEATURES_ARRAY": 0x8008af83, "VHOST_SET_FEATURES_ARRAY": 0x4008af83,
    "VHOST_SET_FORK_FROM_OWNER": 0x4001af84, "VHOST_GET_FORK_FROM_OWNER": 0x8001af85,
}

#: The getters the kernel declares with _IOW although they write their answer back.
WRITE_DIRECTION_GETTERS = ("VHOST_GET_VRING_ENDIAN", "VHOST_GET_VRING_BUSYLOOP_TIMEOUT",
                           "VHOST_SCSI_GET_ABI_VERSION", "VHOST_SCSI_GET_EVENTS_MISSED")

#: struct -> (sizeof, alignment, {field: offset}) on every LP64 architecture vhost_min supports.
GOLDEN_LAYOUTS = {
    "vhost_vring_state": (8, 4, {"index": 0, "num": 4}),
    "vhost_vring_file": (8, 4, {"index": 0, "fd": 4}),
    "vhost_vring_addr": (40, 8, {"index": 0, "flags": 4, "desc_user_addr": 8, "used_user_addr": 16,
                                 "avail_user_addr": 24, "log_guest_addr": 32}),
    "vhost_worker_state": (4, 4, {"worker_id": 0}),
    "vhost_vring_worker": (8, 4, {"index": 0, "worker_id": 4}),
    "vhost_iotlb_msg": (32, 8, {"iova": 0, "size": 8, "uaddr": 16, "perm": 24, "type": 25}),
    "vhost_msg": (72, 8, {"type": 0, "iotlb": 8, "padding": 8}),
    "vhost_msg_v2": (72, 8, {"type": 0, "asid": 4, "iotlb": 8, "padding": 8}),
    "vhost_features_array": (8, 8, {"count": 0, "features": 8}),
    "vhost_memory_region": (32, 8, {"guest_phys_addr": 0, "memory_size": 8, "userspace_addr": 16,
                                    "flags_padding": 24}),
    "vhost_memory": (8, 8, {"nregions": 0, "padding": 4, "regions": 8}),
    "vhost_scsi_target": (232, 4, {"abi_version": 0, "vhost_wwpn": 4, "vhost_tpgt": 228, "reserved": 230}),
    "vhost_vdpa_config": (8, 4, {"off": 0, "len": 4, "buf": 8}),
    "vhost_vdpa_iova_range": (16, 8, {"first": 0, "last": 8}),
}

#: Structs newer than some headers: compared with the compiler only where this ioctl is defined.
STRUCT_SINCE = {"vhost_worker_state": "VHOST_NEW_WORKER", "vhost_vring_worker": "VHOST_NEW_WORKER",
                "vhost_features_array": "VHOST_GET_FEATURES_ARRAY"}


def layout(name: str) -> tuple[int, int, dict[str, int]]:
    """(sizeof, alignment, {field: offset}) of our ctypes mirror, anonymous unions flattened."""
    struct_type = getattr(vi, name)
    offsets = {}
    for field, ftype in struct_type._fields_:
        if field in getattr(struct_type, "_anonymous_", ()):
            offsets.update({inner: getattr(struct_type, inner).offset for inner, _ in ftype._fields_})
        else:
            offsets[field] = getattr(struct_type, field).offset
    return ctypes.sizeof(struct_type), ctypes.alignment(struct_type), offsets


def header_constants() -> dict[str, int]:
    """The uapi constants that live in vhost_min as values or masks, as the header would print them."""
    bit = lambda mask: mask.bit_length() - 1   # noqa: E731 (masks here, bit numbers there)
    values = {
        "VHOST_VIRTIO": vi.VHOST_VIRTIO, "VHOST_FILE_UNBIND": vi.VHOST_FILE_UNBIND,
        "VHOST_SCSI_ABI_VERSION": vi.VHOST_SCSI_ABI_VERSION, "VHOST_PAGE_SIZE": vi.VHOST_PAGE_SIZE,
        "VHOST_IOTLB_MSG": vi.VHOST_IOTLB_MSG, "VHOST_IOTLB_MSG_V2": vi.VHOST_IOTLB_MSG_V2,
        "VHOST_VRING_LITTLE_ENDIAN": vi.VHOST_VRING_LITTLE_ENDIAN, "VHOST_VRING_BIG_ENDIAN": vi.VHOST_VRING_BIG_ENDIAN,
        "VHOST_FORK_OWNER_KTHREAD": vi.VHOST_FORK_OWNER_KTHREAD, "VHOST_FORK_OWNER_TASK": vi.VHOST_FORK_OWNER_TASK,
        "VHOST_ACCESS_RO": VHOST_ACCESS_RO, "VHOST_ACCESS_WO": VHOST_ACCESS_WO, "VHOST_ACCESS_RW": VHOST_ACCESS_RW,
        "VHOST_IOTLB_MISS": VHOST_IOTLB_MISS, "VHOST_IOTLB_UPDATE": VHOST_IOTLB_UPDATE,
        "VHOST_IOTLB_INVALIDATE": VHOST_IOTLB_INVALIDATE, "VHOST_IOTLB_ACCESS_FAIL": VHOST_IOTLB_ACCESS_FAIL,
        "VHOST_IOTLB_BATCH_BEGIN": VHOST_IOTLB_BATCH_BEGIN, "VHOST_IOTLB_BATCH_END": VHOST_IOTLB_BATCH_END,
        "VHOST_F_LOG_ALL": bit(VHOST_F_LOG_ALL), "VHOST_NET_F_VIRTIO_NET_HDR": bit(VHOST_NET_F_VIRTIO_NET_HDR),
        "VHOST_VRING_F_LOG": bit(VHOST_VRING_F_LOG),
    }
    values.update({name: bit(flag) for name, flag in vi.VhostBackendFeature.__members__.items()})
    return values


class NumbersTest(unittest.TestCase):
    def test_every_ioctl_matches_the_table(self) -> None:
        self.assertEqual({name: int(value) for name, value in vi.VhostIoctl.__members__.items()}, GOLDEN_IOCTLS)

    def test_no_two_ioctls_share_a_number(self) -> None:
        self.assertEqual(len(vi.VhostIoctl), len(vi.VhostIoctl.__members__))   # no enum aliases

    def test_module_constants_are_the_enum_members(self) -> None:
        for name, member in vi.VhostIoctl.__members__.items():
            self.assertIs(getattr(vi, name), member, name)
            self.assertIn(name, vi.__all__)
        self.assertIs(vi.VHOST_BACKEND_F_IOTLB_MSG_V2, vi.VhostBackendFeature.VHOST_BACKEND_F_IOTLB_MSG_V2)

    def test_fields_decode_back(self) -> None:
        for member in vi.VhostIoctl:
            with self.subTest(member.name):
                self.assertEqual(member >> vi._IOC_TYPESHIFT & 0xFF, vi.VHOST_VIRTIO)
                direction, size = member >> vi._IOC_DIRSHIFT, member >> vi._IOC_SIZESHIFT & 0x3FFF
                self.assertEqual(direction == vi._IOC_NONE, size == 0)
        for name in WRITE_DIRECTION_GETTERS:
            self.assertEqual(vi.VhostIoctl[name] >> vi._IOC_DIRSHIFT, vi._IOC_WRITE, name)

    def test_ioc_matches_other_well_known_numbers(self) -> None:
        self.assertEqual(vi._IOW(ord("T"), 202, ctypes.c_int), 0x400454CA)     # TUNSETIFF
        self.assertEqual(vi._IOR(ord("T"), 210, ctypes.c_uint), 0x800454D2)    # TUNGETFEATURES
        self.assertEqual(vi._IOWR(0x81, 0x10, ctypes.c_uint64 * 4), 0xC0208110)  # VDUSE_IOTLB_GET_FD
        self.assertEqual(vi._IO(0xAE, 0x01), 0xAE01)                            # KVM_CREATE_VM

    def test_ioc_refuses_fields_that_do_not_fit(self) -> None:
        for args in ((4, 0xAF, 0, 8), (1, 0x100, 0, 8), (1, 0xAF, 0x100, 8), (1, 0xAF, 0, 1 << 14), (1, -1, 0, 8)):
            with self.subTest(args=args), self.assertRaises(ValueError):
                vi._IOC(*args)

    def test_backend_feature_bits(self) -> None:
        self.assertEqual({name: flag.bit_length() - 1 for name, flag in vi.VhostBackendFeature.__members__.items()},
                         {"VHOST_BACKEND_F_IOTLB_MSG_V2": 1, "VHOST_BACKEND_F_IOTLB_BATCH": 2,
                          "VHOST_BACKEND_F_IOTLB_ASID": 3, "VHOST_BACKEND_F_SUSPEND": 4, "VHOST_BACKEND_F_RESUME": 5,
                          "VHOST_BACKEND_F_ENABLE_AFTER_DRIVER_OK": 6, "VHOST_BACKEND_F_DESC_ASID": 7,
                          "VHOST_BACKEND_F_IOTLB_PERSIST": 8})
        # What the 6.12 kernel answered (KERNEL-VM.md): vhost-net 0x2, vdpa_sim 0x17e.
        self.assertEqual(vi.VhostBackendFeature(0x2), vi.VHOST_BACKEND_F_IOTLB_MSG_V2)
        self.assertNotIn(vi.VHOST_BACKEND_F_DESC_ASID, vi.VhostBackendFeature(0x17E))

    def test_constants(self) -> None:
        self.assertEqual((vi.VHOST_VIRTIO, vi.VHOST_FILE_UNBIND, vi.VHOST_SCSI_ABI_VERSION, vi.VHOST_PAGE_SIZE),
                         (0xAF, -1, 1, 0x1000))
        self.assertEqual((vi.VHOST_IOTLB_MSG, vi.VHOST_IOTLB_MSG_V2), (1, 2))
        self.assertEqual(vi.VhostScsi.WWPN_SIZE, 224)


class LayoutTest(unittest.TestCase):
    def test_sizes_alignments_and_offsets(self) -> None:
        for name, golden in GOLDEN_LAYOUTS.items():
            with self.subTest(name):
                self.assertEqual(layout(name), golden)

    def test_memory_table_buffer(self) -> None:
        regions = [MemoryRegion(0, 0x10000, 0x7F0000000000, 0x5000), MemoryRegion(0x100000, 0x2000, 0x7F0000100000, 9)]
        raw = bytes(vi.vhost_memory_buffer(regions))
        self.assertEqual(len(raw), 8 + 2 * 32)
        self.assertEqual(struct.unpack_from("=II", raw), (2, 0))
        # mmap_offset is vhost-user's; the kernel's fourth field (flags_padding) is sent as 0.
        self.assertEqual(list(struct.iter_unpack("=QQQQ", raw[8:])),
                         [(0, 0x10000, 0x7F0000000000, 0), (0x100000, 0x2000, 0x7F0000100000, 0)])
        self.assertEqual(bytes(vi.vhost_memory_buffer([])), bytes(8))

    def test_memory_table_refuses_values_that_do_not_fit(self) -> None:
        for region in (MemoryRegion(-1, 1, 0, 0), MemoryRegion(0, 1 << 64, 0, 0), MemoryRegion(0, 1, "0", 0)):
            with self.subTest(region=region), self.assertRaisesRegex(ValueError, "memory region 0"):
                vi.vhost_memory_buffer([region])

    def test_iotlb_messages(self) -> None:
        msg = IotlbMsg(0x1000, 0x2000, 0x7F0000003000, VHOST_ACCESS_RW, VHOST_IOTLB_UPDATE)
        v1, v2 = bytes(vi.encode_iotlb_msg(msg, v2=False)), bytes(vi.encode_iotlb_msg(msg, v2=True, asid=7))
        body = struct.pack("=QQQBB6x", *msg) + bytes(32)
        self.assertEqual(v1, struct.pack("=i4x", vi.VHOST_IOTLB_MSG) + body)
        self.assertEqual(v2, struct.pack("=II", vi.VHOST_IOTLB_MSG_V2, 7) + body)
        self.assertEqual(vi.decode_iotlb_msg(v1), (msg, 0))
        self.assertEqual(vi.decode_iotlb_msg(v2), (msg, 7))
        with self.assertRaisesRegex(ValueError, "asid 3 needs a v2 message"):
            vi.encode_iotlb_msg(msg, v2=False, asid=3)
        with self.assertRaisesRegex(ValueError, "IOTLB perm 256"):
            vi.encode_iotlb_msg(msg._replace(perm=256), v2=True)
        for junk in (b"", b"\x01\0\0", struct.pack("=I", 3) + bytes(68), v2[:71]):
            with self.subTest(junk=junk[:8]), self.assertRaises(ProtocolError):
                vi.decode_iotlb_msg(junk)


def compare_with_c_header(test: unittest.TestCase, includes: list[str], layouts: dict, since: dict, ioctls,
                          constants: dict[str, int], unguarded=()) -> dict[str, int]:
    """Compile a program against the installed uapi headers that prints each struct's size,
    alignment and field offsets, each ioctl number and constant the headers define, and assert ours
    equal them; returns how many of each kind the headers had (older headers lack newer names)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    headers = [os.path.join("/usr/include", name) for name in includes]
    require(bool(cc) and all(os.path.exists(h) for h in headers), f"a C compiler and {' '.join(headers)}",
            "apt-get install -y gcc linux-libc-dev")
    lines = ["#include <stddef.h>", "#include <stdio.h>", *(f"#include <{name}>" for name in includes),
             "int main(void) {"]
    for name, (_, _, offsets) in layouts.items():
        guard = since.get(name)
        lines += [f"#ifdef {guard}"] if guard else []
        lines.append(f'printf("layout {name} %zu %zu\\n", sizeof(struct {name}), _Alignof(struct {name}));')
        lines += [f'printf("offset {name}.{f} %zu\\n", offsetof(struct {name}, {f}));' for f in offsets]
        lines += ["#endif"] if guard else []
    for name in ioctls.__members__:
        lines += [f"#ifdef {name}", f'printf("ioctl {name} %lu\\n", (unsigned long)({name}));', "#endif"]
    for name in constants:
        guarded = name not in unguarded
        lines += [f"#ifdef {name}"] if guarded else []
        lines.append(f'printf("const {name} %lld\\n", (long long)({name}));')
        lines += ["#endif"] if guarded else []
    lines += ["return 0;", "}"]
    with tempfile.TemporaryDirectory() as tmp:
        source, program = os.path.join(tmp, "abi.c"), os.path.join(tmp, "abi")
        with open(source, "w") as f:
            f.write("\n".join(lines) + "\n")
        subprocess.run([cc, "-std=gnu11", "-o", program, source], check=True, capture_output=True, timeout=60)
        output = subprocess.run([program], check=True, capture_output=True, text=True, timeout=60).stdout
    seen = {"layout": 0, "offset": 0, "ioctl": 0, "const": 0}
    for line in output.splitlines():
        kind, name, *values = line.split()
        seen[kind] += 1
        with test.subTest(line=line):
            if kind == "layout":
                test.assertEqual([int(v) for v in values], list(layout(name)[:2]))
            elif kind == "offset":
                struct_name, field = name.split(".")
                test.assertEqual(int(values[0]), layout(struct_name)[2][field])
            elif kind == "ioctl":
                test.assertEqual(int(values[0]), ioctls[name])
            else:
                test.assertEqual(int(values[0]), constants[name])
    return seen


class HeaderTest(unittest.TestCase):
    """Our numbers and layouts against the C compiler's reading of the installed uapi headers."""

    def test_layouts_numbers_and_constants_match_the_header(self) -> None:
        seen = compare_with_c_header(self, ["linux/vhost.h"], GOLDEN_LAYOUTS, STRUCT_SINCE, vi.VhostIoctl,
                                     header_constants())
        # Debian 12's linux-libc-dev (6.1) lacks the 2023+ additions (workers, RESUME, DESC_GROUP,
        # VRING_SIZE, features array, fork owner): 44 of the 55 ioctls; newer headers have more.
        self.assertGreaterEqual(seen["layout"], len(GOLDEN_LAYOUTS) - len(STRUCT_SINCE))
        self.assertGreaterEqual(seen["ioctl"], 44)
        self.assertGreaterEqual(seen["const"], 20)


class ErrorTest(unittest.TestCase):
    """The error mapping on real fds and the kernel's own answers. The requests are terminal
    ioctls the kernel (and qemu-user, which answers vhost numbers it does not know with ENOSYS
    itself) passes to the fd: /dev/null answers TCGETS with ENOTTY, a closed fd gives EBADF."""

    def test_enotty_reads_not_supported_by_this_kernel(self) -> None:
        fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        try:
            with self.assertRaises(IoctlError) as caught:
                vi.ioctl(fd, termios.TCGETS, bytearray(64), name="VHOST_GET_FEATURES")
            with self.assertRaisesRegex(IoctlError, rf"^ioctl {termios.TCGETS:#x} is not supported by this kernel$"):
                vi.ioctl(fd, termios.TCGETS, bytearray(64))     # a number with no vhost name
        finally:
            os.close(fd)
        exc = caught.exception
        self.assertEqual((exc.errno, exc.ioctl, str(exc)),
                         (errno.ENOTTY, "VHOST_GET_FEATURES", "VHOST_GET_FEATURES is not supported by this kernel"))
        self.assertIsInstance(exc, VhostError)
        self.assertIsInstance(exc, OSError)

    def test_other_errors_name_the_ioctl_and_keep_errno(self) -> None:
        fd = os.eventfd(0)
        os.close(fd)                                # a number that is no longer an open fd
        with self.assertRaises(IoctlError) as caught:
            vi.ioctl(fd, termios.FIONREAD, ctypes.c_int(), name="VHOST_SET_OWNER")
        self.assertEqual((caught.exception.errno, caught.exception.ioctl, str(caught.exception)),
                         (errno.EBADF, "VHOST_SET_OWNER", f"VHOST_SET_OWNER failed: {os.strerror(errno.EBADF)}"))
        self.assertEqual(str(vi.ioctl_error("X", errno.EFAULT)), f"X failed: {os.strerror(errno.EFAULT)}")

    def test_devices_name_the_ioctl_that_failed(self) -> None:
        with vi.VhostNet("/dev/null") as dev:
            for call, name in ((dev.get_features, "VHOST_GET_FEATURES"), (dev.set_owner, "VHOST_SET_OWNER"),
                               (lambda: dev.get_vring_base(1), "VHOST_GET_VRING_BASE"),
                               (lambda: dev.set_vring_err(0, None), "VHOST_SET_VRING_ERR")):
                with self.subTest(name), self.assertRaises(IoctlError) as caught:
                    call()
                self.assertEqual(caught.exception.ioctl, name)
                self.assertTrue(str(caught.exception).startswith(name), caught.exception)
        self.assertEqual(vi.ioctl_name(0xAF01), "VHOST_SET_OWNER")
        self.assertEqual(vi.ioctl_name(0xAFFE), "ioctl 0xaffe")

    def test_features_array_on_a_kernel_without_it(self) -> None:
        # Such a kernel reads the count as a ring index (ENOBUFS on vhost-net, the kernel tier
        # sees it); the text says why. Here the kernel's answer is stood in for.
        exc = vi.ioctl_error("VHOST_GET_FEATURES_ARRAY", errno.ENOBUFS)
        with mock.patch.object(vi, "ioctl", side_effect=exc), vi.VhostNet("/dev/null") as dev:
            with self.assertRaisesRegex(IoctlError, r"VHOST_GET_FEATURES_ARRAY is not supported by this kernel "
                                                    r"\(it read the word count as a ring index: ENOBUFS\)"):
                dev.get_features_array()
        other = vi.ioctl_error("VHOST_SET_FEATURES_ARRAY", errno.EOPNOTSUPP)
        with mock.patch.object(vi, "ioctl", side_effect=other), vi.VhostNet("/dev/null") as dev:
            with self.assertRaises(IoctlError) as caught:
                dev.set_features_array(1 << 70)
        self.assertIs(caught.exception, other)        # other errors pass unchanged

    def test_other_architectures_refused_when_used_not_at_import(self) -> None:
        for machine in ("ppc64le", "mips64", "sparc64", "alpha", "parisc64", "powerpc"):
            with self.subTest(machine=machine), mock.patch.object(vi, "_MACHINE", machine), \
                    vi.VhostNet("/dev/null") as dev:
                with self.assertRaises(VhostError) as caught:
                    dev.set_owner()
                self.assertNotIsInstance(caught.exception, IoctlError)
                self.assertIn(f"{machine} encodes direction and size differently", str(caught.exception))
        for machine in ("x86_64", "aarch64", "riscv64", "s390x"):
            with self.subTest(machine=machine), mock.patch.object(vi, "_MACHINE", machine), \
                    vi.VhostNet("/dev/null") as dev, self.assertRaises(IoctlError):
                dev.set_owner()             # reached the ioctl
        code = ("import os, collections; real = os.uname(); "
                "os.uname = lambda: real._replace(machine='ppc64le') if hasattr(real, '_replace') else "
                "collections.namedtuple('u', 'sysname nodename release version machine')(*real[:4], 'ppc64le'); "
                "import vhost_min.ioctl as vi; print(hex(vi.VHOST_SET_OWNER)); "
                "dev = vi.VhostNet('/dev/null')\n"
                "try:\n    dev.set_owner()\nexcept vi.VhostError as e:\n    print(e)")
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.splitlines()[0], "0xaf01")
        self.assertIn("ppc64le encodes direction and size differently", result.stdout)


class ArgumentTest(unittest.TestCase):
    """Bad arguments are refused with ValueError before the ioctl; good ones reach it (and /dev/null
    refuses it: IoctlError)."""

    def setUp(self) -> None:
        self.dev = vi.VhostScsi("/dev/null")
        self.addCleanup(self.dev.close)

    def assertReachesKernel(self, call, *args) -> None:
        with self.assertRaises(IoctlError):
            call(*args)

    def test_ring_indices_and_values(self) -> None:
        for index in (-1, 1 << 32, "0", 1.0):
            with self.subTest(index=index), self.assertRaisesRegex(ValueError, "vring index"):
                self.dev.set_vring_num(index, 256)
        with self.assertRaisesRegex(ValueError, "VHOST_SET_VRING_BASE num"):
            self.dev.set_vring_base(0, 1 << 32)
        self.assertReachesKernel(self.dev.set_vring_num, 0xFFFFFFFF, 256)
        with self.assertRaisesRegex(ValueError, "used_user_addr"):
            self.dev.set_vring_addr(VringAddr(0, 0, 0, 1 << 64, 0, 0))
        self.assertReachesKernel(self.dev.set_vring_addr, VringAddr(0, VHOST_VRING_F_LOG, 0x1000, 0x3000, 0x2000, 0))
        with self.assertRaisesRegex(ValueError, "features"):
            self.dev.set_features(1 << 64)
        with self.assertRaisesRegex(ValueError, "worker id"):
            self.dev.attach_vring_worker(0, -1)

    def test_fds(self) -> None:
        for fd in (-1, -5, True, "3", 1 << 31):
            with self.subTest(fd=fd), self.assertRaisesRegex(ValueError, r"is not a file descriptor \(None unbinds\)"):
                self.dev.set_vring_kick(0, fd)
        self.assertReachesKernel(self.dev.set_vring_call, 0, None)     # None is VHOST_FILE_UNBIND
        self.assertReachesKernel(self.dev.set_log_fd, None)
        with self.assertRaises(ValueError):
            vi.VhostNet("/dev/null", backend_fd=-1)

    def test_wwpn(self) -> None:
        for wwpn in ("", "x" * 224, "naa.\0", "naa.é", b"\xff"):
            with self.subTest(wwpn=wwpn), self.assertRaisesRegex(ValueError, "WWPN"):
                self.dev.set_endpoint(wwpn)
        self.assertReachesKernel(self.dev.set_endpoint, "x" * 223, 1)
        self.assertReachesKernel(self.dev.set_endpoint, b"naa.5001405aabbccdd")
        with self.assertRaisesRegex(ValueError, "TPGT"):
            self.dev.set_endpoint("naa.5001405aabbccdd", 1 << 16)
        with self.assertRaisesRegex(VhostError, "no endpoint set here"):
            self.dev.clear_endpoint()
        self.assertReachesKernel(self.dev.clear_endpoint, "naa.5001405aabbccdd", 1)


class EnableTest(unittest.TestCase):
    """What set_vring_enable maps to, seen by which ioctl reaches /dev/null (or none)."""

    def test_vhost_net_attaches_and_detaches_the_backend(self) -> None:
        with vi.VhostNet("/dev/null") as net:
            with self.assertRaisesRegex(VhostError, "no backend to attach to ring 1"):
                net.set_vring_enable(1, True)
            net.backend_fd = 0
            for enable in (True, False):
                with self.subTest(enable=enable), self.assertRaises(IoctlError) as caught:
                    net.set_vring_enable(1, enable)
                self.assertEqual(caught.exception.ioctl, "VHOST_NET_SET_BACKEND")

    def test_vhost_vsock_runs_when_both_rings_are_enabled(self) -> None:
        with vi.VhostVsock("/dev/null") as vsock:
            vsock.set_vring_enable(0, True)          # RX alone: no ioctl yet
            with self.assertRaises(IoctlError) as caught:
                vsock.set_vring_enable(1, True)      # both: SET_RUNNING 1
            self.assertEqual(caught.exception.ioctl, "VHOST_VSOCK_SET_RUNNING")
            with self.assertRaisesRegex(ValueError, "rings are 0 .RX. and 1 .TX., not 2"):
                vsock.set_vring_enable(2, True)

    def test_vhost_scsi_has_no_ring_enable(self) -> None:
        with vi.VhostScsi("/dev/null") as scsi, self.assertRaisesRegex(NotSupportedError, "set_endpoint"):
            scsi.set_vring_enable(2, True)

    def test_every_dataplane_message_is_implemented(self) -> None:
        for name, member in vars(Dataplane).items():
            # start_device: nothing to do for kernel vhost (Dataplane's default)
            optional = ("close", "set_vring_enable", "start_device")
            if callable(member) and not name.startswith("_") and name not in optional:
                with self.subTest(name):
                    self.assertIsNot(getattr(vi.VhostKernel, name), member)
        for cls in (vi.VhostNet, vi.VhostVsock, vi.VhostScsi):
            self.assertIsNot(cls.set_vring_enable, Dataplane.set_vring_enable, cls)


class IotlbFdTest(unittest.TestCase):
    """send_iotlb_msg / read_iotlb_msg over a socket pair standing in for the device fd."""

    def setUp(self) -> None:
        self.ours, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(self.kernel.close)
        self.dev = vi.VhostKernel(fd=self.ours.detach())
        self.addCleanup(self.dev.close)

    def test_write_v1_and_v2(self) -> None:
        msg = IotlbMsg(0, 0x10000, 0x7F0000000000, VHOST_ACCESS_RW, VHOST_IOTLB_UPDATE)
        self.dev.send_iotlb_msg(msg)
        self.dev.send_iotlb_msg(msg, v2=True, asid=1)
        self.assertEqual(self.kernel.recv(100), bytes(vi.encode_iotlb_msg(msg, v2=False)))
        self.assertEqual(self.kernel.recv(100), bytes(vi.encode_iotlb_msg(msg, v2=True, asid=1)))

    def test_read_misses_without_blocking(self) -> None:
        self.assertIsNone(self.dev.read_iotlb_msg())
        miss = IotlbMsg(0x4000, 0, 0, VHOST_ACCESS_RO, VHOST_IOTLB_MISS)
        self.kernel.send(bytes(vi.encode_iotlb_msg(miss, v2=True)))
        self.assertEqual(self.dev.read_iotlb_msg(), (miss, 0))
        self.assertIsNone(self.dev.read_iotlb_msg())

    def test_write_failure_names_the_message(self) -> None:
        self.kernel.close()
        with self.assertRaisesRegex(IoctlError, r"writing a VHOST_IOTLB_MSG \(type 3\) failed"):
            self.dev.send_iotlb_msg(IotlbMsg(0, 0x1000, 0, 0, VHOST_IOTLB_INVALIDATE))


class FdOwnershipTest(unittest.TestCase):
    def test_close_and_context_manager(self) -> None:
        before = open_fds()
        dev = vi.VhostNet("/dev/null")
        self.assertIn(dev.fileno(), open_fds())
        dev.close()
        dev.close()                                   # twice is harmless
        self.assertTrue(dev.closed)
        self.assertEqual(open_fds(), before)
        with self.assertRaisesRegex(VhostError, "closed") as caught:
            dev.get_features()
        self.assertEqual(caught.exception.errno, errno.EBADF)
        with vi.VhostVsock("/dev/null") as dev:
            self.assertIn(dev.fileno(), open_fds())
        self.assertEqual(open_fds(), before)

    def test_opened_close_on_exec_and_read_write(self) -> None:
        with vi.VhostScsi("/dev/null") as dev:
            self.assertFalse(os.get_inheritable(dev.fileno()))
            self.assertEqual(fcntl.fcntl(dev.fileno(), fcntl.F_GETFL) & os.O_ACCMODE, os.O_RDWR)

    def test_a_passed_fd_is_owned(self) -> None:
        before = open_fds()
        fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        with vi.VhostKernel(fd=fd) as dev:
            self.assertEqual(dev.fileno(), fd)
            self.assertIn("fd", repr(dev))
        self.assertEqual(open_fds(), before)
        for bad in (-1, "3", True):
            with self.subTest(fd=bad), self.assertRaises(ValueError):
                vi.VhostKernel(fd=bad)
        with self.assertRaisesRegex(ValueError, "not both"):
            vi.VhostNet("/dev/null", fd=0)
        with self.assertRaisesRegex(ValueError, "no default device node"):
            vi.VhostKernel()

    def test_failed_open_leaks_nothing(self) -> None:
        before = open_fds()
        with self.assertRaisesRegex(VhostError, r"cannot open /nonexistent/vhost-net: .* \(is the vhost_net module "
                                                r"loaded\?\)") as caught:
            vi.VhostNet("/nonexistent/vhost-net")
        self.assertEqual(caught.exception.errno, errno.ENOENT)
        with tempfile.TemporaryDirectory() as tmp, self.assertRaises(VhostError) as caught:
            vi.VhostScsi(tmp)                        # a directory cannot be opened read-write
        self.assertEqual(caught.exception.errno, errno.EISDIR)
        self.assertEqual(open_fds(), before)

    def test_a_refused_log_base_unmaps_the_log(self) -> None:
        def mapped() -> int:
            with open("/proc/self/maps") as f:
                return sum("vhost-min-log-test" in line for line in f)
        fd = memfd(0x2000, "vhost-min-log-test")
        try:
            before = mapped()
            with vi.VhostNet("/dev/null") as dev, self.assertRaisesRegex(IoctlError, "VHOST_SET_LOG_BASE"):
                dev.set_log_base(fd, 0x2000)
            self.assertEqual(mapped(), before)
        finally:
            os.close(fd)

    def test_lazy_top_level_names(self) -> None:
        for name in ("VhostKernel", "VhostNet", "VhostVsock", "VhostScsi"):
            self.assertIs(getattr(vhost_min, name), getattr(vi, name))



#: <linux/vduse.h> numbers, computed by hand from the asm-generic _IOC layout and the sizes below.
GOLDEN_VDUSE_IOCTLS = {
    "VDUSE_GET_API_VERSION": 0x80088100, "VDUSE_SET_API_VERSION": 0x40088101,
    "VDUSE_CREATE_DEV": 0x41508102, "VDUSE_DESTROY_DEV": 0x41008103,
    "VDUSE_IOTLB_GET_FD": 0xC0208110, "VDUSE_DEV_GET_FEATURES": 0x80088111, "VDUSE_DEV_SET_CONFIG": 0x40088112,
    "VDUSE_DEV_INJECT_CONFIG_IRQ": 0x00008113, "VDUSE_VQ_SETUP": 0x40208114, "VDUSE_VQ_GET_INFO": 0xC0308115,
    "VDUSE_VQ_SETUP_KICKFD": 0x40088116, "VDUSE_VQ_INJECT_IRQ": 0x40048117, "VDUSE_IOTLB_REG_UMEM": 0x40308118,
    "VDUSE_IOTLB_DEREG_UMEM": 0x40308119, "VDUSE_IOTLB_GET_INFO": 0xC030811A,
}

GOLDEN_VDUSE_LAYOUTS = {
    "vduse_dev_config": (336, 8, {"name": 0, "vendor_id": 256, "device_id": 260, "features": 264, "vq_num": 272,
                                  "vq_align": 276, "reserved": 280, "config_size": 332, "config": 336}),
    "vduse_iotlb_entry": (32, 8, {"offset": 0, "start": 8, "last": 16, "perm": 24}),
    "vduse_config_data": (8, 4, {"offset": 0, "length": 4, "buffer": 8}),
    "vduse_vq_config": (32, 4, {"index": 0, "max_size": 4, "reserved": 6}),
    "vduse_vq_state_split": (2, 2, {"avail_index": 0}),
    "vduse_vq_state_packed": (8, 2, {"last_avail_counter": 0, "last_avail_idx": 2, "last_used_counter": 4,
                                     "last_used_idx": 6}),
    "vduse_vq_info": (48, 8, {"index": 0, "num": 4, "desc_addr": 8, "driver_addr": 16, "device_addr": 24,
                              "split": 32, "packed": 32, "ready": 40}),
    "vduse_vq_eventfd": (8, 4, {"index": 0, "fd": 4}),
    "vduse_iova_umem": (48, 8, {"uaddr": 0, "iova": 8, "size": 16, "reserved": 24}),
    "vduse_iova_info": (48, 8, {"start": 0, "last": 8, "capability": 16, "reserved": 24}),
    "vduse_vq_state": (12, 4, {"index": 0, "split": 4, "packed": 4}),
    "vduse_dev_status": (1, 1, {"status": 0}),
    "vduse_iova_range": (16, 8, {"start": 0, "last": 8}),
    "vduse_dev_request": (152, 8, {"type": 0, "request_id": 4, "reserved": 8, "vq_state": 24, "s": 24, "iova": 24,
                                   "padding": 24}),
    "vduse_dev_response": (152, 4, {"request_id": 0, "result": 4, "reserved": 8, "vq_state": 24, "padding": 24}),
}

#: Structs and ioctls newer than Debian 12's header (umem, 6.3): compared only where defined.
VDUSE_SINCE = {"vduse_iova_umem": "VDUSE_IOTLB_REG_UMEM", "vduse_iova_info": "VDUSE_IOTLB_GET_INFO"}


def vduse_constants() -> dict[str, int]:
    names = ("VDUSE_BASE", "VDUSE_API_VERSION", "VDUSE_NAME_MAX", "VDUSE_ACCESS_RO", "VDUSE_ACCESS_WO",
             "VDUSE_ACCESS_RW", "VDUSE_EVENTFD_DEASSIGN", "VDUSE_IOVA_CAP_UMEM", "VDUSE_REQ_RESULT_OK",
             "VDUSE_REQ_RESULT_FAILED", *vi.VduseReqType.__members__)
    return {name: int(getattr(vi, name)) for name in names}


class VduseAbiTest(unittest.TestCase):
    """The VDUSE section of ioctl.py: golden numbers and layouts, and the C compiler's <linux/vduse.h>."""

    def test_every_ioctl_matches_the_table(self) -> None:
        self.assertEqual({name: int(value) for name, value in vi.VduseIoctl.__members__.items()}, GOLDEN_VDUSE_IOCTLS)
        self.assertEqual(len(vi.VduseIoctl), len(GOLDEN_VDUSE_IOCTLS))     # no aliases
        for member in vi.VduseIoctl:
            self.assertEqual(member >> vi._IOC_TYPESHIFT & 0xFF, vi.VDUSE_BASE)
            self.assertIs(getattr(vi, member.name), member)
            self.assertIn(member.name, vi.__all__)

    def test_sizes_alignments_and_offsets(self) -> None:
        for name, golden in GOLDEN_VDUSE_LAYOUTS.items():
            with self.subTest(name):
                self.assertEqual(layout(name), golden)
                self.assertIn(name, vi.__all__)

    def test_request_types_and_constants(self) -> None:
        self.assertEqual([(m.name, int(m)) for m in vi.VduseReqType],
                         [("VDUSE_GET_VQ_STATE", 0), ("VDUSE_SET_STATUS", 1), ("VDUSE_UPDATE_IOTLB", 2)])
        self.assertEqual((vi.VDUSE_REQ_RESULT_OK, vi.VDUSE_REQ_RESULT_FAILED, vi.VDUSE_NAME_MAX, vi.VDUSE_API_VERSION),
                         (0, 1, 256, 0))
        self.assertEqual((vi.VDUSE_ACCESS_RO, vi.VDUSE_ACCESS_WO, vi.VDUSE_ACCESS_RW), (1, 2, 3))

    def test_layouts_numbers_and_constants_match_the_header(self) -> None:
        # vduse.h uses _IOR and friends without including <linux/ioctl.h> itself (its users always do);
        # its request types are enum members, not macros: printed unconditionally.
        constants = vduse_constants()
        seen = compare_with_c_header(self, ["linux/ioctl.h", "linux/vduse.h"], GOLDEN_VDUSE_LAYOUTS, VDUSE_SINCE,
                                     vi.VduseIoctl, constants, unguarded=vi.VduseReqType.__members__)
        # Debian 12's header (6.1) has every struct and ioctl but the three umem ones (6.3).
        self.assertGreaterEqual(seen["layout"], len(GOLDEN_VDUSE_LAYOUTS) - len(VDUSE_SINCE))
        self.assertGreaterEqual(seen["ioctl"], len(GOLDEN_VDUSE_IOCTLS) - 3)
        self.assertGreaterEqual(seen["const"], len(constants) - 1)


if __name__ == "__main__":
    unittest.main()
