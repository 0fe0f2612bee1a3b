"""bench/net.py without DPDK: it is listed by ``python3 -m bench``, and its generator back-end
(the reverse direction's "ours") fills every RX buffer a driver offers with its 64-byte frame
behind a virtio-net header, as our front-end sees it. The bench itself needs dpdk-testpmd."""

from __future__ import annotations

import contextlib
import io
import unittest

from bench import __main__ as bench_main
from bench import net
from tests.unit.test_net import V1, MRG, NetTestCase
from vhost_min.net import VIRTIO_NET_HDR_MRG_RXBUF


class BenchNetTest(NetTestCase):
    def test_listed_by_python_m_bench(self) -> None:
        self.assertIn("net", bench_main.BENCHMARKS)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(bench_main.main([]), 2)
        self.assertRegex(out.getvalue(), r"\n  net +64-byte frames")

    def test_source_fills_every_rx_buffer(self) -> None:
        device = self.serve(net.source_device())
        fe = self.connect(V1 | MRG)
        addrs = self.post_rx(fe, [128] * 40)
        used = self.received(fe, 40)
        self.assertEqual(sorted(a for a, _ in used), sorted(addrs))
        for addr, n in used:
            self.assertEqual(n, 12 + net.FRAME)
            self.assertEqual(fe.memory.read(addr, n), VIRTIO_NET_HDR_MRG_RXBUF.pack(0, 0, 0, 0, 0, 0, 1)
                             + net.SOURCE_FRAME)
        self.assertEqual(device.rx_packets, 40)
        self.assertEqual(len(net.SOURCE_FRAME), net.FRAME)


if __name__ == "__main__":
    unittest.main()
