"""Dealers of the product files, from the shell.

    python -m deployments.dealers load FILE    # .csv or .xlsx with columns code, name: inserted or renamed by code
    python -m deployments.dealers list

Uses the project database (DATABASE_URL, else the embedded PostgreSQL). Exit codes: 0 done, 2 refused (a bad
file, an unmigrated database).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from operations.infra.database import SchemaNotCurrent, project_engine
from operations.infra.services import NotConfigured
from operations.products.dealers import read_dealers_file
from operations.products.store import dealer_ids, upsert_dealers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    load = commands.add_parser("load", help="insert or rename the dealers of a .csv/.xlsx file (code, name)")
    load.add_argument("file", type=Path)
    commands.add_parser("list", help="every dealer code")
    args = parser.parse_args(argv)
    try:
        _, engine = project_engine()
        if args.command == "load":
            dealers = read_dealers_file(args.file)
            inserted, renamed = upsert_dealers(engine, dealers)
            print(f"{len(dealers):,} dealer(s) in {args.file.name}: {inserted:,} new, {renamed:,} renamed, "
                  f"{len(dealers) - inserted - renamed:,} unchanged")
        else:
            for code, id_ in sorted(dealer_ids(engine).items()):
                print(f"{id_:>8}  {code}")
    except (OSError, ValueError, SchemaNotCurrent, NotConfigured) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
