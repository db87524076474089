"""Seller accounts of the marketplace sync, from the shell.

    python -m deployments.marketplace_accounts add --code CODE [--nickname NAME]    # OAuth code -> account
    python -m deployments.marketplace_accounts import [--nickname NAME] < token.txt  # adopt a refresh token
    python -m deployments.marketplace_accounts list
    python -m deployments.marketplace_accounts deactivate SELLER_ID
    python -m deployments.marketplace_accounts activate SELLER_ID

`import` reads the refresh token from standard input (or MARKETPLACE_REFRESH_TOKEN), never from the command
line, which other users of the machine can read. `add` and `import` use the MarketplaceApp block
(`--app-block`, default MARKETPLACE_APP_BLOCK) of the Prefect server in PREFECT_API_URL or the local stack.
Exit codes: 0 done, 2 refused (unknown account, dead code or token, missing block).
"""

from __future__ import annotations

import argparse
import os
import sys

from pydantic import SecretStr

from operations.infra.database import project_engine
from operations.infra.services import NotConfigured
from operations.settings import get_settings


def _engine():
    try:
        return project_engine()[1]
    except NotConfigured as exc:  # no DATABASE_URL and no stack running here
        raise SystemExit(f"error: {exc}") from None


def _app(name: str):
    from deployments.stack import local_api_url

    api_url = local_api_url()
    if not api_url:
        raise SystemExit("no Prefect server: set PREFECT_API_URL or run `make up` (the app block lives there)")
    os.environ["PREFECT_API_URL"] = api_url
    from blocks.marketplace_app import load_marketplace_app  # imports Prefect: only once the API URL is set

    return load_marketplace_app(name)


def _print_accounts(accounts) -> None:
    print(f"{'seller id':>12}  {'nickname':20} {'status':22} {'last sync':20} {'result':8} error")
    for a in accounts:
        when = a.last_sync_finished_at or a.last_sync_started_at
        print(
            f"{a.seller_id:>12}  {a.nickname[:20]:20} {a.status:22} "
            f"{when.strftime('%Y-%m-%d %H:%M UTC') if when else '-':20} {a.last_sync_status or '-':8} "
            f"{(a.status_reason or a.last_sync_error)[:80]}"
        )


def main(argv: list[str] | None = None) -> int:
    from operations.marketplace.client import MarketplaceError
    from operations.marketplace.models import AccountStatus
    from operations.marketplace.onboarding import import_refresh_token, onboard_from_code
    from operations.marketplace.store import UnknownAccount, get_account, list_accounts, set_account_status

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app-block", default=None, help="MarketplaceApp block name")
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="add (or re-authorize) a seller from an authorization code")
    add.add_argument("--code", required=True)
    add.add_argument("--nickname", default="")
    add.add_argument("--redirect-uri", default=None)
    imp = sub.add_parser("import", help="adopt a seller from a refresh token read on standard input")
    imp.add_argument("--nickname", default="")
    sub.add_parser("list", help="accounts with their state and last sync")
    for name in ("deactivate", "activate"):
        sub.add_parser(name).add_argument("seller_id", type=int)
    args = parser.parse_args(argv)
    block = args.app_block or get_settings().marketplace_app_block
    engine = _engine()
    try:
        if args.command == "list":
            _print_accounts(list_accounts(engine))
        elif args.command == "add":
            account = onboard_from_code(engine, _app(block).client(), args.code, args.nickname, args.redirect_uri)
            print(f"seller {account.seller_id} ({account.nickname or 'no nickname'}) is {account.status}")
        elif args.command == "import":
            token = os.environ.get("MARKETPLACE_REFRESH_TOKEN") or sys.stdin.readline()
            if not token.strip():
                raise SystemExit("no refresh token on standard input (or MARKETPLACE_REFRESH_TOKEN)")
            account = import_refresh_token(engine, _app(block).client(), SecretStr(token), args.nickname)
            print(f"seller {account.seller_id} ({account.nickname or 'no nickname'}) is {account.status}; "
                  "the imported refresh token was rotated: the old system must not use it again")
        elif args.command == "deactivate":
            account = set_account_status(engine, args.seller_id, AccountStatus.inactive, "deactivated by an operator")
            print(f"seller {account.seller_id} deactivated: later syncs skip it")
        elif args.command == "activate":
            current = get_account(engine, args.seller_id)
            if current.status == AccountStatus.needs_reauthorization.value:
                print(f"seller {args.seller_id} needs re-authorization: use `add --code` with a new code",
                      file=sys.stderr)
                return 2
            set_account_status(engine, args.seller_id, AccountStatus.active)
            print(f"seller {args.seller_id} active")
    except (UnknownAccount, MarketplaceError, ValueError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
