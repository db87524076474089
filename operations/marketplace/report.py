"""What a `sync-marketplace` run reports: one line per account, the accounts table, the summary in markdown and
the run's figures, all built from the accounts' reports (`AccountSyncResult.to_json()` dicts). Plain data in,
plain data out: no Prefect, no service.
"""

from __future__ import annotations

from collections import Counter

from operations.marketplace.store import AccountView, account_label

NOT_SYNCED = ("failed", "needs_reauthorization")  # the statuses that fail the run (unless skipped, see below)
PARKED = "needs_reauthorization"
CANCELLED = "cancelled"
# What the owner of a parked account and the operator do about it.
REAUTHORIZE = ("have the seller authorize the app again, then run the onboard-account deployment with the new "
               "code (or `python -m deployments.marketplace_accounts add --code CODE`; `make onboard` for the "
               "local emulator)")
TOTALS = ("orders_new", "orders_updated", "items_new", "items_updated", "requests", "retries")
MAX_MISMATCHES_SHOWN = 50


class AccountsFailed(RuntimeError):
    """Some accounts of a run failed or need re-authorization (the others were synced): the run's outcome."""


def failed_report(account: AccountView, error: str) -> dict:
    """The report of an account whose task ended without one of its own (the worker died, a bug)."""
    return {"seller_id": account.seller_id, "nickname": account.nickname, "status": "failed", "error": error}


def skipped_reports(skipped: list[tuple[AccountView, str]]) -> list[dict]:
    """The reports of the accounts left out of the run, with why. A parked account keeps its status
    (needs_reauthorization) so that no run looks all-green while one waits for its owner; being skipped, it does
    not fail the run (the run that parked it did, and the parked event tells someone)."""
    return [{"seller_id": a.seller_id, "nickname": a.nickname, "status": PARKED if a.status == PARKED else "skipped",
             "error": why, "skipped": True} for a, why in skipped]


def _label(report: dict) -> str:
    return account_label(report.get("nickname"), report["seller_id"])


def resource_lines(report: dict) -> list[str]:
    """One line per resource the account's sync reached (orders and items fail or succeed on their own):
    `orders: synced, 10 new / 2 updated` or `items: failed: <why>`."""
    lines = []
    errors = report.get("resource_errors") or {}
    for name, state in (report.get("resources") or {}).items():
        counts = report.get(name) or {}
        if state == "synced":
            lines.append(f"{name}: synced, {counts.get('new', 0)} new / {counts.get('updated', 0)} updated")
        else:
            lines.append(f"{name}: {state}" + (f": {errors[name]}" if name in errors else ""))
    return lines


def account_line(report: dict) -> str:
    """One log line for an account: its counts, or its status and error (each resource's when one failed)."""
    gaps = report.get("gaps") or []
    gap_note = f", {len(gaps)} hour(s) left as gaps" if gaps else ""
    if report["status"] != "synced":
        parts = resource_lines(report) if report.get("resource_errors") else [report.get("error", "")]
        return f"{_label(report)}: {report['status']}: {'; '.join(parts)}{gap_note}"
    o, i = report["orders"], report["items"]
    return (
        f"{_label(report)}: orders {o['new']} new / {o['updated']} updated, items {i['new']} new / "
        f"{i['updated']} updated{reconciled_note(report)}, {report['requests']} requests ({report['retries']} retries) "
        f"in {report['seconds']:.1f} s{gap_note}"
    )


def reconciled_note(report: dict) -> str:
    """What a full item read found beyond new and newer items (empty when nothing): stored items no longer
    listed, no longer answered, or repaired under an equal stamp."""
    parts = [f"{report.get(key, 0)} {text}" for key, text in (
        ("items_unlisted", "no longer listed"), ("items_gone", "no longer answered (marked closed/deleted)"),
        ("items_repaired", "repaired")) if report.get(key)]
    return f" ({', '.join(parts)})" if parts else ""


def _mismatches(report: dict) -> list[dict]:
    return [w for w in report.get("windows") or [] if w["api_total"] != w["rows_read"]]


def account_rows(reports: list[dict]) -> list[dict]:
    """The accounts table: one row per account."""
    rows = []
    for r in reports:
        o, i = r.get("orders") or {}, r.get("items") or {}
        rows.append({
            "account": _label(r), "status": r["status"], "orders new": o.get("new", 0),
            "orders updated": o.get("updated", 0), "items new": i.get("new", 0), "items updated": i.get("updated", 0),
            "pages": r.get("order_pages", 0) + r.get("item_pages", 0), "requests": r.get("requests", 0),
            "retries": r.get("retries", 0), "429s": r.get("throttled", 0), "token refreshes": r.get("refreshes", 0),
            "orders": (r.get("resources") or {}).get("orders", "-"),
            "items": (r.get("resources") or {}).get("items", "-"),
            "windows total != read": len(_mismatches(r)), "gaps": len(r.get("gaps") or []),
            "attempts": r.get("attempts", 0),
            "seconds": round(r.get("seconds", 0.0), 2),
            "error": r.get("error", ""),
        })
    return rows


def sync_totals(reports: list[dict]) -> dict[str, int]:
    """Orders and items new and updated, requests and retries, summed over the accounts."""
    totals = dict.fromkeys(TOTALS, 0)
    for r in reports:
        for resource in ("orders", "items"):
            counts = r.get(resource) or {}
            totals[f"{resource}_new"] += counts.get("new", 0)
            totals[f"{resource}_updated"] += counts.get("updated", 0)
        totals["requests"] += r.get("requests", 0)
        totals["retries"] += r.get("retries", 0)
    return totals


def by_status(reports: list[dict]) -> dict[str, int]:
    """How many accounts ended in each status, by status name."""
    return dict(sorted(Counter(r["status"] for r in reports).items()))


def sync_summary(reports: list[dict], seconds: float) -> dict:
    """The run's result: accounts, accounts by status, the totals and the time."""
    return {"accounts": len(reports), "by_status": by_status(reports), **sync_totals(reports),
            "seconds": round(seconds, 2)}


def parked_labels(reports: list[dict]) -> list[str]:
    """The accounts of the run that need re-authorization by their owner."""
    return [_label(r) for r in reports if r["status"] == PARKED]


def attention_lines(reports: list[dict], released: list[dict] = ()) -> str:
    """What the operator must know before the figures: a cancel (what it interrupted), parked accounts (and
    what to do), accounts a crashed sync had left `running`."""
    lines = []
    cancelled = [r for r in reports if r["status"] == CANCELLED]
    if cancelled:
        started = [_label(r) for r in cancelled if "before its sync started" not in r.get("error", "")]
        waiting = [_label(r) for r in cancelled if _label(r) not in started]
        lines.append(
            f"**Cancelled.** The figures below are what was committed before the cancel. Interrupted: "
            f"{', '.join(started) or 'none'}; not started: {', '.join(waiting) or 'none'}. Their checkpoints keep "
            "only what was stored: the next sync resumes them."
        )
    parked = parked_labels(reports)
    if parked:
        lines.append(f"**{len(parked)} account(s) need reauthorization:** {', '.join(parked)}. To resume them, "
                     f"{REAUTHORIZE}.")
    if released:
        held = "; ".join(f"{account_label(a.get('nickname'), a['seller_id'])} (run {a.get('last_sync_run_id') or '?'})"
                         for a in released)
        lines.append(f"**Interrupted syncs found:** {held} had been left `running` by a sync that crashed or was "
                     "killed; shown as interrupted and resumed by this run.")
    return "\n\n".join(lines)


def summary_markdown(reports: list[dict], resources: str, runner: str, seconds: float,
                     released: list[dict] = ()) -> str:
    """The run's summary: what needs attention (a cancel, parked accounts, interrupted syncs), counts by status,
    new and updated records (every attempt's), requests, the accounts not synced and the date windows where the
    API's total differed from the orders read. `released`: the accounts a crashed sync had left `running`."""
    totals, statuses = sync_totals(reports), by_status(reports)
    attention = attention_lines(reports, released)
    problems = "\n".join(_problem_lines(r) for r in reports if r["status"] != "synced")
    gaps = [(_label(r), g) for r in reports for g in r.get("gaps") or []]
    gap_lines = "\n".join(f"- {label}: {g['start']} .. {g['end']}{' (again)' if g.get('retried') else ''}: "
                          f"{g['reason']}" for label, g in gaps[:MAX_MISMATCHES_SHOWN])
    mismatches = [(_label(r), w) for r in reports for w in _mismatches(r)]
    mismatch_lines = "\n".join(
        f"- {label}: {w['start']} .. {w['end']}: API total {w['api_total']:,}, rows read {w['rows_read']:,}"
        for label, w in mismatches[:MAX_MISMATCHES_SHOWN]
    )
    return f"""# Marketplace sync ({resources})

{attention + chr(10) + chr(10) if attention else ''}{len(reports)} account(s) in {seconds:.1f} s on the {runner} task runner:
{', '.join(f'{n} {s}' for s, n in statuses.items()) or 'none'}.

| | new | updated |
|---|---|---|
| orders | {totals['orders_new']:,} | {totals['orders_updated']:,} |
| items | {totals['items_new']:,} | {totals['items_updated']:,} |

API requests: {totals['requests']:,} ({totals['retries']:,} retried).
{_reconciled_line(reports)}
## Accounts not synced
{problems or 'none'}

## Windows where the API's total differs from the orders read
{mismatch_lines or 'none'}

## Gaps: hours not read whole (the checkpoint passed them; every later sync reads them again)
{gap_lines or 'none'}
"""


def _reconciled_line(reports: list[dict]) -> str:
    """The item reconciliation's differences beyond new and newer items, summed (a line, or nothing)."""
    total = {key: sum(r.get(key, 0) for r in reports) for key in ("items_unlisted", "items_gone", "items_repaired")}
    if not any(total.values()):
        return ""
    return (f"\nItems reconciled: {total['items_unlisted']:,} stored item(s) no longer listed by the seller (read by "
            f"id and stored as the API has them), {total['items_gone']:,} no longer answered (marked closed/deleted), "
            f"{total['items_repaired']:,} repaired (fields differed under the same last_updated).\n")


def _problem_lines(report: dict) -> str:
    """An account not synced: its status and error, then a line per resource when one failed on its own."""
    if not report.get("resource_errors"):
        return f"- **{_label(report)}** {report['status']}: {report.get('error', '')}"
    return f"- **{_label(report)}** {report['status']}:\n" + "\n".join(f"  - {line}" for line in resource_lines(report))


def failure_message(reports: list[dict]) -> str | None:
    """The run's failure in one line, naming each failed account and its error; None when none failed."""
    failed = [r for r in reports if r["status"] in NOT_SYNCED and not r.get("skipped")]
    if not failed:
        return None
    return f"{len(failed)} of {len(reports)} account(s) failed: " + "; ".join(
        f"{_label(r)}: {r.get('error', '')}" for r in failed
    )


def start_lines(released: list[AccountView], skipped: list[tuple[AccountView, str]]) -> list[str]:
    """The warnings a run logs before it syncs: accounts a gone run left `running` (resumed here), accounts
    skipped and why."""
    return [
        *(f"{a.label} was left running by flow run {a.last_sync_run_id or '(unknown)'}, which is gone: interrupted, "
          "resumed by this sync" for a in released),
        *(f"{a.label} skipped: {why}" for a, why in skipped),
    ]


def cancelled_message(reports: list[dict]) -> str:
    """The cancelled run's state message: how many accounts were interrupted, and where the figures are."""
    cancelled = [r for r in reports if r["status"] == CANCELLED]
    return (f"cancelled: {len(cancelled)} account(s) interrupted, {len(reports) - len(cancelled)} finished before "
            "the cancel; the summary artifact says what was committed")


def run_outcome(reports: list[dict], stopped: bool) -> tuple[str, str]:
    """How the run ends, as (state, message): `cancelled` when an account was cancelled or the run was stopped;
    `failed` naming the failed accounts; `completed` with a message when accounts need reauthorization, else
    with none."""
    if stopped or any(r["status"] == CANCELLED for r in reports):
        return "cancelled", cancelled_message(reports)
    failed = failure_message(reports)
    if failed:
        return "failed", failed
    parked = parked_labels(reports)
    if parked:
        return "completed", f"{len(parked)} account(s) need reauthorization: {', '.join(parked)}"
    return "completed", ""


def onboarded_markdown(account: AccountView, was_parked: str | None = None) -> str:
    """What `onboard-account` reports of the account it added (never a token). `was_parked`: why the account
    was parked before this authorization, if it was."""
    revived = (f"\n\nIt was parked (needs re-authorization: {was_parked}); its data and checkpoints are kept and "
               "the next sync resumes from them." if was_parked is not None else "")
    return (f"# Seller {account.seller_id} onboarded\n\nNickname: `{account.nickname or '-'}`; "
            f"status: **{account.status}**. The next `sync-marketplace` run syncs it.{revived}")
