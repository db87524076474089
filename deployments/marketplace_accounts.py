"""Seller accounts of the marketplace sync, from the shell.

    python -m deployments.marketplace_accounts emulated [--seller ID] [--code-only]  # `make onboard`
    python -m deployments.marketplace_accounts add --code CODE [--nickname NAME]    # OAuth code -> account
    python -m deployments.marketplace_accounts import [--nickname NAME] < token.txt  # adopt a refresh token
    python -m deployments.marketplace_accounts list
    python -m deployments.marketplace_accounts deactivate SELLER_ID
    python -m deployments.marketplace_accounts activate SELLER_ID
    python -m deployments.marketplace_accounts gaps                                  # hours not read whole
    python -m deployments.marketplace_accounts rotate-key                            # re-encrypt every token

`emulated` onboards a seller of the local marketplace emulator (`make up` starts it when MARKETPLACE_API_URL
is unset) the way a real seller is onboarded: it opens the emulator's OAuth consent page (GET /authorization with
the app block's client_id and redirect_uri; the emulator consents at once) and takes the `code` from the
redirect, then adds the account as `add` does; the next emulated seller not onboarded yet unless `--seller`.
With `--code-only` it prints the code (single use, 10 minutes) and the onboard-account run that exchanges it,
for the UI's form or `make run`.

Against the real marketplace, the seller opens the app's authorization URL in a browser, e.g.
https://auth.mercadolivre.com.br/authorization?response_type=code&client_id=APP_ID&redirect_uri=REDIRECT_URI,
logs in and authorizes the app; the marketplace sends the browser to REDIRECT_URI?code=TG-...; that code
(from the redirect URI's handler, or the browser's address bar) goes to `add --code` or the onboard-account
deployment (its "Authorization code" field) within minutes.

`import` reads the refresh token from standard input (or MARKETPLACE_REFRESH_TOKEN), never from the command
line, which other users of the machine can read. `add` and `import` use the MarketplaceApp block
(`--app-block`, default MARKETPLACE_APP_BLOCK) of the Prefect server in PREFECT_API_URL or the local stack.
`rotate-key` re-encrypts every account's tokens with the first key of MARKETPLACE_TOKEN_KEY (plain tokens of
before encryption included); run it after putting a new key first, then drop the old key (docs/marketplace.md).
Exit codes: 0 done, 2 refused (unknown account, dead code or token, missing block, no emulator).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from urllib.parse import parse_qs, urlsplit

import httpx
from pydantic import SecretStr

from operations.infra.database import project_engine
from operations.infra.http import default_ssl_context
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


def authorization_code(app, seller_id: int, timeout: float = 30) -> str:
    """A code from the marketplace emulator's OAuth consent page, as the seller's browser gets it: GET
    /authorization with the app's client_id and redirect_uri (the emulator's `seller_id` says who logs in); the
    answer redirects to redirect_uri?code=...."""
    params = {"response_type": "code", "client_id": app.client_id, "seller_id": seller_id}
    if app.redirect_uri:
        params["redirect_uri"] = app.redirect_uri
    response = httpx.get(f"{app.api_base_url}/authorization", params=params, follow_redirects=False, timeout=timeout,
                         verify=default_ssl_context())
    code = parse_qs(urlsplit(response.headers.get("location", "")).query).get("code")
    if response.status_code not in (302, 303) or not code:
        raise ValueError(f"{app.api_base_url}/authorization gave no code ({response.status_code}): {response.text[:200]}")
    return code[0]


def onboard_emulated(engine, app, seller_id: int | None, nickname: str, code_only: bool) -> int:
    """`emulated`: a code from the emulator's consent page for the seller (the next one not onboarded when None),
    then the account added, or the code printed with the run that exchanges it."""
    from emulators.marketplace import EmulatorControl
    from operations.marketplace.onboarding import onboard_from_code
    from operations.marketplace.store import list_accounts

    try:
        with EmulatorControl(app.api_base_url) as control:
            sellers = {s["seller_id"]: s["nickname"] for s in control.sellers()}
    except (httpx.HTTPError, RuntimeError) as exc:
        raise ValueError(f"the app block's API {app.api_base_url} is not the marketplace emulator ({exc})") from None
    if seller_id is None:
        known = {account.seller_id for account in list_accounts(engine)}
        seller_id = next((s for s in sellers if s not in known), None)
        if seller_id is None:
            print(f"every emulated seller ({len(sellers)}) is onboarded already; `--seller ID` re-authorizes one")
            return 0
    elif seller_id not in sellers:
        raise ValueError(f"no emulated seller {seller_id}: the emulator has {', '.join(map(str, sellers))}")
    nickname = nickname or sellers[seller_id]
    code = authorization_code(app, seller_id)
    if code_only:
        pairs = " ".join(shlex.quote(p) for p in (f"authorization_code={code}", f"nickname={nickname}"))
        print(f"authorization code of seller {seller_id} ({nickname}), single use, valid 10 minutes:\n  {code}")
        print(f'exchange it: make run DEPLOYMENT=onboard-account/on-demand PARAMS="{pairs}"')
        print("or in the UI: Deployments -> onboard-account/on-demand -> Run -> Custom run -> Authorization code")
        return 0
    account = onboard_from_code(engine, app.client(), code, nickname)
    print(f"seller {account.seller_id} ({account.nickname or 'no nickname'}) is {account.status}: the next "
          "sync-marketplace run syncs it")
    return 0


def _print_accounts(accounts) -> None:
    print(f"{'seller id':>12}  {'nickname':20} {'status':22} {'last sync':20} {'result':8} error")
    for a in accounts:
        when = a.last_sync_finished_at or a.last_sync_started_at
        print(
            f"{a.seller_id:>12}  {a.nickname[:20]:20} {a.status:22} "
            f"{when.strftime('%Y-%m-%d %H:%M UTC') if when else '-':20} {a.last_sync_status or '-':8} "
            f"{(a.status_reason or a.last_sync_error)[:80]}"
        )


def _parser() -> argparse.ArgumentParser:
    """The commands and their options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--app-block", default=None, help="MarketplaceApp block name")
    sub = parser.add_subparsers(dest="command", required=True)
    emulated = sub.add_parser(
        "emulated", help="onboard a seller of the local marketplace emulator (a code from its consent page)",
        description="Onboard a seller of the local marketplace emulator: a code from its OAuth consent page, then "
        "the account added (or, with --code-only, the code and the onboard-account run that exchanges it). "
        "Against the real marketplace, the seller authorizes the app at its authorization URL (e.g. "
        "https://auth.mercadolivre.com.br/authorization?response_type=code&client_id=APP_ID&redirect_uri=URI) "
        "and the code the marketplace appends to the redirect URI goes to `add --code`.",
    )
    emulated.add_argument("--seller", type=int, default=None, help="seller id (default: the next not onboarded)")
    emulated.add_argument("--nickname", default="", help="default: the emulated seller's nickname")
    emulated.add_argument("--code-only", action="store_true",
                          help="print the code and the onboard-account run instead of adding the account")
    add = sub.add_parser("add", help="add (or re-authorize) a seller from an authorization code")
    add.add_argument("--code", required=True)
    add.add_argument("--nickname", default="")
    add.add_argument("--redirect-uri", default=None)
    imp = sub.add_parser("import", help="adopt a seller from a refresh token read on standard input")
    imp.add_argument("--nickname", default="")
    sub.add_parser("list", help="accounts with their state and last sync")
    for name in ("deactivate", "activate"):
        sub.add_parser(name).add_argument("seller_id", type=int)
    sub.add_parser("gaps", help="hours of orders a sync could not read whole (each later sync reads them again)")
    sub.add_parser("rotate-key", help="re-encrypt every account's tokens with the first key of MARKETPLACE_TOKEN_KEY")
    return parser


def main(argv: list[str] | None = None) -> int:
    from operations.marketplace.client import MarketplaceError
    from operations.marketplace.models import AccountStatus
    from operations.marketplace.onboarding import import_refresh_token, onboard_from_code
    from operations.marketplace.store import (
        UnknownAccount, encrypt_stored_tokens, get_account, list_accounts, open_gaps, set_account_status,
    )
    from operations.marketplace.tokens import TokenKeyError

    args = _parser().parse_args(argv)
    block = args.app_block or get_settings().marketplace.app_block
    engine = _engine()
    try:
        if args.command == "list":
            _print_accounts(list_accounts(engine))
        elif args.command == "rotate-key":
            print(f"{encrypt_stored_tokens(engine)} account(s) re-encrypted with the first key of MARKETPLACE_TOKEN_KEY")
        elif args.command == "gaps":
            gaps = open_gaps(engine, None)
            for gap in gaps:
                print(f"{gap.seller_id:>12}  {gap.resource:7} {gap.start:%Y-%m-%d %H:%M}..{gap.stop:%H:%M} UTC  "
                      f"tried {gap.attempts}x  {gap.reason[:160]}")
            print(f"{len(gaps)} gap(s)")
        elif args.command == "emulated":
            if get_settings().marketplace.api_url:
                print("MARKETPLACE_API_URL is set: `emulated` is for the local emulator; onboard a real seller "
                      "with `add --code` (see `emulated --help` for how a seller gets a code)", file=sys.stderr)
                return 2
            return onboard_emulated(engine, _app(block), args.seller, args.nickname, args.code_only)
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
    except (UnknownAccount, MarketplaceError, TokenKeyError, ValueError) as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
