"""The fault-injection suite (bench/faults.py), small: SIGKILL the users flow, restart Redis (with its AOF, and empty).

Each scenario runs its own broker, Redis (AOF) and flows on free ports, replays the
first 3,000 sample events at 500 ev/s, kills twice at seeded random moments, and
compares Redis with the reference the flows' own logic computes from the topics. The
whole system with serving and the indexer is the slow test at the end.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from bench._faults_check import SourceRecord, compare_users, users_reference
from bench.faults import build_parser, run_faults
from freshrec.settings import Settings
from stores import user_store
from stores.redis_client import connect

pytestmark = pytest.mark.integration

LEAN = ["--no-serving", "--events", "3000", "--rate", "500", "--kills", "2", "--seed", "3"]


def _run(fault: str, *extra: str) -> dict[str, Any]:
    out = run_faults(build_parser().parse_args(["--faults", fault, *(extra or LEAN)]))
    return out["faults"][fault]


def _assert_nothing_lost(fig: dict[str, Any], kills: int = 2) -> None:
    assert len(fig["kills"]) == kills and all(k["recovery_s"] is not None for k in fig["kills"]), fig["kills"]
    assert fig["broker"]["missing"] == 0
    users = fig["users"]
    assert users["events"] > 2900  # the check compared something
    assert (users["lost"], users["doubled"], users["users_differ"], users["popularity_differ"]) == (0, 0, 0, 0), users
    assert (fig["catalog"]["lost"], fig["catalog"]["doubled"]) == (0, 0), fig["catalog"]
    assert all(fig["caught_up"].values()), fig["caught_up"]


def test_users_flow_sigkilled_twice_loses_and_doubles_nothing() -> None:
    _assert_nothing_lost(_run("users"))


def test_redis_killed_and_restarted_on_its_aof_loses_nothing() -> None:
    fig = _run("redis")
    _assert_nothing_lost(fig)
    assert not fig["crashes"], f"processes died of the outage: {fig['crash_log_tails']}"


def test_redis_restarted_empty_is_refilled_by_the_flows() -> None:
    fig = _run("redis_empty")
    _assert_nothing_lost(fig)
    assert not fig["crashes"], f"processes died of the outage: {fig['crash_log_tails']}"


def test_the_check_counts_a_lost_and_a_doubled_event(fresh_settings: Settings) -> None:
    """The harness is only as good as its comparison: one event missing and one counted twice must show."""
    s = fresh_settings
    events = [
        {"event_id": f"e{i}", "user_id": f"u{i % 2}", "item_id": f"i{i % 3}", "kind": "purchase",
         "ts": 1_300_000_000.0 + i}
        for i in range(10)
    ]
    records = [SourceRecord(e["user_id"].encode(), orjson.dumps(e), s.topics.events, i, 0, (0, 1_300_000_000_000))
               for i, e in enumerate(events)]
    ref = users_reference(s, records)
    short = users_reference(s, [r for r in records if r.offset != 9])  # u1 misses its last event
    long = users_reference(s, records + [SourceRecord(b"u0", orjson.dumps({**events[0], "event_id": "x"}),
                                                      s.topics.events, 10, 0, (0, 1_300_000_000_000))])
    client = connect(s)
    user_store.write_user_states(client, s, [short.states["u1"], long.states["u0"]])
    got = compare_users(client, s, ref)
    assert (got["lost"], got["doubled"], got["users_differ"]) == (1, 1, 2)


@pytest.mark.slow
def test_whole_system_survives_serving_and_indexer_restarts() -> None:
    """Serving killed twice, then the indexer, with every service running and requests flowing."""
    args = ["--events", "5000", "--rate", "500", "--kills", "2", "--seed", "3"]
    for fault in ("serving", "indexer"):
        fig = _run(fault, *args)
        _assert_nothing_lost(fig)
        assert fig["serving"]["lost"] == 0 and fig["indexer"]["lost"] == 0
        assert fig["serving_requests"]["errors_outside_window"] == 0, fig["serving_requests"]
