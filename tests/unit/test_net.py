"""vhost_min.net.NetDevice served by our back-end, driven by our front-end in one process: the
header in each size, MRG_RXBUF merging, an oversize frame dropped and counted, the control queue
(and VIRTIO_NET_ERR for bad commands), MQ, the config space, the receive filter, the net command.
The tap back end needs root and a real tap: tests/peers/test_net_peers.py (TapTest)."""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from tests.support import open_fds
from vhost_min.backend import Server
from vhost_min.frontend import Frontend
from vhost_min.net import (VIRTIO_NET_CONFIG, VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK,
                           VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_MAC_TABLE_SET,
                           VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_CTRL_RX,
                           VIRTIO_NET_CTRL_RX_ALLMULTI, VIRTIO_NET_CTRL_RX_NOBCAST, VIRTIO_NET_CTRL_RX_PROMISC,
                           VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_ERR, VIRTIO_NET_HDR, VIRTIO_NET_HDR_MRG_RXBUF,
                           VIRTIO_NET_OK, VIRTIO_NET_S_ANNOUNCE, VIRTIO_NET_S_LINK_UP, NetDevice, VirtioNetFeature,
                           rarp_frame)
from vhost_min.virtio import VHOST_USER_F_PROTOCOL_FEATURES, VirtioFeature

N = VirtioNetFeature
V1 = int(VirtioFeature.VIRTIO_F_VERSION_1)
PACKED = int(VirtioFeature.VIRTIO_F_RING_PACKED)
EVENT_IDX = int(VirtioFeature.VIRTIO_F_EVENT_IDX)
PF = int(VHOST_USER_F_PROTOCOL_FEATURES)
CTRL = int(N.VIRTIO_NET_F_CTRL_VQ | N.VIRTIO_NET_F_CTRL_RX | N.VIRTIO_NET_F_CTRL_MAC_ADDR
           | N.VIRTIO_NET_F_GUEST_ANNOUNCE | N.VIRTIO_NET_F_MQ)
MRG = int(N.VIRTIO_NET_F_MRG_RXBUF)
MAC = bytes.fromhex("525400aabbcc")
TIMEOUT = 5.0


def frame(dst: bytes, payload: bytes) -> bytes:
    return dst + MAC + b"\x88\xb5" + payload          # 0x88b5: the IEEE local experimental ethertype


class NetTestCase(unittest.TestCase):
    """A NetDevice served on a socket by a Server thread; our Frontend drives it."""

    def setUp(self) -> None:
        self.fds_before = open_fds()
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.path = os.path.join(tmp.name, "net.sock")

    def serve(self, device: NetDevice) -> NetDevice:
        server, stop = Server(), threading.Event()
        server.add(device, self.path)
        thread = threading.Thread(target=lambda: (server.run(stop_event=stop), server.close()), daemon=True)
        thread.start()

        def finish() -> None:
            stop.set()
            thread.join(5)
            self.assertFalse(thread.is_alive())
            device.close()
            self.assertEqual(open_fds() - self.fds_before, set(), "fds leaked")
        self.addCleanup(finish)
        return device

    def connect(self, features: int, *, queues=(0, 1), size: int = 64) -> Frontend:
        fe = Frontend.connect(self.path, timeout=TIMEOUT)
        self.addCleanup(fe.close)
        fe.negotiate(features | PF)
        fe.setup_memory(1 << 20)
        for index in queues:
            fe.setup_queue(index, size)
        return fe

    def post_rx(self, fe: Frontend, sizes, index: int = 0) -> list[int]:
        """RX buffers of these sizes, published (and kicked); returns their addresses."""
        addrs = []
        for size in sizes:
            addr = fe.alloc(size)
            fe.memory.write(addr, b"\xee" * size)
            fe.queue(index).add([], [(addr, size)], token=addr)
            addrs.append(addr)
        fe.publish(index)
        return addrs

    def send(self, fe: Frontend, frames, hdr_size: int, index: int = 1) -> None:
        """TX chains: a zero header of ``hdr_size`` bytes and the frame, in one buffer each; waits
        until all of them are used."""
        q = fe.queue(index)
        for data in frames:
            chain = bytes(hdr_size) + data
            addr = fe.alloc(len(chain))
            fe.memory.write(addr, chain)
            q.add([(addr, len(chain))], [], token=addr)
        fe.publish(index)
        used = []
        deadline = time.monotonic() + TIMEOUT
        while len(used) < len(frames) and time.monotonic() < deadline:
            fe.wait_call(index, timeout=0.2)
            used += q.reap()
        self.assertEqual(len(used), len(frames), "TX chains used")
        self.assertTrue(all(n == 0 for _, n in used), used)

    def received(self, fe: Frontend, count: int, index: int = 0) -> list[tuple[int, int]]:
        """(buffer address, used length) of ``count`` used RX buffers, in used order."""
        used = []
        deadline = time.monotonic() + TIMEOUT
        q = fe.queue(index)
        while len(used) < count and time.monotonic() < deadline:
            used += q.reap()
            if len(used) < count:
                fe.wait_call(index, timeout=0.2)
        self.assertEqual(len(used), count, "RX buffers used")
        return used

    def wait_for(self, predicate, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not predicate():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}")
            time.sleep(0.01)


class LoopbackTest(NetTestCase):

    def test_header_sizes(self):
        """12 bytes with VERSION_1 (num_buffers 1) or MRG_RXBUF; 10 for a legacy driver with
        neither: the TX header is stripped by that size, the RX header written in it."""
        for features, size, packed in ((V1, 12, 0), (V1 | MRG, 12, 0), (V1 | PACKED, 12, PACKED), (MRG, 12, 0),
                                       (0, 10, 0)):
            with self.subTest(features=hex(features)):
                device = self.serve(NetDevice(mac=MAC))
                fe = self.connect(features | packed | EVENT_IDX)
                self.assertEqual(device.hdr_size, size)
                (addr,) = self.post_rx(fe, [256])
                data = frame(MAC, b"hello %d" % size)
                self.send(fe, [data], size)
                (token, n), = self.received(fe, 1)
                self.assertEqual((token, n), (addr, size + len(data)))
                header = fe.memory.read(addr, size)
                expect = VIRTIO_NET_HDR_MRG_RXBUF.pack(0, 0, 0, 0, 0, 0, 1) if size == 12 else VIRTIO_NET_HDR.pack(
                    0, 0, 0, 0, 0, 0)
                self.assertEqual(header, expect)
                self.assertEqual(fe.memory.read(addr + size, len(data)), data)
                self.assertEqual((device.tx_packets, device.rx_packets, device.rx_bytes), (1, 1, len(data)))
                fe.close()
                self.doCleanups()
                self.setUp()

    def test_mrg_rxbuf_spreads_a_frame_over_buffers(self):
        """A 200-byte frame into 64-byte buffers: 4 buffers (12 + 200 = 64+64+64+20), num_buffers 4
        in the first header, the bytes in order across them; the next frame takes the next buffer."""
        device = self.serve(NetDevice(mac=MAC))
        fe = self.connect(V1 | MRG)
        addrs = self.post_rx(fe, [64] * 6)
        big, small = frame(MAC, bytes(range(186))), frame(MAC, b"small")
        self.assertEqual(len(big), 200)
        self.send(fe, [big, small], 12)
        used = self.received(fe, 5)
        self.assertEqual(used, [(addrs[0], 64), (addrs[1], 64), (addrs[2], 64), (addrs[3], 20),
                                (addrs[4], 12 + len(small))])
        blob = b"".join(fe.memory.read(a, n) for a, n in used[:4])
        self.assertEqual(blob, VIRTIO_NET_HDR_MRG_RXBUF.pack(0, 0, 0, 0, 0, 0, 4) + big)
        self.assertEqual(fe.memory.read(addrs[4], 12 + len(small)),
                         VIRTIO_NET_HDR_MRG_RXBUF.pack(0, 0, 0, 0, 0, 0, 1) + small)
        self.assertEqual((device.rx_packets, device.rx_oversize, device.rx_dropped), (2, 0, 0))

    def test_oversize_frame_without_mrg_rxbuf_is_dropped_and_counted(self):
        """Without MRG_RXBUF a frame longer than the buffer offered is dropped (counted in
        rx_oversize), nothing of it written; the buffer takes the next frame that fits."""
        device = self.serve(NetDevice(mac=MAC))
        fe = self.connect(V1)
        self.assertFalse(device.mrg_rxbuf)
        (addr,) = self.post_rx(fe, [64])
        big, fits = frame(MAC, b"x" * 80), frame(MAC, b"fits")
        self.send(fe, [big], 12)
        self.wait_for(lambda: device.rx_oversize == 1, "the oversize count")
        self.assertEqual(fe.queue(0).reap(), [])
        self.assertEqual(fe.memory.read(addr, 64), b"\xee" * 64)        # not a byte written
        self.send(fe, [fits], 12)
        self.assertEqual(self.received(fe, 1), [(addr, 12 + len(fits))])
        self.assertEqual(fe.memory.read(addr + 12, len(fits)), fits)
        self.assertEqual((device.rx_oversize, device.rx_packets, device.rx_dropped), (1, 1, 0))

    def test_runt_tx_chain_is_counted_not_delivered(self):
        """A TX chain shorter than the header and an Ethernet header: used, counted in tx_errors,
        nothing delivered; the next frame is."""
        device = self.serve(NetDevice(mac=MAC))
        fe = self.connect(V1 | MRG)
        (addr,) = self.post_rx(fe, [128])
        self.send(fe, [b"\x01\x02"], 12)
        data = frame(MAC, b"after the runt")
        self.send(fe, [data], 12)
        self.assertEqual(self.received(fe, 1), [(addr, 12 + len(data))])
        self.assertEqual((device.tx_packets, device.tx_errors, device.rx_packets), (2, 1, 1))

    def test_no_rx_buffer_drops_and_counts(self):
        device = self.serve(NetDevice(mac=MAC))
        fe = self.connect(V1 | MRG)
        self.post_rx(fe, [])
        self.send(fe, [frame(MAC, b"a"), frame(MAC, b"b")], 12)
        self.assertEqual((device.tx_packets, device.rx_dropped, device.rx_packets), (2, 2, 0))

    def test_config_space(self):
        """mac, status (LINK_UP), max_virtqueue_pairs, mtu, as a driver reads them."""
        self.serve(NetDevice(mac=MAC, pairs=3, mtu=9000))
        fe = self.connect(V1, queues=())
        self.assertEqual(fe.get_config(0, VIRTIO_NET_CONFIG.size),
                         VIRTIO_NET_CONFIG.pack(MAC, VIRTIO_NET_S_LINK_UP, 3, 9000))
        self.assertEqual(fe.get_config(6, 2), struct.pack("<H", VIRTIO_NET_S_LINK_UP))

    def test_offered_features(self):
        device = NetDevice(mac=MAC)
        self.assertEqual(device.num_queues, 3)
        self.assertFalse(device.features & N.VIRTIO_NET_F_MQ)
        self.assertTrue(NetDevice(pairs=2).features & N.VIRTIO_NET_F_MQ)
        self.assertEqual(NetDevice(pairs=2).num_queues, 5)
        self.assertFalse(NetDevice(mrg_rxbuf=False).features & N.VIRTIO_NET_F_MRG_RXBUF)
        for f in (N.VIRTIO_NET_F_MAC, N.VIRTIO_NET_F_STATUS, N.VIRTIO_NET_F_MTU, N.VIRTIO_NET_F_CTRL_VQ,
                  N.VIRTIO_NET_F_GUEST_ANNOUNCE, N.VIRTIO_NET_F_MRG_RXBUF):
            self.assertTrue(device.features & f, f)
        with self.assertRaises(ValueError):
            NetDevice(mac="52:54:00:zz:00:00")
        with self.assertRaises(ValueError):
            NetDevice(mtu=10)

    def test_mq_pairs_loop_back_on_their_own_pair(self):
        """With 2 pairs, a frame sent on transmitq2 (3) comes back on receiveq2 (2), not on 0."""
        device = self.serve(NetDevice(mac=MAC, pairs=2))
        fe = self.connect(V1 | MRG | CTRL, queues=(0, 1, 2, 3, 4))
        (a0,) = self.post_rx(fe, [128], index=0)
        (a2,) = self.post_rx(fe, [128], index=2)
        data = frame(MAC, b"pair two")
        self.send(fe, [data], 12, index=3)
        self.assertEqual(self.received(fe, 1, index=2), [(a2, 12 + len(data))])
        self.assertEqual(fe.queue(0).reap(), [])
        self.assertEqual(self.control(fe, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\x02\x00",
                                      index=4), VIRTIO_NET_OK)
        self.assertEqual(device.active_pairs, 2)

    def control(self, fe: Frontend, cls: int, cmd: int, data: bytes = b"", index: int = 2) -> int:
        """One control command as a driver sends it: class+command, data, then a 1-byte ack."""
        q = fe.queue(index)
        out = fe.alloc(2 + max(len(data), 1))
        ack = fe.alloc(1)
        fe.memory.write(out, bytes([cls, cmd]) + data)
        fe.memory.write(ack, b"\xaa")
        readable = [(out, 2)] + ([(out + 2, len(data))] if data else [])
        q.add(readable, [(ack, 1)], token=ack)
        fe.publish(index)
        used = []
        deadline = time.monotonic() + TIMEOUT
        while not used and time.monotonic() < deadline:
            fe.wait_call(index, timeout=0.2)
            used = q.reap()
        self.assertEqual(used, [(ack, 1)])
        return fe.memory.read(ack, 1)[0]

    def test_control_queue(self):
        """RX mode, MAC address and table, announce ack, MQ: VIRTIO_NET_OK and the state changed;
        a bad class, command or length: VIRTIO_NET_ERR and nothing changed."""
        device = self.serve(NetDevice(mac=MAC, pairs=2))
        fe = self.connect(V1 | MRG | CTRL, queues=(4,), size=16)
        ok = lambda *args: self.assertEqual(self.control(fe, *args, index=4), VIRTIO_NET_OK, args)   # noqa: E731
        err = lambda *args: self.assertEqual(self.control(fe, *args, index=4), VIRTIO_NET_ERR, args)  # noqa: E731
        ok(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\x00")
        ok(VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, b"\x01")
        self.assertEqual((device.promisc, device.allmulti), (False, True))
        new_mac = bytes.fromhex("020000000001")
        ok(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, new_mac)
        self.assertEqual(fe.get_config(0, 6), new_mac)
        uni, multi = bytes.fromhex("020000000002"), bytes.fromhex("01005e000001")
        ok(VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET,
           struct.pack("<I", 1) + uni + struct.pack("<I", 1) + multi)
        self.assertEqual((device.uni_macs, device.multi_macs), ({uni}, {multi}))
        device.announce()
        self.assertTrue(device.status & VIRTIO_NET_S_ANNOUNCE)
        ok(VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK)
        self.assertEqual(device.status, VIRTIO_NET_S_LINK_UP)
        ok(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\x02\x00")
        self.assertEqual(device.active_pairs, 2)
        errors = [
            (9, 0, b""),                                                            # no such class
            (VIRTIO_NET_CTRL_VLAN, 0, b"\x01\x00"),                                 # CTRL_VLAN not offered
            (VIRTIO_NET_CTRL_RX, 7, b"\x01"),                                       # no such command
            (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_NOBCAST, b"\x01"),              # CTRL_RX_EXTRA not offered
            (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\x01\x01"),          # length 2, not 1
            (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b""),                  # length 0
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, b"\x02\x00\x00"),   # 3 bytes of a MAC
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, struct.pack("<I", 2) + uni),   # entries > data
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET,
             struct.pack("<I", 0) + struct.pack("<I", 0) + b"\x00"),                # a byte too many
            (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, b"\x00"),      # ack has no data
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\x03\x00"),     # more pairs than we have
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\x00\x00"),     # fewer than 1
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\x01"),         # le16 cut short
        ]
        with self.assertLogs("vhost_min.net", logging.INFO):
            for args in errors:
                err(*args)
        self.assertEqual(device.ctrl_errors, len(errors))
        self.assertEqual((device.promisc, device.allmulti, device.mac, device.active_pairs),
                         (False, True, new_mac, 2))
        self.assertEqual((device.uni_macs, device.multi_macs), ({uni}, {multi}))

    def test_control_without_negotiation_is_refused(self):
        """A command whose feature the driver did not take is VIRTIO_NET_ERR (CTRL_VQ alone)."""
        device = self.serve(NetDevice(mac=MAC, pairs=2))
        fe = self.connect(V1 | int(N.VIRTIO_NET_F_CTRL_VQ), queues=(4,), size=16)
        with self.assertLogs("vhost_min.net", logging.INFO):
            self.assertEqual(self.control(fe, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\x00", index=4),
                             VIRTIO_NET_ERR)
            self.assertEqual(self.control(fe, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, b"\x02\x00",
                                          index=4), VIRTIO_NET_ERR)
        self.assertEqual((device.promisc, device.active_pairs), (True, 1))

    def test_receive_filter(self):
        """Promiscuous off: our MAC, broadcast, a listed unicast and (allmulti or listed) multicast
        come in; another unicast and an unlisted multicast are filtered and counted."""
        device = self.serve(NetDevice(mac=MAC))
        fe = self.connect(V1 | MRG | CTRL, queues=(0, 1, 2))
        listed = bytes.fromhex("020000000002")
        self.assertEqual(self.control(fe, VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC, b"\x00"), VIRTIO_NET_OK)
        self.assertEqual(self.control(fe, VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET,
                                      struct.pack("<I", 1) + listed + struct.pack("<I", 0)), VIRTIO_NET_OK)
        self.post_rx(fe, [128] * 8)
        keep = [frame(MAC, b"1"), frame(b"\xff" * 6, b"2"), frame(listed, b"3")]
        drop = [frame(bytes.fromhex("020000000009"), b"4"), frame(bytes.fromhex("01005e000009"), b"5")]
        self.send(fe, keep + drop, 12)
        used = self.received(fe, 3)
        self.assertEqual([fe.memory.read(a + 12, n - 12) for a, n in used], keep)
        self.assertEqual(device.rx_filtered, 2)

    def test_send_rarp_in_loopback_reaches_the_driver(self):
        device = self.serve(NetDevice(mac=MAC))
        fe = self.connect(V1 | MRG)
        (addr,) = self.post_rx(fe, [128])
        self.wait_for(lambda: device.backend.rings[0].queue is not None, "the RX queue")
        device.send_rarp(MAC)           # as VHOST_USER_SEND_RARP asks (called here in the test thread)
        (_, n), = self.received(fe, 1)
        self.assertEqual(fe.memory.read(addr + 12, n - 12), rarp_frame(MAC))


class CommandTest(unittest.TestCase):
    """``python3 -m vhost_min net``: the blk command's program conventions."""

    def run_cli(self, *args: str, timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vhost_min", "net", *args], capture_output=True, text=True,
                              timeout=timeout)

    def test_print_capabilities(self):
        proc = self.run_cli("--print-capabilities")
        self.assertEqual((proc.returncode, json.loads(proc.stdout)), (0, {"type": "net"}))

    def test_usage_errors(self):
        for args in (("--loopback",), ("--socket-path", "x.sock"), ("--socket-path", "x.sock", "--loopback",
                                                                        "--mac", "52:54"),
                     ("--socket-path", "x.sock", "--loopback", "--tap", "t0")):
            with self.subTest(args=args):
                proc = self.run_cli(*args)
                self.assertEqual(proc.returncode, 2, proc.stderr)
                self.assertIn("vhost-min net: error:", proc.stderr)

    def test_serves_a_frontend_and_exits_0_on_sigterm(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "net.sock")
            proc = subprocess.Popen([sys.executable, "-m", "vhost_min", "net", "--socket-path", path, "--loopback",
                                     "--queues", "2", "--mac", "52:54:00:aa:bb:cc", "--mtu", "9000"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                line = proc.stdout.readline()
                self.assertIn(f"serving virtio-net 52:54:00:aa:bb:cc (loopback, 2 queue pairs, MTU 9000) on {path}",
                              line)
                with Frontend.connect(path, timeout=TIMEOUT) as fe:
                    fe.negotiate(V1 | PF)
                    self.assertEqual(fe.get_config(0, VIRTIO_NET_CONFIG.size),
                                     VIRTIO_NET_CONFIG.pack(MAC, VIRTIO_NET_S_LINK_UP, 2, 9000))
                proc.send_signal(signal.SIGTERM)
                self.assertEqual(proc.wait(10), 0, proc.stderr.read())
                self.assertFalse(os.path.exists(path))
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                proc.stdout.close()
                proc.stderr.close()


if __name__ == "__main__":
    unittest.main()
