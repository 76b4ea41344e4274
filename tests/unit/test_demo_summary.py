"""The demo's ranking-stage figures: read from serving's real /metrics text, and its demo-only settings."""

from __future__ import annotations

import pytest

from console.demo import COMPONENTS, DEMO_RANKING, _share, demo_ranking, read_ranking
from freshrec.settings import Settings
from serving.metrics import ServingMetrics


def test_read_ranking_from_servings_own_metrics() -> None:
    m = ServingMetrics()  # the exporter serving renders, so a renamed metric fails here
    assert read_ranking(m.render().decode()) == (None, {}, {})
    m.set_ranker("v000001-aaaaaaaa")
    m.set_ranker("v000002-bbbbbbbb")
    for _ in range(3):
        m.ranked_by.labels("ranker").inc()
    m.ranked_by.labels("blend").inc()
    m.ranker_fallbacks.labels("no_ranker").inc()

    version, by, reasons = read_ranking(m.render().decode())

    assert version == "v000002-bbbbbbbb"
    assert by == {"ranker": 3.0, "blend": 1.0}
    assert reasons == {"no_ranker": 1.0}
    assert _share(by, "ranker") == "75%" and _share(by, "popularity") == "0%"
    assert _share(by, "ranker", since={"ranker": 3.0}) == "0%"  # only the answers since the last line
    assert _share({}, "ranker") == "-"


def test_the_demo_starts_the_collab_flow_and_learns_rankers() -> None:
    assert ("collab", ["stream", "collab"]) in COMPONENTS
    assert COMPONENTS[-1][0] == "serving"  # started last, once the catalog is in
    assert demo_ranking(Settings())["ranker_learn"] is True


def test_the_users_own_ranker_settings_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRESHREC_RANKER_UPDATE_BASKETS", "777")
    chosen = demo_ranking(Settings())
    assert "ranker_update_baskets" not in chosen
    assert set(chosen) == set(DEMO_RANKING) - {"ranker_update_baskets"}
