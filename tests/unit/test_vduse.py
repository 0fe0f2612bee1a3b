"""VDUSE without the kernel (vhost_min.vdpa): a SEQPACKET socket pair stands in for the device fd,
so the kernel's side writes requests and reads our responses exactly as read()/write() on
/dev/vduse/NAME carry them; a fake of the per-device ioctls (the smbus2 way: the call replaced,
the rest real) lets the data path run end to end over a memfd playing the VDUSE domain.

The real kernel is in tests/kernel/test_vduse.py.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import sys
import tempfile
import unittest

from tests.support import open_fds
from vhost_min.blk import VIRTIO_BLK_CONFIG, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_T_OUT, BlkDevice
from vhost_min.device import Device
from vhost_min.errors import IoctlError, ProtocolError, VhostError
from vhost_min.ioctl import (VDUSE_ACCESS_RW, VDUSE_REQ_RESULT_FAILED, VDUSE_REQ_RESULT_OK, VduseIoctl, VduseReqType,
                             vduse_dev_request, vduse_dev_response)
from vhost_min.memory import GuestMemory
from vhost_min.vdpa import REQUEST_SIZE, RESPONSE_SIZE, VduseDevice, check_name
from vhost_min.virtio import (VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_EVENT_IDX, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
                              DeviceStatus)
from vhost_min.packed import PackedDriverQueue
from vhost_min.vring import SplitDriverQueue

S = DeviceStatus
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def request(kind: int, request_id: int, **fields) -> bytes:
    req = vduse_dev_request(type=kind, request_id=request_id)
    if "status" in fields:
        req.s.status = fields["status"]
    if "index" in fields:
        req.vq_state.index = fields["index"]
    if "start" in fields:
        req.iova.start, req.iova.last = fields["start"], fields["last"]
    return bytes(req)


class Recorder(Device):
    """A device that only remembers what the transport told it."""

    device_id = 2
    features = VIRTIO_BLK_F_CONFIG_WCE | VIRTIO_F_RING_PACKED | 1 << 6

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def get_config(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def set_status(self, status: int) -> None:
        self.calls.append(("set_status", status))

    def reset(self) -> None:
        self.calls.append(("reset",))

    def features_set(self, features: int) -> None:
        self.calls.append(("features_set", features))


class Kernel:
    """The kernel's side of the device fd: write requests, read responses."""

    def __init__(self) -> None:
        ours, self.sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.fd = ours.detach()

    def ask(self, vd: VduseDevice, data: bytes) -> vduse_dev_response | None:
        self.sock.send(data)
        vd.handle_requests()
        self.sock.setblocking(False)
        try:
            raw = self.sock.recv(4096)
        except BlockingIOError:
            return None
        finally:
            self.sock.setblocking(True)
        self.last_raw = raw
        return vduse_dev_response.from_buffer_copy(raw)

    def close(self) -> None:
        self.sock.close()


class RequestTest(unittest.TestCase):
    def setUp(self) -> None:
        self.kernel = Kernel()
        self.device = Recorder()
        self.vd = VduseDevice(self.device, "test0", fd=self.kernel.fd)
        self.addCleanup(self.kernel.close)
        self.addCleanup(self.vd.close)

    def test_set_status_answered_ok(self) -> None:
        for i, status in enumerate((S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.DRIVER), start=7):
            resp = self.kernel.ask(self.vd, request(VduseReqType.VDUSE_SET_STATUS, i, status=status))
            self.assertEqual((resp.request_id, resp.result), (i, VDUSE_REQ_RESULT_OK))
            self.assertEqual(self.vd.status, status)
        self.assertEqual(len(self.kernel.last_raw), RESPONSE_SIZE)
        self.assertEqual(bytes(resp.reserved), bytes(16))      # the kernel refuses non-zero reserved words
        self.assertEqual(self.device.calls, [("set_status", 1), ("set_status", 3)])
        self.assertEqual([h[:3] for h in self.vd.history],
                         [("VDUSE_SET_STATUS", "0x1", "OK"), ("VDUSE_SET_STATUS", "0x3", "OK")])

    def test_status_zero_resets(self) -> None:
        self.kernel.ask(self.vd, request(VduseReqType.VDUSE_SET_STATUS, 1, status=S.ACKNOWLEDGE))
        self.vd.iotlb.update_view(0x1000, memoryview(bytearray(0x1000)))
        resp = self.kernel.ask(self.vd, request(VduseReqType.VDUSE_SET_STATUS, 2, status=0))
        self.assertEqual(resp.result, VDUSE_REQ_RESULT_OK)
        self.assertEqual(self.vd.status, 0)
        self.assertEqual(len(self.vd.iotlb), 0)
        self.assertEqual(self.device.calls[-2:], [("set_status", 0), ("reset",)])

    def test_unknown_request_type_answered_failed(self) -> None:
        with self.assertLogs("vhost_min.vdpa", "WARNING") as logs:
            resp = self.kernel.ask(self.vd, request(77, 1234))
        self.assertEqual((resp.request_id, resp.result), (1234, VDUSE_REQ_RESULT_FAILED))
        self.assertIn("request type 77 (id 1234) is unknown: answered VDUSE_REQ_RESULT_FAILED", logs.output[0])
        self.assertEqual(self.vd.history[-1], ("type 77", "", "FAILED"))

    def test_short_request_refused_and_the_next_one_answered(self) -> None:
        with self.assertRaisesRegex(ProtocolError, f"10-byte request; a vduse_dev_request is {REQUEST_SIZE}"):
            self.vd.handle_request(bytes(10))
        errors = []
        self.vd.on_error = errors.append
        with self.assertLogs("vhost_min.vdpa", "ERROR"):
            self.assertIsNone(self.kernel.ask(self.vd, bytes(10)))          # nothing to answer it with
        self.assertIsInstance(self.vd.last_error, ProtocolError)
        self.assertEqual(len(errors), 1)
        resp = self.kernel.ask(self.vd, request(VduseReqType.VDUSE_SET_STATUS, 5, status=S.ACKNOWLEDGE))
        self.assertEqual((resp.request_id, resp.result), (5, VDUSE_REQ_RESULT_OK))
        with self.assertRaises(ProtocolError):
            self.vd.handle_request(bytes(REQUEST_SIZE + 1))

    def test_a_failing_step_answers_failed_and_keeps_the_status(self) -> None:
        # FEATURES_OK reads the driver's features with VDUSE_DEV_GET_FEATURES: a socket says ENOTTY.
        self.kernel.ask(self.vd, request(VduseReqType.VDUSE_SET_STATUS, 1, status=S.ACKNOWLEDGE | S.DRIVER))
        with self.assertLogs("vhost_min.vdpa", "ERROR") as logs:
            resp = self.kernel.ask(self.vd, request(VduseReqType.VDUSE_SET_STATUS, 2,
                                                    status=S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK))
        self.assertIn("VDUSE_SET_STATUS 0xb failed, answered VDUSE_REQ_RESULT_FAILED", logs.output[0])
        self.assertEqual(resp.result, VDUSE_REQ_RESULT_FAILED)
        self.assertEqual(self.vd.status, S.ACKNOWLEDGE | S.DRIVER)
        self.assertIsInstance(self.vd.last_error, IoctlError)
        self.assertEqual(self.vd.last_error.ioctl, "VDUSE_DEV_GET_FEATURES")

    def test_get_vq_state(self) -> None:
        resp = self.kernel.ask(self.vd, request(VduseReqType.VDUSE_GET_VQ_STATE, 3, index=0))
        self.assertEqual((resp.result, resp.vq_state.index, resp.vq_state.split.avail_index),
                         (VDUSE_REQ_RESULT_OK, 0, 0))
        self.vd.rings[0].base = 0x1234
        resp = self.kernel.ask(self.vd, request(VduseReqType.VDUSE_GET_VQ_STATE, 4, index=0))
        self.assertEqual(resp.vq_state.split.avail_index, 0x1234)
        with self.assertLogs("vhost_min.vdpa", "ERROR"):
            resp = self.kernel.ask(self.vd, request(VduseReqType.VDUSE_GET_VQ_STATE, 5, index=9))
        self.assertEqual(resp.result, VDUSE_REQ_RESULT_FAILED)

    def test_update_iotlb_drops_the_range(self) -> None:
        for iova in (0x1000, 0x3000):
            self.vd.iotlb.update_view(iova, memoryview(bytearray(0x1000)))
        resp = self.kernel.ask(self.vd, request(VduseReqType.VDUSE_UPDATE_IOTLB, 6, start=0x3000, last=0x3FFF))
        self.assertEqual(resp.result, VDUSE_REQ_RESULT_OK)
        self.assertEqual(len(self.vd.iotlb), 1)
        self.vd.iotlb.segments(0x1000, 0x1000)                   # still there
        resp = self.kernel.ask(self.vd, request(VduseReqType.VDUSE_UPDATE_IOTLB, 7, start=0, last=(1 << 64) - 1))
        self.assertEqual((resp.result, len(self.vd.iotlb)), (VDUSE_REQ_RESULT_OK, 0))
        with self.assertLogs("vhost_min.vdpa", "ERROR"):
            resp = self.kernel.ask(self.vd, request(VduseReqType.VDUSE_UPDATE_IOTLB, 8, start=0x2000, last=0x1000))
        self.assertEqual(resp.result, VDUSE_REQ_RESULT_FAILED)

    def test_offered_features(self) -> None:
        offered = self.vd.device_features
        for bit in (VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_EVENT_IDX, VIRTIO_F_RING_PACKED, 1 << 6):
            self.assertTrue(offered & bit, hex(bit))
        # VDUSE refuses CONFIG_WCE (its config space is read-only).
        self.assertFalse(offered & VIRTIO_BLK_F_CONFIG_WCE)
        kernel = Kernel()
        self.addCleanup(kernel.close)
        with VduseDevice(Recorder(), "split", packed=False, fd=kernel.fd) as split:
            self.assertEqual(split.device_features, offered & ~VIRTIO_F_RING_PACKED)

    def test_a_forgotten_device_releases_its_fds(self) -> None:
        kernel = Kernel()
        self.addCleanup(kernel.close)
        before = open_fds()
        VduseDevice(Recorder(), "forgotten", fd=os.dup(kernel.fd))     # device and transport both dropped
        import gc
        gc.collect()                                                   # (they refer to each other)
        self.assertEqual(open_fds(), before)

    def test_close_owns_the_fd(self) -> None:
        fd = self.vd.fileno()
        self.assertFalse(os.get_blocking(fd))
        self.vd.close()
        self.assertTrue(self.vd.closed)
        with self.assertRaises(OSError):
            os.fstat(fd)
        self.assertIsNone(self.device.backend)
        self.vd.close()                                          # twice is fine
        with self.assertRaisesRegex(VhostError, "closed"):
            self.vd.fileno()


class ArgumentTest(unittest.TestCase):
    def test_lazy_top_level_name(self) -> None:
        import vhost_min
        self.assertIs(vhost_min.VduseDevice, VduseDevice)
        self.assertIn("VduseDevice", vhost_min.__all__)

    def test_names(self) -> None:
        self.assertEqual(check_name("vduse-blk0"), b"vduse-blk0")
        for bad in ("", "a/b", "control", "x" * 256, "tab\there", "é"):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                check_name(bad)

    def test_queue_size_and_device(self) -> None:
        with self.assertRaises(TypeError):
            VduseDevice(object(), "x", fd=0)        # type: ignore[arg-type]
        for size in (0, 3, 65536):
            with self.subTest(size=size), self.assertRaisesRegex(ValueError, "power of two"):
                VduseDevice(Recorder(), "x", queue_size=size, fd=0)

    def test_no_control_node_says_so_and_leaks_nothing(self) -> None:
        before = open_fds()
        with self.assertRaisesRegex(VhostError, "cannot open /nonexistent/control.*vduse module"):
            VduseDevice(Recorder(), "x", control="/nonexistent/control")
        self.assertEqual(open_fds(), before)


class CommandTest(unittest.TestCase):
    """``python3 -m vhost_min vduse-blk`` where there is no VDUSE (the kernel tier runs it for real)."""

    def test_without_vduse_one_line_and_status_1(self) -> None:
        if os.path.exists("/dev/vduse/control"):
            self.skipTest("this machine has VDUSE: the command would create a device (the kernel tier runs it)")
        with tempfile.TemporaryDirectory() as tmp:
            image = os.path.join(tmp, "disk.img")
            with open(image, "wb") as f:
                f.truncate(1 << 20)
            result = subprocess.run([sys.executable, "-m", "vhost_min", "vduse-blk", image], cwd=ROOT,
                                    capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, "vhost-min: cannot open /dev/vduse/control: No such file or directory "
                                        "(is the vduse module loaded?)\n")
        self.assertEqual(result.stdout, "")

    def test_help_names_the_vdpa_commands(self) -> None:
        result = subprocess.run([sys.executable, "-m", "vhost_min", "vduse-blk", "--help"], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0)
        text = " ".join(result.stdout.split())
        for words in ("vdpa dev add mgmtdev vduse name NAME", "vdpa dev del NAME", "--read-only", "--num-queues",
                      "--name NAME"):
            self.assertIn(words, text)


# --------------------------------------------------------------------------------------------
# The data path against a fake of the device ioctls
# --------------------------------------------------------------------------------------------

QUEUE = 16
DOMAIN = 0x40000          # the fake VDUSE domain: one memfd, IOVA = offset


class FakeIoctls:
    """VDUSE's per-device ioctls as the kernel answers them for one ready ring in a memfd domain."""

    def __init__(self, features: int, ring: dict, name: str) -> None:
        self.features, self.ring, self.name = features, ring, name
        self.packed = bool(features & VIRTIO_F_RING_PACKED)
        self.domain = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.domain, DOMAIN)
        self.calls: list[str] = []
        self.kick_fd: int | None = None
        self.irqs: list[int] = []

    def __call__(self, request: VduseIoctl, arg: object = 0) -> int:
        self.calls.append(request.name)
        if request == VduseIoctl.VDUSE_DEV_GET_FEATURES:
            arg.value = self.features
        elif request == VduseIoctl.VDUSE_VQ_GET_INFO:
            arg.num, arg.ready = QUEUE, 1
            ring = self.ring
            arg.desc_addr, arg.driver_addr, arg.device_addr = ring["desc"], ring["driver"], ring["device"]
            if self.packed:         # what virtio_vdpa sets for a fresh packed ring: both wrap counters 1
                arg.packed.last_avail_counter = arg.packed.last_used_counter = 1
        elif request == VduseIoctl.VDUSE_VQ_SETUP_KICKFD:
            self.kick_fd = None if arg.fd < 0 else arg.fd
        elif request == VduseIoctl.VDUSE_IOTLB_GET_FD:
            if arg.start >= DOMAIN:
                raise IoctlError("VDUSE_IOTLB_GET_FD failed: Invalid argument", errno.EINVAL, ioctl=request.name)
            arg.start, arg.last, arg.offset, arg.perm = 0, DOMAIN - 1, 0, VDUSE_ACCESS_RW
            return os.dup(self.domain)
        elif request == VduseIoctl.VDUSE_VQ_INJECT_IRQ:
            self.irqs.append(arg.value)
        elif request == VduseIoctl.VDUSE_DEV_SET_CONFIG:
            self.config = bytes(arg)
        return 0


class DataPathTest(unittest.TestCase):
    """A split ring (the packed variant below runs the same tests)."""

    PACKED = False

    def setUp(self) -> None:
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.image = os.path.join(tmp.name, "disk.img")
        with open(self.image, "wb") as f:
            f.truncate(1 << 20)
        self.fds_before = open_fds()
        self.blk = BlkDevice(self.image)
        self.addCleanup(self.blk.close)
        self.kernel = Kernel()
        self.addCleanup(self.kernel.close)
        self.vd = VduseDevice(self.blk, "blk0", fd=self.kernel.fd)
        self.addCleanup(self.vd.close)
        # The driver's view of the domain: the same memfd, the ring at 0x1000.
        self.driver_class = PackedDriverQueue if self.PACKED else SplitDriverQueue
        self.ring = self.driver_class.layout(QUEUE, 0x1000)
        features = self.vd.device_features & ~VIRTIO_F_EVENT_IDX
        features = features if self.PACKED else features & ~VIRTIO_F_RING_PACKED
        self.fake = FakeIoctls(features, self.ring, f"fake-vduse-{id(self):x}")
        self.addCleanup(lambda: self.fake.domain >= 0 and os.close(self.fake.domain))
        self.vd._ioctl = self.fake
        self.memory = GuestMemory()
        self.memory.add_region(0, DOMAIN, fd=self.fake.domain)
        self.addCleanup(self.memory.clear)
        self.addCleanup(setattr, self, "driver", None)
        self.driver = self.new_driver()

    def new_driver(self):
        return self.driver_class(self.memory, QUEUE, self.ring["desc"], self.ring["driver"], self.ring["device"])

    def bring_up(self) -> None:
        for i, status in enumerate((S.ACKNOWLEDGE, S.ACKNOWLEDGE | S.DRIVER,
                                    S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK,
                                    S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)):
            resp = self.kernel.ask(self.vd, request(VduseReqType.VDUSE_SET_STATUS, i, status=status))
            self.assertEqual(resp.result, VDUSE_REQ_RESULT_OK, self.vd.last_error)

    def write_sector(self, sector: int, data: bytes) -> int:
        hdr, buf, status = 0x10000, 0x11000, 0x12000
        self.memory.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, sector))
        self.memory.write(buf, data)
        self.memory.write(status, b"\xff")
        self.driver.add([(hdr, 16), (buf, len(data))], [(status, 1)])
        self.driver.publish()
        os.eventfd_write(self.fake.kick_fd, 1)
        self.vd.watched()[self.fake.kick_fd]()       # what the loop does when the kick fd is readable
        self.assertEqual(len(self.driver.reap()), 1)
        return self.memory.read(status, 1)[0]

    def test_driver_ok_serves_the_ring_and_interrupts(self) -> None:
        self.bring_up()
        self.assertEqual(self.vd.features, self.fake.features)
        self.assertTrue(self.blk.image.writeback)                # BlkDevice.features_set saw FLUSH
        self.assertIsNotNone(self.fake.kick_fd)
        self.assertIn(self.fake.kick_fd, self.vd.watched())
        data = os.urandom(4096)
        self.assertEqual(self.write_sector(8, data), 0)
        with open(self.image, "rb") as f:
            self.assertEqual(os.pread(f.fileno(), 4096, 8 * 512), data)
        self.assertEqual(self.fake.irqs, [0])
        self.assertEqual(self.fake.calls.count("VDUSE_IOTLB_GET_FD"), 1)   # one entry covers the domain
        self.assertEqual([h[0] for h in self.vd.history if h[0] == "IOTLB_GET_FD"], ["IOTLB_GET_FD"])

        # UPDATE_IOTLB drops our mapping: the next request looks the entry up again.
        resp = self.kernel.ask(self.vd, request(VduseReqType.VDUSE_UPDATE_IOTLB, 9, start=0, last=DOMAIN - 1))
        self.assertEqual(resp.result, VDUSE_REQ_RESULT_OK)
        self.assertEqual(len(self.vd.iotlb), 0)
        self.assertEqual(self.write_sector(9, data), 0)
        self.assertEqual(self.fake.calls.count("VDUSE_IOTLB_GET_FD"), 2)
        resp = self.kernel.ask(self.vd, request(VduseReqType.VDUSE_GET_VQ_STATE, 10, index=0))
        if self.PACKED:         # indices count descriptor slots: two chains of three
            p = resp.vq_state.packed
            self.assertEqual((p.last_avail_idx, p.last_avail_counter, p.last_used_idx, p.last_used_counter),
                             (6, 1, 6, 1))
        else:
            self.assertEqual(resp.vq_state.split.avail_index, 2)

    def test_config_change(self) -> None:
        self.bring_up()
        self.assertIs(self.vd.notify_config_change(), True)
        self.assertEqual(self.fake.calls[-2:], ["VDUSE_DEV_SET_CONFIG", "VDUSE_DEV_INJECT_CONFIG_IRQ"])
        offset, length = struct.unpack_from("<II", self.fake.config)
        self.assertEqual((offset, length), (0, VIRTIO_BLK_CONFIG.size))
        self.assertEqual(self.fake.config[8:], self.blk.get_config(0, VIRTIO_BLK_CONFIG.size))
        self.assertEqual(struct.unpack_from("<Q", self.fake.config, 8)[0], (1 << 20) // 512)

    def test_reset_and_close_leave_no_fd_and_no_mapping(self) -> None:
        self.bring_up()
        self.write_sector(1, bytes(512))
        kick = self.fake.kick_fd
        self.kernel.ask(self.vd, request(VduseReqType.VDUSE_SET_STATUS, 20, status=0))
        self.assertEqual((self.vd.status, len(self.vd.iotlb)), (0, 0))
        self.assertNotIn(kick, self.vd.watched())
        with self.assertRaises(OSError):
            os.fstat(kick)
        # a new negotiation works, on a ring the driver set up afresh (as after any reset)
        self.memory.write(0x1000, bytes(self.ring["end"] - 0x1000))
        self.driver = self.new_driver()
        self.bring_up()
        self.assertEqual(self.write_sector(2, bytes(512)), 0)
        self.vd.close()
        self.assertEqual(self.fake.calls[-1], "VDUSE_VQ_SETUP_KICKFD")   # deassigned on close
        self.assertIsNone(self.fake.kick_fd)
        self.driver = None                                       # the driver side's ring views go too
        self.memory.clear()
        os.close(self.fake.domain)
        self.fake.domain = -1
        self.kernel.close()
        self.blk.close()
        leaked = open_fds() - self.fds_before
        self.assertEqual(leaked, set())
        with open("/proc/self/maps") as f:
            self.assertEqual([line for line in f if self.fake.name in line], [])

    def test_an_unmapped_ring_breaks_that_ring_only(self) -> None:
        self.ring["desc"] = DOMAIN + 0x1000                      # outside the domain: GET_FD says EINVAL
        self.bring_up()
        os.eventfd_write(self.fake.kick_fd, 1)
        with self.assertLogs("vhost_min.vdpa", "ERROR"):
            self.vd.watched()[self.fake.kick_fd]()
        self.assertIn("not mapped", self.vd.rings[0].broken)
        resp = self.kernel.ask(self.vd, request(VduseReqType.VDUSE_SET_STATUS, 30, status=0))
        self.assertEqual(resp.result, VDUSE_REQ_RESULT_OK)
        self.assertIsNone(self.vd.rings[0].broken)               # a reset clears it


class AsyncBlk(BlkDevice):
    """An asynchronous device (device.py's contract): chains handled in a thread of their own,
    completed with backend.post_used; stopped() waits for them."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.threads: list = []
        self.release = __import__("threading").Event()

    def process(self, queue: int, vq) -> bool:
        import threading
        chains = vq.pop_batch(8)

        def work() -> None:
            self.release.wait(10)
            self.backend.post_used(queue, [(head, self.handle(queue, r, w)) for head, r, w in chains])

        if chains:
            thread = threading.Thread(target=work)
            thread.start()
            self.threads.append(thread)
        return False

    def stopped(self, queue: int) -> None:
        self.release.set()
        for thread in self.threads:
            thread.join(10)


class AsyncDataPathTest(DataPathTest):
    """post_used from another thread: pushed and signalled by the loop (its wake fd)."""

    def setUp(self) -> None:
        super().setUp()
        self.vd.close()
        self.blk.close()
        self.kernel.close()
        self.blk = AsyncBlk(self.image)
        self.kernel = Kernel()
        self.addCleanup(self.kernel.close)
        self.vd = VduseDevice(self.blk, "async0", fd=self.kernel.fd)
        self.addCleanup(self.vd.close)
        self.vd._ioctl = self.fake

    def write_sector(self, sector: int, data: bytes) -> int:
        hdr, buf, status = 0x10000, 0x11000, 0x12000
        self.memory.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, sector))
        self.memory.write(buf, data)
        self.memory.write(status, b"\xff")
        self.driver.add([(hdr, 16), (buf, len(data))], [(status, 1)])
        self.driver.publish()
        os.eventfd_write(self.fake.kick_fd, 1)
        self.vd.watched()[self.fake.kick_fd]()
        self.assertEqual(self.driver.reap(), [])                # still in the device's thread
        self.blk.release.set()
        self.blk.threads[-1].join(10)
        wake = [fd for fd, handler in self.vd.watched().items() if handler == self.vd._on_wake]
        self.assertEqual(len(wake), 1)
        self.assertTrue(select_readable(wake[0]))             # post_used woke the loop...
        self.vd.watched()[wake[0]]()                          # ...which pushes and signals
        self.assertEqual(len(self.driver.reap()), 1)
        self.blk.release.clear()
        return self.memory.read(status, 1)[0]

    def test_reset_finishes_what_the_device_holds(self) -> None:
        self.bring_up()
        self.memory.write(0x10000, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 3))
        self.memory.write(0x12000, b"\xff")
        self.driver.add([(0x10000, 16), (0x11000, 512)], [(0x12000, 1)])
        self.driver.publish()
        os.eventfd_write(self.fake.kick_fd, 1)
        self.vd.watched()[self.fake.kick_fd]()
        irqs = len(self.fake.irqs)
        # Status 0 while a chain is in the device's thread: stopped() lets it finish, and its
        # completion is pushed (and signalled) before the ring is dropped.
        resp = self.kernel.ask(self.vd, request(VduseReqType.VDUSE_SET_STATUS, 40, status=0))
        self.assertEqual(resp.result, VDUSE_REQ_RESULT_OK)
        self.assertEqual(self.memory.read(0x12000, 1), b"\0")
        self.assertEqual(len(self.driver.reap()), 1)
        self.assertEqual(len(self.fake.irqs), irqs + 1)


def select_readable(fd: int) -> bool:
    import select
    return bool(select.select([fd], [], [], 5)[0])


class PackedDataPathTest(DataPathTest):
    PACKED = True


if __name__ == "__main__":
    unittest.main()
