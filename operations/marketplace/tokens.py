"""Seller tokens encrypted at rest: whoever reads the database (a dump, a backup, a replica) cannot act as a
seller without the key, which is never in the database.

The key is `MARKETPLACE_TOKEN_KEY`: one or more Fernet keys separated by commas. The first encrypts; every one
decrypts (MultiFernet), which is how a key is rotated without downtime (docs/marketplace.md, "Token key"). Unset,
a key is generated once under DATA_DIR (`marketplace-token.key`, mode 0600), as the local stack's other
embedded defaults live there; a deployment whose processes run on several machines sets the variable instead.

A stored token is `fernet:<token>`; a value without the prefix is a plain token stored before encryption: it is
read as it is and encrypted the next time the store meets it (and by migration 0005 when a key is at hand).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from operations.errors import UserError

PREFIX = "fernet:"
KEY_FILE = "marketplace-token.key"
KEY_SETTING = "MARKETPLACE_TOKEN_KEY"

logger = logging.getLogger(__name__)
_ciphers: dict[str, TokenCipher] = {}
_guard = threading.Lock()


class TokenKeyError(UserError):
    """The token key is missing, malformed, or not the key the stored tokens were encrypted with."""


class TokenCipher:
    """Encrypts and decrypts stored tokens with the configured keys (the first encrypts, all decrypt)."""

    def __init__(self, keys: list[str]):
        if not keys:
            raise TokenKeyError(f"{KEY_SETTING} holds no key")
        try:
            self._fernet = MultiFernet([Fernet(key.strip().encode()) for key in keys])
        except (ValueError, TypeError):
            raise TokenKeyError(
                f"{KEY_SETTING} is not a list of Fernet keys (32 url-safe base64 bytes each, separated by commas); "
                "make one with `python -m operations.marketplace.tokens new-key`"
            ) from None

    def encrypt(self, plain: str) -> str:
        return PREFIX + self._fernet.encrypt(plain.encode()).decode() if plain else ""

    def decrypt(self, stored: str | None, what: str = "a stored token") -> str:
        """The plain token; a value stored before encryption (no prefix) is returned as it is."""
        if not stored or not is_encrypted(stored):
            return stored or ""
        try:
            return self._fernet.decrypt(stored[len(PREFIX):].encode()).decode()
        except InvalidToken:
            raise TokenKeyError(
                f"{what} cannot be decrypted with {KEY_SETTING}: it is not the key the tokens were encrypted with "
                "(after a rotation, keep the old key after the new one until `python -m "
                "deployments.marketplace_accounts rotate-key` has run)"
            ) from None

    def rotate(self, stored: str) -> str:
        """The value encrypted with the first key (a plain value is encrypted)."""
        if not stored:
            return stored
        if not is_encrypted(stored):
            return self.encrypt(stored)
        try:
            return PREFIX + self._fernet.rotate(stored[len(PREFIX):].encode()).decode()
        except InvalidToken:
            raise TokenKeyError(f"a stored token cannot be decrypted with any key of {KEY_SETTING}") from None


def is_encrypted(stored: str | None) -> bool:
    return bool(stored) and stored.startswith(PREFIX)


def new_key() -> str:
    return Fernet.generate_key().decode()


def key_file(data_dir: Path) -> Path:
    return data_dir / KEY_FILE


def ensure_key_file(data_dir: Path) -> Path:
    """The generated key under `data_dir`, made (mode 0600) if absent; concurrent callers get the same key."""
    path = key_file(data_dir)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        draft = path.with_name(f".{KEY_FILE}.{os.getpid()}.{threading.get_ident()}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(new_key() + "\n")
        try:
            os.link(draft, path)  # whole or not at all: a concurrent reader never sees a half-written key
        except FileExistsError:
            pass  # another process made it first: its key is the key
        else:
            logger.warning("generated the marketplace token key %s (set %s to use your own)", path, KEY_SETTING)
        finally:
            draft.unlink(missing_ok=True)
    return path


def configured_keys(data_dir: Path, setting: str | None, generate: bool = True) -> list[str]:
    """The keys from the setting, else from the generated key file (made when `generate`)."""
    if setting:
        return [k for k in setting.split(",") if k.strip()]
    path = key_file(data_dir)
    if not path.exists():
        if not generate:
            return []
        ensure_key_file(data_dir)
    return [k for k in path.read_text().replace("\n", ",").split(",") if k.strip()]


def token_cipher() -> TokenCipher:
    """The cipher of this process's settings (MARKETPLACE_TOKEN_KEY, else the key under DATA_DIR)."""
    from operations.settings import get_settings

    settings = get_settings()
    secret = settings.marketplace.token_key
    keys = configured_keys(settings.stack.data_dir, secret.get_secret_value() if secret else None)
    cache_key = ",".join(keys)
    with _guard:
        cipher = _ciphers.get(cache_key)
        if cipher is None:
            cipher = _ciphers[cache_key] = TokenCipher(keys)
    return cipher


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m operations.marketplace.tokens",
                                     description="Keys of the refresh tokens' encryption (MARKETPLACE_TOKEN_KEY).")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("new-key", help="print a new key (put it first in MARKETPLACE_TOKEN_KEY to rotate)")
    parser.parse_args(argv)
    print(new_key())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
