"""What a users-flow partition forgets, and when: the bound on its memory, snapshots and Redis.

Without it the partition keeps every shopper and item ever seen (issue 16 item 7): state,
snapshots and the Redis hashes every serving replica reads grow with the shop's whole
history, not with what is active. Two rules bound them:

* **Retention.** A shopper or item with no event for ``stream_retention_days`` is
  forgotten: the shopper's state, the item's popularity entry and first-seen time. A
  shopper who comes back starts afresh (as an unknown one would); an item that comes back
  is new again. Redis loses the same entries in the same atomic write, so Redis still
  equals "the state after exactly the events up to the applied offset".
* **A top-N of popularity.** At most ``stream_popularity_items`` popularity entries per
  partition, the largest decayed counts, cut back once per event-time day.

Both are judged in *event time* and at points fixed by the event sequence (each event;
each crossing of a day boundary), never by the wall clock or by how Kafka happened to
batch the messages. A replay after a crash therefore forgets exactly what the first run
forgot, which the exactly-once argument of :mod:`streams.user_partition` needs.

**Memory it leaves**, as a bound: shoppers with an event within the retention, times one
encoded state each (~0.8-14 kB by history length, docs/scale.md), plus at most
``stream_live_states`` decoded ones; items with an event within the retention (their
first-seen times) and at most ``stream_popularity_items`` popularity entries.
"""

from __future__ import annotations

from collections.abc import Mapping

from ranking.recency import Recency
from ranking.user_state import decay_factor

__all__ = ["Recency", "popularity_to_cut"]


def popularity_to_cut(
    entries: Mapping[str, tuple[float, float]], now_ts: float, half_life_s: float, keep: int
) -> list[str]:
    """The entries beyond the ``keep`` largest, by count decayed to ``now_ts`` (ties: item id).

    Counts are compared by magnitude: a partial counter that dipped below zero (a
    cancelled purchase) matters to the exact cross-partition sum as much as a positive one.
    """
    if len(entries) <= keep:
        return []
    ranked = sorted(
        entries.items(),
        key=lambda kv: (-abs(kv[1][0]) * decay_factor(max(now_ts - kv[1][1], 0.0), half_life_s), kv[0]),
    )
    return [item for item, _ in ranked[keep:]]
