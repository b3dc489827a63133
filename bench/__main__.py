"""``python -m bench [--quick] [--only NAME ...]``: run the benchmarks, print one table.
``python -m bench fuzz ...``: the fuzzing targets (see bench/fuzz.py).

Each benchmark module has ``run(options) -> list[Row]``. The table is Markdown, so a
run can be pasted into BENCHMARKS.md as it is.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import sys
import time
import traceback

from bench._common import Options, Row, machine_facts

# Cheapest first, then the 100,000-account run; the crash chaos (kill -9 loops) and the
# replicas on etcd last.
BENCHMARKS = (
    "cli",
    "socket",
    "refresh",
    "vault",
    "small",
    "hang",
    "push",
    "scale",
    "chaos",
    "replicas",
)
MODULES = {
    "cli": "bench.cli",
    "socket": "bench.socket_latency",
    "refresh": "bench.refresh",
    "vault": "bench.vault",
    "small": "bench.startup",
    "hang": "bench.hang",
    "push": "bench.push",
    "scale": "bench.scale",
    "chaos": "bench.chaos",
    "replicas": "bench.replicas",
}


def render(rows: list[Row]) -> str:
    header = ("figure", "measured", "reference (same run)", "ratio", "goal", "met?")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in rows:
        met = "-" if row.met is None else ("yes" if row.met else "**no**")
        cells = (row.figure, row.measured, row.reference, row.ratio, row.goal, met)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["fuzz"]:
        from bench.fuzz import main as fuzz

        return fuzz(args_in[1:])
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples (about 2 min)")
    parser.add_argument(
        "--only", nargs="+", choices=BENCHMARKS, metavar="NAME", help=", ".join(BENCHMARKS)
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    options = Options(quick=args.quick, verbose=args.verbose)
    facts = machine_facts()
    started = time.monotonic()
    print(
        f"tokend benchmarks{' (--quick)' if args.quick else ''}, "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        file=sys.stderr,
    )
    rows: list[Row] = []
    failed = False
    for name in args.only or BENCHMARKS:
        print(f"== {name}", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            module = importlib.import_module(MODULES[name])
            new = module.run(options)
        except Exception as exc:
            traceback.print_exc()
            new = [Row(name, f"failed: {type(exc).__name__}: {exc}"[:120], met=False)]
            failed = True
        rows.extend(new)
        print(render(new), file=sys.stderr)
        print(f"   ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    print()
    print(
        f"Machine: {facts['nproc']} cores, {facts['cpu']}, {facts['memory']}, "
        f"Python {facts['python']}, Linux {facts['kernel']}, "
        f"temporary files on {facts['tmpfs_type']}, load average at start {facts['loadavg']}"
    )
    print()
    print(render(rows))
    notes = [(row.figure, note) for row in rows for note in row.notes]
    if notes:
        print()
        for figure, note in notes:
            print(f"- {figure}: {note}")
    print(f"\n({time.monotonic() - started:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
