"""The process-products report and sizing as plain data and markdown: no Prefect, no service."""

from __future__ import annotations

from pathlib import Path

import pytest

from operations.errors import is_user_error
from operations.products.chunks import (
    ChunkFile,
    ConnectionBudgetTooSmall,
    ProductsFileMissing,
    SplitStats,
    chunk_pool_size,
    chunk_size,
    products_file,
)
from operations.products.outbox import PublishCounts
from operations.products.reader import RowFailure
from operations.products.report import FailureLog
from operations.products.summary import (
    READ_FAILURES,
    ChunkReport,
    LoadResult,
    chunk_line,
    failed_chunk,
    merged_failures,
    reasons_table,
    run_summary,
    summary_line,
    summary_markdown,
    unfinished_message,
)

SOURCE = Path("/in/products.csv")


def _failure(row: int, reason: str = "bad price") -> RowFailure:
    return RowFailure(row_number=row, dealer_code="D1", sku=f"S{row}", column="price", reason=reason, detail="x")


def _chunk(first: int, created: int, failures: list[RowFailure] = (), deferred: int = 0) -> ChunkReport:
    return ChunkReport(0, first, first + 99, 100, created, 100 - created - len(failures), 0, created - deferred,
                       deferred, list(failures))


def _result(reports, failed_chunks=(), final=PublishCounts(3, 1), error="") -> LoadResult:
    stats = SplitStats(rows=205, valid_rows=200, failed_rows=5, chunks=2, read_seconds=0.5)
    return LoadResult(stats, list(reports), list(failed_chunks), final, error)


def test_a_run_with_failures_links_them_and_counts_every_row():
    result = _result([_chunk(2, 60), _chunk(102, 50, [_failure(150)])])
    summary = run_summary(SOURCE, "k", result, {"bad price": 6}, Path("/out/products-failures.xlsx"), 2.0)
    assert (summary["rows"], summary["successes"], summary["failures"], summary["unaccounted"]) == (205, 199, 6, 0)
    assert (summary["created"], summary["updated"], summary["messages_published"]) == (110, 89, 114)
    assert summary_line(summary) == "205 rows processed - Successes: 199, Failures: 6"
    markdown = summary_markdown(SOURCE, summary, result, False, "http://files/products-failures.xlsx")
    assert "Every row is accounted for" in markdown and "4 by the final publish" in markdown
    assert "Failures: [products-failures.xlsx](http://files/products-failures.xlsx)" in markdown
    assert unfinished_message(SOURCE, summary, result) is None


def test_a_run_without_failures_shows_no_failures_link():
    result = _result([_chunk(2, 100), _chunk(102, 100)])
    result.stats.rows, result.stats.failed_rows = 200, 0
    summary = run_summary(SOURCE, "k", result, {}, Path("/out/products-failures.xlsx"), 1.0)
    markdown = summary_markdown(SOURCE, summary, result, True, None)
    assert "products-failures.xlsx" not in markdown and "No row failed." in markdown
    assert "(Dask, 2 chunk(s)" in markdown
    assert reasons_table({}) == [{"reason": "none", "rows": 0}]


def test_an_unfinished_run_names_its_chunk_and_what_waits_in_the_outbox():
    chunk = ChunkFile(1, Path("c"), 100, 102, 201)
    error = failed_chunk(chunk, RuntimeError("refused"))
    assert error == "rows 102-201: RuntimeError: refused"
    result = _result([_chunk(2, 100, deferred=10)], [error], PublishCounts(), "ConnectionError: down")
    summary = run_summary(SOURCE, "k", result, {"bad price": 5}, Path("/out/f.xlsx"), 1.0)
    assert summary["unaccounted"] == 100 and summary["messages_deferred"] == 10
    assert unfinished_message(SOURCE, summary, result) == (
        "products.csv was not fully processed (100 of 205 rows unaccounted for; a re-run with the same file "
        "completes it): chunk not loaded: rows 102-201: RuntimeError: refused"
    )
    markdown = summary_markdown(SOURCE, summary, result, False, "http://f")
    assert "**100 row(s) unaccounted for**: rows 102-201" in markdown and "**10 deferred**" in markdown


def test_chunk_line_and_reasons_most_frequent_first():
    assert chunk_line(_chunk(2, 60, deferred=5)) == (
        "rows 2-101: 60 created, 40 updated, 0 unchanged, 0 failed, 55 message(s) published, "
        "5 left to the final publish"
    )
    assert reasons_table({"a": 1, "b": 3}) == [{"reason": "b", "rows": 3}, {"reason": "a", "rows": 1}]


def test_failures_of_the_read_and_of_the_chunks_merge_in_row_order(tmp_path):
    with FailureLog(tmp_path / READ_FAILURES) as log:
        for row in (3, 10, 40):
            log.add(_failure(row))
    reports = [_chunk(2, 50, [_failure(20), _failure(5)])]
    assert [f.row_number for f in merged_failures(tmp_path, reports)] == [3, 5, 10, 20, 40]


def test_chunk_sizing_and_the_connection_budget():
    assert chunk_size(1_000_000, 4, 2_000, 20_000) == 20_000
    assert chunk_size(80_000, 4, 2_000, 20_000) == 5_000
    assert chunk_size(10, 4, 2_000, 20_000) == 2_000
    assert chunk_pool_size(3, 2) == 1 and chunk_pool_size(10, 3) == 3
    with pytest.raises(ConnectionBudgetTooSmall, match="set it to at least 3") as refused:
        chunk_pool_size(2, 2)
    assert is_user_error(refused.value)


def test_a_missing_products_file_is_a_user_error(tmp_path):
    with pytest.raises(ProductsFileMissing, match="does not exist") as missing:
        products_file(str(tmp_path / "missing.csv"))
    assert is_user_error(missing.value)
    (tmp_path / "p.csv").write_text("x")
    assert products_file(str(tmp_path / "p.csv")) == tmp_path / "p.csv"


def test_a_cancelled_run_and_a_missing_report_say_what_was_done():
    from operations.products.summary import cancelled_message, count_by_reason, report_missing_message

    result = _result([_chunk(2, 100, deferred=30)], final=PublishCounts())
    result.cancelled = "cancelled before the remaining 3 chunk(s)"
    summary = run_summary(SOURCE, "k", result, {"bad price": 5}, Path("/out/f.xlsx"), 1.0)
    assert (summary["cancelled"], summary["chunks_loaded"], summary["messages_deferred"]) == (True, 1, 30)
    assert cancelled_message(SOURCE, summary, result) == (
        "products.csv: cancelled (cancelled before the remaining 3 chunk(s)) after 1 chunk(s) reported of 2 cut from "
        "the 205 row(s) read: 100 row(s) written (100 created, 0 updated, 0 unchanged), 5 failed, 70 message(s) "
        "published, 30 deferred to publish-outbox. A re-run with the same file completes it and changes nothing twice."
    )
    markdown = summary_markdown(SOURCE, summary, result, True, None)
    assert "**Cancelled** (cancelled before the remaining 3 chunk(s)) after 1 chunk(s) reported" in markdown
    assert "**30 deferred** to the `publish-outbox` relay (the run was cancelled)" in markdown

    loaded = _result([_chunk(2, 100), _chunk(102, 100)])
    loaded.report_error = "PermissionError: [Errno 13] Permission denied"
    summary = run_summary(SOURCE, "k", loaded, count_by_reason([_failure(3), _failure(4, "x")]),
                          Path("/out/f.xlsx"), 1.0)
    assert summary["failures_by_reason"] == {"bad price": 1, "x": 1} and summary["failures_file"] == ""
    message = report_missing_message(SOURCE, summary, loaded)
    assert message.startswith("products.csv: every row is loaded (200 successes, 2 failures) and 204 message(s)")
    assert "Permission denied" in message
    assert "**The failures report could not be written**" in summary_markdown(SOURCE, summary, loaded, False, None)
