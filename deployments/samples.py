"""`make samples`: the sample files every flow needs, under DATA_DIR/samples, and the command that runs each flow
on them.

    python -m deployments.samples [--products-rows 5000] [--participants 300] [--dealers 20]

Writes, when missing (the files are the same on every run, so a second run keeps them):

- `dealers.csv`: the dealers the products file names (code, name); loaded into the project database when the
  stack runs (`make up`), else the command says how;
- `products.xlsx`: a products file with 10% bad rows of known kinds (unknown dealer, negative price, ...), for
  `process-products`;
- `participants.xlsx`: participants with cards, groups and validity dates, for `register-participants`;
- `devices.csv`: the stack's emulated turnstiles as a devices file (name, base_url, login, password), the format
  `python -m deployments.turnstile_devices load` reads for real devices; rewritten on every run (the emulator's ports
  change when the stack restarts), skipped when no turnstile emulator runs.

Then prints the `make run` command and the UI form values of each of the six flows. Exit codes: 0 done,
2 a file could not be written or read back.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from deployments.stack import EMULATED_TURNSTILE
from operations.infra.tabular import open_row_writer
from operations.products.dealers import read_dealers_file
from operations.products.sample import generate_products_file, write_dealers_file
from operations.settings import Settings, get_settings
from operations.turnstiles.sample import write_participants_file

SAMPLES_FOLDER = "samples"  # under DATA_DIR
PRODUCTS_SEED = 2026


@dataclass(frozen=True)
class SampleFiles:
    """Where the sample files are (absolute paths, as a flow run on the worker reads them)."""

    folder: Path
    dealers: Path
    products: Path
    participants: Path
    devices: Path

    @classmethod
    def under(cls, folder: Path) -> SampleFiles:
        folder = Path(folder).resolve()
        return cls(folder, folder / "dealers.csv", folder / "products.xlsx", folder / "participants.xlsx",
                   folder / "devices.csv")


@dataclass(frozen=True)
class FlowCommand:
    """How to start one flow on the samples: from the shell, and in the UI's custom-run form."""

    flow: str
    command: str
    form: str


def _atomic(path: Path, write) -> None:
    """Write through a temporary file of the same suffix, renamed at the end: an interrupted run leaves no
    half-written sample that a later run would keep."""
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    write(partial)
    os.replace(partial, path)


def write_sample_files(
    folder: Path, *, dealers: int = 20, products_rows: int = 5_000, participants: int = 300
) -> tuple[SampleFiles, list[str]]:
    """Write the dealers, products and participants files that are missing; returns the paths and one line per
    file saying what it holds or that it was kept."""
    files = SampleFiles.under(folder)
    files.folder.mkdir(parents=True, exist_ok=True)
    lines = []
    if files.dealers.exists():
        codes = [code for code, _ in read_dealers_file(files.dealers)]
        lines.append(f"{files.dealers}: kept ({len(codes)} dealers)")
    else:
        codes = []
        _atomic(files.dealers, lambda path: codes.extend(write_dealers_file(path, dealers)))
        lines.append(f"{files.dealers}: {len(codes)} dealers (code, name)")
    if files.products.exists():
        lines.append(f"{files.products}: kept")
    else:
        stats = []
        _atomic(files.products, lambda path: stats.append(
            generate_products_file(path, products_rows, codes, bad_fraction=0.1, seed=PRODUCTS_SEED)))
        bad = ", ".join(f"{count} {reason}" for reason, count in stats[0].bad_by_reason.items())
        lines.append(f"{files.products}: {stats[0].rows:,} rows, {stats[0].good_rows:,} good, bad ones: {bad}")
    if files.participants.exists():
        lines.append(f"{files.participants}: kept")
    else:
        _atomic(files.participants, lambda path: write_participants_file(path, participants))
        lines.append(f"{files.participants}: {participants:,} participants (registration, name, card, group, "
                     "begin, end)")
    return files, lines


def write_devices_file(path: Path, base_urls: list[str], login: str, password: str) -> None:
    """A devices file of the emulated turnstiles, under the block names `make up` gave them."""
    def write(partial: Path) -> None:
        with open_row_writer(partial, "Devices") as append:
            append(["name", "base_url", "login", "password"])
            for number, url in enumerate(base_urls, start=1):
                append([EMULATED_TURNSTILE.format(number), url, login, password])

    _atomic(Path(path), write)


def emulated_devices(settings: Settings, path: Path) -> str:
    """Write the devices file of the running turnstile emulator; says what it did."""
    from emulators.controlid import running_emulator_process

    emulator = running_emulator_process(settings.stack.turnstile_emulator_dir)
    if emulator is None:
        path.unlink(missing_ok=True)  # a file of a stopped emulator names ports nobody answers on
        return f"{path}: not written: no turnstile emulator runs (`make up` starts it; then `make samples` again)"
    write_devices_file(path, emulator.base_urls, emulator.config.login, emulator.config.password)
    return (f"{path}: the {len(emulator.base_urls)} emulated turnstiles (`make up` already saved them as blocks; "
            f"loading the file saves the same): .venv/bin/python -m deployments.turnstile_devices load {shlex.quote(str(path))}")


def load_dealers(settings: Settings, path: Path) -> str:
    """Insert the sample dealers into the project database when it is reachable without starting anything;
    says what it did or how to do it."""
    from operations.infra.embedded_postgres import running_embedded_postgres

    how = f".venv/bin/python -m deployments.dealers load {shlex.quote(str(path))}"
    if not settings.database.url and running_embedded_postgres(settings.stack.postgres_dir) is None:
        return f"dealers not loaded: the project database is not running (`make up`, then `make samples` again or {how})"
    from operations.infra.database import project_engine
    from operations.products.store import upsert_dealers

    _, engine = project_engine(settings)
    dealers = read_dealers_file(path)
    inserted, renamed = upsert_dealers(engine, dealers)
    return f"dealers loaded into the project database: {len(dealers)} in the file, {inserted} new, {renamed} renamed"


def make_run(deployment: str, **parameters: object) -> str:
    """`make run DEPLOYMENT=... PARAMS="..."`, each KEY=VALUE quoted for the shell `make` hands it to."""
    pairs = " ".join(shlex.quote(f"{key}={value}") for key, value in parameters.items())
    return f'make run DEPLOYMENT={deployment}' + (f' PARAMS="{pairs}"' if pairs else "")


def flow_commands(files: SampleFiles) -> list[FlowCommand]:
    """The command and form values that run each flow on the samples (the on-demand deployments)."""
    return [
        FlowCommand("generate-games", make_run("generate-games/on-demand", quantity=100000, run_key="sample-games"),
                    "Games 100000, Run key sample-games"),
        FlowCommand("onboard-account", "make onboard",
                    "Authorization code: the code `.venv/bin/python -m deployments.marketplace_accounts emulated "
                    "--code-only` prints (single use, 10 minutes), Nickname as you like"),
        FlowCommand("sync-marketplace", make_run("sync-marketplace/on-demand"),
                    "nothing to fill: every active account, orders and items"),
        FlowCommand("process-products", make_run("process-products/on-demand", file_path=files.products),
                    f"Products file {files.products}"),
        FlowCommand("register-participants",
                    make_run("register-participants/on-demand", participants_file=files.participants),
                    f"Participants file {files.participants}, Turnstiles empty (every saved turnstile)"),
        FlowCommand("cleanup-runs", make_run("cleanup-runs/on-demand", dry_run="true"), "Dry run on"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dealers", type=int, default=20, help="dealers of a new dealers file (20)")
    parser.add_argument("--products-rows", type=int, default=5_000, help="rows of a new products file (5,000)")
    parser.add_argument("--participants", type=int, default=300, help="rows of a new participants file (300)")
    args = parser.parse_args(argv)
    settings = get_settings()
    try:
        files, lines = write_sample_files(settings.stack.data_dir / SAMPLES_FOLDER, dealers=args.dealers,
                                          products_rows=args.products_rows, participants=args.participants)
        lines.append(emulated_devices(settings, files.devices))
        lines.append(load_dealers(settings, files.dealers))
    except (OSError, ValueError, RuntimeError) as exc:  # RuntimeError: SchemaNotCurrent, saying how to migrate
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("Sample files:")
    for line in lines:
        print(f"  {line}")
    print("\nRun each flow on them (from this folder; in the UI: Deployments -> FLOW/on-demand -> Run -> Custom "
          "run, with the values in brackets):")
    for command in flow_commands(files):
        print(f"  {command.flow}:\n    {command.command}\n    [{command.form}]")
    print(f"\nThe nightly registration reads PARTICIPANTS_FILE: PARTICIPANTS_FILE={shlex.quote(str(files.participants))}"
          " in .env gives it the sample.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
