"""vhost_min.vdpa without a kernel: the IOTLB messages written to the device fd (a socket pair
stands in for it; SOCK_SEQPACKET keeps each write one message), their batching order, the config
bounds refused before any ioctl, the status handshake, ring address translation, and the
``kernel`` command when no node is present. A fake kernel answers the ioctls (smbus2 style): it
records each request and plays a vdpa_sim-like device.

The real kernel's answers are in tests/kernel/test_vdpa.py."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import tempfile
import unittest

from tests.unit.test_cli import cli
from vhost_min.errors import IoctlError, NotSupportedError, ProtocolError, VhostError
from vhost_min.ioctl import (VHOST_BACKEND_F_IOTLB_ASID, VHOST_BACKEND_F_IOTLB_BATCH, VHOST_BACKEND_F_IOTLB_MSG_V2,
                             VHOST_IOTLB_MSG_V2, VhostIoctl, encode_iotlb_msg, vhost_msg_v2, vhost_vdpa_config,
                             vhost_vdpa_iova_range, vhost_vring_addr, vhost_vring_state)
from vhost_min.memory import VHOST_ACCESS_RO, VHOST_ACCESS_RW
from vhost_min.user import (VHOST_IOTLB_BATCH_BEGIN, VHOST_IOTLB_BATCH_END, VHOST_IOTLB_INVALIDATE, VHOST_IOTLB_UPDATE,
                            IotlbMsg, MemoryRegion, VringAddr)
from vhost_min.vdpa import VDPA_BACKEND_FEATURES, IovaRange, VhostVdpa, vdpa_nodes
from vhost_min.virtio import DeviceStatus

MSG = ctypes.sizeof(vhost_msg_v2)


class FakeVdpa(VhostVdpa):
    """A VhostVdpa whose ioctls a fake device answers: config space ``config``, IOVA range
    ``iova``, offered backend features ``backend``; ``refuse_features`` makes FEATURES_OK not stick."""

    def __init__(self, fd: int, *, config: bytes = bytes(range(24)), iova: tuple[int, int] = (0, (1 << 64) - 1),
                 backend: int = 0x17E, refuse_features: bool = False) -> None:
        super().__init__(fd=fd)
        self.calls: list[str] = []
        self.statuses: list[int] = []
        self.status = 0
        self.config, self.iova, self.offered_backend = bytearray(config), iova, backend
        self.refuse_features = refuse_features
        self.vring_addrs: list[tuple[int, ...]] = []

    def _ioctl(self, request: VhostIoctl, arg: object = 0) -> int:
        self.calls.append(request.name)
        R = VhostIoctl
        if request == R.VHOST_VDPA_GET_CONFIG_SIZE:
            arg.value = len(self.config)
        elif request == R.VHOST_VDPA_GET_CONFIG:
            head = vhost_vdpa_config.from_buffer(arg)
            start = ctypes.sizeof(vhost_vdpa_config)
            arg[start:start + head.len] = list(self.config[head.off:head.off + head.len])
        elif request == R.VHOST_VDPA_SET_CONFIG:
            head = vhost_vdpa_config.from_buffer(arg)
            start = ctypes.sizeof(vhost_vdpa_config)
            self.config[head.off:head.off + head.len] = bytes(arg[start:start + head.len])
        elif request == R.VHOST_VDPA_GET_IOVA_RANGE:
            arg.first, arg.last = self.iova
        elif request == R.VHOST_VDPA_GET_STATUS:
            arg.value = self.status
        elif request == R.VHOST_VDPA_SET_STATUS:
            self.statuses.append(arg.value)
            self.status = arg.value & ~(DeviceStatus.FEATURES_OK if self.refuse_features else 0)
        elif request == R.VHOST_GET_BACKEND_FEATURES:
            arg.value = self.offered_backend
        elif request == R.VHOST_SET_VRING_ADDR:
            a: vhost_vring_addr = arg
            self.vring_addrs.append((a.index, a.desc_user_addr, a.used_user_addr, a.avail_user_addr))
        return 0


class VdpaFdTest(unittest.TestCase):
    def setUp(self) -> None:
        ours, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(self.kernel.close)
        self.kernel.setblocking(False)
        self.dev = FakeVdpa(ours.detach())
        self.addCleanup(self.dev.close)

    def messages(self) -> list[tuple[int, int, int, int, int, int]]:
        """(type, asid, iova, size, uaddr, perm) of every message written so far, in order."""
        out = []
        while True:
            try:
                raw = self.kernel.recv(1024)
            except BlockingIOError:
                return out
            self.assertEqual(len(raw), MSG)
            msg = vhost_msg_v2.from_buffer_copy(raw)
            self.assertEqual(msg.type, VHOST_IOTLB_MSG_V2)
            out.append((msg.iotlb.type, msg.asid, msg.iotlb.iova, msg.iotlb.size, msg.iotlb.uaddr, msg.iotlb.perm))

    def ack(self, features: int = VDPA_BACKEND_FEATURES) -> None:
        self.assertEqual(self.dev.ack_backend_features(features), features & 0x17E)
        self.assertEqual(self.dev.calls[-2:], ["VHOST_GET_BACKEND_FEATURES", "VHOST_SET_BACKEND_FEATURES"])

    # -- encoding ---------------------------------------------------------------------------------
    def test_dma_map_writes_one_v2_update(self) -> None:
        self.ack()
        self.dev.dma_map(0x10000, 0x2000, 0x7F0000001000, VHOST_ACCESS_RO, asid=1)
        raw = self.kernel.recv(1024)
        self.assertEqual(raw, bytes(encode_iotlb_msg(IotlbMsg(0x10000, 0x2000, 0x7F0000001000, VHOST_ACCESS_RO,
                                                              VHOST_IOTLB_UPDATE), v2=True, asid=1)))
        # struct vhost_msg_v2: u32 type, u32 asid, then vhost_iotlb_msg {iova, size, uaddr, u8 perm, u8 type}
        self.assertEqual(raw[:8], (2).to_bytes(4, "little") + (1).to_bytes(4, "little"))
        self.assertEqual(raw[8:32], (0x10000).to_bytes(8, "little") + (0x2000).to_bytes(8, "little")
                         + (0x7F0000001000).to_bytes(8, "little"))
        self.assertEqual(raw[32:34], bytes([VHOST_ACCESS_RO, VHOST_IOTLB_UPDATE]))
        self.dev.dma_unmap(0x10000, 0x2000, asid=1)
        self.assertEqual(self.messages(), [(VHOST_IOTLB_INVALIDATE, 1, 0x10000, 0x2000, 0, 0)])

    def test_asid_needs_the_asid_backend_feature(self) -> None:
        self.ack(VHOST_BACKEND_F_IOTLB_MSG_V2)
        with self.assertRaisesRegex(VhostError, "VHOST_BACKEND_F_IOTLB_ASID") as caught:
            self.dev.dma_map(0, 0x1000, 0x1000, asid=1)
        self.assertEqual(caught.exception.errno, errno.EINVAL)
        self.assertEqual(self.messages(), [])

    # -- batching ---------------------------------------------------------------------------------
    def test_mem_table_is_one_batch_and_replaces_the_last(self) -> None:
        self.ack()
        self.assertTrue(self.dev.batching)
        a, b = MemoryRegion(0, 0x10000, 0x7F0000000000, 0), MemoryRegion(0x100000, 0x4000, 0x7F0000200000, 0)
        self.dev.set_mem_table([a, b])
        self.assertEqual(self.messages(), [
            (VHOST_IOTLB_BATCH_BEGIN, 0, 0, 0, 0, 0),
            (VHOST_IOTLB_UPDATE, 0, 0, 0x10000, 0x7F0000000000, VHOST_ACCESS_RW),
            (VHOST_IOTLB_UPDATE, 0, 0x100000, 0x4000, 0x7F0000200000, VHOST_ACCESS_RW),
            (VHOST_IOTLB_BATCH_END, 0, 0, 0, 0, 0)])
        self.dev.set_mem_table([b])
        self.assertEqual(self.messages(), [
            (VHOST_IOTLB_BATCH_BEGIN, 0, 0, 0, 0, 0),
            (VHOST_IOTLB_INVALIDATE, 0, 0, 0x10000, 0, 0),
            (VHOST_IOTLB_INVALIDATE, 0, 0x100000, 0x4000, 0, 0),
            (VHOST_IOTLB_UPDATE, 0, 0x100000, 0x4000, 0x7F0000200000, VHOST_ACCESS_RW),
            (VHOST_IOTLB_BATCH_END, 0, 0, 0, 0, 0)])

    def test_no_batch_messages_without_the_batch_feature(self) -> None:
        self.ack(VHOST_BACKEND_F_IOTLB_MSG_V2)
        self.assertFalse(self.dev.batching)
        with self.dev.iotlb_batch():
            self.dev.dma_map(0, 0x1000, 0x7F0000000000)
        self.assertEqual([m[0] for m in self.messages()], [VHOST_IOTLB_UPDATE])

    def test_nested_batches_join_and_end_even_on_error(self) -> None:
        self.ack()
        with self.assertRaises(RuntimeError):
            with self.dev.iotlb_batch():
                with self.dev.iotlb_batch():
                    self.dev.dma_map(0, 0x1000, 0x7F0000000000)
                raise RuntimeError("in the middle")
        self.assertEqual([m[0] for m in self.messages()],
                         [VHOST_IOTLB_BATCH_BEGIN, VHOST_IOTLB_UPDATE, VHOST_IOTLB_BATCH_END])

    def test_a_batch_has_one_address_space(self) -> None:
        self.ack(VHOST_BACKEND_F_IOTLB_MSG_V2 | VHOST_BACKEND_F_IOTLB_BATCH | VHOST_BACKEND_F_IOTLB_ASID)
        with self.dev.iotlb_batch(asid=1):
            with self.assertRaisesRegex(VhostError, "asid 0 inside an IOTLB batch for asid 1"):
                self.dev.dma_map(0, 0x1000, 0x7F0000000000)
        self.assertEqual([m[:2] for m in self.messages()], [(VHOST_IOTLB_BATCH_BEGIN, 1), (VHOST_IOTLB_BATCH_END, 1)])

    def test_mem_table_outside_the_iova_range_is_refused_before_any_message(self) -> None:
        self.dev.iova = (0x1000, 0xFFFFF)
        self.ack()
        with self.assertRaisesRegex(VhostError, "outside the device's IOVA range 0x1000-0xfffff"):
            self.dev.set_mem_table([MemoryRegion(0, 0x10000, 0x7F0000000000, 0)])
        self.assertEqual(self.messages(), [])

    # -- config -----------------------------------------------------------------------------------
    def test_config_read_and_write(self) -> None:
        self.assertEqual(self.dev.get_config(), bytes(range(24)))
        self.assertEqual(self.dev.get_config(6, 2), bytes([6, 7]))
        self.dev.set_config(22, b"\xaa\xbb")
        self.assertEqual(self.dev.get_config(20), bytes([20, 21, 0xAA, 0xBB]))
        self.assertEqual(self.dev.calls.count("VHOST_VDPA_GET_CONFIG_SIZE"), 1)   # asked once

    def test_config_past_its_size_is_refused_before_the_ioctl(self) -> None:
        for offset, size in ((20, 8), (24, 1), (0, 25), (0, 0)):
            with self.subTest(offset=offset, size=size), self.assertRaises(IoctlError) as caught:
                self.dev.get_config(offset, size)
            self.assertEqual((caught.exception.errno, caught.exception.ioctl), (errno.EINVAL, "VHOST_VDPA_GET_CONFIG"))
            self.assertEqual(str(caught.exception), f"VHOST_VDPA_GET_CONFIG of {size} bytes at offset {offset} "
                                                    f"refused before the ioctl: {self.dev.path} has 24 bytes of "
                                                    f"config space")
        with self.assertRaisesRegex(IoctlError, "VHOST_VDPA_SET_CONFIG of 2 bytes at offset 23 refused"):
            self.dev.set_config(23, b"\0\0")
        with self.assertRaisesRegex(ValueError, "config offset -1"):
            self.dev.get_config(-1, 1)
        self.assertNotIn("VHOST_VDPA_GET_CONFIG", self.dev.calls)
        self.assertNotIn("VHOST_VDPA_SET_CONFIG", self.dev.calls)

    # -- status and the Dataplane messages ---------------------------------------------------------
    def test_set_features_is_the_status_handshake(self) -> None:
        self.dev.set_features(1 << 32)
        S = DeviceStatus
        self.assertEqual(self.dev.statuses, [S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.DRIVER,
                                             S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK])
        set_features = self.dev.calls.index("VHOST_SET_FEATURES")
        self.assertLess(self.dev.calls.index("VHOST_VDPA_SET_STATUS"), set_features)
        self.dev.start_device()
        self.assertEqual(self.dev.statuses[-1], S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
        self.dev.reset()
        self.assertEqual(self.dev.statuses[-1], 0)

    def test_features_the_device_refuses(self) -> None:
        self.dev.refuse_features = True
        with self.assertRaisesRegex(ProtocolError, "refused features 0x100000000: FEATURES_OK did not stay set"):
            self.dev.set_features(1 << 32)

    def test_ring_addresses_are_translated_to_iovas(self) -> None:
        with self.assertRaisesRegex(VhostError, "in no region of the memory table") as caught:
            self.dev.set_vring_addr(VringAddr(0, 0, 0x7F0000000000, 0x7F0000002000, 0x7F0000001000, 0))
        self.assertEqual(caught.exception.errno, errno.EFAULT)
        self.ack()
        self.dev.set_mem_table([MemoryRegion(0x100000, 0x10000, 0x7F0000000000, 0)])
        self.dev.set_vring_addr(VringAddr(1, 0, 0x7F0000000000, 0x7F0000002000, 0x7F0000001000, 0))
        self.dev.set_vring_addr_iova(VringAddr(2, 0, 0x5000, 0x7000, 0x6000, 0))
        self.assertEqual(self.dev.vring_addrs, [(1, 0x100000, 0x102000, 0x101000), (2, 0x5000, 0x7000, 0x6000)])

    def test_what_vhost_vdpa_does_not_have(self) -> None:
        for call in (lambda: self.dev.set_log_base(0, 4096), lambda: self.dev.set_log_fd(None),
                     self.dev.reset_owner):
            with self.assertRaises(NotSupportedError):
                call()
        self.assertEqual(self.dev.calls, [])

    def test_status_must_be_a_byte(self) -> None:
        with self.assertRaisesRegex(ValueError, "device status 256"):
            self.dev.set_status(256)


class DataplaneTest(unittest.TestCase):
    def test_every_dataplane_message_is_vdpas_own_or_kernel_vhosts(self) -> None:
        from vhost_min.dataplane import Dataplane
        for name, member in vars(Dataplane).items():
            if callable(member) and not name.startswith("_") and name != "close":
                with self.subTest(name):
                    self.assertIsNot(getattr(VhostVdpa, name), member)


class StructTest(unittest.TestCase):
    def test_uapi_layouts(self) -> None:
        self.assertEqual((ctypes.sizeof(vhost_vdpa_config), ctypes.sizeof(vhost_vdpa_iova_range), MSG), (8, 16, 72))
        self.assertEqual(ctypes.sizeof(vhost_vring_state), 8)

    def test_iova_range(self) -> None:
        r = IovaRange(0x1000, 0xFFFF)
        self.assertTrue(r.contains(0x1000, 0xF000))
        self.assertFalse(r.contains(0x1000, 0xF001))
        self.assertFalse(r.contains(0, 0x10))
        self.assertFalse(r.contains(0x2000, 0))

    def test_nodes_in_numeric_order(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            for n in (10, 2, 0):
                open(os.path.join(d, f"vhost-vdpa-{n}"), "w").close()
            self.assertEqual(vdpa_nodes(os.path.join(d, "vhost-vdpa-*")),
                             [os.path.join(d, f"vhost-vdpa-{n}") for n in (0, 2, 10)])


class KernelCommandTest(unittest.TestCase):
    """``vhost-min kernel`` on a machine without vhost nodes (the real listing is in the kernel tier)."""

    def test_none_present(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            text = cli("kernel", "--dev", d)
            self.assertEqual((text.returncode, text.stderr), (0, ""))
            self.assertEqual(text.stdout.strip(), f"no vhost or vhost-vdpa device nodes in {d} (load vhost_net, "
                             f"vhost_vsock, vhost_scsi or vhost_vdpa; a vDPA device appears as vhost-vdpa-N once "
                             f"`vdpa dev add` binds one to vhost_vdpa)")
            report = cli("kernel", "--dev", d, "--json")
            self.assertEqual((report.returncode, json.loads(report.stdout)), (0, {"dev": d, "devices": []}))

    def test_a_node_that_is_not_a_device_is_reported_not_fatal(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            open(os.path.join(d, "vhost-vdpa-0"), "w").close()
            report = cli("kernel", "--dev", d, "--json")
            self.assertEqual(report.returncode, 0, report.stderr)
            entry, = json.loads(report.stdout)["devices"]
            self.assertEqual(entry["node"], os.path.join(d, "vhost-vdpa-0"))
            # A regular file answers ENOTTY; under qemu-user the emulator answers an ioctl number it
            # does not know with ENOSYS itself (the aarch64 proof runs this tier there).
            refused = r"VHOST_VDPA_GET_DEVICE_ID (is not supported by this kernel|failed: Function not implemented)"
            self.assertRegex(entry["error"], refused)
            text = cli("kernel", "--dev", d)
            self.assertRegex(text.stdout, "vhost-vdpa-0: " + refused)


if __name__ == "__main__":
    unittest.main()
