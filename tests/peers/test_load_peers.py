"""Load and isolation with real peers (issue 10).

SixteenDisksGuestTest: one back-end process serves 16 vhost-user-blk-pci disks of 4 queues to a QEMU
7.2 guest with 4 CPUs; 64 pinned writers use all 64 queues at once; every image checked on the host.

SlowDiskTest: one back-end process serves a disk whose I/O blocks and a fast disk; the fast one
must keep completing requests while a request of the slow one is stuck in the kernel.

The slow disk is a file on a FUSE file system of our own (SLOW_FS, a stdlib-only server in its own
process, mounted with mount(2) on /dev/fuse: needs root): its reads at or past HOLD_FROM are held
until the test releases them, so "one slow request outstanding" lasts exactly as long as the test
says, not a timer. The back-end (BACKEND, vhost_min's Server with two BlkDevices on two sockets) runs
each ``aio`` engine in turn; our front-end keeps the fast disk busy while the slow read is held:

- threads: the slow read waits in a worker thread, the loop goes on: the fast disk completes
  FAST_REQUESTS requests while the slow one is outstanding, then the test releases it.
- sync: the read runs in the loop thread, so the whole back-end (every device and connection)
  waits for it: zero fast completions while it is held. Expected, and the reason the engines exist.
- io_uring: as threads. This test found that on a FUSE file with direct I/O (FOPEN_DIRECT_IO, as
  here) io_uring_enter issues the read inline and blocks in it (Linux 6.18: io_uring_enter ->
  __io_read -> fuse_direct_IO -> request_wait_answer), which stalled the loop exactly as sync does;
  BlkDevice now submits with IOSQE_ASYNC on FUSE (blk._INLINE_BLOCKING_FS), so the kernel's io-wq
  workers wait instead. A block device or local file system returns -EAGAIN and goes async anyway.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time
import unittest

from tests import support
from tests.peers.test_guest_peers import backend_process
from vhost_min.aio import io_uring_available
from vhost_min.blk import BlkClient, BlkRequest
from vhost_min.frontend import Frontend

TIMEOUT = 10.0
MiB = 1 << 20
SLOW_SIZE = 16 * MiB
HOLD_FROM = 8 * MiB
#: Fast requests to see complete while the slow one is held (threads engine) before releasing it.
FAST_REQUESTS = 1000
#: How long the test waits for fast completions where the loop is expected to be stalled.
STALL_WINDOW = 2.0

SLOW_FS = r'''"""A one-file FUSE file system serving a RAM disk image whose reads at or past HOLD_FROM are held
until a line arrives on stdin. Prints "mounted" then "held OFFSET" for each held read."""
import ctypes, errno, os, stat, struct, sys, threading
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
FUSE_IN_HEADER = struct.Struct("<IIQQIIIHH")
FUSE_OUT_HEADER = struct.Struct("<IiQ")
FUSE_ATTR_OUT = struct.Struct("<QII" + "QQQQQQIIIIIIIIII")
FUSE_INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")
FUSE_GETATTR, FUSE_OPEN, FUSE_READ, FUSE_WRITE, FUSE_RELEASE, FUSE_FSYNC, FUSE_FLUSH, FUSE_INIT = 3, 14, 15, 16, 18, 20, 25, 26
FUSE_FORGET, FUSE_STATFS, FUSE_INTERRUPT, FUSE_BATCH_FORGET = 2, 17, 36, 42
FOPEN_DIRECT_IO = 1
mountpoint, size, hold_from, direct = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
data = bytearray(size)
fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
opts = f"fd={fd},rootmode={stat.S_IFREG:o},user_id=0,group_id=0,allow_other".encode()
if libc.mount(b"vhost_min_slow", mountpoint.encode(), b"fuse", 6, opts):  # MS_NOSUID | MS_NODEV
    sys.exit(f"mount: {os.strerror(ctypes.get_errno())}")
release = threading.Condition()
generation = [0]
def reply(unique, err=0, body=b""):
    try:
        os.write(fd, FUSE_OUT_HEADER.pack(16 + len(body), -err, unique) + body)
    except OSError:
        pass
def held(unique, off, n):
    with release:
        mine = generation[0]
        print(f"held {off}", flush=True)
        release.wait_for(lambda: generation[0] != mine)
    reply(unique, 0, bytes(data[off:off + n]))
def stdin():
    for _ in sys.stdin:
        with release:
            generation[0] += 1
            release.notify_all()
threading.Thread(target=stdin, daemon=True).start()
print("mounted", flush=True)
while True:
    try:
        req = os.read(fd, (1 << 20) + 8192)
    except OSError as exc:
        if exc.errno in (errno.EINTR, errno.ENOENT):
            continue
        break                                   # ENODEV: unmounted
    _, op, unique, _node = FUSE_IN_HEADER.unpack_from(req)[:4]
    body = memoryview(req)[40:]
    if op == FUSE_INIT:
        reply(unique, 0, FUSE_INIT_OUT.pack(7, 31, 0, 0, 16, 12, 1 << 20, 1, 256, 0, 0))
    elif op == FUSE_GETATTR:
        reply(unique, 0, FUSE_ATTR_OUT.pack(0, 0, 0, 1, size, size // 512, 0, 0, 0, 0, 0, 0,
                                           stat.S_IFREG | 0o600, 1, 0, 0, 0, 4096, 0))
    elif op == FUSE_OPEN:
        reply(unique, 0, struct.pack("<QII", 1, FOPEN_DIRECT_IO if direct else 0, 0))
    elif op == FUSE_READ:
        _fh, off, n = struct.unpack_from("<QQI", body)
        if off >= hold_from:
            threading.Thread(target=held, args=(unique, off, n), daemon=True).start()
        else:
            reply(unique, 0, bytes(data[off:off + n]))
    elif op == FUSE_WRITE:
        _fh, off, n = struct.unpack_from("<QQI", body)
        data[off:off + n] = body[40:40 + n]
        reply(unique, 0, struct.pack("<II", n, 0))
    elif op == FUSE_STATFS:                     # what libfuse answers for a file system without statfs
        reply(unique, 0, struct.pack("<5Q4I24x", 0, 0, 0, 0, 0, 512, 255, 0, 0))
    elif op in (FUSE_FLUSH, FUSE_RELEASE, FUSE_FSYNC):
        reply(unique)
    elif op not in (FUSE_FORGET, FUSE_BATCH_FORGET, FUSE_INTERRUPT):
        reply(unique, errno.ENOSYS)
'''

#: Two BlkDevices, one Server, one process: argv is AIO SLOW_IMAGE SLOW_SOCK FAST_IMAGE FAST_SOCK.
BACKEND = """\
import logging, signal, sys
from vhost_min.backend import Server
from vhost_min.blk import BlkDevice

signal.signal(signal.SIGTERM, lambda signum, frame: server.stop())
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
aio, slow_image, slow_sock, fast_image, fast_sock = sys.argv[1:]
with Server() as server, BlkDevice(slow_image, aio=aio) as slow, BlkDevice(fast_image, aio=aio) as fast:
    server.add(slow, slow_sock)
    server.add(fast, fast_sock)
    print("engines", slow.aio, fast.aio, flush=True)
    server.run()
"""


def _line(proc: subprocess.Popen, timeout: float) -> str | None:
    """The next line of ``proc``'s stdout, or None if none comes within ``timeout``."""
    if not select.select([proc.stdout], [], [], timeout)[0]:
        return None
    return proc.stdout.readline().strip()


class SlowDiskTest(unittest.TestCase):
    """One back-end, a disk whose read blocks and a fast disk, under each --aio engine."""

    @classmethod
    def setUpClass(cls) -> None:
        support.require_root("mounting a FUSE file system")
        support.require(os.path.exists("/dev/fuse"), "/dev/fuse (the fuse kernel module)", "modprobe fuse")

    def stall(self, aio: str) -> tuple[int, int, str]:
        """(fast completions while the slow read was held, after release, the engine used)."""
        work = tempfile.mkdtemp(prefix="vhost_min-slow-")
        self.addCleanup(os.rmdir, work)
        mountpoint = os.path.join(work, "slow.img")
        open(mountpoint, "wb").close()
        self.addCleanup(os.unlink, mountpoint)
        fast_image = os.path.join(work, "fast.img")
        with open(fast_image, "wb") as f:
            f.write(os.urandom(MiB))
        self.addCleanup(os.unlink, fast_image)
        fs = subprocess.Popen([sys.executable, "-c", SLOW_FS, mountpoint, str(SLOW_SIZE), str(HOLD_FROM), "1"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        # Stopping the server closes /dev/fuse: the kernel aborts the connection and fails anything
        # still held (ENOTCONN), so a failing test cannot leave the back-end stuck; then unmount.
        self.addCleanup(subprocess.run, ["umount", "-l", mountpoint], capture_output=True)
        self.addCleanup(support.stop_process, fs)
        self.assertEqual(_line(fs, TIMEOUT), "mounted")
        script = os.path.join(work, "backend.py")
        with open(script, "w") as f:
            f.write(BACKEND)
        self.addCleanup(os.unlink, script)
        slow_sock, fast_sock = os.path.join(work, "slow.sock"), os.path.join(work, "fast.sock")
        with backend_process("two-disks", [sys.executable, script, aio, mountpoint, slow_sock, fast_image,
                                           fast_sock], fast_sock, work) as peer, \
                Frontend.connect(slow_sock, timeout=TIMEOUT) as slow_fe, \
                Frontend.connect(fast_sock, timeout=TIMEOUT) as fast_fe:
            self.addCleanup(os.unlink, peer.log_path)
            slow = BlkClient(slow_fe, queue_size=16, depth=1, max_io=4096, timeout=TIMEOUT)
            fast = BlkClient(fast_fe, queue_size=64, depth=16, max_io=4096, timeout=TIMEOUT)
            with open(fast_image, "rb") as f:
                expect = f.read()
            self.assertEqual(fast.read(0, 4096), expect[:4096])
            slow.submit([BlkRequest.read(HOLD_FROM, 4096, tag="slow")])
            held = _line(fs, TIMEOUT)
            self.assertEqual(held, f"held {HOLD_FROM}", peer.log())
            during = after = 0
            released = False
            deadline = time.monotonic() + (STALL_WINDOW if aio == "sync" else TIMEOUT)
            slow_done = []
            n = 0
            while not slow_done:
                if not released and (during >= FAST_REQUESTS or time.monotonic() > deadline):
                    fs.stdin.write("release\n")
                    fs.stdin.flush()
                    released = True
                while fast.free_slots:
                    offset = (n * 7919 % 256) * 4096
                    fast.submit([BlkRequest.read(offset, 4096, tag=offset)])
                    n += 1
                got = fast.complete(0)
                # Looked at after the fast completions: the back-end posts a sync read's completion
                # before it serves any other ring, so one seen here was not held up by the slow one.
                slow_done = slow.complete(0)
                for c in got:
                    self.assertEqual(c.status, 0)
                    self.assertTrue(bytes(c.data) == expect[c.tag:c.tag + 4096])
                if released:
                    after += len(got)
                else:
                    during += len(got)
                if not got and not slow_done:
                    fast_fe.wait_call(0, 0.01)
                if time.monotonic() > deadline + TIMEOUT:
                    self.fail(f"the slow read did not complete after its release; back-end:\n{peer.log()}")
            self.assertEqual(slow_done[0].status, 0)
            self.assertEqual(bytes(slow_done[0].data), bytes(4096))
            fast.complete(fast.in_flight)
            engines = next((line for line in peer.log().splitlines() if line.startswith("engines ")), "")
            peer.check_alive()
        print(f"\n[{self.id()}] aio={aio}: {during} fast requests completed while one slow read was held, "
              f"{after} after its release ({engines})", flush=True)
        return during, after, engines

    def test_threads_keep_the_fast_disk_going(self) -> None:
        during, _after, engines = self.stall("threads")
        self.assertEqual(engines, "engines threads threads")
        self.assertGreaterEqual(during, FAST_REQUESTS)

    def test_sync_stalls_every_device(self) -> None:
        during, after, _engines = self.stall("sync")
        self.assertEqual(during, 0)
        self.assertGreater(after, 0)

    def test_io_uring_keeps_the_fast_disk_going(self) -> None:
        """Also on a FUSE file, where io_uring_enter would block inline without IOSQE_ASYNC."""
        if not io_uring_available()[0]:
            self.skipTest(f"io_uring refused here: {io_uring_available()[1]}")
        during, _after, engines = self.stall("io_uring")
        self.assertEqual(engines, "engines io_uring io_uring")
        self.assertGreaterEqual(during, FAST_REQUESTS)


# --------------------------------------------------------------------------------------------
# 16 vhost-user-blk-pci disks of 4 queues each, one back-end process, a QEMU 7.2 guest with 4 CPUs
# --------------------------------------------------------------------------------------------

DISKS, DISK_QUEUES, GUEST_CPUS = 16, 4, 4
#: Disk d is (16 + d) MiB, so the guest tells them apart by size; each CPU writes its own 256 KiB.
PIECE = 256 << 10

#: In the guest: per disk and CPU a process pinned to that CPU (blk-mq then uses that CPU's queue)
#: writes its piece with O_DIRECT; all 64 at once. Then each reads its piece back and compares.
GUEST_WRITERS = f"""#!/usr/bin/python3
import mmap, os, sys
disks = {{}}
for name in os.listdir("/sys/block"):
    if name.startswith("vd"):
        disks[int(open(f"/sys/block/{{name}}/size").read()) // 2048 - 16] = "/dev/" + name
print("disks=" + str(len(disks)), flush=True)
children = []
for d, dev in sorted(disks.items()):
    for cpu in range({GUEST_CPUS}):
        pid = os.fork()
        if pid == 0:
            try:
                os.sched_setaffinity(0, {{cpu}})
                buf = mmap.mmap(-1, {PIECE})
                with open(f"/mnt/load/d{{d}}", "rb") as f:
                    f.seek(cpu * {PIECE}); buf.write(f.read({PIECE}))
                fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
                wrote = os.pwritev(fd, [buf], cpu * {PIECE}); os.fsync(fd)
                back = mmap.mmap(-1, {PIECE})
                got = os.preadv(fd, [back], cpu * {PIECE})
                if back[:] != buf[:]:
                    first = next(i for i in range({PIECE}) if back[i] != buf[i])
                    print(f"mismatch disk {{d}} cpu {{cpu}}: wrote {{wrote}} read {{got}}, first differing byte {{first}}",
                          flush=True)
                    os._exit(1)
                os._exit(0)
            except BaseException as exc:
                print(f"writer disk {{d}} cpu {{cpu}} failed: {{exc!r}}", flush=True)
                os._exit(2)
        children.append(pid)
bad = sum(os.waitpid(pid, 0)[1] != 0 for pid in children)
print(f"writers={{len(children)}}", flush=True)
print(f"bad={{bad}}", flush=True)
# each request queue has its own MSI-X vector (virtioN-req.Q): those that interrupted carried requests
used = [line.split()[-1] for line in open("/proc/interrupts")
        if "-req." in line and sum(int(n) for n in line.split()[1:1 + {GUEST_CPUS}]) > 0]
print(f"queues_used={{len(used)}}", flush=True)
"""


class SixteenDisksGuestTest(unittest.TestCase):
    """One back-end process (bench.load.BACKEND: a Server with 16 BlkDevices of 4 queues on 16
    sockets) behind 16 ``vhost-user-blk-pci,num-queues=4`` of a QEMU 7.2 guest with 4 CPUs: 64
    writers pinned across the CPUs write a distinct pattern to every disk at once and read it back;
    the host finds every pattern in its image."""

    def test_every_disk_holds_what_its_writers_wrote(self) -> None:
        from bench.load import BACKEND as MULTI_BACKEND
        from tests import guest
        guest.require_guest()
        work = tempfile.mkdtemp(prefix="vhost_min-16disks-")
        self.addCleanup(subprocess.run, ["rm", "-rf", work])
        data = os.path.join(work, "load")
        os.mkdir(data)
        rng = support.seeded_random(self)
        patterns, argv, qemu = [], [], []
        for d in range(DISKS):
            pattern = rng.randbytes(GUEST_CPUS * PIECE)
            patterns.append(pattern)
            with open(os.path.join(data, f"d{d}"), "wb") as f:
                f.write(pattern)
            image, sock = os.path.join(work, f"disk{d}.img"), os.path.join(work, f"blk{d}.sock")
            with open(image, "wb") as f:
                f.truncate((16 + d) * MiB)
            argv += [image, sock, str(DISK_QUEUES)]
            qemu += ["-chardev", f"socket,id=blk{d},path={sock}",
                     "-device", f"vhost-user-blk-pci,id=blk{d},chardev=blk{d},num-queues={DISK_QUEUES}"]
        with backend_process("sixteen-disks", [sys.executable, "-c", MULTI_BACKEND, *argv],
                             os.path.join(work, f"blk{DISKS - 1}.sock"), work) as peer:
            with guest.Guest(qemu, memfd_memory=True, smp=GUEST_CPUS, modules=["virtio_blk"],
                             shares={"load": data}, boot_timeout=60) as vm:
                vm.start(GUEST_WRITERS, timeout=90)
                try:
                    result = vm.wait()
                except guest.GuestError as exc:
                    raise AssertionError(f"{exc}\n--- back-end:\n{peer.log()}") from None
            log = peer.log()
            peer.check_alive()
        facts = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
        print(f"\n[{self.id()}] guest: {facts}; run {result.seconds:.1f} s", flush=True)
        self.assertEqual(result.status, 0, f"{result.output}\n--- back-end:\n{log}")
        self.assertEqual(facts.get("disks"), str(DISKS), result.output)
        self.assertEqual(facts.get("writers"), str(DISKS * GUEST_CPUS))
        self.assertEqual(facts.get("bad"), "0", f"{result.output}\n--- back-end:\n{log}")
        self.assertEqual(facts.get("queues_used"), str(DISKS * DISK_QUEUES), result.output)
        for d, pattern in enumerate(patterns):
            with open(os.path.join(work, f"disk{d}.img"), "rb") as f:
                self.assertTrue(f.read(len(pattern)) == pattern, f"disk {d}")
        self.assertNotIn("Traceback", log)


if __name__ == "__main__":
    unittest.main()
