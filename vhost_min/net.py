"""virtio-net (virtio 1.3 §5.1; linux/virtio_net.h): feature bits, status bits, the config space,
the header in front of every frame, the control queue's commands -- and :class:`NetDevice`, a
vhost-user-net back-end whose frames go to a tap device or straight back to the driver (loopback).

Decisions, in one place:

* Queues: receiveq/transmitq pairs at 2k/2k+1, then the control queue (2N, with CTRL_VQ). QEMU and
  DPDK's virtio-user answer the control queue themselves and never hand it to a vhost-user
  back-end; it is here for front-ends that do (and for VDUSE-like transports).
* Receive filtering: the device starts promiscuous (as QEMU's does); once the driver turns that
  off (CTRL_RX), frames reach it for its MAC, broadcast, the MAC table's unicast entries, and
  multicast that is listed or allowed by ALLMULTI; the rest are counted in ``rx_filtered``.
* The config space (GET_CONFIG) is offered with the CONFIG protocol feature; QEMU 7.2's netdev
  does not use it and says so once ("supports VHOST_USER_PROTOCOL_F_CONFIG but QEMU does not").
* The header is 12 bytes (virtio_net_hdr_mrg_rxbuf) with VIRTIO_F_VERSION_1 or MRG_RXBUF, else the
  legacy 10. No offloads are offered, so TX headers carry nothing to act on and RX headers are
  zero but for num_buffers (1, or the buffers a merged frame took).
* RX with no buffer posted: the frame is dropped and counted (``rx_dropped``), as a NIC without
  descriptors does; the tap is never left readable (a level-triggered loop would spin on it).
  A frame longer than the buffer offered without MRG_RXBUF is dropped and counted
  (``rx_oversize``), never truncated; the buffer stays for the next frame.
* The tap is opened IFF_TAP|IFF_NO_PI|IFF_VNET_HDR (IFF_MULTI_QUEUE with more than one pair, one
  fd per pair) with TUNSETVNETHDRSZ set to the negotiated header size, so a TX chain is written
  with one writev as it lies in guest memory and a frame is read with one readv straight into
  the guest's buffers (a trailing scratch buffer catches what does not fit). A tap that goes
  away (the interface deleted: EBADFD) is logged once; its fd is replaced by a never-readable
  eventfd, TX for that pair is dropped and counted, the other queues keep serving.
* TX is polled while it is busy, as NAPI does: a non-empty batch turns the driver's kicks off and
  asks the loop to come back at once (process() returns True); the first empty pop turns them on
  again (and looks once more, closing the race). Each batch is one push and at most one signal.
* Not done: offloads (CSUM, TSO, UFO), VLAN filtering, RX mode extras (CTRL_RX_EXTRA), RSS and
  hash reports, notification coalescing. VQ_PAIRS_SET is recorded, not acted on: with a
  multi-queue tap, frames the kernel steers to a pair whose RX ring is not running are dropped and
  counted (QEMU detaches such tap queues with TUNSETQUEUE; we do not yet).
* Rings are reached through the vhost-user Backend serving the device (``backend.rings``): the
  tap's callback asks the loop to run the RX ring (``ring.again``), so RX runs in process() with
  the transport's error handling."""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import functools
import logging
import os
import struct

from .device import Device
from .errors import NotSupportedError, VhostError
from .ioctl import _IOW
from .virtio import VIRTIO_F_VERSION_1, DeviceId

__all__ = ["VirtioNetFeature", "VIRTIO_NET_S_LINK_UP", "VIRTIO_NET_S_ANNOUNCE", "VIRTIO_NET_CONFIG",
           "VIRTIO_NET_HDR", "VIRTIO_NET_HDR_MRG_RXBUF", "VIRTIO_NET_OK", "VIRTIO_NET_ERR", "NetDevice", "Tap",
           "TapError", "parse_mac", "format_mac"]

log = logging.getLogger("vhost_min.net")


class VirtioNetFeature(enum.IntFlag):
    """virtio-net feature bits (virtio 1.3 §5.1.3), as masks."""

    VIRTIO_NET_F_CSUM = 1 << 0
    VIRTIO_NET_F_GUEST_CSUM = 1 << 1
    VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 1 << 2
    VIRTIO_NET_F_MTU = 1 << 3
    VIRTIO_NET_F_MAC = 1 << 5
    VIRTIO_NET_F_GSO = 1 << 6               # legacy
    VIRTIO_NET_F_GUEST_TSO4 = 1 << 7
    VIRTIO_NET_F_GUEST_TSO6 = 1 << 8
    VIRTIO_NET_F_GUEST_ECN = 1 << 9
    VIRTIO_NET_F_GUEST_UFO = 1 << 10
    VIRTIO_NET_F_HOST_TSO4 = 1 << 11
    VIRTIO_NET_F_HOST_TSO6 = 1 << 12
    VIRTIO_NET_F_HOST_ECN = 1 << 13
    VIRTIO_NET_F_HOST_UFO = 1 << 14
    VIRTIO_NET_F_MRG_RXBUF = 1 << 15
    VIRTIO_NET_F_STATUS = 1 << 16
    VIRTIO_NET_F_CTRL_VQ = 1 << 17
    VIRTIO_NET_F_CTRL_RX = 1 << 18
    VIRTIO_NET_F_CTRL_VLAN = 1 << 19
    VIRTIO_NET_F_CTRL_RX_EXTRA = 1 << 20
    VIRTIO_NET_F_GUEST_ANNOUNCE = 1 << 21
    VIRTIO_NET_F_MQ = 1 << 22
    VIRTIO_NET_F_CTRL_MAC_ADDR = 1 << 23
    VIRTIO_NET_F_NOTF_COAL = 1 << 53
    VIRTIO_NET_F_HASH_REPORT = 1 << 57
    VIRTIO_NET_F_RSS = 1 << 60
    VIRTIO_NET_F_RSC_EXT = 1 << 61
    VIRTIO_NET_F_STANDBY = 1 << 62
    VIRTIO_NET_F_SPEED_DUPLEX = 1 << 63


VIRTIO_NET_S_LINK_UP = 1        #: virtio_net_config.status: the link is up
VIRTIO_NET_S_ANNOUNCE = 2       #: virtio_net_config.status: announce the guest (GUEST_ANNOUNCE)
#: struct virtio_net_config up to mtu: {u8 mac[6]; le16 status; le16 max_virtqueue_pairs; le16 mtu}
VIRTIO_NET_CONFIG = struct.Struct("<6sHHH")
#: struct virtio_net_hdr {u8 flags; u8 gso_type; le16 hdr_len, gso_size, csum_start, csum_offset} (10)
VIRTIO_NET_HDR = struct.Struct("<BBHHHH")
#: struct virtio_net_hdr_mrg_rxbuf: the header plus le16 num_buffers (12); the header of every
#: frame with VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF
VIRTIO_NET_HDR_MRG_RXBUF = struct.Struct("<BBHHHHH")

VIRTIO_NET_HDR_F_NEEDS_CSUM = 1     #: virtio_net_hdr.flags: csum_start/csum_offset are valid
VIRTIO_NET_HDR_F_DATA_VALID = 2     #: virtio_net_hdr.flags: the checksum is known good
VIRTIO_NET_HDR_GSO_NONE = 0         #: virtio_net_hdr.gso_type: not a GSO frame

# -- the control queue (virtio 1.3 §5.1.6.5): struct virtio_net_ctrl {u8 class; u8 command; data; u8 ack}
VIRTIO_NET_OK = 0                   #: ack: the command was applied
VIRTIO_NET_ERR = 1                  #: ack: the command was refused
VIRTIO_NET_CTRL_RX = 0              #: class: receive filtering (VIRTIO_NET_F_CTRL_RX), data u8 on/off
VIRTIO_NET_CTRL_RX_PROMISC = 0
VIRTIO_NET_CTRL_RX_ALLMULTI = 1
VIRTIO_NET_CTRL_RX_ALLUNI = 2       # ALLUNI..NOBCAST need VIRTIO_NET_F_CTRL_RX_EXTRA (not offered)
VIRTIO_NET_CTRL_RX_NOMULTI = 3
VIRTIO_NET_CTRL_RX_NOUNI = 4
VIRTIO_NET_CTRL_RX_NOBCAST = 5
VIRTIO_NET_CTRL_MAC = 1             #: class: MAC filtering
VIRTIO_NET_CTRL_MAC_TABLE_SET = 0   #: two virtio_net_ctrl_mac {le32 entries; u8 macs[entries][6]}: unicast, multicast
VIRTIO_NET_CTRL_MAC_ADDR_SET = 1    #: u8 mac[6] (VIRTIO_NET_F_CTRL_MAC_ADDR)
VIRTIO_NET_CTRL_VLAN = 2            #: class: VLAN filtering (VIRTIO_NET_F_CTRL_VLAN, not offered)
VIRTIO_NET_CTRL_ANNOUNCE = 3        #: class: announcement (VIRTIO_NET_F_GUEST_ANNOUNCE)
VIRTIO_NET_CTRL_ANNOUNCE_ACK = 0    #: the driver announced itself: clear VIRTIO_NET_S_ANNOUNCE
VIRTIO_NET_CTRL_MQ = 4              #: class: multiqueue (VIRTIO_NET_F_MQ)
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0     #: le16 virtqueue_pairs
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN = 1
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX = 0x8000
VIRTIO_NET_CTRL_GUEST_OFFLOADS = 5  #: class: offload control (not offered)

# -- the tap device (linux/if_tun.h, linux/if.h)
IFNAMSIZ = 16
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
TUNSETIFF = _IOW(ord("T"), 202, ctypes.c_int)
TUNSETOFFLOAD = _IOW(ord("T"), 208, ctypes.c_uint)
TUNSETVNETHDRSZ = _IOW(ord("T"), 216, ctypes.c_int)
#: struct ifreq as TUNSETIFF reads it: char ifr_name[IFNAMSIZ]; short ifr_flags; (padded to 40)
IFREQ_FLAGS = struct.Struct(f"{IFNAMSIZ}sH22x")

ETH_ALEN = 6
BROADCAST = b"\xff" * ETH_ALEN
ETH_P_RARP = 0x8035
ETH_HLEN = 14
_le16 = struct.Struct("<H")
_le32 = struct.Struct("<I")


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` -> 6 bytes (ValueError otherwise)."""
    parts = text.split(":")
    if len(parts) != ETH_ALEN or not all(len(p) == 2 for p in parts):
        raise ValueError(f"{text!r} is not a MAC address like 52:54:00:12:34:56")
    return bytes(int(p, 16) for p in parts)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def rarp_frame(mac: bytes) -> bytes:
    """The RARP broadcast VHOST_USER_SEND_RARP asks for (as QEMU's qemu_announce_self sends): the
    switches on the way learn where ``mac`` lives now."""
    return (BROADCAST + mac + struct.pack("!H", ETH_P_RARP)
            + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 3) + mac + bytes(4) + mac + bytes(4)).ljust(60, b"\0")


class TapError(OSError):
    """Opening or configuring the tap device failed (errno kept)."""


class Tap:
    """A tap device by name, created if it does not exist or attached to (TUNSETIFF on
    /dev/net/tun), with IFF_VNET_HDR; ``queues`` fds (IFF_MULTI_QUEUE when more than one). The
    fds are non-blocking and close-on-exec; :meth:`close` closes them (a tap we created then
    disappears, one that existed stays)."""

    def __init__(self, name: str, queues: int = 1) -> None:
        raw = name.encode()
        if not raw or len(raw) >= IFNAMSIZ:
            raise ValueError(f"a tap name has 1..{IFNAMSIZ - 1} bytes, not {name!r}")
        self.name = name
        self.fds: list[int] = []
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if queues > 1 else 0)
        try:
            for _ in range(queues):
                fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
                self.fds.append(fd)
                ifr = bytearray(IFREQ_FLAGS.pack(raw, flags))
                fcntl.ioctl(fd, TUNSETIFF, ifr)
                fcntl.ioctl(fd, TUNSETOFFLOAD, 0)          # no offloads: the guest negotiated none
        except OSError as exc:
            self.close()
            raise TapError(exc.errno, f"opening tap {name!r} ({queues} queue(s)): TUNSETIFF/TUNSETOFFLOAD: "
                                      f"{exc.strerror}") from None

    def set_header_size(self, size: int) -> None:
        """TUNSETVNETHDRSZ: the virtio-net header in front of each frame read or written."""
        for fd in self.fds:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", size))

    def close(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NetDevice(Device):
    """A virtio-net device for vhost-user: ``pairs`` RX/TX queue pairs and a control queue, frames
    to and from a :class:`Tap` (``tap="name"``) or looped back (``tap=None``: every TX frame comes
    back on the RX queue of its pair). See the module docstring for the decisions.

    Counters (ints, read them any time): ``tx_packets``, ``rx_packets``, ``rx_bytes``,
    ``rx_dropped`` (no RX buffer, or the RX ring not running), ``rx_oversize`` (a frame longer than
    the buffer, without MRG_RXBUF), ``rx_filtered`` (not for our MAC filter), ``tx_errors`` (the
    tap refused it, or the chain is shorter than a header), ``ctrl_errors`` (VIRTIO_NET_ERR)."""

    device_id = DeviceId.NET
    max_queue_size = 1024
    #: RX buffers popped per batch; TX chains per pop.
    batch_size = 256
    BASE_FEATURES = (VirtioNetFeature.VIRTIO_NET_F_MAC | VirtioNetFeature.VIRTIO_NET_F_MRG_RXBUF
                     | VirtioNetFeature.VIRTIO_NET_F_STATUS | VirtioNetFeature.VIRTIO_NET_F_MTU
                     | VirtioNetFeature.VIRTIO_NET_F_CTRL_VQ | VirtioNetFeature.VIRTIO_NET_F_CTRL_RX
                     | VirtioNetFeature.VIRTIO_NET_F_CTRL_MAC_ADDR | VirtioNetFeature.VIRTIO_NET_F_GUEST_ANNOUNCE)

    def __init__(self, *, tap: str | None = None, pairs: int = 1, mac: bytes | str | None = None,
                 mtu: int = 1500, mrg_rxbuf: bool = True) -> None:
        super().__init__()
        if not 1 <= pairs <= VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX or pairs * 2 + 1 > 256:
            raise ValueError(f"{pairs} queue pairs: 1..127 fit vhost-user's 8-bit ring index")
        if not 68 <= mtu <= 65535:
            raise ValueError(f"MTU {mtu} is not within 68..65535")
        if isinstance(mac, str):
            mac = parse_mac(mac)
        self.mac = bytes(mac) if mac is not None else b"\x52\x54\x00" + os.urandom(3)
        if len(self.mac) != ETH_ALEN:
            raise ValueError(f"a MAC address has 6 bytes, not {len(self.mac)}")
        self.pairs = pairs
        self.mtu = mtu
        self.num_queues = 2 * pairs + 1
        self.ctrl_queue = 2 * pairs
        features = self.BASE_FEATURES | (VirtioNetFeature.VIRTIO_NET_F_MQ if pairs > 1 else 0)
        if not mrg_rxbuf:
            features &= ~VirtioNetFeature.VIRTIO_NET_F_MRG_RXBUF
        self.features = int(features)
        self.tap = Tap(tap, pairs) if tap is not None else None
        self.status = VIRTIO_NET_S_LINK_UP
        self.negotiated = 0
        self.hdr_size = VIRTIO_NET_HDR.size
        self.mrg_rxbuf = False
        self.active_pairs = 1
        self.promisc, self.allmulti = True, False    # a device starts promiscuous (as QEMU's does)
        self.uni_macs: set[bytes] = set()
        self.multi_macs: set[bytes] = set()
        self.tx_packets = self.rx_packets = self.rx_bytes = 0
        self.rx_dropped = self.rx_oversize = self.rx_filtered = self.tx_errors = self.ctrl_errors = 0
        self._spare: list[list] = [[] for _ in range(pairs)]       # RX chains popped, not used yet
        self._scratch = bytearray(65536 + 64)                       # what a tap frame overflows into
        self._scratch_view = memoryview(self._scratch)
        self._tap_gone = [False] * pairs
        self._tap_errors_logged: set[tuple[int, str, int]] = set()
        self._header_ones = {10: bytes(10), 12: VIRTIO_NET_HDR_MRG_RXBUF.pack(0, 0, 0, 0, 0, 0, 1)}
        self._watched = ({fd: functools.partial(self._on_tap, pair) for pair, fd in enumerate(self.tap.fds)}
                         if self.tap is not None else {})

    def close(self) -> None:
        """Close the tap (the device serves loopback-less from then on: nothing)."""
        if self.tap is not None:
            self.tap.close()

    # -- config space (struct virtio_net_config) ----------------------------------------------
    def config_space(self) -> bytes:
        return VIRTIO_NET_CONFIG.pack(self.mac, self.status, self.pairs, self.mtu)

    def get_config(self, offset: int, size: int) -> bytes:
        space = self.config_space()
        return space[offset:offset + size].ljust(size, b"\0")

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        """Only the MAC is writable (legacy drivers write it there; 1.x ones use ADDR_SET)."""
        if offset + len(data) > ETH_ALEN:
            raise NotSupportedError(f"virtio_net_config bytes {offset}..{offset + len(data)} are read-only "
                                    f"(only mac[0..6] is writable)")
        mac = bytearray(self.mac)
        mac[offset:offset + len(data)] = data
        self.mac = bytes(mac)

    def set_mtu(self, mtu: int) -> None:
        """VHOST_USER_NET_SET_MTU: the front-end's MTU for this device."""
        if not 68 <= mtu <= 65535:
            raise ValueError(f"VHOST_USER_NET_SET_MTU {mtu} is not within 68..65535")
        self.mtu = mtu

    def announce(self) -> None:
        """Ask the driver to announce itself (VIRTIO_NET_S_ANNOUNCE; GUEST_ANNOUNCE): set the bit
        and send a config change; the driver's VIRTIO_NET_CTRL_ANNOUNCE_ACK clears it."""
        self.status |= VIRTIO_NET_S_ANNOUNCE
        backend = self.backend
        if backend is not None:
            try:
                backend.notify_config_change()
            except VhostError as exc:
                log.info("announce: no config change notification: %s", exc)

    def send_rarp(self, mac: bytes) -> None:
        """VHOST_USER_SEND_RARP: a RARP broadcast for ``mac`` to the network (the tap; in loopback
        the network is the guest itself)."""
        frame = rarp_frame(mac)
        if self.tap is None:
            self._deliver(0, [memoryview(frame)])
            return
        hdr = self._header_ones[self.hdr_size]
        try:
            os.writev(self.tap.fds[0], [hdr, frame])
        except OSError as exc:
            self._tap_failed(0, exc, "writing a RARP")

    # -- negotiation ----------------------------------------------------------------------------
    def features_set(self, features: int) -> None:
        self.negotiated = features
        self.mrg_rxbuf = bool(features & VirtioNetFeature.VIRTIO_NET_F_MRG_RXBUF)
        self.hdr_size = (VIRTIO_NET_HDR_MRG_RXBUF.size if features & (VIRTIO_F_VERSION_1 | VirtioNetFeature.
                                                                        VIRTIO_NET_F_MRG_RXBUF)
                         else VIRTIO_NET_HDR.size)
        if self.tap is not None and self.tap.fds:
            try:
                self.tap.set_header_size(self.hdr_size)
            except OSError as exc:
                log.warning("tap %s: TUNSETVNETHDRSZ %d failed: %s", self.tap.name, self.hdr_size, exc)

    def reset(self) -> None:
        self.active_pairs = 1
        self.promisc, self.allmulti = True, False
        self.uni_macs.clear()
        self.multi_macs.clear()
        self.status &= ~VIRTIO_NET_S_ANNOUNCE
        for spare in self._spare:
            spare.clear()

    def watched(self) -> dict:
        return self._watched

    # -- rings -------------------------------------------------------------------------------------
    def _ring(self, index: int):
        """The backend's ring ``index`` if it runs (started, enabled, not broken, queue built)."""
        backend = self.backend
        if backend is None or backend.closed:
            return None
        ring = backend.rings[index]
        if ring.started and ring.enabled and not ring.broken and ring.queue is not None:
            return ring
        return None

    def stopped(self, queue: int) -> None:
        """RX buffers popped but not filled yet (a batch pops more than the frames waiting) are
        used with 0 bytes before the ring stops: the driver gets every buffer back, a driver
        counts them as short frames."""
        if queue < self.ctrl_queue and queue % 2 == 0:
            spare, self._spare[queue // 2] = self._spare[queue // 2], []
            if spare and self.backend is not None:
                self.backend.post_used(queue, [(chain[0], 0) for chain in spare])

    def process_disabled(self, queue: int, vq) -> bool | None:
        if queue % 2 or queue == self.ctrl_queue:
            self.discard(queue, vq)       # TX (and control) on a disabled ring: dropped, as the spec allows
        return None

    def process(self, queue: int, vq) -> bool | None:
        if queue == self.ctrl_queue:
            return super().process(queue, vq)
        if queue % 2 == 0:
            if self.tap is not None:
                return self._tap_receive(queue // 2, vq)
            return None                    # loopback: RX buffers wait for TX frames
        return self._transmit(queue, vq)

    def _transmit(self, queue: int, vq) -> bool:
        """TX: pop a batch, hand its frames to the tap (one writev each, header included) or to
        the pair's RX ring (loopback), push the batch once, signal once."""
        pair = queue // 2
        hdr = self.hdr_size
        chains = vq.pop_batch(self.batch_size)
        if not chains:
            # Idle: kicks on again; chains published meanwhile mean another look at once.
            return vq.enable_notifications()
        # Busy: no kicks while the loop comes back for more (process() returns True).
        vq.disable_notifications()
        self.tx_packets += len(chains)
        if self.tap is None:
            # Loopback. RX buffers first: with none offered (a driver that does not empty its RX
            # ring) the batch is dropped without looking at a frame.
            rx = self._ring(2 * pair)
            spare = self._spare[pair]
            if rx is not None and not spare:
                spare.extend(rx.queue.pop_batch(len(chains)))
            if rx is None or not spare:
                self.rx_dropped += len(chains)
            else:
                frames = []
                append = frames.append
                short = hdr + ETH_HLEN
                for _head, readable, _writable in chains:
                    if len(readable) == 1 and len(readable[0]) >= short:
                        append(readable[0][hdr:])
                    elif sum(map(len, readable)) >= short:
                        append(memoryview(b"".join(readable))[hdr:])
                    else:
                        self.tx_errors += 1         # not even a header and an Ethernet header
                self._deliver(pair, frames)
        elif self._tap_gone[pair]:
            self.tx_errors += len(chains)
        else:
            fd, writev = self.tap.fds[pair], os.writev
            for _head, readable, _writable in chains:
                try:
                    writev(fd, readable)
                except BlockingIOError:
                    self.tx_errors += 1          # the tap's queue is full: dropped
                except OSError as exc:
                    self.tx_errors += 1
                    if self._tap_failed(pair, exc, "writing"):
                        break
        if vq.push_batch([(chain[0], 0) for chain in chains]) and self.backend is not None:
            self.backend.signal_used(queue)
        return True

    def _wanted(self, frame) -> bool:
        """The receive filter (CTRL_RX, CTRL_MAC) for a frame's destination address."""
        dst = bytes(frame[:ETH_ALEN])
        if dst == self.mac or dst == BROADCAST:
            return True
        if dst[0] & 1:
            return self.allmulti or dst in self.multi_macs
        return dst in self.uni_macs

    def _deliver(self, pair: int, frames: list) -> None:
        """Loopback RX: copy ``frames`` (without header) into the pair's RX buffers, one push and
        one signal for the batch; a frame with no buffer is dropped and counted."""
        rx = 2 * pair
        ring = self._ring(rx)
        if ring is None:
            self.rx_dropped += len(frames)
            return
        if not self.promisc:
            kept = [f for f in frames if self._wanted(f)]
            self.rx_filtered += len(frames) - len(kept)
            frames = kept
        vq = ring.queue
        hdr, mrg = self.hdr_size, self.mrg_rxbuf
        header = self._header_ones[hdr]
        avail = self._spare[pair]
        short = False                       # the driver has offered no more than we hold
        if len(avail) < len(frames):
            want = len(frames) - len(avail)
            more = vq.pop_batch(want)
            short = len(more) < want
            avail.extend(more)
            if not avail:
                self.rx_dropped += len(frames)      # no buffer at all: the whole batch is dropped
                return
        done = []
        i = delivered = rx_bytes = 0
        n_avail = len(avail)
        for frame in frames:
            if i >= n_avail:
                more = [] if short else vq.pop_batch(self.batch_size)
                if not more:
                    short = True
                    self.rx_dropped += 1
                    continue
                avail.extend(more)
                n_avail = len(avail)
            head, _readable, writable = avail[i]
            need = hdr + len(frame)
            if len(writable) == 1 and len(writable[0]) >= need:
                buf = writable[0]
                buf[:hdr] = header
                buf[hdr:need] = frame
                done.append((head, need))
                i += 1
            elif sum(map(len, writable)) >= need:
                _scatter(writable, (header, frame))
                done.append((head, need))
                i += 1
            elif not mrg:
                self.rx_oversize += 1        # the buffer stays for the next frame
                continue
            else:
                used = self._merge(vq, avail, i, hdr, frame)
                if used is None:
                    self.rx_dropped += 1
                    n_avail = len(avail)
                    continue
                done.extend(used)
                i += len(used)
                n_avail = len(avail)
            delivered += 1
            rx_bytes += len(frame)
        del avail[:i]
        if done:
            self.rx_packets += delivered
            self.rx_bytes += rx_bytes
            if vq.push_batch(done):
                self.backend.signal_used(rx)

    def _merge(self, vq, avail: list, i: int, hdr: int, frame) -> list | None:
        """MRG_RXBUF: spread header + ``frame`` over as many buffers from ``avail[i:]`` (popping
        more when short) as it takes; num_buffers says how many. None (nothing used) when the
        driver has not offered enough."""
        need = hdr + len(frame)
        have, j = 0, i
        while have < need:
            if j >= len(avail):
                more = vq.pop_batch(self.batch_size)
                if not more:
                    return None
                avail.extend(more)
            have += sum(map(len, avail[j][2]))
            j += 1
        data = memoryview(VIRTIO_NET_HDR_MRG_RXBUF.pack(0, 0, 0, 0, 0, 0, j - i) + bytes(frame))
        used = []
        for head, _readable, writable in avail[i:j]:
            room = sum(map(len, writable))
            piece, data = data[:room], data[room:]
            _scatter(writable, (piece,))
            used.append((head, len(piece)))
        return used

    # -- the tap -------------------------------------------------------------------------------------
    def _on_tap(self, pair: int) -> None:
        """The tap fd of ``pair`` is readable: run the RX ring (in process(), through the loop), or
        drop what the tap holds when the ring does not run (never leave the fd readable)."""
        ring = self._ring(2 * pair)
        if ring is not None:
            ring.again = True
        else:
            self._drain(pair)

    def _drain(self, pair: int) -> None:
        """Read and drop up to a batch of frames (no RX buffer for them), counted in rx_dropped."""
        fd, scratch = self.tap.fds[pair], self._scratch
        for _ in range(self.batch_size):
            try:
                os.readv(fd, [scratch])
            except BlockingIOError:
                return
            except OSError as exc:
                self._tap_failed(pair, exc, "reading")
                return
            self.rx_dropped += 1

    def _tap_failed(self, pair: int, exc: OSError, what: str) -> bool:
        """A tap read or write failed: True (and the tap's fd retired) when the tap is gone."""
        if exc.errno not in (errno.EBADFD, errno.ENODEV, errno.ENXIO):
            if (pair, what, exc.errno) not in self._tap_errors_logged:     # once each, not once a frame
                self._tap_errors_logged.add((pair, what, exc.errno))
                log.warning("tap %s queue %d: %s failed: %s (counted in tx_errors from now on, not logged)",
                            self.tap.name, pair, what, exc)
            return False
        if not self._tap_gone[pair]:
            self._tap_gone[pair] = True
            log.warning("tap %s queue %d went away (%s: %s); its frames are dropped from now on, the other "
                        "queues keep serving", self.tap.name, pair, what, exc.strerror)
            # The fd number stays ours (the loop watches it): a never-readable eventfd takes its place.
            quiet = os.eventfd(0, os.EFD_CLOEXEC)
            os.dup2(quiet, self.tap.fds[pair], inheritable=False)
            os.close(quiet)
        return True

    def _tap_receive(self, pair: int, vq) -> bool:
        """RX from the tap: each frame read with one readv straight into an RX buffer (header
        included; a scratch buffer behind it catches what does not fit), one push and one signal
        for the batch. Returns True when a full batch was read (more may wait)."""
        if self._tap_gone[pair]:
            return False
        fd, hdr, mrg, readv = self.tap.fds[pair], self.hdr_size, self.mrg_rxbuf, os.readv
        scratch = self._scratch_view
        avail = self._spare[pair]
        done: list[tuple[int, int]] = []
        i = frames = rx_bytes = 0
        full = False
        for _ in range(self.batch_size):
            if i >= len(avail):
                more = vq.pop_batch(self.batch_size)
                if not more:
                    self._drain(pair)
                    break
                avail.extend(more)
            head, _readable, writable = avail[i]
            try:
                n = readv(fd, [*writable, scratch])
            except BlockingIOError:
                break
            except OSError as exc:
                self._tap_failed(pair, exc, "reading")
                break
            room = sum(map(len, writable))
            if n <= room:
                if hdr == 12:
                    _put(writable, 10, b"\x01\x00")         # num_buffers = 1 (the tap skips it)
                done.append((head, n))
                i += 1
            elif not mrg:
                self.rx_oversize += 1                       # dropped; the buffer stays for the next frame
                continue
            else:
                used = self._spill(vq, avail, i, scratch[:n - room], room)
                if used is None:
                    self.rx_dropped += 1
                    continue
                done.extend(used)
                i += len(used)
            frames += 1
            rx_bytes += n - hdr
        else:
            full = True
        del avail[:i]
        if done:
            self.rx_packets += frames
            self.rx_bytes += rx_bytes
            if vq.push_batch(done) and self.backend is not None:
                self.backend.signal_used(2 * pair)
        return full

    def _spill(self, vq, avail: list, i: int, rest, first_len: int) -> list | None:
        """MRG_RXBUF, tap: the frame filled ``avail[i]`` (``first_len`` bytes) and ``rest`` is in
        the scratch buffer: copy it into the next buffers, set num_buffers in the first."""
        used = [(avail[i][0], first_len)]
        j = i + 1
        while rest:
            if j >= len(avail):
                more = vq.pop_batch(self.batch_size)
                if not more:
                    return None
                avail.extend(more)
            head, _readable, writable = avail[j]
            room = sum(map(len, writable))
            piece, rest = rest[:room], rest[room:]
            _scatter(writable, (piece,))
            used.append((head, len(piece)))
            j += 1
        _put(avail[i][2], 10, _le16.pack(len(used)))
        return used

    # -- the control queue ---------------------------------------------------------------------------
    def handle(self, queue: int, readable: list[memoryview], writable: list[memoryview]) -> int:
        """A control-queue command: class, command, data (device-readable), then the ack byte."""
        if queue != self.ctrl_queue:
            raise VhostError(f"queue {queue} is not the control queue", errno.EINVAL)
        if not writable or not len(writable[0]):
            raise VhostError("a control command without room for its ack", errno.EINVAL)
        out = b"".join(readable)
        ack = self.control(out[0], out[1], out[2:]) if len(out) >= 2 else VIRTIO_NET_ERR
        if ack != VIRTIO_NET_OK:
            self.ctrl_errors += 1
            log.info("control queue: class %s command %s (%d data bytes) refused: VIRTIO_NET_ERR",
                     out[0] if out else "-", out[1] if len(out) > 1 else "-", max(len(out) - 2, 0))
        writable[0][0] = ack
        return 1

    def control(self, cls: int, cmd: int, data: bytes) -> int:
        """Apply one control command; VIRTIO_NET_OK or VIRTIO_NET_ERR (an unknown or not
        negotiated class or command, or data of the wrong length)."""
        F, have = VirtioNetFeature, self.negotiated
        if cls == VIRTIO_NET_CTRL_RX and have & F.VIRTIO_NET_F_CTRL_RX:
            if cmd in (VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_CTRL_RX_ALLMULTI) and len(data) == 1:
                if cmd == VIRTIO_NET_CTRL_RX_PROMISC:
                    self.promisc = bool(data[0])
                else:
                    self.allmulti = bool(data[0])
                return VIRTIO_NET_OK
        elif cls == VIRTIO_NET_CTRL_MAC:
            if cmd == VIRTIO_NET_CTRL_MAC_ADDR_SET and have & F.VIRTIO_NET_F_CTRL_MAC_ADDR and len(data) == ETH_ALEN:
                self.mac = bytes(data)
                return VIRTIO_NET_OK
            if cmd == VIRTIO_NET_CTRL_MAC_TABLE_SET and have & F.VIRTIO_NET_F_CTRL_RX:
                tables = _mac_tables(data)
                if tables is not None:
                    self.uni_macs, self.multi_macs = tables
                    return VIRTIO_NET_OK
        elif cls == VIRTIO_NET_CTRL_ANNOUNCE and have & F.VIRTIO_NET_F_GUEST_ANNOUNCE:
            if cmd == VIRTIO_NET_CTRL_ANNOUNCE_ACK and not data:
                self.status &= ~VIRTIO_NET_S_ANNOUNCE
                return VIRTIO_NET_OK
        elif cls == VIRTIO_NET_CTRL_MQ and have & F.VIRTIO_NET_F_MQ:
            if cmd == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET and len(data) == 2:
                pairs, = _le16.unpack(data)
                if VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN <= pairs <= self.pairs:
                    self.active_pairs = pairs
                    return VIRTIO_NET_OK
        return VIRTIO_NET_ERR


def _mac_tables(data: bytes) -> tuple[set[bytes], set[bytes]] | None:
    """VIRTIO_NET_CTRL_MAC_TABLE_SET's two tables (unicast, multicast); None unless the data is
    exactly two virtio_net_ctrl_mac."""
    tables, off = [], 0
    for _ in range(2):
        if off + 4 > len(data):
            return None
        entries, = _le32.unpack_from(data, off)
        off += 4
        end = off + entries * ETH_ALEN
        if end > len(data):
            return None
        tables.append({bytes(data[k:k + ETH_ALEN]) for k in range(off, end, ETH_ALEN)})
        off = end
    return (tables[0], tables[1]) if off == len(data) else None


def _scatter(views: list[memoryview], pieces) -> None:
    """Write ``pieces`` one after the other across ``views`` (which have room for them)."""
    k, off = 0, 0
    for piece in pieces:
        piece = memoryview(piece).cast("B")
        while piece:
            view = views[k]
            n = min(len(view) - off, len(piece))
            view[off:off + n] = piece[:n]
            piece = piece[n:]
            off += n
            if off == len(view):
                k, off = k + 1, 0


def _put(views: list[memoryview], offset: int, data: bytes) -> None:
    """Write ``data`` at byte ``offset`` of the buffer ``views`` make up."""
    if len(views[0]) >= offset + len(data):
        views[0][offset:offset + len(data)] = data
        return
    for k, view in enumerate(views):
        if offset < len(view):
            _scatter([view[offset:], *views[k + 1:]], (data,))
            return
        offset -= len(view)
