"""Our back-end against real front-ends: QEMU 7.2 realizing a vhost-user-blk-pci device on our
BlkDevice (served by vhost_min.backend.Server in a thread, or by ``python3 -m vhost_min blk``), and
DPDK's virtio-user driving a net Device of ours up to DRIVER_OK and then sending packets into it.

What a user would check: the disk QEMU's guest would see (the virtio config space read through
the device's PCI BAR, as a driver reads it: capacity = the image), the features QEMU took from us
(QMP x-query-virtio-status), and for DPDK the frames testpmd transmitted, found byte by byte in
the TX chains our device was handed. Every message passes through a WireTap (launch.py) that
records both directions, and the state of our Backend is checked against it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import threading
import time
import unittest
from collections.abc import Iterator

from tests.peers import launch
from tests.peers.test_wire_peers import PeerTestCase as _WirePeerTestCase, report
from vhost_min.backend import Device, Server
from vhost_min.blk import VIRTIO_BLK_CONFIG_OFFSETS, BlkConfig, BlkDevice, VirtioBlkFeature
from vhost_min.net import NetDevice
from vhost_min.user import (VHOST_USER_NEED_REPLY_MASK, FrontendRequest, MemoryTable, ProtocolFeature,
                            VringAddr, VringState)
from vhost_min.virtio import (VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_RING_PACKED,
                              VIRTIO_F_VERSION_1, DeviceId, DeviceStatus)

F = FrontendRequest
P = ProtocolFeature

TIMEOUT = 10.0
MiB = 1 << 20
VHOST0 = "/machine/peripheral/vhost0/virtio-backend"      # launch.qemu_frontend's device


class PeerTestCase(_WirePeerTestCase):
    """A private temporary directory; afterwards no fd of ours and no process of ours left."""

    def assertNothingLeft(self) -> None:
        self.assertNoFdLeak()
        self.assertEqual(launch.child_processes(), [], "processes this test started are still running")


@contextlib.contextmanager
def served(device: Device, path: str, *more: tuple[object, str]) -> Iterator[Server]:
    """``device`` served on ``path`` (and each further (device or factory, path)) by one Server
    running in a thread; stopped and closed on exit."""
    server = Server()
    stop = threading.Event()
    thread = threading.Thread(target=server.run, kwargs={"stop_event": stop}, name="vhost_min server", daemon=True)
    try:
        for source, where in ((device, path), *more):
            server.add(source, where)
        thread.start()
        yield server
    finally:
        stop.set()
        if thread.is_alive():
            thread.join(TIMEOUT)
        server.close()
    if thread.is_alive():
        raise AssertionError("the server thread did not stop")


def wait_until(condition, timeout: float, what: str, peer: launch.Peer | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if peer is not None:
            peer.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s" + (f"; {peer.name} said:\n{peer.log()}"
                                                                      if peer is not None else ""))
        time.sleep(0.02)


# --------------------------------------------------------------------------------------------
# QEMU: what the guest would see, read through the PCI device with the CPUs stopped
# --------------------------------------------------------------------------------------------

# <linux/pci_regs.h> and <linux/virtio_pci.h>
PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_BASE_ADDRESS_0 = 0x10
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_CAPABILITY_LIST = 0x34
PCI_CAP_ID_VNDR = 0x09
VIRTIO_PCI_CAP_DEVICE_CFG = 4
#: struct virtio_pci_cap {u8 cap_vndr, cap_next, cap_len, cfg_type, bar, id, padding[2]; le32 offset, length}
virtio_pci_cap = struct.Struct("<BBBBBBxxII")
#: Where the test maps the BAR holding the device config: free in q35's 32-bit PCI hole.
BAR_ADDRESS = 0xFE000000


class HMP:
    """HMP commands through QMP's human-monitor-command: port I/O and physical memory reads,
    which work while the CPUs are stopped (-S)."""

    def __init__(self, qmp: launch.QMP) -> None:
        self.qmp = qmp

    def __call__(self, command: str) -> str:
        return self.qmp.execute("human-monitor-command", **{"command-line": command})

    def pci_read32(self, bdf: int, offset: int) -> int:
        """Configuration mechanism #1: the address to 0xcf8, the dword from 0xcfc."""
        self(f"o /w 0xcf8 {0x80000000 | bdf << 8 | offset:#x}")
        answer = self("i /w 0xcfc")                    # "portl[0x0cfc] = 0x10011af4"
        return int(answer.split("=")[1], 16)

    def pci_write32(self, bdf: int, offset: int, value: int) -> None:
        self(f"o /w 0xcf8 {0x80000000 | bdf << 8 | offset:#x}")
        self(f"o /w 0xcfc {value:#x}")

    def read_physical(self, address: int, length: int) -> bytes:
        text = self(f"xp /{length}bx {address:#x}")     # "00000000fe002000: 0x07 0x18 ..."
        return bytes(int(b, 16) for line in text.splitlines() if ":" in line for b in line.split(":")[1].split())


def virtio_device_config(qmp: launch.QMP, qdev_id: str, length: int) -> bytes:
    """The device-specific config space of virtio-pci device ``qdev_id``, read as a driver reads it:
    find its VIRTIO_PCI_CAP_DEVICE_CFG capability, place that BAR, enable memory decoding, read."""
    hmp = HMP(qmp)
    found = [(bus["bus"], dev) for bus in qmp.execute("query-pci") for dev in bus["devices"]
             if dev.get("qdev_id") == qdev_id]
    assert len(found) == 1, found
    bus, dev = found[0]
    bdf = bus << 8 | dev["slot"] << 3 | dev["function"]
    cap = hmp.pci_read32(bdf, PCI_CAPABILITY_LIST) & 0xFC
    while cap:
        raw = b"".join(hmp.pci_read32(bdf, cap + i).to_bytes(4, "little") for i in range(0, 16, 4))
        vndr, nxt, _len, cfg_type, bar, _id, offset, size = virtio_pci_cap.unpack(raw)
        if vndr == PCI_CAP_ID_VNDR and cfg_type == VIRTIO_PCI_CAP_DEVICE_CFG:
            break
        cap = nxt & 0xFC
    else:
        raise AssertionError(f"{qdev_id} has no VIRTIO_PCI_CAP_DEVICE_CFG capability")
    assert length <= size, (length, size)
    bar_reg = PCI_BASE_ADDRESS_0 + 4 * bar
    hmp.pci_write32(bdf, bar_reg, BAR_ADDRESS)
    if hmp.pci_read32(bdf, bar_reg) & PCI_BASE_ADDRESS_MEM_TYPE_64:
        hmp.pci_write32(bdf, bar_reg + 4, 0)
    hmp.pci_write32(bdf, PCI_COMMAND, hmp.pci_read32(bdf, PCI_COMMAND) & 0xFFFF | PCI_COMMAND_MEMORY)
    return hmp.read_physical(BAR_ADDRESS + offset, length)


#: QEMU 7.2 vhost-user-blk's config size: struct virtio_blk_config up to write_zeroes_may_unmap.
QEMU_BLK_CONFIG_SIZE = VIRTIO_BLK_CONFIG_OFFSETS["write_zeroes_may_unmap"] + 1      # 57


class QemuBlkBackendTest(PeerTestCase):
    """QEMU 7.2 (TCG, -S) realizes vhost-user-blk-pci on our BlkDevice: the realize-time handshake."""

    #: An odd size, so a capacity that matches is no coincidence: 3 MiB and 7 sectors.
    IMAGE_SIZE = 3 * MiB + 7 * 512

    def setUp(self):
        super().setUp()
        self.image = os.path.join(self.tmp, "disk.img")
        with open(self.image, "wb") as f:
            f.truncate(self.IMAGE_SIZE)

    def realize(self, backend_socket: str, num_queues: int, backend=None) -> tuple[launch.WireTap, dict, bytes]:
        """QEMU on a tap to ``backend_socket``; returns the tap, x-query-virtio-status and the device
        config read through the BAR. ``backend`` (a callable) checks our Backend before QEMU quits."""
        with launch.WireTap(os.path.join(self.tmp, "tap.sock"), backend_socket) as tap:
            with launch.qemu_frontend(tap.path, extra_device_args=f"num-queues={num_queues}") as qemu:
                # Realize ends with GET_CONFIG; QMP answers x-query-virtio-status once the device exists.
                wait_until(lambda: "GET_CONFIG" in tap.names(), TIMEOUT, "QEMU's GET_CONFIG", qemu)
                with qemu.qmp() as qmp:
                    self.assertEqual(qmp.execute("query-status")["status"], "prelaunch")
                    status = qmp.execute("x-query-virtio-status", path=VHOST0)
                    config = virtio_device_config(qmp, "vhost0", QEMU_BLK_CONFIG_SIZE)
                    if backend is not None:
                        backend()
                    qmp.quit()
                self.assertEqual(qemu.wait_exit(TIMEOUT), 0, qemu.log())
            self.assertEqual(tap.errors, [])
        report(self, "QEMU sent", " ".join(tap.names()))
        return tap, status, config

    def check(self, tap: launch.WireTap, status: dict, config: bytes, num_queues: int) -> None:
        """What QEMU shows is what our BlkDevice offered and answered."""
        expected = BlkDevice(self.image, num_queues=num_queues)
        try:
            offered_device_bits = expected.features
            expected_config = expected.config()
        finally:
            expected.close()
        # The disk the guest would see: capacity in 512-byte sectors = the image.
        seen = BlkConfig.unpack(config)
        self.assertEqual(seen.capacity, self.IMAGE_SIZE // 512)
        self.assertEqual(seen, expected_config._replace(max_secure_erase_sectors=0, max_secure_erase_seg=0,
                                                        secure_erase_sector_alignment=0))
        self.assertEqual(seen.num_queues, num_queues)
        # The features QEMU took from our GET_FEATURES (its vhost-user-blk passes each through).
        self.assertEqual((status["device-id"], status["num-vqs"], status["vhost-started"]),
                         (DeviceId.BLOCK, num_queues, False))
        dev_features = {entry.split(":")[0] for entry in status["host-features"]["dev-features"]}
        wanted = {f.name for f in VirtioBlkFeature if f & offered_device_bits} | {"VHOST_USER_F_PROTOCOL_FEATURES"}
        self.assertEqual(dev_features, wanted)
        transports = {entry.split(":")[0] for entry in status["host-features"]["transports"]}
        self.assertTrue({"VIRTIO_F_VERSION_1", "VIRTIO_RING_F_INDIRECT_DESC", "VIRTIO_RING_F_EVENT_IDX"} <= transports,
                        transports)
        # On the wire: our GET_FEATURES answer carried all of it, and QEMU's config read was ours.
        requests = tap.requests()
        offered = tap.reply_to(next(m for m in requests if m.request == F.GET_FEATURES)).u64()
        self.assertEqual(offered & offered_device_bits, offered_device_bits)
        self.assertTrue(offered & VIRTIO_F_VERSION_1 and offered & VHOST_USER_F_PROTOCOL_FEATURES)
        get_config = next(m for m in requests if m.request == F.GET_CONFIG)
        answer = tap.reply_to(get_config).payload
        self.assertEqual(answer[12:], config)      # struct vhost_user_config: offset, size, flags, then data
        self.assertEqual(tap.reply_to(next(m for m in requests if m.request == F.GET_QUEUE_NUM)).u64(), num_queues)
        # REPLY_ACK: every request QEMU sent with NEED_REPLY was acked 0.
        for m in requests:
            if m.flags & VHOST_USER_NEED_REPLY_MASK:
                self.assertEqual(tap.reply_to(m).u64(), 0, m.name)

    def check_backend_state(self, server: Server, num_queues: int) -> None:
        backends = list(server.backends)
        self.assertEqual(len(backends), 1)
        backend = backends[0]
        self.assertTrue(backend.owner)
        self.assertFalse(backend.features_acked)              # SET_FEATURES waits for the driver
        self.assertEqual(len(backend.rings), num_queues)
        self.assertTrue(all(ring.call_fd is not None and ring.err_fd is not None for ring in backend.rings))
        self.assertFalse(any(ring.started for ring in backend.rings))
        self.assertIsNotNone(backend.channel)                   # SET_BACKEND_REQ_FD
        self.assertTrue(backend.protocol_features & (P.MQ | P.REPLY_ACK | P.CONFIG | P.CONFIGURE_MEM_SLOTS))
        self.assertIsNone(backend.last_error)

    def serve_and_realize(self, num_queues: int) -> None:
        sock = os.path.join(self.tmp, "blk.sock")
        with BlkDevice(self.image, num_queues=num_queues) as device, served(device, sock) as server:
            tap, status, config = self.realize(sock, num_queues,
                                               backend=lambda: self.check_backend_state(server, num_queues))
            # QEMU has quit: our server saw the disconnect and is ready for the next front-end.
            wait_until(lambda: not server.backends, TIMEOUT, "the backend to retire")
            self.assertEqual(list(server.errors), [])
        self.check(tap, status, config, num_queues)
        self.assertNothingLeft()

    def test_one_queue_served_in_a_thread(self):
        self.serve_and_realize(1)

    def test_two_queues_served_in_a_thread(self):
        self.serve_and_realize(2)

    def test_two_queues_served_by_the_blk_command(self):
        with launch.vhost_min_blk(self.image, num_queues=2) as blk:
            tap, status, config = self.realize(blk.socket, 2)
            blk.check_alive()
        self.assertEqual(blk.proc.returncode, 0)        # SIGTERM: a clean exit
        self.check(tap, status, config, 2)
        self.assertNothingLeft()


# --------------------------------------------------------------------------------------------
# DPDK virtio-user: handshake to DRIVER_OK, then testpmd's txonly frames in our TX ring
# --------------------------------------------------------------------------------------------

# <linux/virtio_net.h>
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_HDR_GSO_NONE = 0
#: struct virtio_net_hdr_mrg_rxbuf {u8 flags; u8 gso_type; le16 hdr_len, gso_size, csum_start,
#: csum_offset, num_buffers}: every virtio 1.x net buffer starts with it.
virtio_net_hdr_mrg_rxbuf = struct.Struct("<BBHHHHH")
ETH_P_IP = 0x0800
IPPROTO_UDP = 17
TXPKTS = 64
#: testpmd's txonly defaults (app/test-pmd/txonly.c): 198.18.0.1:9 -> 198.18.0.2:9 over UDP.
TXONLY_SRC, TXONLY_DST, TXONLY_PORT = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2]), 9


class Net(Device):
    """A minimal virtio-net device: one queue pair, TX frames recorded and dropped, no RX traffic."""

    device_id = DeviceId.NET
    num_queues = 2                  # receiveq1 (0), transmitq1 (1)
    features = VIRTIO_NET_F_MAC | VIRTIO_NET_F_MRG_RXBUF
    MAC = bytes.fromhex("525400c0ffee")

    def __init__(self, keep: int = 16) -> None:
        super().__init__()
        self.tx_chains = 0
        self.frames: list[tuple[int, bytes, int]] = []     # (queue, chain bytes, writable bytes)
        self.statuses: list[int] = []
        self.keep = keep

    def get_config(self, offset: int, size: int) -> bytes:
        # struct virtio_net_config {u8 mac[6]; le16 status; le16 max_virtqueue_pairs; le16 mtu}
        space = self.MAC + struct.pack("<HHH", 1, 1, 1500)
        return space[offset:offset + size].ljust(size, b"\0")

    def set_status(self, status: int) -> None:
        self.statuses.append(status)

    def process(self, queue: int, vq) -> bool | None:
        if queue % 2 == 0:          # RX: nothing to deliver; the driver's buffers stay posted
            return None
        return super().process(queue, vq)

    def process_disabled(self, queue: int, vq) -> bool | None:
        if queue % 2:
            self.discard(queue, vq)     # TX on a disabled ring: dropped, as the spec allows
        return None

    def handle(self, queue: int, readable: list[memoryview], writable: list[memoryview]) -> int:
        self.tx_chains += 1
        if len(self.frames) < self.keep:
            self.frames.append((queue, b"".join(bytes(v) for v in readable), sum(map(len, writable))))
        return 0


class VirtioUserBackendTest(PeerTestCase):
    """dpdk-testpmd's virtio-user port (txonly) as the front-end of our Net device."""

    PACKETS = 2000

    def run_txonly(self, packed: bool) -> None:
        sock, tap_sock = os.path.join(self.tmp, "net.sock"), os.path.join(self.tmp, "tap.sock")
        device = Net()
        start = time.monotonic()
        with served(device, sock) as server, launch.WireTap(tap_sock, sock) as tap:
            # txonly sends from the port's MAC: given here, the frames must carry it. (virtio-user
            # answers the driver's MAC reads itself, so VIRTIO_NET_F_MAC never reaches us.)
            mac = ":".join(f"{b:02x}" for b in Net.MAC)
            with launch.testpmd_virtio_user(tap_sock, packed=packed, vdev_args=f"mac={mac}",
                                            extra=("--forward-mode=txonly", f"--txpkts={TXPKTS}")) as pmd:
                wait_until(lambda: device.tx_chains >= self.PACKETS, 30, f"{self.PACKETS} TX chains", pmd)
                backend = device.backend
                self.assertIsNotNone(backend)
                # What our back-end reached, checked against the wire.
                self.assertTrue(backend.owner)
                # Of ours, virtio-user takes these: not MAC, EVENT_IDX, LOG_ALL; RING_PACKED with packed_vq=1.
                expected = (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES | VIRTIO_F_INDIRECT_DESC
                            | VIRTIO_NET_F_MRG_RXBUF | (VIRTIO_F_RING_PACKED if packed else 0))
                self.assertEqual(backend.features, expected, f"{backend.features:#x}")
                self.assertEqual(backend.protocol_features, P.MQ | P.REPLY_ACK | P.STATUS)
                self.assertEqual(backend.status, DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER
                                 | DeviceStatus.FEATURES_OK | DeviceStatus.DRIVER_OK)
                self.assertEqual(len(backend.memory.regions), 1)
                for ring in backend.rings:
                    self.assertTrue(ring.started and ring.enabled and not ring.broken, ring)
                    self.assertEqual(ring.size, 256)
                    self.assertIsNotNone(ring.queue)
                self.assertEqual(type(backend.rings[1].queue).__name__,
                                 "PackedDeviceQueue" if packed else "SplitDeviceQueue")
                self.assertIsNone(backend.last_error)
                # virtio-user never reads the status back after DRIVER_OK; the tap does, on
                # testpmd's own connection while its control path is idle: 0xf, no NEEDS_RESET.
                status = tap.ask(F.GET_STATUS)
                self.assertEqual(status.u64(), 0xF)
                pmd.check_alive()
            # testpmd stopped (SIGTERM): it tore its device down through us, hung up, exited 0.
            self.assertEqual(pmd.proc.returncode, 0)
            wait_until(lambda: not server.backends, TIMEOUT, "the backend to retire")
            self.assertEqual(list(server.errors), [])
            self.assertEqual(tap.errors, [])
        elapsed = time.monotonic() - start
        self.check_wire(tap, expected, packed)
        self.check_frames(device)
        self.assertEqual(device.statuses[-1], 0xF)
        report(self, f"{'packed' if packed else 'split'} txonly",
               f"{device.tx_chains} TX chains in our device, {elapsed:.1f} s in all; "
               f"virtio-user sent {' '.join(tap.names())}")
        self.assertNothingLeft()

    def check_wire(self, tap: launch.WireTap, expected: int, packed: bool) -> None:
        requests = tap.requests()
        names = [m.name for m in requests]
        self.assertEqual(names[0], "SET_OWNER")                  # virtio-user's order (PEERS.md)
        set_features = next(m for m in requests if m.request == F.SET_FEATURES)
        self.assertEqual(set_features.u64(), expected)
        # FEATURES_OK stuck: each GET_STATUS virtio-user sent after it was answered with it.
        statuses = [tap.reply_to(m).u64() for m in requests if m.request == F.GET_STATUS]
        self.assertTrue(statuses, names)
        ok = DeviceStatus.ACKNOWLEDGE | DeviceStatus.DRIVER | DeviceStatus.FEATURES_OK
        self.assertTrue(all(s & ok == ok for s in statuses), statuses)
        set_statuses = [m.u64() for m in requests if m.request == F.SET_STATUS]
        self.assertIn(ok | DeviceStatus.DRIVER_OK, set_statuses)
        # One memory region; the rings inside it; both enabled; REPLY_ACK answered 0 throughout.
        table = next(m for m in requests if m.request == F.SET_MEM_TABLE)
        self.assertEqual(len(MemoryTable.unpack(table.payload).regions), 1)
        self.assertEqual(tap.reply_to(table).u64(), 0)
        region = MemoryTable.unpack(table.payload).regions[0]
        for m in requests:
            if m.request == F.SET_VRING_ADDR:
                addr = VringAddr.unpack(m.payload)
                for uva in (addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr):
                    self.assertTrue(region.userspace_addr <= uva < region.userspace_addr + region.memory_size)
            if m.flags & VHOST_USER_NEED_REPLY_MASK:
                self.assertEqual(tap.reply_to(m).u64(), 0, m.name)
        enables = [VringState.unpack(m.payload) for m in requests if m.request == F.SET_VRING_ENABLE]
        self.assertEqual(enables, [(0, 1), (1, 1), (0, 0), (1, 0)])
        # testpmd's teardown went through us: rings disabled, then stopped, each GET_VRING_BASE answered.
        self.assertEqual([m.name for m in requests[-2:]], ["GET_VRING_BASE", "GET_VRING_BASE"])
        for m in requests[-2:]:
            self.assertEqual(VringState.unpack(tap.reply_to(m).payload).index, VringState.unpack(m.payload).index)
        bases = [VringState.unpack(m.payload) for m in requests if m.request == F.SET_VRING_BASE]
        if packed:                                               # avail wrap counter 1 in bit 15
            self.assertTrue(all(b.num == 1 << 15 for b in bases), bases)

    def check_frames(self, device: Net) -> None:
        """testpmd's txonly frames, as our device was handed them: a virtio-net header, then a
        64-byte Ethernet/IPv4/UDP frame, nothing device-writable."""
        self.assertGreaterEqual(device.tx_chains, self.PACKETS)
        self.assertEqual(len(device.frames), device.keep)
        for queue, chain, writable in device.frames:
            self.assertEqual((queue, writable, len(chain)), (1, 0, virtio_net_hdr_mrg_rxbuf.size + TXPKTS))
            flags, gso_type, *_ = virtio_net_hdr_mrg_rxbuf.unpack_from(chain)
            self.assertEqual((flags, gso_type), (0, VIRTIO_NET_HDR_GSO_NONE))
            frame = chain[virtio_net_hdr_mrg_rxbuf.size:]
            ethertype, = struct.unpack_from("!H", frame, 12)
            self.assertEqual((frame[6:12], ethertype), (Net.MAC, ETH_P_IP))
            ip = frame[14:34]
            self.assertEqual((ip[0] >> 4, ip[9], ip[12:16], ip[16:20]), (4, IPPROTO_UDP, TXONLY_SRC, TXONLY_DST))
            self.assertEqual(struct.unpack_from("!H", ip, 2)[0], TXPKTS - 14)       # IPv4 total length
            self.assertEqual(struct.unpack_from("!HH", frame, 34), (TXONLY_PORT, TXONLY_PORT))

    def test_split_ring_txonly(self):
        self.run_txonly(packed=False)

    def test_packed_ring_txonly(self):
        self.run_txonly(packed=True)


class QemuNetBackendTest(PeerTestCase):
    """QEMU 7.2's vhost-user netdev (``-netdev vhost-user`` + ``virtio-net-pci,vectors=0``, -S) on
    our NetDevice (vhost_min.net): the realize-time handshake. The netdev enables both rings as soon as its
    chardev opens, after SET_PROTOCOL_FEATURES and before any SET_FEATURES (PEERS.md), and QEMU
    7.2 acks INBAND_NOTIFICATIONS when offered though it implements none of its messages."""

    def test_realize_refuses_nothing_and_acks_no_inband_notifications(self):
        sock, tap_sock = os.path.join(self.tmp, "net.sock"), os.path.join(self.tmp, "tap.sock")
        device = NetDevice(mac=Net.MAC)          # the real device, loopback
        with self.assertLogs("vhost_min", logging.INFO) as logs, served(device, sock) as server, \
                launch.WireTap(tap_sock, sock) as tap:
            with launch.qemu_frontend(tap.path, device="virtio-net-pci") as qemu:
                # The last realize-time message is the second SET_VRING_ENABLE (no reply asked):
                # wait until our backend has handled it, or refused anything.
                wait_until(lambda: server.errors or (server.backends and all(
                    ring.enabled for ring in server.backends[0].rings[:2])), TIMEOUT, "both rings enabled", qemu)
                with qemu.qmp() as qmp:
                    self.assertEqual(qmp.execute("query-status")["status"], "prelaunch")
                    status = qmp.execute("x-query-virtio-status", path=VHOST0)
                    backend = server.backends[0]
                    self.assertEqual(list(server.errors), [])
                    self.assertFalse(backend.features_acked, "SET_FEATURES came before the rings were enabled")
                    # RX and TX; QEMU answers the control queue (2) itself and never hands it over.
                    self.assertEqual([(ring.enabled, ring.started) for ring in backend.rings],
                                     [(True, False), (True, False), (False, False)])
                    self.assertTrue(backend.protocol_negotiated)
                    acked = backend.protocol_features
                    self.assertIsNone(backend.last_error)
                    qmp.quit()
                self.assertEqual(qemu.wait_exit(TIMEOUT), 0, qemu.log())
            wait_until(lambda: not server.backends, TIMEOUT, "the backend to retire")
            self.assertEqual(list(server.errors), [])
            self.assertEqual(tap.errors, [])
        # Nothing refused: no "rejected ..." line, no warning or error of any kind.
        self.assertEqual([line for line in logs.output if not line.startswith("INFO:")], [])
        self.assertFalse([line for line in logs.output if "rejected" in line], logs.output)
        # What crossed the wire: the rings enabled before any SET_FEATURES, and the protocol
        # features we offered and QEMU acked, without INBAND_NOTIFICATIONS on either side.
        requests = tap.requests()
        names = [m.name for m in requests]
        self.assertNotIn("SET_FEATURES", names)
        self.assertEqual([VringState.unpack(m.payload) for m in requests if m.request == F.SET_VRING_ENABLE],
                         [(0, 1), (1, 1)])
        offered = P(tap.reply_to(next(m for m in requests if m.request == F.GET_PROTOCOL_FEATURES)).u64())
        set_protocol = P(next(m for m in requests if m.request == F.SET_PROTOCOL_FEATURES).u64())
        self.assertFalse(offered & P.INBAND_NOTIFICATIONS, f"offered {offered!r}")
        self.assertFalse(set_protocol & P.INBAND_NOTIFICATIONS, f"QEMU acked {set_protocol!r}")
        self.assertEqual(acked, set_protocol)
        self.assertTrue(set_protocol & P.MQ and set_protocol & P.REPLY_ACK, repr(set_protocol))
        # QEMU realized virtio-net over our device: its features are ours plus what QEMU adds itself.
        self.assertEqual((status["device-id"], status["num-vqs"]), (DeviceId.NET, 3))     # rx, tx, ctrl
        dev_features = {entry.split(":")[0] for entry in status["host-features"]["dev-features"]}
        self.assertTrue({"VIRTIO_NET_F_MAC", "VIRTIO_NET_F_MRG_RXBUF"} <= dev_features, dev_features)
        report(self, "QEMU virtio-net realize sent", f"{' '.join(names)}; protocol features acked "
                                                     f"{int(set_protocol):#x} of {int(offered):#x}")
        self.assertNothingLeft()


if __name__ == "__main__":
    unittest.main()
