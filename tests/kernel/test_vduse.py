"""VDUSE for real (vhost_min.vdpa), inside a QEMU guest booting Debian's 6.12 kernel: our Python
virtio-blk device (BlkDevice, the very code the vhost-user back-end serves) becomes a kernel block
device through vDPA.

In the guest, one boot:

- ``vduse_blk``: VduseDevice(BlkDevice(image)) served by its own loop in a thread; ``vdpa dev add
  mgmtdev vduse name NAME`` binds it to virtio_vdpa and virtio_blk gives /dev/vdX. Its capacity
  (/sys/block/vdX/size) is the image's; bytes put in the image beforehand read back through
  /dev/vdX with O_DIRECT; dd writes a pattern with O_DIRECT and it is in the image file itself
  (os.pread), and reads back through the device. ``vdpa dev del`` removes the disk, close()
  destroys the device (VDUSE_DESTROY_DEV): /dev/vduse/NAME is gone, and no fd or mapping of ours
  is left. What the kernel asked (request types in order, status bytes, IOTLB entries fetched,
  ring layouts) and the features it negotiated (a packed ring: Linux takes it when offered) are
  reported as facts. A config change (the device reports another capacity,
  notify_config_change()) resizes /dev/vdX.
- ``vduse_create``: a second device under a taken name is refused with EEXIST, by name; closing
  while the vDPA device exists is refused with EBUSY, saying what to do; the device outlives our
  fd, and a new VduseDevice on a freshly opened /dev/vduse/NAME answers the reset ``vdpa dev del``
  sends (without it the kernel waits 30 s per request and marks the device broken).
- ``vduse_mq``: two request queues (the guest has two vCPUs): an O_DIRECT read from each vCPU is
  served by its own ring.
- ``vduse_unanswered``: nobody answers (msg_timeout set to 1 s, no loop running) while ``vdpa
  dev add`` probes: the kernel marks the device broken (POLLERR on its fd) and
  ``handle_requests()`` raises saying so; ``vdpa dev del`` and destroying it still work.
- ``vduse_net``: a virtio-net device over VDUSE on split rings (a test device that echoes every
  frame): virtio_net makes eth0 with our MAC; a frame sent on it comes out of our TX ring byte for
  byte and its echo is received through our RX ring.
- ``vduse_vhost_vdpa``: the same device bound to vhost_vdpa (virtio_vdpa unloaded first) and
  driven by the package's own userspace driver (vdpa.VdpaDriver) as a VMM would: a write lands in
  the image, a read returns its bytes; the kernel's UPDATE_IOTLB and GET_VQ_STATE requests are
  answered (GET_VRING_BASE returns our avail index).
- ``vduse_cli``: ``python3 -m vhost_min vduse-blk IMAGE --name NAME --read-only --num-queues 2``
  serves until SIGTERM: a read-only disk with two request queues (virtio_blk uses no more queues
  than CPUs: hence two vCPUs) appears and reads, and after ``vdpa dev del`` SIGTERM
  ends it with status 0 and the device gone.

About 35 s under TCG: the boot (~8 s) and seven devices (~20 s), the kernel's own I/O (partition
scan) included, all through Python.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from tests.kernel import GuestChecks, run_checks

GUEST_MODULES = ("vduse", "virtio_vdpa", "virtio_blk", "virtio_net")
IMAGE_SIZE = 8 << 20
SECTOR = 512
#: Bound on every wait for the kernel inside the guest; a hang fails the check, it never passes it.
WAIT = 60.0


# --------------------------------------------------------------------------------------------
# Guest side
# --------------------------------------------------------------------------------------------

def vdpa(*args: str, timeout: float = WAIT) -> subprocess.CompletedProcess:
    return subprocess.run([shutil.which("vdpa") or "vdpa", *args], capture_output=True, text=True, timeout=timeout)


def wait_for(what: str, predicate, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        time.sleep(0.05)


def disk_of(name: str) -> str | None:
    """The block device virtio_blk made for vDPA device ``name`` (vda...), or None yet."""
    found = glob.glob(f"/sys/bus/vdpa/devices/{name}/virtio*/block/vd*")
    return os.path.basename(found[0]) if found else None


def vduse_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("vduse" in line for line in f)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def direct_read(path: str, offset: int, length: int) -> bytes:
    """Read through O_DIRECT into a page-aligned buffer: the bytes come from the device, not a cache."""
    buf = mmap.mmap(-1, length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], offset)
        return bytes(buf[:n])
    finally:
        os.close(fd)
        buf.close()


def dd_write(source: str, target: str, block: int, seek: int, count: int) -> dict:
    """busybox dd with oflag=direct (buffered + fsync where busybox's buffer is not aligned for it)."""
    args = ["dd", f"if={source}", f"of={target}", f"bs={block}", f"seek={seek}", f"count={count}"]
    direct = subprocess.run(args + ["oflag=direct", "conv=notrunc"], capture_output=True, text=True, timeout=WAIT)
    if direct.returncode == 0:
        return {"direct": True, "stderr": direct.stderr.strip()}
    buffered = subprocess.run(args + ["conv=notrunc,fsync"], capture_output=True, text=True, timeout=WAIT)
    if buffered.returncode != 0:
        raise RuntimeError(f"dd failed: {direct.stderr} / {buffered.stderr}")
    return {"direct": False, "direct_error": direct.stderr.strip(), "stderr": buffered.stderr.strip()}


@contextlib.contextmanager
def served(vd):
    """Run the device's loop in a thread while the body runs; stop and join it afterwards."""
    thread = threading.Thread(target=vd.run, name=f"vduse {vd.name}", daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        vd.stop()
        thread.join(WAIT)


def resizable_blk(image: str):
    """A BlkDevice whose config space can report another capacity (``reported``), to watch the
    kernel re-read it after a config interrupt."""
    from vhost_min.blk import BlkDevice

    class ResizableBlk(BlkDevice):
        reported: int | None = None

        def config(self):
            config = super().config()
            return config if self.reported is None else config._replace(capacity=self.reported)

    return ResizableBlk(image)


def check_vduse_blk() -> dict:
    from vhost_min.vdpa import VduseDevice

    name = "vhost-min-vduse0"
    rng = random.Random(20261203)
    facts: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        image = os.path.join(tmp, "disk.img")
        marker = rng.randbytes(8 * SECTOR)
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)
            f.seek(IMAGE_SIZE - len(marker))
            f.write(marker)                         # the last 4 KiB: read back through the disk
        fds_before, maps_before = open_fds(), vduse_mappings()
        device = resizable_blk(image)
        vd = VduseDevice(device, name)
        facts["device_features"] = vd.device_features
        facts["node_after_create"] = os.path.exists(f"/dev/vduse/{name}")
        try:
            with served(vd) as thread:
                t0 = time.monotonic()
                added = vdpa("dev", "add", "mgmtdev", "vduse", "name", name)
                facts["vdpa_add"] = [added.returncode, added.stderr.strip()]
                disk = wait_for("/dev/vdX", lambda: disk_of(name))
                facts["attach_seconds"] = round(time.monotonic() - t0, 1)
                facts["disk"] = disk
                facts["driver"] = os.path.basename(os.readlink(f"/sys/bus/vdpa/devices/{name}/driver"))
                with open(f"/sys/block/{disk}/size") as f:
                    facts["sys_size_sectors"] = int(f.read())
                facts["image_sectors"] = IMAGE_SIZE // SECTOR
                dev = f"/dev/{disk}"
                wait_for(dev, lambda: os.path.exists(dev))
                facts["marker_read_back"] = direct_read(dev, IMAGE_SIZE - len(marker), len(marker)) == marker

                pattern = rng.randbytes(64 << 10)
                source = os.path.join(tmp, "pattern")
                with open(source, "wb") as f:
                    f.write(pattern)
                offset = 1 << 20
                t0 = time.monotonic()
                facts["dd"] = dd_write(source, dev, 4096, offset // 4096, len(pattern) // 4096)
                facts["dd_seconds"] = round(time.monotonic() - t0, 2)
                with open(image, "rb") as f:
                    facts["pattern_in_image"] = os.pread(f.fileno(), len(pattern), offset) == pattern
                    facts["image_untouched_before"] = os.pread(f.fileno(), offset, 0) == bytes(offset)
                facts["pattern_read_back"] = direct_read(dev, offset, len(pattern)) == pattern
                back = subprocess.run(["dd", f"if={dev}", "bs=4096", f"skip={offset // 4096}",
                                       f"count={len(pattern) // 4096}", "iflag=direct"],
                                      capture_output=True, timeout=WAIT)
                facts["dd_read_direct"] = [back.returncode, back.stdout == pattern]

                # Throughput, a fact (TCG: the guest's CPU is emulated, ours is not): 4 MiB each way
                # with O_DIRECT in 256 KiB requests, and the bytes checked in the image.
                bulk = rng.randbytes(4 << 20)
                bulk_source = os.path.join(tmp, "bulk")
                with open(bulk_source, "wb") as f:
                    f.write(bulk)
                t0 = time.monotonic()
                wrote = subprocess.run(["dd", f"if={bulk_source}", f"of={dev}", "bs=256k", "seek=8", "oflag=direct",
                                        "conv=notrunc"], capture_output=True, timeout=WAIT)
                write_s = time.monotonic() - t0
                t0 = time.monotonic()
                read = subprocess.run(["dd", f"if={dev}", "bs=256k", "skip=8", "count=16", "iflag=direct"],
                                      capture_output=True, timeout=WAIT)
                read_s = time.monotonic() - t0
                with open(image, "rb") as f:
                    in_image = os.pread(f.fileno(), len(bulk), 2 << 20) == bulk
                facts["bulk"] = {"write_rc": wrote.returncode, "read_rc": read.returncode, "in_image": in_image,
                                 "read_back": read.stdout == bulk, "write_MiB_s": round(4 / write_s, 1),
                                 "read_MiB_s": round(4 / read_s, 1)}

                # A config change: the device reports half the capacity, the driver is told
                # (VDUSE_DEV_SET_CONFIG + INJECT_CONFIG_IRQ) and virtio_blk re-reads it.
                device.reported = IMAGE_SIZE // SECTOR // 2
                facts["config_irq"] = vd.notify_config_change()
                size_path = f"/sys/block/{disk}/size"
                facts["resized_sectors"] = wait_for("the new capacity", lambda: int(open(size_path).read())
                                                    if int(open(size_path).read()) != IMAGE_SIZE // SECTOR else 0)

                facts["negotiated_features"] = vd.features
                facts["status"] = vd.status
                facts["rings"] = [[r.index, r.num, r.started, r.broken] for r in vd.rings]
                deleted = vdpa("dev", "del", name)
                facts["vdpa_del"] = [deleted.returncode, deleted.stderr.strip()]
                wait_for("the disk to go", lambda: not os.path.exists(dev))
                facts["disk_gone"] = not os.path.exists(dev)
                facts["status_after_del"] = vd.status
                facts["loop_alive"] = thread.is_alive()
            facts["history"] = [list(map(str, entry)) for entry in vd.history]
            facts["last_error"] = repr(vd.last_error) if vd.last_error else None
        finally:
            vd.close()
            device.close()
        facts["node_after_close"] = os.path.exists(f"/dev/vduse/{name}")
        shown = vdpa("-j", "dev", "show")
        facts["vdpa_dev_show_after"] = shown.stdout.strip()
        facts["fds_leaked"] = open_fds() - fds_before
        facts["mappings_left"] = vduse_mappings() - maps_before
    return facts


def destroy_by_name(name: str) -> None:
    """VDUSE_DESTROY_DEV as any process may issue it (the kernel refuses while the device is open or attached)."""
    import ctypes
    from vhost_min.ioctl import VDUSE_NAME_MAX, VduseIoctl, ioctl
    ctl = os.open("/dev/vduse/control", os.O_RDWR | os.O_CLOEXEC)
    try:
        ioctl(ctl, VduseIoctl.VDUSE_DESTROY_DEV, (ctypes.c_char * VDUSE_NAME_MAX)(*name.encode()),
              name="VDUSE_DESTROY_DEV")
    finally:
        os.close(ctl)


def check_vduse_create() -> dict:
    """A taken name, closing while attached (EBUSY), and serving the device again from a new fd."""
    from vhost_min.blk import BlkDevice
    from vhost_min.errors import IoctlError
    from vhost_min.vdpa import VduseDevice

    facts: dict = {}
    name = "vhost-min-vduse1"
    with tempfile.TemporaryDirectory() as tmp:
        image = os.path.join(tmp, "disk.img")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        with BlkDevice(image) as first, BlkDevice(image) as second:
            vd = VduseDevice(first, name)
            try:
                try:
                    VduseDevice(second, name)
                except IoctlError as exc:
                    facts["eexist"] = [exc.ioctl, exc.errno, str(exc)]
                facts["second_free"] = second.backend is None
                with served(vd):
                    facts["vdpa_add"] = vdpa("dev", "add", "mgmtdev", "vduse", "name", name).returncode
                    facts["disk"] = wait_for("/dev/vdX", lambda: disk_of(name))
            finally:
                try:
                    vd.close()          # the vDPA device exists: refused, after our fds are released
                except IoctlError as exc:
                    facts["ebusy"] = [exc.ioctl, exc.errno, str(exc)]
            facts["closed"] = vd.closed
            facts["node_while_attached"] = os.path.exists(f"/dev/vduse/{name}")
            # The device outlives our fd (the kernel queues its requests): a new fd serves it again.
            fd = os.open(f"/dev/vduse/{name}", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            again = VduseDevice(second, name, fd=fd)
            try:
                with served(again):
                    facts["vdpa_del"] = vdpa("dev", "del", name).returncode
                    gone = f"/dev/{facts['disk']}"
                    wait_for("the disk to go", lambda: not disk_of(name) and not os.path.exists(gone))
                facts["again_history"] = [list(map(str, entry)) for entry in again.history]
            finally:
                again.close()           # fd mode: the device is not ours to destroy
            facts["node_after_fd_close"] = os.path.exists(f"/dev/vduse/{name}")
            destroy_by_name(name)
        facts["node_after_destroy"] = os.path.exists(f"/dev/vduse/{name}")
    return facts


def check_vduse_mq() -> dict:
    """Two request queues: a read issued from each vCPU is served by the ring blk-mq maps it to."""
    from vhost_min.blk import BlkDevice
    from vhost_min.vdpa import VduseDevice

    class CountingBlk(BlkDevice):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.chains = [0, 0]

        def handle(self, queue, readable, writable):
            self.chains[queue] += 1
            return super().handle(queue, readable, writable)

    facts: dict = {}
    name = "vhost-min-mq"
    with tempfile.TemporaryDirectory() as tmp:
        image = os.path.join(tmp, "disk.img")
        data = random.Random(9).randbytes(2 << 20)
        with open(image, "wb") as f:
            f.write(data)
        with CountingBlk(image, num_queues=2) as blk, VduseDevice(blk, name) as vd:
            with served(vd):
                facts["vdpa_add"] = vdpa("dev", "add", "mgmtdev", "vduse", "name", name).returncode
                disk = wait_for("/dev/vdX", lambda: disk_of(name))
                wait_for(f"/dev/{disk}", lambda: os.path.exists(f"/dev/{disk}"))
                facts["mq"] = sorted(os.listdir(f"/sys/block/{disk}/mq"))
                before = list(blk.chains)
                facts["reads"] = []
                cpus = os.sched_getaffinity(0)
                try:
                    for cpu in (0, 1):
                        os.sched_setaffinity(0, {cpu})
                        counted = list(blk.chains)
                        offset = (1 + cpu) << 19
                        ok = direct_read(f"/dev/{disk}", offset, 64 << 10) == data[offset:offset + (64 << 10)]
                        facts["reads"].append([cpu, ok, [a - b for a, b in zip(blk.chains, counted)]])
                finally:
                    os.sched_setaffinity(0, cpus)
                facts["chains_before"] = before
                facts["rings"] = [[r.index, r.num, r.started, r.broken] for r in vd.rings]
                facts["vdpa_del"] = vdpa("dev", "del", name).returncode
    return facts


def check_vduse_cli() -> dict:
    facts: dict = {}
    name = "vhost-min-cli"
    with tempfile.TemporaryDirectory() as tmp:
        image = os.path.join(tmp, "disk.img")
        data = random.Random(7).randbytes(4096)
        with open(image, "wb") as f:
            f.write(data)
            f.truncate(2 << 20)
        proc = subprocess.Popen([sys.executable, "-m", "vhost_min", "vduse-blk", image, "--name", name,
                                 "--read-only", "--num-queues", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(f"/dev/vduse/{name}", lambda: os.path.exists(f"/dev/vduse/{name}") or proc.poll() is not None)
            facts["running"] = proc.poll() is None
            added = vdpa("dev", "add", "mgmtdev", "vduse", "name", name)
            facts["vdpa_add"] = [added.returncode, added.stderr.strip()]
            disk = wait_for("/dev/vdX", lambda: disk_of(name))
            wait_for(f"/dev/{disk}", lambda: os.path.exists(f"/dev/{disk}"))
            with open(f"/sys/block/{disk}/ro") as f:
                facts["ro"] = f.read().strip()
            facts["mq"] = sorted(os.listdir(f"/sys/block/{disk}/mq"))
            facts["read_back"] = direct_read(f"/dev/{disk}", 0, 4096) == data
            deleted = vdpa("dev", "del", name)
            facts["vdpa_del"] = deleted.returncode
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=WAIT)
            facts["status"] = proc.returncode
            facts["stdout"] = out.strip()
            facts["stderr"] = err.strip()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        facts["node_after"] = os.path.exists(f"/dev/vduse/{name}")
    return facts


def check_vduse_unanswered() -> dict:
    """What the kernel does when nobody answers: msg_timeout set to 1 s, `vdpa dev add` while no
    loop runs. The device is marked broken; handle_requests() says so instead of spinning."""
    from vhost_min.blk import BlkDevice
    from vhost_min.errors import VhostError
    from vhost_min.vdpa import VduseDevice

    facts: dict = {}
    name = "vhost-min-vduse2"
    with tempfile.TemporaryDirectory() as tmp:
        image = os.path.join(tmp, "disk.img")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        with BlkDevice(image) as blk, VduseDevice(blk, name) as vd:
            timeout_path = f"/sys/class/vduse/{name}/msg_timeout"
            with open(timeout_path) as f:
                facts["default_msg_timeout"] = int(f.read())
            with open(timeout_path, "w") as f:
                f.write("1")
            t0 = time.monotonic()
            added = vdpa("dev", "add", "mgmtdev", "vduse", "name", name)
            facts["vdpa_add"] = [added.returncode, added.stderr.strip()]
            facts["add_seconds"] = round(time.monotonic() - t0, 1)
            facts["disk"] = disk_of(name)
            try:
                vd.handle_requests()
            except VhostError as exc:
                facts["error"] = [exc.errno, str(exc)]
            t0 = time.monotonic()
            facts["vdpa_del"] = vdpa("dev", "del", name).returncode
            facts["del_seconds"] = round(time.monotonic() - t0, 1)
        facts["node_after"] = os.path.exists(f"/dev/vduse/{name}")
    return facts


def check_vduse_vhost_vdpa() -> dict:
    """Our VDUSE blk device bound to vhost_vdpa and driven by vdpa.VdpaDriver, the package's
    userspace virtio driver, as a VMM would: both ends of the kernel's vDPA bus in Python. The
    IOTLB batch reaches us as UPDATE_IOTLB (the driver's memfd comes back from VDUSE_IOTLB_GET_FD),
    GET_VRING_BASE as GET_VQ_STATE; a write and a read go through the ring."""
    import struct
    from vhost_min.blk import VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, BlkDevice
    from vhost_min.vdpa import VdpaDriver
    from vhost_min.vdpa import VduseDevice

    facts: dict = {}
    # New vDPA devices bind to the first vdpa driver registered: make it vhost_vdpa.
    facts["rmmod_virtio_vdpa"] = subprocess.run(["rmmod", "virtio_vdpa"], capture_output=True).returncode
    facts["modprobe_vhost_vdpa"] = subprocess.run(["modprobe", "vhost_vdpa"], capture_output=True).returncode
    name = "vhost-min-vduse3"
    with tempfile.TemporaryDirectory() as tmp:
        image = os.path.join(tmp, "disk.img")
        marker = random.Random(3).randbytes(SECTOR)
        with open(image, "wb") as f:
            f.write(marker)
            f.truncate(2 << 20)
        with BlkDevice(image) as blk, VduseDevice(blk, name) as vd:
            with served(vd):
                facts["vdpa_add"] = vdpa("dev", "add", "mgmtdev", "vduse", "name", name).returncode
                found = wait_for("/dev/vhost-vdpa-N", lambda: glob.glob(f"/sys/bus/vdpa/devices/{name}/vhost-vdpa-*"))
                node = "/dev/" + os.path.basename(found[0])
                wait_for(node, lambda: os.path.exists(node))
                facts["driver"] = os.path.basename(os.readlink(f"/sys/bus/vdpa/devices/{name}/driver"))
                with VdpaDriver(node, VIRTIO_BLK_F_FLUSH, [0], queue_size=64) as driver:
                    facts["device_id"] = driver.device_id
                    facts["features"] = [driver.offered, driver.features]
                    facts["backend_features"] = int(driver.backend_features)
                    facts["capacity"] = int.from_bytes(driver.config(0, 8), "little")
                    pattern = random.Random(4).randbytes(4096)
                    written, (status,) = driver.request(0, [struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 16), pattern],
                                                        [1])
                    facts["write"] = [written, status.hex()]
                    with open(image, "rb") as f:
                        facts["pattern_in_image"] = os.pread(f.fileno(), 4096, 16 * SECTOR) == pattern
                    read, (data, status) = driver.request(0, [struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)],
                                                          [SECTOR, 1])
                    facts["read"] = [read, status.hex(), data == marker]
                    facts["vring_base"] = driver.device.get_vring_base(0).num    # GET_VQ_STATE, answered by us
                facts["vdpa_del"] = vdpa("dev", "del", name).returncode
            facts["history"] = [list(map(str, entry)) for entry in vd.history]
            facts["last_error"] = repr(vd.last_error) if vd.last_error else None
        facts["node_after"] = os.path.exists(f"/dev/vduse/{name}")
    return facts


ETH_P_TEST = 0x88B5         #: IEEE 802 local experimental ethertype: frames nobody else sends
PACKET_OUTGOING = 4         #: sll_pkttype of our own transmitted frames as a packet socket sees them


def echo_net():
    """A virtio-net device (RX 0, TX 1) that sends every frame it is given back to the driver: a
    TX chain is read (header and frame), and the frame is written, behind a zero header, into the
    next RX buffer the driver made available. Both rings are touched only in the loop thread."""
    from vhost_min.device import Device
    from vhost_min.net import VIRTIO_NET_CONFIG, VIRTIO_NET_HDR_MRG_RXBUF, VIRTIO_NET_S_LINK_UP, VirtioNetFeature
    from vhost_min.virtio import DeviceId

    header = VIRTIO_NET_HDR_MRG_RXBUF.size        # VERSION_1: always the 12-byte header

    class EchoNet(Device):
        device_id = DeviceId.NET
        num_queues = 2
        features = VirtioNetFeature.VIRTIO_NET_F_MAC | VirtioNetFeature.VIRTIO_NET_F_STATUS
        mac = bytes.fromhex("525400c0ffee")

        def __init__(self) -> None:
            super().__init__()
            self.rx = None
            self.sent: list[bytes] = []           # frames the driver transmitted
            self.dropped = 0                      # ... and could not be echoed (no RX buffer)

        def get_config(self, offset: int, size: int) -> bytes:
            return VIRTIO_NET_CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, 1, 0)[offset:offset + size]

        def process(self, queue: int, vq) -> bool:
            if queue == 0:
                self.rx = vq                      # RX buffers stay in the ring until a frame comes
                return False
            chains = vq.pop_batch(64)
            if not chains:
                return False
            echoed = []
            for head, readable, _ in chains:
                frame = b"".join(readable)[header:]
                self.sent.append(frame)
                echoed.append(frame)
            if vq.push_batch([(head, 0) for head, _, _ in chains]):
                self.backend.signal_used(1)
            used = []
            for frame in echoed:
                got = self.rx.pop() if self.rx is not None else None
                if got is None:
                    self.dropped += 1
                    continue
                head, _, writable = got
                data, pos = bytes(header) + frame, 0
                for view in writable:
                    take = min(len(view), len(data) - pos)
                    view[:take] = data[pos:pos + take]
                    pos += take
                used.append((head, pos))
            if used and self.rx.push_batch(used):
                self.backend.signal_used(0)
            return True

        def reset(self) -> None:
            self.rx = None

    return EchoNet()


def check_vduse_net() -> dict:
    """A net device over VDUSE: virtio_net makes an interface of it; a frame sent on the interface
    comes out of our TX ring byte for byte, and its echo arrives back through our RX ring."""
    import socket
    from vhost_min.vdpa import VduseDevice

    facts: dict = {}
    name = "vhost-min-net0"
    net = echo_net()
    with VduseDevice(net, name, packed=False) as vd:        # split rings here: blk runs packed ones
        facts["device_features"] = vd.device_features
        with served(vd):
            facts["vdpa_add"] = vdpa("dev", "add", "mgmtdev", "vduse", "name", name).returncode
            found = wait_for("the interface", lambda: glob.glob(f"/sys/bus/vdpa/devices/{name}/virtio*/net/*"))
            ifname = os.path.basename(found[0])
            facts["ifname"] = ifname
            with open(f"/sys/class/net/{ifname}/address") as f:
                facts["mac"] = f.read().strip()
            up = subprocess.run(["/usr/bin/ip", "link", "set", ifname, "up"], capture_output=True, text=True)
            facts["link_up"] = [up.returncode, up.stderr.strip()]
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_TEST)) as sock:
                sock.bind((ifname, ETH_P_TEST))
                payload = random.Random(5).randbytes(200)
                frame = b"\xff" * 6 + bytes.fromhex("525400c0ffee") + ETH_P_TEST.to_bytes(2, "big") + payload
                sock.send(frame)
                deadline = time.monotonic() + WAIT
                echoed = None
                while echoed is None and time.monotonic() < deadline:
                    if select_readable(sock.fileno()):
                        data, address = sock.recvfrom(65536)
                        if address[2] != PACKET_OUTGOING:
                            echoed = data
                facts["tx_seen"] = any(sent == frame for sent in net.sent)
                facts["echo_received"] = echoed == frame
            facts["negotiated_features"] = vd.features
            facts["rings"] = [[r.index, r.num, r.started, r.broken] for r in vd.rings]
            facts["dropped"] = net.dropped
            facts["vdpa_del"] = vdpa("dev", "del", name).returncode
        facts["requests"] = [list(map(str, e)) for e in vd.history if e[0].startswith("VDUSE_")]
        facts["last_error"] = repr(vd.last_error) if vd.last_error else None
    facts["node_after"] = os.path.exists(f"/dev/vduse/{name}")
    return facts


def select_readable(fd: int) -> bool:
    import select
    return bool(select.select([fd], [], [], 0.1)[0])


CHECKS = {"vduse_blk": check_vduse_blk, "vduse_create": check_vduse_create, "vduse_mq": check_vduse_mq,
          "vduse_cli": check_vduse_cli,
          "vduse_unanswered": check_vduse_unanswered, "vduse_net": check_vduse_net,
          "vduse_vhost_vdpa": check_vduse_vhost_vdpa}         # last: it unloads virtio_vdpa


def run_in_guest() -> int:
    return run_checks(CHECKS)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

class VduseTest(GuestChecks, unittest.TestCase):
    CHECKS = CHECKS

    @classmethod
    def setUpClass(cls) -> None:
        # Two vCPUs: virtio_blk uses no more request queues than CPUs (the CLI check serves two).
        cls.boot("exec python3 -m tests.kernel.test_vduse --in-guest", 240, modules=GUEST_MODULES, smp=2)
        print(f"\n[vduse facts] {json.dumps(cls.results, indent=1)[:6000]}", file=sys.stderr)

    # -- vduse_blk: the disk
    def test_attached_with_vdpa_to_virtio_vdpa(self) -> None:
        r = self.result("vduse_blk")
        self.assertTrue(r["node_after_create"])
        self.assertEqual(r["vdpa_add"], [0, ""])
        self.assertEqual(r["driver"], "virtio_vdpa")
        self.assertRegex(r["disk"], r"^vd[a-z]+$")

    def test_capacity_is_the_images(self) -> None:
        r = self.result("vduse_blk")
        self.assertEqual(r["sys_size_sectors"], IMAGE_SIZE // SECTOR)
        self.assertEqual(r["image_sectors"], IMAGE_SIZE // SECTOR)

    def test_a_config_change_reaches_the_driver(self) -> None:
        r = self.result("vduse_blk")
        self.assertIs(r["config_irq"], True)
        self.assertEqual(r["resized_sectors"], IMAGE_SIZE // SECTOR // 2)

    def test_image_bytes_read_through_the_disk(self) -> None:
        self.assertIs(self.result("vduse_blk")["marker_read_back"], True)

    def test_dd_direct_write_lands_in_the_image_and_reads_back(self) -> None:
        r = self.result("vduse_blk")
        self.assertIs(r["dd"]["direct"], True, r["dd"])
        self.assertIs(r["pattern_in_image"], True)
        self.assertIs(r["image_untouched_before"], True)
        self.assertIs(r["pattern_read_back"], True)
        self.assertEqual(r["dd_read_direct"], [0, True])

    def test_four_mib_each_way(self) -> None:
        bulk = self.result("vduse_blk")["bulk"]
        self.assertEqual((bulk["write_rc"], bulk["read_rc"], bulk["in_image"], bulk["read_back"]), (0, 0, True, True))

    def test_negotiated_features(self) -> None:
        from vhost_min.blk import VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH
        from vhost_min.virtio import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1
        r = self.result("vduse_blk")
        offered, negotiated = r["device_features"], r["negotiated_features"]
        self.assertEqual(negotiated & ~offered, 0)
        # Linux's virtio_ring takes packed rings when offered: this disk runs on a packed ring.
        for bit in (VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_BLK_F_FLUSH, VIRTIO_F_RING_PACKED):
            self.assertTrue(negotiated & bit, hex(bit))
        self.assertFalse(offered & VIRTIO_BLK_F_CONFIG_WCE)
        self.assertEqual(r["status"], 0xF)
        self.assertEqual(r["rings"], [[0, 1024, True, None]])

    def test_requests_the_kernel_sent(self) -> None:
        r = self.result("vduse_blk")
        requests = [entry for entry in r["history"] if entry[0].startswith("VDUSE_")]
        self.assertTrue(all(result == "OK" for _, _, result in requests), requests)
        statuses = [detail for kind, detail, _ in requests if kind == "VDUSE_SET_STATUS"]
        # virtio_vdpa's probe: reset, ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK; `vdpa dev del`:
        # reset, then ACKNOWLEDGE again (virtio_dev_remove acknowledges the device it keeps).
        self.assertEqual(statuses, ["0x0", "0x1", "0x3", "0xb", "0xf", "0x0", "0x1"])
        self.assertEqual(r["status_after_del"], 1)
        self.assertEqual({kind for kind, _, _ in requests}, {"VDUSE_SET_STATUS"})

    def test_iotlb_entries_cover_the_rings_and_the_bounce_area(self) -> None:
        r = self.result("vduse_blk")
        entries = [tuple(map(int, e[1:])) for e in r["history"] if e[0] == "IOTLB_GET_FD"]
        self.assertIn((0, (64 << 20) - 1, 3, 0), entries)          # the 64 MiB bounce area, read-write
        info = [list(map(int, e[1:7])) for e in r["history"] if e[0] == "VQ_GET_INFO"]
        self.assertEqual(len(info), 1)
        index, num, desc, driver, device, base = info[0]
        # virtio_vdpa starts a packed ring with both wrap counters 1 (packed.encode_base(0, 1, 0, 1)).
        self.assertEqual((index, num, base), (0, 1024, 0x80008000))
        for iova in (desc, driver, device):
            self.assertTrue(any(start <= iova <= last for start, last, _, _ in entries), hex(iova))

    def test_destroyed_cleanly(self) -> None:
        r = self.result("vduse_blk")
        self.assertEqual(r["vdpa_del"], [0, ""])
        self.assertIs(r["disk_gone"], True)
        self.assertIs(r["loop_alive"], True)
        self.assertIsNone(r["last_error"])
        self.assertIs(r["node_after_close"], False)
        self.assertEqual(json.loads(r["vdpa_dev_show_after"]), {"dev": {}})
        self.assertEqual((r["fds_leaked"], r["mappings_left"]), (0, 0))

    # -- vduse_create
    def test_a_taken_name_is_refused(self) -> None:
        r = self.result("vduse_create")
        self.assertEqual(r["eexist"][:2], ["VDUSE_CREATE_DEV", errno.EEXIST])
        self.assertIn("'vhost-min-vduse1' exists already", r["eexist"][2])
        self.assertIs(r["second_free"], True)

    def test_closing_while_attached_says_what_to_do(self) -> None:
        r = self.result("vduse_create")
        self.assertEqual(r["ebusy"][:2], ["VDUSE_DESTROY_DEV", errno.EBUSY])
        self.assertIn("vdpa dev del vhost-min-vduse1", r["ebusy"][2])
        self.assertIs(r["closed"], True)
        self.assertIs(r["node_while_attached"], True)

    def test_a_new_fd_serves_the_device_again(self) -> None:
        r = self.result("vduse_create")
        self.assertEqual(r["vdpa_del"], 0)
        statuses = [e[1] for e in r["again_history"] if e[0] == "VDUSE_SET_STATUS" and e[2] == "OK"]
        self.assertEqual(statuses[:1], ["0x0"])       # the reset `vdpa dev del` sent, answered by the new fd
        self.assertIs(r["node_after_fd_close"], True)   # an fd passed in: not ours to destroy
        self.assertIs(r["node_after_destroy"], False)

    # -- vduse_mq
    def test_each_vcpu_reads_through_its_own_ring(self) -> None:
        r = self.result("vduse_mq")
        self.assertEqual((r["vdpa_add"], r["vdpa_del"]), (0, 0))
        self.assertEqual(r["mq"], ["0", "1"])
        self.assertEqual([ring[1:] for ring in r["rings"]], [[1024, True, None], [1024, True, None]])
        (cpu0, ok0, counts0), (cpu1, ok1, counts1) = r["reads"]
        self.assertTrue(ok0 and ok1, r["reads"])
        # blk-mq maps CPU 0 to the first queue and CPU 1 to the second: each read used only its ring.
        self.assertEqual((counts0[1], counts1[0]), (0, 0), r["reads"])
        self.assertGreater(counts0[0], 0)
        self.assertGreater(counts1[1], 0)

    # -- vduse_unanswered
    def test_an_unanswered_request_breaks_the_device_and_we_say_so(self) -> None:
        r = self.result("vduse_unanswered")
        self.assertEqual(r["default_msg_timeout"], 30)
        # `vdpa dev add` succeeds (the vDPA device exists) but virtio_vdpa's probe fails: no disk.
        self.assertEqual(r["vdpa_add"], [0, ""])
        self.assertIsNone(r["disk"])
        self.assertEqual(r["error"][0], errno.EIO)
        self.assertIn("marked VDUSE device 'vhost-min-vduse2' broken", r["error"][1])
        # A broken device fails its requests at once: del does not wait, and the device is destroyed.
        self.assertEqual(r["vdpa_del"], 0)
        self.assertIs(r["node_after"], False)

    # -- vduse_net
    def test_net_frames_go_through_our_rings_both_ways(self) -> None:
        from vhost_min.net import VirtioNetFeature
        from vhost_min.virtio import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1
        r = self.result("vduse_net")
        self.assertEqual(r["vdpa_add"], 0)
        self.assertEqual(r["mac"], "52:54:00:c0:ff:ee")            # our config space, as virtio_net read it
        self.assertEqual(r["link_up"], [0, ""])
        self.assertIs(r["tx_seen"], True)                          # the frame, byte for byte, from our TX ring
        self.assertIs(r["echo_received"], True)                    # ... and back through our RX ring
        self.assertEqual(r["dropped"], 0)
        for bit in (VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM, VirtioNetFeature.VIRTIO_NET_F_MAC):
            self.assertTrue(r["negotiated_features"] & bit, hex(bit))
        self.assertFalse(r["device_features"] & VIRTIO_F_RING_PACKED)    # packed=False: split rings
        self.assertFalse(r["device_features"] & VirtioNetFeature.VIRTIO_NET_F_CTRL_VQ)
        self.assertEqual([ring[2:] for ring in r["rings"]], [[True, None], [True, None]])
        self.assertTrue(all(e[2] == "OK" for e in r["requests"]))
        self.assertEqual((r["vdpa_del"], r["last_error"], r["node_after"]), (0, None, False))

    # -- vduse_vhost_vdpa
    def test_vdpa_driver_drives_our_device_through_vhost_vdpa(self) -> None:
        from vhost_min.virtio import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1
        r = self.result("vduse_vhost_vdpa")
        self.assertEqual((r["rmmod_virtio_vdpa"], r["modprobe_vhost_vdpa"], r["vdpa_add"]), (0, 0, 0))
        self.assertEqual((r["driver"], r["device_id"]), ("vhost_vdpa", 2))
        offered, taken = r["features"]
        self.assertEqual(offered, self.result("vduse_blk")["device_features"])
        self.assertTrue(taken & VIRTIO_F_VERSION_1 and taken & VIRTIO_F_ACCESS_PLATFORM)
        self.assertEqual(r["capacity"], (2 << 20) // SECTOR)        # VHOST_VDPA_GET_CONFIG: our config space
        self.assertEqual(r["write"], [1, "00"])                     # used length: the status byte; S_OK
        self.assertIs(r["pattern_in_image"], True)
        self.assertEqual(r["read"], [SECTOR + 1, "00", True])
        self.assertIsNone(r["last_error"])
        self.assertEqual(r["vdpa_del"], 0)
        self.assertIs(r["node_after"], False)

    def test_vhost_vdpa_sends_update_iotlb_and_get_vq_state(self) -> None:
        r = self.result("vduse_vhost_vdpa")
        kinds = [e[0] for e in r["history"]]
        # The driver's IOTLB batch reaches us as UPDATE_IOTLB of the whole space, before DRIVER_OK...
        self.assertIn(["VDUSE_UPDATE_IOTLB", "0x0-0xffffffffffffffff", "OK"], r["history"])
        self.assertLess(kinds.index("VDUSE_UPDATE_IOTLB"), r["history"].index(["VDUSE_SET_STATUS", "0xf", "OK"]))
        # ...and VDUSE_IOTLB_GET_FD then gives the driver's memfd: the 1 MiB it mapped, read-write.
        fetched = [tuple(map(int, e[1:])) for e in r["history"] if e[0] == "IOTLB_GET_FD"]
        self.assertEqual([(last - start + 1, perm) for start, last, perm, _ in fetched], [(1 << 20, 3)])
        # GET_VRING_BASE is our GET_VQ_STATE answer: two requests consumed.
        self.assertIn(["VDUSE_GET_VQ_STATE", "0", "OK"], r["history"])
        self.assertEqual(r["vring_base"], 2)
        self.assertTrue(all(e[2] == "OK" for e in r["history"] if e[0].startswith("VDUSE_")))

    # -- vduse_cli
    def test_cli_serves_until_sigterm(self) -> None:
        r = self.result("vduse_cli")
        self.assertIs(r["running"], True)
        self.assertEqual(r["vdpa_add"], [0, ""])
        self.assertEqual(r["ro"], "1")
        self.assertEqual(r["mq"], ["0", "1"])            # --num-queues 2: two request queues
        self.assertIs(r["read_back"], True)
        self.assertEqual(r["vdpa_del"], 0)
        self.assertEqual((r["status"], r["stderr"]), (0, ""))
        self.assertIn("as VDUSE device vhost-min-cli", r["stdout"])
        self.assertIs(r["node_after"], False)


if __name__ == "__main__":
    if "--in-guest" in sys.argv:
        sys.exit(run_in_guest())
    unittest.main()
