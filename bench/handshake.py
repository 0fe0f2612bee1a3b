"""Connect to ready: our front-end against our back-end and against qemu-storage-daemon.

One handshake is what a virtio-blk user of vhost_min does before its first I/O, timed from the
connect() to the first 4 KiB read completed: Frontend.connect (socket, and the GET_FEATURES that
checks the peer), BlkClient (negotiation: features, protocol features, queue number, memory slots,
back-end channel, SET_FEATURES, status; config read; guest memory; one split ring of 128), the
read; then the close, timed apart. Both back-ends are processes of their own (see bench/blk.py),
serving one small fully written image; each handshake is a new connection to the same running
back-end, ours and theirs interleaved. Figures: median and 90th percentile over ``--count``
handshakes per side, after 3 untimed ones; back-end CPU per handshake (close included) is its
utime + stime over the whole run divided by the handshakes.

The same back-ends under the project's C front-end (bench/vublk.c ``--handshakes``, built as for
``bench blk``): its connect, negotiation, memory and ring cost next to nothing, so what is left is
the back-ends and the kernel between them. Twice: with NEED_REPLY on every request that has no
reply of its own (as our Frontend asks once REPLY_ACK is negotiated: a round trip per request) and
only on SET_MEM_TABLE (as QEMU 7.2 asks: the other requests are pipelined). Rounds of
``VUBLK_ROUND`` handshakes, ours and theirs alternating, ``--count`` per side and mode; back-end CPU
from its threads' schedstat over each round. Without a C compiler these rows are left out, and the
output says so.

``python3 -m bench handshake [--json] [--count N]``
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time

from bench import vublk
from bench.blk import make_image, ours, qsd_missing, qsd_version, theirs, QSD

IMAGE_SIZE = 16 << 20
PHASES = ("connect", "bring_up", "first_read", "ready", "close")
VUBLK_PHASES = ("connect", "bring_up", "first_read", "ready")
VUBLK_MODES = {"all": "NEED_REPLY on every request", "mem-table": "NEED_REPLY on SET_MEM_TABLE only, as QEMU 7.2"}
VUBLK_ROUND = 20


def handshake(sock: str) -> dict[str, float]:
    """One connect -> negotiate -> memory -> one queue -> 4 KiB read -> close; seconds per phase."""
    from vhost_min.blk import BlkClient
    from vhost_min.frontend import Frontend

    clock = time.perf_counter
    t0 = clock()
    fe = Frontend.connect(sock)
    try:
        t1 = clock()
        client = BlkClient(fe, queue_size=128, depth=1)
        t2 = clock()
        if len(client.read(0, 4096)) != 4096:
            raise RuntimeError("short read")
        t3 = clock()
    finally:
        fe.close()
    t4 = clock()
    return {"connect": t1 - t0, "bring_up": t2 - t1, "first_read": t3 - t2, "ready": t3 - t0, "close": t4 - t3}


def _under_vublk(binary: str, sides: list, count: int) -> dict:
    """{mode: {side: {phase: [us, ...], "cpu_s": total}}} over ``count`` handshakes per side and mode."""
    out: dict = {mode: {side: {**{p: [] for p in VUBLK_PHASES}, "cpu_s": 0.0} for side, _ in sides}
                 for mode in VUBLK_MODES}
    for mode in VUBLK_MODES:
        for _, daemon in sides:                                 # warm-up, untimed
            vublk.handshakes(binary, daemon.socket, 3, need_reply=mode)
        for start in range(0, count, VUBLK_ROUND):
            for side, daemon in sides:
                r = vublk.handshakes(binary, daemon.socket, min(VUBLK_ROUND, count - start), need_reply=mode,
                                     backend_pid=daemon.pid)
                for phase in VUBLK_PHASES:
                    out[mode][side][phase] += r[f"{phase}_us"]
                out[mode][side]["cpu_s"] += r["backend_cpu_s"]
    return out


def _vublk_report(c_front: dict, sides: list[str], count: int) -> dict:
    """Print the C front-end's table; its JSON keys (vublk_<mode>_<side>_..., mode all or mem_table)."""
    from bench.__main__ import print_table
    result: dict = {}
    rows = []
    for mode, label in VUBLK_MODES.items():
        key = "vublk_" + mode.replace("-", "_")
        figures = {}
        for side in sides:
            got = c_front[mode][side]
            figures[side] = {"median": statistics.median(got["ready"]) / 1e3, "p90": _p90(got["ready"]) / 1e3,
                             "cpu": got["cpu_s"] / count * 1e3}
            result[f"{key}_{side}_ms_median"] = round(figures[side]["median"], 3)
            result[f"{key}_{side}_ms_p90"] = round(figures[side]["p90"], 3)
            result[f"{key}_{side}_cpu_ms_per_handshake"] = round(figures[side]["cpu"], 3)
            for phase in ("connect", "bring_up", "first_read"):
                result[f"{key}_{side}_{phase}_ms_median"] = round(statistics.median(got[phase]) / 1e3, 3)
        theirs_ = figures.get("theirs")
        result[f"{key}_ratio_median"] = round(figures["ours"]["median"] / theirs_["median"], 3) if theirs_ else None
        for what, name in (("median", "connect to ready, median"), ("p90", "connect to ready, p90"),
                           ("cpu", "back-end CPU per handshake")):
            o, t = figures["ours"][what], theirs_[what] if theirs_ else None
            rows.append([f"{label}: {name}", o, t if t is not None else "-", o / t if t else "-"])
    print_table(f"handshake under vublk (C front-end): ms, {count} each per mode, in rounds of {VUBLK_ROUND}, "
                f"interleaved", ["phase", "ours ms", "theirs ms", "ours/theirs"], rows)
    return result


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1]


def run(argv: list[str]) -> dict:
    from bench.__main__ import print_table
    import contextlib

    count = int(argv[argv.index("--count") + 1]) if "--count" in argv else 200
    no_theirs = qsd_missing()
    with tempfile.TemporaryDirectory(prefix="vhost_min-bench-handshake-") as work:
        image = os.path.join(work, "disk.img")
        make_image(image, IMAGE_SIZE)
        with contextlib.ExitStack() as stack:
            sides = [("ours", stack.enter_context(ours(image, work)))]
            if not no_theirs:
                sides.append(("theirs", stack.enter_context(theirs(image, work))))
            for _ in range(3):                                  # warm-up, untimed
                for _, daemon in sides:
                    handshake(daemon.socket)
                    time.sleep(0.01)
            times: dict[str, list[dict]] = {side: [] for side, _ in sides}
            cpu0 = {side: daemon.cpu_seconds() for side, daemon in sides}
            for _ in range(count):                              # ours, theirs, ours, theirs, ...
                for side, daemon in sides:
                    times[side].append(handshake(daemon.socket))
                    time.sleep(0.01)        # the back-end finishes with the connection outside the clock
            cpu = {side: (daemon.cpu_seconds() - cpu0[side]) / count for side, daemon in sides}
            binary = vublk.build()
            c_front = _under_vublk(binary, sides, count) if binary else None

    def stat(side: str, phase: str, how) -> float:
        return how([t[phase] for t in times[side]]) * 1e3

    result: dict = {}
    for side, _ in sides:
        result[f"{side}_ms_median"] = round(stat(side, "ready", statistics.median), 3)
        result[f"{side}_ms_p90"] = round(stat(side, "ready", _p90), 3)
        result[f"{side}_cpu_ms_per_handshake"] = round(cpu[side] * 1e3, 3)
        for phase in PHASES:
            if phase == "ready":
                continue                    # that is {side}_ms_median
            result[f"{side}_{phase}_ms_median"] = round(stat(side, phase, statistics.median), 3)
    if no_theirs:
        result.update({"theirs_ms_median": None, "theirs_ms_p90": None, "theirs_cpu_ms_per_handshake": None})
        result["ratio_median"] = None
    else:
        result["ratio_median"] = round(result["ours_ms_median"] / result["theirs_ms_median"], 3)
    rows = []
    for label, key in [("connect (socket + GET_FEATURES)", "connect"),
                       ("bring-up (negotiate, config, memory, ring)", "bring_up"),
                       ("first 4 KiB read", "first_read"), ("close", "close")]:
        o = stat("ours", key, statistics.median)
        t = stat("theirs", key, statistics.median) if not no_theirs else None
        rows.append([f"{label}, median", o, t if t is not None else "-", o / t if t else "-"])
    for label, how in (("connect to ready, median", statistics.median), ("connect to ready, p90", _p90)):
        o = stat("ours", "ready", how)
        t = stat("theirs", "ready", how) if not no_theirs else None
        rows.append([label, o, t if t is not None else "-", o / t if t else "-"])
    o, t = cpu["ours"] * 1e3, (cpu["theirs"] * 1e3 if not no_theirs else None)
    rows.append(["back-end CPU per handshake (close included)", o, t if t is not None else "-", o / t if t else "-"])
    version = None if no_theirs else qsd_version()
    print_table(f"handshake: ms, our front-end against our back-end (ours) and {QSD} {version or '(missing)'} "
                f"(theirs); {count} each, interleaved; python {platform.python_version()}",
                ["phase", "ours ms", "theirs ms", "ours/theirs"], rows)
    if c_front is None:
        print(f"handshake under vublk (C front-end): left out, no C compiler ({vublk.CC_INSTALL})")
        result["vublk"] = None
    else:
        result.update(_vublk_report(c_front, [side for side, _ in sides], count))
    sys.stdout.flush()
    result.update({"count": count, "theirs": None if no_theirs else f"{QSD} {version}",
                   "python": platform.python_version(), "machine": platform.machine()})
    return result
