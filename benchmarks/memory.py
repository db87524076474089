"""Peak memory of a benchmark's processes, sampled from /proc (shared by every benchmark module)."""

from __future__ import annotations

import os
import threading


def _rss_of_tree(pids: set[int]) -> int:
    """Resident memory (bytes) of the given processes and all their descendants, except detached services
    (session leaders such as the Prefect server, Redis, PostgreSQL and the emulators the local stack starts
    from this process on first use: they are not the run's memory)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid, _, session = fh.read().rsplit(")", 1)[1].split()[1:4]
            if int(session) != int(entry):
                children.setdefault(int(ppid), []).append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    total, todo, seen = 0, list(pids), set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo.extend(children.get(pid, []))
        try:
            with open(f"/proc/{pid}/statm") as fh:
                total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
    return total


class PeakMemory:
    """Samples every second the summed RSS of the run's process trees (`own`), plus what `shared` processes
    (a Redis server that also holds other runs' keys) grew by since the start."""

    def __init__(self, own: set[int], shared: set[int] = frozenset()):
        self.own, self.shared, self.peak, self._stop = own, set(shared), 0, threading.Event()
        self.peak_own = self.peak_shared = 0  # the two parts' own peaks (not necessarily at the same moment)
        self._shared_start = _rss_of_tree(self.shared) if self.shared else 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            shared = max(0, _rss_of_tree(self.shared) - self._shared_start) if self.shared else 0
            own = _rss_of_tree(self.own)
            self.peak = max(self.peak, own + shared)
            self.peak_own, self.peak_shared = max(self.peak_own, own), max(self.peak_shared, shared)
            self._stop.wait(1.0)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
