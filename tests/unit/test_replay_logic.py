"""Replay pacing and dataset reading, without a broker."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from freshrec.dataset import DatasetError, locate, read_events, read_items
from console.replay import Pace, schedule


def events(*ts: float) -> list[dict[str, object]]:
    return [{"event_id": str(i), "ts": t} for i, t in enumerate(ts)]


def test_rate_spaces_events_evenly() -> None:
    offsets = [o for o, _ in schedule(events(0.0, 0.0, 0.0, 0.0), Pace(rate=2.0))]
    assert offsets == [0.0, 0.5, 1.0, 1.5]


def test_speedup_follows_event_time() -> None:
    offsets = [o for o, _ in schedule(events(100.0, 100.0, 160.0, 220.0), Pace(speedup=60.0))]
    assert offsets == [0.0, 0.0, 1.0, 2.0]


def test_unpaced_sends_at_once() -> None:
    assert [o for o, _ in schedule(events(1.0, 5.0), Pace())] == [0.0, 0.0]


@pytest.mark.parametrize("kwargs", [{"rate": 1.0, "speedup": 2.0}, {"rate": 0.0}, {"speedup": -1.0}])
def test_bad_pace(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Pace(**kwargs)


def test_read_dataset(tmp_path: Path) -> None:
    with gzip.open(tmp_path / "events.csv.gz", "wt") as fh:
        fh.write("user_id,item_id,ts,event_type\nu1,i1,100,purchase\nu2,i2,bad,rating\n")
    (tmp_path / "items.csv").write_text("item_id,title,category,description\ni1,Mug,kitchen,\n")
    files = locate(tmp_path)
    rows = list(read_events(files.events, files.name))
    assert rows[0] == {"event_id": f"{tmp_path.name}:2", "user_id": "u1", "item_id": "i1", "kind": "purchase", "ts": 100.0}
    assert rows[1]["kind"] == "purchase" and rows[1]["ts"] == "bad"  # the producer rejects it, with a reason
    assert list(read_items(files.items))[0]["title"] == "Mug"  # type: ignore[arg-type]


def test_missing_dataset_says_where(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        locate(tmp_path / "nope")
    with pytest.raises(DatasetError, match="no events.csv"):
        locate(tmp_path)


def test_a_field_over_the_csv_module_limit_is_read_and_then_refused_by_the_contract(tmp_path: Path) -> None:
    """A 200,000-character description used to stop the whole replay with csv.Error; now the
    row is read, the rows after it too, and the contract refuses that one record with a reason."""
    from freshrec.contracts import InvalidRecord, parse_catalog

    (tmp_path / "items.csv").write_text(
        "item_id,title,category,description\n" + f'i1,Big,c,"{"x" * 200_000}"\n' + "i2,Small,c,fine\n"
    )
    rows = list(read_items(tmp_path / "items.csv"))
    assert [r["item_id"] for r in rows] == ["i1", "i2"] and len(rows[0]["description"]) == 200_000
    with pytest.raises(InvalidRecord, match="description"):
        parse_catalog(rows[0])
    assert parse_catalog(rows[1]).item_id == "i2"
