"""The fuzzing harness (tests/fuzz.py) for longer than CI runs it: ``python3 -m bench fuzz
[--minutes N] [--seed S] [--json]``. The time is shared among the targets (back-end messages
half, rings a third, front-end replies the rest); the table says what was covered, and a
failure (crash, hang, leaked fd, foreign exception) stops the run with the seed to replay."""

from __future__ import annotations

import time

from tests import fuzz

#: Share of the time each target gets.
SHARES = {"backend": 0.5, "frontend": 0.15, "rings": 0.35}


def run(argv: list[str]) -> dict:
    from bench.__main__ import print_table

    minutes = float(argv[argv.index("--minutes") + 1]) if "--minutes" in argv else 1.0
    seed = int(argv[argv.index("--seed") + 1]) if "--seed" in argv else int(time.time())
    budgets = {name: fuzz.Budget(seconds=minutes * 60 * share) for name, share in SHARES.items()}
    print(f"fuzzing for {minutes:g} min with seed {seed} (replay: python3 -m bench fuzz --seed {seed})", flush=True)
    stats = fuzz.Stats()
    failure = None
    try:
        fuzz.run(seed, budgets, stats)
    except fuzz.FuzzFailure as exc:
        failure = str(exc)
    print_table(f"fuzz: seed {seed}, {minutes:g} min", ["target", "what", "count"], stats.rows())
    print_table("time", ["target", "seconds"], [[k, v] for k, v in sorted(stats.seconds.items())])
    summary = fuzz.summary(stats)
    print(f"{summary['messages']:,} messages to the back-end, {summary['replies']:,} replies to the front-end, "
          f"{summary['ring states']:,} ring states; failures: {failure or 'none'}")
    return {"seed": seed, "minutes": minutes, "failure": failure, **summary, **stats.as_dict()}
