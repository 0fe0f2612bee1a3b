"""vhost-vdpa for real (vhost_min.vdpa), inside a QEMU guest booting Debian's 6.12 kernel with
the vdpa_sim simulators built for it (tests/guest.py).

Two devices are added with iproute2's ``vdpa`` before the checks run: ``vdpa0`` from
vdpasim_blk (a 128 MiB ramdisk) and ``vdpa1`` from vdpasim_net (it loops every frame sent on TX
back into RX when its destination MAC is the device's own, given here), each bound to vhost_vdpa
as /dev/vhost-vdpa-N. Then:

- facts: what the kernel answers on each node (device id, features, backend features, IOVA
  range, config size, queue counts, groups and address spaces), that a node opens once at a time,
  and that group ASIDs can be set;
- config bounds: a read past the config size is refused by us before the ioctl, and the kernel
  itself refuses the same range with the same errno;
- blk: our userspace driver (VdpaDriver) writes sectors and reads them back, reads GET_ID and the
  capacity from config, gets IOERR past the end; the IOTLB messages it wrote are a batch;
- net: a frame sent on TX comes back on RX, header and bytes exact; a frame to another MAC is
  dropped; the kernel really is in batch mode between BATCH_BEGIN and BATCH_END (it refuses a
  second address space inside one);
- dataplane: the generic bring-up of test_kernel_vhost (:func:`start_dataplane`, written against
  the Dataplane interface) over VhostVdpa, then I/O, and SUSPEND holding a request until RESUME;
- cli: ``python3 -m vhost_min kernel --json`` lists the nodes with their decoded facts.

One boot, one JSON line per check (as test_kernel_vhost). About 20 s under TCG.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import select
import subprocess
import sys
import time
import unittest
from collections.abc import Callable

from tests.kernel import GuestChecks, run_checks
from vhost_min.blk import (SECTOR_SIZE, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_OUTHDR, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
                           VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, BlkConfig, VirtioBlkFeature)
from vhost_min.errors import IoctlError
from vhost_min.ioctl import (VHOST_BACKEND_F_IOTLB_ASID, VHOST_BACKEND_F_IOTLB_BATCH, VHOST_BACKEND_F_IOTLB_MSG_V2,
                             VhostIoctl, ioctl, vhost_vdpa_config)
from vhost_min.memory import VHOST_ACCESS_RW, address_of
from vhost_min.net import VIRTIO_NET_CONFIG, VIRTIO_NET_HDR_MRG_RXBUF, VirtioNetFeature
from vhost_min.user import (VHOST_IOTLB_BATCH_BEGIN, VHOST_IOTLB_BATCH_END, VHOST_IOTLB_INVALIDATE, VHOST_IOTLB_UPDATE,
                            IotlbMsg)
from vhost_min.vdpa import VdpaDriver, VhostVdpa
from vhost_min.virtio import VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, DeviceId, DeviceStatus

GUEST_MODULES = ("vhost_vdpa", "vdpa_sim_blk", "vdpa_sim_net", "vhost_net", "vhost_vsock", "vhost_scsi")
BLK, NET = "vdpa0", "vdpa1"
NET_MAC = "02:11:22:33:44:55"
SETUP = f"""
vdpa dev add mgmtdev vdpasim_blk name {BLK} || exit 1
vdpa dev add mgmtdev vdpasim_net name {NET} mac {NET_MAC} || exit 1
exec python3 -m tests.kernel.test_vdpa --in-guest
"""
WAIT = 20.0
#: How long a request must stay unanswered to count as held (suspend) or dropped (net filter).
QUIET = 1.0


def node(name: str) -> str:
    """The /dev/vhost-vdpa-N of vDPA device ``name`` (its vhost_vdpa child in sysfs)."""
    entries = [e for e in os.listdir(f"/sys/bus/vdpa/devices/{name}") if e.startswith("vhost-vdpa-")]
    if len(entries) != 1:
        raise RuntimeError(f"{name} has {entries} vhost-vdpa children, not one")
    return f"/dev/{entries[0]}"


def error_facts(exc: OSError) -> dict:
    return {"type": type(exc).__name__, "errno": exc.errno, "ioctl": getattr(exc, "ioctl", None), "text": str(exc)}


def attempt(fn: Callable[[], object]) -> dict:
    """{"value": what fn returned} or {"error": facts of the OSError it raised}."""
    try:
        value = fn()
    except OSError as exc:
        return {"error": error_facts(exc)}
    return {"value": int(value) if isinstance(value, int) else value}


def record_iotlb(dev: VhostVdpa) -> list[list[int]]:
    """Record (type, asid) of every IOTLB message ``dev`` writes from now on."""
    log: list[list[int]] = []
    send = dev.send_iotlb_msg

    def recording(msg: IotlbMsg, *, asid: int = 0, v2: bool | None = None) -> None:
        log.append([msg.type, asid])
        send(msg, asid=asid, v2=v2)
    dev.send_iotlb_msg = recording
    return log


# --------------------------------------------------------------------------------------------
# The checks (in the guest)
# --------------------------------------------------------------------------------------------

def device_facts(path: str) -> dict:
    out: dict = {"node": path}
    with VhostVdpa(path) as dev:
        out["vring_group_before_owner"] = attempt(lambda: dev.get_vring_group(0))
        dev.set_owner()          # every per-ring ioctl needs an owner (EPERM before)
        out["device_id"] = dev.get_device_id()
        out["features"] = dev.get_features()
        out["backend_features"] = int(dev.get_backend_features())
        out["status_at_open"] = int(dev.get_status())
        out["iova_range"] = list(dev.get_iova_range())
        out["config_size"] = dev.get_config_size()
        out["config"] = dev.get_config().hex()
        out["vqs_count"] = dev.get_vqs_count()
        out["group_num"] = dev.get_group_num()
        out["as_num"] = dev.get_as_num()
        out["vring_num"] = dev.get_vring_num()
        out["vring_groups"] = [attempt(lambda i=i: dev.get_vring_group(i)) for i in range(out["vqs_count"])]
        out["vring_size"] = attempt(lambda: dev.get_vring_size(0))
        out["desc_group"] = attempt(lambda: dev.get_vring_desc_group(0))
        out["second_open"] = attempt(lambda: VhostVdpa(path).close())
        config_call = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            out["config_call"] = [attempt(lambda: dev.set_config_call(config_call)),
                                  attempt(lambda: dev.set_config_call(None))]
        finally:
            os.close(config_call)
        if out["as_num"] > 1 and out["group_num"] > 1:
            dev.ack_backend_features()
            dev.set_group_asid(1, 1)
            out["group_asid_set"] = True
            dev.set_group_asid(1, 0)
            out["group_asid_bad"] = attempt(lambda: dev.set_group_asid(1, out["as_num"]))
    return out


def check_facts() -> dict:
    return {"blk": device_facts(node(BLK)), "net": device_facts(node(NET))}


def check_config_bounds() -> dict:
    out: dict = {}
    with VhostVdpa(node(BLK)) as dev:
        size = out["config_size"] = dev.get_config_size()
        for name, offset, length in (("past_end", size - 4, 8), ("at_end", size, 1), ("empty", 0, 0)):
            try:
                dev.get_config(offset, length)
            except IoctlError as exc:
                out[name] = error_facts(exc)
            # The kernel's own answer to the same range, asked directly.
            buf = (ctypes.c_uint8 * (ctypes.sizeof(vhost_vdpa_config) + max(length, 1)))()
            header = vhost_vdpa_config.from_buffer(buf)
            header.off, header.len = offset, length
            out[f"{name}_kernel"] = attempt(lambda: ioctl(dev.fileno(), VhostIoctl.VHOST_VDPA_GET_CONFIG, buf))
        try:
            dev.set_config(size - 1, b"\0\0")
        except IoctlError as exc:
            out["set_past_end"] = error_facts(exc)
        out["last_byte"] = dev.get_config(size - 1, 1).hex()
    return out


def blk_request(driver: VdpaDriver, type_: int, sector: int, data: bytes = b"", read: int = 0) -> tuple:
    """One virtio-blk request laid out as Linux does: header, data, status byte in separate
    descriptors. Returns (status, data read, used length)."""
    out = [VIRTIO_BLK_OUTHDR.pack(type_, 0, sector)] + ([data] if data else [])
    used, written = driver.request(0, out, ([read] if read else []) + [1])
    return written[-1][0], written[0] if read else b"", used


def check_blk() -> dict:
    out: dict = {}
    wanted = VirtioBlkFeature.VIRTIO_BLK_F_SIZE_MAX | VirtioBlkFeature.VIRTIO_BLK_F_SEG_MAX | \
        VirtioBlkFeature.VIRTIO_BLK_F_BLK_SIZE
    dev = VhostVdpa(node(BLK))
    log = record_iotlb(dev)
    with dev:
        driver = VdpaDriver(dev, wanted, [0], queue_size=64, memory_size=1 << 20)
        out["backend_features_acked"] = int(driver.backend_features)
        out["negotiated"] = driver.features
        out["status"] = int(dev.get_status())
        out["iotlb_messages"] = list(log)
        out["mapped"] = list(driver.mapped)
        config = BlkConfig.unpack(driver.config())
        out["capacity"], out["blk_size"], out["seg_max"] = config.capacity, config.blk_size, config.seg_max

        status, ident, used = blk_request(driver, VIRTIO_BLK_T_GET_ID, 0, read=VIRTIO_BLK_ID_BYTES)
        out["get_id"] = {"status": status, "id": ident.hex(), "used": used}

        pattern = bytes((i * 7 + 3) & 0xFF for i in range(8 * SECTOR_SIZE))
        status, _, used = blk_request(driver, VIRTIO_BLK_T_OUT, 100, data=pattern)
        out["write"] = {"status": status, "used": used, "bytes": len(pattern)}
        status, data, used = blk_request(driver, VIRTIO_BLK_T_IN, 100, read=len(pattern))
        out["read_back"] = {"status": status, "used": used, "equal": data == pattern}
        status, data, _ = blk_request(driver, VIRTIO_BLK_T_IN, 104, read=SECTOR_SIZE)
        out["read_middle_equal"] = data == pattern[4 * SECTOR_SIZE:5 * SECTOR_SIZE]
        status, data, _ = blk_request(driver, VIRTIO_BLK_T_IN, 4000, read=SECTOR_SIZE)
        out["unwritten"] = {"status": status, "zero": data == bytes(SECTOR_SIZE)}
        status, _, _ = blk_request(driver, VIRTIO_BLK_T_IN, config.capacity, read=SECTOR_SIZE)
        out["past_capacity_status"] = status

        # Many requests, more bytes than the driver's memory holds (its request buffers are reused):
        # 256 blocks of 4 KiB, each its own bytes, written, then read back.
        blocks = [bytes([i]) * 8 + os.urandom(4096 - 8) for i in range(256)]
        statuses = [blk_request(driver, VIRTIO_BLK_T_OUT, 8 * (1000 + i), data=b)[0] for i, b in enumerate(blocks)]
        reads = [blk_request(driver, VIRTIO_BLK_T_IN, 8 * (1000 + i), read=4096) for i in range(len(blocks))]
        out["many"] = {"bytes": 2 * len(blocks) * 4096, "memory": driver.mapped[1],
                       "write_statuses": sorted(set(statuses)), "read_statuses": sorted({r[0] for r in reads}),
                       "mismatched": [i for i, (r, b) in enumerate(zip(reads, blocks)) if r[1] != b]}
        driver.close()
        out["status_after_driver_close"] = int(dev.get_status())      # reset: status 0
        out["messages_at_close"] = log[len(out["iotlb_messages"]):]   # the unmap
    return out


def ethernet_frame(dst: str, payload: bytes) -> bytes:
    return bytes.fromhex(dst.replace(":", "")) + bytes.fromhex("02000000000b") + (0x88B5).to_bytes(2, "big") + payload


def check_net() -> dict:
    out: dict = {}
    wanted = VirtioNetFeature.VIRTIO_NET_F_MAC | VirtioNetFeature.VIRTIO_NET_F_MTU
    with VdpaDriver(node(NET), wanted, [0, 1], queue_size=64) as driver:
        dev = driver.device
        out["negotiated"] = driver.features
        mac, status, _, mtu = VIRTIO_NET_CONFIG.unpack_from(driver.config(0, VIRTIO_NET_CONFIG.size))
        out["config_mac"], out["config_mtu"] = ":".join(f"{b:02x}" for b in mac), mtu
        rx = driver.queues[0]
        buffers = [driver.alloc(2048, 4096) for _ in range(4)]
        for iova in buffers:
            rx.ring.add([], [(iova, 2048)], iova)
        rx.ring.publish()
        rx.kick()

        header = bytes(VIRTIO_NET_HDR_MRG_RXBUF.size)
        frame = ethernet_frame(out["config_mac"], b"vhost_min through vdpa_sim_net " + bytes(range(256)))
        used, _ = driver.request(1, [header + frame])
        out["tx_used"] = used
        (token, length), = rx.wait(WAIT)
        out["sent"] = (header + frame).hex()
        out["rx"] = {"buffer": token, "first_buffer": buffers[0], "used": length,
                     "received": driver.memory.read(token, length).hex()}

        # (vdpa_sim_net compares MACs with strncmp: an address with a zero byte would match any
        # other with the same bytes before it, so neither has one.)
        other = ethernet_frame("02:11:22:33:44:99", b"not for this device")
        out["other_tx_used"], _ = driver.request(1, [header + other])
        time.sleep(QUIET)
        out["other_rx"] = rx.ring.reap()

        # Batch mode, as the kernel sees it: outside a batch, a second address space maps; inside
        # one opened for asid 0, the kernel refuses it -- BATCH_BEGIN was honoured. (The kernel's
        # write() answers every refused IOTLB message with EFAULT, whatever the reason.)
        out["as_num"] = dev.get_as_num()
        address = address_of(driver.memory.view(driver.alloc(4096, 4096), 4096))
        out["asid1_outside_batch"] = attempt(lambda: dev.dma_map(0x4000_0000, 4096, address, asid=1))
        dev.dma_unmap(0x4000_0000, 4096, asid=1)
        dev.send_iotlb_msg(IotlbMsg(0, 0, 0, 0, VHOST_IOTLB_BATCH_BEGIN), asid=0)
        out["asid1_inside_batch"] = attempt(lambda: dev.send_iotlb_msg(
            IotlbMsg(0x4000_0000, 4096, address, VHOST_ACCESS_RW, VHOST_IOTLB_UPDATE), asid=1))
        dev.send_iotlb_msg(IotlbMsg(0, 0, 0, 0, VHOST_IOTLB_BATCH_END), asid=0)
    return out


def check_dataplane() -> dict:
    """test_kernel_vhost's start_dataplane over VhostVdpa, then I/O on its rings, then SUSPEND."""
    from tests.kernel.test_kernel_vhost import Arena, reap, rings_for, send_chain, start_dataplane
    out: dict = {}
    with contextlib.ExitStack() as stack:
        arena = Arena(0x40000)
        stack.callback(arena.close)
        ring, = rings = rings_for(arena, stack, [0])
        dev = stack.enter_context(VhostVdpa(node(BLK)))
        out["backend_features_acked"] = int(dev.ack_backend_features())
        out["negotiated"] = start_dataplane(dev, arena.regions(), rings, VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM)
        out["status"] = int(dev.get_status())

        data = b"dataplane" * 57 + b"!" * 7          # 520 bytes: one sector and a bit, padded below
        data = data.ljust(2 * SECTOR_SIZE, b"\x5a")
        header, _, status = send_chain(arena, ring, [VIRTIO_BLK_OUTHDR.pack(VIRTIO_BLK_T_OUT, 0, 2000), data], [1])
        out["write_used"] = reap(ring, "blk write")
        out["write_status"] = arena.memory.read(status, 1)[0]
        header, buf, status = send_chain(arena, ring, [VIRTIO_BLK_OUTHDR.pack(VIRTIO_BLK_T_IN, 0, 2000)],
                                         [len(data), 1])
        out["read_used"] = reap(ring, "blk read")
        out["read_status"] = arena.memory.read(status, 1)[0]
        out["read_equal"] = arena.memory.read(buf, len(data)) == data

        # SUSPEND: a request made available now is not processed until RESUME.
        dev.suspend()
        header, buf, status = send_chain(arena, ring, [VIRTIO_BLK_OUTHDR.pack(VIRTIO_BLK_T_IN, 0, 2000)],
                                         [SECTOR_SIZE, 1])
        held = select.select([ring.call], [], [], QUIET)[0]
        out["used_while_suspended"] = ring.queue.reap() if held else []
        dev.resume()
        out["used_after_resume"] = reap(ring, "blk read after resume")
        out["read_after_resume_equal"] = arena.memory.read(buf, SECTOR_SIZE) == data[:SECTOR_SIZE]
        out["base"] = dev.get_vring_base(0).num
        out["base_expected"] = ring.queue.get_base()
        with contextlib.suppress(OSError):
            dev.reset()
    return out


def check_cli() -> dict:
    proc = subprocess.run([sys.executable, "-m", "vhost_min", "kernel", "--json"], capture_output=True, text=True,
                          timeout=60)
    text = subprocess.run([sys.executable, "-m", "vhost_min", "kernel"], capture_output=True, text=True, timeout=60)
    return {"status": proc.returncode, "stderr": proc.stderr, "report": json.loads(proc.stdout or "null"),
            "text_status": text.returncode, "text": text.stdout, "nodes": {BLK: node(BLK), NET: node(NET)}}


CHECKS: dict[str, Callable[[], dict]] = {
    "facts": check_facts,
    "config_bounds": check_config_bounds,
    "blk": check_blk,
    "net": check_net,
    "dataplane": check_dataplane,
    "cli": check_cli,
}


def run_in_guest() -> int:
    return run_checks(CHECKS)


# --------------------------------------------------------------------------------------------
# The host side
# --------------------------------------------------------------------------------------------

class VdpaTest(GuestChecks, unittest.TestCase):
    CHECKS = CHECKS

    @classmethod
    def setUpClass(cls) -> None:
        cls.boot(SETUP, 180, modules=GUEST_MODULES)

    # -- facts
    def test_device_ids_and_features(self) -> None:
        r = self.result("facts")
        self.assertEqual((r["blk"]["device_id"], r["net"]["device_id"]), (DeviceId.BLOCK, DeviceId.NET))
        for dev in ("blk", "net"):
            self.assertTrue(r[dev]["features"] & VIRTIO_F_VERSION_1, hex(r[dev]["features"]))
            self.assertTrue(r[dev]["features"] & VIRTIO_F_ACCESS_PLATFORM, hex(r[dev]["features"]))
            # What vhost_vdpa offers for vdpa_sim (KERNEL-VM.md): MSG_V2, BATCH, ASID, SUSPEND, RESUME,
            # ENABLE_AFTER_DRIVER_OK, IOTLB_PERSIST.
            self.assertEqual(r[dev]["backend_features"], 0x17E)
            self.assertEqual(r[dev]["status_at_open"], 0)        # opening resets the device
            first, last = r[dev]["iova_range"]
            self.assertLess(first, last)
        self.assertTrue(r["blk"]["features"] & VirtioBlkFeature.VIRTIO_BLK_F_BLK_SIZE)
        self.assertTrue(r["net"]["features"] & VirtioNetFeature.VIRTIO_NET_F_MAC)

    def test_config_sizes_and_queues(self) -> None:
        r = self.result("facts")
        self.assertEqual(r["blk"]["config_size"], len(bytes.fromhex(r["blk"]["config"])))
        self.assertEqual(r["net"]["config_size"], len(bytes.fromhex(r["net"]["config"])))
        self.assertGreaterEqual(r["blk"]["config_size"], 8 + 4 + 4)
        self.assertGreaterEqual(r["net"]["config_size"], VIRTIO_NET_CONFIG.size)
        self.assertEqual(bytes.fromhex(r["net"]["config"])[:6].hex(":"), NET_MAC)
        self.assertEqual(r["blk"]["vqs_count"], 1)
        self.assertEqual((r["net"]["vqs_count"], r["net"]["group_num"], r["net"]["as_num"]), (3, 2, 2))
        # RX and TX in group 0, the control queue in group 1 (so it can get its own address space).
        self.assertEqual([g.get("value") for g in r["net"]["vring_groups"]], [0, 0, 1])
        self.assertGreater(r["blk"]["vring_num"], 0)

    def test_ring_ioctls_need_an_owner(self) -> None:
        facts = self.result("facts")["net"]["vring_group_before_owner"]["error"]
        self.assertEqual((facts["ioctl"], facts["errno"]), ("VHOST_VDPA_GET_VRING_GROUP", errno.EPERM), facts)

    def test_config_call_is_taken_and_dropped(self) -> None:
        for dev in ("blk", "net"):
            self.assertEqual(self.result("facts")[dev]["config_call"], [{"value": None}, {"value": None}])

    def test_a_node_opens_once_at_a_time(self) -> None:
        facts = self.result("facts")["blk"]["second_open"]["error"]
        self.assertEqual((facts["type"], facts["errno"]), ("VhostError", errno.EBUSY), facts)

    def test_group_asid(self) -> None:
        r = self.result("facts")["net"]
        self.assertTrue(r["group_asid_set"])
        self.assertEqual(r["group_asid_bad"]["error"]["errno"], errno.EINVAL)
        self.assertEqual(r["group_asid_bad"]["error"]["ioctl"], "VHOST_VDPA_SET_GROUP_ASID")

    def test_ioctls_the_simulator_lacks_say_so(self) -> None:
        r = self.result("facts")["blk"]
        desc = r["desc_group"]["error"]
        self.assertEqual((desc["ioctl"], desc["errno"]), ("VHOST_VDPA_GET_VRING_DESC_GROUP", errno.EOPNOTSUPP), desc)

    # -- config bounds
    def test_config_read_past_its_size_is_refused_before_the_ioctl(self) -> None:
        r = self.result("config_bounds")
        for name in ("past_end", "at_end", "empty"):
            facts = r.get(name)
            self.assertIsNotNone(facts, f"{name} was not refused")
            self.assertEqual((facts["type"], facts["errno"], facts["ioctl"]),
                             ("IoctlError", errno.EINVAL, "VHOST_VDPA_GET_CONFIG"), facts)
            self.assertIn("refused before the ioctl", facts["text"])
            self.assertIn(f"{r['config_size']} bytes of config space", facts["text"])
            # ...and the kernel says the same when asked.
            self.assertEqual(r[f"{name}_kernel"]["error"]["errno"], errno.EINVAL)
        self.assertEqual(r["set_past_end"]["ioctl"], "VHOST_VDPA_SET_CONFIG")
        self.assertEqual(len(bytes.fromhex(r["last_byte"])), 1)

    # -- blk through our driver
    def test_blk_handshake_and_batched_mapping(self) -> None:
        r = self.result("blk")
        self.assertEqual(r["status"], DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
                         | DeviceStatus.DRIVER_OK)
        self.assertEqual(r["backend_features_acked"], VHOST_BACKEND_F_IOTLB_MSG_V2 | VHOST_BACKEND_F_IOTLB_BATCH
                         | VHOST_BACKEND_F_IOTLB_ASID)
        self.assertTrue(r["negotiated"] & VIRTIO_F_VERSION_1)
        # Bring-up mapped our memory in one batch: BEGIN, one UPDATE, END (type, asid).
        self.assertEqual(r["iotlb_messages"], [[VHOST_IOTLB_BATCH_BEGIN, 0], [VHOST_IOTLB_UPDATE, 0],
                                               [VHOST_IOTLB_BATCH_END, 0]])
        self.assertEqual(r["status_after_driver_close"], 0)
        self.assertEqual(r["messages_at_close"], [[VHOST_IOTLB_INVALIDATE, 0]])

    def test_blk_config_and_get_id(self) -> None:
        r = self.result("blk")
        self.assertEqual(r["capacity"], 0x40000)                 # vdpa_sim_blk: 128 MiB
        self.assertEqual(r["blk_size"], SECTOR_SIZE)
        self.assertEqual(r["get_id"]["status"], VIRTIO_BLK_S_OK)
        self.assertEqual(bytes.fromhex(r["get_id"]["id"]).rstrip(b"\0"), b"vdpa_blk_sim")

    def test_blk_sectors_written_read_back(self) -> None:
        r = self.result("blk")
        self.assertEqual(r["write"]["status"], VIRTIO_BLK_S_OK)
        self.assertEqual(r["read_back"], {"status": VIRTIO_BLK_S_OK, "used": r["write"]["bytes"] + 1, "equal": True})
        self.assertTrue(r["read_middle_equal"])
        self.assertEqual(r["unwritten"], {"status": VIRTIO_BLK_S_OK, "zero": True})
        self.assertEqual(r["past_capacity_status"], VIRTIO_BLK_S_IOERR)

    def test_blk_many_blocks_through_reused_request_buffers(self) -> None:
        many = self.result("blk")["many"]
        self.assertGreater(many["bytes"], many["memory"])
        self.assertEqual((many["write_statuses"], many["read_statuses"]), ([VIRTIO_BLK_S_OK], [VIRTIO_BLK_S_OK]))
        self.assertEqual(many["mismatched"], [])

    # -- net through our driver
    def test_net_frame_comes_back_byte_exact(self) -> None:
        r = self.result("net")
        self.assertEqual(r["config_mac"], NET_MAC)
        self.assertEqual(r["tx_used"], 0)
        self.assertEqual(r["rx"]["buffer"], r["rx"]["first_buffer"])
        self.assertEqual(r["rx"]["used"], len(bytes.fromhex(r["sent"])))
        self.assertEqual(r["rx"]["received"], r["sent"])

    def test_net_frame_to_another_mac_is_dropped(self) -> None:
        r = self.result("net")
        self.assertEqual(r["other_tx_used"], 0)
        self.assertEqual(r["other_rx"], [])

    def test_kernel_honours_iotlb_batches(self) -> None:
        r = self.result("net")
        self.assertEqual(r["as_num"], 2)
        self.assertEqual(r["asid1_outside_batch"], {"value": None})
        err = r["asid1_inside_batch"]["error"]
        self.assertEqual((err["type"], err["errno"], err["ioctl"]), ("IoctlError", errno.EFAULT, "VHOST_IOTLB_MSG_V2"),
                         err)

    # -- the generic bring-up
    def test_start_dataplane_over_vhost_vdpa(self) -> None:
        r = self.result("dataplane")
        self.assertEqual(r["negotiated"], VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM)
        self.assertEqual(r["status"], DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
                         | DeviceStatus.DRIVER_OK)
        self.assertEqual((r["write_status"], r["read_status"]), (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK))
        self.assertEqual(len(r["write_used"]), 1)
        self.assertEqual(r["read_used"][0][1], 2 * SECTOR_SIZE + 1)
        self.assertTrue(r["read_equal"])

    def test_suspend_holds_requests_until_resume(self) -> None:
        r = self.result("dataplane")
        self.assertEqual(r["used_while_suspended"], [])
        self.assertEqual(len(r["used_after_resume"]), 1)
        self.assertTrue(r["read_after_resume_equal"])
        self.assertEqual(r["base"], 3)
        self.assertEqual(r["base"], r["base_expected"])

    # -- the CLI
    def test_cli_lists_the_nodes(self) -> None:
        r = self.result("cli")
        self.assertEqual((r["status"], r["stderr"]), (0, ""))
        devices = {d["node"]: d for d in r["report"]["devices"]}
        for path in ("/dev/vhost-net", "/dev/vhost-vsock", "/dev/vhost-scsi", r["nodes"][BLK], r["nodes"][NET]):
            self.assertIn(path, devices)
        self.assertEqual(devices["/dev/vhost-scsi"]["backend_features"], None)    # ENOTTY: it has none
        blk, net = devices[r["nodes"][BLK]], devices[r["nodes"][NET]]
        self.assertEqual((blk["device_type"], blk["device_id"]), ("blk", 2))
        self.assertEqual(blk["config"]["capacity"], 0x40000)
        self.assertIn("VIRTIO_BLK_F_BLK_SIZE", blk["feature_names"])
        self.assertEqual(net["config"]["mac"], NET_MAC)
        self.assertIn("VHOST_BACKEND_F_IOTLB_BATCH", net["backend_feature_names"])
        self.assertIn("VIRTIO_NET_F_MAC", net["feature_names"])
        self.assertIn("VIRTIO_F_VERSION_1", devices["/dev/vhost-net"]["feature_names"])
        self.assertEqual(r["text_status"], 0)
        self.assertIn(r["nodes"][NET], r["text"])
        self.assertIn(NET_MAC, r["text"])
        self.assertRegex(r["text"], r"read_only\s+no\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--in-guest"]:
        sys.exit(run_in_guest())
    unittest.main()
