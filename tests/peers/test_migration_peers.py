"""A live migration under QEMU 7.2 (TCG) of a Linux guest whose disk is served by our blk back-end:
two qemu-system-x86_64 on this machine, the source on back-end process A, the destination
(``-incoming``) on back-end process B, both on the same image file. The guest writes a pattern
to the disk without pause; QMP ``migrate`` moves it; it carries on on the destination, reads
everything back, and the image holds all of it.

The guest is the harness's image (tests/guest.py) with its own init: the harness's /init mounts
its 9p shares before the script runs, and QEMU 7.2 refuses to migrate while one is mounted
("Migration is disabled when VirtFS export path '...' is mounted in the guest using mount_tag
'vhost_min_src'"; hw/9pfs attaches a migration blocker until the share's root fid is clunked,
and /init's own cwd is on /src). So no 9p devices here: a second cpio archive appended to the
image's initramfs carries /migrate-init (``rdinit=``) and the writer, which reports on the serial
console (one file per QEMU).

The back-ends are instrumented (a counting DirtyLog and request counter, printed as JSON when
they exit): A must have been given the dirty log (SET_LOG_BASE, with VHOST_F_LOG_ALL, which QEMU's
vhost needs along with LOG_SHMFD to allow the migration at all) and marked pages in it.

What this run does not prove: that the marks were needed. With a back-end that marks nothing it
passes too (tried): QEMU marks the used ring dirty itself when it stops vhost, and the pages the
device wrote were copied after it wrote them. tests/unit/test_migration.py checks the log against
the guest pages really changed. A throttled migration (max-bandwidth 32 MiB/s, downtime-limit
50 ms, so the slots would be re-read while pages are re-sent) left the destination guest dead or
hung after the switch, with QEMU's own virtio-blk as well as ours: not pursued here.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
import traceback
import unittest

from tests import guest
from tests.peers import launch
from tests.peers.test_guest_peers import backend_process

BLOCK = 64 << 10            # the guest writes 64 KiB blocks, O_DIRECT
BLOCKS = 256                # 16 MiB, written over and over (about a second a pass under TCG)
WRITE_SECONDS = 8           # of guest time; the migration lands early in it
MIGRATE_AFTER = 40          # blocks written on the source before QMP migrate
GUEST_MEMORY = "256M"
TIMEOUT = 120.0             # bound on the whole guest run (s); it takes about 20-40 s under TCG

#: The back-end A and B run: BlkDevice served once, counting dirty-log bases and marks and requests.
BACKEND = """\
import json
import logging
import signal
import sys

from vhost_min import backend, memory
from vhost_min.blk import BlkDevice

counts = {"log_bases": 0, "log_marks": 0, "requests": 0}


class CountingLog(memory.DirtyLog):
    def __init__(self, view):
        super().__init__(view)
        counts["log_bases"] += 1

    def mark(self, gpa, length):
        super().mark(gpa, length)
        counts["log_marks"] += 1


class CountingBlk(BlkDevice):
    def handle(self, queue, readable, writable):
        counts["requests"] += 1
        return super().handle(queue, readable, writable)


def stop(signum, frame):
    raise SystemExit(128 + signum)


backend.DirtyLog = CountingLog
signal.signal(signal.SIGTERM, stop)
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
try:
    with CountingBlk(sys.argv[1]) as device:
        backend.serve(device, sys.argv[2], once=True)
finally:
    print("counts " + json.dumps(counts), flush=True)
"""

#: /migrate-init: the guest's PID 1 (no 9p, nothing QEMU would refuse to migrate).
INIT = """\
#!/bin/sh
export PATH=/usr/sbin:/usr/bin HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
{insmod}
python3 /migrate-writer.py {blocks} {block} {seconds}
echo "migration-guest: exit status $?"
sync
poweroff -f
echo o >/proc/sysrq-trigger
"""

#: The guest's writer: pass after pass over the blocks (block i of pass p holds pattern(i, p)),
#: written O_DIRECT in order, until WRITE_SECONDS of guest time are up at the end of a pass; then
#: all of them read back. In the first pass each block is also read into a slot of its own that
#: only the device writes, compared at the end (on the destination).
WRITER = """\
import hashlib, mmap, os, sys, time
blocks, size, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
def pattern(i, p):
    return hashlib.sha256(b"vhost_min migration %d %d" % (p, i)).digest() * (size // 32)
for _ in range(100):
    if os.path.exists("/dev/vda"):
        break
    time.sleep(0.1)
fd = os.open("/dev/vda", os.O_RDWR | os.O_DIRECT)
buf = mmap.mmap(-1, size)
slots = memoryview(mmap.mmap(-1, blocks * size))   # only ever written by the device (reads)
end = time.monotonic() + seconds
written = p = 0
while True:
    for i in range(blocks):
        buf[:] = pattern(i, p)
        if os.pwritev(fd, [buf], i * size) != size:
            sys.exit("short write")
        if p == 0 and os.preadv(fd, [slots[i * size:(i + 1) * size]], i * size) != size:
            sys.exit("short read")
        written += 1
        if written % 8 == 0:
            print("wrote", written, flush=True)
    if time.monotonic() >= end:
        break
    p += 1
os.fsync(fd)
bad = [i for i in range(blocks) if os.preadv(fd, [buf], i * size) != size or buf[:] != pattern(i, p)]
print("readback", "ok" if not bad else "bad %s" % bad[:10], flush=True)
stale = [i for i in range(blocks) if slots[i * size:(i + 1) * size] != pattern(i, 0)]
print("slots", "ok" if not stale else "stale %d %s" % (len(stale), stale[:10]), flush=True)
print("last pass", p, flush=True)
print("done", written, flush=True)
"""


def pattern(i: int, p: int) -> bytes:
    """What the guest writes to block ``i`` in pass ``p`` (WRITER's pattern)."""
    return hashlib.sha256(b"vhost_min migration %d %d" % (p, i)).digest() * (BLOCK // 32)


def wait_for(predicate, what: str, timeout: float, *peers: launch.Peer) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        for peer in peers:
            peer.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.1)


class QemuMigrationTest(unittest.TestCase):
    """One migration (setUpClass), looked at from the guest, the image, QEMU and both back-ends."""

    @classmethod
    def setUpClass(cls) -> None:
        guest.require_guest()
        image = guest.ensure_built()
        work = tempfile.TemporaryDirectory(prefix="vhost_min-migration-")
        cls.addClassCleanup(work.cleanup)
        w = work.name
        initrd = os.path.join(w, "initrd.img")
        insmod = "\n".join(f"insmod {path}" for _name, path in image.load_order(["virtio_blk"]))
        with open(image.initrd, "rb") as src, open(initrd, "wb") as out:
            data = src.read()
            out.write(data + bytes(-len(data) % 512))       # a second archive starts 4-byte aligned
            cpio = guest._Cpio(out)
            init = INIT.format(insmod=insmod, blocks=BLOCKS, block=BLOCK, seconds=WRITE_SECONDS)
            cpio.file("migrate-init", init.encode(), 0o755)
            cpio.file("migrate-writer.py", WRITER.encode())
            cpio.close()
        cls.image = os.path.join(w, "disk.img")
        with open(cls.image, "wb") as f:
            f.truncate(BLOCKS * BLOCK + (1 << 20))
        script = os.path.join(w, "backend.py")
        with open(script, "w") as f:
            f.write(BACKEND)
        socks = {name: os.path.join(w, f"{name}.sock") for name in ("a", "b")}
        cls.consoles = {name: os.path.join(w, f"{name}.console") for name in ("source", "destination")}
        incoming = os.path.join(w, "migration.sock")

        def qemu_argv(name: str, sock: str, qmp: str) -> list[str]:
            argv = [guest.QEMU, "-nodefaults", "-no-user-config", "-machine", "q35", "-accel", "tcg",
                    "-cpu", "max", "-smp", "1", "-m", GUEST_MEMORY, "-kernel", image.kernel, "-initrd", initrd,
                    "-append", f"{guest.KERNEL_APPEND} rdinit=/migrate-init",
                    "-display", "none", "-monitor", "none", "-serial", f"file:{cls.consoles[name]}", "-no-reboot",
                    "-object", f"memory-backend-memfd,id=mem,size={GUEST_MEMORY},share=on", "-numa", "node,memdev=mem",
                    "-chardev", f"socket,id=blk0,path={sock}",
                    "-device", "vhost-user-blk-pci,id=blk0,chardev=blk0,num-queues=1",
                    "-qmp", f"unix:{qmp},server=on,wait=off"]
            return argv + (["-incoming", f"unix:{incoming}"] if name == "destination" else [])

        cls.started = time.monotonic()
        with backend_process("backend-a", [sys.executable, script, cls.image, socks["a"]], socks["a"], w) as a, \
                backend_process("backend-b", [sys.executable, script, cls.image, socks["b"]], socks["b"], w) as b:
            qmps = {name: os.path.join(w, f"{name}.qmp") for name in cls.consoles}
            with launch._running("qemu-source", qemu_argv("source", socks["a"], qmps["source"]), w, socks["a"],
                                 ready=(qmps["source"],), qmp_path=qmps["source"]) as source, \
                    launch._running("qemu-destination", qemu_argv("destination", socks["b"], qmps["destination"]),
                                    w, socks["b"], ready=(qmps["destination"],),
                                    qmp_path=qmps["destination"]) as destination:
                try:
                    cls.migrate(source, destination, a, b)
                except Exception as exc:      # noqa: BLE001 (QMP's socket errors too: with every side's story)
                    raise AssertionError(f"{''.join(traceback.format_exception(exc)[-4:])}\n--- source console:\n"
                                         f"{guest.console_tail(guest.read_text(cls.consoles['source']))}"
                                         f"\n--- destination console:\n"
                                         f"{guest.console_tail(guest.read_text(cls.consoles['destination']))}\n--- QEMU:\n"
                                         f"{source.log()}\n{destination.log()}\n--- back-ends:\n{a.log()}\n{b.log()}"
                                         ) from None
            cls.a_exit, cls.b_exit = a.wait_exit(10), b.wait_exit(10)
            cls.a_log, cls.b_log = a.log(1 << 20), b.log(1 << 20)
        cls.source_console = guest.read_text(cls.consoles["source"])
        cls.destination_console = guest.read_text(cls.consoles["destination"])
        with open(cls.image, "rb") as f:
            cls.on_disk = f.read(BLOCKS * BLOCK)

    @classmethod
    def migrate(cls, source: launch.Peer, destination: launch.Peer, a: launch.Peer, b: launch.Peer) -> None:
        def wrote(console: str) -> int:
            lines = [line for line in guest.read_text(cls.consoles[console]).splitlines() if line.startswith("wrote ")]
            return int(lines[-1].split()[1]) if lines else 0

        wait_for(lambda: wrote("source") >= MIGRATE_AFTER, f"the guest writing {MIGRATE_AFTER} blocks", TIMEOUT,
                 source, destination, a, b)
        with source.qmp() as qmp:
            qmp.execute("migrate", uri=f"unix:{os.path.join(os.path.dirname(cls.image), 'migration.sock')}")
            status: dict = {}

            def finished() -> bool:
                status.update(qmp.execute("query-migrate"))
                return status.get("status") in ("completed", "failed", "cancelled")

            wait_for(finished, "the migration", TIMEOUT, source, destination)
            cls.migration = dict(status)
            cls.written_at_switch = wrote("source")
            cls.source_status = qmp.execute("query-status")
            qmp.quit()                                     # the source's work is done
        source.wait_exit(10)
        with destination.qmp() as qmp:
            cls.destination_status = qmp.execute("query-status")
        wait_for(lambda: destination.proc.poll() is not None, "the guest finishing on the destination", TIMEOUT)

    def test_the_migration_completed_and_the_guest_runs_on(self) -> None:
        self.assertEqual(self.migration.get("status"), "completed", self.migration)
        self.assertEqual(self.source_status["status"], "postmigrate")
        self.assertEqual(self.destination_status["status"], "running")
        # the destination's console starts empty: what it shows, the guest did after the switch
        self.assertIn("wrote ", self.destination_console)
        self.assertIn("readback ok", self.destination_console)
        # what the device read into guest memory (pages the guest's CPU never touched) reached
        # the destination
        self.assertIn("slots ok", self.destination_console, self.destination_console[-3000:])
        self.assertIn("migration-guest: exit status 0", self.destination_console)
        finished_on_source = [line for line in self.source_console.splitlines() if line.startswith("done ")]
        self.assertEqual(finished_on_source, [], "the guest finished before the switch")

    def test_every_block_is_in_the_image(self) -> None:
        last = [line for line in self.destination_console.splitlines() if line.startswith("last pass ")]
        self.assertTrue(last, self.destination_console[-2000:])
        p = int(last[-1].split()[2])
        self.assertGreater(p, 0)
        bad = [i for i in range(BLOCKS) if self.on_disk[i * BLOCK:(i + 1) * BLOCK] != pattern(i, p)]
        self.assertEqual(bad, [], f"{len(bad)} of {BLOCKS} blocks are not what the guest wrote")

    def counts(self, log: str) -> dict:
        line = [line for line in log.splitlines() if line.startswith("counts ")]
        self.assertTrue(line, log[-2000:])
        return json.loads(line[-1][len("counts "):])

    def test_the_source_backend_kept_the_dirty_log(self) -> None:
        a = self.counts(self.a_log)
        self.assertGreaterEqual(a["log_bases"], 1, self.a_log[-2000:])
        self.assertGreater(a["log_marks"], 0, self.a_log[-2000:])
        self.assertGreater(a["requests"], MIGRATE_AFTER)

    def test_the_destination_backend_served_the_rest(self) -> None:
        b = self.counts(self.b_log)
        self.assertGreater(b["requests"], 0)
        self.assertEqual(b["log_bases"], 0)               # nobody migrates away from B

    def test_the_backends_ran_cleanly(self) -> None:
        for exit_status, log in ((self.a_exit, self.a_log), (self.b_exit, self.b_log)):
            self.assertEqual(exit_status, 0, log[-3000:])
            for level in (" ERROR ", "Traceback"):
                self.assertNotIn(level, log)
