"""The products file: headers in English or Portuguese, header errors, every cell check with its row and column,
Brazilian numbers, .xlsx and .csv alike, the sample files, and the failure reports (workbook and log)."""

from __future__ import annotations

import pickle
import shutil
from collections import Counter
from decimal import Decimal
from functools import partial
from pathlib import Path

import openpyxl
import pytest

from operations.products.reader import HeaderError, ProductRow, Reason, RowFailure, open_product_rows
from operations.products.report import (
    FAILURE_COLUMNS,
    FailureLog,
    WorkbookInBackground,
    iter_failures,
    read_failures_workbook,
    write_failures_workbook,
)
from operations.products.sample import (
    UNKNOWN_DEALER_CODE,
    dealer_codes,
    generate_products_file,
    write_dealers_file,
)

from files import convert_with_libreoffice, write_csv, write_ods, write_xlsx

HEADER = "dealer_code,sku,name,price,stock"
CELL_REASONS = {  # the reasons the reader finds by itself; the others need the rows around
    Reason.NEGATIVE_PRICE,
    Reason.EMPTY_SKU,
    Reason.PRICE_NOT_A_NUMBER,
}


_csv = partial(write_csv, name="products.csv")
_xlsx = partial(write_xlsx, name="products.xlsx")


def _read(path: Path) -> list[ProductRow | RowFailure]:
    with open_product_rows(path) as (_, rows):
        return list(rows)


@pytest.mark.parametrize(
    "header, row",
    [
        ("dealer_code,sku,name,price,stock", "D1,S1,Pneu,19.90,3"),
        ("Código Revendedor;Cód. Produto;Descrição;Preço;Estoque", "D1;S1;Pneu;19,90;3"),
        ("  DEALER ,Sku,Nome ,PREÇO UNITÁRIO,Quantidade", "D1,S1,Pneu,19.9,3"),
        ("Concessionária\tproduct-code\tProduto\tValor\tQTY", "D1\tS1\tPneu\tR$ 19,90\t3"),
        ("Estoque;Nome do produto;Preco;codigo_produto;Revendedor", "3;Pneu;19,90;S1;D1"),
    ],
)
def test_english_and_portuguese_headers_are_accepted_in_any_order(tmp_path, header, row):
    assert _read(_csv(tmp_path, header, row)) == [ProductRow(2, "D1", "S1", "Pneu", Decimal("19.90"), 3, {})]


@pytest.mark.parametrize(
    "header, expected",
    [
        ("dealer_code,sku,name,stock", ["missing column 'price'", "preco", "'stock'"]),
        ("dealer_code,sku,nmae,price,stock", ["missing column 'name'", "nome", "'nmae'"]),
        ("sku,name", ["missing columns 'dealer_code'", "'price'", "'stock'"]),
        ("dealer_code,sku,name,price,preço,stock", ["'price' and 'preço' both mean 'price'"]),
        ("dealer_code,sku,name,price,stock,Marca,Marca", ["'Marca' appears twice"]),
    ],
)
def test_a_bad_header_fails_at_once_naming_the_file_and_column(tmp_path, header, expected):
    path = _csv(tmp_path, header, "D1,S1,Pneu,1,1")
    with pytest.raises(HeaderError) as error:
        _read(path)
    for text in ["products.csv", *expected]:
        assert text in str(error.value)


def test_an_xlsx_header_is_checked_too(tmp_path):
    path = _xlsx(tmp_path, ["Revendedor", "SKU", "Nome", "Estoque"], ["D1", "S1", "Pneu", 1])
    with pytest.raises(HeaderError, match=r"products\.xlsx: missing column 'price'.*headers found: 'Revendedor'"):
        _read(path)


def test_unusable_files_are_refused_as_a_whole(tmp_path):
    empty = _csv(tmp_path, "", "  ", name="empty.csv")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(f"{HEADER},observação\nD1,S1,Pneu,1,1,x\n".encode("latin-1"))
    broken = tmp_path / "broken.xlsx"
    broken.write_bytes(b"not a zip")
    old_excel = tmp_path / "products.xls"
    old_excel.write_bytes(b"")
    numbers = tmp_path / "products.numbers"
    numbers.write_bytes(b"")
    for path, message in [
        (empty, "is empty"),
        (latin1, "not UTF-8"),
        (broken, "not a readable .xlsx"),
        (old_excel, "not a readable .xls workbook"),
        (numbers, "unsupported file type '.numbers'; save it as .xlsx, .xls, .ods or .csv"),
    ]:
        with pytest.raises(HeaderError, match=f"{path.name}.*{message}"):
            _read(path)


def test_every_cell_problem_is_reported_with_its_row_column_and_reason(tmp_path):
    cases = [  # (row, expected column, reason, detail)
        (",S1,Pneu,1,1", "dealer_code", Reason.EMPTY_DEALER_CODE, ""),
        ("D1,,Pneu,1,1", "sku", Reason.EMPTY_SKU, ""),
        (f"D1,{'S' * 65},Pneu,1,1", "sku", Reason.SKU_TOO_LONG, "65 characters, at most 64"),
        ("D1,S1,,1,1", "name", Reason.EMPTY_NAME, ""),
        (f"D1,S1,{'n' * 301},1,1", "name", Reason.NAME_TOO_LONG, "301 characters, at most 300"),
        ("D1,S1,Pneu,,1", "price", Reason.EMPTY_PRICE, ""),
        ("D1,S1,Pneu,abc,1", "price", Reason.PRICE_NOT_A_NUMBER, "'abc' is not a number"),
        ("D1,S1,Pneu,NaN,1", "price", Reason.PRICE_NOT_A_NUMBER, "'NaN' is not a number"),
        ("D1,S1,Pneu,inf,1", "price", Reason.PRICE_NOT_A_NUMBER, "'inf' is not a number"),
        ("D1,S1,Pneu,\"1,2,3\",1", "price", Reason.PRICE_NOT_A_NUMBER, "'1,2,3' is not a number"),
        ("D1,S1,Pneu,-0.50,1", "price", Reason.NEGATIVE_PRICE, "'-0.50' is below zero"),
        ("D1,S1,Pneu,10000000000,1", "price", Reason.PRICE_TOO_LARGE, "'10000000000' is above 9,999,999,999.99"),
        ("D1,S1,Pneu,9999999999.995,1", "price", Reason.PRICE_TOO_LARGE, "'9999999999.995' is above 9,999,999,999.99"),
        ("D1,S1,Pneu,1,", "stock", Reason.EMPTY_STOCK, ""),
        ("D1,S1,Pneu,1,abc", "stock", Reason.STOCK_NOT_WHOLE, "'abc' is not a whole number"),
        ("D1,S1,Pneu,1,2.5", "stock", Reason.STOCK_NOT_WHOLE, "'2.5' is not a whole number"),
        ("D1,S1,Pneu,1,-1", "stock", Reason.NEGATIVE_STOCK, "'-1' is below zero"),
        ("D1,S1,Pneu,1,2147483648", "stock", Reason.STOCK_TOO_LARGE, "'2147483648' is above 2,147,483,647"),
        ("D1,,Pneu,abc,-1", "sku", Reason.EMPTY_SKU, ""),  # the first problem in column order
        ("D1,S1,Pneu", "price", Reason.EMPTY_PRICE, ""),  # a short row ends with empty cells
    ]
    rows = _read(_csv(tmp_path, HEADER, *(row for row, *_ in cases)))
    for row_number, ((row, column, reason, detail), failure) in enumerate(zip(cases, rows, strict=True), start=2):
        dealer_code, sku = (row.split(",") + ["", ""])[:2]
        assert failure == RowFailure(row_number, dealer_code, sku, column, reason, detail), row


def test_values_at_the_limits_are_accepted(tmp_path):
    row = f"D1,{'S' * 64},{'n' * 300},9999999999.99,2147483647"
    [product] = _read(_csv(tmp_path, HEADER, row))
    assert (product.price, product.stock) == (Decimal("9999999999.99"), 2_147_483_647)


@pytest.mark.parametrize(
    "text, price",
    [
        ("1234.56", "1234.56"),
        ("1,234.56", "1234.56"),
        ("1,234,567", "1234567.00"),
        ("19,90", "19.90"),
        ("19,9", "19.90"),
        ("0,5", "0.50"),
        ("1.234,56", "1234.56"),
        ("1.234.567,89", "1234567.89"),
        ("1.234.567", "1234567.00"),
        ("R$ 19,90", "19.90"),
        ("R$\u00a01.234,56", "1234.56"),
        (" 7 ", "7.00"),
        ("2.345", "2.35"),  # a lone dot is a decimal point; rounded half up
        ("0.005", "0.01"),
        ("-0", "0.00"),
    ],
)
def test_price_text_in_english_and_brazilian_formats(tmp_path, text, price):
    [product] = _read(_csv(tmp_path, "dealer_code;sku;name;price;stock", f"D1;S1;Pneu;{text};1"))
    assert str(product.price) == price


@pytest.mark.parametrize("text, stock", [("5", 5), ("5.0", 5), ("5,0", 5), ("1.000", 1000), ("1,000", 1000)])
def test_stock_text_accepts_whole_numbers_and_thousands_separators(tmp_path, text, stock):
    [product] = _read(_csv(tmp_path, "dealer_code;sku;name;price;stock", f"D1;S1;Pneu;1;{text}"))
    assert product.stock == stock


def test_xlsx_numbers_are_read_as_numbers_and_codes_as_text(tmp_path):
    path = _xlsx(
        tmp_path,
        [*HEADER.split(","), "Cor"],
        [123, 4567, "Pneu", 19.9, 5.0, 7],
        ["D1", "S1", "Pneu", 0.125, 3, None],
        ["D1", "S1", "Pneu", True, 3],
        ["D1", "S1", "Pneu", 1, 2.5],
    )
    assert _read(path) == [
        ProductRow(2, "123", "4567", "Pneu", Decimal("19.90"), 5, {"Cor": "7"}),
        ProductRow(3, "D1", "S1", "Pneu", Decimal("0.13"), 3, {}),
        RowFailure(4, "D1", "S1", "price", Reason.PRICE_NOT_A_NUMBER, "'True' is not a number"),
        RowFailure(5, "D1", "S1", "stock", Reason.STOCK_NOT_WHOLE, "'2.5' is not a whole number"),
    ]


def test_extra_columns_become_attributes_and_unnamed_columns_are_ignored(tmp_path):
    path = _csv(tmp_path, f"{HEADER}, Marca ,,Cor", "D1,S1,Pneu,1,1,Pirelli,ignored,preto", "D1,S2,Pneu,1,1, ,x,")
    with open_product_rows(path) as (header, rows):
        assert header.extras == ["Marca", "Cor"]
        assert [row.attributes for row in rows] == [{"Marca": "Pirelli", "Cor": "preto"}, {}]


def test_blank_rows_are_skipped_and_row_numbers_stay_those_of_the_file(tmp_path):
    rows = [
        [],
        HEADER.split(","),
        ["D1", "S1", "Pneu", 1, 1],
        [],
        [" ", None, None, None, None],
        ["D1", "S2", "Pneu", "abc", 1],
        [None] * 7,
        ["D1", "S3", "Pneu", 1, 1],
    ]
    csv_lines = [",".join("" if cell is None else str(cell) for cell in row) for row in rows]
    for path in (_csv(tmp_path, *csv_lines), _xlsx(tmp_path, *rows)):
        assert [(row.row_number, row.sku) for row in _read(path)] == [(3, "S1"), (6, "S2"), (8, "S3")]


WORKBOOK_ROWS = [  # blank rows and a blank first column: row numbers stay those the spreadsheet shows
    [],
    [None, "Código Revendedor", "Cód. Produto", "Descrição", "Preço", "Estoque", "Marca"],
    [None, "D1", "S1", "Pneu", 19.9, 3, "Pirelli"],
    [],
    [None, "D1", 12345, "Roda", "R$ 3.680,11", 5.0, None],
    [None, "D2", "S3", "Aro", -1, 2, "X"],
    [None, "D2", "S4", "Aro", 10, "2,5", None],
]
WORKBOOK_EXPECTED = [
    ProductRow(3, "D1", "S1", "Pneu", Decimal("19.90"), 3, {"Marca": "Pirelli"}),
    ProductRow(5, "D1", "12345", "Roda", Decimal("3680.11"), 5, {}),
    RowFailure(6, "D2", "S3", "price", Reason.NEGATIVE_PRICE, "'-1' is below zero"),
    RowFailure(7, "D2", "S4", "stock", Reason.STOCK_NOT_WHOLE, "'2,5' is not a whole number"),
]


def test_xlsx_and_ods_rows_keep_their_row_numbers_and_values(tmp_path):
    for path in (_xlsx(tmp_path, *WORKBOOK_ROWS), write_ods(tmp_path, *WORKBOOK_ROWS, name="products.ods")):
        assert _read(path) == WORKBOOK_EXPECTED, path.name


def test_an_xlsx_is_read_from_its_active_sheet_starting_anywhere(tmp_path):
    workbook = openpyxl.Workbook()
    workbook.active.append(["not", "this", "sheet"])
    sheet = workbook.create_sheet("Produtos")
    for column, value in zip("CDEFG", HEADER.split(",")):
        sheet[f"{column}4"] = value
    for column, value in zip("CDEFG", ["D1", "S1", "Pneu", 1, 2]):
        sheet[f"{column}6"] = value
    workbook.active = 1
    workbook.save(tmp_path / "products.xlsx")
    assert _read(tmp_path / "products.xlsx") == [ProductRow(6, "D1", "S1", "Pneu", Decimal("1.00"), 2, {})]


def test_an_xls_written_by_libreoffice_reads_like_its_xlsx(tmp_path):
    """About 7 s: LibreOffice converts the file (skipped where it is not installed)."""
    [path] = convert_with_libreoffice([_xlsx(tmp_path, *WORKBOOK_ROWS)], "xls")
    assert _read(path) == WORKBOOK_EXPECTED


@pytest.mark.parametrize("suffix", [".csv", ".xlsx"])
def test_a_sample_file_reads_back_as_its_stats_say(tmp_path, suffix):
    dealers = dealer_codes(7)
    stats = generate_products_file(tmp_path / f"products{suffix}", 1_000, dealers, seed=3)
    assert stats.rows == 1_000 and stats.good_rows == 900
    assert set(stats.bad_by_reason.values()) == {20} and len(stats.bad_by_reason) == 5

    with open_product_rows(tmp_path / f"products{suffix}") as (header, checked_rows):
        assert header.extras == ["brand", "color"]
        rows = list(checked_rows)
    assert [row.row_number for row in rows] == list(range(2, 1_002))
    failures = [row for row in rows if isinstance(row, RowFailure)]
    assert Counter(failure.reason for failure in failures) == {
        reason: count for reason, count in stats.bad_by_reason.items() if reason in CELL_REASONS
    }
    seen: set[tuple[str, str]] = set()
    cross_row: Counter[str] = Counter()
    bad_row_numbers = [failure.row_number for failure in failures]
    for product in (row for row in rows if isinstance(row, ProductRow)):
        key = product.dealer_code, product.sku
        if product.dealer_code == UNKNOWN_DEALER_CODE or key in seen:
            cross_row[Reason.UNKNOWN_DEALER if key[0] == UNKNOWN_DEALER_CODE else Reason.REPEATED_SKU] += 1
            bad_row_numbers.append(product.row_number)
        else:
            assert product.dealer_code in dealers and Decimal(1) <= product.price <= Decimal(5_000)
            assert 0 <= product.stock <= 500 and set(product.attributes) == {"brand", "color"}
            seen.add(key)
    assert cross_row == {reason: count for reason, count in stats.bad_by_reason.items() if reason not in CELL_REASONS}
    assert len(seen) == stats.good_rows
    # evenly spread: every block of 100 rows holds 10 bad ones
    assert Counter((number - 2) // 100 for number in bad_row_numbers) == {block: 10 for block in range(10)}


def test_sample_files_are_deterministic_and_the_same_in_xlsx_and_csv(tmp_path):
    dealers = dealer_codes(3)
    for name, seed in [("a.csv", 1), ("b.csv", 1), ("c.csv", 2), ("a.xlsx", 1)]:
        generate_products_file(tmp_path / name, 300, dealers, seed=seed)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.csv").read_bytes() != (tmp_path / "c.csv").read_bytes()
    assert _read(tmp_path / "a.xlsx") == _read(tmp_path / "a.csv")


def test_repricing_changes_exactly_the_chosen_good_rows_by_one(tmp_path):
    dealers = dealer_codes(4)
    stats = generate_products_file(tmp_path / "before.csv", 500, dealers, seed=5, extra_columns=False)
    generate_products_file(tmp_path / "after.csv", 500, dealers, seed=5, reprice_every=7, extra_columns=False)
    before, after = _read(tmp_path / "before.csv"), _read(tmp_path / "after.csv")
    changed = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    good_numbers = {  # a good row i has its own SKU; a repeated one has an earlier row's
        row.row_number
        for row in before
        if isinstance(row, ProductRow) and row.dealer_code != UNKNOWN_DEALER_CODE
        and row.sku == f"SKU-{row.row_number - 2:07d}"
    }
    assert len(good_numbers) == stats.good_rows
    assert {old.row_number for old, _ in changed} == {number for number in good_numbers if (number - 2) % 7 == 0}
    for old, new in changed:
        assert new.price - old.price == Decimal("1.00")
        assert (new.dealer_code, new.sku, new.name, new.stock) == (old.dealer_code, old.sku, old.name, old.stock)


def test_dealers_file_lists_the_codes(tmp_path):
    codes = write_dealers_file(tmp_path / "dealers.csv", 3)
    assert codes == ["D0001", "D0002", "D0003"] == dealer_codes(3)
    assert (tmp_path / "dealers.csv").read_text().splitlines() == [
        "code,name",
        "D0001,Dealer 0001 Ltda",
        "D0002,Dealer 0002 Ltda",
        "D0003,Dealer 0003 Ltda",
    ]


_PROBLEMS = [
    ("price", Reason.NEGATIVE_PRICE, "'-1' is below zero"),
    ("sku", Reason.EMPTY_SKU, ""),
    ("", Reason.UNKNOWN_DEALER, "ação\x01"),
]
FAILURES = [
    RowFailure(row, f"D{row % 3}", "=1+1" if row == 5 else f"SKU-{row}", column, reason, detail)
    for row, (column, reason, detail) in enumerate(_PROBLEMS * 7 + [("sku", Reason.EMPTY_SKU, "")] * 2, start=2)
]


def test_failures_workbook_round_trip_across_sheets(tmp_path):
    path = tmp_path / "out" / "failures.xlsx"
    counts = write_failures_workbook(path, FAILURES, title="Products file x.csv", rows_per_sheet=10)
    assert list(counts.items()) == [(Reason.EMPTY_SKU, 9), (Reason.NEGATIVE_PRICE, 7), (Reason.UNKNOWN_DEALER, 7)]
    # the control character Excel refuses is replaced; '=1+1' stays text
    assert read_failures_workbook(path) == [
        RowFailure(f.row_number, f.dealer_code, f.sku, f.column, f.reason, f.detail.replace("\x01", "\ufffd"))
        for f in FAILURES
    ]
    workbook = openpyxl.load_workbook(path)
    assert workbook.sheetnames == ["Failures", "Failures 2", "Failures 3", "Reasons"]
    assert [workbook[name].max_row for name in workbook.sheetnames[:3]] == [11, 11, 4]
    sheet = workbook["Failures"]
    assert [cell.value for cell in sheet[1]] == list(FAILURE_COLUMNS) and sheet["A1"].font.b
    assert sheet.freeze_panes == "A2"
    assert sheet["C5"].data_type == "s"
    reasons = [[value for value in row if value is not None] for row in workbook["Reasons"].values]
    assert reasons[0] == ["Products file x.csv"]
    assert reasons[-3:] == [[Reason.EMPTY_SKU, 9], [Reason.NEGATIVE_PRICE, 7], [Reason.UNKNOWN_DEALER, 7]]
    assert [p.name for p in path.parent.iterdir()] == ["failures.xlsx"]  # no temporary file left behind


def test_failures_workbook_without_failures(tmp_path):
    path = tmp_path / "failures.xlsx"
    assert write_failures_workbook(path, iter(()), title="Nothing failed") == {}
    assert read_failures_workbook(path) == []
    workbook = openpyxl.load_workbook(path)
    assert [cell.value for cell in workbook["Failures"][1]] == list(FAILURE_COLUMNS)
    assert [row for row in workbook["Reasons"].values] == [("Nothing failed",), ("No failures",)]
    with pytest.raises(ValueError, match="rows_per_sheet"):
        write_failures_workbook(path, [], title="t", rows_per_sheet=1_048_576)


def test_a_failures_workbook_written_in_the_background_is_used_only_when_no_chunk_added_failures(tmp_path):
    read, late = FAILURES[:5], [RowFailure(99, "D1", "SKU-99", "", "refused by the database", "x")]
    prepared = WorkbookInBackground(tmp_path / "failures.xlsx", iter(read), title="t")
    assert prepared.use(tmp_path / "failures.xlsx", late) is None  # the caller writes read + late itself
    assert list(tmp_path.iterdir()) == []
    prepared = WorkbookInBackground(tmp_path / "failures.xlsx", iter(read), title="t")
    assert prepared.use(tmp_path / "failures.xlsx", []) == dict(Counter(f.reason for f in read))
    assert [p.name for p in tmp_path.iterdir()] == ["failures.xlsx"]
    assert [f.row_number for f in read_failures_workbook(tmp_path / "failures.xlsx")] == [f.row_number for f in read]
    (tmp_path / "taken.xlsx").mkdir()  # the path cannot be written: the caller meets the error itself
    assert WorkbookInBackground(tmp_path / "taken.xlsx", iter(read), title="t").use(tmp_path / "taken.xlsx", []) is None

def test_failure_log_round_trip_reopening_and_pickling(tmp_path):
    path = tmp_path / "logs" / "failures.jsonl"
    with FailureLog(path) as log:
        for failure in FAILURES[:10]:
            log.add(failure)
        copy = pickle.loads(pickle.dumps(log))
        log.add(FAILURES[10])
    assert list(iter_failures(path)) == FAILURES[:11]
    assert log.counts == dict(Counter(f.reason for f in FAILURES[:11])) and log.total == 11
    assert copy.counts == dict(Counter(f.reason for f in FAILURES[:10])) and copy.path == path

    with path.open("ab") as file:
        file.write(b'{"row_number": 99, "dea')  # a crash in the middle of a line
    assert list(iter_failures(path)) == FAILURES[:11]
    with FailureLog(path) as reopened:
        assert reopened.total == 11
        for failure in FAILURES[11:]:
            reopened.add(failure)
    assert list(iter_failures(path)) == FAILURES
    assert reopened.counts == dict(Counter(f.reason for f in FAILURES))


def test_the_splitter_stops_between_chunks_once_asked(tmp_path):
    from operations.cancellation import Cancelled, after
    from operations.products.chunks import FileSplitter

    dealers = dealer_codes(3)
    generate_products_file(tmp_path / "products.csv", 1_000, dealers, bad_fraction=0.0, seed=4)
    ids = {code: i for i, code in enumerate(dealers, 1)}
    cut = []
    with FailureLog(tmp_path / "failures.jsonl") as failures, \
            FileSplitter(tmp_path / "products.csv", tmp_path / "chunks", ids, 100, failures) as splitter:
        with pytest.raises(Cancelled, match="before the chunk of rows 302-401"):
            for chunk in splitter.chunks(should_stop=after(3)):
                cut.append(chunk.index)
    assert cut == [0, 1, 2] and splitter.stats.chunks == 3
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == [f"chunk-0000{i}.copy" for i in range(3)]


class _Float(float):
    """A number cell that the checks' shorter path for plain floats does not take."""


class _Int(int):
    pass


@pytest.mark.parametrize("value", [0.0, -0.0, 0.005, 0.015, 2.675, 19.9, 3680.11, 9_999_999_998.999, 9_999_999_999.0,
                                   9_999_999_999.99, 9_999_999_999.995, 1e10, 1e-9, -1.0, -0.5, 5.0, 2_147_483_647.0,
                                   2_147_483_648.0, float("nan"), float("inf"), 7, -7, 2_147_483_648])
def test_number_cells_take_a_shorter_path_with_the_same_outcome(value):
    """Plain float and int cells skip the text checks; every outcome (value or reason) is the general path's."""
    from operations.products.reader import _CellError, _price, _stock

    def outcome(check, cell):
        try:
            return check(cell)
        except _CellError as error:
            return error.column, error.reason, error.detail

    general = _Float(value) if isinstance(value, float) else _Int(value)
    for check in (_price, _stock):
        result, expected = outcome(check, value), outcome(check, general)
        assert result == expected and type(result) is type(expected), (check.__name__, value)
        if isinstance(result, Decimal):
            assert str(result) == str(expected)


def test_the_splitter_halves_the_last_chunks_of_the_expected_rows(tmp_path):
    """The rows past `expected_rows - slots x chunk_rows` go in half chunks, so that the last chunks end
    together on every slot; without an estimate every chunk is full."""
    from operations.products.chunks import FileSplitter

    dealers = dealer_codes(3)
    generate_products_file(tmp_path / "products.csv", 1_000, dealers, bad_fraction=0.0, seed=4)
    ids = {code: i for i, code in enumerate(dealers, 1)}

    def sizes(**tail) -> list[int]:
        shutil.rmtree(tmp_path / "chunks", ignore_errors=True)
        with FailureLog(tmp_path / "failures.jsonl") as failures, \
                FileSplitter(tmp_path / "products.csv", tmp_path / "chunks", ids, 300, failures, **tail) as splitter:
            return [chunk.rows for chunk in splitter.chunks()]

    assert sizes() == [300, 300, 300, 100]
    assert sizes(expected_rows=1_000, slots=2) == [300, 300, 150, 150, 100]  # from row 400 read: half chunks
    assert sizes(expected_rows=600, slots=1) == [300, 150, 150, 150, 150, 100]
