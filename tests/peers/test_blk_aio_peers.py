"""Our blk back-end with O_DIRECT and io_uring (``vhost-min blk --cache none --aio io_uring``; the
thread pool it falls back to where io_uring is refused)
against images a real peer wrote, and the other way round: what qemu-storage-daemon wrote
(through its own vhost-user-blk export, cache.direct=on,aio=io_uring) our back-end reads back
byte for byte; what our back-end wrote, qemu-img finds in the image (qemu-img compare).

The image lives on a real disk (/var/tmp), not tmpfs: O_DIRECT is the point.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import unittest

from tests import support
from tests.peers import launch
from vhost_min.aio import io_uring_available
from vhost_min.blk import BlkClient, BlkRequest
from vhost_min.frontend import Frontend

TIMEOUT = 10.0
MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class DirectIoUringTest(unittest.TestCase):
    IMAGE_SIZE = 16 * MiB

    def setUp(self):
        support.require_commands(launch.QEMU_STORAGE_DAEMON, "qemu-img")
        # Where io_uring is refused (Docker's default seccomp profile, kernel.io_uring_disabled) the
        # command says so once and runs the thread pool: the same bytes must come back.
        self.aio = "io_uring" if io_uring_available()[0] else "threads"
        self.rng = support.seeded_random(self)
        self.tmp = tempfile.mkdtemp(prefix="vhost_min-aio-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.image = os.path.join(self.tmp, "disk.img")
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", self.image, str(self.IMAGE_SIZE)], check=True,
                       timeout=60)

    def ours(self, *args: str) -> subprocess.Popen:
        sock = os.path.join(self.tmp, "ours.sock")
        proc = subprocess.Popen([sys.executable, "-m", "vhost_min", "blk", "--cache", "none", "--aio", "io_uring",
                                 *args, "--socket-path", sock, self.image], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        self.addCleanup(support.stop_process, proc)
        line = proc.stdout.readline()
        self.assertIn(f"cache none, aio {self.aio}, O_DIRECT alignment", line, proc.stderr.read() if not line else line)
        proc.socket = sock
        return proc

    def test_qsd_writes_ours_reads_back_ours_writes_qemu_img_compares(self):
        # qemu-storage-daemon writes scattered 4 KiB .. 256 KiB pieces through its own export
        pieces = [(self.rng.randrange(0, self.IMAGE_SIZE // 4096 - 64) * 4096, self.rng.choice((1, 3, 16, 64)) * 4096)
                  for _ in range(24)]
        expect = bytearray(self.IMAGE_SIZE)
        with launch.storage_daemon(self.image) as qsd, Frontend.connect(qsd.socket, timeout=TIMEOUT) as fe:
            client = BlkClient(fe, max_io=256 << 10, timeout=TIMEOUT)
            for offset, length in pieces:
                data = self.rng.randbytes(length)
                client.write(offset, data)
                expect[offset:offset + length] = data
            client.flush()
        # ours, O_DIRECT through io_uring, reads them back: one at a time and 32 in flight
        proc = self.ours()
        with Frontend.connect(proc.socket, timeout=TIMEOUT) as fe:
            client = BlkClient(fe, max_io=256 << 10, depth=32, indirect=True, queue_size=128, timeout=TIMEOUT)
            for offset, length in pieces:
                self.assertEqual(client.read(offset, length), bytes(expect[offset:offset + length]))
            requests = [BlkRequest.read(at, 64 << 10, tag=at) for at in range(0, self.IMAGE_SIZE, 64 << 10)]
            got = {}
            while requests or client.in_flight:
                requests = requests[client.submit(requests):]
                for c in client.complete():
                    self.assertEqual(c.status, 0)
                    got[c.tag] = bytes(c.data)
            self.assertEqual(b"".join(got[at] for at in sorted(got)), bytes(expect))
            # and writes through ours land where qemu-img sees them
            for offset in range(0, self.IMAGE_SIZE, 1 * MiB):
                data = self.rng.randbytes(8192)
                client.write(offset + 4096, data)
                expect[offset + 4096:offset + 4096 + 8192] = data
            client.flush()
        support.stop_process(proc)
        reference = os.path.join(self.tmp, "expected.img")
        with open(reference, "wb") as f:
            f.write(expect)
        result = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", self.image, reference],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


if __name__ == "__main__":
    unittest.main()
