"""`make demo`: start the local stack on embedded defaults and run generate-games end to end.

    python -m deployments.demo [--quantity 200000] [--run-key demo-...]

Prints where the spreadsheets, the counter snapshot and the run in the UI are; exits 0 on success.
The stack is left running so the run can be looked at in the UI (`make down` stops it).
"""

from __future__ import annotations

import argparse
import sys
import time

from deployments.stack import start_local_stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantity", type=int, default=200_000, help="games to generate (default 200,000)")
    parser.add_argument("--run-key", default=None, help="run key (default demo-<timestamp>)")
    args = parser.parse_args(argv)

    stack = start_local_stack()
    from flows.generate_games import generate_games  # imports Prefect: only once the API URL is set

    run_key = args.run_key or time.strftime("demo-%Y%m%d-%H%M%S")
    print(f"Prefect UI {stack.ui_url}; generating {args.quantity:,} games as run {run_key} ...", flush=True)
    state = generate_games(quantity=args.quantity, run_key=run_key, return_state=True)
    if not state.is_completed():
        print(f"generate-games ended {state.type.value}: {state.message}", file=sys.stderr)
        return 1
    result = state.result()
    print(f"\n{result['games']:,} games in {result['seconds']:.1f} s")
    for path in result["spreadsheets"]:
        print(f"  spreadsheet: {path}")
    print(f"  counter snapshot: {result['counter_snapshot']}")
    print(f"  flow run: {stack.ui_url}/runs/flow-run/{state.state_details.flow_run_id}")
    print("The local stack is still running for the UI; `make down` stops it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
