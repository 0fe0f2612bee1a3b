"""virtio-net through vhost-user: our NetDevice against DPDK's own vhost PMD, driven by dpdk-testpmd.

``python3 -m bench net [--json] [--runs N] [--seconds S] [--profile [FILE]]``

Two directions, 64-byte frames, one queue pair, split ring, mergeable RX buffers (virtio-user's
defaults):

- into the back-end: testpmd's net_virtio_user port in txonly mode sends into ``python3 -m
  vhost_min net --loopback`` (ours: each frame is taken off the TX ring and offered to the RX
  ring, which testpmd never empties in txonly, so it is dropped there and counted), and into
  testpmd's net_vhost port in rxonly mode (DPDK's);
- out of the back-end: ours is a NetDevice whose RX frames come from a generator (this module run
  as ``python3 -m bench.net --source SOCKET``: every RX buffer the driver posts gets the same
  64-byte frame through NetDevice's loopback delivery path), DPDK's is net_vhost in txonly mode;
  the virtio-user port runs rxonly.

Mpps are testpmd's own throughput lines (``--stats-period 1``: Tx-pps of the sender, Rx-pps of
the receiver, TSC-timed), averaged over the measured seconds after a 2 s warm-up. Each back-end's
CPU (ours; testpmd's net_vhost process for DPDK's, whose forwarding core busy-polls) is utime +
stime of all its threads (schedstat) over the same seconds: its share of a core, its CPU seconds
per million frames, and the Mpps one whole core would carry at that cost ("per core").
Each run takes ours and DPDK's in turn (interleaved); the best run of each side is reported, the
others kept in ``--json``. With two cores the back-end runs on the second core of this process's
affinity mask, testpmd's virtio-user forwarding core on the first.

DPDK's figures per core understate it: its forwarding core polls whether or not frames come, so its
CPU is what the scheduler gave it, not what the frames cost; ours sleeps when its rings are idle.

On this project's 2-core machines, other work shares the cores: both sides lose to it, which is
why the runs interleave and the best is kept; the CPU per frame of ours is the figure that load
does not move much.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.blk import Daemon, _child_setup, _process_cpu, pinning

TESTPMD = "dpdk-testpmd"
DPDK_APT = ("apt-get install -y --no-install-recommends dpdk-dev librte-net-vhost23 librte-net-virtio23 "
            "librte-mempool-ring23")
DPDK_RUNTIME_DIR = "/var/run/dpdk"
FRAME = 64
WARMUP = 2.0
#: The frame the generator sends: broadcast, from 52:54:00:00:00:01, IPv4/UDP 198.18.0.1 -> .2, 64 bytes.
SOURCE_FRAME = bytes.fromhex("ffffffffffff525400000001" "0800" "45000032000000004011"
                             "0000c6120001c6120002" "00090009001e0000").ljust(FRAME, b"\0")


# --------------------------------------------------------------------------------------------
# The generator back-end (ours, reverse direction)
# --------------------------------------------------------------------------------------------

def source_device():
    """A NetDevice whose RX queue is filled with SOURCE_FRAME whenever the driver offers buffers,
    through NetDevice's own delivery (the path loopback frames take), polled while busy."""
    from vhost_min.net import NetDevice

    class SourceNet(NetDevice):
        frames = [memoryview(SOURCE_FRAME[:FRAME])] * 256

        def process(self, queue: int, vq):
            if queue % 2 or queue == self.ctrl_queue:
                return super().process(queue, vq)
            n = vq.pending()
            if not n:
                return vq.enable_notifications()
            vq.disable_notifications()
            self._deliver(queue // 2, self.frames[:min(n, 256)])
            return True

    return SourceNet(mac=bytes.fromhex("525400000001"))


def source_main(argv: list[str]) -> int:
    """``python3 -m bench.net --source SOCKET``: serve the generator until SIGTERM."""
    from vhost_min.backend import serve
    serve(source_device(), argv[1])
    return 0


# --------------------------------------------------------------------------------------------
# testpmd
# --------------------------------------------------------------------------------------------

class Testpmd:
    """One dpdk-testpmd with one vdev port, forwarding from the start, stats every second."""

    def __init__(self, name: str, vdev: str, mode: str, workdir: str, main_lcore: int) -> None:
        self.name = name
        self.prefix = f"vhost_min-bench-{os.getpid()}-{name}-{time.monotonic_ns() % 10**9}"
        self.log_path = os.path.join(workdir, f"{name}.log")
        argv = [TESTPMD, "--no-huge", "-m", "256", "--no-pci", "-l", "0,1", "--main-lcore", str(main_lcore),
                f"--file-prefix={self.prefix}", "--vdev", vdev, "--", "--total-num-mbufs=8192", "--rxq=1",
                "--txq=1", "--auto-start", "--stats-period", "1", f"--forward-mode={mode}", f"--txpkts={FRAME}"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=workdir, preexec_fn=_child_setup(None))
        self.started = time.monotonic()

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def rates(self, what: str) -> list[float]:
        """Every ``Rx-pps``/``Tx-pps`` figure printed so far, in order."""
        return [float(v) for v in re.findall(rf"{what}-pps:\s*(\d+)", self.log())]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(os.path.join(DPDK_RUNTIME_DIR, self.prefix), ignore_errors=True)


@contextlib.contextmanager
def testpmd(*args, **kwargs) -> Iterator[Testpmd]:
    pmd = Testpmd(*args, **kwargs)
    try:
        yield pmd
    finally:
        pmd.stop()


def _wait_path(path: str, proc: subprocess.Popen, what: str, log) -> None:
    deadline = time.monotonic() + 20
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not create {path}:\n{log()[-3000:]}")
        time.sleep(0.02)


def _window(pmd: Testpmd, what: str, seconds: float, backend_pid: int | None) -> dict:
    """Wait out the warm-up and ``seconds`` more; the mean of the rates printed in that window (and
    the back-end's CPU over it)."""
    deadline = time.monotonic() + 30
    while not pmd.rates(what):                  # up and forwarding: its first stats block is out
        if pmd.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"testpmd {pmd.name} did not start forwarding:\n{pmd.log()[-3000:]}")
        time.sleep(0.1)
    time.sleep(WARMUP)
    before = len(pmd.rates(what))
    cpu0 = _process_cpu(backend_pid) if backend_pid else None
    t0 = time.monotonic()
    time.sleep(seconds)
    cpu = _process_cpu(backend_pid) - cpu0 if backend_pid else None
    wall = time.monotonic() - t0
    deadline = time.monotonic() + 5
    while len(pmd.rates(what)) <= before and pmd.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)                         # a starved testpmd printed nothing yet: its next line
    rates = pmd.rates(what)[before:]
    if pmd.proc.poll() is not None or not rates:
        raise RuntimeError(f"testpmd {pmd.name} printed no {what}-pps in the window:\n{pmd.log()[-3000:]}")
    mpps = sum(rates) / len(rates) / 1e6
    entry = {"mpps": round(mpps, 4), "rates": [round(r / 1e6, 4) for r in rates]}
    if cpu is not None:
        entry["cpu_share"] = round(cpu / wall, 3)
        entry["cpu_s_per_mpkt"] = round(cpu / wall / mpps, 3) if mpps else None
        # What one whole core would carry at this cost per frame.
        entry["mpps_per_core"] = round(mpps / (cpu / wall), 3) if cpu else None
    return entry


def run_ours(direction: str, seconds: float, cpu: int | None, workdir: str, profile: str | None = None) -> dict:
    sock = os.path.join(workdir, f"ours-{direction}.sock")
    if direction == "rx":
        argv = [sys.executable, "-m", "vhost_min", "net", "--socket-path", sock, "--loopback"]
        if profile:
            argv = [sys.executable, "-m", "cProfile", "-o", profile, "-m", "vhost_min", "net", "--socket-path",
                    sock, "--loopback"]
    else:
        argv = [sys.executable, "-m", "bench.net", "--source", sock]
    daemon = Daemon(f"ours-{direction}", argv, sock, workdir, cpu)
    try:
        mode, what = ("txonly", "Tx") if direction == "rx" else ("rxonly", "Rx")
        with testpmd(f"vu-{direction}", f"net_virtio_user0,path={sock},queues=1", mode, workdir, main_lcore=1) as pmd:
            return _window(pmd, what, seconds, daemon.pid)
    finally:
        if profile:
            daemon.proc.send_signal(signal.SIGINT)      # cProfile writes its file on KeyboardInterrupt
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.proc.wait(10)
        daemon.stop()


def run_dpdk(direction: str, seconds: float, workdir: str) -> dict:
    sock = os.path.join(workdir, f"dpdk-{direction}.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    backend_mode, front_mode, what = ("rxonly", "txonly", "Tx") if direction == "rx" else ("txonly", "rxonly", "Rx")
    with testpmd(f"vhost-{direction}", f"net_vhost0,iface={sock},queues=1", backend_mode, workdir,
                 main_lcore=0) as vhost:
        _wait_path(sock, vhost.proc, "testpmd net_vhost", vhost.log)
        with testpmd(f"vu-dpdk-{direction}", f"net_virtio_user0,path={sock},queues=1", front_mode, workdir,
                     main_lcore=1) as pmd:
            return _window(pmd, what, seconds, vhost.proc.pid)


def _option(argv: list[str], name: str, default):
    if name in argv:
        i = argv.index(name)
        return type(default)(argv[i + 1])
    return default


def run(argv: list[str]) -> dict:
    if shutil.which(TESTPMD) is None:
        raise SystemExit(f"bench net needs {TESTPMD}: {DPDK_APT}")
    runs = _option(argv, "--runs", 3)
    seconds = _option(argv, "--seconds", 5.0)
    profile = None
    if "--profile" in argv:
        i = argv.index("--profile")
        profile = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
    driver_cpu, backend_cpu = pinning()
    result: dict = {"frame_bytes": FRAME, "runs": runs, "seconds": seconds, "warmup": WARMUP,
                    "python": sys.version.split()[0], "cores": os.cpu_count(),
                    "load_average": os.getloadavg()[0]}
    sides: dict[str, list[dict]] = {"ours_rx": [], "dpdk_rx": [], "ours_tx": [], "dpdk_tx": []}
    with tempfile.TemporaryDirectory(prefix="vhost_min-bench-net-") as workdir:
        for n in range(runs):
            for key, call in (("ours_rx", lambda: run_ours("rx", seconds, backend_cpu, workdir)),
                              ("dpdk_rx", lambda: run_dpdk("rx", seconds, workdir)),
                              ("ours_tx", lambda: run_ours("tx", seconds, backend_cpu, workdir)),
                              ("dpdk_tx", lambda: run_dpdk("tx", seconds, workdir))):
                try:
                    entry = call()
                except RuntimeError as exc:         # a side starved or failed: kept, the others go on
                    print(f"  run {n + 1}/{runs} {key:8} failed: {str(exc).splitlines()[0]}", file=sys.stderr)
                    sides[key].append({"mpps": 0.0, "error": str(exc)[-2000:], "cpu_share": None,
                                       "cpu_s_per_mpkt": None, "mpps_per_core": None})
                    continue
                sides[key].append(entry)
                print(f"  run {n + 1}/{runs} {key:8} {entry['mpps']:.3f} Mpps"
                      + (f", back-end CPU {entry['cpu_share']:.0%}, {entry['cpu_s_per_mpkt']} s per Mpkt"
                         if "cpu_share" in entry else ""), file=sys.stderr, flush=True)
        if profile is not None:
            path = profile or os.path.join(workdir, "ours.prof")
            run_ours("rx", seconds, backend_cpu, workdir, profile=path)
            _print_profile(path)
    best = {key: max(entries, key=lambda e: e["mpps"]) for key, entries in sides.items()}
    ratio = lambda a, b: round(a / b, 1) if b else None        # noqa: E731
    result.update({
        "ours_mpps": best["ours_rx"]["mpps"], "dpdk_mpps": best["dpdk_rx"]["mpps"],
        "ratio": ratio(best["dpdk_rx"]["mpps"], best["ours_rx"]["mpps"]),
        "ours_cpu_s_per_mpkt": best["ours_rx"]["cpu_s_per_mpkt"], "ours_cpu_share": best["ours_rx"]["cpu_share"],
        "ours_mpps_per_core": best["ours_rx"]["mpps_per_core"],
        "dpdk_cpu_s_per_mpkt": best["dpdk_rx"]["cpu_s_per_mpkt"], "dpdk_mpps_per_core": best["dpdk_rx"]["mpps_per_core"],
        "reverse_ours_mpps": best["ours_tx"]["mpps"], "reverse_dpdk_mpps": best["dpdk_tx"]["mpps"],
        "reverse_ratio": ratio(best["dpdk_tx"]["mpps"], best["ours_tx"]["mpps"]),
        "reverse_ours_cpu_s_per_mpkt": best["ours_tx"]["cpu_s_per_mpkt"],
        "reverse_ours_mpps_per_core": best["ours_tx"]["mpps_per_core"],
        "reverse_dpdk_mpps_per_core": best["dpdk_tx"]["mpps_per_core"],
        "all_runs": sides,
    })
    from bench.__main__ import print_table
    print_table(f"net: 64-byte frames, 1 queue pair, split ring, best of {runs} interleaved runs of {seconds:g} s "
                f"(load average {result['load_average']:.1f} on {result['cores']} cores); per core = Mpps / the "
                f"back-end's CPU share",
                ["direction", "side", "Mpps", "CPU share", "CPU s/Mpkt", "Mpps per core"],
                [[label, side, best[key]["mpps"], best[key]["cpu_share"], best[key]["cpu_s_per_mpkt"],
                  best[key]["mpps_per_core"]]
                 for label, pair in (("testpmd txonly -> back-end", ("ours_rx", "dpdk_rx")),
                                     ("back-end -> testpmd rxonly", ("ours_tx", "dpdk_tx")))
                 for key, side in zip(pair, ("ours", "DPDK net_vhost"))])
    print(f"  DPDK/ours: {result['ratio']} into the back-end, {result['reverse_ratio']} out of it (Mpps); "
          f"per core {ratio(result['dpdk_mpps_per_core'] or 0, result['ours_mpps_per_core'] or 0)} and "
          f"{ratio(result['reverse_dpdk_mpps_per_core'] or 0, result['reverse_ours_mpps_per_core'] or 0)}")
    return result


def _print_profile(path: str) -> None:
    import pstats
    if os.path.exists(path):
        print(f"\nprofile of ours (testpmd txonly -> back-end), hottest functions by own time ({path}):")
        pstats.Stats(path).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--source"]:
        sys.exit(source_main(sys.argv[1:]))
    from bench.__main__ import main
    sys.exit(main(["net", *sys.argv[1:]]))
