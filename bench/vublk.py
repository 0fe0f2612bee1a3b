"""bench/vublk.c from Python: built with the C compiler into a cache outside the clone, run, read.

vublk is the project's own vhost-user-blk front-end in C (a Python client cannot keep a back-end
busy at depth 32) and, with ``--null-backend``, a back-end that completes every request without
I/O: the driver's own ceiling. :func:`build` compiles it once per source hash into
``$VHOST_MIN_CACHE/bench`` (default ``~/.cache/vhost_min/bench``) and returns None when there is
no compiler; :func:`drive` runs one timed measurement and returns the driver's JSON object;
:func:`handshakes` times connect to first read; :func:`pattern` is the byte pattern ``--pattern
SEED`` writes and checks, for tests that look at the image itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "vublk.c")
CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror"]
CC_INSTALL = "apt-get install -y --no-install-recommends gcc libc6-dev"
_MASK64 = (1 << 64) - 1


def cache_dir() -> str:
    """Where the built driver is kept: ``$VHOST_MIN_CACHE/bench`` or ``~/.cache/vhost_min/bench``."""
    base = os.environ.get("VHOST_MIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vhost_min")
    path = os.path.join(base, "bench")
    os.makedirs(path, exist_ok=True)
    return path


def compiler() -> str | None:
    """$CC, else cc, gcc or clang on PATH, else None."""
    for name in ([os.environ["CC"]] if os.environ.get("CC") else []) + ["cc", "gcc", "clang"]:
        path = shutil.which(name)
        if path:
            return path
    return None


def build() -> str | None:
    """The path of the built driver (compiled now if this source was never built), or None when
    no C compiler exists. A source that does not compile raises RuntimeError with the compiler's words."""
    cc = compiler()
    if cc is None:
        return None
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    binary = os.path.join(cache_dir(), f"vublk-{digest}")
    if os.access(binary, os.X_OK):
        return binary
    fd, partial = tempfile.mkstemp(prefix="vublk-", dir=os.path.dirname(binary))
    os.close(fd)
    try:
        result = subprocess.run([cc, *CFLAGS, "-o", partial, SOURCE], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{cc} could not build {SOURCE}:\n{result.stderr}")
        os.chmod(partial, 0o755)
        os.replace(partial, binary)             # atomic: a concurrent bench sees all of it or nothing
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    return binary


def _pinned(cpu: int | None):
    """The child's setup: dies with its parent (PR_SET_PDEATHSIG; it runs in a session of its own,
    so a ^C does not reach it) and runs on ``cpu`` when given."""
    def setup() -> None:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)    # PR_SET_PDEATHSIG
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
    return setup


def drive(binary: str, socket: str, rw: str, bs: int, qd: int, seconds: float, *, warmup: float = 0.5,
          event_idx: bool = False, wait_call: bool = False, queue_size: int = 128, backend_pid: int | None = None,
          pattern: int | None = None, size: int | None = None, count: int | None = None,
          cpu: int | None = None) -> dict:
    """One timed run of the driver against the back-end on ``socket`` (``count``: stop after that many
    requests): its JSON object (iops, mib_s,
    lat_us_*, client_cpu_s, backend_cpu_s, bad_status, mismatches, ...). Raises RuntimeError when it
    fails, with what it said."""
    argv = [binary, "--socket", socket, "--rw", rw, "--bs", str(bs), "--qd", str(qd), "--seconds", str(seconds),
            "--warmup", str(warmup), "--queue-size", str(queue_size)]
    argv += ["--event-idx"] if event_idx else []
    argv += ["--wait-call"] if wait_call else []
    argv += ["--backend-pid", str(backend_pid)] if backend_pid else []
    argv += ["--pattern", str(pattern)] if pattern is not None else []
    argv += ["--size", str(size)] if size else []
    argv += ["--count", str(count)] if count else []
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + warmup + 60,
                            preexec_fn=_pinned(cpu), start_new_session=True)
    lines = result.stdout.strip().splitlines()
    if not lines or not lines[-1].startswith("{"):
        raise RuntimeError(f"vublk {' '.join(argv[1:])} exited with {result.returncode}: {result.stderr.strip()}")
    report = json.loads(lines[-1])
    report["returncode"] = result.returncode
    report["stderr"] = result.stderr.strip()        # stall descriptions, if any
    return report


def handshakes(binary: str, socket: str, count: int, *, need_reply: str = "all", backend_pid: int | None = None,
               cpu: int | None = None) -> dict:
    """``count`` handshakes against the back-end on ``socket`` (``vublk --handshakes``: connect,
    negotiate, memory, one ring, one 4 KiB read, close, 10 ms apart): lists ``connect_us``,
    ``bring_up_us``, ``first_read_us`` and ``ready_us`` (one figure per handshake), and
    ``backend_cpu_s`` over all of them. ``need_reply``: "all" (NEED_REPLY on every request without a
    reply of its own, once REPLY_ACK is negotiated) or "mem-table" (only SET_MEM_TABLE's, as QEMU 7.2
    asks). Raises RuntimeError when it fails, with what it said."""
    argv = [binary, "--socket", socket, "--handshakes", str(count), "--need-reply", need_reply]
    argv += ["--backend-pid", str(backend_pid)] if backend_pid else []
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60 + count,
                            preexec_fn=_pinned(cpu), start_new_session=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode or not lines or not lines[-1].startswith("{"):
        raise RuntimeError(f"vublk {' '.join(argv[1:])} exited with {result.returncode}: {result.stderr.strip()}")
    return json.loads(lines[-1])


@contextlib.contextmanager
def null_backend(binary: str, workdir: str, cpu: int | None = None, size: int = 256 << 20) -> Iterator:
    """``vublk --null-backend`` on a socket in ``workdir``: yields its Popen (``.socket`` set)."""
    sock = os.path.join(workdir, "null.sock")
    proc = subprocess.Popen([binary, "--null-backend", "--socket", sock, "--size", str(size)],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_pinned(cpu),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vublk --null-backend did not listen on {sock}: {proc.stderr.read().decode()}")
            time.sleep(0.01)
        proc.socket = sock
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()                    # exactly this PID
            proc.wait(10)
        proc.stderr.close()


def pattern(seed: int, offset: int, length: int) -> bytes:
    """The bytes ``vublk --pattern SEED`` writes at image ``offset`` (8-aligned): each aligned
    8-byte word little-endian splitmix64(SEED ^ its offset)."""
    out = bytearray()
    for at in range(offset, offset + length, 8):
        z = ((seed ^ at) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        out += (z ^ (z >> 31)).to_bytes(8, "little")
    return bytes(out)
