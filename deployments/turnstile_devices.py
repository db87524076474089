"""Turnstiles (TurnstileDevice blocks) from the shell.

    python -m deployments.turnstile_devices load FILE   # .csv/.xlsx: name, base_url, login, password
                                                 # [, max_concurrent_requests, requests_per_second,
                                                 #  managed_groups: group ids, "1, 2, 5"]
    python -m deployments.turnstile_devices list

Saves the blocks on the Prefect server of PREFECT_API_URL (or the local stack's); an existing block of the same
name is replaced. The file holds passwords: keep it where only operators read it. Exit codes: 0 done, 2 refused
(a bad row, named with its column, before any block is saved; no Prefect server).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from operations.turnstiles.devices import read_devices_file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    load = commands.add_parser("load", help="save a TurnstileDevice block per row of a .csv/.xlsx file")
    load.add_argument("file", type=Path)
    commands.add_parser("list", help="the saved turnstiles")
    args = parser.parse_args(argv)
    from deployments.stack import local_api_url

    api_url = local_api_url()
    if not api_url:
        print("error: no Prefect server: set PREFECT_API_URL or run `make up`", file=sys.stderr)
        return 2
    os.environ["PREFECT_API_URL"] = api_url
    from blocks.turnstile_device import TurnstileDevice  # imports Prefect: only once the API URL is set

    if args.command == "list":
        from flows.register_participants import load_turnstiles

        try:
            devices = load_turnstiles([])
        except ValueError as exc:
            print(exc)
            return 0
        for name, device in devices.items():
            groups = ", ".join(map(str, device.managed_groups)) or "those the file names"
            print(f"{name:30} {device.base_url:40} {device.max_concurrent_requests} at once, "
                  f"{device.requests_per_second:g}/s, managed groups: {groups}")
        return 0
    try:
        specs = read_devices_file(args.file)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    TurnstileDevice.register_type_and_schema()
    for spec in specs:
        fields = {"max_concurrent_requests": spec.max_concurrent_requests,
                  "requests_per_second": spec.requests_per_second,
                  "managed_groups": list(spec.managed_groups) or None}
        TurnstileDevice(
            base_url=spec.base_url, login=spec.login, password=spec.password,
            **{name: value for name, value in fields.items() if value is not None},
        ).save(spec.name, overwrite=True)
    print(f"{len(specs)} turnstile(s) saved from {args.file.name}: {', '.join(s.name for s in specs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
