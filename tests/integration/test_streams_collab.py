"""The collaborative flow against the real broker and Redis: exactly once under SIGKILL, and its store's guard.

The reference is a plain in-memory computation written out here from ``ranking``'s pure
functions (the contract's per-event rule and example rule, docs/ranking_stage_contract.md),
not through :mod:`streams.collab_partition`. The flow applies the four partitions'
messages in *its* order (one stateful partition for the whole shop); that order is
recorded in Redis (``collab:order``), so the reference runs over the very events in the
very order the flow says it applied them. What the test proves: after a SIGKILL mid-replay
and a restart, Redis and the emitted examples equal one clean pass over that order;
nothing lost, nothing applied twice, and the replayed stretch recomputed identically.
"""

from __future__ import annotations

import base64
import itertools
import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from freshrec.consumer import TopicFollower
from freshrec.contracts import DeadLetter, parse_event
from freshrec.dataset import locate, read_events
from freshrec.producer import RecordProducer
from freshrec.settings import Settings
from ranking.collab import CollabRules, CollabState, ShopperIndex, normalised, shopper_vector
from ranking.features import (
    FEATURE_NAMES,
    FeatureRules,
    ShopperView,
    ShopView,
    candidates,
    feature_matrix,
    labels,
    new_items_order,
    rows_needed,
    shopper_signals,
)
from ranking.user_state import DAY_S, Popularity, StateRules, UserState, apply_event, popularity_weight
from stores import collab_store
from stores.redis_client import Outcome, connect
from streams.flow_process import FlowProcess
from tests.integration.helpers import read_topic

pytestmark = pytest.mark.integration

N_EVENTS = 12_000
BAD = [(b"u-bad", b"{not json"), (b"someone-else", orjson.dumps({"event_id": "x3", "user_id": "u-bad", "kind": "click",
                                                                  "item_id": "i", "ts": 1.0}))]


@pytest.fixture
def settings(fresh_settings: Settings) -> Settings:
    return fresh_settings.model_copy(update={"stream_snapshot_seconds": 1.0, "stream_batch_size": 200})


def _sample_events(sample_dir: Path, limit: int) -> list[dict[str, Any]]:
    files = locate(sample_dir)
    return list(itertools.islice(read_events(files.events, files.name), limit))


def _produce_paced(settings: Settings, events: list[dict[str, Any]], rate: float) -> threading.Thread:
    def run() -> None:
        with RecordProducer(settings, client_id="test-collab-paced") as producer:
            t0 = time.monotonic()
            for i, event in enumerate(events):
                if i % 100 == 0:
                    delay = t0 + i / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                producer.send(settings.topics.events, event["user_id"], orjson.dumps(event))
                if i in (len(events) // 3, 2 * len(events) // 3):
                    key, value = BAD[i > len(events) // 2]
                    producer.send(settings.topics.events, key, value)
            assert producer.flush().failed == 0

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _applied(settings: Settings, client: Any) -> int:
    return sum(o + 1 for o in collab_store.read_offsets(client, settings).values())


def _read_events_topic(settings: Settings, expected: int) -> dict[tuple[int, int], Any]:
    """(partition, offset) -> the message, for every message on the events topic."""
    out: dict[tuple[int, int], Any] = {}
    deadline = time.monotonic() + 30
    with TopicFollower(settings, settings.topics.events) as follower:
        while len(out) < expected and time.monotonic() < deadline:
            out.update({(m.partition, m.offset): m for m in follower.poll(0.2)})
    assert len(out) == expected
    return out


def _flow_order(settings: Settings, client: Any) -> list[tuple[int, int]]:
    """(partition, offset) of every message in the order the flow applied them (its order log)."""
    log = collab_store.read_order(client, settings)
    assert log and log[0][0] == {}, "the order log does not start at the beginning (trimmed or rewritten)"
    pos: dict[int, int] = {}
    order: list[tuple[int, int]] = []
    for _, runs in log:
        for p, last in runs:
            start = pos.get(p, -1)
            order.extend((p, o) for o in range(start + 1, last + 1))
            pos[p] = max(start, last)
    return order


class Reference:
    """The contract's per-event rule and example rule, one event at a time (no batches, no Kafka, no Redis)."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.srules, self.crules, self.frules = StateRules.from_settings(s), CollabRules.from_settings(s), FeatureRules.from_settings(s)
        self.collab = CollabState(self.crules)
        self.index = ShopperIndex(self.crules.shopper_dim)
        self.served = Popularity(s.popularity_half_life_days * DAY_S)
        self.states: dict[str, UserState] = {}
        self.seen: set[str] = set()
        self.open: dict[tuple[str, float], dict[str, Any]] = {}
        self.done: dict[str, dict[str, Any]] = {}
        self.now = 0.0

    def _example(self, state: UserState, ts: float) -> dict[str, Any]:
        rules = self.frules
        rows = {i: self.collab.copurchase.row(i, ts) for i in rows_needed(state, rules)}
        vec = shopper_vector(state, self.crules)
        found = [] if vec is None else self.index.search(vec, self.s.collab_neighbours, exclude=state.user_id)
        view = ShopperView(state, rows, [(sim, self.states[u]) for u, sim in found])
        pop = normalised(self.served.scores(ts))
        shop = ShopView(
            now_ts=ts, popularity=pop, pop_short=normalised(self.collab.pop_short.scores(ts)),
            pop_long=normalised(self.collab.pop_long.scores(ts)), first_seen=self.collab.pop_long.first_seen,
            baskets=self.collab.stats.baskets, buyers=self.collab.stats.buyers,
            popular_top=sorted(pop, key=lambda i: (-pop[i], i)),
            new_items=new_items_order(self.collab.pop_long.first_seen, ts, rules.new_s),
        )
        sig = shopper_signals(view, ts, rules, shop)
        cands = candidates(sig, shop, rules)
        x = feature_matrix(sig, shop, cands.items, np.zeros(len(cands)), rules)
        return {"items": cands.items, "x": x, "basket": [], "history": [[i.item_id, i.kind, i.ts] for i in state.history]}

    def _close(self, key: tuple[str, float]) -> None:
        ex = self.open.pop(key)
        ex["labels"] = [int(v) for v in labels(ex["items"], ex["basket"])]
        self.done[f"{key[0]}@{key[1]!r}"] = ex

    def apply(self, e: Any) -> None:
        if e.event_id in self.seen:
            return
        self.seen.add(e.event_id)
        state = self.states.setdefault(e.user_id, UserState(e.user_id))
        if e.event_id in state.recent_ids:
            return
        for key in [k for k in self.open if k[0] == e.user_id and k[1] < e.ts]:
            self._close(key)
        if e.kind == "purchase":
            if e.ts not in state.baskets and state.baskets and (e.user_id, e.ts) not in self.open:
                self.open[(e.user_id, e.ts)] = self._example(state, e.ts)
            ex = self.open.get((e.user_id, e.ts))
            if ex is not None and e.item_id not in ex["basket"]:
                ex["basket"].append(e.item_id)
        self.collab.apply(state, e)
        weight = popularity_weight(state, e)
        apply_event(state, e, self.srules)
        self.served.observe(e.ts)
        if e.item_id is not None:
            self.served.see(e.item_id, e.ts)
            if weight:
                self.served.add(e.item_id, weight, e.ts)
        if e.kind == "purchase":
            self.index.upsert(e.user_id, shopper_vector(state, self.crules))
        if e.ts > self.now:
            self.now = e.ts
            for key in sorted(k for k in self.open if k[1] + 3600.0 < self.now):
                self._close(key)


def _assert_redis_equals(settings: Settings, client: Any, ref: Reference) -> None:
    rows = ref.collab.copurchase.rows
    got_rows = collab_store.read_rows(client, settings, rows)
    assert got_rows.keys() == rows.keys()
    bad = [i for i in rows if got_rows[i] != rows[i]]
    assert not bad, f"{len(bad)} co-purchase rows differ, e.g. {bad[0]}"
    assert len(list(client.scan_iter(match=collab_store.cop_key(settings, "*"), count=5000))) == len(rows)
    stats = ref.collab.stats
    assert collab_store.read_item_stats(client, settings) == {
        i: (stats.baskets.get(i, 0), stats.buyers.get(i, 0)) for i in stats.baskets.keys() | stats.buyers.keys()
    }
    for horizon, pop in (("short", ref.collab.pop_short), ("long", ref.collab.pop_long)):
        got = collab_store.read_popularity(client, settings, horizon)
        assert got.entries == pop.entries and got.newest_ts == pop.newest_ts
        assert got.scores(pop.newest_ts) == pop.scores()
    assert collab_store.read_first_seen(client, settings) == ref.collab.pop_long.first_seen
    vecs = collab_store.read_all_shopper_vectors(client, settings)
    want = {u: ref.index.matrix[r] for u, r in ref.index.rows.items() if ref.index.matrix[r].any()}
    assert vecs.keys() == want.keys()
    assert all(np.array_equal(vecs[u], want[u]) for u in want)


def test_sigkill_during_replay_then_restart_equals_one_clean_pass(settings: Settings, sample_dir: Path) -> None:
    events = _sample_events(sample_dir, N_EVENTS)
    sent = N_EVENTS + len(BAD)
    client = connect(settings)
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    logs = [settings.state_dir / f"collab{i}.log" for i in range(4)]
    flow = FlowProcess(settings, "collab", log=logs[0]).start()
    replayed = 0
    try:
        producer = _produce_paced(settings, events, rate=1500)
        # Kill well inside the replay, with snapshots behind; again if the first kill happened to land
        # where Redis held nothing beyond the snapshot (then the restart has nothing to replay).
        for k, at in enumerate((N_EVENTS // 4, N_EVENTS // 2, 3 * N_EVENTS // 4)):
            start = time.monotonic()
            while _applied(settings, client) < at:
                flow.check_alive()
                assert time.monotonic() - start < 60, flow.log_tail()
                time.sleep(0.02)
            # Right after a write, before the epoch's snapshot covers it, most of the time.
            seen = _applied(settings, client)
            while _applied(settings, client) == seen:
                flow.check_alive()
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.2))
            flow.kill()
            assert _applied(settings, client) < sent, "the kill landed after the whole replay: nothing was tested"
            flow = FlowProcess(settings, "collab", log=logs[k + 1]).start()
            while "streams.collab: " not in (text := logs[k + 1].read_text(errors="replace")):
                flow.check_alive()
                time.sleep(0.05)
            assert "rewriting the whole shop" not in text and "does not reach back" not in text, text
            replayed += "replaying offsets already in Redis in their recorded order" in text
            if replayed:
                break
        producer.join(60)
        start = time.monotonic()
        while _applied(settings, client) < sent:
            flow.check_alive()
            assert time.monotonic() - start < 60, f"applied {_applied(settings, client)} of {sent}\n{flow.log_tail()}"
            time.sleep(0.05)
        assert replayed, "no restart replayed offsets Redis already held: the order log was not exercised\n" + "\n".join(p.read_text(errors="replace")[-600:] for p in logs[1:] if p.exists())

        messages = _read_events_topic(settings, sent)
        order = _flow_order(settings, client)
        assert sorted(order) == sorted(messages), "the flow's order log does not cover every message exactly once"
        ref = Reference(settings)
        for key in order:
            m = messages[key]
            try:
                event = parse_event(m.value, now=m.timestamp_ms / 1000.0)
            except Exception:
                continue
            if m.key == event.user_id.encode():
                ref.apply(event)
        _assert_redis_equals(settings, client, ref)

        letters = [DeadLetter.from_bytes(v) for v in read_topic(settings, settings.topics.dead_letter, len(BAD), timeout=10)]
        assert {(d.stage, d.field) for d in letters} == {("streams.collab", "record"), ("streams.collab", "key")}

        raw = read_topic(settings, settings.topics.rank_examples, len(ref.done), timeout=30)
        got: dict[str, dict[str, Any]] = {}
        for value in raw:
            rec = orjson.loads(value)
            assert got.setdefault(rec["example_id"], rec) == rec, "a re-sent example differs from the first"
        assert len(ref.done) > 50 and got.keys() == ref.done.keys()
        for eid, want in ref.done.items():
            rec = got[eid]
            x = np.frombuffer(base64.b64decode(rec["features_f32"]), dtype="<f4").reshape(len(rec["items"]), len(FEATURE_NAMES))
            assert rec["items"] == want["items"] and np.array_equal(x, want["x"]), eid
            assert rec["labels"] == want["labels"] and rec["basket"] == want["basket"] and rec["history"] == want["history"]
        assert all("rewriting the whole shop" not in p.read_text(errors="replace") for p in logs if p.exists())

        # Redis loses everything (a restart without persistence): the idle flow rewrites the whole shop.
        for key in client.scan_iter(match=f"{settings.redis_prefix}*", count=5000):
            client.unlink(key)
        start = time.monotonic()
        while _applied(settings, client) < sent:
            flow.check_alive()
            assert time.monotonic() - start < 20, f"Redis was not rebuilt\n{flow.log_tail()}"
            time.sleep(0.05)
        _assert_redis_equals(settings, client, ref)
    except AssertionError as exc:
        raise AssertionError(f"{exc} (random seed {seed})") from None
    finally:
        flow.stop()


def _batch(settings: Settings, prev: dict[str, int], new: dict[str, int], rows: dict[str, bytes], full: bool = False,
           epoch: str | None = "e1") -> Outcome:
    return collab_store.write_batch(
        connect(settings), settings, topic="events", prev_offsets=prev, offsets=new, runs=[(0, new.get("0", -1))],
        rows=rows, stats={"a": (1, 1)}, pop_short={"a": (1.0, 5.0)}, pop_long={"a": (1.0, 5.0)}, first_seen={"a": 5.0},
        vectors={"u1": np.ones(4, dtype="<f4").tobytes(), "u2": None}, newest_ts=5.0, epoch=epoch, full=full,
    )


def test_store_guard_held_written_behind_full_and_epoch(settings: Settings) -> None:
    from freshrec.epochs import EpochMismatch

    client = connect(settings)
    assert _batch(settings, {}, {"0": 3}, {"a": b'{"a":[1.0,5.0]}'}) is Outcome.WRITTEN
    assert _batch(settings, {}, {"0": 3}, {"a": b"{}"}) is Outcome.HELD  # a replay: nothing moves back
    assert _batch(settings, {"0": 1}, {"0": 5}, {"b": b"{}"}) is Outcome.WRITTEN  # straddles what Redis holds
    assert _batch(settings, {"0": 7}, {"0": 9, "1": 0}, {"c": b"{}"}) is Outcome.BEHIND  # Redis lost 6..7
    with pytest.raises(EpochMismatch):
        _batch(settings, {"0": 5}, {"0": 6}, {"c": b"{}"}, epoch="e2")
    assert collab_store.read_offsets(client, settings) == {"0": 5}
    assert collab_store.read_rows(client, settings, ["a", "b", "c"]) == {"a": {"a": (1.0, 5.0)}, "b": {}}
    assert _batch(settings, {"0": 9, "1": 0}, {"0": 9, "1": 0}, {"c": b"{}"}, full=True) is Outcome.WRITTEN
    assert collab_store.read_offsets(client, settings) == {"0": 9, "1": 0}
    assert collab_store.read_order(client, settings) == [({"0": 9, "1": 0}, [(0, 9)])]  # the log restarts there
    assert set(collab_store.read_shopper_vectors(client, settings, ["u1", "u2"])) == {"u1"}
    assert collab_store.read_item_stats(client, settings) == {"a": (1, 1)}
    assert collab_store.read_first_seen(client, settings) == {"a": 5.0}
    collab_store.check_epoch(client, settings, "events", "e1")
    with pytest.raises(EpochMismatch):
        collab_store.check_epoch(client, settings, "events", "e2")


def test_wait_applied_reads_the_collab_flows_own_offsets(settings: Settings) -> None:
    # The collab flow reads the events topic like the users flow but records its offsets in
    # collab:meta: applied_count and wait_applied once counted the catalog flow's offsets for it.
    from streams.flow_process import applied_count, wait_applied

    assert applied_count(settings, "collab") == 0
    assert _batch(settings, {}, {"0": 3, "2": 0}, {"a": b"{}"}) is Outcome.WRITTEN
    assert applied_count(settings, "collab") == 5
    assert applied_count(settings, "users") == 0 and applied_count(settings, "catalog") == 0
    assert wait_applied(settings, "collab", 5, timeout=2.0) < 2.0
    with pytest.raises(TimeoutError, match="collab flow applied 5 of 6"):
        wait_applied(settings, "collab", 6, timeout=0.2)
    with pytest.raises(ValueError, match="'colab'"):
        applied_count(settings, "colab")
