"""Our back-ends under QEMU 7.2 with a real Linux guest (tests/guest.py: Debian's 6.12 kernel,
TCG, guest RAM in a shared memfd): the guest's own drivers use devices that vhost_min serves from a
separate process, and each test checks what a user would -- the bytes in the image file, the
disk size the guest sees, random bytes in /dev/hwrng -- what QEMU itself did (QMP, asked while the
guest's devices are in use: QemuWatch), and the back-end's own log and memory.

- BlkGuestTest: two vhost_min.blk.BlkDevice back-ends behind ``-device vhost-user-blk-pci`` in one
  boot. The main disk: the guest writes 1 MiB of seeded random bytes at 1 MiB with dd (O_DIRECT,
  fsync), drops its caches, reads them back and compares; the test finds them in the image with
  os.pread. While the guest then keeps the disk busy, the back-end's resident memory is sampled:
  the project promises < 30 MB apart from guest memory (the guest's memfd, mapped MAP_SHARED, is
  subtracted mapping by mapping). The second disk has ``packed=on``: 512 KiB written, read back
  and found in its image, VIRTIO_F_RING_PACKED negotiated on it (guest, back-end and QEMU agree).
- ViommuBlkGuestTest: the blk back-end behind QEMU's intel-iommu (device-IOTLB, ATS) with
  ``iommu_platform=on``, the guest booted ``intel_iommu=on iommu=strict``: data through IOVAs,
  every IOTLB miss answered by QEMU, its device-IOTLB flushes survived by the rings.
- ReadmeRngGuestTest: README.md's complete custom device, run as the script it is (argv[1] is the
  socket) behind ``-device vhost-user-rng-pci`` as README's QEMU line gives it. QEMU shows that
  device realized and started on it; the guest unbinds every other virtio-rng (the harness always
  has one) so that /dev/hwrng can only be ours, then reads 1 KiB from it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tests import guest, support
from tests.peers import launch
from tests.unit.test_readme import RNG_HEADING, block_after, rng_example
from vhost_min.aio import io_uring_available
from vhost_min.virtio import DeviceId

ROOT = guest.PROJECT_ROOT
MiB = 1 << 20
GUEST_TIMEOUT = 45          # the guest script's own bound (s); each run takes 10-25 s under TCG
BOOT_TIMEOUT = 30           # QEMU is killed this long after GUEST_TIMEOUT
#: The resident memory apart from guest memory the project promises a back-end stays under (30 MB).
RSS_LIMIT = 30_000_000
#: QEMU 7.2 names the memfd of memory-backend-memfd after the object type (backends/hostmem-memfd.c).
GUEST_MEMFD = "/memfd:memory-backend-memfd"

#: Our vhost-user-blk back-end as a program: serve one front-end, exit when it disconnects.
BLK_BACKEND = """\
import logging
import signal
import sys

from vhost_min.backend import serve
from vhost_min.blk import BlkDevice


def stop(signum, frame):
    raise SystemExit(128 + signum)


signal.signal(signal.SIGTERM, stop)
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
logging.getLogger("vhost_min.backend").setLevel(logging.DEBUG)     # each IOTLB update and invalidate
with BlkDevice(sys.argv[1], **dict(arg.split("=", 1) for arg in sys.argv[3:])) as device:   # cache=, aio=
    serve(device, sys.argv[2], once=True)
"""


def direct_io_works(path: str) -> bool:
    """O_DIRECT opens on ``path``'s file system (tmpfs refused it before Linux 6.6)."""
    try:
        os.close(os.open(path, os.O_RDWR | os.O_DIRECT))
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# A back-end in its own process, and its resident memory
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def backend_process(name: str, argv: Sequence[str], socket_path: str, workdir: str) -> Iterator[launch.Peer]:
    """Run ``argv`` (a Python back-end; the project is on its PYTHONPATH) with its output in
    ``workdir``/``name``.log, wait for it to listen on ``socket_path``, and stop that PID at the end."""
    log_path = os.path.join(workdir, f"{name}.log")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=workdir, env=env, preexec_fn=launch._die_with_parent)
    peer = launch.Peer(name, proc, socket_path, workdir, log_path)
    try:
        try:
            support.wait_for_path(socket_path, proc, launch.READY_TIMEOUT)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{name} output:\n{peer.log()}") from None
        yield peer
    finally:
        support.stop_process(proc)


@dataclass(frozen=True)
class Resident:
    """A process's resident memory at one moment, in bytes."""

    vm_rss: int         #: /proc/PID/status VmRSS
    total: int          #: the sum of Rss over /proc/PID/smaps (VmRSS, read at the same moment)
    guest: int          #: Rss of the mappings of the guest's memory (QEMU's memfd)
    io_bytes: int       #: rchar + wchar of /proc/PID/io: grows while the process does I/O

    @property
    def other(self) -> int:
        """Everything but guest memory: the interpreter, the library, buffers, other mappings."""
        return self.total - self.guest


def resident(pid: int) -> Resident:
    """Read /proc/PID/{status,smaps,io}; mappings of GUEST_MEMFD count as guest memory."""
    with open(f"/proc/{pid}/status") as f:
        vm_rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
    total = guest_rss = 0
    in_guest = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            field = line.split(None, 1)[0]
            if not field.endswith(":"):                 # a mapping: "start-end perms offset dev inode [path]"
                parts = line.split(None, 5)
                path = parts[5].strip() if len(parts) > 5 else ""
                in_guest = path.startswith(GUEST_MEMFD) and parts[1][3] == "s"
            elif field == "Rss:":
                kib = int(line.split()[1]) * 1024
                total += kib
                if in_guest:
                    guest_rss += kib
    with open(f"/proc/{pid}/io") as f:
        io = {k: int(v) for k, v in (line.split(": ") for line in f)}
    return Resident(vm_rss, total, guest_rss, io["rchar"] + io["wchar"])


class ResidentSampler:
    """Samples a process's :func:`resident` memory every ``interval`` s in a thread until stopped."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[Resident] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(resident(self.pid))
            except (OSError, StopIteration):      # the process has exited
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> ResidentSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def during_io(self) -> list[Resident]:
        """The samples taken while the process was doing I/O (its byte counters had moved)."""
        return [s for prev, s in zip(self.samples, self.samples[1:]) if s.io_bytes != prev.io_bytes]


def report(test: unittest.TestCase, text: str) -> None:
    print(f"\n[{type(test).__name__}] {text}", flush=True)


def facts(stdout: str) -> dict[str, str]:
    """``key=value`` lines of a guest script's output."""
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


class QemuWatch:
    """What QEMU itself did with the guest's devices, asked over QMP at a moment the guest's script
    picks: it runs :attr:`CHECKPOINT` while its devices are in use, which waits (bounded) until
    :meth:`snapshot` has asked QEMU and closed QMP again. So no QMP command is ever in flight when
    the guest powers off: QEMU 7.2 can then hang for good in monitor_cleanup at exit (seen here with
    a thread polling QMP throughout: one run in three under load). Give QEMU ``args`` and the guest
    ``shares``. After the snapshot: ``devices`` (x-query-virtio: QOM path -> virtio name),
    ``types`` (QOM path -> the type of the device that holds it, "vhost-user-rng-pci" say),
    ``pci`` (query-pci) and ``statuses`` (QOM path -> x-query-virtio-status)."""

    TAG = "qmpwatch"
    CHECKPOINT = f"""\
: >/mnt/{TAG}/ready
i=0
while [ ! -e /mnt/{TAG}/go ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
"""

    def __init__(self, workdir: str) -> None:
        self.path = os.path.join(workdir, "qmp.sock")
        self.dir = os.path.join(workdir, self.TAG)
        os.mkdir(self.dir)
        self.args = ["-qmp", f"unix:{self.path},server=on,wait=off"]
        self.shares = {self.TAG: self.dir}
        self.devices: dict[str, str] = {}
        self.types: dict[str, str] = {}
        self.pci: list = []
        self.statuses: dict[str, dict] = {}
        self.missed: str | None = "no snapshot taken"

    def snapshot(self, qemu: subprocess.Popen, timeout: float) -> None:
        """Wait for the guest's checkpoint (not past QEMU's exit or ``timeout``), read QEMU's state,
        close QMP, and let the guest go on. A guest that never got there leaves ``missed`` set,
        which the assertions on the snapshot show; the guest's own result says why."""
        ready, deadline = os.path.join(self.dir, "ready"), time.monotonic() + timeout
        while not os.path.exists(ready):
            if qemu.poll() is not None or time.monotonic() > deadline:
                self.missed = "the guest never reached the checkpoint"
                return
            time.sleep(0.05)
        try:
            with launch.QMP(self.path) as qmp:
                self.pci = qmp.execute("query-pci")
                self.devices = {d["path"]: d["name"] for d in qmp.execute("x-query-virtio")}
                for path in self.devices:
                    self.types[path] = qmp.execute("qom-get", path=path.rsplit("/", 1)[0], property="type")
                    self.statuses[path] = qmp.execute("x-query-virtio-status", path=path)
            self.missed = None
        finally:
            open(os.path.join(self.dir, "go"), "w").close()

    def started(self, path: str) -> dict:
        """The status of the device at QOM ``path``, whose vhost back-end QEMU had started."""
        status = self.statuses.get(path)
        assert status is not None and status["vhost-started"], (
            f"QMP showed {path} {'without its vhost back-end started' if status else 'nowhere'}; devices "
            f"{self.devices}; {self.missed or 'snapshot taken'}")
        return status


def feature_names(features: dict) -> set[str]:
    """x-query-virtio-status feature lists ({"transports": [...], "dev-features": [...]}) -> names."""
    return {entry.split(":")[0] for key in ("transports", "dev-features") for entry in features.get(key, ())}


def negotiated_features(backend_log: str) -> list[int]:
    """The feature sets our back-end logged as negotiated (each SET_FEATURES), in order."""
    return [int(m, 16) for m in re.findall(r"features (0x[0-9a-f]+) negotiated", backend_log)]


def guest_feature_bit(features: str, bit: int) -> bool:
    """/sys/bus/virtio/devices/*/features: one character per bit, bit 0 first."""
    return features[bit:bit + 1] == "1"


# --------------------------------------------------------------------------------------------
# vhost-user-blk: our BlkDevice, QEMU, the guest's virtio_blk and dd
# --------------------------------------------------------------------------------------------

IMAGE_SIZE = 64 * MiB
PATTERN_OFFSET = 1 * MiB
PATTERN_SIZE = 1 * MiB
DD_BLOCK = 64 * 1024
#: Direct I/O the guest does after the pattern (MiB read and written per round, rounds) while the
#: test samples the back-end's memory: a few seconds of steady traffic under TCG.
LOAD_MIB, LOAD_ROUNDS = 16, 4
#: The second disk of the same guest, on a packed ring (``packed=on``): its own size tells the
#: guest which vdX it is (probe order is not promised).
PACKED_IMAGE_SIZE = 32 * MiB
PACKED_OFFSET = 3 * MiB
PACKED_SIZE = 512 * 1024
#: Virtio feature bits as /sys/bus/virtio/devices/*/features shows them (<linux/virtio_config.h>).
VIRTIO_F_ACCESS_PLATFORM_BIT, VIRTIO_F_RING_PACKED_BIT = 33, 34


def pattern_script(disk: str, source: str, offset: int, size: int, tag: str) -> str:
    """Write ``source`` to ``disk`` at ``offset`` with direct I/O (fsync), drop the caches, read it
    back with direct I/O and compare: prints ``TAG=ok``."""
    return f"""\
dd if={source} of={disk} bs={DD_BLOCK} seek={offset // DD_BLOCK} oflag=direct conv=fsync 2>/dev/null
echo 3 >/proc/sys/vm/drop_caches
dd if={disk} of=/tmp/{tag} bs={DD_BLOCK} skip={offset // DD_BLOCK} count={size // DD_BLOCK} iflag=direct 2>/dev/null
cmp {source} /tmp/{tag}
echo "{tag}=ok"
"""


BLK_SCRIPT = f"""\
set -e
for d in /sys/block/vd*; do
    case "$(cat "$d/size")" in
        {IMAGE_SIZE // 512}) main=${{d##*/}} ;;
        {PACKED_IMAGE_SIZE // 512}) packed=${{d##*/}} ;;
    esac
done
echo "main=$main"
echo "packed=$packed"
echo "sectors=$(cat /sys/block/$main/size)"
echo "pci_device=$(cat /sys/block/$main/device/../device)"
echo "features=$(cat /sys/block/$main/device/features)"
echo "packed_features=$(cat /sys/block/$packed/device/features)"
{pattern_script("/dev/$main", "/mnt/data/pattern", PATTERN_OFFSET, PATTERN_SIZE, "readback")}
{pattern_script("/dev/$packed", "/mnt/data/packed", PACKED_OFFSET, PACKED_SIZE, "packed_readback")}
{QemuWatch.CHECKPOINT}# Steady traffic past the pattern while the host samples the back-end's memory.
i=0
while [ $i -lt {LOAD_ROUNDS} ]; do
    dd if=/dev/$main of=/dev/null bs=1M skip=8 count={LOAD_MIB} iflag=direct 2>/dev/null
    dd if=/dev/urandom of=/dev/$main bs=1M seek=32 count={LOAD_MIB} oflag=direct 2>/dev/null
    i=$((i + 1))
done
sync
echo "load=done"
"""


def read_image(path: str, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


class BlkGuestTest(unittest.TestCase):
    """One guest run (setUpClass) with two of our blk back-ends, each its own process: the main
    disk on a split ring (and the memory sampling), and a second disk with ``packed=on`` whose
    back-end runs O_DIRECT through io_uring (cache=none, aio=io_uring; the thread pool where
    io_uring is refused; writeback where the file system refuses O_DIRECT). The tests look at the
    outcome from every side: the guest, the image files, the back-ends' logs, and QEMU over QMP."""

    @classmethod
    def setUpClass(cls) -> None:
        guest.require_guest()
        rng = support.seeded_random(cls("test_the_pattern_is_in_the_image_file"))
        cls.pattern = rng.randbytes(PATTERN_SIZE)
        cls.packed_pattern = rng.randbytes(PACKED_SIZE)
        work = tempfile.TemporaryDirectory(prefix="vhost_min-guest-blk-")
        cls.addClassCleanup(work.cleanup)
        data = os.path.join(work.name, "data")
        os.mkdir(data)
        for name, content in (("pattern", cls.pattern), ("packed", cls.packed_pattern)):
            with open(os.path.join(data, name), "wb") as f:
                f.write(content)
        cls.image = os.path.join(work.name, "disk.img")
        cls.packed_image = os.path.join(work.name, "packed.img")
        for path, size in ((cls.image, IMAGE_SIZE), (cls.packed_image, PACKED_IMAGE_SIZE)):
            with open(path, "wb") as f:
                f.truncate(size)
        cls.packed_io = [f"cache={'none' if direct_io_works(cls.packed_image) else 'writeback'}",
                         f"aio={'io_uring' if io_uring_available()[0] else 'threads'}"]
        sock, packed_sock = os.path.join(work.name, "blk.sock"), os.path.join(work.name, "packed.sock")
        script = os.path.join(work.name, "blk_backend.py")
        with open(script, "w") as f:
            f.write(BLK_BACKEND)
        watch = QemuWatch(work.name)
        qemu_args = ["-chardev", f"socket,id=blk0,path={sock}",
                     "-device", "vhost-user-blk-pci,id=blk0,chardev=blk0,num-queues=1",
                     "-chardev", f"socket,id=blk1,path={packed_sock}",
                     "-device", "vhost-user-blk-pci,id=blk1,chardev=blk1,num-queues=1,packed=on", *watch.args]
        with backend_process("vhost_min-blk", [sys.executable, script, cls.image, sock], sock, work.name) as peer, \
                backend_process("vhost_min-blk-packed", [sys.executable, script, cls.packed_image, packed_sock,
                                                         *cls.packed_io], packed_sock, work.name) as packed_peer:
            cls.backend_pid = peer.pid
            with guest.Guest(qemu_args, memfd_memory=True, modules=["virtio_blk"],
                             shares={"data": data, **watch.shares}, boot_timeout=BOOT_TIMEOUT) as vm, \
                    ResidentSampler(peer.pid) as sampler:
                vm.start(BLK_SCRIPT, timeout=GUEST_TIMEOUT)
                watch.snapshot(vm.process, GUEST_TIMEOUT + BOOT_TIMEOUT)
                try:
                    cls.result = vm.wait()
                except guest.GuestError as exc:
                    raise AssertionError(f"{exc}\n--- back-ends' output:\n{peer.log()}\n{packed_peer.log()}") from None
            cls.samples, cls.io_samples = sampler.samples, sampler.during_io()
            # QEMU has gone: serve(once=True) returns and each back-end exits by itself.
            cls.backend_exit = peer.wait_exit(10)
            cls.packed_exit = packed_peer.wait_exit(10)
            cls.backend_log = peer.log(1 << 20)
            cls.packed_log = packed_peer.log(1 << 20)
        cls.watch = watch
        cls.facts = facts(cls.result.stdout)

    def test_the_guest_read_back_what_it_wrote(self) -> None:
        self.assertEqual(self.result.status, 0, f"{self.result.output}\n--- back-end:\n{self.backend_log}")
        self.assertFalse(self.result.timed_out)
        self.assertEqual(self.facts.get("readback"), "ok")
        self.assertEqual(self.facts.get("load"), "done")

    def test_the_pattern_is_in_the_image_file(self) -> None:
        self.assertTrue(read_image(self.image, PATTERN_OFFSET, PATTERN_SIZE) == self.pattern,
                        "the image does not hold the guest's 1 MiB at offset 1 MiB")
        self.assertEqual(read_image(self.image, 0, PATTERN_OFFSET), bytes(PATTERN_OFFSET),
                         "the guest wrote before the offset it was given")

    def test_the_guest_sees_the_image_size(self) -> None:
        self.assertEqual(self.facts.get("sectors"), str(IMAGE_SIZE // 512), self.result.output)
        # The main disk is a virtio-blk PCI function (1af4:1001 transitional, as vhost-user-blk-pci
        # is, or 1af4:1042).
        self.assertIn(self.facts.get("pci_device"), ("0x1001", "0x1042"), self.result.output)

    def test_the_backend_ran_cleanly_and_exited_with_its_front_end(self) -> None:
        for exit_status, log in ((self.backend_exit, self.backend_log), (self.packed_exit, self.packed_log)):
            self.assertEqual(exit_status, 0, log)
            self.assertIn("serving a front-end", log)
            for level in ("ERROR", "WARNING", "Traceback"):
                self.assertNotIn(level, log)

    def test_backend_resident_memory_apart_from_guest_memory(self) -> None:
        self.assertGreaterEqual(len(self.io_samples), 5, "too few memory samples while the guest did I/O")
        peak = max(self.samples, key=lambda s: s.other)
        report(self, f"back-end pid {self.backend_pid}, {len(self.samples)} samples ({len(self.io_samples)} during "
                     f"I/O): VmRSS peak {max(s.vm_rss for s in self.samples) / MiB:.1f} MiB; guest memory "
                     f"(memfd) peak {max(s.guest for s in self.samples) / MiB:.1f} MiB; apart from guest memory "
                     f"peak {peak.other / MiB:.1f} MiB (during I/O {max(s.other for s in self.io_samples) / MiB:.1f}"
                     f" MiB = {peak.other / 1e6:.1f} MB; limit {RSS_LIMIT / 1e6:.0f} MB)")
        self.assertTrue(any(s.guest for s in self.io_samples), f"no resident mapping of {GUEST_MEMFD} seen")
        self.assertLess(peak.other, RSS_LIMIT)

    # -- the second disk: a packed ring end to end

    def test_packed_ring_disk_read_back_and_the_image_holds_it(self) -> None:
        report(self, f"packed-ring disk's back-end: {' '.join(self.packed_io)}")
        self.assertEqual(self.facts.get("packed_readback"), "ok", f"{self.result.output}\n--- back-end:\n"
                                                                  f"{self.packed_log[-4000:]}")
        self.assertNotEqual(self.facts.get("packed"), self.facts.get("main"))
        self.assertTrue(read_image(self.packed_image, PACKED_OFFSET, PACKED_SIZE) == self.packed_pattern,
                        "the packed-ring image does not hold the guest's 512 KiB at offset 3 MiB")
        self.assertEqual(read_image(self.packed_image, 0, PACKED_OFFSET), bytes(PACKED_OFFSET))

    def test_packed_ring_negotiated_on_that_disk_only(self) -> None:
        # The guest's driver, our back-end and QEMU agree: RING_PACKED on blk1, not on blk0.
        self.assertTrue(guest_feature_bit(self.facts.get("packed_features", ""), VIRTIO_F_RING_PACKED_BIT),
                        self.result.output)
        self.assertFalse(guest_feature_bit(self.facts.get("features", ""), VIRTIO_F_RING_PACKED_BIT),
                         self.result.output)
        packed, split = negotiated_features(self.packed_log), negotiated_features(self.backend_log)
        self.assertTrue(packed and split, "no negotiated features logged")
        self.assertTrue(packed[-1] >> VIRTIO_F_RING_PACKED_BIT & 1, f"{packed[-1]:#x}")
        self.assertFalse(split[-1] >> VIRTIO_F_RING_PACKED_BIT & 1, f"{split[-1]:#x}")
        qemu_packed = self.watch.started("/machine/peripheral/blk1/virtio-backend")
        qemu_split = self.watch.started("/machine/peripheral/blk0/virtio-backend")
        self.assertIn("VIRTIO_F_RING_PACKED", feature_names(qemu_packed["guest-features"]))
        self.assertNotIn("VIRTIO_F_RING_PACKED", feature_names(qemu_split["guest-features"]))
        report(self, f"packed disk: our back-end negotiated {packed[-1]:#x}; QEMU's guest features "
                     f"{sorted(feature_names(qemu_packed['guest-features']))}")


# --------------------------------------------------------------------------------------------
# vhost-user-blk behind QEMU's intel-iommu: rings and buffers at IOVAs, our IOTLB filled on demand
# --------------------------------------------------------------------------------------------

#: QEMU's vIOMMU with device-IOTLB (ATS) support; interrupt remapping needs the split irqchip.
VIOMMU_MACHINE = "q35,kernel-irqchip=split"
VIOMMU_DEVICE = "intel-iommu,intremap=on,device-iotlb=on"
#: The guest translates every DMA and unmaps (and flushes) each buffer at once. no_timer_check: a
#: TCG guest on a loaded host can fail the IO-APIC timer check through interrupt remapping and
#: panic at boot ("timer doesn't work through Interrupt-remapped IO-APIC"), as seen here.
VIOMMU_APPEND = ["intel_iommu=on", "iommu=strict", "no_timer_check"]
VIOMMU_PATTERN_OFFSET = 2 * MiB
VIOMMU_PATTERN_SIZE = 1 * MiB
#: The extended capability list of PCIe config space (<linux/pci_regs.h>): ATS is id 0x000f, its
#: control register at +6 with Enable in bit 15. Read from sysfs in the guest.
ATS_STATE = r"""
import struct, sys
config = open(sys.argv[1], "rb").read()
state, offset = "absent", 0x100
while offset and len(config) >= offset + 8:
    header, = struct.unpack_from("<I", config, offset)
    if header & 0xFFFF == 0x000F:
        state = "enabled" if struct.unpack_from("<H", config, offset + 6)[0] & 0x8000 else "disabled"
        break
    offset = header >> 20
print("ats=" + state)
"""

VIOMMU_SCRIPT = f"""\
set -e
pci=$(readlink -f /sys/block/vda/device/..)
echo "pci=${{pci##*/}}"
echo "iommu=$(basename "$(readlink $pci/iommu)")"
echo "features=$(cat /sys/block/vda/device/features)"
python3 -c '{ATS_STATE}' $pci/config
{pattern_script("/dev/vda", "/mnt/data/pattern", VIOMMU_PATTERN_OFFSET, VIOMMU_PATTERN_SIZE, "readback")}
{QemuWatch.CHECKPOINT}"""

IOTLB_MISS = re.compile(r"IOTLB miss at (0x[0-9a-f]+)")
IOTLB_UPDATE = re.compile(r"IOTLB update (0x[0-9a-f]+)\+(0x[0-9a-f]+) perm (\d)")
IOTLB_INVALIDATE = re.compile(r"IOTLB invalidate (0x[0-9a-f]+)\+(0x[0-9a-f]+)")


class ViommuBlkGuestTest(unittest.TestCase):
    """Our BlkDevice with VIRTIO_F_ACCESS_PLATFORM behind QEMU 7.2's intel-iommu, as a user with a
    vIOMMU runs it: ``-device intel-iommu,intremap=on,device-iotlb=on``, ``vhost-user-blk-pci,...,
    iommu_platform=on,ats=on,disable-legacy=on``, the guest booted ``intel_iommu=on iommu=strict``.
    Ring and buffer addresses are IOVAs; the back-end asks for each translation it lacks with
    BACKEND_IOTLB_MSG and QEMU answers with IOTLB_MSG updates; the guest's device-IOTLB flushes
    reach the back-end as invalidations, after which even the rings' own pages are asked for again.

    The device sits behind a pcie-root-port: on pcie.0 a virtio-pci device is conventional PCI,
    without the ATS capability, so the guest never sends device-IOTLB invalidations, and QEMU 7.2's
    vhost listens to those only (IOMMU_NOTIFIER_DEVIOTLB_UNMAP; 8.1 falls back to plain unmaps).
    There, no back-end ever hears that a page was unmapped: seen with ours, stale translations of
    reused IOVAs made chains unparsable and writes vanish while dd reported success.
    """

    @classmethod
    def setUpClass(cls) -> None:
        guest.require_guest()
        rng = support.seeded_random(cls("test_the_guest_read_back_what_it_wrote"))
        cls.pattern = rng.randbytes(VIOMMU_PATTERN_SIZE)
        work = tempfile.TemporaryDirectory(prefix="vhost_min-guest-viommu-")
        cls.addClassCleanup(work.cleanup)
        data = os.path.join(work.name, "data")
        os.mkdir(data)
        with open(os.path.join(data, "pattern"), "wb") as f:
            f.write(cls.pattern)
        cls.image = os.path.join(work.name, "disk.img")
        with open(cls.image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        sock = os.path.join(work.name, "blk.sock")
        script = os.path.join(work.name, "blk_backend.py")
        with open(script, "w") as f:
            f.write(BLK_BACKEND)
        cls.watch = watch = QemuWatch(work.name)
        qemu_args = ["-device", VIOMMU_DEVICE,
                     "-device", "pcie-root-port,id=rp0,bus=pcie.0,chassis=1",
                     "-chardev", f"socket,id=blk0,path={sock}",
                     "-device", "vhost-user-blk-pci,id=blk0,bus=rp0,chardev=blk0,num-queues=1,"
                                "iommu_platform=on,ats=on,disable-legacy=on", *watch.args]
        with backend_process("vhost_min-blk", [sys.executable, script, cls.image, sock], sock, work.name) as peer:
            with guest.Guest(qemu_args, memfd_memory=True, modules=["virtio_blk"], shares={"data": data, **watch.shares},
                             machine=VIOMMU_MACHINE, append=VIOMMU_APPEND, boot_timeout=BOOT_TIMEOUT) as vm:
                vm.start(VIOMMU_SCRIPT, timeout=GUEST_TIMEOUT)
                watch.snapshot(vm.process, GUEST_TIMEOUT + BOOT_TIMEOUT)
                try:
                    cls.result = vm.wait()
                except guest.GuestError as exc:
                    raise AssertionError(f"{exc}\n--- back-end output:\n{peer.log()}") from None
            cls.backend_exit = peer.wait_exit(10)
            cls.backend_log = peer.log(1 << 24)
        cls.facts = facts(cls.result.stdout)
        cls.misses = [int(a, 16) for a in IOTLB_MISS.findall(cls.backend_log)]
        cls.updates = [(int(a, 16), int(n, 16), int(p)) for a, n, p in IOTLB_UPDATE.findall(cls.backend_log)]
        cls.invalidates = [(int(a, 16), int(n, 16)) for a, n in IOTLB_INVALIDATE.findall(cls.backend_log)]

    def test_the_guest_read_back_what_it_wrote(self) -> None:
        self.assertEqual(self.result.status, 0, f"{self.result.output}\n--- back-end:\n{self.backend_log[-6000:]}")
        self.assertFalse(self.result.timed_out)
        self.assertEqual(self.facts.get("readback"), "ok")

    def test_the_pattern_is_in_the_image_file(self) -> None:
        self.assertTrue(read_image(self.image, VIOMMU_PATTERN_OFFSET, VIOMMU_PATTERN_SIZE) == self.pattern,
                        "the image does not hold the guest's 1 MiB at offset 2 MiB")
        self.assertEqual(read_image(self.image, 0, VIOMMU_PATTERN_OFFSET), bytes(VIOMMU_PATTERN_OFFSET))

    def test_the_disk_is_translated_by_the_viommu_with_ats(self) -> None:
        self.assertEqual(self.facts.get("iommu"), "dmar0", self.result.output)
        self.assertEqual(self.facts.get("ats"), "enabled", self.result.output)
        self.assertTrue(guest_feature_bit(self.facts.get("features", ""), VIRTIO_F_ACCESS_PLATFORM_BIT),
                        self.result.output)

    def test_access_platform_negotiated_by_our_backend_and_by_qemu(self) -> None:
        negotiated = negotiated_features(self.backend_log)
        self.assertTrue(negotiated, "no SET_FEATURES logged")
        self.assertTrue(negotiated[-1] >> VIRTIO_F_ACCESS_PLATFORM_BIT & 1, f"{negotiated[-1]:#x}")
        status = self.watch.started("/machine/peripheral/blk0/virtio-backend")
        self.assertIn("VIRTIO_F_IOMMU_PLATFORM", feature_names(status["guest-features"]))

    def test_every_iotlb_miss_was_answered_by_an_update(self) -> None:
        """Our misses went out on the back-end channel; QEMU answered each with an update that
        covers it (a translation of the guest's page tables, read-write or one-way)."""
        self.assertGreater(len(self.misses), 0, self.backend_log[-4000:])
        self.assertGreaterEqual(len(self.updates), len(set(self.misses)))
        unanswered = [hex(iova) for iova in self.misses
                      if not any(start <= iova < start + size for start, size, _ in self.updates)]
        self.assertEqual(unanswered, [])
        self.assertTrue(all(perm in (1, 2, 3) for _, _, perm in self.updates), self.updates[:10])

    def test_device_iotlb_flushes_reached_the_backend_and_the_rings_went_on(self) -> None:
        """The guest's flushes arrive as invalidations while the ring is in use; afterwards the
        ring's pages are missed and mapped again, and nothing broke (a ring broken on an
        invalidated page is an ERROR line, and the guest's I/O would hang)."""
        self.assertGreater(len(self.invalidates), 0, self.backend_log[-4000:])
        self.assertEqual(self.backend_exit, 0, self.backend_log[-4000:])
        self.assertEqual([line for line in self.backend_log.splitlines()
                          if any(level in line for level in ("ERROR", "WARNING", "Traceback"))], [])
        report(self, f"QEMU answered {len(self.misses)} IOTLB misses with {len(self.updates)} updates "
                     f"and sent {len(self.invalidates)} invalidations; negotiated "
                     f"{negotiated_features(self.backend_log)[-1]:#x}; guest run {self.result.seconds:.1f} s")


# --------------------------------------------------------------------------------------------
# README's virtio-rng device, QEMU's vhost-user-rng-pci, the guest's virtio_rng and /dev/hwrng
# --------------------------------------------------------------------------------------------

RNG_BYTES = 1024
#: vhost-user-rng-pci is modern-only (PCI 1af4:1044); the harness's own virtio-rng-pci is
#: transitional (1af4:1005). Every virtio_rng device that is not ours is unbound.
RNG_SCRIPT = f"""\
set -e
for dev in /sys/bus/virtio/drivers/virtio_rng/virtio*; do
    if [ "$(cat "$dev/../device")" = 0x1044 ]; then ours=${{dev##*/}}
    else echo "${{dev##*/}}" >/sys/bus/virtio/drivers/virtio_rng/unbind; fi
done
echo "ours=$ours"
echo "rng_available=$(cat /sys/class/misc/hw_random/rng_available)"
echo "rng_current=$(cat /sys/class/misc/hw_random/rng_current)"
dd if=/dev/hwrng of=/tmp/random bs=64 count={RNG_BYTES // 64} iflag=fullblock
python3 -c 'print("random=" + open("/tmp/random", "rb").read().hex())'
{QemuWatch.CHECKPOINT}"""


def readme_rng_qemu_args(socket_path: str) -> list[str]:
    """README's ``-chardev ... -device vhost-user-rng-pci,...`` with our socket path in place of
    the example's default one (the other options are what the harness's memfd_memory sets)."""
    argv = shlex.split(block_after(RNG_HEADING, "sh").code.replace("\\\n", " "))
    args: list[str] = []
    for option in ("-chardev", "-device"):
        value = argv[argv.index(option) + 1]
        args += [option, ",".join(f"path={socket_path}" if part.startswith("path=") else part
                                  for part in value.split(","))]
    return args


class ReadmeRngGuestTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        guest.require_guest()
        work = tempfile.TemporaryDirectory(prefix="vhost_min-guest-rng-")
        cls.addClassCleanup(work.cleanup)
        script = os.path.join(work.name, "readme_rng.py")
        with open(script, "w") as f:
            f.write(rng_example().code)
        sock = os.path.join(work.name, "rng.sock")
        cls.qemu_args = readme_rng_qemu_args(sock)
        cls.watch = watch = QemuWatch(work.name)
        with backend_process("readme-rng", [sys.executable, script, sock], sock, work.name) as peer, \
                ResidentSampler(peer.pid) as sampler:
            with guest.Guest([*cls.qemu_args, *watch.args], memfd_memory=True, modules=["virtio_rng"],
                             shares=watch.shares, boot_timeout=BOOT_TIMEOUT) as vm:
                vm.start(RNG_SCRIPT, timeout=GUEST_TIMEOUT)
                watch.snapshot(vm.process, GUEST_TIMEOUT + BOOT_TIMEOUT)
                try:
                    cls.result = vm.wait()
                except guest.GuestError as exc:
                    raise AssertionError(f"{exc}\n--- back-end output:\n{peer.log()}") from None
            peer.check_alive()
            cls.backend_log = peer.log()
            cls.samples = sampler.samples
        cls.facts = facts(cls.result.stdout)

    def test_qemu_realized_readmes_device_and_started_it_on_our_backend(self) -> None:
        """What QEMU did with README's -device line, over QMP while the guest ran: a vhost-user-rng-pci
        holds a virtio-rng device, a modern-only PCI function (1af4:1044) is on the bus, and the
        guest's driver brought it to DRIVER_OK with its vhost back-end -- README's script -- started."""
        self.assertTrue(any(opt.startswith("vhost-user-rng-pci,") for opt in self.qemu_args), self.qemu_args)
        ours = [path for path, kind in self.watch.types.items() if kind == "vhost-user-rng-pci"]
        self.assertEqual(len(ours), 1, f"QOM types {self.watch.types}; {self.watch.missed or 'snapshot taken'}")
        self.assertEqual(self.watch.devices[ours[0]], "virtio-rng")
        functions = [(dev["id"]["vendor"], dev["id"]["device"]) for bus in self.watch.pci for dev in bus["devices"]]
        self.assertEqual(functions.count((0x1AF4, 0x1044)), 1, functions)
        status = self.watch.started(ours[0])
        self.assertEqual(status["device-id"], DeviceId.RNG)
        self.assertTrue(any(s.startswith("VIRTIO_CONFIG_S_DRIVER_OK") for s in status["status"]["statuses"]),
                        status["status"])
        self.assertIn("VIRTIO_F_VERSION_1", feature_names(status["guest-features"]))
        self.assertFalse(status["broken"])
        # The harness's own virtio-rng-pci has no vhost back-end: only README's device was started.
        self.assertEqual([path for path, st in self.watch.statuses.items() if st["vhost-started"]], ours)

    def test_the_only_hwrng_left_is_ours(self) -> None:
        self.assertEqual(self.result.status, 0, f"{self.result.output}\n--- back-end:\n{self.backend_log}")
        ours = self.facts.get("ours", "")
        self.assertRegex(ours, r"^virtio\d+$", self.result.output)
        available = [name for name in self.facts.get("rng_available", "").split() if name != "none"]
        self.assertEqual(len(available), 1, self.result.output)
        self.assertRegex(available[0], r"^virtio_rng\.\d+$")
        self.assertEqual(self.facts.get("rng_current"), available[0])

    def test_the_guest_read_random_bytes_from_our_backend(self) -> None:
        data = bytes.fromhex(self.facts.get("random", ""))
        self.assertEqual(len(data), RNG_BYTES, self.result.output)
        self.assertTrue(any(data), "all zeros")
        self.assertGreater(len(set(data)), 1, "constant bytes")
        # 1 KiB from os.urandom hits ~251 of the 256 byte values; a pattern or a short fill does not.
        self.assertGreater(len(set(data)), 200)
        report(self, f"/dev/hwrng gave {len(data)} bytes, {len(set(data))} distinct values; back-end "
                     f"peak VmRSS {max(s.vm_rss for s in self.samples) / MiB:.1f} MiB, "
                     f"{max(s.other for s in self.samples) / MiB:.1f} MiB apart from guest memory")


if __name__ == "__main__":
    unittest.main()
