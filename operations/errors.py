"""The one mark of an expected user error, shared by every domain.

A `UserError` is a request the user can fix (bad input, a missing or malformed file, a run key already used
with other parameters): its message says what to change, and a flow ends Failed with that message alone, no
traceback (`flows/outcomes.py`). The tasks' retry rule never retries one (`transient = False`). Any other
exception is a fault or a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected error the user fixes; the message names what is wrong and, where it helps, what to do."""

    transient = False  # never healed by a retry (tasks/retries.py)


def is_user_error(exc: BaseException) -> bool:
    """Whether `exc` is an expected user error (its message is enough) rather than a fault (its traceback helps)."""
    return isinstance(exc, UserError)
