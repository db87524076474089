"""What a `sync-marketplace` run reports, and the full-resync day it accepts: pure functions, no service."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from operations.errors import UserError
from operations.marketplace.report import (
    account_line,
    account_rows,
    failed_report,
    failure_message,
    onboarded_markdown,
    parked_labels,
    skipped_reports,
    summary_markdown,
    sync_summary,
)
from operations.marketplace.store import AccountView
from operations.marketplace.sync import resync_start

NOW = datetime(2026, 12, 5, 10, 0, tzinfo=timezone.utc)


def _account(seller_id: int, nickname: str = "shop", status: str = "active") -> AccountView:
    return AccountView(seller_id, nickname, status, "", None, None, "", "")


def _synced(seller_id: int, orders=(10, 2), items=(3, 1), windows=()) -> dict:
    return {"seller_id": seller_id, "nickname": "shop", "status": "synced",
            "orders": {"new": orders[0], "updated": orders[1]}, "items": {"new": items[0], "updated": items[1]},
            "order_pages": 2, "item_pages": 1, "requests": 7, "retries": 1, "throttled": 1, "refreshes": 0,
            "windows": list(windows), "seconds": 1.234, "error": ""}


def test_totals_statuses_and_rows_add_up_over_synced_failed_and_skipped_accounts():
    window = {"start": "2026-12-01T00:00:00+00:00", "end": "2026-12-02T00:00:00+00:00", "api_total": 12,
              "rows_read": 10}
    reports = [_synced(1), _synced(2, orders=(5, 0), windows=[window]),
               failed_report(_account(3), "RuntimeError: worker lost"),
               *skipped_reports([(_account(4, status="inactive"), "deactivated")])]
    summary = sync_summary(reports, 3.14159)
    assert summary == {"accounts": 4, "by_status": {"failed": 1, "skipped": 1, "synced": 2}, "orders_new": 15,
                       "orders_updated": 2, "items_new": 6, "items_updated": 2, "requests": 14, "retries": 2,
                       "seconds": 3.14}
    rows = account_rows(reports)
    assert [r["account"] for r in rows] == ["shop-1", "shop-2", "shop-3", "shop-4"]
    assert rows[1]["windows total != read"] == 1 and rows[1]["pages"] == 3 and rows[1]["seconds"] == 1.23
    assert rows[2] == {**rows[2], "status": "failed", "orders new": 0, "error": "RuntimeError: worker lost"}

    markdown = summary_markdown(reports, "both", "threads", 3.14159)
    assert "4 account(s) in 3.1 s on the threads task runner:\n1 failed, 1 skipped, 2 synced." in markdown
    assert "| orders | 15 | 2 |" in markdown and "API requests: 14 (2 retried)." in markdown
    assert "- **shop-3** failed: RuntimeError: worker lost" in markdown
    assert "- **shop-4** skipped: deactivated" in markdown
    assert "- shop-2: 2026-12-01T00:00:00+00:00 .. 2026-12-02T00:00:00+00:00: API total 12, rows read 10" in markdown


def test_an_empty_run_reports_none_and_does_not_fail():
    assert "0 account(s)" in summary_markdown([], "orders", "dask", 0.0)
    assert "## Accounts not synced\nnone" in summary_markdown([], "orders", "dask", 0.0)
    assert failure_message([]) is None and sync_summary([], 0.0)["by_status"] == {}


def test_only_failed_and_parked_accounts_fail_the_run_each_named_with_its_error():
    parked = {"seller_id": 5, "nickname": "", "status": "needs_reauthorization", "error": "invalid_grant"}
    reports = [_synced(1), parked, failed_report(_account(3), "boom"),
               *skipped_reports([(_account(4), "deactivated")])]
    assert failure_message(reports) == "2 of 4 account(s) failed: seller-5: invalid_grant; shop-3: boom"
    assert failure_message([_synced(1), *skipped_reports([(_account(4), "deactivated")])]) is None


def test_account_lines_give_counts_or_the_error():
    assert account_line(_synced(1)) == (
        "shop-1: orders 10 new / 2 updated, items 3 new / 1 updated, 7 requests (1 retries) in 1.2 s"
    )
    assert account_line(failed_report(_account(3), "boom")) == "shop-3: failed: boom"


def test_the_onboarded_account_is_named_without_tokens():
    text = onboarded_markdown(_account(9, nickname=""))
    assert text.startswith("# Seller 9 onboarded") and "`-`" in text and "**active**" in text
    assert "was parked" not in text
    revived = onboarded_markdown(_account(9), "refresh token refused (invalid_grant)")
    assert "It was parked (needs re-authorization: refresh token refused (invalid_grant))" in revived


def test_a_parked_account_found_at_the_start_shows_in_every_run_without_failing_it():
    reports = [_synced(1), *skipped_reports([(_account(5, status="needs_reauthorization"), "needs re-authorization"),
                                             (_account(4, status="inactive"), "deactivated")])]
    assert [r["status"] for r in reports] == ["synced", "needs_reauthorization", "skipped"]
    assert failure_message(reports) is None, "a parked account fails the run that parks it, not every later one"
    assert parked_labels(reports) == ["shop-5"]
    markdown = summary_markdown(reports, "both", "threads", 1.0)
    assert "**1 account(s) need reauthorization:** shop-5." in markdown
    assert "onboard-account deployment" in markdown and "make onboard" in markdown
    assert markdown.index("need reauthorization") < markdown.index("| orders |"), "the warning comes first"


def test_a_cancelled_run_says_what_was_committed_which_accounts_were_interrupted_and_which_never_started():
    interrupted = {**_synced(1, orders=(120, 0)), "status": "cancelled", "attempts": 1,
                   "error": "cancelled before the next page of orders; what it committed is kept"}
    waiting = {**_synced(2, orders=(0, 0), items=(0, 0)), "status": "cancelled", "attempts": 1,
               "error": "cancelled before its sync started"}
    reports = [_synced(3), interrupted, waiting]
    markdown = summary_markdown(reports, "both", "dask", 2.0)
    assert "**Cancelled.**" in markdown and "Interrupted: shop-1; not started: shop-2." in markdown
    assert "| orders | 130 | 2 |" in markdown, "what the interrupted account committed counts"
    assert failure_message(reports) is None
    rows = account_rows(reports)
    assert [(r["status"], r["orders new"], r["attempts"]) for r in rows] == [
        ("synced", 10, 0), ("cancelled", 120, 1), ("cancelled", 0, 1)]


def test_accounts_a_crashed_sync_left_running_are_named_with_their_run():
    released = [{"seller_id": 7, "nickname": "shop", "last_sync_run_id": "3f2a"}]
    markdown = summary_markdown([_synced(7)], "orders", "threads", 1.0, released)
    assert "**Interrupted syncs found:** shop-7 (run 3f2a) had been left `running`" in markdown
    assert "Interrupted syncs found" not in summary_markdown([_synced(7)], "orders", "threads", 1.0)


@pytest.mark.parametrize("day", ["", None])
def test_no_resync_day_means_incremental(day):
    assert resync_start(day, NOW) is None


def test_a_resync_day_starts_at_midnight_utc_and_today_is_accepted():
    assert resync_start("2026-10-01", NOW) == datetime(2026, 10, 1, tzinfo=timezone.utc)
    assert resync_start("2026-12-05", NOW) == datetime(2026, 12, 5, tzinfo=timezone.utc)


@pytest.mark.parametrize("day, words", [("2026-12-06", "in the future"), ("2026-13-45", "not a date"),
                                        ("yesterday", "not a date")])
def test_a_bad_or_future_resync_day_is_a_user_error_naming_it(day, words):
    with pytest.raises(UserError, match=words) as refused:
        resync_start(day, NOW)
    assert day in str(refused.value)


def test_orders_and_items_have_their_own_lines_and_gaps_are_listed():
    gap = {"start": "2026-12-05T08:00:00+00:00", "end": "2026-12-05T09:00:00+00:00", "retried": True,
           "reason": "status paid: 25,000 orders, 20,000 read from both ends of the API's offset cap (10,000)"}
    failed = {**_synced(5), "status": "failed", "error": "orders: TransientAPIError: 503",
              "resources": {"orders": "failed", "items": "synced"},
              "resource_errors": {"orders": "TransientAPIError: 503"}}
    synced = {**_synced(6), "resources": {"orders": "synced", "items": "synced"}, "gaps": [gap]}
    assert account_line(failed) == "shop-5: failed: orders: failed: TransientAPIError: 503; items: synced, 3 new / 1 updated"
    assert account_line(synced).endswith(", 1 hour(s) left as gaps")
    rows = account_rows([failed, synced])
    assert (rows[0]["orders"], rows[0]["items"], rows[1]["gaps"]) == ("failed", "synced", 1)
    markdown = summary_markdown([failed, synced], "both", "threads", 1.0)
    assert "- **shop-5** failed:\n  - orders: failed: TransientAPIError: 503\n  - items: synced, 3 new / 1 updated" in markdown
    assert ("- shop-6: 2026-12-05T08:00:00+00:00 .. 2026-12-05T09:00:00+00:00 (again): status paid: 25,000 orders"
            in markdown)


def test_a_runs_outcome_and_its_opening_warnings_come_from_the_reports():
    from operations.marketplace.report import run_outcome, start_lines

    synced, parked = _synced(1), {**_synced(2), "status": "needs_reauthorization", "nickname": "gone", "skipped": True}
    failed = {**_synced(3), "status": "failed", "error": "boom"}
    cancelled = {**_synced(4), "status": "cancelled"}
    assert run_outcome([synced], stopped=False) == ("completed", "")
    assert run_outcome([synced, parked], stopped=False) == ("completed", "1 account(s) need reauthorization: gone-2")
    assert run_outcome([synced, failed], stopped=False) == ("failed", "1 of 2 account(s) failed: shop-3: boom")
    state, message = run_outcome([synced, cancelled, failed], stopped=False)
    assert state == "cancelled" and message.startswith("cancelled: 1 account(s) interrupted, 2 finished")
    assert run_outcome([synced], stopped=True)[0] == "cancelled"
    left = AccountView(5, "shop", "active", "", None, None, "running", "", "run-9")
    assert start_lines([left], [(_account(6), "deactivated")]) == [
        "shop-5 was left running by flow run run-9, which is gone: interrupted, resumed by this sync",
        "shop-6 skipped: deactivated",
    ]


@pytest.mark.parametrize(
    "concurrency, accounts, runner, workers, external, expected",
    [
        (10, 200, "threads", 2, False, (20, 10)),  # twice as many accounts as request slots
        (10, 3, "threads", 2, False, (3, 10)),  # never more account syncs than accounts
        (10, 200, "dask", 2, False, (20, 5)),  # the local cluster's 2 processes share the 10 slots
        (10, 1, "dask", 2, False, (1, 10)),  # one account: one worker
        (10, 200, "dask", 2, True, (20, 10)),  # an existing cluster: its threads bound the rest
    ],
)
def test_a_run_keeps_its_requests_in_flight_with_twice_as_many_accounts_at_once(
    concurrency, accounts, runner, workers, external, expected
):
    from operations.marketplace.sync import run_shape

    shape = run_shape(concurrency, accounts, runner, workers, external)
    assert (shape.accounts_at_once, shape.requests_in_flight) == expected
