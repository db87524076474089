"""The process's garbage collector during fan-outs of many threads.

A flow process holds ~250,000 long-lived objects (Prefect, SQLAlchemy, httpx, the run's input) before it starts
its tasks. The tasks then allocate many short-lived objects, and every oldest-generation pass of the cyclic
collector walks the whole heap again, holding the interpreter lock that every task thread waits for (~0.2 s a
pass in a flow process: ~20% of the CPU of a first marketplace sync of 50 accounts, and all ten turnstiles
stalled at once). `settled_heap` leaves the objects alive at its start out of those passes (`gc.freeze`) and
gives them back after the last such block of the process ends (`gc.unfreeze`); objects made inside the block
are collected as usual.
"""

from __future__ import annotations

import gc
import threading
from contextlib import contextmanager
from typing import Iterator

_guard = threading.Lock()
_holders = 0


@contextmanager
def settled_heap() -> Iterator[None]:
    """Run the block with the heap alive at its start left out of the collector's passes; blocks may nest or
    overlap across threads (the heap is given back when the last one ends)."""
    global _holders
    with _guard:
        _holders += 1
        gc.freeze()
    try:
        yield
    finally:
        with _guard:
            _holders -= 1
            if not _holders:
                gc.unfreeze()
