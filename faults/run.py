"""The fault-injection suite: `make faults`, or

    python -m faults.run                                   # every fault, the table on stdout
    python -m faults.run --only cancel-products,kill-postgres
    python -m faults.run --list
    python -m faults.run --output faults.txt --keep        # the table also in a file; the stack's folder kept

It starts its own stack (the registry, as `make up` does) in a temporary DATA_DIR on free ports, runs each fault
against runs started through the deployments over the Prefect REST API, and prints one row per fault: the final
states, what was lost and doubled (ground truth read outside the project's code: the emulators, the products
file, the database and the Redis stream), and the seconds until it healed without a person. docs/faults.md
describes each fault and how it is measured.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import fields
from pathlib import Path

from faults.harness import log, start_suite_stack, stop_suite_stack
from faults.truth import Row, format_table


def _parser() -> argparse.ArgumentParser:
    from faults.scenarios import FAULTS, Options

    parser = argparse.ArgumentParser(prog="python -m faults.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help=f"comma-separated faults (default all): {', '.join(FAULTS)}")
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    parser.add_argument("--output", type=Path, help="also write the table (and the run's timing) to this file")
    parser.add_argument("--keep", action="store_true", help="keep the stack's temporary folder (logs, data)")
    for option in fields(Options):
        parser.add_argument(f"--{option.name.replace('_', '-')}", type=type(option.default), default=option.default,
                            help=f"default {option.default}")
    return parser


def _zombie_row(ctx) -> Row:
    """Flow runs the server still shows Running (or Pending, Cancelling) whose process is gone."""
    h = ctx.harness
    stuck = [r for r in h.running_runs() if not h.run_processes(r["id"])]
    names = ", ".join(sorted(f"{r['name']} {r['state_name']}" for r in stuck)) or "none"
    return Row("zombie runs at the end", f"{len(stuck)} run(s) not terminal with no process", note=names)


def main(argv: list[str] | None = None) -> int:
    from faults.scenarios import FAULTS, SUMMARIES, Context, Options

    args = _parser().parse_args(argv)
    if args.list:
        for name in FAULTS:
            print(f"{name:22} {SUMMARIES.get(name, '')}")
        return 0
    chosen = [name.strip() for name in args.only.split(",") if name.strip()] or list(FAULTS)
    unknown = [name for name in chosen if name not in FAULTS]
    if unknown:
        print(f"unknown fault(s) {unknown}; --list shows them", file=sys.stderr)
        return 2
    options = Options(**{f.name: getattr(args, f.name) for f in fields(Options)})
    root = Path(tempfile.mkdtemp(prefix="faults-"))
    started = time.monotonic()
    rows: list[Row] = []
    log(f"stack in {root} (make up)")
    harness = start_suite_stack(root, devices=2)
    try:
        from blocks.products_queue import ProductsQueue

        stream = ProductsQueue.load(harness.settings.products.queue_block).stream
        ctx = Context(harness, options, stream, int(time.time() * 1000))
        log(f"stack up in {time.monotonic() - started:.0f} s: {harness.api.base_url}")
        for name in chosen:
            begun = time.monotonic()
            log(f"fault {name}")
            try:
                found = FAULTS[name](ctx)
            except Exception as exc:  # noqa: BLE001 - one fault's harness error must not hide the others
                traceback.print_exc()
                found = [Row(name, "harness error", note=f"{type(exc).__name__}: {exc}"[:300])]
            for row in found:
                row.note += f" [{time.monotonic() - begun:.0f} s]"
                log(f"  {row}")
            rows += found
        rows.append(_zombie_row(ctx))
    finally:
        stop_suite_stack(harness)
        harness.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    took = time.monotonic() - started
    table = format_table(rows)
    person = harness.restarts_by_harness
    footer = (f"\n{len(chosen)} fault(s) in {took / 60:.1f} min on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
              f"{'; `make up` run by the suite at ' + ', '.join(person) if person else ''}"
              f"{'; stack kept in ' + str(root) if args.keep else ''}")
    print(table + footer)
    if args.output:
        args.output.write_text(table + footer + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
