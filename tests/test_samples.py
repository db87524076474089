"""`make samples`: the sample files read back by the readers the flows use, written once, the emulated
turnstiles' devices file from a running emulator, the dealers loaded into the project database, and a run
command for each flow that `make run` passes through the shell intact."""

from __future__ import annotations

import shlex
from collections import Counter

from deployments.samples import (
    SAMPLES_FOLDER,
    emulated_devices,
    flow_commands,
    load_dealers,
    main,
    make_run,
    write_sample_files,
)
from deployments.start_run import parse_parameters
from emulators import controlid as turnstile_emulator
from operations.infra.database import get_engine
from operations.products.dealers import read_dealers_file
from operations.products.reader import ProductRow, Reason, RowFailure, open_product_rows
from operations.products.sample import UNKNOWN_DEALER_CODE
from operations.products.store import clear_products_data, dealer_ids
from operations.settings import DatabaseSettings, Settings, StackSettings
from operations.turnstiles.devices import read_devices_file
from operations.turnstiles.participants import read_participants

SIX_FLOWS = {"generate-games", "onboard-account", "sync-marketplace", "process-products", "register-participants",
             "cleanup-runs"}


def test_sample_files_are_read_back_by_the_flows_readers_and_kept_on_a_second_run(tmp_path):
    files, lines = write_sample_files(tmp_path / "samples", dealers=5, products_rows=1_000, participants=40)
    assert not any("kept" in line for line in lines), lines
    codes = [code for code, _ in read_dealers_file(files.dealers)]
    assert codes == ["D0001", "D0002", "D0003", "D0004", "D0005"]

    with open_product_rows(files.products) as (header, rows):
        rows = list(rows)
    good = [r for r in rows if isinstance(r, ProductRow)]
    bad = Counter(r.reason for r in rows if isinstance(r, RowFailure))
    assert len(rows) == 1_000 and {r.dealer_code for r in good} == {*codes, UNKNOWN_DEALER_CODE}
    # unknown dealers and repeated SKUs are found by the load (they need the database and the rows before);
    # the other bad rows by the reader
    assert bad == {Reason.NEGATIVE_PRICE: 20, Reason.EMPTY_SKU: 20, Reason.PRICE_NOT_A_NUMBER: 20}, bad
    assert sum(r.dealer_code == UNKNOWN_DEALER_CODE for r in good) == 20

    participants = read_participants(files.participants).participants
    assert len(participants) == 40 and participants[0].registration == "R000001"

    stamps = {p: p.stat().st_mtime_ns for p in (files.dealers, files.products, files.participants)}
    again, lines = write_sample_files(tmp_path / "samples", dealers=9, products_rows=10, participants=1)
    assert again == files and all("kept" in line for line in lines), lines
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert sorted(p.name for p in files.folder.iterdir()) == ["dealers.csv", "participants.xlsx", "products.xlsx"]


def test_devices_file_of_the_running_turnstile_emulator_reads_as_the_stacks_blocks(tmp_path):
    settings = Settings(stack=StackSettings(data_dir=tmp_path / "data"))
    path = tmp_path / "devices.csv"
    assert "not written" in emulated_devices(settings, path) and not path.exists()  # no emulator: nothing stale

    config = turnstile_emulator.EmulatorConfig(devices=2, password="gate-secret")
    emulator = turnstile_emulator.start_emulator_process(config, settings.stack.turnstile_emulator_dir)
    try:
        said = emulated_devices(settings, path)
        specs = read_devices_file(path)
    finally:
        emulator.stop()
    assert "deployments.turnstile_devices load" in said, said
    assert [s.name for s in specs] == ["emulated-turnstile-1", "emulated-turnstile-2"]
    assert [s.base_url for s in specs] == emulator.base_urls
    assert {(s.login, s.password.get_secret_value()) for s in specs} == {("admin", "gate-secret")}


def test_dealers_are_loaded_into_the_project_database_only_when_it_runs(tmp_path, database_url):
    engine = get_engine(database_url)
    clear_products_data(engine, dealers=True)
    files, _ = write_sample_files(tmp_path, dealers=3, products_rows=10, participants=1)
    try:
        said = load_dealers(Settings(database=DatabaseSettings(url=database_url)), files.dealers)
        assert "3 in the file, 3 new" in said, said
        assert set(dealer_ids(engine)) == {"D0001", "D0002", "D0003"}
        assert "0 new" in load_dealers(Settings(database=DatabaseSettings(url=database_url)), files.dealers)  # idempotent
    finally:
        clear_products_data(engine, dealers=True)
    # no DATABASE_URL and no embedded PostgreSQL under DATA_DIR: nothing is started, the command says how
    said = load_dealers(Settings(stack=StackSettings(data_dir=tmp_path / "empty"), database=DatabaseSettings(url=None)), files.dealers)
    assert said.startswith("dealers not loaded") and "deployments.dealers load" in said, said
    assert not (tmp_path / "empty" / "postgres").exists()


def test_each_flow_has_a_run_command_whose_parameters_survive_the_shell(tmp_path):
    files, _ = write_sample_files(tmp_path / "a folder with spaces", dealers=2, products_rows=10, participants=2)
    commands = {c.flow: c for c in flow_commands(files)}
    assert set(commands) == SIX_FLOWS
    products = commands["process-products"].command
    assert products.startswith("make run DEPLOYMENT=process-products/on-demand PARAMS=")
    # `make run` hands PARAMS to the shell after `start_run DEPLOYMENT`: split as the shell splits it
    params = shlex.split(products.split("PARAMS=", 1)[1])[0]
    assert parse_parameters(shlex.split(params), None) == {"file_path": str(files.products)}
    assert make_run("cleanup-runs/on-demand", dry_run="true") == 'make run DEPLOYMENT=cleanup-runs/on-demand PARAMS="dry_run=true"'
    assert commands["onboard-account"].command == "make onboard"


def test_make_samples_writes_under_data_dir_and_prints_every_command(tmp_path, monkeypatch, capsys):
    from operations import settings as settings_module

    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("DATABASE_URL")  # the test session's database is not this DATA_DIR's
    settings_module.get_settings.cache_clear()
    try:
        assert main(["--products-rows", "100", "--participants", "5"]) == 0
    finally:
        settings_module.get_settings.cache_clear()
    out = capsys.readouterr().out
    folder = (tmp_path / "data" / SAMPLES_FOLDER).resolve()
    assert {p.name for p in folder.iterdir()} == {"dealers.csv", "products.xlsx", "participants.xlsx"}
    for flow in SIX_FLOWS:
        assert f"  {flow}:\n" in out, out
    assert f"file_path={folder / 'products.xlsx'}" in out and "dealers not loaded" in out, out
