"""`freshrec eval` reproduces its own figures: same seed, same numbers (with the learner).

A small slice of the bundled sample (its 100 most bought items, May 2011) keeps
the catalog re-encodes and training steps to seconds on two CPU cores. The full run on
online_retail_ii is a benchmark (docs/eval_online_retail_ii.*), not a test.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import orjson
import pytest

from evaluation.cli import main
from evaluation.data import build_log, parse_date
from evaluation.methods import build_system_methods
from evaluation.protocol import evaluate
from freshrec.dataset import locate, read_events, read_items
from freshrec.settings import Settings

pytestmark = pytest.mark.integration


def _small_slice(sample_dir: Path, n_items: int = 100):  # type: ignore[no-untyped-def]
    files = locate(sample_dir)
    start = parse_date("2011-05-01")
    events = [e for e in read_events(files.events, files.name) if e["ts"] >= start]
    top = {i for i, _ in Counter(e["item_id"] for e in events if e["kind"] == "purchase").most_common(n_items)}
    events = [e for e in events if e["item_id"] in top]
    items = [r for r in read_items(files.items) if r["item_id"] in top]
    return files.name, events, items


def _small_log(sample_dir: Path):  # type: ignore[no-untyped-def]
    return build_log(*_small_slice(sample_dir))


def _write_dataset(sample_dir: Path, folder: Path) -> Path:
    """The slice in the normalised format, for the CLI."""
    _, events, items = _small_slice(sample_dir, 200)
    folder.mkdir()
    with open(folder / "events.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["user_id", "item_id", "ts", "event_type"])
        for e in events:
            w.writerow([e["user_id"], e["item_id"], int(e["ts"]), e["kind"]])
    with open(folder / "items.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["item_id", "title", "category", "description"])
        for r in items:
            w.writerow([r["item_id"], r["title"], "", ""])
    return folder


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ONNX exports shared by the session (the serving tests' folder): each version is exported once.

    Versions are named by their weights' checksum, so two runs share an export only when
    they trained the very same adapter.
    """
    path = tmp_path_factory.getbasetemp() / "serving-shared" / "exports"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(log, seed: int, tmp_path: Path, exports: Path, **overrides):  # type: ignore[no-untyped-def]
    import torch

    torch.set_num_threads(2)
    settings = Settings(
        seed=seed, state_dir=tmp_path, eval_train_every_days=7.0, eval_pairs_per_update=16,
        eval_pretrain_days=7.0, eval_pretrain_pairs=16, learner_batch_size=8, learner_eval_window=32,
        **overrides,
    )
    if not (tmp_path / "exports").exists():
        (tmp_path / "exports").symlink_to(exports, target_is_directory=True)
    eval_from = parse_date("2011-05-16")
    methods = build_system_methods(log, settings, eval_from, ["frozen", "full"], "cpu", adapter_exports=exports)
    res = evaluate(log, eval_from, methods)
    return {k: v.as_dict() for k, v in res.items()}, methods[1]


def test_same_seed_same_figures(sample_dir: Path, tmp_path: Path, exports: Path) -> None:
    log = _small_log(sample_dir)
    first, full = _run(log, 7, tmp_path, exports)
    second, _ = _run(log, 7, tmp_path, exports)
    assert full.learner.updates >= 2, "the adapter must have been updated in the stream"
    assert first == second
    assert first["full"]["all"]["baskets"] > 50


def test_gate_that_never_publishes_leaves_full_equal_to_frozen(sample_dir: Path, tmp_path: Path, exports: Path) -> None:
    """A gate that holds every update (too few window pairs) must score with the base vectors."""
    figures, full = _run(_small_log(sample_dir), 7, tmp_path, exports, learner_min_eval_pairs=10_000)
    assert full.learner.updates >= 2 and full.learner.gate.published == 0
    assert all(r.startswith("hold: only") for r in full.learner.gate.decisions)
    assert figures["full"] == figures["frozen"]


def test_gate_that_always_publishes_adopts_every_update(sample_dir: Path, tmp_path: Path, exports: Path) -> None:
    """With a margin of 1 nothing is worse enough to hold: every update goes through the registry,
    and baskets are then ranked on that version as serving would serve it (its int8 ONNX export)."""
    figures, full = _run(_small_log(sample_dir), 7, tmp_path, exports, learner_publish_margin=1.0)
    gate = full.learner.gate
    assert full.learner.updates >= 2 and gate.published == full.learner.updates
    assert gate.active.version != "base" and full.space.version == gate.active.version
    # the gate judged the PyTorch encoding (as the learner does); baskets use the int8 export of the same weights
    assert not np.array_equal(gate.active_matrix.vectors, full.vectors)
    cosines = np.einsum("ij,ij->i", gate.active_matrix.vectors, full.vectors)
    assert cosines.min() > 0.99
    assert figures["full"] != figures["frozen"]


def test_cli_baselines_on_sample(sample_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _write_dataset(sample_dir, tmp_path / "slice")
    out = tmp_path / "eval.json"
    png = tmp_path / "eval.png"
    argv = [str(data), "--eval-from", "2011-05-10", "--json", str(out), "--plot", str(png),
            "--methods", "popularity,repeat,cooccurrence", "--quiet"]
    assert main(argv, Settings(state_dir=tmp_path)) == 0
    figures = orjson.loads(out.read_bytes())
    assert list(figures) == ["popularity", "repeat", "cooccurrence"]
    for slices in figures.values():
        assert set(slices) == {"all", "warm", "explore", "new"}
        assert slices["all"]["baskets"] >= slices["warm"]["baskets"] >= slices["explore"]["baskets"] > 0
        assert 0.0 <= slices["all"]["recall@10"] <= 1.0
    # re-orders dominate this shop: the shopper's own frequency beats popularity on `all`
    assert figures["repeat"]["all"]["recall@10"] > figures["popularity"]["all"]["recall@10"]
    assert png.stat().st_size > 10_000
    assert main(argv, Settings(state_dir=tmp_path)) == 0
    assert orjson.loads(out.read_bytes()) == figures


def test_cli_ranker_runs_per_seed_beside_frozen(sample_dir: Path, tmp_path: Path) -> None:
    """``ranker`` is registered, seeded, and reported as mean and spread over the seeds; ``frozen`` once."""
    data = _write_dataset(sample_dir, tmp_path / "slice")
    out = tmp_path / "eval.json"
    settings = Settings(state_dir=tmp_path, ranker_update_baskets=40, ranker_window_baskets=200,
                        ranker_gate_baskets=30, ranker_eval_history_days=10, ranker_trees=20)
    argv = [str(data), "--eval-from", "2011-05-16", "--json", str(out), "--methods", "frozen,ranker",
            "--seeds", "7,8", "--quiet"]
    assert main(argv, settings) == 0
    figures = orjson.loads(out.read_bytes())
    assert list(figures) == ["frozen", "ranker"]
    assert isinstance(figures["ranker"]["all"].get("spread"), dict)
    assert not isinstance(figures["frozen"]["all"].get("spread"), dict)
    assert figures["ranker"]["all"]["baskets"] == figures["frozen"]["all"]["baskets"] > 0
    # seed 8 rode on seed 7's run (one example stream for both): alone it scores the same
    alone = tmp_path / "eval8.json"
    argv8 = [str(data), "--eval-from", "2011-05-16", "--json", str(alone), "--methods", "ranker", "--seeds", "8", "--quiet"]
    assert main(argv8, settings) == 0
    per_seed = figures["ranker"]["all"]["spread"]["recall@10"]["per_seed"]
    assert orjson.loads(alone.read_bytes())["ranker"]["all"]["recall@10"] == per_seed[1]
