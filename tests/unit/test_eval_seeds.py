"""Seeded methods in ``freshrec eval``: one replay per seed, mean and spread in the JSON and table."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import orjson
import pytest

import evaluation.cli as cli
from evaluation.cli import Run, RunOutput, combine, execute_runs, format_table, parse_seeds, plan_runs
from evaluation.data import EventLog, build_log
from evaluation.metrics import SliceStats, Timeline, seed_figures, spread
from evaluation.protocol import SLICES, MethodResult
from freshrec.settings import Settings

DAY = 86400.0


def test_parse_seeds() -> None:
    assert parse_seeds(None, None, 7) == [7, 8, 9]
    assert parse_seeds("3, 1", None, 7) == [3, 1]
    assert parse_seeds(None, 5, 7) == [5]
    for bad in (("1,1", None), ("", None), ("1", 2)):
        with pytest.raises(ValueError):
            parse_seeds(*bad, 7)


def test_plan_runs_repeats_only_seeded_methods() -> None:
    assert plan_runs(["popularity", "full"], [7, 8, 9]) == [
        Run(7, ("popularity", "full")), Run(8, ("full",)), Run(9, ("full",)),
    ]
    assert plan_runs(["popularity", "repeat"], [7, 8, 9]) == [Run(7, ("popularity", "repeat"))]
    # ``ranker``'s examples do not depend on the seed: all its seeds share the first run's stream
    assert plan_runs(["frozen", "ranker", "full"], [7, 8, 9]) == [
        Run(7, ("frozen", "ranker", "full"), (8, 9)), Run(8, ("full",)), Run(9, ("full",)),
    ]
    assert plan_runs(["ranker"], [7, 8]) == [Run(7, ("ranker",), (8,))]
    assert plan_runs(["ranker"], [7]) == [Run(7, ("ranker",))]


def test_spread_and_seed_figures_hand_computed() -> None:
    # 0.30, 0.32, 0.31: mean 0.31, deviations -0.01, 0.01, 0: sample variance 0.0002 / 2 -> sd 0.01
    s = spread([0.30, 0.32, 0.31])
    assert s["std"] == pytest.approx(0.01) and s["min"] == 0.30 and s["max"] == 0.32
    assert spread([0.5])["std"] == 0.0
    f = seed_figures(
        [{"recall@10": 0.30, "ndcg@10": 0.2, "baskets": 10}, {"recall@10": 0.32, "ndcg@10": 0.2, "baskets": 10},
         {"recall@10": 0.31, "ndcg@10": 0.2, "baskets": 10}], [7, 8, 9],
    )
    assert f["recall@10"] == pytest.approx(0.31) and f["ndcg@10"] == pytest.approx(0.2) and f["baskets"] == 10
    assert f["seeds"] == [7, 8, 9]
    assert f["spread"]["recall@10"]["per_seed"] == [0.30, 0.32, 0.31]  # type: ignore[index]
    with pytest.raises(ValueError, match="different basket counts"):
        seed_figures([{"recall@10": 0.3, "ndcg@10": 0.2, "baskets": 10}, {"recall@10": 0.3, "ndcg@10": 0.2, "baskets": 9}], [1, 2])


def _result(recall: float) -> MethodResult:
    r = MethodResult()
    for s in SLICES:
        r.slices[s] = SliceStats(recall=recall * 2, ndcg=recall, baskets=2)
    r.timeline.add(0, recall)
    return r


def test_combine_and_table_show_mean_and_sd() -> None:
    outs = [
        RunOutput(7, {"popularity": _result(0.1), "full": _result(0.30)}, {}),
        RunOutput(8, {"full": _result(0.32)}, {}),
        RunOutput(9, {"full": _result(0.31)}, {}),
    ]
    cli_seeded = cli.SEEDED
    assert "full" in cli_seeded
    figures, merged = combine(outs, ["popularity", "full"])
    assert figures["popularity"]["all"] == {"recall@10": 0.1, "ndcg@10": 0.05, "baskets": 2}
    assert figures["full"]["new"]["recall@10"] == pytest.approx(0.31)
    assert figures["full"]["all"]["spread"]["recall@10"]["std"] == pytest.approx(0.01)  # type: ignore[index]
    assert merged["full"].timeline.means() == {0: pytest.approx(0.31)}
    table = format_table(figures)
    assert "0.3100 ± 0.0100" in table and "0.1000" in table
    assert "full: seeds 7,8,9; all R@10 min 0.3000 max 0.3200" in table


def test_timeline_merged_is_mean_over_runs() -> None:
    a, b = Timeline(), Timeline()
    a.add(0, 1.0)
    a.add(0, 0.0)
    b.add(0, 0.5)
    b.add(0, 0.5)
    b.add(1, 1.0)
    assert Timeline.merged([a, b]).means() == {0: 0.5, 1: 1.0}


class SeedStub:
    """A seeded method whose scores depend on its seed: item (seed mod n) first."""

    seeded = True

    def __init__(self, n_items: int, seed: int, name: str = "full") -> None:
        self.name, self.s = name, np.zeros(n_items)
        self.s[seed % n_items] = 1.0

    def observe(self, log: EventLog, start: int, stop: int) -> None:
        pass

    def advance(self, now: float) -> None:
        pass

    def scores(self, user: int, now: float) -> np.ndarray:
        return self.s


def _dataset(folder: Path) -> Path:
    """u buys a on day 0, then a on days 10..13 (four scored baskets); items a, b."""
    folder.mkdir()
    with open(folder / "events.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user_id", "item_id", "ts", "event_type"])
        w.writerow(["u", "a", 0, "purchase"])
        w.writerow(["v", "b", 0, "purchase"])
        for d in range(10, 14):
            w.writerow(["u", "a", int(d * DAY), "purchase"])
    with open(folder / "items.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["item_id", "title", "category", "description"])
        w.writerow(["a", "A", "", ""])
        w.writerow(["b", "B", "", ""])
    return folder


def test_main_runs_a_seeded_method_once_per_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """Seeds 0 and 1 put item a (hit: recall 1) or b (miss... then a at rank 2: recall 1, NDCG lower) first."""
    calls: list[tuple[tuple[str, ...], int]] = []
    real = cli.build_methods

    def fake(names, log, settings, eval_from, device, *rest):  # type: ignore[no-untyped-def]
        calls.append((tuple(names), settings.seed))
        out = real([n for n in names if n != "full"], log, settings, eval_from, device)
        return out + ([SeedStub(log.n_items, settings.seed)] if "full" in names else [])

    monkeypatch.setattr(cli, "build_methods", fake)
    data = _dataset(tmp_path / "d")
    out = tmp_path / "eval.json"
    argv = [str(data), "--eval-from", "1970-01-11", "--methods", "popularity,full", "--seeds", "0,1",
            "--json", str(out), "--quiet"]
    assert cli.main(argv, Settings(state_dir=tmp_path)) == 0
    assert calls == [(("popularity", "full"), 0), (("full",), 1)]
    figures = orjson.loads(out.read_bytes())
    assert list(figures) == ["popularity", "full"]
    assert set(figures["full"]) == set(SLICES) and "spread" not in figures["popularity"]["all"]
    full = figures["full"]["all"]
    # seed 0 ranks a first: NDCG 1; seed 1 ranks b, then a: NDCG 1 / log2(3)
    assert full["seeds"] == [0, 1] and full["baskets"] == 4
    assert full["spread"]["ndcg@10"]["per_seed"] == pytest.approx([1.0, 1 / np.log2(3)])
    assert full["ndcg@10"] == pytest.approx((1 + 1 / np.log2(3)) / 2)
    assert full["spread"]["ndcg@10"]["std"] == pytest.approx((1 - 1 / np.log2(3)) / np.sqrt(2))
    assert "±" in capsys.readouterr().out


def test_undeclared_seeded_method_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "build_methods", lambda names, log, *a: [SeedStub(log.n_items, 0, "popularity")])
    log = build_log("t", [{"event_id": "e", "user_id": "u", "item_id": "a", "ts": 0.0, "kind": "purchase"}])
    with pytest.raises(RuntimeError, match="seeded = True"):
        cli.execute_run(Run(7, ("popularity",)), log, Settings(state_dir=tmp_path), 0.0, "cpu")


def test_worker_processes_give_the_same_figures(tmp_path: Path) -> None:
    """--jobs 2 (spawned workers) and one process agree, run by run."""
    rows = [("u", "a", 0), ("v", "b", 0), ("u", "a", 10), ("v", "a", 11), ("u", "b", 12)]
    log = build_log("t", [{"event_id": f"e{k}", "user_id": u, "item_id": i, "ts": d * DAY, "kind": "purchase"}
                          for k, (u, i, d) in enumerate(rows)])
    runs = [Run(7, ("popularity",)), Run(8, ("repeat", "tifuknn"))]
    settings = Settings(state_dir=tmp_path)
    one = execute_runs(runs, log, settings, 10 * DAY, "cpu", 1, True)
    two = execute_runs(runs, log, settings, 10 * DAY, "cpu", 2, True)
    for a, b in zip(one, two, strict=True):
        assert a.seed == b.seed
        assert {n: r.as_dict() for n, r in a.results.items()} == {n: r.as_dict() for n, r in b.results.items()}
