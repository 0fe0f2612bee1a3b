"""What vhost_min costs to start and to keep running, for initramfs tooling.

* import time: a fresh interpreter that only starts, against one that imports vhost_min (and one
  that imports everything a blk backend needs), median of many runs, from a copy of the package
  with its bytecode compiled (as an installed or vendored package has it; this machine may set
  PYTHONDONTWRITEBYTECODE, which would otherwise make every run compile the sources);
* resident memory of ``python3 -m vhost_min blk`` while our frontend drives I/O through it, total
  and apart from the guest memory it maps (the frontend's memfd regions).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _median_ms(argv: list[str], env: dict, runs: int, cwd: str) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, env=env, cwd=cwd, check=True)   # cwd: not the checkout, which -c would put first
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def _import_costs(runs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(os.path.join(ROOT, "vhost_min"), os.path.join(tmp, "vhost_min"))
        subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(tmp, "vhost_min")], check=True)
        env = dict(os.environ, PYTHONPATH=tmp)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        base = _median_ms([sys.executable, "-c", "pass"], env, runs, tmp)
        package = _median_ms([sys.executable, "-c", "import vhost_min"], env, runs, tmp)
        backend = _median_ms([sys.executable, "-c", "import vhost_min.backend, vhost_min.blk"], env, runs, tmp)
    return {"interpreter_ms": round(base, 1), "import_vhost_min_ms": round(package - base, 1),
            "import_blk_backend_ms": round(backend - base, 1)}


def _rss_kib(pid: int) -> tuple[int, int]:
    """(total RSS, RSS of memfd mappings) of a process, in KiB, from /proc/PID/smaps."""
    total = memfd = 0
    in_memfd = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0]:
                in_memfd = "/memfd:" in line
            elif line.startswith("Rss:"):
                kib = int(line.split()[1])
                total += kib
                if in_memfd:
                    memfd += kib
    return total, memfd


def _backend_rss(seconds: float) -> dict:
    from vhost_min.blk import BlkClient
    from vhost_min.frontend import Frontend

    with tempfile.TemporaryDirectory() as tmp:
        image, sock = os.path.join(tmp, "disk.img"), os.path.join(tmp, "blk.sock")
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        proc = subprocess.Popen([sys.executable, "-m", "vhost_min", "blk", "--socket-path", sock, image],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            proc.stdout.readline()                       # "serving ..." once it accepts
            peak_total = peak_apart = 0
            with Frontend.connect(sock) as frontend:
                client = BlkClient(frontend)
                data = os.urandom(64 << 10)
                deadline = time.monotonic() + seconds
                offset = 0
                while time.monotonic() < deadline:
                    client.write(offset, data)
                    if client.read(offset, len(data)) != data:
                        raise AssertionError("read back differs")
                    offset = (offset + len(data)) % (60 << 20)
                    total, memfd = _rss_kib(proc.pid)
                    peak_total, peak_apart = max(peak_total, total), max(peak_apart, total - memfd)
        finally:
            proc.terminate()
            proc.wait(10)
    return {"backend_rss_mib": round(peak_total / 1024, 1), "backend_rss_apart_from_guest_mib": round(peak_apart / 1024, 1)}


def run(argv: list[str]) -> dict:
    from bench.__main__ import print_table

    runs = int(argv[argv.index("--runs") + 1]) if "--runs" in argv else 21
    result = _import_costs(runs)
    result.update(_backend_rss(2.0))
    print_table(f"startup: python {sys.version.split()[0]}, median of {runs} runs, bytecode compiled",
                ["what", "value"],
                [["interpreter start (ms)", result["interpreter_ms"]],
                 ["+ import vhost_min (ms)", result["import_vhost_min_ms"]],
                 ["+ import vhost_min.backend, vhost_min.blk (ms)", result["import_blk_backend_ms"]],
                 ["blk backend peak RSS (MiB)", result["backend_rss_mib"]],
                 ["  apart from guest memory (MiB)", result["backend_rss_apart_from_guest_mib"]]])
    return result
