"""Keys in the order they were last touched: what retention forgets first.

Shared by the users flow (:mod:`streams.retention`: shoppers and items), the collaborative
flow (:mod:`streams.collab_partition`: shoppers) and the evaluation's replay of the latter
(:mod:`evaluation.collab_replay`), so all of them forget the same keys at the same events.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping


class Recency:
    """Keys in the order they were last touched, each with its newest event time.

    Eviction walks from the least recently touched key and stops at the first one still
    within the retention. A late event (an older timestamp arriving after newer ones)
    keeps its key's newest time, so a key is never forgotten while it has a recent event;
    a key behind a recent one waits until that one expires. Both depend only on the order
    of events, so they replay identically.
    """

    def __init__(self, items: Mapping[str, float] | None = None) -> None:
        self.last: dict[str, float] = dict(items or {})

    def __len__(self) -> int:
        return len(self.last)

    def touch(self, key: str, ts: float) -> None:
        """Move ``key`` to the most recent end, remembering the newer of its times."""
        old = self.last.pop(key, None)
        self.last[key] = ts if old is None or ts > old else old

    def forget(self, key: str) -> None:
        self.last.pop(key, None)

    def expired(self, cutoff: float) -> Iterator[str]:
        """Pop and yield the least recently touched keys whose newest time is before ``cutoff``."""
        last = self.last
        while last:
            key = next(iter(last))
            if last[key] >= cutoff:
                return
            del last[key]
            yield key
