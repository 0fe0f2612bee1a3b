"""virtio-blk through vhost-user: our back-end against qemu-storage-daemon, driven by a C front-end.

``python3 -m bench blk [--json] [--runs N] [--seconds S] [--rows NAME,...] [--profile [FILE]] [--markdown]``
(``--markdown``: also the README's table, between its markers; ``--rows``: only these workloads,
named as in WORKLOADS and DIRECT_WORKLOADS, each page-cached one with and without EVENT_IDX).

The client is bench/vublk.c (built with cc into a cache outside the clone, see bench/vublk.py): one
split ring of 128, N requests of fixed 3-descriptor chains in flight, completions found by polling
the used ring with notifications left on, so each back-end pays for its calls as under a guest.
That the client is not the limit is shown beside every row: the same workload against vublk's
null back-end (completes each request without I/O) is the client's ceiling, and each back-end's
busy share (its CPU over the wall time) says whether it, not the client, ran out of core. Without a
C compiler the Python BlkClient stands in, labelled so: it is the limit at depth 32.

Both back-ends serve the SAME raw image of 256 MiB, written in full, on tmpfs (/dev/shm) where
there is one, so every page is in memory and no writeback or journal runs under the writes (on
this machine's ext4, a 4 KiB buffered overwrite cost either back-end 50-190 us of CPU, the file
system's cost rather than the back-end's); both use buffered I/O and writeback (no fsync per
write), and after every write run the bench fdatasyncs the image, untimed. Ours is ``python3 -m vhost_min blk``;
qemu-storage-daemon exports a file blockdev as vhost-user-blk (its defaults: aio=threads, page
cache). With two or more cores the back-ends (and the null one) are pinned to the second core of
this process's affinity mask and the driver to the first, each process in a session of its own
(see :class:`Daemon`: the scheduler shares CPU between sessions). Each round also measures the
other work on the back-end's core (its busy time not spent by the back-end): on a shared machine,
that, not the back-end, is what a low busy share and a latency of milliseconds usually mean (vublk
says, for every 50 ms stall, whether the back-end waited for a CPU or slept).

Each row runs ``--runs`` rounds of null, ours, theirs (interleaved, ``--seconds`` each after a
0.5 s warm-up on the same connection); the figures of a side are those of its best round (highest
IOPS), its other rounds kept in ``--json``. CPU per request is the back-end's utime + stime (all
threads, from /proc/PID/task/*/schedstat) over the measured window, divided by the requests done
in it. ``--profile`` adds one randread_4k_qd32 run of ours under cProfile and prints its hottest
functions per request (FILE keeps the raw profile).

O_DIRECT rows (4 KiB random reads on an image on a real disk, ours with each ``--aio`` against
qemu-storage-daemon with cache.direct=on,aio=io_uring) run when the blk command has ``--cache``
and ``--aio`` (issue 8); until then :func:`direct_rows` says why they are skipped.
"""

from __future__ import annotations

import contextlib
import os
import platform
import pstats
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from bench import vublk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QSD = "qemu-storage-daemon"
QSD_APT = "apt-get install -y --no-install-recommends qemu-system-common"
IMAGE_SIZE = 256 << 20
QUEUE_SIZE = 128
WARMUP = 0.5
READY_TIMEOUT = 20.0

#: (name, vublk --rw, bytes per request, queue depth); each runs without and with EVENT_IDX.
WORKLOADS = [
    ("randread_4k_qd1", "randread", 4096, 1),
    ("randread_4k_qd32", "randread", 4096, 32),
    ("randwrite_4k_qd32", "randwrite", 4096, 32),
    ("read_64k_qd1", "read", 64 << 10, 1),
    ("read_64k_qd32", "read", 64 << 10, 32),
]

#: O_DIRECT rows: (name, --rw, bytes, depth), with EVENT_IDX (as Linux guests negotiate it).
DIRECT_WORKLOADS = [
    ("direct_randread_4k_qd1", "randread", 4096, 1),
    ("direct_randread_4k_qd32", "randread", 4096, 32),
]
#: Where the page-cached image goes when it is tmpfs (else the default temporary directory).
CACHED_DIR = "/dev/shm"
#: Where the O_DIRECT image goes: a directory on the machine's disk, not tmpfs.
DIRECT_DIR = "/var/tmp"
DIRECT_AIO = ("io_uring", "threads")
#: The README's table sits between these lines; ``--markdown`` prints a fresh copy of the lot.
README_BEGIN = "<!-- python3 -m bench blk --markdown: begin -->"
README_END = "<!-- python3 -m bench blk --markdown: end -->"


# --------------------------------------------------------------------------------------------
# The image and the back-end processes
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


def pinning() -> tuple[int | None, int | None]:
    """(driver core, back-end core): the first two cores this process may run on, or (None, None)."""
    cores = sorted(os.sched_getaffinity(0))
    return (cores[0], cores[1]) if len(cores) >= 2 else (None, None)


def _child_setup(cpu: int | None):
    def setup() -> None:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)   # PR_SET_PDEATHSIG: a killed bench leaves nothing
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})                      # before exec: every thread inherits it
    return setup


class Daemon:
    """One back-end process on a vhost-user socket, started by exact argv and stopped by its PID.

    Each starts a session of its own, as a daemon would: with the kernel's autogroup scheduling
    (sched_autogroup_enabled, the default) a session's share of the machine is split over its
    cores by its load there, so a back-end in the bench's session, beside a driver busy-polling on
    the other core, got half a share of its own core against other work, and a back-end with more
    threads on that core (qemu-storage-daemon's pool) got more of it."""

    def __init__(self, name: str, argv: list[str], sock: str, workdir: str, cpu: int | None,
                 env: dict | None = None) -> None:
        self.name, self.socket = name, sock
        self.log_path = os.path.join(workdir, f"{name}.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=ROOT, env=env, preexec_fn=_child_setup(cpu), start_new_session=True)
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
        """utime + stime of the process, exited threads included (/proc/PID/stat, in clock ticks)."""
        with open(f"/proc/{self.pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

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
def ours(image: str, workdir: str, cpu: int | None = None, extra: tuple[str, ...] = (), name: str = "ours",
         profile: str | None = None) -> Iterator[Daemon]:
    """``python3 -m vhost_min blk`` on a socket in ``workdir`` (under cProfile with ``profile``)."""
    sock = os.path.join(workdir, f"{name}.sock")
    argv = [sys.executable] + (["-m", "cProfile", "-o", profile] if profile else [])
    argv += ["-m", "vhost_min", "blk", "--socket-path", sock, *extra, image]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    daemon = Daemon(name, argv, sock, workdir, cpu, env)
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
def theirs(image: str, workdir: str, cpu: int | None = None, file_options: str = "", name: str = "qsd") -> Iterator[Daemon]:
    """qemu-storage-daemon exporting the image as vhost-user-blk (one queue, writable; its
    defaults, page cache and aio=threads, unless ``file_options`` says otherwise)."""
    sock = os.path.join(workdir, f"{name}.sock")
    path = os.path.abspath(image).replace(",", ",,")
    argv = [QSD, "--blockdev", f"driver=file,node-name=file0,filename={path}{file_options}",
            "--export", (f"type=vhost-user-blk,id=export0,node-name=file0,addr.type=unix,"
                         f"addr.path={sock.replace(',', ',,')},writable=on,num-queues=1")]
    daemon = Daemon(name, argv, sock, workdir, cpu)
    try:
        yield daemon
    finally:
        daemon.stop()


class Null:
    """vublk's null back-end, shaped like a Daemon for :func:`measure`."""

    name = "null"

    def __init__(self, proc) -> None:
        self.proc, self.socket, self.pid = proc, proc.socket, proc.pid

    def log(self) -> str:
        return ""


# --------------------------------------------------------------------------------------------
# One timed run
# --------------------------------------------------------------------------------------------

def measure(binary: str | None, daemon, rw: str, bs: int, qd: int, event_idx: bool, seconds: float,
            cpu: int | None) -> dict:
    """One run against ``daemon``: the C driver's figures, or the Python client's without a compiler."""
    try:
        if binary is None:
            return _measure_python(daemon, rw, bs, qd, event_idx, seconds)
        core = _only_core(daemon.pid)
        for _attempt in range(2):          # a back-end starved for the whole window by other work: once more
            before = _core_time(core), _process_cpu(daemon.pid), time.monotonic()
            r = vublk.drive(binary, daemon.socket, rw, bs, qd, seconds, warmup=WARMUP, event_idx=event_idx,
                            queue_size=QUEUE_SIZE, backend_pid=daemon.pid, cpu=cpu)
            after = _core_time(core), _process_cpu(daemon.pid), time.monotonic()
            if r["requests"]:
                break
        if r["stalls"]:                    # the first, with the ring's indexes (vublk.c says how to read them)
            first = r["stderr"].splitlines()[0] if r["stderr"] else ""
            print(f"    {daemon.name}, {rw} {bs} qd{qd}{' event_idx' if event_idx else ''}: {r['stalls']} stalls; {first}",
                  file=sys.stderr, flush=True)
        if r["returncode"] or r["bad_status"] or not r["requests"]:
            raise RuntimeError(f"vublk: exit {r['returncode']}, {r['bad_status']} requests failed of {r['requests']}")
    except Exception as exc:
        raise RuntimeError(f"{daemon.name} (pid {daemon.pid}), {rw} {bs} bytes at depth {qd}: {exc}; "
                           f"its output:\n{daemon.log()}") from exc
    n, wall = r["requests"], r["seconds"]
    threads = len(os.listdir(f"/proc/{daemon.pid}/task"))    # on a contended core, each thread gets a share
    return {"iops": r["iops"], "mib_s": r["mib_s"], "cpu_us_per_req": r["backend_cpu_s"] / n * 1e6,
            "backend_busy": r["backend_cpu_s"] / wall, "lat_us_p50": r["lat_us_p50"], "lat_us_p99": r["lat_us_p99"],
            "lat_us_mean": r["lat_us_mean"], "client_cpu_us_per_req": r["client_cpu_s"] / n * 1e6,
            "client_busy": r["client_cpu_s"] / wall, "kicks_per_req": r["kicks"] / n, "requests": n,
            "stalls": r["stalls"], "threads": threads,
            "core_other": (None if core is None else
                           round(max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / (after[2] - before[2]), 3))}


def _only_core(pid: int) -> int | None:
    """The core ``pid`` is pinned to, None when it may run on several."""
    cores = os.sched_getaffinity(pid)
    return next(iter(cores)) if len(cores) == 1 else None


def _core_time(core: int | None) -> float:
    """Seconds core ``core`` spent on anything but idle and iowait so far (/proc/stat: user, nice,
    system, irq, softirq, steal): with the back-end's own CPU taken off, the other work on its core."""
    if core is None:
        return 0.0
    name = f"cpu{core} "
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(name):
                v = [int(x) for x in line.split()[1:9]]
                return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")
    return 0.0


def _process_cpu(pid: int) -> float:
    """utime + stime of every thread of ``pid``, in seconds (schedstat's nanoseconds)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


def _measure_python(daemon, rw: str, bs: int, qd: int, event_idx: bool, seconds: float) -> dict:
    """The fallback client: our BlkClient in this process (its ring always negotiates EVENT_IDX)."""
    from itertools import cycle, islice

    from vhost_min.blk import BlkClient, BlkRequest
    from vhost_min.frontend import Frontend

    rng = random.Random(20261126)
    blocks = IMAGE_SIZE // bs
    offsets = ([rng.randrange(blocks) * bs for _ in range(1 << 14)] if rw.startswith("rand")
               else [i * bs for i in range(blocks)])
    data = random.Random(2).randbytes(bs)
    requests = [BlkRequest.write(at, data) if rw.endswith("write") else BlkRequest.read(at, bs) for at in offsets]
    with Frontend.connect(daemon.socket) as fe:
        client = BlkClient(fe, queue_size=QUEUE_SIZE, depth=qd, max_io=max(bs, 4096))
        source, clock = cycle(requests), time.perf_counter
        done = failed = 0
        cpu0, client0, start = _process_cpu(daemon.pid), time.process_time(), clock()
        client.submit(list(islice(source, qd)))
        while True:
            got = client.complete(1)
            done += len(got)
            failed += sum(c.status != 0 for c in got)
            if clock() >= start + seconds:
                break
            client.submit(list(islice(source, len(got))))
        while client.in_flight:
            got = client.complete(client.in_flight)
            done += len(got)
            failed += sum(c.status != 0 for c in got)
        wall = clock() - start
        cpu, client_cpu = _process_cpu(daemon.pid) - cpu0, time.process_time() - client0
    if failed:
        raise RuntimeError(f"{failed} of {done} requests failed")
    return {"iops": done / wall, "mib_s": done * bs / wall / (1 << 20), "cpu_us_per_req": cpu / done * 1e6,
            "backend_busy": cpu / wall, "lat_us_p50": None, "lat_us_p99": None, "lat_us_mean": wall / done * qd * 1e6,
            "client_cpu_us_per_req": client_cpu / done * 1e6, "client_busy": client_cpu / wall,
            "kicks_per_req": None, "requests": done, "stalls": None,
            "threads": len(os.listdir(f"/proc/{daemon.pid}/task")), "core_other": None}


def _best(runs: list[dict]) -> dict:
    best = dict(max(runs, key=lambda r: r["iops"]))
    best["runs_iops"] = [round(r["iops"]) for r in runs]
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in best.items()}


def run_rows(binary: str | None, sides: list, workloads: list, event_idx_modes: tuple, runs: int, seconds: float,
             driver_cpu: int | None, sync_fd: int | None) -> dict:
    """Every workload x EVENT_IDX mode, ``runs`` interleaved rounds of every side; the best of each."""
    rows = {}
    for name, rw, bs, qd in workloads:
        for event_idx in event_idx_modes:
            row = f"{name}_event_idx" if event_idx and len(event_idx_modes) > 1 else name
            got: dict[str, list] = {side: [] for side, _ in sides}
            for _ in range(runs):
                for side, daemon in sides:
                    got[side].append(measure(binary, daemon, rw, bs, qd, event_idx, seconds, driver_cpu))
                    if rw.endswith("write") and sync_fd is not None and side != "null":
                        os.fdatasync(sync_fd)      # untimed: no dirty pages carried into the next run
            best = {side: _best(r) for side, r in got.items()}
            entry = {"workload": name, "rw": rw, "bs": bs, "qd": qd, "event_idx": event_idx, **best}
            for side in best:
                if side.startswith("ours") and "theirs" in best:
                    suffix = side[len("ours"):]
                    entry[f"ratio{suffix}"] = round(best[side]["iops"] / best["theirs"]["iops"], 3)
                    entry[f"cpu_ratio{suffix}"] = round(best[side]["cpu_us_per_req"] / best["theirs"]["cpu_us_per_req"], 3)
            rows[row] = entry
            _progress(row, entry)
    return rows


def _progress(row: str, entry: dict) -> None:
    parts = [f"{side} {entry[side]['iops']:,.0f}" for side in entry if isinstance(entry[side], dict)]
    print(f"  {row}: IOPS " + ", ".join(parts), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# O_DIRECT rows (issue 8: --cache none and --aio on the blk command)
# --------------------------------------------------------------------------------------------

def direct_rows() -> str | None:
    """None when the O_DIRECT rows can run, else why not (one line)."""
    help_text = subprocess.run([sys.executable, "-m", "vhost_min", "blk", "--help"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout
    if "--cache" not in help_text or "--aio" not in help_text:
        return "not run: `python3 -m vhost_min blk` has no --cache/--aio yet (issue 8)"
    fs = _fs_type(DIRECT_DIR)
    if fs in ("tmpfs", "ramfs", "overlay", None):
        return f"not run: {DIRECT_DIR} is on {fs or 'an unknown file system'}, not a real disk"
    return None


def _fs_type(path: str) -> str | None:
    """The file system type of the mount holding ``path`` (/proc/self/mountinfo's longest prefix)."""
    path, best, kind = os.path.realpath(path), -1, None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mount, fstype = fields[4], fields[fields.index("-") + 1]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > best:
                best, kind = len(mount), fstype
    return kind


def run_direct(binary: str | None, runs: int, seconds: float, driver_cpu: int | None,
               backend_cpu: int | None, no_theirs: bool, workloads: list = DIRECT_WORKLOADS) -> dict:
    """Ours with --cache none and each --aio against qemu-storage-daemon cache.direct=on,aio=io_uring,
    on a 256 MiB image in DIRECT_DIR."""
    with tempfile.TemporaryDirectory(prefix="vhost_min-bench-direct-", dir=DIRECT_DIR) as work, \
            contextlib.ExitStack() as stack:
        image = os.path.join(work, "disk.img")
        make_image(image, IMAGE_SIZE)
        sides = [(f"ours_{aio}", stack.enter_context(ours(image, work, backend_cpu, ("--cache", "none", "--aio", aio),
                                                          name=f"ours-{aio}")))
                 for aio in DIRECT_AIO]
        if not no_theirs:
            sides.append(("theirs", stack.enter_context(theirs(image, work, backend_cpu,
                                                               ",cache.direct=on,aio=io_uring"))))
        return run_rows(binary, sides, workloads, (True,), runs, seconds, driver_cpu, None)


# --------------------------------------------------------------------------------------------
# The profile of our back-end
# --------------------------------------------------------------------------------------------

def profile_ours(binary: str | None, image: str, workdir: str, seconds: float, out: str | None,
                 driver_cpu: int | None, backend_cpu: int | None) -> dict:
    """One randread_4k_qd32 run against our back-end under cProfile; prints the hottest functions
    by own time, in microseconds per request."""
    path = out or os.path.join(workdir, "ours.prof")
    with ours(image, workdir, backend_cpu, name="ours-profiled", profile=path) as daemon:
        run = measure(binary, daemon, "randread", 4096, 32, False, seconds, driver_cpu)
    stats = pstats.Stats(path)
    n = run["requests"] * (seconds + WARMUP) / seconds if binary else run["requests"]   # the warm-up is profiled too
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:15]
    print(f"\ncProfile of our back-end, randread_4k_qd32: ~{n:,.0f} requests, {run['iops']:,.0f} IOPS and "
          f"{run['cpu_us_per_req']:.1f} us CPU per request under the profiler; top 15 by own time per request\n"
          f"  (epoll.poll is mostly idle waiting):")
    print(f"  {'own us/req':>10} {'cum us/req':>10} {'calls/req':>9}  function")
    top = []
    for (filename, line, name), (_cc, calls, tottime, cumtime, _callers) in rows:
        where = name if filename == "~" else (f"{os.path.relpath(filename, ROOT) if filename.startswith(ROOT) else os.path.basename(filename)}"
                                              f":{line}({name})")
        print(f"  {tottime / n * 1e6:10.2f} {cumtime / n * 1e6:10.2f} {calls / n:9.2f}  {where}")
        top.append({"function": where, "own_us_per_req": round(tottime / n * 1e6, 2),
                    "cum_us_per_req": round(cumtime / n * 1e6, 2), "calls_per_req": round(calls / n, 2)})
    if out:
        print(f"  (raw profile: {out}; python3 -m pstats {out})")
    return {"requests": round(n), "iops": round(run["iops"]), "cpu_us_per_req": round(run["cpu_us_per_req"], 2),
            "top": top}


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------

def _option(argv: list[str], name: str, default):
    if name not in argv:
        return default
    return type(default)(argv[argv.index(name) + 1])


def _figure(entry: dict, side: str) -> float | None:
    """IOPS for 4 KiB rows, MiB/s for the larger ones."""
    if side not in entry:
        return None
    return entry[side]["iops"] if entry["bs"] <= 4096 else entry[side]["mib_s"]


def table_rows(rows: dict, ours_sides: tuple[str, ...] = ("ours",)) -> tuple[list[str], list[list]]:
    """The printed table (also the README's): one line per row and per side of ours."""
    columns = ["workload", "unit", "ours", "qsd", "ours/qsd", "client ceiling", "cpu us/req ours", "qsd",
               "ours/qsd", "busy % ours/qsd", "other work % ours/qsd", "p50 us ours/qsd", "threads ours/qsd"]
    out = []
    for row, e in rows.items():
        for side in ours_sides:
            t = e.get("theirs")
            mine = e[side]
            label = row if len(ours_sides) == 1 else f"{row} ({side.replace('ours_', 'aio=')})"
            ratio = e.get(f"ratio{side[len('ours'):]}")
            figure = _figure(e, side)
            theirs_figure = _figure(e, "theirs")
            if e["bs"] > 4096 and t:
                ratio = round(figure / theirs_figure, 3)
            out.append([label, "IOPS" if e["bs"] <= 4096 else "MiB/s", figure, theirs_figure if t else "-",
                        ratio if t else "-", _figure(e, "null") if "null" in e else "-",
                        mine["cpu_us_per_req"], t["cpu_us_per_req"] if t else "-",
                        e.get(f"cpu_ratio{side[len('ours'):]}", "-"),
                        f"{mine['backend_busy'] * 100:.0f}/{t['backend_busy'] * 100:.0f}" if t
                        else f"{mine['backend_busy'] * 100:.0f}/-",
                        f"{_percent(mine.get('core_other'))}/{_percent(t.get('core_other')) if t else '-'}",
                        (f"{mine['lat_us_p50']:.1f}/{t['lat_us_p50']:.1f}" if t and mine["lat_us_p50"] is not None
                         else "-"),
                        f"{mine['threads']}/{t['threads']}" if t else f"{mine['threads']}/-"])
    return columns, out


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.0f}"


def markdown(columns: list[str], rows: list[list]) -> str:
    """The same table as Markdown, for the README."""
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.0f}" if v >= 100 else f"{v:.2f}"
        return str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def run(argv: list[str]) -> dict:
    from bench.__main__ import print_table

    seconds = _option(argv, "--seconds", 2.0)
    runs = _option(argv, "--runs", 3)
    want_markdown = "--markdown" in argv
    names = set(filter(None, _option(argv, "--rows", "").split(",")))
    unknown = names - {w[0] for w in WORKLOADS + DIRECT_WORKLOADS}
    if unknown:
        raise SystemExit(f"bench blk --rows: no workload {', '.join(sorted(unknown))}; there are "
                         f"{', '.join(w[0] for w in WORKLOADS + DIRECT_WORKLOADS)}")
    workloads = [w for w in WORKLOADS if not names or w[0] in names]
    direct_workloads = [w for w in DIRECT_WORKLOADS if not names or w[0] in names]
    profile_out = None
    if "--profile" in argv:
        at = argv.index("--profile") + 1
        if at < len(argv) and not argv[at].startswith("--"):
            profile_out = os.path.abspath(argv[at])
    binary = vublk.build()
    client = ("vublk (C, bench/vublk.c)" if binary else
              f"Python BlkClient with EVENT_IDX: no C compiler (install: {vublk.CC_INSTALL}); at depth 32 the client "
              f"is the limit")
    driver_cpu, backend_cpu = pinning()
    no_theirs = qsd_missing()
    version = None if no_theirs else qsd_version()
    load_before = os.getloadavg()
    print(f"blk: client {client}; ours = python3 -m vhost_min blk, qsd = {QSD} {version or '(missing)'}; "
          f"driver on core {driver_cpu}, back-ends on core {backend_cpu}", file=sys.stderr, flush=True)
    result: dict = {}
    image_dir = CACHED_DIR if _fs_type(CACHED_DIR) == "tmpfs" else None
    with tempfile.TemporaryDirectory(prefix="vhost_min-bench-blk-", dir=image_dir) as work:
        image = os.path.join(work, "disk.img")
        image_fs = _fs_type(work)
        make_image(image, IMAGE_SIZE)
        sync_fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with contextlib.ExitStack() as stack:
                sides = []
                if binary:
                    sides.append(("null", Null(stack.enter_context(vublk.null_backend(binary, work, backend_cpu,
                                                                                       IMAGE_SIZE)))))
                sides.append(("ours", stack.enter_context(ours(image, work, backend_cpu))))
                if not no_theirs:
                    sides.append(("theirs", stack.enter_context(theirs(image, work, backend_cpu))))
                for _, daemon in sides:                       # warm-up, untimed
                    measure(binary, daemon, "randread", 4096, 32, False, 0.3, driver_cpu)
                # The Python client runs in this process, always with EVENT_IDX: pin this process instead.
                modes = (False, True) if binary else (True,)
                mask = os.sched_getaffinity(0)
                if binary is None and driver_cpu is not None:
                    os.sched_setaffinity(0, {driver_cpu})
                try:
                    rows = run_rows(binary, sides, workloads, modes, runs, seconds, driver_cpu, sync_fd)
                finally:
                    os.sched_setaffinity(0, mask)
        finally:
            os.close(sync_fd)
        if "--profile" in argv:
            result["profile_randread_4k_qd32"] = profile_ours(binary, image, work, seconds, profile_out,
                                                              driver_cpu, backend_cpu)
    skipped = direct_rows() if direct_workloads else "not run: not among --rows"
    direct = {} if skipped else run_direct(binary, runs, seconds, driver_cpu, backend_cpu, no_theirs, direct_workloads)
    load_after = os.getloadavg()

    title = (f"blk: ours (python3 -m vhost_min blk) against {QSD} {version or '(missing)'} (qsd); client {client}; "
             f"python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs")
    columns, lines = table_rows(rows)
    print_table(title, columns, lines)
    if direct:
        dcolumns, dlines = table_rows(direct, tuple(f"ours_{aio}" for aio in DIRECT_AIO))
        print_table(f"\nO_DIRECT: image in {DIRECT_DIR} ({_fs_type(DIRECT_DIR)}); ours --cache none --aio X, "
                    f"qsd cache.direct=on,aio=io_uring", dcolumns, dlines)
    else:
        print(f"\nO_DIRECT rows {skipped}")
    print(f"notes: best of {runs} rounds of {seconds:g} s per side (after {WARMUP:g} s of warm-up), interleaved null, "
          f"ours, qsd; one {IMAGE_SIZE >> 20} MiB raw image on {image_fs} ({image_dir or tempfile.gettempdir()})\n"
          f"  shared by ours and qsd (buffered, writeback, fdatasync after each write run, untimed); split ring of "
          f"{QUEUE_SIZE}, rows with _event_idx negotiate VIRTIO_RING_F_EVENT_IDX;\n"
          f"  client ceiling = the same client against vublk's null back-end (no I/O); cpu = back-end CPU (all "
          f"threads) per request; busy = back-end CPU / wall time\n"
          f"  (near 100% at qd32: the back-end, not the client, is the limit); other work = the back-end core's busy time"
          f" (steal included)\n  not spent by the back-end, over its round (above a few %, the row measured the machine"
          f" more than the back-end); p50 = median latency seen by the client;"
          f"\n  threads = the back-end's threads after the run (on a core shared with other work, each gets a share)."
          f"\n  load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (other work on this machine "
          f"takes CPU from both sides).")
    if want_markdown:                      # the README's fragment, between its "bench blk" markers
        print(f"\n{README_BEGIN}\n{markdown(columns, lines)}\n")
        if direct:
            print(f"O_DIRECT, image on {_fs_type(DIRECT_DIR)} in {DIRECT_DIR}, ours `--cache none --aio X` against qsd "
                  f"`cache.direct=on,aio=io_uring`, with EVENT_IDX:\n")
            print(markdown(*table_rows(direct, tuple(f"ours_{aio}" for aio in DIRECT_AIO))) + "\n")
        else:
            print(f"O_DIRECT rows {skipped}.\n")
        print(f"`python3 -m bench blk --runs {runs} --seconds {seconds:g}` on {time.strftime('%Y-%m-%d', time.gmtime())}: "
              f"{client}, {QSD} {version}, python {platform.python_version()}, {platform.machine()}, "
              f"{os.cpu_count()} CPUs shared with other work (load average {load_before[0]:.1f}-{load_after[0]:.1f}); "
              f"best of {runs} interleaved rounds; client ceiling = the same client against a null back-end; "
              f"busy = back-end CPU / wall time.\n{README_END}")
    sys.stdout.flush()
    result.update({"rows": rows, "o_direct": direct or {"skipped": skipped}, "client": client,
                   "seconds": seconds, "runs": runs, "warmup": WARMUP, "statistic": "best", "queue_size": QUEUE_SIZE,
                   "image_mib": IMAGE_SIZE >> 20, "image_fs": image_fs, "theirs": None if no_theirs else f"{QSD} {version}",
                   "pinning": {"driver": driver_cpu, "backends": backend_cpu},
                   "loadavg": [round(load_before[0], 2), round(load_after[0], 2)],
                   "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()})
    return result
