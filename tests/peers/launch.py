"""Launchers for the real vhost-user peers of PEERS.md, one context manager each.

Every launcher checks its program is installed (skip locally, fail with CI=true, naming the apt
command), starts one process on temporary sockets in a private directory, waits until it is ready
(its socket exists; a peer that exits first fails at once with its log), and on exit stops exactly
that PID (support.stop_process), then removes the directory and the files the peer left elsewhere
(DPDK's /var/run/dpdk/<prefix>, virtiofsd's /run/virtiofsd pid file). Peers also get SIGTERM if
the test process dies, so a killed test run leaves nothing behind.

Peers that are front-ends (QEMU, DPDK virtio-user, DPDK vhost in client mode) connect to a socket
the test already listens on; their launchers return at once, without waiting for the handshake,
because the peer blocks until the test answers it.

Also here: ``vhost_min_blk()``, our own blk back-end as a child process (``python3 -m vhost_min
blk``), and ``WireTap``, a relay between a front-end and a back-end that records every message
crossing the socket, so a test can assert what was really sent and answered.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from tests import support
from vhost_min.errors import VhostError
from vhost_min.trace import FRONTEND, MAIN, Record, SessionEvent, Tracer
from vhost_min.user import VHOST_USER_REPLY_MASK, unpack_u64

QEMU_STORAGE_DAEMON = "qemu-storage-daemon"
VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
TESTPMD = "dpdk-testpmd"
QEMU = "qemu-system-x86_64"

# apt packages per program (dpkg -S on Debian 12); support.PEER_PACKAGES is their union.
APT_QEMU_COMMON = "apt-get install -y --no-install-recommends qemu-system-common"
APT_DPDK = ("apt-get install -y --no-install-recommends dpdk-dev librte-net-vhost23 librte-net-virtio23 "
            "librte-mempool-ring23")
APT_QEMU = "apt-get install -y --no-install-recommends qemu-system-x86 qemu-system-common"

#: EAL options every testpmd gets (PEERS.md): no hugepages (steadier timings, no setup), no PCI
#: probing, a 8192-mbuf pool instead of the default ~340 MB one.
TESTPMD_EAL = ("--no-huge", "-m", "256", "--no-pci", "-l", "0,1", "--main-lcore", "1")
DPDK_RUNTIME_DIR = "/var/run/dpdk"
VIRTIOFSD_RUN_DIR = "/run/virtiofsd"

READY_TIMEOUT = 20.0
_serial = itertools.count()


@dataclass
class Peer:
    """One running peer process: its vhost-user socket, its log, and (QEMU's) QMP socket."""

    name: str
    proc: subprocess.Popen
    socket: str
    workdir: str
    log_path: str
    qmp_path: str | None = None
    extra_files: list[str] = field(default_factory=list)    # outside workdir, removed on exit

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self, tail: int = 4000) -> str:
        """The last ``tail`` characters of the peer's stdout+stderr."""
        try:
            with open(self.log_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return ""
        return data[-tail:].decode(errors="replace")

    def check_alive(self) -> None:
        """AssertionError carrying the peer's log if it has exited."""
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} (pid {self.pid}) exited with {self.proc.returncode}; "
                                 f"its output:\n{self.log()}")

    def wait_exit(self, timeout: float) -> int | None:
        """The exit status if the peer ends within ``timeout`` seconds (one-shot peers), else None."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def qmp(self, timeout: float = 10.0) -> QMP:
        """A new QMP session (capabilities negotiated); the caller closes it."""
        if self.qmp_path is None:
            raise ValueError(f"{self.name} has no QMP socket")
        try:
            support.wait_for_path(self.qmp_path, self.proc, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; {self.name} output:\n{self.log()}") from None
        return QMP(self.qmp_path, timeout)


class QMPError(AssertionError):
    """QMP answered a command with an error (or not at all)."""


class QMP:
    """A minimal QMP client: one JSON object per line, events skipped, every read bounded."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._buffer = b""
        try:
            self._sock.connect(path)
            self.greeting = self._read()
            if "QMP" not in self.greeting:
                raise QMPError(f"not a QMP greeting: {self.greeting}")
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def execute(self, command: str, **arguments: object) -> object:
        """Run ``command`` and return its "return" value; QMPError on an "error" answer."""
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            answer = self._read()
            if "event" in answer:
                continue
            if "error" in answer:
                raise QMPError(f"QMP {command} {arguments or ''} failed: {answer['error']}")
            return answer.get("return")

    def quit(self) -> None:
        """Ask QEMU to exit; the connection dropping right after is the expected answer."""
        try:
            self.execute("quit")
        except (OSError, QMPError, ValueError):
            pass

    def _read(self) -> dict:
        while b"\n" not in self._buffer:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                raise QMPError("QMP did not answer in time") from None
            if not chunk:
                raise QMPError("QMP connection closed")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> QMP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# The common part: spawn, wait until ready, stop by PID, clean up
# --------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)      # loaded here: the child may not do much after fork
PR_SET_PDEATHSIG = 1                             # <linux/prctl.h>


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the thread that started it dies (the test run)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _qemu_path(path: str) -> str:
    """A path inside a QEMU -option value: commas are doubled."""
    return path.replace(",", ",,")


@contextlib.contextmanager
def _workdir(name: str) -> Iterator[str]:
    path = tempfile.mkdtemp(prefix=f"vhost_min-{name}-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _running(name: str, argv: Sequence[str], workdir: str, sock: str, *, ready: Sequence[str] = (),
             qmp_path: str | None = None, extra_files: Sequence[str] = (), grace: float = 0.0,
             env: dict[str, str] | None = None, pass_fds: Sequence[int] = ()) -> Iterator[Peer]:
    """Start ``argv`` with its output in ``workdir``/``name``.log, wait for the ``ready`` paths,
    yield the Peer, and finally stop that PID (after ``grace`` seconds to exit on its own) and
    remove ``extra_files``. ``env``: the child's environment (default: ours); ``pass_fds``: fds
    it inherits."""
    log_path = os.path.join(workdir, f"{name}.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=workdir, preexec_fn=_die_with_parent, env=env, pass_fds=tuple(pass_fds))
    peer = Peer(name, proc, sock, workdir, log_path, qmp_path, list(extra_files))
    try:
        for path in ready:
            try:
                support.wait_for_path(path, proc, READY_TIMEOUT)
            except AssertionError as exc:
                raise AssertionError(f"{name} did not get ready: {exc}\nits output:\n{peer.log()}") from None
        yield peer
    finally:
        if grace:
            peer.wait_exit(grace)
        support.stop_process(proc)
        for path in peer.extra_files:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


def child_processes() -> list[int]:
    """PIDs of this process's children still alive (or unreaped): a peer a test did not stop."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(b")", 1)[1].split()[1]) == os.getpid():     # field 4: ppid
                pids.append(int(entry))
    return pids


def _unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{next(_serial)}-{time.monotonic_ns() % 1000000}"


# --------------------------------------------------------------------------------------------
# The peers
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def storage_daemon(image_path: str, num_queues: int = 1, writable: bool = True,
                   block_size: int = 512, discard: bool = False, socket_path: str | None = None) -> Iterator[Peer]:
    """qemu-storage-daemon exporting ``image_path`` (a raw file) as a vhost-user-blk back-end.

    It listens on ``.socket`` (``socket_path``, or one in its own directory), serves one front-end
    at a time and survives reconnects; ``.qmp()`` talks to its monitor. ``block_size`` must be a
    power of two (logical-block-size). With ``discard`` the file node has discard=unmap:
    VIRTIO_BLK_T_DISCARD punches holes in the image (by default QEMU ignores discards, and answers
    them OK).
    """
    support.require_commands(QEMU_STORAGE_DAEMON, install=APT_QEMU_COMMON)
    with _workdir("qsd") as work:
        sock, qmp = socket_path or os.path.join(work, "vhost-user-blk.sock"), os.path.join(work, "qmp.sock")
        argv = [QEMU_STORAGE_DAEMON,
                "--blockdev", (f"driver=file,node-name=file0,filename={_qemu_path(os.path.abspath(image_path))}"
                               + (",discard=unmap" if discard else "")),
                "--export", (f"type=vhost-user-blk,id=export0,node-name=file0,addr.type=unix,"
                             f"addr.path={_qemu_path(sock)},writable={'on' if writable else 'off'},"
                             f"num-queues={num_queues},logical-block-size={block_size}"),
                "--chardev", f"socket,id=qmp,path={_qemu_path(qmp)},server=on,wait=off",
                "--monitor", "chardev=qmp"]
        with _running("qemu-storage-daemon", argv, work, sock, ready=(sock, qmp), qmp_path=qmp) as peer:
            yield peer


@contextlib.contextmanager
def virtiofsd(shared_dir: str, sandbox: str | None = None) -> Iterator[Peer]:
    """QEMU 7.2's C virtiofsd sharing ``shared_dir``: a one-shot vhost-user-fs back-end.

    It exits when its front-end disconnects (start one per test); the socket is mode 0700, so
    only root can connect. ``sandbox`` is virtiofsd's ``-o sandbox=`` (namespace by default,
    ``chroot`` in containers that cannot create namespaces). Note the C virtiofsd's option is
    ``-o sandbox=``; ``--sandbox=`` is the Rust virtiofsd's spelling.
    """
    support.require_commands(VIRTIOFSD, install=APT_QEMU_COMMON)
    support.require_root("virtiofsd")
    with _workdir("virtiofsd") as work:
        sock = os.path.join(work, "vhost-user-fs.sock")
        argv = [VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={os.path.abspath(shared_dir)}",
                "-o", "cache=none"]
        if sandbox:
            argv += ["-o", f"sandbox={sandbox}"]
        # It locks the socket with a pid file named after the socket path, outside our directory.
        pid_file = os.path.join(VIRTIOFSD_RUN_DIR, sock.replace("/", ".") + ".pid")
        # In the namespace sandbox it forks once a front-end connects; the parent only waits for
        # the child. SIGTERM to the parent would orphan a child still exiting, so after the test
        # (which has disconnected by then) it gets a moment to finish by itself.
        with _running("virtiofsd", argv, work, sock, ready=(sock,), extra_files=(pid_file,), grace=2.0) as peer:
            yield peer


def _testpmd_argv(prefix: str, vdev: str, queues: int, extra: Sequence[str]) -> list[str]:
    # --auto-start with --stats-period: runs until SIGTERM without reading stdin (which is /dev/null).
    return [TESTPMD, *TESTPMD_EAL, f"--file-prefix={prefix}", "--vdev", vdev, "--",
            "--total-num-mbufs=8192", f"--rxq={queues}", f"--txq={queues}", "--auto-start",
            "--stats-period", "5", *extra]


@contextlib.contextmanager
def testpmd_virtio_user(socket_path: str, server: bool = False, packed: bool = False, queues: int = 1,
                        extra: Sequence[str] = (), vdev_args: str = "") -> Iterator[Peer]:
    """DPDK testpmd with a virtio-user port: a vhost-user FRONT-END on ``socket_path``.

    Client mode (the default) connects to a socket the test listens on and returns at once (it
    blocks in its handshake until the test answers); ``server=True`` creates ``socket_path`` and
    waits for our back-end to connect. ``extra`` are testpmd options (``--forward-mode=txonly``),
    ``vdev_args`` more virtio-user devargs (``mrg_rxbuf=0,in_order=1``).
    """
    support.require_commands(TESTPMD, install=APT_DPDK)
    with _workdir("virtio-user") as work:
        prefix = _unique("vhost_min-vu")
        vdev = f"net_virtio_user0,path={socket_path},queues={queues}"
        vdev += ",server=1" if server else ""
        vdev += ",packed_vq=1" if packed else ""
        vdev += f",{vdev_args}" if vdev_args else ""
        argv = _testpmd_argv(prefix, vdev, queues, extra)
        with _running("testpmd-virtio-user", argv, work, socket_path, ready=(socket_path,) if server else (),
                      extra_files=(os.path.join(DPDK_RUNTIME_DIR, prefix),)) as peer:
            yield peer


@contextlib.contextmanager
def testpmd_vhost(socket_path: str | None = None, client: bool = False, queues: int = 1,
                  extra: Sequence[str] = ()) -> Iterator[Peer]:
    """DPDK testpmd with a vhost port (net_vhost): a vhost-user-net BACK-END.

    Server mode (the default) creates the socket (``socket_path``, or one in a private directory
    when None) and returns when it exists; ``client=True`` connects to a socket the test listens on.
    """
    support.require_commands(TESTPMD, install=APT_DPDK)
    with _workdir("vhost") as work:
        if socket_path is None:
            if client:
                raise ValueError("client mode needs the path of the socket the test listens on")
            socket_path = os.path.join(work, "vhost-user-net.sock")
        prefix = _unique("vhost_min-vh")
        vdev = f"net_vhost0,iface={socket_path},queues={queues}" + (",client=1" if client else "")
        argv = _testpmd_argv(prefix, vdev, queues, extra)
        with _running("testpmd-vhost", argv, work, socket_path, ready=() if client else (socket_path,),
                      extra_files=(os.path.join(DPDK_RUNTIME_DIR, prefix),)) as peer:
            yield peer


@contextlib.contextmanager
def qemu_frontend(socket_path: str, device: str = "vhost-user-blk-pci", extra_device_args: str = "",
                  memory: str = "256M", stopped: bool = True, extra: Sequence[str] = ()) -> Iterator[Peer]:
    """QEMU 7.2 (TCG, memfd share=on guest RAM) as the vhost-user FRONT-END of ``socket_path``.

    QEMU connects to the socket the test listens on (chardev client) and realizes ``device``
    on it (``vhost-user-blk-pci``, ``vhost-user-fs-pci`` with ``extra_device_args="tag=fs"``, or
    ``virtio-net-pci``, which gets a vhost-user netdev and vectors=0, see PEERS.md). With
    ``stopped`` (-S, no kernel) it does only the realize-time handshake and then waits; ``extra``
    adds QEMU options (-kernel ... for a running guest). ``.qmp()`` opens its monitor; the device
    has id ``vhost0``, so its virtio state is at QOM path ``/machine/peripheral/vhost0/virtio-backend``.
    """
    support.require_commands(QEMU, install=APT_QEMU)
    with _workdir("qemu") as work:
        qmp = os.path.join(work, "qmp.sock")
        argv = [QEMU, "-nodefaults", "-no-user-config", "-nographic", "-display", "none",
                "-machine", "q35,accel=tcg,memory-backend=mem", "-m", memory,
                "-object", f"memory-backend-memfd,id=mem,size={memory},share=on",
                "-chardev", f"socket,id=chr0,path={_qemu_path(socket_path)}",
                "-qmp", f"unix:{_qemu_path(qmp)},server=on,wait=off"]
        if device == "virtio-net-pci":
            argv += ["-netdev", "vhost-user,id=net0,chardev=chr0"]
            device_args = "netdev=net0,vectors=0"
        else:
            device_args = "chardev=chr0"
        if extra_device_args:
            device_args += f",{extra_device_args}"
        argv += ["-device", f"{device},id=vhost0,{device_args}"]
        if stopped:
            argv.append("-S")
        argv += list(extra)
        # The QMP socket is created with the chardevs, before the device realizes (and blocks on
        # the handshake), so waiting for it does not wait for the test's answers.
        with _running("qemu", argv, work, socket_path, ready=(qmp,), qmp_path=qmp) as peer:
            yield peer


@contextlib.contextmanager
def vhost_min_blk(image_path: str, num_queues: int = 1, extra: Sequence[str] = (), *,
                  socket_path: str | None = None, fd: int | None = None, connect: str | None = None) -> Iterator[Peer]:
    """Our own back-end as users run it: ``python3 -m vhost_min blk --socket-path SOCK IMAGE`` in a
    child process, from this checkout; it returns once SOCK exists. SOCK is ``socket_path`` or one
    in its own directory; instead, ``fd`` serves that inherited socket (``--fd``) and ``connect``
    is client mode (``--connect PATH``, returning at once). It exits 0 on SIGTERM:
    ``.proc.returncode`` afterwards."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with _workdir("vhost-min-blk") as work:
        sock = socket_path or os.path.join(work, "vhost-user-blk.sock")
        if fd is not None:
            where, sock = ["--fd", str(fd)], ""
        elif connect is not None:
            where, sock = ["--connect", connect], connect
        else:
            where = ["--socket-path", sock]
        argv = [sys.executable, "-m", "vhost_min", "blk", *where, "--num-queues", str(num_queues),
                *extra, os.path.abspath(image_path)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
        with _running("vhost-min-blk", argv, work, sock, ready=(sock,) if where[0] == "--socket-path" else (),
                      env=env, pass_fds=() if fd is None else (fd,)) as peer:
            yield peer


# --------------------------------------------------------------------------------------------
# A wire tap: what really crossed a vhost-user socket, both ways
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tapped:
    """One message the tap relayed: ``to_backend`` for a front-end's request, False for a
    back-end's reply; ``session`` counts the front-end's connections (0, then 1 after a reconnect)."""

    session: int
    to_backend: bool
    request: int
    flags: int
    payload: bytes
    fd_targets: tuple[str, ...]     # readlink of each fd as it passed: /memfd:..., anon_inode:[eventfd]

    @property
    def name(self) -> str:
        return getattr(self.request, "name", str(self.request))

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_REPLY_MASK)

    def u64(self) -> int:
        return unpack_u64(self.payload, self.name)


class WireTap:
    """A relay between front-ends (connecting to ``path``) and the back-end at ``upstream``: every
    message is forwarded unchanged, flags and fds included, and recorded in ``messages``.

    A thin user of vhost_min.trace.Tracer (the ``trace`` command's core), run in a thread: each
    front-end connection gets its own connection to the back-end; when either side hangs up the
    other is closed too, as if they were connected directly. Eventfds and memory fds pass through
    as fds, so the data path never touches the tap; the back-end channel (SET_BACKEND_REQ_FD) is
    relayed through the tracer's socketpair but not recorded here (``messages`` holds the main
    socket's traffic). :meth:`ask` sends a request of the test's own to the back-end in the
    middle of a session (the front-end never sees it). Use it as a context manager.
    """

    def __init__(self, path: str, upstream: str) -> None:
        self.path, self.upstream = path, upstream
        self.messages: list[Tapped] = []
        self.errors: list[BaseException] = []
        self._tracer = Tracer(path, upstream, self._report)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"wire tap {path}", daemon=True)
        self._thread.start()

    @property
    def sessions(self) -> int:
        """Front-end connections accepted so far (the next session's number)."""
        return self._tracer.sessions

    def _report(self, event: Record | SessionEvent) -> None:
        if isinstance(event, Record):
            if event.channel == MAIN:
                self.messages.append(Tapped(event.session, event.sender == FRONTEND, event.request, event.flags,
                                            event.payload, event.fds))
        elif event.event == "closed" and event.by == "tracer" and event.channel == MAIN \
                and event.detail != "the tracer stopped":
            self.errors.append(VhostError(f"session {event.session}: {event.detail}"))

    def _run(self) -> None:
        try:
            self._tracer.run(self._stop)
        except BaseException as exc:   # noqa: BLE001 (reported to the test through .errors)
            self.errors.append(exc)

    def requests(self, session: int | None = None) -> list[Tapped]:
        """What the front-end sent (of one session, or all)."""
        return [m for m in list(self.messages) if m.to_backend and session in (None, m.session)]

    def names(self, session: int | None = None) -> list[str]:
        return [m.name for m in self.requests(session)]

    def reply_to(self, request: Tapped) -> Tapped | None:
        """The back-end's reply that followed ``request`` in its session (None: no reply)."""
        messages = list(self.messages)
        for m in messages[messages.index(request) + 1:]:
            if m.session == request.session and not m.to_backend and m.request == request.request:
                return m
            if m.session == request.session and m.to_backend:
                return None
        return None

    def ask(self, request: int, payload: bytes = b"", session: int | None = None,
            timeout: float = 10.0) -> Tapped:
        """Send ``request`` to the back-end of ``session`` (default: the latest) between the
        front-end's messages, and return the back-end's reply, which is not forwarded. Only for a
        moment when the front-end is quiet on the socket (its control path idle)."""
        done = threading.Event()
        answer: list[Tapped] = []
        number = self.sessions - 1 if session is None else session

        def on_reply(reply: Record | None) -> None:
            if reply is not None:
                answer.append(Tapped(number, False, reply.request, reply.flags, reply.payload, ()))
            done.set()
        self._tracer.call_soon(lambda: self._tracer.inject(number, request, payload, on_reply))
        if not done.wait(timeout) or not answer:
            raise AssertionError(f"the back-end did not answer the tap's {getattr(request, 'name', request)} "
                                 f"within {timeout} s")
        return answer[0]

    def close(self) -> None:
        """Stop relaying and close every connection and the listener (removing its socket)."""
        self._stop.set()
        self._tracer.stop()
        self._thread.join(10)
        self._tracer.close()

    def __enter__(self) -> WireTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
