"""Crash campaign: kill -9 a vhost-user-blk back-end again and again under sustained writes,
restart it 0.1 s later on the same socket and image, and count what was lost.

Two front-ends:

- ``qemu``: a QEMU 7.2 guest (tests/guest.py, TCG; ``-chardev socket,...,reconnect=1``, and
  ``packed=on`` on the device for a packed ring). :func:`guest_writer`, run in the guest from
  this checkout, writes 1 MiB blocks with O_DIRECT from 4 threads (each thread its own blocks,
  one write at a time per block), each block carrying its number, a generation and a checksum,
  and logs every completed write to a 9p share the host tails. QEMU hands our back-end's
  inflight region (INFLIGHT_SHMFD) back to each new process; the host reads that region out of
  QEMU's memfd right after each kill to count the requests it held.
- ``ours``: vhost_min.frontend.Frontend with a BlkClient in this process (the inflight region
  set up before the ring, ``reconnect()`` after each kill), 16 writes of 128 KiB in flight. Right
  after each kill the region is reconciled against the ring (a copy: the back-end does the real
  one) and the order it would resubmit in is checked against the order the writes were submitted.

The back-end process is ``python3 -m vhost_min blk -v`` with O_DIRECT through io_uring (so
requests stay in flight for a disk's time and complete out of order; the defaults where the file
system refuses O_DIRECT), or, with ``--yardstick qsd``, qemu-storage-daemon (no inflight
tracking; split rings, the ``qemu`` front-end). Each kill comes a seeded random 0.3-1.5 s after the
writes resumed; half of them then wait (up to 3 s) for the inflight region, read live out of the
front-end's memfd, to hold a request in flight. A hang is no completed write for HANG_SECONDS
after a restart: under QEMU the guest is killed and booted again and the campaign goes on (both
counted); under our front-end the campaign ends. At the end every block's last completed
generation must be what the image holds (lost bytes: those that differ; a write in flight when a
hung guest was killed may have landed or not), and the writer must have finished without error.

``python3 -m bench crash [--kills N] [--ring split|packed|both] [--frontend qemu|ours]
[--yardstick qsd] [--seed S] [--json]``: N kills per ring type (default 200).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import mmap
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable

from vhost_min.blk import BLK_DRIVER_FEATURES, VIRTIO_BLK_OUTHDR, BlkClient, BlkRequest
from vhost_min.errors import DisconnectedError, VhostError
from vhost_min.inflight import InflightPacked, InflightSplit, QueueRegionSplit
from vhost_min.virtio import VirtioFeature

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20
#: The guest's blocks: 1 MiB each, 32 of them, written by WRITER_THREADS threads.
GUEST_BLOCK, GUEST_BLOCKS, WRITER_THREADS = MiB, 32, 4
#: Our front-end's blocks: 128 KiB (BlkClient's max_io), 128 of them, OURS_DEPTH in flight.
OURS_BLOCK, OURS_BLOCKS, OURS_DEPTH, OURS_QUEUE_SIZE = 128 << 10, 128, 16, 128
#: No completed write this long after a restart is a hang (QEMU reconnects once a second, and
#: a TCG guest is slow, so this is generous).
HANG_SECONDS = 45.0
#: Pause between the writes resuming and the next kill: uniform in this range (seconds).
KILL_PAUSE = (0.3, 1.5)
#: Between a kill and the restart.
RESTART_DELAY = 0.1
#: Share of the kills aimed at a moment a request is in flight: after the pause, the inflight
#: region (read live out of the front-end's memfd) is polled until it holds one, for at most
#: AIM_SECONDS. The others land wherever the pause ends.
AIMED, AIM_SECONDS = 0.5, 3.0
#: The block header: magic, block number, generation; a CRC-32 of everything else in the block
#: is its last 4 bytes. The body is a seeded random pattern rotated by an amount the (block,
#: generation) pair gives: cheap to make in a TCG guest, which must not spend its time on it.
MAGIC = b"VMCRASH1"
HEADER = struct.Struct("<8sQQ")
CHECKSUM = struct.Struct("<I")
#: QEMU's vhost-user-blk queue-size (its default); the inflight region's desc_num says it too.
QEMU_QUEUE_SIZE = 128
INFLIGHT_MEMFD = "/memfd:vhost-inflight"
CAVEAT = ("TCG guest and a shared 2-core host: kill moments and rates are not reproducible to the "
          "request; the counts (lost bytes, hangs) are what matters")


# --------------------------------------------------------------------------------------------
# The block format (guest and host)
# --------------------------------------------------------------------------------------------

_PATTERN: list[bytes] = []


def _pattern() -> bytes:
    if not _PATTERN:
        _PATTERN.append(random.Random(0x5EED).randbytes(2 * GUEST_BLOCK))
    return _PATTERN[0]


def block_content(block: int, generation: int, size: int) -> bytes:
    """What the writer puts in ``block`` at ``generation``: header, the pattern rotated by an
    amount unique to the pair (mostly), then the CRC-32 of all that."""
    head = HEADER.pack(MAGIC, block, generation)
    pattern = _pattern()
    shift = (block * 7919 + generation * 104729) % GUEST_BLOCK
    body = head + pattern[shift:shift + size - len(head) - CHECKSUM.size]
    return body + CHECKSUM.pack(zlib.crc32(body))


def block_identity(data: bytes) -> tuple[int, int] | None:
    """(block, generation) of a well-formed block (checksum right), else None (torn, zero, foreign)."""
    if (len(data) < HEADER.size + CHECKSUM.size or data[:8] != MAGIC
            or CHECKSUM.unpack_from(data, len(data) - CHECKSUM.size)[0] != zlib.crc32(data[:-CHECKSUM.size])):
        return None
    _magic, block, generation = HEADER.unpack_from(data)
    return block, generation


def guest_writer(device: str, log_path: str, stop_path: str, threads: int = WRITER_THREADS,
                 block: int = GUEST_BLOCK, limit: float = 1800.0, first_generation: int = 1) -> int:
    """In the guest: write blocks of ``device`` with O_DIRECT from ``threads`` threads until
    ``stop_path`` exists (or ``limit`` seconds), logging ``W block generation`` per completed write
    to ``log_path``; ``E ...`` and a non-zero exit on any error. Thread t owns blocks t, t+threads, ...
    Generations count from ``first_generation`` (each boot of a campaign starts above the last)."""
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    blocks = os.lseek(fd, 0, os.SEEK_END) // block
    lock = threading.Lock()
    log = open(log_path, "a", buffering=1)
    errors: list[str] = []
    deadline = time.monotonic() + limit

    def note(line: str) -> None:
        with lock:
            log.write(line + "\n")

    def run(t: int) -> None:
        buf = mmap.mmap(-1, block)                   # page-aligned, as O_DIRECT needs
        mine = list(range(t, blocks, threads))
        generation = first_generation - 1
        try:
            while not errors:
                generation += 1
                for b in mine:
                    if os.path.exists(stop_path) or time.monotonic() > deadline:
                        return
                    buf[:] = block_content(b, generation, block)
                    if os.pwrite(fd, buf, b * block) != block:
                        raise OSError(errno.EIO, "short write")
                    note(f"W {b} {generation}")
        except OSError as exc:
            errors.append(f"E {t} {exc}")
            note(errors[-1])

    note(f"S {blocks} {threads}")
    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    os.close(fd)
    note(f"END {'error' if errors else 'ok'}")
    log.close()
    return 1 if errors else 0


def lost_bytes(image: str, expected: dict[int, int], block: int, blocks: int) -> tuple[int, list[str]]:
    """Compare the image with each block's last completed generation (absent: never written,
    zeros expected). Returns the bytes that differ and a line per bad block."""
    lost, bad = 0, []
    with open(image, "rb") as f:
        for b in range(blocks):
            data = os.pread(f.fileno(), block, b * block)
            generation = expected.get(b, 0)
            want = block_content(b, generation, block) if generation else bytes(block)
            if data != want:
                differ = sum(x != y for x, y in zip(data, want)) if len(data) == block else block
                lost += differ
                bad.append(f"block {b}: want generation {generation}, image holds "
                           f"{block_identity(data) or 'no well-formed block'} ({differ} bytes differ)")
    return lost, bad


# --------------------------------------------------------------------------------------------
# The back-end process, killed and restarted
# --------------------------------------------------------------------------------------------

def io_arguments(image: str) -> tuple[str, ...]:
    """Our back-end's I/O options for the campaigns: O_DIRECT through io_uring (the thread pool
    where io_uring is refused), so requests stay in flight for a disk's time and complete out of
    order; the defaults (writeback, in the loop) where the file system refuses O_DIRECT."""
    from tests.peers.test_guest_peers import direct_io_works
    from vhost_min.aio import io_uring_available
    if not direct_io_works(image):
        return ()
    return ("--cache", "none", "--aio", "io_uring" if io_uring_available()[0] else "threads")


class BackendProcess:
    """The blk back-end as a child process on ``socket_path`` (ours, or qemu-storage-daemon),
    started again after each :meth:`kill`; every start's output is appended to ``log_path``."""

    def __init__(self, kind: str, image: str, socket_path: str, log_path: str, extra: tuple[str, ...] = ()) -> None:
        from tests.peers import launch
        self.kind, self.image, self.socket_path, self.log_path = kind, image, socket_path, log_path
        if kind == "ours":
            self.argv = [sys.executable, "-m", "vhost_min", "blk", "-v", "--socket-path", socket_path, *extra, image]
        elif kind == "qsd":
            self.argv = [launch.QEMU_STORAGE_DAEMON,
                         "--blockdev", f"driver=file,node-name=file0,filename={image.replace(',', ',,')}",
                         "--export", (f"type=vhost-user-blk,id=export0,node-name=file0,addr.type=unix,"
                                      f"addr.path={socket_path.replace(',', ',,')},writable=on,num-queues=1")]
        else:
            raise ValueError(f"unknown back-end {kind!r}")
        self._preexec = launch._die_with_parent
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH")))))
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 20.0) -> None:
        """Start the back-end and wait until it listens (a stale socket file is its to remove:
        ours does; qemu-storage-daemon refuses one, so it is removed here)."""
        if self.kind == "qsd":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts + 1} at {time.time():.3f}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, preexec_fn=self._preexec)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not self._listening():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {self.kind} back-end exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {self.kind} back-end did not listen within {timeout} s:\n{self.log()[-3000:]}")
            time.sleep(0.02)

    def _listening(self) -> bool:
        import socket
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.socket_path)
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self) -> None:
        from tests import support
        if self.proc is not None:
            support.stop_process(self.proc)
            self.proc = None

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def resubmitted(self) -> int:
        """Requests our back-ends resubmitted from the inflight region, over every start (their log)."""
        return sum(int(n) for n in re.findall(r"resubmitting (\d+) request", self.log()))

    def stale_cleared(self) -> int:
        """Used descriptors of unpublished packed batches our back-ends cleared (clear_stale_used)."""
        return sum(int(n) for n in re.findall(r"cleared (\d+) used descriptor", self.log()))


def inflight_region_of(pid: int) -> bytes | None:
    """The bytes of the inflight region process ``pid`` holds (QEMU keeps the memfd our back-end
    made, for the next SET_INFLIGHT_FD), or None when it holds none."""
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            if os.readlink(f"{base}/{name}").startswith(INFLIGHT_MEMFD):
                with open(f"{base}/{name}", "rb") as f:
                    return f.read()
        except OSError:
            continue
    return None


def aim(pid: int, packed: bool, timeout: float = AIM_SECONDS) -> None:
    """Return as soon as the inflight region process ``pid`` holds records a request in flight
    (or after ``timeout``): the moment for an aimed kill. A torn read of the live region counts
    as none."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if in_flight_in(inflight_region_of(pid), packed):
                return
        except (VhostError, OSError):
            pass
        time.sleep(0.0005)


def in_flight_in(region: bytes | None, packed: bool) -> int:
    """Requests an inflight region (one queue) records as in flight, as a back-end would resubmit
    them (a batch being published at the moment counts as in flight)."""
    if not region:
        return 0
    desc_num = struct.unpack_from("<H", region, QueueRegionSplit.desc_num.offset)[0]
    if not desc_num:
        return 0
    tracker = (InflightPacked if packed else InflightSplit)(bytearray(region), desc_num)
    if not tracker.initialized:
        return 0
    return len(tracker.resubmit())


@dataclasses.dataclass
class Tally:
    """What one campaign (one ring type, one front-end, one back-end) saw."""

    frontend: str
    backend: str
    ring: str
    kills: int = 0
    in_flight_at_kill: int = 0          #: kills after which the inflight region held a request
    requests_in_flight: int = 0         #: the requests it held, summed over the kills
    resubmitted: int = 0                #: requests our back-ends resubmitted (their logs)
    stale_cleared: int = 0              #: used descriptors of unpublished packed batches cleared
    restarts: int = 0
    hangs: int = 0
    writes: int = 0                     #: completed writes
    lost_bytes: int = 0
    order_violations: int = 0           #: resubmissions out of submission order (ours only)
    boots: int = 0                      #: guest boots (qemu only: one, plus one per hang)
    died: int = 0                       #: times the back-end had exited by itself before a kill
    seconds: float = 0.0
    errors: list[str] = dataclasses.field(default_factory=list)

    def row(self) -> list:
        # qemu-storage-daemon keeps no inflight region: what it held at a kill is not known.
        known = (lambda v: v) if self.backend == "ours" else (lambda v: "n/a")
        return [f"{self.frontend}/{self.backend}", self.ring, self.kills, known(self.in_flight_at_kill),
                known(self.requests_in_flight), known(self.resubmitted), known(self.stale_cleared), self.restarts,
                self.hangs, self.writes, self.lost_bytes, len(self.errors), round(self.seconds, 1)]

    COLUMNS = ["front-end/back-end", "ring", "kills", "in flight at kill", "requests", "resubmitted",
               "stale cleared", "restarts", "hangs", "writes", "lost bytes", "errors", "s"]


def _tally_image(tally: Tally, proc, image: str, expected, block: int, blocks: int) -> None:
    """After a campaign: the bytes the image lost against what was written, and on any error the
    tail of the back-end's log."""
    lost, bad = lost_bytes(image, expected, block, blocks)
    tally.lost_bytes = lost
    tally.errors += bad
    if tally.errors:
        tally.errors.append(f"back-end log tail:\n{proc.log()[-2000:]}")


# --------------------------------------------------------------------------------------------
# The QEMU guest campaign
# --------------------------------------------------------------------------------------------

GUEST_SCRIPT = """\
set -e
dev=$(for d in /sys/block/vd*; do echo /dev/${{d##*/}}; done | head -n 1)
exec python3 -c 'import sys; from bench.crash import guest_writer; sys.exit(guest_writer(sys.argv[1], "/mnt/crash/writes", "/mnt/crash/stop", limit={limit}, first_generation={first}))' "$dev"
"""


class _WriteLog:
    """The host's view of the guest writer's log: completed writes, each block's last generation."""

    def __init__(self, path: str) -> None:
        self.path, self._offset, self._partial = path, 0, b""
        self.writes, self.last = 0, {}
        self.started = self.ended = False
        self.end_status = ""
        self.errors: list[str] = []

    def poll(self) -> int:
        """Read what was appended; returns the completed writes so far."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.writes
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            parts = line.decode(errors="replace").split()
            if not parts:
                continue
            if parts[0] == "W":
                block, generation = int(parts[1]), int(parts[2])
                if generation <= self.last.get(block, 0):
                    self.errors.append(f"block {block}: generation {generation} completed after {self.last[block]}")
                self.last[block] = generation
                self.writes += 1
            elif parts[0] == "S":
                self.started = True
            elif parts[0] == "END":
                self.ended, self.end_status = True, parts[1]
            elif parts[0] == "E":
                self.errors.append(" ".join(parts))
        return self.writes

    def wait(self, predicate: Callable[[], bool], timeout: float, alive: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline or not alive():
                return False
            time.sleep(0.05)
            self.poll()
        return True


def qemu_campaign(ring: str, kills: int, seed: int, backend: str = "ours", backend_args: tuple[str, ...] | None = None,
                  say: Callable[[str], None] = print, boot_timeout: float = 120.0) -> Tally:
    """``kills`` kills of the back-end under a QEMU guest's writes (``ring``: split or packed);
    a hang reboots the guest (counted in ``boots``) and the campaign continues."""
    from tests import guest
    tally = Tally("qemu", backend, ring)
    rng = random.Random(f"{seed}-{ring}-{backend}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vhost_min-crash-") as work:
        image = os.path.join(work, "disk.img")
        with open(image, "wb") as f:
            f.truncate(GUEST_BLOCK * GUEST_BLOCKS)
        sock = os.path.join(work, "blk.sock")
        if backend_args is None:
            backend_args = io_arguments(image) if backend == "ours" else ()
        proc = BackendProcess(backend, image, sock, os.path.join(work, "backend.log"), backend_args)
        expected: dict[int, int] = {}
        try:
            proc.start()
            while tally.kills < kills:
                share = os.path.join(work, f"share{tally.boots}")
                os.mkdir(share)
                done = _qemu_boot(tally, rng, kills, ring, proc, sock, share, expected, say, boot_timeout, guest)
                if done:
                    break
        finally:
            proc.stop()
            tally.restarts = proc.starts - 1
            if backend == "ours":
                tally.resubmitted, tally.stale_cleared = proc.resubmitted(), proc.stale_cleared()
        _tally_image(tally, proc, image, expected, GUEST_BLOCK, GUEST_BLOCKS)
    tally.seconds = time.monotonic() - started
    return tally


def _qemu_boot(tally: Tally, rng: random.Random, kills: int, ring: str, proc: BackendProcess, sock: str,
               share: str, expected: dict[int, int], say, boot_timeout: float, guest) -> bool:
    """One guest boot: writes, kills until ``kills`` (True) or a hang (False: boot again)."""
    tally.boots += 1
    device = "vhost-user-blk-pci,id=blk0,chardev=blk0,num-queues=1" + (",packed=on" if ring == "packed" else "")
    args = ["-chardev", f"socket,id=blk0,path={sock},reconnect=1", "-device", device]
    limit = 60 + kills * 30
    log = _WriteLog(os.path.join(share, "writes"))
    with guest.Guest(args, memfd_memory=True, modules=["virtio_blk"], shares={"crash": share},
                     boot_timeout=boot_timeout) as vm:
        first = 1 + max(expected.values(), default=0)
        vm.start(GUEST_SCRIPT.format(limit=limit, first=first), timeout=limit + 30)
        alive = lambda: vm.process is not None and vm.process.poll() is None
        if not log.wait(lambda: log.writes > 0, boot_timeout, alive):
            raise RuntimeError(f"the guest wrote nothing within {boot_timeout} s\n{guest.console_tail(vm.console())}"
                               f"\n--- back-end:\n{proc.log()[-2000:]}")
        hung = False
        while tally.kills < kills:
            time.sleep(rng.uniform(*KILL_PAUSE))
            if rng.random() < AIMED and proc.kind == "ours":
                aim(vm.process.pid, ring == "packed")
            if proc.proc.poll() is not None:
                tally.died += 1
                tally.errors.append(f"before kill {tally.kills + 1}: the back-end had exited with "
                                    f"{proc.proc.returncode}")
            proc.kill()
            tally.kills += 1
            held = in_flight_in(inflight_region_of(vm.process.pid), ring == "packed") if proc.kind == "ours" else 0
            tally.in_flight_at_kill += held > 0
            tally.requests_in_flight += held
            time.sleep(RESTART_DELAY)
            proc.start()
            mark = log.poll()
            if not log.wait(lambda: log.writes > mark, HANG_SECONDS, alive):
                hung = True
                tally.hangs += 1
                tally.errors.append(f"kill {tally.kills}: no write completed within {HANG_SECONDS} s of the "
                                    f"restart ({held} request(s) in flight at the kill)")
                say(f"  {ring}: kill {tally.kills}: HANG")
                break
            if tally.kills % 10 == 0:
                say(f"  {ring}: {tally.kills} kills, {log.writes} writes")
        if not hung:
            with open(os.path.join(share, "stop"), "w"):
                pass
            if not log.wait(lambda: log.ended, HANG_SECONDS, alive):
                tally.hangs += 1
                hung = True
                tally.errors.append(f"the writer did not finish within {HANG_SECONDS} s of the last kill")
        if hung:
            vm.close()              # a hung guest: kill QEMU (by its PID), the writes so far stand
            log.poll()
            proc.kill()             # and a fresh back-end for the next boot
            proc.start()
        else:
            result = vm.wait()
            log.poll()
            if result.status or result.timed_out:
                tally.errors.append(f"the guest writer failed (status {result.status}, timed out "
                                    f"{result.timed_out}):\n{result.output[-2000:]}")
    if log.end_status not in ("", "ok") or log.errors:
        tally.errors += log.errors or [f"the writer ended with {log.end_status}"]
    tally.writes += log.writes
    for block, generation in log.last.items():
        expected[block] = max(expected.get(block, 0), generation)
    if hung:
        # Writes in flight when the hung guest was killed never completed: the image may hold
        # either generation of those blocks (well-formed), and both are right.
        image = proc.image
        with open(image, "rb") as f:
            for block in range(GUEST_BLOCKS):
                found = block_identity(os.pread(f.fileno(), GUEST_BLOCK, block * GUEST_BLOCK))
                if found and found[0] == block and found[1] > expected.get(block, 0):
                    expected[block] = found[1]
    return not hung


# --------------------------------------------------------------------------------------------
# Our front-end in this process
# --------------------------------------------------------------------------------------------

def ours_campaign(ring: str, kills: int, seed: int, backend_args: tuple[str, ...] | None = None,
                  say: Callable[[str], None] = print) -> Tally:
    """``kills`` kills of our back-end under our front-end's writes (Frontend + BlkClient, the
    inflight region set up before the ring); nothing may be lost and every resubmission must
    follow submission order."""
    from vhost_min.frontend import FRONTEND_FEATURES, Frontend
    tally = Tally("ours", "ours", ring)
    rng = random.Random(f"{seed}-{ring}-ours")
    packed = ring == "packed"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vhost_min-crash-") as work:
        image = os.path.join(work, "disk.img")
        with open(image, "wb") as f:
            f.truncate(OURS_BLOCK * OURS_BLOCKS)
        if backend_args is None:
            backend_args = io_arguments(image)
        proc = BackendProcess("ours", image, os.path.join(work, "blk.sock"), os.path.join(work, "backend.log"),
                              backend_args)
        expected: dict[int, int] = {}
        try:
            proc.start()
            fe = Frontend.connect(proc.socket_path, timeout=10)
            try:
                features = FRONTEND_FEATURES & ~VirtioFeature.VIRTIO_F_RING_PACKED | (
                    VirtioFeature.VIRTIO_F_RING_PACKED if packed else 0)
                fe.negotiate(features | BLK_DRIVER_FEATURES)
                fe.setup_inflight(1, OURS_QUEUE_SIZE)
                client = BlkClient(fe, queue_size=OURS_QUEUE_SIZE, depth=OURS_DEPTH, max_io=OURS_BLOCK,
                                   packed=packed)
                _ours_writes(tally, rng, kills, proc, fe, client, expected, say)
            finally:
                fe.close()
        finally:
            proc.stop()
            tally.restarts = proc.starts - 1
            tally.resubmitted, tally.stale_cleared = proc.resubmitted(), proc.stale_cleared()
        _tally_image(tally, proc, image, expected, OURS_BLOCK, OURS_BLOCKS)
    tally.seconds = time.monotonic() - started
    return tally


def _ours_writes(tally: Tally, rng: random.Random, kills: int, proc: BackendProcess, fe, client: BlkClient,
                 expected: dict[int, int], say) -> None:
    """Keep the queue full of writes (one per block at a time) while a killer thread kills and
    restarts the back-end at random moments; reconnect whenever the back-end hangs up."""
    generation = [0] * OURS_BLOCKS
    busy: dict[int, int] = {}               # block -> submission number of its write in flight
    sequence = cursor = 0
    progress = threading.Event()            # set by each completion: the killer's "writes resumed"
    killer_done = threading.Event()
    finished = threading.Event()
    failure: list[BaseException] = []

    def killer() -> None:
        try:
            while tally.kills < kills:
                if not progress.wait(HANG_SECONDS):
                    return                  # the main loop counts the hang
                time.sleep(rng.uniform(*KILL_PAUSE))
                if rng.random() < AIMED:
                    aim(os.getpid(), tally.ring == "packed")
                proc.kill()
                tally.kills += 1
                try:
                    held = _check_resubmission_order(tally, client, busy)
                except VhostError as exc:   # the region as the next back-end will find it
                    held = 0
                    tally.errors.append(f"kill {tally.kills}: the inflight region: {type(exc).__name__}: {exc}")
                tally.in_flight_at_kill += held > 0
                tally.requests_in_flight += held
                time.sleep(RESTART_DELAY)
                progress.clear()            # completions reaped from now on came after the kill
                proc.start()
                if tally.kills % 10 == 0:
                    say(f"  ours/{tally.ring}: {tally.kills} kills, {tally.writes} writes")
        except BaseException as exc:        # noqa: BLE001 (reported by the main loop)
            failure.append(exc)
        finally:
            killer_done.set()
        # The back-end got PR_SET_PDEATHSIG from this thread (launch._die_with_parent): it would
        # get SIGTERM the moment this thread ends. Stay until the writes are done.
        finished.wait()

    thread = threading.Thread(target=killer, name="killer", daemon=True)
    thread.start()
    last = time.monotonic()
    try:
        while True:
            if not killer_done.is_set():    # keep the queue full until the last kill
                requests = []
                while client.free_slots > len(requests):
                    while cursor in busy:
                        cursor = (cursor + 1) % OURS_BLOCKS
                    generation[cursor] += 1
                    sequence += 1
                    busy[cursor] = sequence
                    requests.append(BlkRequest.write(cursor * OURS_BLOCK,
                                                     block_content(cursor, generation[cursor], OURS_BLOCK),
                                                     tag=(cursor, generation[cursor])))
                    cursor = (cursor + 1) % OURS_BLOCKS
                if requests:
                    client.submit(requests)
            elif not client.in_flight:
                break
            try:
                done = client.complete(0)
                if not done and not fe.wait_call(client.queue_index, 0.2):
                    if time.monotonic() - last > HANG_SECONDS:
                        tally.hangs += 1
                        tally.errors.append(f"kill {tally.kills}: nothing completed for {HANG_SECONDS} s "
                                            f"({client.in_flight} in flight)")
                        break
                    continue
            except DisconnectedError:
                _reconnect(fe)
                continue
            for completion in done:
                block, gen = completion.tag
                if completion.status != 0:
                    tally.errors.append(f"block {block} generation {gen}: status {completion.status}")
                busy.pop(block, None)
                expected[block] = gen
                tally.writes += 1
            if done:
                last = time.monotonic()
                progress.set()
    finally:
        finished.set()
        thread.join(HANG_SECONDS + 30)
    if failure:
        raise failure[0]


def _reconnect(fe) -> None:
    """Reconnect as QEMU does: again and again until a handshake completes (a kill may land in
    the middle of one), for at most HANG_SECONDS."""
    deadline = time.monotonic() + HANG_SECONDS
    while True:
        try:
            fe.reconnect(timeout=max(1.0, deadline - time.monotonic()))
            return
        except DisconnectedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _check_resubmission_order(tally: Tally, client: BlkClient, busy: dict[int, int]) -> int:
    """Right after a kill: reconcile a copy of the inflight region against the ring, as the next
    back-end will, and check it would resubmit in submission order. Returns how many it holds."""
    region = inflight_region_of(os.getpid())
    if region is None:
        return 0
    queue, memory = client.queue, client.memory
    packed = queue.__class__.__name__.startswith("Packed")
    desc_num = struct.unpack_from("<H", region, QueueRegionSplit.desc_num.offset)[0]
    tracker = (InflightPacked if packed else InflightSplit)(bytearray(region), desc_num)
    if packed:
        tracker.reconcile(lambda slot: struct.unpack("<H", memory.read(queue.desc_addr + 16 * slot + 14, 2))[0])
        headers = [chain[0][0] for chain in tracker.resubmit()]
    else:
        tracker.reconcile(struct.unpack("<H", memory.read(queue.used_addr + 2, 2))[0])
        headers = [struct.unpack("<Q", memory.read(queue.desc_addr + 16 * head, 8))[0] for head in tracker.resubmit()]
    order = []
    for gpa in headers:
        _type, _ioprio, sector = VIRTIO_BLK_OUTHDR.unpack(memory.read(gpa, VIRTIO_BLK_OUTHDR.size))
        order.append(busy.get(sector * 512 // OURS_BLOCK, -1))
    if -1 in order or order != sorted(order):
        tally.order_violations += 1
        tally.errors.append(f"kill {tally.kills}: the region would resubmit writes number {order} "
                            f"(-1: not in flight)")
    return len(order)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m bench crash", description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=200, help="kills per ring type (default 200)")
    parser.add_argument("--ring", choices=("split", "packed", "both"), default="both")
    parser.add_argument("--frontend", choices=("qemu", "ours"), default="qemu")
    parser.add_argument("--yardstick", choices=("qsd",), help="also run the qemu campaign against "
                        "qemu-storage-daemon (no inflight tracking; split rings only)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error("--kills must be at least 1")
    if args.yardstick and args.frontend != "qemu":
        parser.error("--yardstick qsd needs --frontend qemu (qemu-storage-daemon is the back-end QEMU reconnects to)")
    return args


def run(argv: list[str]) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, ROOT)
    from bench.__main__ import print_table
    rings = ("split", "packed") if args.ring == "both" else (args.ring,)
    tallies = []
    for ring in rings:
        print(f"{args.frontend} front-end, our back-end, {ring} ring: {args.kills} kills", flush=True)
        if args.frontend == "qemu":
            tallies.append(qemu_campaign(ring, args.kills, args.seed, say=lambda s: print(s, flush=True)))
        else:
            tallies.append(ours_campaign(ring, args.kills, args.seed, say=lambda s: print(s, flush=True)))
    if args.yardstick:
        print(f"qemu front-end, qemu-storage-daemon, split ring: {args.kills} kills", flush=True)
        tallies.append(qemu_campaign("split", args.kills, args.seed, backend="qsd",
                                     say=lambda s: print(s, flush=True)))
    print_table(f"kill -9 under sustained writes, restart after {RESTART_DELAY} s (seed {args.seed})",
                Tally.COLUMNS, [t.row() for t in tallies])
    for t in tallies:
        for line in t.errors[:10]:
            print(f"  {t.frontend}/{t.backend} {t.ring}: {line}")
    print(f"  ({CAVEAT})")
    return {"caveat": CAVEAT, "seed": args.seed, "kills_per_ring": args.kills,
            "campaigns": [{k: v for k, v in dataclasses.asdict(t).items() if k != "errors"} | {"errors": len(t.errors)}
                          for t in tallies]}
