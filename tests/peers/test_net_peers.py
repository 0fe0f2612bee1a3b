"""vhost_min.net.NetDevice against the real front-ends of PEERS.md.

- VirtioUserNetTest: DPDK's dpdk-testpmd with a net_virtio_user port on our loopback back end, in
  io forwarding with an initial TX burst (--tx-first): every frame testpmd sends comes back to its
  RX queue and is sent again. Split and packed rings, mergeable RX buffers on and off. Checked:
  testpmd's own port counters (its final forward statistics) against our device's, both ways, no
  frame dropped on our side, and the frames' bytes as testpmd built them.
- TapTest: the tap back end on this host (root): our front-end in-process drives the device;
  frames both ways through a real tap (an AF_PACKET socket on the tap's host side), a frame
  spread over small buffers (MRG_RXBUF) or dropped and counted (without), two tap queues, and the
  tap deleted under the device (logged; TX still used and counted, the control queue answers).
- NetGuestTest: a Linux guest under QEMU 7.2 (TCG) with two virtio-net-pci devices on vhost-user
  netdevs (``vectors=0``: QEMU 7.2 under TCG crashes in vhost_net_start with MSI-X), each served by
  ``python3 -m vhost_min net`` in its own process, in one boot: the loopback one has two queue
  pairs (the guest turns the second on with ETHTOOL_SCHANNELS, i.e. VQ_PAIRS_SET, and QEMU then
  enables our rings 2 and 3 -- a vhost_dev per pair on one connection, each adding the same memory
  regions), and the guest sends broadcast frames from an AF_PACKET socket and gets each one back
  byte for byte; on the tap one
  (the tap moved into a network namespace the test creates, with an address) the guest pings that
  address, and the namespace's side of the tap counts the frames.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import unittest

from tests import guest, support
from tests.unit import test_net as unit
from tests.peers import launch
from tests.peers.test_backend_peers import PeerTestCase, served, wait_until
from tests.peers.test_wire_peers import report
from vhost_min.net import NetDevice, format_mac

MAC = bytes.fromhex("525400c0ffee")
TXPKTS = 64
ETH_P_IP = 0x0800
IPPROTO_UDP = 17
#: testpmd's txonly frames (app/test-pmd/txonly.c), which --tx-first sends: 198.18.0.1:9 -> 198.18.0.2:9.
TXONLY_SRC, TXONLY_DST = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
FRAMES = 20000


class RecordingNet(NetDevice):
    """NetDevice (loopback) keeping the first frames it loops back, as bytes."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[bytes] = []
        self.per_pair = [0] * self.pairs

    def _deliver(self, pair: int, frames: list) -> None:
        self.per_pair[pair] += len(frames)
        if len(self.seen) < 16:
            self.seen.extend(bytes(f) for f in frames[:16 - len(self.seen)])
        super()._deliver(pair, frames)


def forward_stats(log: str) -> tuple[int, int]:
    """(RX-packets, TX-packets) of testpmd's "Accumulated forward statistics" printed at exit."""
    block = log.split("Accumulated forward statistics for all ports", 1)
    if len(block) != 2:
        raise AssertionError(f"testpmd printed no final statistics:\n{log[-3000:]}")
    rx = re.search(r"RX-packets:\s*(\d+)", block[1])
    tx = re.search(r"TX-packets:\s*(\d+)", block[1])
    return int(rx.group(1)), int(tx.group(1))


def assert_looped_totals(test: unittest.TestCase, device: NetDevice, pmd_rx: int, pmd_tx: int) -> None:
    """testpmd's io-forwarding totals against our loopback device's, both ways: what testpmd sent,
    we took; what we gave back, testpmd received (the frames in flight when it stopped -- at most
    the rings' 256 per direction -- aside)."""
    test.assertGreaterEqual(pmd_rx, FRAMES)
    test.assertLessEqual(0, pmd_tx - device.tx_packets)
    test.assertLessEqual(pmd_tx - device.tx_packets, 512)
    test.assertLessEqual(0, device.rx_packets - pmd_rx)
    test.assertLessEqual(device.rx_packets - pmd_rx, 512)
    test.assertEqual(device.tx_packets, device.rx_packets + device.rx_dropped)


class VirtioUserNetTest(PeerTestCase):
    """testpmd io forwarding through our loopback: frames counted both ways."""

    def run_loop(self, packed: bool, mrg: bool, pairs: int = 1) -> None:
        sock = os.path.join(self.tmp, "net.sock")
        device = RecordingNet(mac=MAC, pairs=pairs)
        with served(device, sock) as server:
            with launch.testpmd_virtio_user(sock, packed=packed, queues=pairs, vdev_args=f"mac={format_mac(MAC)}"
                                            + ("" if mrg else ",mrg_rxbuf=0"),
                                            extra=("--forward-mode=io", "--tx-first", f"--txpkts={TXPKTS}")) as pmd:
                wait_until(lambda: device.rx_packets >= FRAMES, 60, f"{FRAMES} frames looped back", pmd)
                backend = device.backend
                self.assertEqual(bool(backend.features & (1 << 34)), packed)
                self.assertEqual((device.mrg_rxbuf, device.hdr_size), (mrg, 12))
                pmd.check_alive()
                support.stop_process(pmd.proc)          # SIGTERM: testpmd stops and prints its totals
                log = pmd.log(1 << 20)
            self.assertEqual(pmd.proc.returncode, 0, log)
            pmd_rx, pmd_tx = forward_stats(log)
            wait_until(lambda: not server.backends, 10, "the backend to retire")
            self.assertEqual(list(server.errors), [])
        assert_looped_totals(self, device, pmd_rx, pmd_tx)
        self.assertEqual((device.rx_oversize, device.tx_errors), (0, 0))
        # Every pair carried frames (testpmd's --tx-first burst goes out on each of its queues).
        self.assertTrue(all(n > 0 for n in device.per_pair), device.per_pair)
        # The frames as testpmd built them: 64-byte Ethernet/IPv4/UDP from the port's MAC.
        self.assertEqual(len(device.seen), 16)
        for frame in device.seen:
            self.assertEqual(len(frame), TXPKTS)
            self.assertEqual((frame[6:12], int.from_bytes(frame[12:14], "big")), (MAC, ETH_P_IP))
            self.assertEqual((frame[14 + 9], frame[14 + 12:14 + 16], frame[14 + 16:14 + 20]),
                             (IPPROTO_UDP, TXONLY_SRC, TXONLY_DST))
        report(self, f"{'packed' if packed else 'split'}, mrg_rxbuf {'on' if mrg else 'off'}, {pairs} pair(s)",
               f"testpmd RX {pmd_rx} TX {pmd_tx}; ours TX {device.tx_packets} RX {device.rx_packets} "
               f"dropped {device.rx_dropped}; per pair {device.per_pair}")
        self.assertNothingLeft()

    def test_split_mergeable(self):
        self.run_loop(packed=False, mrg=True)

    def test_split_not_mergeable(self):
        self.run_loop(packed=False, mrg=False)

    def test_packed_mergeable(self):
        self.run_loop(packed=True, mrg=True)

    def test_packed_not_mergeable(self):
        self.run_loop(packed=True, mrg=False)

    def test_two_queue_pairs(self):
        """MQ: testpmd with 2 RX/TX queues on our 2-pair device; frames loop on both pairs."""
        self.run_loop(packed=False, mrg=True, pairs=2)


# --------------------------------------------------------------------------------------------
# The tap back end on this host's kernel (root)
# --------------------------------------------------------------------------------------------

class TapTest(unit.NetTestCase):
    """The tap back end on a real tap device (root, /dev/net/tun, ip): frames written by the
    driver come out of the tap, frames sent into the tap land in the driver's RX buffers; a tap
    deleted under the device is logged and the other queues keep serving."""

    def setUp(self) -> None:
        support.require_root("a tap device")
        support.require(os.path.exists("/dev/net/tun"), "/dev/net/tun", "modprobe tun")
        support.require_commands("ip", install="apt-get install -y iproute2")
        super().setUp()
        self.name = f"vmt{os.getpid() % 100000}"
        self.addCleanup(subprocess.run, ["ip", "link", "del", self.name], capture_output=True)

    def link_up(self) -> None:
        """The tap up, without IPv6 first: the kernel would send its own frames (MLD reports,
        router solicitations) into the device's RX queue, where the tests expect only theirs."""
        try:
            with open(f"/proc/sys/net/ipv6/conf/{self.name}/disable_ipv6", "w") as knob:
                knob.write("1")
        except FileNotFoundError:           # no IPv6 in this kernel: nothing to silence
            pass
        _ip("link", "set", self.name, "up")

    def packet_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        self.addCleanup(sock.close)
        sock.bind((self.name, 0))
        sock.settimeout(unit.TIMEOUT)
        return sock

    def test_frames_both_ways_and_tap_gone(self):
        device = self.serve(NetDevice(tap=self.name, mac=unit.MAC))
        self.link_up()
        sock = self.packet_socket()
        fe = self.connect(unit.V1 | unit.MRG | unit.CTRL, queues=(0, 1, 2))
        addrs = self.post_rx(fe, [2048] * 4)
        # TX: the driver's frame comes out of the tap, byte for byte.
        out = unit.frame(b"\xff" * 6, b"from the driver")
        self.send(fe, [out], 12)
        self.assertEqual(sock.recv(2048), out)
        # RX: a frame sent into the tap lands in an RX buffer with its header (num_buffers 1).
        into = b"\xff" * 6 + bytes.fromhex("020000000077") + b"\x88\xb5" + b"from the host".ljust(50, b".")
        sock.send(into)
        (addr, n), = self.received(fe, 1)
        self.assertEqual(addr, addrs[0])
        self.assertEqual(fe.memory.read(addr, n), unit.VIRTIO_NET_HDR_MRG_RXBUF.pack(0, 0, 0, 0, 0, 0, 1) + into)
        # The tap goes away: logged; TX chains are still used (and counted as errors); the control
        # queue still answers.
        with self.assertLogs("vhost_min.net", logging.WARNING) as logs:
            _ip("link", "del", self.name)
            self.send(fe, [out, out], 12)
            self.wait_for(lambda: any(device._tap_gone), "the device to notice")
        self.assertIn("went away", "\n".join(logs.output))
        self.assertEqual(device.tx_errors, 2)
        self.assertEqual(self.control_ok(fe), unit.VIRTIO_NET_OK)
        self.send(fe, [out], 12)
        self.assertEqual(device.tx_errors, 3)

    def test_tap_frame_spread_over_small_buffers_and_oversize_without_mrg(self):
        """A 300-byte frame from the host into 128-byte buffers: with MRG_RXBUF it takes 3
        (num_buffers 3, the bytes in order); without, it is dropped and counted, the buffer kept
        for the next frame, which fits."""
        for mrg in (True, False):
            with self.subTest(mrg=mrg):
                device = self.serve(NetDevice(tap=self.name, mac=unit.MAC))
                self.link_up()
                sock = self.packet_socket()
                fe = self.connect(unit.V1 | (unit.MRG if mrg else 0))
                addrs = self.post_rx(fe, [128] * 4)
                big = b"\xff" * 6 + bytes.fromhex("020000000077") + b"\x88\xb5" + bytes(range(256)) + b"x" * 30
                small = b"\xff" * 6 + bytes.fromhex("020000000077") + b"\x88\xb5" + b"small".ljust(46, b".")
                sock.send(big)
                if mrg:
                    used = self.received(fe, 3)
                    self.assertEqual([a for a, _ in used], addrs[:3])
                    blob = b"".join(fe.memory.read(a, n) for a, n in used)
                    self.assertEqual(blob, unit.VIRTIO_NET_HDR_MRG_RXBUF.pack(0, 0, 0, 0, 0, 0, 3) + big)
                else:
                    self.wait_for(lambda: device.rx_oversize == 1, "the oversize count")
                sock.send(small)
                (addr, n), = self.received(fe, 1)
                self.assertEqual(addr, addrs[3] if mrg else addrs[0])
                self.assertEqual(fe.memory.read(addr + 12, n - 12), small)
                self.assertEqual(device.rx_oversize, 0 if mrg else 1)
                fe.close()
                self.doCleanups()
                self.setUp()

    def test_multiqueue_tap(self):
        """Two pairs: two tap queues (IFF_MULTI_QUEUE); a frame sent on transmitq2 leaves the tap."""
        device = self.serve(NetDevice(tap=self.name, mac=unit.MAC, pairs=2))
        self.assertEqual(len(device.tap.fds), 2)
        self.link_up()
        sock = self.packet_socket()
        fe = self.connect(unit.V1 | unit.MRG | unit.CTRL, queues=(0, 1, 2, 3, 4))
        out = unit.frame(b"\xff" * 6, b"on the second pair")
        self.send(fe, [out], 12, index=3)
        self.assertEqual(sock.recv(2048), out)
        self.assertEqual(device.tx_packets, 1)

    def control_ok(self, fe: unit.Frontend) -> int:
        return unit.LoopbackTest.control(self, fe, unit.VIRTIO_NET_CTRL_RX, unit.VIRTIO_NET_CTRL_RX_PROMISC, b"\x01")


# --------------------------------------------------------------------------------------------
# A Linux guest: loopback and tap in one boot
# --------------------------------------------------------------------------------------------

LOOP_MAC, TAP_MAC = "52:54:00:00:10:01", "52:54:00:00:10:02"
NS_ADDR, GUEST_ADDR = "10.211.0.1", "10.211.0.2"
GUEST_TIMEOUT = 60
LOOP_FRAMES = 20

GUEST_SCRIPT = f"""#!/bin/sh
set -e
python3 - <<'EOF'
import os, socket, subprocess

def iface(mac):
    for name in os.listdir("/sys/class/net"):
        with open(f"/sys/class/net/{{name}}/address") as f:
            if f.read().strip() == mac:
                return name
    raise SystemExit(f"no interface with MAC {{mac}}: {{os.listdir('/sys/class/net')}}")

loop, tap = iface("{LOOP_MAC}"), iface("{TAP_MAC}")
print("ifaces", loop, tap, flush=True)
subprocess.run(["/usr/bin/ip", "link", "set", loop, "up"], check=True)
mac = bytes.fromhex("{LOOP_MAC}".replace(":", ""))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
s.bind((loop, 0))
s.settimeout(10)

def channels(cmd, current=None, combined=0):
    # SIOCETHTOOL with struct ethtool_channels {{u32 cmd, max_rx, max_tx, max_other, max_combined,
    # rx_count, tx_count, other_count, combined_count}}, as `ethtool -l/-L` sends it
    import array, fcntl, struct
    buf = array.array("I", current or [0] * 9)
    buf[0] = cmd
    if combined:
        buf[8] = combined
    fcntl.ioctl(s.fileno(), 0x8946, struct.pack("16sQ16x", loop.encode(), buf.buffer_info()[0]))
    return list(buf)

got = channels(0x3C)                                   # ETHTOOL_GCHANNELS
print("channels_max", got[4], flush=True)
if got[4] >= 2:
    channels(0x3D, got, combined=2)                    # ETHTOOL_SCHANNELS: VQ_PAIRS_SET 2 on the control queue
print("channels_now", channels(0x3C)[8], flush=True)
same = 0
for i in range({LOOP_FRAMES}):
    frame = b"\\xff" * 6 + mac + b"\\x88\\xb5" + (b"vhost_min loopback %d" % i).ljust(46, b".")
    s.send(frame)
    while True:                        # skip our own frame as it leaves (PACKET_OUTGOING, 4)
        data, addr = s.recvfrom(2048)
        if addr[2] != socket.PACKET_OUTGOING:
            break
    same += data == frame
print("loopback_sent", {LOOP_FRAMES}, flush=True)
print("loopback_queues", len([q for q in os.listdir(f"/sys/class/net/{{loop}}/queues") if q.startswith("rx-")]),
      flush=True)
print("loopback_same", same, flush=True)
with open("/tmp/tap", "w") as f:
    f.write(tap)
EOF
tap=$(cat /tmp/tap)
/usr/bin/ip link set "$tap" up
/usr/bin/ip addr add {GUEST_ADDR}/24 dev "$tap"
ping -c 3 -W 10 {NS_ADDR} || true
"""


def _ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if proc.returncode:
        raise AssertionError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


class NetGuestTest(unittest.TestCase):
    """One guest boot (setUpClass), two of our net back-ends as programs: loopback and tap."""

    @classmethod
    def setUpClass(cls) -> None:
        from tests.peers.test_guest_peers import BOOT_TIMEOUT, backend_process
        guest.require_guest()
        support.require_root("a tap device and a network namespace")
        support.require_commands("ip", install="apt-get install -y iproute2")
        work = tempfile.TemporaryDirectory(prefix="vhost_min-guest-net-")
        cls.addClassCleanup(work.cleanup)
        cls.tap = f"vmg{os.getpid() % 100000}"
        cls.netns = f"vhost_min-{os.getpid()}"
        loop_sock, tap_sock = os.path.join(work.name, "loop.sock"), os.path.join(work.name, "tap.sock")
        cli = [sys.executable, "-m", "vhost_min", "net", "-v"]
        qemu_args = []
        # The loopback device has two queue pairs (MQ: QEMU answers the guest's VQ_PAIRS_SET and
        # enables our rings), the tap device one.
        for name, sock, mac, pairs in (("n0", loop_sock, LOOP_MAC, 2), ("n1", tap_sock, TAP_MAC, 1)):
            qemu_args += ["-chardev", f"socket,id={name},path={sock}",
                          "-netdev", f"vhost-user,id={name},chardev={name},queues={pairs}",
                          "-device", f"virtio-net-pci,netdev={name},mac={mac},vectors=0"
                                     + (",mq=on" if pairs > 1 else "")]
        _ip("netns", "add", cls.netns)
        cls.addClassCleanup(subprocess.run, ["ip", "netns", "del", cls.netns], capture_output=True)
        with backend_process("vhost_min-net-loop", [*cli, "--socket-path", loop_sock, "--loopback", "--queues", "2"], loop_sock,
                             work.name) as loop, \
                backend_process("vhost_min-net-tap", [*cli, "--socket-path", tap_sock, "--tap", cls.tap], tap_sock,
                                work.name) as tap:
            # The back-end created the tap; the far end of the wire lives in the namespace.
            _ip("link", "set", cls.tap, "netns", cls.netns)
            _ip("-n", cls.netns, "addr", "add", f"{NS_ADDR}/24", "dev", cls.tap)
            _ip("-n", cls.netns, "link", "set", cls.tap, "up")
            with guest.Guest(qemu_args, memfd_memory=True, modules=["virtio_net"], boot_timeout=BOOT_TIMEOUT) as vm:
                vm.start(GUEST_SCRIPT, timeout=GUEST_TIMEOUT)
                try:
                    cls.result = vm.wait()
                except guest.GuestError as exc:
                    raise AssertionError(f"{exc}\n--- back-ends' output:\n{loop.log()}\n{tap.log()}") from None
            cls.ns_link = _ip("-n", cls.netns, "-j", "-s", "link", "show", cls.tap)
            cls.logs = loop.log(1 << 20) + tap.log(1 << 20)
        cls.exits = (loop.proc.returncode, tap.proc.returncode)

    def test_guest_gets_its_broadcast_frames_back_on_loopback(self) -> None:
        out = self.result.output
        self.assertEqual(self.result.status, 0, f"{out}\n--- back-ends:\n{self.logs}")
        self.assertIn(f"loopback_sent {LOOP_FRAMES}", out)
        self.assertIn(f"loopback_same {LOOP_FRAMES}", out, out)
        # MQ: the driver sees two pairs and turns the second on (VQ_PAIRS_SET, which QEMU answers
        # after enabling our rings 2 and 3); the frames still come back.
        self.assertIn("channels_max 2", out, out)
        self.assertIn("channels_now 2", out, out)
        self.assertIn("loopback_queues 2", out, out)

    def test_guest_pings_the_namespace_through_the_tap(self) -> None:
        out = self.result.output
        self.assertRegex(out, r"3 packets transmitted, 3 packets received", f"{out}\n--- back-ends:\n{self.logs}")
        # The namespace's side of the tap saw the ARP and the echo requests, and sent the replies.
        stats = json.loads(self.ns_link)[0]["stats64"]
        self.assertGreaterEqual(stats["rx"]["packets"], 4, stats)      # ARP request + 3 echo requests
        self.assertGreaterEqual(stats["tx"]["packets"], 4, stats)      # ARP reply + 3 echo replies
        summary = re.search(r"\d+ packets transmitted.*", out).group(0)
        report(self, "guest ping through our tap", f"{summary}; the namespace's tap: RX {stats['rx']['packets']} "
                                                  f"TX {stats['tx']['packets']} frames")

    def test_backends_served_cleanly_and_exit_0_on_sigterm(self) -> None:
        self.assertEqual(self.exits, (0, 0), self.logs)
        self.assertNotIn("Traceback", self.logs)
        self.assertNotIn("ERROR", self.logs)
        self.assertNotIn("rejected", self.logs)         # no message refused (the pairs' shared regions)
        self.assertEqual(self.logs.count("serving a front-end"), 2, self.logs)


if __name__ == "__main__":
    unittest.main()
