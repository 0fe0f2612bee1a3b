"""virtio-blk through vhost-user: our BlkClient against our back-end and against qemu-storage-daemon.

Both back-ends run in processes of their own, started here (``_serve`` below for ours: BlkDevice
under vhost_min.backend.serve; qemu-storage-daemon with a file blockdev and a vhost-user-blk
export). Both serve the SAME raw image file, written in full (no holes, nothing unwritten) and
read once, so the page cache holds all of it for both sides; neither opens it O_DIRECT, and both
complete writes in writeback mode (no fsync per write). After every write run the bench
fdatasyncs the image, untimed, so neither side meets the other's dirty pages being written back.

The client is the same for both sides: one BlkClient (split ring of 128, event idx, no indirect
descriptors) in this process, keeping ``depth`` requests in flight for a fixed time. Each
workload runs ``--repeat`` rounds of ours then theirs, ``--seconds`` each; every figure is the
median of its rounds. The back-end's CPU is utime + stime of its process from /proc/PID/stat (all
threads, qemu-storage-daemon's thread pool included) over the run, divided by the requests done.

``python3 -m bench blk [--json] [--seconds S] [--repeat N] [--profile [FILE]]``; ``--profile``
adds one more randread_4k_qd32 run of ours with the back-end under cProfile and prints its
hottest functions (FILE keeps the raw profile).

Also ``python3 -m bench.blk serve SOCKET IMAGE``: our back-end as the bench runs it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import pstats
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from itertools import cycle, islice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QSD = "qemu-storage-daemon"
QSD_APT = "apt-get install -y --no-install-recommends qemu-system-common"
IMAGE_SIZE = 256 << 20
QUEUE_SIZE = 128
READY_TIMEOUT = 20.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")

#: (name, request type, bytes per request, queue depth, pattern)
WORKLOADS = [
    ("randread_4k_qd1", "read", 4096, 1, "random"),
    ("randread_4k_qd32", "read", 4096, 32, "random"),
    ("randwrite_4k_qd1", "write", 4096, 1, "random"),
    ("randwrite_4k_qd32", "write", 4096, 32, "random"),
    ("seqread_64k_qd32", "read", 64 << 10, 32, "sequential"),
]


# --------------------------------------------------------------------------------------------
# The image and the two back-end processes
# --------------------------------------------------------------------------------------------

def make_image(path: str, size: int) -> None:
    """A raw image of ``size`` bytes, every block written (no holes), on disk and in the page cache."""
    chunk = random.Random(1).randbytes(1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for offset in range(0, size, len(chunk)):
            os.pwrite(fd, chunk[:size - offset], offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(path, "rb", buffering=0) as f:     # warm: every page in the cache
        while f.read(1 << 20):
            pass


_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    _libc.prctl(1, signal.SIGTERM, 0, 0, 0)     # PR_SET_PDEATHSIG: a killed bench leaves nothing behind


class Daemon:
    """One back-end process on a vhost-user socket; :meth:`cpu_seconds` is its utime + stime."""

    def __init__(self, name: str, argv: list[str], sock: str, workdir: str, env: dict | None = None) -> None:
        self.name, self.socket = name, sock
        self.log_path = os.path.join(workdir, f"{name}.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=workdir, env=env, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + READY_TIMEOUT
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{name} did not create {sock}; its output:\n{self.log()}")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK     # utime, stime (fields 14, 15)

    def log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-4000:].decode(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """SIGTERM exactly this PID (ours exits cleanly, writing its profile), SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def ours(image: str, workdir: str, profile: str | None = None) -> Iterator[Daemon]:
    """Our BlkDevice served by vhost_min.backend.serve in its own Python process."""
    sock = os.path.join(workdir, "ours.sock" if profile is None else "ours-profiled.sock")
    argv = [sys.executable]
    if profile is not None:
        argv += ["-m", "cProfile", "-o", profile]
    argv += ["-m", "bench.blk", "serve", sock, image]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    daemon = Daemon("ours", argv, sock, workdir, env)
    try:
        yield daemon
    finally:
        daemon.stop()


def qsd_missing() -> bool:
    if shutil.which(QSD):
        return False
    print(f"{QSD} is not installed: theirs is null. Install it with: {QSD_APT}")
    return True


def qsd_version() -> str | None:
    try:
        out = subprocess.run([QSD, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.split("\n", 1)[0].replace("qemu-storage-daemon version ", "") or None


@contextlib.contextmanager
def theirs(image: str, workdir: str) -> Iterator[Daemon]:
    """qemu-storage-daemon exporting the image as vhost-user-blk (one queue, writable, its
    defaults otherwise: page cache, aio=threads, writeback)."""
    sock = os.path.join(workdir, "qsd.sock")
    path = os.path.abspath(image).replace(",", ",,")
    argv = [QSD, "--blockdev", f"driver=file,node-name=file0,filename={path}",
            "--export", (f"type=vhost-user-blk,id=export0,node-name=file0,addr.type=unix,"
                         f"addr.path={sock.replace(',', ',,')},writable=on,num-queues=1")]
    daemon = Daemon("qemu-storage-daemon", argv, sock, workdir)
    try:
        yield daemon
    finally:
        daemon.stop()


def _serve(argv: list[str]) -> int:
    """``python3 -m bench.blk serve SOCKET IMAGE``: BlkDevice on SOCKET until SIGTERM."""
    sock, image = argv
    from vhost_min.backend import serve
    from vhost_min.blk import BlkDevice

    def stop(signum, frame):
        raise SystemExit(0)     # unwinds serve() (closing everything) and lets cProfile write its file

    signal.signal(signal.SIGTERM, stop)
    with BlkDevice(image) as device:
        serve(device, sock)
    return 0


# --------------------------------------------------------------------------------------------
# One timed run
# --------------------------------------------------------------------------------------------

def _requests(op: str, size: int, pattern: str, image_size: int) -> list:
    from vhost_min.blk import BlkRequest
    if pattern == "random":
        rng = random.Random(20261126)      # the same offsets for both sides
        offsets = [rng.randrange(image_size // size) * size for _ in range(1 << 16)]
    else:
        offsets = [(i * size) % image_size for i in range(image_size // size)]
    if op == "read":
        return [BlkRequest.read(at, size) for at in offsets]
    data = random.Random(2).randbytes(size)
    return [BlkRequest.write(at, data) for at in offsets]


def run_once(daemon: Daemon, requests: list, size: int, depth: int, seconds: float, sync_fd: int | None) -> dict:
    """Keep ``depth`` requests in flight for ``seconds`` on a fresh connection; the back-end's
    CPU and the clock run from the first submit to the last completion (the handshake is outside)."""
    try:
        return _run_once(daemon, requests, size, depth, seconds, sync_fd)
    except Exception as exc:
        raise RuntimeError(f"{daemon.name} (pid {daemon.pid}), {size}-byte requests at depth {depth}: {exc}; "
                           f"its output:\n{daemon.log()}") from exc


def _run_once(daemon: Daemon, requests: list, size: int, depth: int, seconds: float, sync_fd: int | None) -> dict:
    from vhost_min.blk import BlkClient
    from vhost_min.frontend import Frontend

    with Frontend.connect(daemon.socket) as fe:
        client = BlkClient(fe, queue_size=QUEUE_SIZE, depth=depth, max_io=max(size, 4096))
        submit, complete, clock = client.submit, client.complete, time.perf_counter
        source = cycle(requests)
        done = failed = 0
        cpu0, client0, start = daemon.cpu_seconds(), time.process_time(), clock()
        deadline = start + seconds
        submit(list(islice(source, depth)))
        while True:
            got = complete(1)
            done += len(got)
            for c in got:
                failed += c.status != 0
            if clock() >= deadline:
                break
            submit(list(islice(source, len(got))))
        while client.in_flight:
            got = complete(client.in_flight)
            done += len(got)
            for c in got:
                failed += c.status != 0
        elapsed = clock() - start
        cpu, client_cpu = daemon.cpu_seconds() - cpu0, time.process_time() - client0
    if failed:
        raise RuntimeError(f"{daemon.name}: {failed} of {done} requests failed")
    if sync_fd is not None:
        os.fdatasync(sync_fd)          # untimed: no dirty pages carried into the next run
    time.sleep(0.05)                   # let the back-end finish with the connection
    iops = done / elapsed
    return {"iops": iops, "mib_s": iops * size / (1 << 20), "cpu_s_per_req": cpu / done,
            "backend_cpu_util": cpu / elapsed, "client_cpu_s_per_req": client_cpu / done, "requests": done}


def _median(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def _rounded(side: dict | None) -> dict | None:
    if side is None:
        return None
    return {"iops": round(side["iops"]), "mib_s": round(side["mib_s"], 1),
            "cpu_s_per_req": float(f"{side['cpu_s_per_req']:.4g}"),
            "backend_cpu_util": round(side["backend_cpu_util"], 3),
            "client_cpu_s_per_req": float(f"{side['client_cpu_s_per_req']:.4g}")}


# --------------------------------------------------------------------------------------------
# The profile of our back-end
# --------------------------------------------------------------------------------------------

def profile_ours(image: str, workdir: str, seconds: float, out: str | None) -> dict:
    """One randread_4k_qd32 run against our back-end under cProfile; prints the hottest functions
    by own time, in microseconds per request."""
    path = out or os.path.join(workdir, "ours.prof")
    requests = _requests("read", 4096, "random", IMAGE_SIZE)
    with ours(image, workdir, profile=path) as daemon:
        run = run_once(daemon, requests, 4096, 32, seconds, None)
    stats = pstats.Stats(path)
    n = run["requests"]
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:15]
    print(f"\ncProfile (wall clock) of our back-end, randread_4k_qd32: {n:,} requests, {run['iops']:,.0f} IOPS and "
          f"{run['cpu_s_per_req'] * 1e6:.1f} us CPU per request under the profiler; top 15 by own time per request\n"
          f"  (epoll.poll is idle waiting; eventfd_write is mostly the wait while the client it wakes runs first):")
    print(f"  {'own us/req':>10} {'cum us/req':>10} {'calls/req':>9}  function")
    top = []
    for (filename, line, name), (_cc, calls, tottime, cumtime, _callers) in rows:
        where = name if filename == "~" else f"{os.path.relpath(filename, ROOT) if filename.startswith(ROOT) else os.path.basename(filename)}:{line}({name})"
        print(f"  {tottime / n * 1e6:10.2f} {cumtime / n * 1e6:10.2f} {calls / n:9.2f}  {where}")
        top.append({"function": where, "own_us_per_req": round(tottime / n * 1e6, 2),
                    "cum_us_per_req": round(cumtime / n * 1e6, 2), "calls_per_req": round(calls / n, 2)})
    if out:
        print(f"  (raw profile: {out}; python3 -m pstats {out})")
    return {"requests": n, "iops": round(run["iops"]), "cpu_s_per_req": float(f"{run['cpu_s_per_req']:.4g}"),
            "top": top}


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------

def _option(argv: list[str], name: str, default):
    if name not in argv:
        return default
    return type(default)(argv[argv.index(name) + 1])


def run(argv: list[str]) -> dict:
    from bench.__main__ import print_table

    seconds = _option(argv, "--seconds", 2.0)
    repeat = _option(argv, "--repeat", 3)
    profile = "--profile" in argv
    profile_out = None
    if profile:
        at = argv.index("--profile") + 1
        if at < len(argv) and not argv[at].startswith("--"):
            profile_out = os.path.abspath(argv[at])
    no_theirs = qsd_missing()
    result: dict = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="vhost_min-bench-blk-") as work:
        image = os.path.join(work, "disk.img")
        make_image(image, IMAGE_SIZE)
        sync_fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with contextlib.ExitStack() as stack:
                mine = stack.enter_context(ours(image, work))
                other = None if no_theirs else stack.enter_context(theirs(image, work))
                sides = [("ours", mine)] + ([("theirs", other)] if other else [])
                warm = _requests("read", 4096, "random", IMAGE_SIZE)
                for _, daemon in sides:                       # warm-up, untimed
                    run_once(daemon, warm, 4096, 32, 0.3, None)
                for name, op, size, depth, pattern in WORKLOADS:
                    requests = _requests(op, size, pattern, IMAGE_SIZE)
                    runs: dict[str, list] = {side: [] for side, _ in sides}
                    for _ in range(repeat):                   # ours, theirs, ours, theirs, ...
                        for side, daemon in sides:
                            runs[side].append(run_once(daemon, requests, size, depth, seconds,
                                                       sync_fd if op == "write" else None))
                    o = _median(runs["ours"])
                    t = _median(runs["theirs"]) if other else None
                    result[name] = {"ours": _rounded(o), "theirs": _rounded(t),
                                    "ratio_iops": round(o["iops"] / t["iops"], 3) if t else None,
                                    "ratio_cpu": round(o["cpu_s_per_req"] / t["cpu_s_per_req"], 3) if t else None}
                    dash = "-"
                    rows.append([name, o["iops"], t["iops"] if t else dash,
                                 o["iops"] / t["iops"] if t else dash,
                                 o["mib_s"], t["mib_s"] if t else dash,
                                 o["cpu_s_per_req"] * 1e6, t["cpu_s_per_req"] * 1e6 if t else dash,
                                 o["cpu_s_per_req"] / t["cpu_s_per_req"] if t else dash,
                                 f"{o['backend_cpu_util'] * 100:.0f}/{t['backend_cpu_util'] * 100:.0f}" if t
                                 else f"{o['backend_cpu_util'] * 100:.0f}/-",
                                 f"{o['client_cpu_s_per_req'] * 1e6:.1f}/{t['client_cpu_s_per_req'] * 1e6:.1f}" if t
                                 else f"{o['client_cpu_s_per_req'] * 1e6:.1f}/-"])
        finally:
            os.close(sync_fd)
        version = None if no_theirs else qsd_version()
        print_table(f"blk: our BlkClient against our back-end (ours) and {QSD} {version or '(missing)'} "
                    f"(theirs); python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs",
                    ["workload", "IOPS ours", "IOPS theirs", "ours/theirs", "MiB/s ours", "MiB/s theirs",
                     "cpu us/req ours", "theirs", "ours/theirs", "backend busy % o/t", "client us/req o/t"], rows)
        print(f"notes: median of {repeat} rounds of {seconds:g} s per side, interleaved ours, theirs, ours, theirs; "
              f"one {IMAGE_SIZE >> 20} MiB raw image\n"
              f"  shared by both, fully written and in the page cache (buffered I/O, writeback, fdatasync after each "
              f"write run, untimed);\n"
              f"  same client (split ring {QUEUE_SIZE}, event idx) in this process; cpu = back-end utime+stime per "
              f"request (/proc/PID/stat, all threads);\n"
              f"  busy % = back-end CPU / wall time; client us/req = this process's CPU per request. ratios: "
              f"ours/theirs.")
        sys.stdout.flush()
        if profile:
            result["profile_randread_4k_qd32"] = profile_ours(image, work, seconds, profile_out)
    result.update({"seconds": seconds, "repeat": repeat, "statistic": "median", "image_mib": IMAGE_SIZE >> 20,
                   "theirs": None if no_theirs else f"{QSD} {version}", "python": platform.python_version(),
                   "machine": platform.machine(), "cpus": os.cpu_count()})
    sys.stdout.flush()
    return result


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        sys.exit(_serve(sys.argv[2:]))
    print("usage: python3 -m bench.blk serve SOCKET IMAGE   (the benchmark itself: python3 -m bench blk)")
    sys.exit(2)
