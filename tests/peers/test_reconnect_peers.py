"""Reconnects with real peers: a back-end restarted under QEMU 7.2, our front-end reconnecting to a
restarted qemu-storage-daemon, and our back-end in client mode serving one QEMU after another.

- QemuReconnectGuestTest: one guest boot (tests/guest.py) with two vhost-user-blk disks on
  ``-chardev socket,...,reconnect=1``, each served by ``python3 -m vhost_min blk``. While the guest
  writes a seeded pattern round by round (O_DIRECT, fsync), both back-ends are stopped and started
  again three times (SIGTERM, SIGTERM, then SIGKILL). The main disk's back-end listens on its path
  itself, so QEMU finds no socket between the two processes and retries; the second disk's back-end
  is socket-activated (``--fd``, the listening socket kept by the test) behind a WireTap, which
  records every session QEMU opened. The guest reads everything back and compares; the test finds
  every byte in the images, and in the tap's record what QEMU replayed on each reconnect.
- StorageDaemonRestartTest: Frontend.reconnect() to a qemu-storage-daemon killed and started again
  on the same socket and image: after an orderly stop, after a SIGKILL while idle, and after
  SIGKILLs with requests in flight (some completed out of order by the dead daemon). Each
  request completes exactly once, every byte is on disk, and the tap shows the state replayed.
- ClientModeGuestTest: QEMU listens (``server=on``), ``vhost_min blk --connect`` connects; that
  same back-end process serves a first guest, then a second QEMU listening on the same path.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
from dataclasses import dataclass

from tests import guest, support
from tests.peers import launch
from tests.peers.test_guest_peers import BOOT_TIMEOUT, facts, pattern_script, read_image, report
from tests.unit.test_reconnect import QEMU_BLK_HANDSHAKE, QEMU_LINUX_FEATURES, QEMU_NEED_REPLY
from vhost_min.blk import BlkClient, BlkRequest
from vhost_min.frontend import Frontend
from vhost_min.user import VHOST_USER_NEED_REPLY_MASK, FrontendRequest, Inflight, ProtocolFeature, VringState

F = FrontendRequest
P = ProtocolFeature
MiB = 1 << 20
TIMEOUT = 10.0              # any one request, and any wait for completions
GUEST_TIMEOUT = 90          # the guest script's own bound (s): the writes wait out each restart


def open_fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def make_image(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _work_with_patterns(cls, prefix: str) -> tuple[str, str]:
    """A temporary directory, removed with the class, whose ``data/NAME`` holds each of
    ``cls.patterns`` (what the guest writes, shared with it): (that directory, data)."""
    work = tempfile.TemporaryDirectory(prefix=prefix)
    cls.addClassCleanup(work.cleanup)
    data = os.path.join(work.name, "data")
    os.mkdir(data)
    for name, pattern in cls.patterns.items():
        with open(os.path.join(data, name), "wb") as f:
            f.write(pattern)
    return work.name, data


# --------------------------------------------------------------------------------------------
# QEMU reconnect=1, our back-end restarted under a guest doing I/O
# --------------------------------------------------------------------------------------------

MAIN_SIZE, TAPPED_SIZE = 64 * MiB, 48 * MiB
CHUNK, ROUNDS = 512 << 10, 36
BASE = 4 * MiB
#: (guest round after which the back-ends are stopped, the signal that stops them)
RESTARTS = ((3, signal.SIGTERM), (12, signal.SIGTERM), (24, signal.SIGKILL))
ROUND_MARK = "vhost_min-io round"

RECONNECT_SCRIPT = f"""\
set -e
for d in /sys/block/vd*; do
    case "$(cat "$d/size")" in
        {MAIN_SIZE // 512}) main=/dev/${{d##*/}} ;;
        {TAPPED_SIZE // 512}) tapped=/dev/${{d##*/}} ;;
    esac
done
i=0
while [ $i -lt {ROUNDS} ]; do
    for disk in main tapped; do
        eval dev=\\$$disk
        dd if=/mnt/data/$disk of=$dev bs={CHUNK} skip=$i seek=$(({BASE // CHUNK} + i)) count=1 \\
            oflag=direct conv=fsync 2>/dev/null
    done
    echo "{ROUND_MARK} $i done" >/dev/console
    i=$((i + 1))
done
echo 3 >/proc/sys/vm/drop_caches
for disk in main tapped; do
    eval dev=\\$$disk
    dd if=$dev of=/tmp/$disk bs={CHUNK} skip={BASE // CHUNK} count={ROUNDS} iflag=direct 2>/dev/null
    cmp /mnt/data/$disk /tmp/$disk
    echo "$disk=ok"
done
"""


class QemuReconnectGuestTest(unittest.TestCase):
    """QEMU 7.2 with ``reconnect=1`` keeps a guest's disks through three back-end restarts."""

    @classmethod
    def setUpClass(cls) -> None:
        guest.require_guest()
        rng = support.seeded_random(cls("test_every_byte_the_guest_wrote_is_in_the_images"))
        cls.patterns = {disk: rng.randbytes(CHUNK * ROUNDS) for disk in ("main", "tapped")}
        work, data = _work_with_patterns(cls, "vhost_min-reconnect-")
        cls.images = {"main": os.path.join(work, "main.img"), "tapped": os.path.join(work, "tapped.img")}
        make_image(cls.images["main"], MAIN_SIZE)
        make_image(cls.images["tapped"], TAPPED_SIZE)
        sock = os.path.join(work, "main.sock")
        upstream = os.path.join(work, "tapped.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        cls.addClassCleanup(listener.close)
        listener.bind(upstream)
        listener.listen(4)
        fd = listener.fileno()
        qemu_args = ["-chardev", f"socket,id=blk0,path={sock},reconnect=1",
                     "-device", "vhost-user-blk-pci,id=blk0,chardev=blk0,num-queues=1",
                     "-chardev", f"socket,id=blk1,path={os.path.join(work, 'tap.sock')},reconnect=1",
                     "-device", "vhost-user-blk-pci,id=blk1,chardev=blk1,num-queues=1"]
        cls.exits: list[tuple[int, int]] = []            # (main, tapped) exit status of each stopped pair
        cls.logs: list[tuple[str, str]] = []
        cls.marks: list[str] = []                        # the guest's last round seen at each restart

        def start(n: int) -> tuple[contextlib.ExitStack, launch.Peer, launch.Peer]:
            stack = contextlib.ExitStack()
            main = stack.enter_context(launch.vhost_min_blk(cls.images["main"], extra=["-v"], socket_path=sock))
            tapped = stack.enter_context(launch.vhost_min_blk(cls.images["tapped"], extra=["-v"], fd=fd))
            return stack, main, tapped

        with launch.WireTap(os.path.join(work, "tap.sock"), upstream) as tap:
            stack, main, tapped = start(0)
            try:
                with guest.Guest(qemu_args, memfd_memory=True, modules=["virtio_blk"], shares={"data": data},
                                 boot_timeout=BOOT_TIMEOUT) as vm:
                    vm.start(RECONNECT_SCRIPT, timeout=GUEST_TIMEOUT)
                    for n, (after, signum) in enumerate(RESTARTS, 1):
                        vm.wait_for_console(f"{ROUND_MARK} {after} done", GUEST_TIMEOUT)
                        cls.marks.append(vm.console().rsplit(ROUND_MARK, 1)[1].split()[0])
                        for peer in (main, tapped):
                            peer.proc.send_signal(signum)
                        cls.exits.append((main.proc.wait(launch.READY_TIMEOUT), tapped.proc.wait(launch.READY_TIMEOUT)))
                        cls.logs.append((main.log(1 << 20), tapped.log(1 << 20)))
                        stack.close()
                        stack, main, tapped = start(n)
                    try:
                        cls.result = vm.wait()
                    except guest.GuestError as exc:
                        raise AssertionError(f"{exc}\n--- back-ends:\n{main.log()}\n{tapped.log()}") from None
                support.stop_process(main.proc)
                support.stop_process(tapped.proc)
                cls.exits.append((main.proc.returncode, tapped.proc.returncode))
                cls.logs.append((main.log(1 << 20), tapped.log(1 << 20)))
            finally:
                stack.close()
            cls.sessions = [tap.requests(s) for s in range(tap.sessions)]
            cls.tap_messages = list(tap.messages)
            cls.tap_errors = list(tap.errors)
        cls.facts = facts(cls.result.stdout)
        report(cls("test_every_byte_the_guest_wrote_is_in_the_images"),
               f"{len(RESTARTS)} restarts at guest rounds {cls.marks}; guest run {cls.result.seconds:.1f} s; "
               f"{len(cls.sessions)} sessions through the tap")

    def test_the_guest_read_back_every_round(self) -> None:
        self.assertEqual(self.result.status, 0, self.result.output)
        self.assertFalse(self.result.timed_out)
        self.assertEqual((self.facts.get("main"), self.facts.get("tapped")), ("ok", "ok"), self.result.output)

    def test_every_byte_the_guest_wrote_is_in_the_images(self) -> None:
        for disk, pattern in self.patterns.items():
            with self.subTest(disk=disk):
                self.assertTrue(read_image(self.images[disk], BASE, len(pattern)) == pattern,
                                f"the {disk} image does not hold what the guest wrote")
                self.assertEqual(read_image(self.images[disk], 0, BASE), bytes(BASE))

    def test_the_restarts_landed_while_the_guest_was_writing(self) -> None:
        self.assertEqual(len(self.marks), len(RESTARTS))
        self.assertTrue(all(int(mark) < ROUNDS - 1 for mark in self.marks), self.marks)

    def test_each_back_end_process_served_the_guest(self) -> None:
        """Every one of the four processes of each disk served QEMU (the guest's I/O went through
        it); the ones stopped with SIGTERM exited 0, cleanly."""
        self.assertEqual(len(self.logs), len(RESTARTS) + 1)
        for n, ((main_exit, tapped_exit), logs) in enumerate(zip(self.exits, self.logs)):
            signum = RESTARTS[n][1] if n < len(RESTARTS) else signal.SIGTERM
            for exit_status, log in zip((main_exit, tapped_exit), logs):
                with self.subTest(process=n):
                    self.assertIn("serving a front-end", log)
                    self.assertRegex(log, r"features 0x[0-9a-f]+ negotiated")
                    self.assertEqual(exit_status, 0 if signum == signal.SIGTERM else -signum, log)
                    for level in ("ERROR", "Traceback"):
                        self.assertNotIn(level, log)

    def test_qemus_handshake_is_the_one_the_unit_tier_replays(self) -> None:
        """The requests QEMU sent on its first connection (realize, then the driver's start) are
        tests.unit.test_reconnect.QEMU_BLK_HANDSHAKE, which the unit tier cuts at every step."""
        names = [m.name for m in self.sessions[0]]
        self.assertEqual(names[:len(QEMU_BLK_HANDSHAKE)], list(QEMU_BLK_HANDSHAKE), names)
        handshake = self.sessions[0][:len(QEMU_BLK_HANDSHAKE)]
        self.assertEqual({m.name for m in handshake if m.flags & VHOST_USER_NEED_REPLY_MASK}, QEMU_NEED_REPLY)
        # SeaBIOS drives the disk first; Linux's virtio_blk then acks what the unit tier acks.
        self.assertIn(QEMU_LINUX_FEATURES, [m.u64() for m in self.sessions[0] if m.request == F.SET_FEATURES])

    def test_each_reconnect_replayed_features_memory_inflight_and_ring_bases(self) -> None:
        self.assertEqual(self.tap_errors, [])
        self.assertGreaterEqual(len(self.sessions), len(RESTARTS) + 1)
        first = self.sessions[0]
        features = [m.u64() for m in first if m.request == F.SET_FEATURES][-1]
        inflight = next(m for m in first if m.request == F.SET_INFLIGHT_FD)
        region = Inflight.unpack(inflight.payload)
        for number, session in enumerate(self.sessions[1:], 1):
            with self.subTest(session=number):
                sent = {m.request: m for m in session}
                self.assertEqual([m.u64() for m in session if m.request == F.SET_FEATURES][-1], features)
                self.assertIn(F.ADD_MEM_REG, sent)
                # The inflight region QEMU got from the first back-end, handed to the restarted one.
                self.assertNotIn(F.GET_INFLIGHT_FD, sent)
                self.assertEqual(Inflight.unpack(sent[F.SET_INFLIGHT_FD].payload), region)
                self.assertEqual(sent[F.SET_INFLIGHT_FD].fd_targets, inflight.fd_targets)
                # The ring resumes where the guest's requests were: a base past the first session's.
                base = int.from_bytes(sent[F.SET_VRING_BASE].payload[4:8], "little")
                self.assertGreater(base, 0)


# --------------------------------------------------------------------------------------------
# Our front-end reconnecting to a restarted qemu-storage-daemon
# --------------------------------------------------------------------------------------------

#: Requests submitted before each kill of qemu-storage-daemon; kills go on (up to MAX_KILLS) until
#: OUT_OF_ORDER_KILLS of them found the daemon had completed requests out of order.
IN_FLIGHT_WRITES, OUT_OF_ORDER_KILLS, MAX_KILLS = 24, 2, 30
#: Room each in-flight write gets (writes are 4..128 KiB).
WRITE_SLOT = 128 << 10
#: 4 MiB of writes from the orderly and idle restarts, then a new stretch for each kill (sparse).
QSD_IMAGE_SIZE = 4 * MiB + MAX_KILLS * IN_FLIGHT_WRITES * WRITE_SLOT


class RestartingStorageDaemon:
    """qemu-storage-daemon serving ``image`` on the socket ``path``, stopped (SIGTERM) or killed
    (SIGKILL) and started again on the same socket by :meth:`restart`; ``.peer`` is the one
    running. A context manager: the last one is stopped at the end."""

    def __init__(self, image: str, path: str) -> None:
        self.image, self.path = image, path
        self._stack = contextlib.ExitStack()
        self.peer: launch.Peer | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)           # a killed daemon's socket file: ready means the new one
        self.peer = self._stack.enter_context(launch.storage_daemon(self.image, socket_path=self.path))

    def restart(self, signum: int = signal.SIGTERM) -> None:
        self.peer.proc.send_signal(signum)
        self._stack.close()
        self.start()

    def __enter__(self) -> RestartingStorageDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


@dataclass
class KillRound:
    """One kill of qemu-storage-daemon with requests in flight, as kill_with_requests_in_flight saw it."""

    pending: int            # requests the dead daemon had not completed
    out_of_order: bool      # it had completed one submitted after one still pending
    reconnect_s: float      # how long Frontend.reconnect() took


def kill_with_requests_in_flight(daemon: RestartingStorageDaemon, blk: BlkClient, rng, offset: int,
                                 written: dict[int, bytes], count: int = IN_FLIGHT_WRITES) -> KillRound:
    """Submit ``count`` requests -- writes of 4..128 KiB, one every WRITE_SLOT from ``offset`` on
    (recorded in ``written``), and a FLUSH (fdatasync of megabytes) a third of the way, which qsd
    completes after the writes behind it -- SIGKILL the daemon 0..4 ms later, start it again,
    reconnect() and complete them all. AssertionError unless each completes exactly once, OK."""
    requests = []
    for i in range(count):
        if i == count // 3:
            requests.append(BlkRequest.flush(tag=i))
            continue
        data = rng.randbytes(rng.choice((4, 16, 64, 128)) << 10)
        requests.append(BlkRequest.write(offset + i * WRITE_SLOT, data, tag=i))
        written[offset + i * WRITE_SLOT] = data
    if blk.submit(requests) != count:
        raise AssertionError(f"only {count} requests fit, not {len(requests)}")
    time.sleep(rng.uniform(0, 0.004))
    daemon.restart(signal.SIGKILL)
    before = blk.complete(0)                            # what the dead daemon completed
    done = [c.tag for c in before]
    pending = sorted(set(range(count)) - set(done))
    start = time.monotonic()
    blk.frontend.reconnect(timeout=TIMEOUT)
    took = time.monotonic() - start
    after = blk.complete(len(pending), TIMEOUT) if pending else []
    if sorted(c.tag for c in before + after) != list(range(count)):
        raise AssertionError(f"requests did not complete exactly once: {sorted(c.tag for c in before + after)}")
    if any(c.status for c in before + after):
        raise AssertionError(f"requests failed: {[c for c in before + after if c.status]}")
    return KillRound(len(pending), bool(pending and done and max(done) > pending[0]), took)


class StorageDaemonRestartTest(unittest.TestCase):
    """Frontend.reconnect() to a qemu-storage-daemon restarted on the same socket and image:
    after an orderly stop (GET_VRING_BASE), after a SIGKILL while idle, and after SIGKILLs with
    writes in flight. What replayed crossed a WireTap; every byte written is read back through
    the restarted daemon and found in the image. (``python3 -m bench reconnect`` runs the kills
    by the hundred.)

    The guarantee with a back-end that offers no inflight region (qsd 7.2 does not offer
    INFLIGHT_SHMFD): a request the dead daemon completed (its used entry published) is not run
    again; every other request is run again by the restarted one, in the order it was first
    submitted (Frontend publishes them again from the used index), so a write in flight at the
    kill may land twice -- the same bytes at the same place -- and then completes once.
    """

    def setUp(self) -> None:
        tmp = tempfile.TemporaryDirectory(prefix="vhost_min-qsd-restart-")
        self.addCleanup(tmp.cleanup)
        self.dir = tmp.name
        self.rng = support.seeded_random(self)
        self.image = os.path.join(self.dir, "disk.img")
        make_image(self.image, QSD_IMAGE_SIZE)
        self.written: dict[int, bytes] = {}

    def write(self, blk: BlkClient, offset: int, size: int) -> None:
        data = self.rng.randbytes(size)
        blk.write(offset, data)
        self.written[offset] = data

    def check_all(self, blk: BlkClient) -> None:
        for offset, data in self.written.items():
            self.assertTrue(blk.read(offset, len(data)) == data, f"the {len(data)} bytes at {offset} came back wrong")

    def test_reconnects_replay_the_state_and_lose_nothing(self) -> None:
        rounds: list[KillRound] = []
        sock = os.path.join(self.dir, "qsd.sock")
        with RestartingStorageDaemon(self.image, sock) as daemon, \
                launch.WireTap(os.path.join(self.dir, "tap.sock"), sock) as tap:
            fe = Frontend.connect(tap.path, timeout=TIMEOUT)
            self.addCleanup(fe.close)
            blk = BlkClient(fe, timeout=TIMEOUT)
            self.assertFalse(fe.protocol_features & P.INFLIGHT_SHMFD, "qemu-storage-daemon offers INFLIGHT_SHMFD now")
            self.write(blk, 1 * MiB, 256 << 10)

            # 1. Orderly: the ring stopped first (GET_VRING_BASE), qsd stopped with SIGTERM.
            bases = fe.stop()
            daemon.restart(signal.SIGTERM)
            fe.reconnect(timeout=TIMEOUT)
            self.write(blk, 2 * MiB, 256 << 10)
            self.check_all(blk)

            # 2. A crash while idle: SIGKILL, no GET_VRING_BASE; the ring resumes at the used index.
            daemon.restart(signal.SIGKILL)
            fe.reconnect(timeout=TIMEOUT)
            self.write(blk, 3 * MiB, 256 << 10)
            self.check_all(blk)

            # 3. Crashes with requests in flight, each write at its own offset.
            while len(rounds) < MAX_KILLS and sum(r.out_of_order for r in rounds) < OUT_OF_ORDER_KILLS:
                offset = 4 * MiB + len(rounds) * IN_FLIGHT_WRITES * WRITE_SLOT
                rounds.append(kill_with_requests_in_flight(daemon, blk, self.rng, offset, self.written))
            blk.flush()
            self.check_all(blk)
            sessions = [tap.requests(s) for s in range(tap.sessions)]
            replies = {m: tap.reply_to(m) for m in sessions[0] if m.request == F.GET_VRING_BASE}
            fe.close()
        self.assertEqual(tap.errors, [])
        self.assertEqual(len(sessions), 2 + len(rounds) + 1)
        self.assertTrue(any(r.pending for r in rounds), f"no kill landed with a request in flight: {rounds}")
        # Every session replayed the same features, the same memory, the ring with its eventfds.
        first = sessions[0]
        features = [m.u64() for m in first if m.request == F.SET_FEATURES][-1]
        memory = [m.payload for m in first if m.request == F.ADD_MEM_REG]
        for number, session in enumerate(sessions[1:], 1):
            with self.subTest(session=number):
                names = [m.name for m in session]
                self.assertEqual([m.u64() for m in session if m.request == F.SET_FEATURES][-1], features)
                self.assertEqual([m.payload for m in session if m.request == F.ADD_MEM_REG], memory)
                for name in ("SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR", "SET_VRING_CALL", "SET_VRING_KICK",
                             "SET_VRING_ENABLE"):
                    self.assertIn(name, names)
                self.assertNotIn("SET_INFLIGHT_FD", names)
        # After the orderly stop, the base qsd answered to GET_VRING_BASE.
        (_stop, reply), = replies.items()
        self.assertEqual(VringState.unpack(reply.payload).num, bases[0])
        self.assertEqual(VringState.unpack(next(m for m in sessions[1] if m.request == F.SET_VRING_BASE).payload).num,
                         bases[0])
        with open(self.image, "rb") as f:
            for offset, data in self.written.items():
                self.assertTrue(os.pread(f.fileno(), len(data), offset) == data, f"the image lacks the data at {offset}")
        report(self, f"{len(rounds)} kills, {IN_FLIGHT_WRITES} requests submitted before each: "
                     f"{sum(1 for r in rounds if r.pending)} with requests pending, "
                     f"{sum(r.out_of_order for r in rounds)} of them after out-of-order completions; pending at each "
                     f"{[r.pending for r in rounds]}; {sum(len(d) for d in self.written.values()) >> 10} KiB written, "
                     f"all on disk")
        self.assertEqual(launch.child_processes(), [])

    def test_the_bench_reports_its_kills_and_no_loss(self) -> None:
        """``python3 -m bench reconnect --kills 5 --json``: a table, then one JSON object."""
        support.require_commands(launch.QEMU_STORAGE_DAEMON, install=launch.APT_QEMU_COMMON)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        result = subprocess.run([sys.executable, "-m", "bench", "reconnect", "--kills", "5", "--json"], cwd=root,
                                capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("kills with requests pending", result.stdout)
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        self.assertEqual((summary["kills"], summary["requests_completed"]), (5, 5 * IN_FLIGHT_WRITES))
        self.assertEqual((summary["bad_reads"], summary["bad_in_image"]), (0, 0))
        self.assertGreater(summary["bytes_read_back"], 0)
        self.assertEqual(launch.child_processes(), [])


# --------------------------------------------------------------------------------------------
# Our back-end in client mode: QEMU listens, one back-end process serves two QEMUs in turn
# --------------------------------------------------------------------------------------------

CLIENT_IMAGE_SIZE = 32 * MiB
#: Where each guest writes its 1 MiB (guest 2 also reads guest 1's back).
CLIENT_OFFSETS = {"first": 1 * MiB, "second": 3 * MiB}
CLIENT_SIZE = 1 * MiB


def fd_count_at_rest(peer: launch.Peer, samples: int = 20) -> int:
    """The back-end's open fds while it waits for a front-end: the least of a few samples, as a
    connection attempt holds one more socket for a moment."""
    counts = []
    for _ in range(samples):
        counts.append(open_fd_count(peer.pid))
        time.sleep(0.05)
    return min(counts)


class ClientModeGuestTest(unittest.TestCase):
    """``vhost_min blk --connect SOCK``: QEMU 7.2 listens (``-chardev socket,server=on,wait=off``),
    the back-end connects; a guest writes, reads back and powers off; a second QEMU listens on the
    same path and the same back-end process, never restarted, connects and serves its guest."""

    @classmethod
    def setUpClass(cls) -> None:
        guest.require_guest()
        rng = support.seeded_random(cls("test_both_guests_data_is_in_the_image"))
        cls.patterns = {name: rng.randbytes(CLIENT_SIZE) for name in CLIENT_OFFSETS}
        work, data = _work_with_patterns(cls, "vhost_min-client-mode-")
        cls.image = os.path.join(work, "disk.img")
        make_image(cls.image, CLIENT_IMAGE_SIZE)
        sock = os.path.join(work, "qemu.sock")
        qemu_args = ["-chardev", f"socket,id=blk0,path={sock},server=on,wait=off",
                     "-device", "vhost-user-blk-pci,id=blk0,chardev=blk0,num-queues=1"]
        cls.results: dict[str, guest.GuestResult] = {}
        cls.fds: dict[str, int] = {}
        with launch.vhost_min_blk(cls.image, extra=["-v"], connect=sock) as backend:
            for n, name in enumerate(CLIENT_OFFSETS):
                script = "set -e\n" + pattern_script("/dev/vda", f"/mnt/data/{name}", CLIENT_OFFSETS[name],
                                                     CLIENT_SIZE, f"{name}_readback")
                if name == "second":        # what the first guest wrote, through the same back-end
                    script += (f"dd if=/dev/vda of=/tmp/first bs={CLIENT_SIZE} skip=1 count=1 iflag=direct "
                               f"2>/dev/null\ncmp /mnt/data/first /tmp/first\necho first_seen=ok\n")
                with guest.Guest(qemu_args, memfd_memory=True, modules=["virtio_blk"], shares={"data": data},
                                 boot_timeout=BOOT_TIMEOUT) as vm:
                    vm.start(script, timeout=GUEST_TIMEOUT)
                    try:
                        cls.results[name] = vm.wait()
                    except guest.GuestError as exc:
                        raise AssertionError(f"{exc}\n--- back-end:\n{backend.log()}") from None
                # QEMU has gone: the back-end notices, drops the connection and tries again.
                deadline = time.monotonic() + launch.READY_TIMEOUT
                while backend.log(1 << 20).count("front-end disconnected") < n + 1:
                    backend.check_alive()
                    if time.monotonic() > deadline:
                        raise AssertionError(f"the back-end did not notice QEMU leaving:\n{backend.log()}")
                    time.sleep(0.05)
                cls.fds[name] = fd_count_at_rest(backend)
            backend.check_alive()
            backend.proc.send_signal(signal.SIGTERM)
            cls.exit_status = backend.proc.wait(launch.READY_TIMEOUT)
            cls.log = backend.log(1 << 20)
        cls.facts = {name: facts(result.stdout) for name, result in cls.results.items()}

    def test_each_guest_read_back_what_it_wrote(self) -> None:
        for name, result in self.results.items():
            with self.subTest(guest=name):
                self.assertEqual(result.status, 0, f"{result.output}\n--- back-end:\n{self.log}")
                self.assertEqual(self.facts[name].get(f"{name}_readback"), "ok")
        self.assertEqual(self.facts["second"].get("first_seen"), "ok", "the second guest did not find the first "
                                                                       "guest's data")

    def test_both_guests_data_is_in_the_image(self) -> None:
        for name, offset in CLIENT_OFFSETS.items():
            self.assertTrue(read_image(self.image, offset, CLIENT_SIZE) == self.patterns[name],
                            f"the image does not hold the {name} guest's 1 MiB at {offset}")

    def test_one_process_served_both_and_kept_no_fd_of_the_first(self) -> None:
        self.assertEqual(self.log.count("serving a front-end"), 2, self.log)
        self.assertEqual(self.log.count("front-end disconnected"), 2, self.log)
        self.assertEqual(self.fds["second"], self.fds["first"], self.fds)
        self.assertEqual(self.exit_status, 0, self.log)
        for level in ("ERROR", "WARNING", "Traceback"):
            self.assertNotIn(level, self.log)
        report(self, f"one back-end process served two QEMUs in turn; its fds at rest {self.fds}")
