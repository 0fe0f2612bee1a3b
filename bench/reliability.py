"""What the reliability campaigns tried and what was lost: ``python3 -m bench reliability
[--scale F] [--only NAME[,NAME...]] [--readme] [--json]``.

Each campaign runs in a child process (``python3 -m bench NAME --json`` for the long ones, the
unittest modules that prove the rest), so one that crashes is a row that says so, not a lost
report. ``--scale`` multiplies the campaigns' sizes (fuzz minutes, kills). ``--readme`` records the rows
of the campaigns run in bench/reliability.json (with the date and command of each) and writes the
table of every recorded campaign into README.md between its ``reliability`` markers, so the
README's table is always this script's output, and one campaign can be run again alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
RECORD = os.path.join(ROOT, "bench", "reliability.json")
BEGIN, END = "<!-- reliability table: begin (python3 -m bench reliability --readme) -->", \
    "<!-- reliability table: end -->"


@dataclasses.dataclass
class Row:
    campaign: str
    tried: str
    lost: str
    ok: bool
    seconds: float
    name: str = ""             #: the CAMPAIGNS key that made it
    made: str = ""             #: the date and command line that made it


def _bench(name: str, *args: str) -> tuple[dict | None, str, float]:
    """Run ``python3 -m bench name --json args``: (its JSON, the tail of its output, seconds)."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench", name, "--json", *args], cwd=ROOT,
                          capture_output=True, text=True)
    seconds = time.monotonic() - started
    lines = proc.stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    except json.JSONDecodeError:
        result = None
    return result, (proc.stdout + proc.stderr)[-2000:], seconds


def _tests(*modules: str) -> tuple[int, str, bool, float]:
    """Run unittest ``modules`` with CI=true (a peer that is missing fails): (tests run, tail, ok, s)."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "unittest", *modules], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "CI": "true"})
    ran = re.search(r"^Ran (\d+) tests?", proc.stderr, re.M)
    return int(ran.group(1)) if ran else 0, proc.stderr[-2000:], proc.returncode == 0, time.monotonic() - started


def _failed(campaign: str, tail: str, seconds: float) -> Row:
    last = [line for line in tail.strip().splitlines() if line.strip()][-1:] or ["no output"]
    return Row(campaign, "did not finish", f"FAILED: {last[0][:160]}", False, seconds)


def fuzz(scale: float) -> list[Row]:
    minutes = max(0.5, 2 * scale)
    result, tail, seconds = _bench("fuzz", "--minutes", f"{minutes:g}", "--seed", "1")
    if result is None:
        return [_failed("fuzzing (tests/fuzz.py)", tail, seconds)]
    return [Row("fuzzing: random and mutated messages with fds, front-end replies, ring states",
                f"{result['messages']:,} messages, {result['replies']:,} replies, {result['ring states']:,} "
                f"ring states ({minutes:g} min, seed 1)",
                "nothing: no crash, hang, leaked fd or foreign exception" if not result["failure"]
                else f"FAILED: {result['failure']}", not result["failure"], seconds)]


def _crash(frontend: str, kills: int, *extra: str) -> list[Row]:
    result, tail, seconds = _bench("crash", "--frontend", frontend, "--kills", str(kills), *extra)
    if result is None:
        return [_failed(f"kill -9 under {frontend} front-end", tail, seconds)]
    rows = []
    for c in result["campaigns"]:
        who = ("a QEMU 7.2 guest's O_DIRECT writes (reconnect=1)" if c["frontend"] == "qemu"
               else "our front-end's writes (Frontend.reconnect)")
        backend = "our blk back-end" if c["backend"] == "ours" else "qemu-storage-daemon (yardstick)"
        in_flight = f", {c['in_flight_at_kill']} with a write in flight" if c["backend"] == "ours" else ""
        bad = c["lost_bytes"] or c["hangs"] or c["errors"] or c.get("order_violations")
        rows.append(Row(f"kill -9 of {backend} under {who}, {c['ring']} ring",
                        f"{c['kills']} kills{in_flight}, {c['writes']:,} writes",
                        f"{c['lost_bytes']} bytes lost, {c['hangs']} hangs, {c['errors']} errors",
                        c["backend"] != "ours" or not bad, c["seconds"]))
    return rows


def crash_qemu(scale: float) -> list[Row]:
    return _crash("qemu", max(4, round(20 * scale)))


def crash_ours(scale: float) -> list[Row]:
    return _crash("ours", max(4, round(50 * scale)))


def crash_yardstick(scale: float) -> list[Row]:
    return _crash("qemu", max(4, round(20 * scale)), "--ring", "split", "--yardstick", "qsd")[1:]


def reconnect(scale: float) -> list[Row]:
    kills = max(10, round(100 * scale))
    result, tail, seconds = _bench("reconnect", "--kills", str(kills))
    if result is None:
        return [_failed("qemu-storage-daemon kill -9 under our front-end", tail, seconds)]
    bad = result["bad_reads"] + result["bad_in_image"]
    return [Row("qemu-storage-daemon kill -9 with requests in flight, our front-end reconnecting",
                f"{result['kills']} kills, {result['kills_with_requests_pending']} with requests pending, "
                f"{result['kills_after_out_of_order_completions']} after out-of-order completions",
                f"{bad} writes wrong on read-back or in the image", bad == 0, seconds)]


def _proven_by(campaign: str, tried: str, *modules: str,
               lost: str = "nothing (the tests check the bytes)") -> Callable[[float], list[Row]]:
    def run(scale: float) -> list[Row]:
        ran, tail, ok, seconds = _tests(*modules)
        return [Row(campaign, f"{tried} ({ran} tests: {', '.join(m.split('.')[-1] for m in modules)})",
                    lost if ok else f"FAILED: {tail.strip().splitlines()[-1]}",
                    ok, seconds)]
    return run


CAMPAIGNS: dict[str, Callable[[float], list[Row]]] = {
    "fuzz": fuzz,
    "crash-qemu": crash_qemu,
    "crash-ours": crash_ours,
    "crash-qsd": crash_yardstick,
    "reconnect": reconnect,
    "restarts": _proven_by("QEMU 7.2 reconnect=1 through restarts of our back-end; client mode through two QEMUs; "
                           "a front-end gone at every step of QEMU's handshake",
                           "3 restarts under a writing guest, 2 QEMUs on one --connect back-end, 129 cuts",
                           "tests.peers.test_reconnect_peers", "tests.unit.test_reconnect"),
    "migration": _proven_by("live migration: QEMU 7.2 to a second QEMU on a second back-end; our front-end "
                            "moving a running back-end to another process (split, packed)",
                            "1 QEMU migration under O_DIRECT writes, 2 moves with requests in flight, dirty log "
                            "checked page by page", "tests.peers.test_migration_peers", "tests.unit.test_migration"),
    "isolation": _proven_by("stalled, flooding and non-reading front-ends beside working ones",
                            "testpmd and blk I/O beside peers stalled mid-header, mid-payload and flooding",
                            "tests.peers.test_isolation_peers", "tests.unit.test_isolation",
                            lost="nothing: the working front-ends' frames and bytes all arrived"),
    "load": _proven_by("load: 16 blk devices x 4 queues in one process under a 4-CPU QEMU guest; 509 memory slots "
                       "added and removed under I/O; a disk whose reads block beside a fast one",
                       "64 queues busy at once, 2 x 509 slots, a read held under each --aio engine",
                       "tests.peers.test_load_peers", "tests.unit.test_load",
                       lost="nothing: every image checked; the fast disk kept serving (not under --aio sync)"),
    "bad-input": _proven_by("bad input: every request with wrong sizes, fd counts, addresses, descriptor loops",
                            "hand-made bad messages and rings", "tests.unit.test_backend_bad_input",
                            lost="nothing: each rejected with a precise error; no crash, no leaked fd"),
}
#: Campaigns a plain run does (crash-qsd is a yardstick, run when named).
DEFAULT = [name for name in CAMPAIGNS if name != "crash-qsd"]


def markdown(rows: list[Row]) -> str:
    """The README's table: a row per campaign row, and how each campaign was run."""
    lines = [BEGIN, "", "| what was tried | how much | lost |", "| --- | --- | --- |"]
    lines += [f"| {r.campaign} | {r.tried} | {r.lost} |" for r in rows]
    made = dict.fromkeys(r.made for r in rows)
    lines += ["", "Made by " + "; ".join(made) + "."]
    return "\n".join(lines + ["", END])


def load_record(path: str = RECORD) -> list[Row]:
    """The rows last recorded, in CAMPAIGNS order."""
    try:
        with open(path, encoding="utf-8") as f:
            rows = [Row(**r) for r in json.load(f)]
    except FileNotFoundError:
        return []
    order = list(CAMPAIGNS)
    return sorted(rows, key=lambda r: order.index(r.name) if r.name in order else len(order))


def record(rows: list[Row], path: str = RECORD) -> list[Row]:
    """Replace the recorded rows of the campaigns in ``rows``; the whole record, ordered."""
    ran = {r.name for r in rows}
    kept = [r for r in load_record(path) if r.name not in ran]
    with open(path, "w", encoding="utf-8") as f:
        json.dump([dataclasses.asdict(r) for r in kept + rows], f, indent=1)
        f.write("\n")
    return load_record(path)


def write_readme(table: str, path: str = README) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no reliability markers ({BEGIN!r} ... {END!r})")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + table + tail)


def run(argv: list[str]) -> dict:
    from bench.__main__ import print_table

    parser = argparse.ArgumentParser(prog="python3 -m bench reliability")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the campaigns' sizes (default 1)")
    parser.add_argument("--only", help=f"comma-separated campaigns, of: {', '.join(CAMPAIGNS)}")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else DEFAULT
    unknown = [n for n in names if n not in CAMPAIGNS]
    if unknown:
        parser.error(f"unknown campaign(s) {', '.join(unknown)}; known: {', '.join(CAMPAIGNS)}")
    command = "python3 -m bench reliability" + "".join(f" {a}" for a in argv if a != "--readme") + " --readme"
    made = f"`{command}` on {time.strftime('%Y-%m-%d')}"
    rows: list[Row] = []
    for name in names:
        print(f"{name} ...", flush=True)
        for row in CAMPAIGNS[name](args.scale):
            row.name, row.made = name, made
            rows.append(row)
        print(f"  {rows[-1].tried}: {rows[-1].lost}", flush=True)
    print_table("reliability: what was tried and what was lost", ["campaign", "tried", "lost", "s"],
                [[r.campaign[:60], r.tried[:70], r.lost[:50], round(r.seconds)] for r in rows])
    if args.readme:
        recorded = record(rows)
        write_readme(markdown(recorded))
        print(f"bench/reliability.json and README.md: {len(rows)} rows recorded, {len(recorded)} in the table")
    return {"scale": args.scale, "ok": all(r.ok for r in rows), "rows": [dataclasses.asdict(r) for r in rows]}
