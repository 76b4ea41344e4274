"""Which events become training pairs, and with what context (pure rules).

For each applied ``click``, ``cart`` or ``purchase`` the context is *the most recent
signal strictly before it*:

* the user's last search, if it is at most ``query_window_s`` older than the event and
  newer than every earlier item interaction: the query "led to" the event;
* otherwise the user's recent distinct items with an event time strictly earlier than
  the event (most recent first, cancels and the target itself left out). "Strictly
  earlier" is what keeps the lines of one basket (same user, same time) out of each
  other's context, and gives a late event the context it had at its own time.

A pair needs ``min_history`` context items (a query counts as enough). Titles are added
later by the flow (:class:`PairDraft` holds ids only, so this module needs no Redis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from freshrec.contracts import KIND_WEIGHT, Event, TrainPair

from .user_state import UserState, first_before

PAIR_KINDS = frozenset({"click", "cart", "purchase"})


@dataclass(frozen=True, slots=True)
class PairRules:
    context_size: int = 10
    min_history: int = 1
    query_window_s: float = 1800.0

    @classmethod
    def from_settings(cls, settings: Any) -> PairRules:
        return cls(settings.stream_pair_context, settings.min_history_for_pair, settings.stream_query_window_s)


@dataclass(frozen=True, slots=True)
class PairDraft:
    """A train pair before titles are looked up."""

    pair_id: str
    user_id: str
    context_items: tuple[str, ...]
    query: str | None
    target_item: str
    weight: float
    ts: float

    def complete(self, titles: dict[str, str], target_texts: dict[str, str]) -> TrainPair:
        """The TrainPair, with titles where the catalog has them (else the item id)."""
        texts = [titles.get(i, i) for i in self.context_items]
        context_text = self.query if self.query is not None else "; ".join(texts)
        return TrainPair(
            pair_id=self.pair_id,
            user_id=self.user_id,
            context_items=list(self.context_items),
            context_text=context_text,
            context_texts=texts,
            target_item=self.target_item,
            target_text=target_texts.get(self.target_item, titles.get(self.target_item, "")),
            weight=self.weight,
            ts=self.ts,
        )


def pair_for(state: UserState, event: Event, rules: PairRules = PairRules()) -> PairDraft | None:
    """The pair an applied event yields, or None (wrong kind, not enough context).

    ``state`` may be taken before or after applying ``event``: only interactions strictly
    earlier than the event are used, so the answer is the same.
    """
    if event.kind not in PAIR_KINDS or event.item_id is None:
        return None
    ts = event.ts
    target = event.item_id
    idx = first_before(state.history, ts)
    newest_earlier = state.history[idx].ts if idx < len(state.history) else None
    if (
        state.query is not None
        and state.query_ts <= ts
        and ts - state.query_ts <= rules.query_window_s
        and (newest_earlier is None or state.query_ts > newest_earlier)
    ):
        return PairDraft(event.event_id, event.user_id, (), state.query, target, KIND_WEIGHT[event.kind], ts)
    context = [i for i in state.recent_items(rules.context_size + 1, before_ts=ts) if i != target]
    context = context[: rules.context_size]
    if len(context) < rules.min_history:
        return None
    return PairDraft(event.event_id, event.user_id, tuple(context), None, target, KIND_WEIGHT[event.kind], ts)
