"""The devices file `deployments.turnstile_devices load` reads: its optional managed_groups column (pure, no
services)."""

from __future__ import annotations

import pytest

from operations.infra.tabular import open_row_writer
from operations.turnstiles.devices import read_devices_file


def test_managed_groups_are_read_as_group_ids_in_order_without_repeats(tmp_path):
    path = tmp_path / "devices.csv"
    path.write_text("name,base_url,password,managed_groups\n"
                    "gate-1,http://10.0.0.1,x,\"1, 2;5 2\"\n"
                    "gate-2,http://10.0.0.2,y,\n", encoding="utf-8")
    specs = read_devices_file(path)
    assert [s.managed_groups for s in specs] == [(1, 2, 5), ()]


def test_a_devices_file_without_the_column_manages_the_groups_the_participants_file_names(tmp_path):
    path = tmp_path / "devices.csv"
    path.write_text("name,base_url,password\ngate-1,http://10.0.0.1,x\n", encoding="utf-8")
    assert read_devices_file(path)[0].managed_groups == ()


def test_a_spreadsheet_number_is_one_group(tmp_path):
    path = tmp_path / "devices.xlsx"
    with open_row_writer(path, "Devices") as write:
        write(["name", "base_url", "password", "managed_groups"])
        write(["gate-1", "http://10.0.0.1", "x", 7])
    assert read_devices_file(path)[0].managed_groups == (7,)


@pytest.mark.parametrize("cell", ["1, x", "0", "2.5", "-3"])
def test_a_bad_group_id_is_refused_naming_row_and_column(tmp_path, cell):
    path = tmp_path / "devices.csv"
    path.write_text(f'name,base_url,password,managed_groups\ngate-1,http://10.0.0.1,x,"{cell}"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"devices.csv, row 2, column managed_groups: .* is not a group id"):
        read_devices_file(path)
