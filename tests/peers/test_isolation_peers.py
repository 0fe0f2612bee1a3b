"""A stalled front-end does not hurt a real one served by the same Server (issue 10, isolation).

One Server thread, two sockets: DPDK's dpdk-testpmd (net_virtio_user, io forwarding with an
initial TX burst) on our loopback NetDevice on one; on the other a raw connection that sent a
SET_VRING_CALL header with its eventfd and then stopped, before the payload. testpmd brings the
device up and loops its frames (its final totals against our device's counters, both ways) while
the raw peer is stalled; then the raw peer sends the rest and gets its answer, the eventfd it sent
with the header being the call fd signalled.
"""

from __future__ import annotations

import array
import os
import socket

from tests import support
from tests.peers import launch
from tests.peers.test_backend_peers import PeerTestCase, served, wait_until
from tests.peers.test_net_peers import FRAMES, MAC, TXPKTS, RecordingNet, assert_looped_totals, forward_stats
from tests.peers.test_wire_peers import report
from tests.unit.test_backend import Echo, eventfd, fired
from tests.unit.test_isolation import header, unread
from vhost_min.net import format_mac
from vhost_min.user import Connection, FrontendRequest, VringFd

F = FrontendRequest
TIMEOUT = 10.0


class StalledBesideTestpmdTest(PeerTestCase):
    def test_testpmd_loops_frames_while_a_raw_peer_is_stalled(self):
        net_sock, raw_sock = os.path.join(self.tmp, "net.sock"), os.path.join(self.tmp, "raw.sock")
        device = RecordingNet(mac=MAC)
        call = eventfd()
        try:
            self.loop_beside_a_stall(device, net_sock, raw_sock, call)
        finally:
            os.close(call)
        self.assertNothingLeft()

    def loop_beside_a_stall(self, device: RecordingNet, net_sock: str, raw_sock: str, call: int) -> None:
        with served(device, net_sock, (Echo, raw_sock)) as server:
            raw = Connection.connect(raw_sock)
            self.addCleanup(raw.close)
            raw.sock.settimeout(TIMEOUT)
            raw.sock.sendmsg([header(F.SET_VRING_CALL, 8, need_reply=True)],
                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [call]))])
            wait_until(lambda: unread(raw.sock) == 0, TIMEOUT, "the server to read the header")
            with launch.testpmd_virtio_user(net_sock, vdev_args=f"mac={format_mac(MAC)}",
                                            extra=("--forward-mode=io", "--tx-first", f"--txpkts={TXPKTS}")) as pmd:
                wait_until(lambda: device.rx_packets >= FRAMES, 60, f"{FRAMES} frames looped back", pmd)
                pmd.check_alive()
                support.stop_process(pmd.proc)          # SIGTERM: testpmd stops and prints its totals
                log = pmd.log(1 << 20)
            self.assertEqual(pmd.proc.returncode, 0, log)
            pmd_rx, pmd_tx = forward_stats(log)
            # The stalled peer finishes its message: answered, and its fd is the ring's call fd.
            raw.sock.sendall(VringFd(0, False).pack())
            with raw.recv() as reply:
                self.assertEqual((reply.request, reply.is_reply, reply.u64()), (F.SET_VRING_CALL, True, 0))
            self.assertEqual(fired(call, TIMEOUT), 1)
            raw.close()
            wait_until(lambda: not server.backends, TIMEOUT, "both backends to retire")
            self.assertEqual(list(server.errors), [])
        assert_looped_totals(self, device, pmd_rx, pmd_tx)
        report(self, "testpmd beside a stalled peer", f"testpmd RX {pmd_rx} TX {pmd_tx}; ours TX {device.tx_packets} "
               f"RX {device.rx_packets} dropped {device.rx_dropped}")
