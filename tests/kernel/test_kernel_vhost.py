"""Kernel vhost for real (vhost_min.ioctl), inside a QEMU guest booting Debian's 6.12 kernel.

Our driver side (vring.SplitDriverQueue over a memfd mapped in the guest process) talks to the
kernel's vhost-net, vhost-vsock and vhost-scsi:

- vhost-net: a frame put on the TX ring comes out of a tap device, a frame sent into the tap
  arrives in an RX buffer behind its virtio-net header, the dirty log marks exactly the pages the
  kernel wrote, and with ACCESS_PLATFORM the kernel asks for the buffer's IOTLB entry (a MISS we
  read from the fd) and sends the frame once we write the UPDATE. The tap fd is the end vhost-net
  holds (what it sends, the stack receives), so the test watches and feeds the other end, the
  tap's network interface, with an AF_PACKET socket.
- vhost-vsock: our virtio-vsock driver, as guest CID 3, connects to an AF_VSOCK listener of the
  same kernel (the host side, CID 2) and data flows both ways.
- vhost-scsi: a LIO target made through configfs (ramdisk backstore, one LUN) answers an INQUIRY
  sent on our request ring, after VHOST_SCSI_SET_ENDPOINT; workers, events-missed and the ABI
  version as the kernel reports them.

One boot runs every check: the guest runs ``python3 -m tests.kernel.test_kernel_vhost --in-guest``,
which prints one JSON line per check with what it observed (or the traceback that stopped it), and
the test methods assert on those lines. The bring-up itself is :func:`start_dataplane`, written
against the :class:`vhost_min.dataplane.Dataplane` interface only, so that vDPA and vhost-user can
run the same routine; the device-specific parts (tap frames, vsock packets, SCSI commands) are apart.

About 15 s under TCG: one boot (~8 s) plus the checks.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import socket
import struct
import subprocess
import sys
import unittest
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

from tests.kernel import GuestChecks, run_checks
from vhost_min.dataplane import Dataplane
from vhost_min.errors import IoctlError, NotSupportedError
from vhost_min.ioctl import (VHOST_BACKEND_F_IOTLB_MSG_V2, VHOST_FORK_OWNER_KTHREAD, VHOST_FORK_OWNER_TASK,
                             VHOST_SCSI_ABI_VERSION, VhostNet, VhostScsi, VhostVsock, _IOW)
from vhost_min.memory import VHOST_ACCESS_RO, VHOST_ACCESS_RW, GuestMemory, address_of
from vhost_min.net import VIRTIO_NET_HDR_MRG_RXBUF, VirtioNetFeature
from vhost_min.user import VHOST_IOTLB_MISS, VHOST_IOTLB_UPDATE, IotlbMsg, MemoryRegion, VringAddr
from vhost_min.virtio import (VHOST_F_LOG_ALL, VHOST_NET_F_VIRTIO_NET_HDR, VHOST_VRING_F_LOG,
                              VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1)
from vhost_min.vring import SplitDriverQueue

GUEST_MODULES = ("vhost_net", "vhost_vsock", "vhost_scsi", "tun")
QUEUE_SIZE = 256
PAGE = 0x1000
#: Bound on every wait for the kernel inside the guest; a hang fails the check, it never passes it.
WAIT = 20.0


# --------------------------------------------------------------------------------------------
# The generic driver: any Dataplane
# --------------------------------------------------------------------------------------------

class Ring(NamedTuple):
    """One ring as the driver sets it up: vhost index, our driver side, kick and call eventfds."""

    index: int
    queue: SplitDriverQueue
    kick: int
    call: int


def user_address(regions: Sequence[MemoryRegion], gpa: int) -> int:
    """The ``userspace_addr``-space address of guest-physical ``gpa`` (what SET_VRING_ADDR takes)."""
    for region in regions:
        if region.guest_phys_addr <= gpa < region.guest_phys_addr + region.memory_size:
            return region.userspace_addr + gpa - region.guest_phys_addr
    raise ValueError(f"guest address {gpa:#x} is in no region")


def start_dataplane(dp: Dataplane, regions: Sequence[MemoryRegion], rings: Sequence[Ring], wanted: int, *,
                    fds: Sequence[int] = (), enable: bool = True) -> int:
    """Bring a device up through the Dataplane interface only, as a VMM does: own it, negotiate
    ``wanted`` against what it offers, give it the memory table, then per ring its size, addresses,
    base, kick and call; then enable every ring (after all are set up: enabling may start the
    device, and a started ring refuses a new size) and start the device (vDPA's DRIVER_OK; nothing
    for kernel vhost). Returns the features set."""
    dp.set_owner()
    features = dp.get_features() & wanted
    dp.set_features(features)
    dp.set_mem_table(regions, fds)
    for ring in rings:
        q = ring.queue
        dp.set_vring_num(ring.index, q.size)
        dp.set_vring_addr(VringAddr(ring.index, 0, user_address(regions, q.desc_addr),
                                    user_address(regions, q.used_addr), user_address(regions, q.avail_addr), 0))
        dp.set_vring_base(ring.index, q.get_base())
        dp.set_vring_kick(ring.index, ring.kick)
        dp.set_vring_call(ring.index, ring.call)
    if enable:
        for ring in rings:
            dp.set_vring_enable(ring.index, True)
        dp.start_device()
    return features


# --------------------------------------------------------------------------------------------
# Guest-side helpers
# --------------------------------------------------------------------------------------------

class Arena:
    """Guest memory for one device: a memfd mapped at gpa 0, its address in this process, and a
    page allocator for rings and buffers."""

    def __init__(self, size: int) -> None:
        fd = os.memfd_create("vhost-min-guest-memory", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self.memory = GuestMemory()
            self.view = self.memory.add_region(0, size, fd=fd).view
        finally:
            os.close(fd)          # the mapping keeps the memory
        self.size = size
        self.uva = address_of(self.view)
        self.allocated = 0          #: bytes handed out so far, from gpa 0 up

    def regions(self) -> list[MemoryRegion]:
        return [MemoryRegion(0, self.size, self.uva, 0)]

    def alloc(self, size: int) -> int:
        """``size`` bytes on pages of their own."""
        gpa = self.allocated
        self.allocated += -(-size // PAGE) * PAGE
        if self.allocated > self.size:
            raise MemoryError(f"arena of {self.size:#x} bytes is full")
        return gpa

    def queue(self, size: int = QUEUE_SIZE) -> SplitDriverQueue:
        parts = SplitDriverQueue.layout(size, self.alloc(SplitDriverQueue.layout(size, 0)["end"]))
        return SplitDriverQueue(self.memory, size, parts["desc"], parts["driver"], parts["device"])

    def close(self) -> None:
        self.memory.close()


def eventfd(stack: contextlib.ExitStack) -> int:
    fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    stack.callback(os.close, fd)
    return fd


def rings_for(arena: Arena, stack: contextlib.ExitStack, indices: Sequence[int]) -> list[Ring]:
    return [Ring(i, arena.queue(), eventfd(stack), eventfd(stack)) for i in indices]


def wait_readable(fd: int | socket.socket, what: str) -> None:
    if not select.select([fd], [], [], WAIT)[0]:
        raise TimeoutError(f"no {what} within {WAIT} s")


def reap(ring: Ring, what: str) -> list[tuple[object, int]]:
    """Wait for the call eventfd, clear it, and return what the device used."""
    while True:
        used = ring.queue.reap()
        if used:
            return used
        wait_readable(ring.call, f"call on ring {ring.index} ({what})")
        os.eventfd_read(ring.call)


def send_chain(arena: Arena, ring: Ring, readable: Sequence[bytes], writable: Sequence[int] = ()) -> list[int]:
    """Put ``readable`` buffers (copied into fresh pages) and then buffers of the ``writable``
    sizes on the ring as one chain, and kick. Returns the buffers' gpas; the first is the token."""
    out = []
    for data in readable:
        gpa = arena.alloc(len(data))
        arena.memory.write(gpa, data)
        out.append((gpa, len(data)))
    inn = [(arena.alloc(size), size) for size in writable]
    gpas = [gpa for gpa, _ in out + inn]
    ring.queue.add(out, inn, gpas[0])
    ring.queue.publish()
    os.eventfd_write(ring.kick, 1)
    return gpas


def post_buffers(arena: Arena, ring: Ring, count: int, size: int) -> list[int]:
    """Make ``count`` device-writable buffers of ``size`` bytes, each on its own page, available."""
    gpas = [arena.alloc(size) for _ in range(count)]
    for gpa in gpas:
        ring.queue.add([], [(gpa, size)], gpa)
    ring.queue.publish()
    os.eventfd_write(ring.kick, 1)
    return gpas


def error_facts(exc: IoctlError) -> dict:
    return {"type": type(exc).__name__, "errno": exc.errno, "ioctl": exc.ioctl, "text": str(exc)}


# --- vhost-net -------------------------------------------------------------------------------

TUNSETIFF = _IOW(ord("T"), 202, ctypes.c_int)              # linux/if_tun.h
TUNSETVNETHDRSZ = _IOW(ord("T"), 216, ctypes.c_int)
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
IFREQ = struct.Struct("16sH22x")                           # struct ifreq: name, ifr_flags (40 bytes)
ETH_P_TEST = 0x88B5                                        # IEEE 802 local experimental ethertype
TAP_NAME = "vhmtap0"


def ethernet_frame(payload: bytes) -> bytes:
    return bytes.fromhex("02000000000b" "02000000000a") + ETH_P_TEST.to_bytes(2, "big") + payload


def open_tap(stack: contextlib.ExitStack) -> int:
    """A tap device as QEMU gives vhost-net one: IFF_VNET_HDR with a 12-byte (VERSION_1) header,
    IPv6 off (no router solicitations in our RX ring), link up."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    stack.callback(os.close, fd)
    fcntl.ioctl(fd, TUNSETIFF, bytearray(IFREQ.pack(TAP_NAME.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)))
    fcntl.ioctl(fd, TUNSETVNETHDRSZ, ctypes.c_int(VIRTIO_NET_HDR_MRG_RXBUF.size))
    with contextlib.suppress(FileNotFoundError), open(f"/proc/sys/net/ipv6/conf/{TAP_NAME}/disable_ipv6", "w") as f:
        f.write("1")
    subprocess.run(["/usr/bin/ip", "link", "set", TAP_NAME, "up"], check=True)
    return fd


def packet_socket(stack: contextlib.ExitStack) -> socket.socket:
    """The tap's wire: frames the kernel received from it (our TX) and frames to send into it (our RX)."""
    sock = stack.enter_context(socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_TEST)))
    sock.bind((TAP_NAME, ETH_P_TEST))
    return sock


def receive_frame(sock: socket.socket) -> bytes:
    wait_readable(sock, "frame on the tap")
    return sock.recv(65536)


def check_vhost_net() -> dict:
    out: dict = {}
    with contextlib.ExitStack() as stack:
        arena = Arena(0x10000)
        stack.callback(arena.close)
        rx, tx = rings = rings_for(arena, stack, (VhostNet.RX_QUEUE, VhostNet.TX_QUEUE))
        tap = open_tap(stack)
        wire = packet_socket(stack)
        net = stack.enter_context(VhostNet(backend_fd=tap))
        out["offered"] = net.get_features()
        out["backend_features"] = int(net.get_backend_features())
        out["negotiated"] = start_dataplane(net, arena.regions(), rings, VIRTIO_F_VERSION_1)
        try:
            net.set_owner()
        except IoctlError as exc:
            out["second_set_owner"] = error_facts(exc)
        net.set_vring_busyloop_timeout(rx.index, 50)
        out["busyloop_timeout"] = net.get_vring_busyloop_timeout(rx.index)

        # TX: header + frame on ring 1 comes out of the tap.
        sent = ethernet_frame(b"vhost_min TX " + bytes(range(256)) * 2)
        tx_gpa, = send_chain(arena, tx, [bytes(VIRTIO_NET_HDR_MRG_RXBUF.size) + sent])
        out["tx_sent"], out["tx_received"] = sent.hex(), receive_frame(wire).hex()
        out["tx_used"] = reap(tx, "TX")
        out["tx_buffer_gpa"] = tx_gpa

        # Migration-style dirty logging, switched on while running (as QEMU does): log base, log
        # fd, VHOST_F_LOG_ALL, and the RX ring's used-ring logging.
        log_fd = os.memfd_create("vhost-min-log", os.MFD_CLOEXEC)
        stack.callback(os.close, log_fd)
        os.ftruncate(log_fd, PAGE)
        log_event = eventfd(stack)
        net.set_log_base(log_fd, PAGE)
        net.set_log_fd(log_event)
        net.set_features(out["negotiated"] | VHOST_F_LOG_ALL)
        q, regions = rx.queue, arena.regions()
        net.set_vring_addr(VringAddr(rx.index, VHOST_VRING_F_LOG, user_address(regions, q.desc_addr),
                                     user_address(regions, q.used_addr), user_address(regions, q.avail_addr),
                                     q.used_addr))

        # RX: a frame sent into the tap lands in the first posted buffer, behind a virtio-net header.
        rx_buffers = post_buffers(arena, rx, 4, 2048)
        frame = ethernet_frame(b"vhost_min RX " + bytes(range(255, -1, -1)))
        wire.send(frame)
        used = reap(rx, "RX")
        out["rx_sent"], out["rx_buffers"], out["rx_used"] = frame.hex(), rx_buffers, used
        out["rx_received"] = arena.memory.read(used[0][0], used[0][1]).hex()
        out["rx_used_ring_gpa"] = q.used_addr
        bitmap = os.pread(log_fd, arena.size // PAGE // 8, 0)
        out["dirty_pages"] = [p for p in range(arena.size // PAGE) if bitmap[p // 8] >> (p % 8) & 1]
        wait_readable(log_event, "log eventfd")
        out["log_signalled"] = os.eventfd_read(log_event)

        # Stop (detach the tap) and read where each ring stopped.
        for ring in rings:
            net.set_vring_enable(ring.index, False)
        out["bases"] = [net.get_vring_base(ring.index).num for ring in rings]
        out["bases_expected"] = [q.get_base() for q in (rx.queue, tx.queue)]
        try:
            out["features_array"] = net.get_features_array()
        except IoctlError as exc:
            out["features_array_error"] = error_facts(exc)
        try:
            net.new_worker()
        except IoctlError as exc:
            out["new_worker_error"] = error_facts(exc)
        try:
            net.set_vring_endian(rx.index, True)
            out["endian_big"] = net.get_vring_endian(rx.index)
        except IoctlError as exc:
            out["endian_error"] = error_facts(exc)
    return out


def check_vhost_net_iotlb() -> dict:
    """ACCESS_PLATFORM: ring pages mapped up front (as QEMU does), the TX buffer left out; the
    kernel reports the miss on its fd, we write the UPDATE, the frame goes out."""
    out: dict = {}
    with contextlib.ExitStack() as stack:
        arena = Arena(0x10000)
        stack.callback(arena.close)
        rings = rings_for(arena, stack, (VhostNet.RX_QUEUE, VhostNet.TX_QUEUE))
        tx = rings[1]
        tap = open_tap(stack)
        wire = packet_socket(stack)
        net = stack.enter_context(VhostNet(backend_fd=tap))
        net.set_backend_features(VHOST_BACKEND_F_IOTLB_MSG_V2)
        out["negotiated"] = start_dataplane(net, arena.regions(), rings,
                                            VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM, enable=False)
        # Ring addresses were given as user addresses: map that IOVA range onto the rings, which
        # are all that was allocated so far.
        net.send_iotlb_msg(IotlbMsg(arena.uva, arena.allocated, arena.uva, VHOST_ACCESS_RW, VHOST_IOTLB_UPDATE))
        for ring in rings:
            net.set_vring_enable(ring.index, True)
        out["pending_before_kick"] = net.read_iotlb_msg() is not None
        sent = ethernet_frame(b"vhost_min TX through the IOTLB")
        out["tx_buffer_gpa"], = send_chain(arena, tx, [bytes(VIRTIO_NET_HDR_MRG_RXBUF.size) + sent])
        wait_readable(net.fileno(), "IOTLB miss")
        miss, asid = net.read_iotlb_msg()
        out["miss"], out["miss_asid"] = list(miss), asid
        # Descriptors carry guest-physical addresses: IOVA == gpa for the buffers.
        net.send_iotlb_msg(IotlbMsg(0, arena.size, arena.uva, VHOST_ACCESS_RW, VHOST_IOTLB_UPDATE))
        out["tx_sent"], out["tx_received"] = sent.hex(), receive_frame(wire).hex()
        out["more_misses"] = net.read_iotlb_msg() is not None
    return out


def check_fork_owner() -> dict:
    with VhostNet() as net:
        default = net.get_fork_from_owner()
        net.set_fork_from_owner(VHOST_FORK_OWNER_KTHREAD)
        return {"default": default, "after_set_kthread": net.get_fork_from_owner()}


# --- vhost-vsock -----------------------------------------------------------------------------

#: struct virtio_vsock_hdr (linux/virtio_vsock.h), packed little-endian, 44 bytes.
VSOCK_HDR = struct.Struct("<QQIIIHHIII")
VIRTIO_VSOCK_TYPE_STREAM = 1
VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_RST = 1, 2, 3
VIRTIO_VSOCK_OP_RW = 5
GUEST_CID, GUEST_PORT, HOST_PORT = 3, 40000, 5000
BUF_ALLOC = 65536


class VsockPacket(NamedTuple):
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int


def vsock_packet(op: int, payload: bytes = b"", fwd_cnt: int = 0) -> bytes:
    return VSOCK_HDR.pack(GUEST_CID, socket.VMADDR_CID_HOST, GUEST_PORT, HOST_PORT, len(payload),
                          VIRTIO_VSOCK_TYPE_STREAM, op, 0, BUF_ALLOC, fwd_cnt) + payload


def receive_packet(arena: Arena, rx: Ring, op: int, seen: list) -> tuple[VsockPacket, bytes]:
    """The next RX packet with ``op``; others go to ``seen``; used buffers are made available again."""
    while True:
        for gpa, length in reap(rx, "vsock RX"):
            data = arena.memory.read(gpa, length)
            packet = VsockPacket._make(VSOCK_HDR.unpack_from(data))
            rx.queue.add([], [(gpa, 4096)], gpa)
            rx.queue.publish()
            os.eventfd_write(rx.kick, 1)
            if packet.op == op:
                return packet, data[VSOCK_HDR.size:VSOCK_HDR.size + packet.len]
            seen.append(packet.op)


def check_vhost_vsock() -> dict:
    out: dict = {}
    with contextlib.ExitStack() as stack:
        arena = Arena(0x40000)
        stack.callback(arena.close)
        rx, tx = rings = rings_for(arena, stack, (VhostVsock.RX_QUEUE, VhostVsock.TX_QUEUE))
        listener = stack.enter_context(socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM))
        listener.bind((socket.VMADDR_CID_ANY, HOST_PORT))
        listener.listen(1)
        listener.settimeout(WAIT)
        vsock = stack.enter_context(VhostVsock())
        out["offered"] = vsock.get_features()
        vsock.set_guest_cid(GUEST_CID)
        out["negotiated"] = start_dataplane(vsock, arena.regions(), rings, VIRTIO_F_VERSION_1)
        post_buffers(arena, rx, 8, 4096)
        seen: list[int] = []

        send_chain(arena, tx, [vsock_packet(VIRTIO_VSOCK_OP_REQUEST)])
        response, _ = receive_packet(arena, rx, VIRTIO_VSOCK_OP_RESPONSE, seen)
        out["response"] = list(response)
        conn, peer = listener.accept()
        stack.enter_context(conn)
        conn.settimeout(WAIT)
        out["peer"] = list(peer)

        to_host = b"from the guest's virtio-vsock driver " + bytes(range(200))
        send_chain(arena, tx, [vsock_packet(VIRTIO_VSOCK_OP_RW, to_host)])
        got = b""
        while len(got) < len(to_host):
            got += conn.recv(len(to_host) - len(got))
        out["to_host_sent"], out["to_host_received"] = to_host.hex(), got.hex()

        to_guest = b"from the AF_VSOCK socket on the host side " + bytes(range(255, 0, -1))
        conn.sendall(to_guest)
        packet, payload = receive_packet(arena, rx, VIRTIO_VSOCK_OP_RW, seen)
        out["to_guest_sent"], out["to_guest_received"] = to_guest.hex(), payload.hex()
        out["to_guest_header"] = list(packet)
        out["other_ops"] = seen
    return out


# --- vhost-scsi ------------------------------------------------------------------------------

CONFIGFS = "/sys/kernel/config"
WWPN = "naa.5001405aabbccdd"
INITIATOR = "naa.5001405aabbccde"
TPGT = 1
#: struct virtio_scsi_cmd_req (cdb 32 bytes) and virtio_scsi_cmd_resp (sense 96 bytes), linux/virtio_scsi.h.
SCSI_REQ = struct.Struct("<8sQBBB32s")
SCSI_RESP = struct.Struct("<IIHBB96s")
INQUIRY_LEN = 36


@contextlib.contextmanager
def lio_target() -> Iterator[str]:
    """A vhost fabric target WWPN/tpgt_1 with a nexus and LUN 0 on a 64 KiB ramdisk (rd_mcp, part
    of target_core_mod); removed again afterwards. Yields the tpg's configfs directory."""
    if not os.path.isdir(f"{CONFIGFS}/target"):
        subprocess.run(["mount", "-t", "configfs", "configfs", CONFIGFS], check=True)
    tpg = f"{CONFIGFS}/target/vhost/{WWPN}/tpgt_{TPGT}"
    disk = f"{CONFIGFS}/target/core/rd_mcp_0/vhostmin"
    lun = f"{tpg}/lun/lun_0"
    os.makedirs(tpg)
    os.makedirs(disk)
    try:
        with open(f"{disk}/control", "w") as f:
            f.write("rd_pages=16")
        with open(f"{disk}/enable", "w") as f:
            f.write("1")
        with open(f"{tpg}/nexus", "w") as f:
            f.write(INITIATOR)
        os.mkdir(lun)
        os.symlink(disk, f"{lun}/disk")
        yield tpg
    finally:
        for undo in (lambda: os.unlink(f"{lun}/disk"), lambda: os.rmdir(lun), lambda: os.rmdir(tpg),
                     lambda: os.rmdir(os.path.dirname(tpg)), lambda: os.rmdir(disk),
                     lambda: os.rmdir(os.path.dirname(disk))):
            with contextlib.suppress(FileNotFoundError):
                undo()


def check_vhost_scsi() -> dict:
    out: dict = {}
    with contextlib.ExitStack() as stack:
        arena = Arena(0x40000)
        stack.callback(arena.close)
        tpg = stack.enter_context(lio_target())
        rings = rings_for(arena, stack, (VhostScsi.CONTROL_QUEUE, VhostScsi.EVENT_QUEUE, VhostScsi.REQUEST_QUEUE))
        request = rings[2]
        scsi = stack.enter_context(VhostScsi())
        out["abi_version"] = scsi.get_abi_version()
        out["offered"] = scsi.get_features()
        # The generic bring-up but for enable: vhost-scsi has none, the endpoint starts the rings.
        out["negotiated"] = start_dataplane(scsi, arena.regions(), rings, VIRTIO_F_VERSION_1, enable=False)
        try:
            scsi.set_vring_enable(request.index, True)
        except NotSupportedError as exc:
            out["enable_error"] = str(exc)
        try:
            scsi.get_backend_features()
        except IoctlError as exc:
            out["backend_features_error"] = error_facts(exc)

        # A second worker thread for the request ring (the default one is id 0): it serves the
        # INQUIRY below.
        out["default_worker"] = scsi.get_vring_worker(request.index)
        worker = out["new_worker"] = scsi.new_worker()
        scsi.attach_vring_worker(request.index, worker)
        out["attached_worker"] = scsi.get_vring_worker(request.index)
        try:
            scsi.free_worker(worker)
        except IoctlError as exc:
            out["free_attached_worker_error"] = error_facts(exc)

        scsi.set_endpoint(WWPN, TPGT)
        try:
            os.rmdir(tpg)
        except OSError as exc:
            out["rmdir_tpg_in_use"] = exc.errno
        try:
            scsi.set_endpoint(WWPN, TPGT)
        except IoctlError as exc:
            out["second_endpoint_error"] = error_facts(exc)

        # INQUIRY to target TPGT, LUN 0: request header readable; response and data writable.
        lun = bytes([1, TPGT, 0x40, 0, 0, 0, 0, 0])
        cdb = bytes([0x12, 0, 0, 0, INQUIRY_LEN, 0])
        req_gpa, resp_gpa, data_gpa = send_chain(arena, request, [SCSI_REQ.pack(lun, 0x1234, 0, 0, 0, cdb)],
                                                 [SCSI_RESP.size, INQUIRY_LEN])
        out["inquiry_used"] = reap(request, "SCSI request")
        out["inquiry_token"] = req_gpa
        sense_len, resid, _, status, response, _ = SCSI_RESP.unpack(arena.memory.read(resp_gpa, SCSI_RESP.size))
        out["inquiry"] = {"response": response, "status": status, "resid": resid, "sense_len": sense_len,
                          "data": arena.memory.read(data_gpa, INQUIRY_LEN).hex()}

        scsi.set_events_missed(True)
        out["events_missed"] = scsi.get_events_missed()
        scsi.set_events_missed(False)
        out["events_missed_cleared"] = scsi.get_events_missed()

        scsi.clear_endpoint()
        scsi.attach_vring_worker(request.index, out["default_worker"])
        scsi.free_worker(worker)
        out["worker_freed"] = True
        os.unlink(f"{tpg}/lun/lun_0/disk")
        os.rmdir(f"{tpg}/lun/lun_0")
        os.rmdir(tpg)
        out["tpg_removed_after_clear"] = not os.path.exists(tpg)
    return out


CHECKS: dict[str, Callable[[], dict]] = {
    "vhost_net": check_vhost_net,
    "vhost_net_iotlb": check_vhost_net_iotlb,
    "fork_owner": check_fork_owner,
    "vhost_vsock": check_vhost_vsock,
    "vhost_scsi": check_vhost_scsi,
}


def run_in_guest() -> int:
    return run_checks(CHECKS)


# --------------------------------------------------------------------------------------------
# The host side
# --------------------------------------------------------------------------------------------

class KernelVhostTest(GuestChecks, unittest.TestCase):
    CHECKS = CHECKS

    @classmethod
    def setUpClass(cls) -> None:
        cls.boot("exec python3 -m tests.kernel.test_kernel_vhost --in-guest", 150, modules=GUEST_MODULES)

    def assertIoctlError(self, facts: dict | None, ioctl: str, err: int, text: str) -> None:
        self.assertIsNotNone(facts, f"{ioctl} did not fail")
        self.assertEqual((facts["type"], facts["ioctl"], facts["errno"]), ("IoctlError", ioctl, err), facts)
        self.assertIn(text, facts["text"])

    # -- vhost-net
    def test_vhost_net_features(self) -> None:
        r = self.result("vhost_net")
        for bit in (VIRTIO_F_VERSION_1, VIRTIO_F_ACCESS_PLATFORM, VHOST_F_LOG_ALL, VHOST_NET_F_VIRTIO_NET_HDR,
                    VirtioNetFeature.VIRTIO_NET_F_MRG_RXBUF):
            self.assertTrue(r["offered"] & bit, f"{r['offered']:#x} lacks {bit:#x}")
        self.assertEqual(r["negotiated"], VIRTIO_F_VERSION_1)
        self.assertTrue(r["backend_features"] & VHOST_BACKEND_F_IOTLB_MSG_V2, hex(r["backend_features"]))

    def test_vhost_net_tx_frame_comes_out_of_the_tap(self) -> None:
        r = self.result("vhost_net")
        self.assertEqual(r["tx_received"], r["tx_sent"])
        self.assertEqual(r["tx_used"], [[r["tx_buffer_gpa"], 0]])

    def test_vhost_net_rx_frame_arrives_behind_its_header(self) -> None:
        r = self.result("vhost_net")
        frame = bytes.fromhex(r["rx_sent"])
        self.assertEqual(r["rx_used"], [[r["rx_buffers"][0], VIRTIO_NET_HDR_MRG_RXBUF.size + len(frame)]])
        received = bytes.fromhex(r["rx_received"])
        self.assertEqual(received[VIRTIO_NET_HDR_MRG_RXBUF.size:], frame)
        flags, gso_type, *_ = VIRTIO_NET_HDR_MRG_RXBUF.unpack_from(received)
        self.assertEqual((flags, gso_type), (0, 0))     # no checksum offload, VIRTIO_NET_HDR_GSO_NONE

    def test_vhost_net_dirty_log_marks_exactly_the_written_pages(self) -> None:
        r = self.result("vhost_net")
        self.assertEqual(r["dirty_pages"], sorted({r["rx_buffers"][0] // PAGE, r["rx_used_ring_gpa"] // PAGE}))
        self.assertGreaterEqual(r["log_signalled"], 1)

    def test_vhost_net_get_vring_base_after_stopping(self) -> None:
        r = self.result("vhost_net")
        self.assertEqual(r["bases"], [1, 1])             # one RX buffer used, one TX chain sent
        self.assertEqual(r["bases"], r["bases_expected"])

    def test_vhost_net_second_set_owner_is_ebusy(self) -> None:
        self.assertIoctlError(self.result("vhost_net").get("second_set_owner"), "VHOST_SET_OWNER", errno.EBUSY,
                              "VHOST_SET_OWNER failed: Device or resource busy")

    def test_vhost_net_busyloop_timeout_round_trip(self) -> None:
        self.assertEqual(self.result("vhost_net")["busyloop_timeout"], 50)

    def test_vhost_net_ioctls_this_kernel_lacks_say_so(self) -> None:
        r = self.result("vhost_net")
        # vhost-net has no extra workers (only vhost-scsi takes them); 6.12 has no features array.
        self.assertIoctlError(r.get("new_worker_error"), "VHOST_NEW_WORKER", errno.ENOTTY,
                              "not supported by this kernel")
        if "features_array" in r:
            self.assertEqual(r["features_array"], r["offered"])
        else:
            self.assertIn("VHOST_GET_FEATURES_ARRAY is not supported by this kernel", r["features_array_error"]["text"])
        if "endian_big" in r:                            # only with CONFIG_VHOST_CROSS_ENDIAN_LEGACY
            self.assertTrue(r["endian_big"])
        else:
            self.assertIoctlError(r["endian_error"], "VHOST_SET_VRING_ENDIAN", errno.ENOTTY,
                                  "VHOST_SET_VRING_ENDIAN is not supported by this kernel")

    def test_vhost_net_iotlb_miss_and_update(self) -> None:
        r = self.result("vhost_net_iotlb")
        self.assertEqual(r["negotiated"], VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM)
        self.assertFalse(r["pending_before_kick"])
        iova, size, uaddr, perm, type_ = r["miss"]
        self.assertEqual((iova, perm, type_), (r["tx_buffer_gpa"], VHOST_ACCESS_RO, VHOST_IOTLB_MISS))
        self.assertEqual(r["miss_asid"], 0)
        self.assertEqual(r["tx_received"], r["tx_sent"])
        self.assertFalse(r["more_misses"])

    def test_fork_from_owner(self) -> None:
        r = self.result("fork_owner")
        self.assertEqual(r, {"default": VHOST_FORK_OWNER_TASK, "after_set_kthread": VHOST_FORK_OWNER_KTHREAD})

    # -- vhost-vsock
    def test_vhost_vsock_connects_to_a_host_listener(self) -> None:
        r = self.result("vhost_vsock")
        self.assertEqual(r["negotiated"], VIRTIO_F_VERSION_1)
        packet = VsockPacket(*r["response"])
        self.assertEqual((packet.src_cid, packet.dst_cid, packet.src_port, packet.dst_port, packet.op),
                         (socket.VMADDR_CID_HOST, GUEST_CID, HOST_PORT, GUEST_PORT, VIRTIO_VSOCK_OP_RESPONSE))
        self.assertEqual(r["peer"], [GUEST_CID, GUEST_PORT])

    def test_vhost_vsock_data_flows_both_ways(self) -> None:
        r = self.result("vhost_vsock")
        self.assertEqual(r["to_host_received"], r["to_host_sent"])
        self.assertEqual(r["to_guest_received"], r["to_guest_sent"])
        header = VsockPacket(*r["to_guest_header"])
        self.assertEqual((header.op, header.len, header.dst_port), (VIRTIO_VSOCK_OP_RW, len(r["to_guest_sent"]) // 2,
                                                                    GUEST_PORT))
        self.assertNotIn(VIRTIO_VSOCK_OP_RST, r["other_ops"])

    # -- vhost-scsi
    def test_vhost_scsi_abi_version(self) -> None:
        self.assertEqual(self.result("vhost_scsi")["abi_version"], VHOST_SCSI_ABI_VERSION)

    def test_vhost_scsi_endpoint_serves_an_inquiry(self) -> None:
        r = self.result("vhost_scsi")
        inquiry = r["inquiry"]
        self.assertEqual((inquiry["response"], inquiry["status"], inquiry["sense_len"]), (0, 0, 0), inquiry)
        data = bytes.fromhex(inquiry["data"])
        self.assertEqual(data[8:16], b"LIO-ORG ", data)
        self.assertEqual([token for token, _ in r["inquiry_used"]], [r["inquiry_token"]])

    def test_vhost_scsi_endpoint_holds_the_target(self) -> None:
        r = self.result("vhost_scsi")
        self.assertEqual(r["rmdir_tpg_in_use"], errno.EBUSY)
        self.assertIoctlError(r.get("second_endpoint_error"), "VHOST_SCSI_SET_ENDPOINT", errno.EEXIST, "File exists")
        self.assertTrue(r["tpg_removed_after_clear"])

    def test_vhost_scsi_workers_and_events_missed(self) -> None:
        r = self.result("vhost_scsi")
        self.assertEqual(r["default_worker"], 0)
        self.assertGreater(r["new_worker"], 0)
        self.assertEqual(r["attached_worker"], r["new_worker"])
        self.assertIoctlError(r.get("free_attached_worker_error"), "VHOST_FREE_WORKER", errno.EBUSY, "busy")
        self.assertTrue(r["worker_freed"])
        self.assertEqual((r["events_missed"], r["events_missed_cleared"]), (True, False))

    def test_vhost_scsi_has_no_backend_features_and_no_ring_enable(self) -> None:
        r = self.result("vhost_scsi")
        self.assertIoctlError(r.get("backend_features_error"), "VHOST_GET_BACKEND_FEATURES", errno.ENOTTY,
                              "VHOST_GET_BACKEND_FEATURES is not supported by this kernel")
        self.assertIn("set_endpoint()", r["enable_error"])


if __name__ == "__main__":
    if sys.argv[1:] == ["--in-guest"]:
        sys.exit(run_in_guest())
    unittest.main()
