"""Where a ranking example goes in the learner: decode, dedupe, hold back, train window, checkpoint.

An example's life (one record of ``settings.topics.rank_examples``, format in
docs/ranking_stage_contract.md: one labelled purchase basket with its candidates' rows)::

    consumed ─▶ invalid? ─▶ dead-letter          duplicate? (example_id seen) ─▶ dropped
             └▶ HeldBack (the newest G baskets, whole: judging only)
                    └─ pushed out by a newer one ─▶ trimmed (bought rows + K sampled others)
                                                     ─▶ TrainingWindow (the newest W trimmed)

So the gate always judges on the newest baskets no candidate has trained on, as the
adapter learner's :class:`learner.intake.HoldoutWindow` does for pairs, and each update
trains on the W baskets before them.

**Memory bound.** At most ``G`` whole examples plus ``W`` trimmed ones are held:
``G x rows x 17 x 4 B`` plus ``W x (bought + K) x 17 x 4 B`` of features, with their item
ids and histories. At the defaults (G = ``ranker_gate_baskets`` 300, W =
``ranker_window_baskets`` 3,000, K = ``ranker_train_negatives`` 50, ~350 candidates
per basket, ~100 history lines) that is ~7 MB + ~11 MB of features and a few MB of ids:
trimming as an example enters the window keeps the training side at the size training
reads anyway (the update samples K negatives per basket). The dedupe memory is the newest
``ranker_dedupe_ids`` ids.

Trimming is seeded by the example's id, so the rows kept do not depend on arrival order,
restarts or the partitioning. A checkpoint (:class:`RankCheckpointStore`) holds both
windows, the remembered ids and the offsets after the last message processed, written
together, so a restarted learner resumes with exactly what it had: nothing consumed
twice, nothing skipped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from freshrec.contracts import InvalidRecord
from freshrec.epochs import check_epoch_file
from freshrec.files import fsync_dir_files, fsync_path
from ranking.features import FEATURE_NAMES
from ranking.user_state import Interaction, UserState

from .intake import RecentIds

WIDTH = len(FEATURE_NAMES)


@dataclass(frozen=True, eq=False)
class RankExample:
    """One labelled basket: candidate rows (``features`` n x 17 float32), labels, and what ``sim`` needs.

    ``basket`` is every item bought (candidates or not: the Recall@10 denominator);
    ``history`` is the shopper's history before the basket, most recent first, from
    which the learner recomputes the ``sim`` column with the active adapter's vectors.
    ``seq`` is the arrival number the intake gives it (-1 before).
    """

    example_id: str
    user_id: str
    ts: float
    schema: str
    items: tuple[str, ...]
    sources: np.ndarray  # uint8 (n,)
    features: np.ndarray  # float32 (n, 17)
    labels: np.ndarray  # float32 (n,)
    basket: tuple[str, ...]
    history: tuple[tuple[str, str, float], ...]
    seq: int = -1

    def __len__(self) -> int:
        return len(self.items)

    @property
    def basket_size(self) -> int:
        return len(set(self.basket))

    def state_before(self) -> UserState:
        """The shopper's state before the basket as far as ``similarity_column`` reads it (history, last_ts)."""
        history = [Interaction(item, kind, ts) for item, kind, ts in self.history]
        return UserState(self.user_id, history=history, last_ts=max((h.ts for h in history), default=0.0))


def _field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in obj:
        raise InvalidRecord(name, "missing")
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, kind):  # no field of the record is a boolean
        raise InvalidRecord(name, f"expected {kind}, got {type(value).__name__}")
    return value


def decode_example(raw: bytes) -> RankExample:
    """Parse one rank-examples record; :class:`InvalidRecord` names the first problem found.

    Checks the shapes agree (n items, n sources, n labels, n x 17 float32 features, all
    finite), labels are 0/1 and the history lines are ``[item, kind, ts]``. The schema
    is returned, not checked: an example of another feature schema is valid, the loop
    just cannot train on it.
    """
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRecord("record", f"not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise InvalidRecord("record", "not a JSON object")
    example_id = _field(obj, "example_id", str)
    user_id = _field(obj, "user_id", str)
    ts = float(_field(obj, "ts", (int, float)))
    schema = _field(obj, "schema", str)
    items = _field(obj, "items", list)
    if not all(isinstance(i, str) for i in items):
        raise InvalidRecord("items", "not a list of item ids")
    n = len(items)
    sources = _field(obj, "sources", list)
    labels = _field(obj, "labels", list)
    if len(sources) != n or len(labels) != n:
        raise InvalidRecord("labels", f"{len(sources)} sources and {len(labels)} labels for {n} items")
    try:
        data = base64.b64decode(_field(obj, "features_f32", str), validate=True)
    except ValueError as exc:
        raise InvalidRecord("features_f32", f"not base64 ({exc})") from None
    if len(data) != n * WIDTH * 4:
        raise InvalidRecord("features_f32", f"{len(data)} bytes, expected {n} x {WIDTH} float32")
    features = np.frombuffer(data, dtype="<f4").reshape(n, WIDTH).astype(np.float32)  # a writable copy
    if not np.isfinite(features).all():
        raise InvalidRecord("features_f32", "holds non-finite values")
    try:
        lab = np.asarray(labels, dtype=np.float32)
        src = np.asarray(sources, dtype=np.int64)
    except (TypeError, ValueError):
        raise InvalidRecord("labels", "labels and sources must be numbers") from None
    if not np.isin(lab, (0.0, 1.0)).all():
        raise InvalidRecord("labels", "labels must be 0 or 1")
    if ((src < 0) | (src > 255)).any():
        raise InvalidRecord("sources", "source flags must fit a byte")
    basket = _field(obj, "basket", list)
    if not all(isinstance(i, str) for i in basket):
        raise InvalidRecord("basket", "not a list of item ids")
    history: list[tuple[str, str, float]] = []
    for line in _field(obj, "history", list):
        if (not isinstance(line, list) or len(line) != 3 or not isinstance(line[0], str) or not isinstance(line[1], str)
                or not isinstance(line[2], (int, float)) or isinstance(line[2], bool)):
            raise InvalidRecord("history", "lines must be [item, kind, ts]")
        history.append((line[0], line[1], float(line[2])))
    return RankExample(example_id, user_id, ts, schema, tuple(items), src.astype(np.uint8), features, lab,
                       tuple(basket), tuple(history), int(obj.get("seq", -1)) if isinstance(obj.get("seq"), int) else -1)


def encode_example(ex: RankExample, *, with_seq: bool = False) -> bytes:
    """The record of ``ex`` in the contract's format (``seq`` added for checkpoints)."""
    obj: dict[str, Any] = {
        "example_id": ex.example_id,
        "user_id": ex.user_id,
        "ts": ex.ts,
        "schema": ex.schema,
        "items": list(ex.items),
        "sources": [int(s) for s in ex.sources],
        "features_f32": base64.b64encode(np.ascontiguousarray(ex.features, dtype="<f4").tobytes()).decode(),
        "labels": [int(v) for v in ex.labels],
        "basket": list(ex.basket),
        "history": [list(h) for h in ex.history],
    }
    if with_seq:
        obj["seq"] = ex.seq
    return orjson.dumps(obj)


def trim(ex: RankExample, negatives: int) -> RankExample:
    """``ex`` with its bought rows and at most ``negatives`` others, seeded by its id (row order kept)."""
    neg = np.flatnonzero(ex.labels == 0)
    if neg.size <= negatives:
        return ex
    seed = int.from_bytes(hashlib.blake2b(ex.example_id.encode(), digest_size=8).digest(), "little")
    chosen = np.random.default_rng(seed).choice(neg, size=negatives, replace=False)
    keep = np.sort(np.concatenate((np.flatnonzero(ex.labels > 0), chosen)))
    return replace(
        ex,
        items=tuple(ex.items[k] for k in keep.tolist()),
        sources=ex.sources[keep],
        features=ex.features[keep],
        labels=ex.labels[keep],
    )


class RankIntake:
    """Dedupe, hold back, trim, window: the steps above, composed (pure: no Kafka, no clock).

    ``offer`` every decoded example; ``held()`` is what the gate judges on and
    ``training()`` what an update trains on, both oldest first.
    """

    def __init__(
        self,
        gate_size: int,
        window_size: int,
        negatives: int,
        dedupe_capacity: int,
        held: Iterable[RankExample] = (),
        training: Iterable[RankExample] = (),
        seen_ids: Iterable[str] = (),
        next_seq: int = 0,
    ) -> None:
        if gate_size < 1 or window_size < 1 or negatives < 1:
            raise ValueError(f"gate ({gate_size}), window ({window_size}) and negatives ({negatives}) must be >= 1")
        self.gate_size = gate_size
        self.negatives = negatives
        self._held: deque[RankExample] = deque(held)
        self._training: deque[RankExample] = deque(training, maxlen=window_size)
        if len(self._held) > gate_size:
            raise ValueError(f"{len(self._held)} held-back examples do not fit a gate of {gate_size}")
        self.seen = RecentIds(dedupe_capacity)
        for example_id in seen_ids:
            self.seen.add(example_id)
        for ex in (*self._training, *self._held):
            self.seen.add(ex.example_id)
        self.next_seq = next_seq
        self.duplicates = 0

    def offer(self, ex: RankExample) -> bool:
        """Take one example; False if its id was seen (a duplicate, dropped)."""
        if not self.seen.add(ex.example_id):
            self.duplicates += 1
            return False
        self._held.append(replace(ex, seq=self.next_seq))
        self.next_seq += 1
        if len(self._held) > self.gate_size:
            self._training.append(trim(self._held.popleft(), self.negatives))
        return True

    def sizes(self) -> tuple[int, int]:
        """(held back, in the training window): cheap, for the loop's every poll."""
        return len(self._held), len(self._training)

    @property
    def newest_ts(self) -> float:
        """Event time of the newest example held (0.0 when none): the update rule's clock in event time."""
        return max((ex.ts for ex in self._held), default=0.0)

    def held(self) -> list[RankExample]:
        return list(self._held)

    def training(self) -> list[RankExample]:
        return list(self._training)

    def seen_ids(self) -> list[str]:
        """The remembered ids, oldest first (what a checkpoint keeps for dedupe after a restart)."""
        return list(self.seen._ids)

    @property
    def window_size(self) -> int:
        return self._training.maxlen or 0


# -- checkpoint ------------------------------------------------------------------------------------

STATE_FILE = "state.json"
EXAMPLES_FILE = "examples.jsonl"
SEEN_FILE = "seen_ids.json"
EPOCH_FILE = "epoch.json"
_PREFIX = "ckpt-"


@dataclass
class RankerState:
    """Everything besides the examples that a restarted ranker loop needs (``state.json``).

    ``seen_seq``: examples below it were counted by the last update (the N-baskets rule
    counts from there). ``active_trained_seq``: examples below it are in the active
    version this loop published (a continued update trains on the ones at or above it);
    the active version's weights are the registry's, so no model is checkpointed here.
    """

    topic: str
    offsets: dict[int, int] = field(default_factory=dict)
    next_seq: int = 0
    seen_seq: int = 0
    active_trained_seq: int = 0
    trained_since_publish: int = 0
    updates: int = 0
    published: list[str] = field(default_factory=list)
    consumed: int = 0
    duplicates: int = 0
    skipped: int = 0
    last_update_ts: float | None = None  # event time of the newest example at the last update
    last_figures: dict[str, float] = field(default_factory=dict)
    last_reason: str = ""

    def to_json(self) -> bytes:
        obj = asdict(self)
        obj["offsets"] = {str(p): o for p, o in self.offsets.items()}
        return json.dumps(obj).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> RankerState:
        obj = json.loads(raw)
        obj["offsets"] = {int(p): int(o) for p, o in obj["offsets"].items()}
        return cls(**obj)


@dataclass
class RankCheckpoint:
    """One restored checkpoint: the state, both windows, the remembered ids."""

    state: RankerState
    held: list[RankExample]
    training: list[RankExample]
    seen_ids: list[str]


class RankCheckpointStore:
    """Checkpoints of the ranker loop under ``root`` (``state_dir/learner/ranker``), newest ``keep`` kept.

    Each is a directory written under a hidden staging name and renamed into place, so
    offsets and windows appear together or not at all (a SIGKILL at any
    point leaves the previous one whole), as :class:`learner.checkpoint.CheckpointStore`
    does for the adapter.
    """

    def __init__(self, root: Path | str, keep: int = 2) -> None:
        self.root = Path(root)
        self.dir = self.root / "checkpoints"
        self.keep = keep

    def check_epoch(self, topic: str, current: str | None) -> None:
        """Stop (EpochMismatch) when the offsets here belong to an earlier incarnation of ``topic``."""
        self.root.mkdir(parents=True, exist_ok=True)
        check_epoch_file(self.root / EPOCH_FILE, "the learner's ranker", topic, current)

    def checkpoints(self) -> list[Path]:
        if not self.dir.exists():
            return []
        return sorted(p for p in self.dir.iterdir() if p.name.startswith(_PREFIX) and p.is_dir())

    def write(
        self, state: RankerState, held: Iterable[RankExample], training: Iterable[RankExample],
        seen_ids: Iterable[str],
    ) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        existing = self.checkpoints()
        seq = int(existing[-1].name[len(_PREFIX):]) + 1 if existing else 0
        staging = self.dir / f".staging-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            (staging / STATE_FILE).write_bytes(state.to_json())
            with open(staging / EXAMPLES_FILE, "wb") as fh:
                for part, examples in (("held", held), ("train", training)):
                    for ex in examples:
                        fh.write(part.encode() + b"\t" + encode_example(ex, with_seq=True) + b"\n")
            (staging / SEEN_FILE).write_bytes(orjson.dumps(list(seen_ids)))
            fsync_dir_files(staging)
            final = self.dir / f"{_PREFIX}{seq:09d}"
            os.rename(staging, final)
            fsync_path(self.dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest(self) -> RankCheckpoint | None:
        ckpts = self.checkpoints()
        if not ckpts:
            return None
        path = ckpts[-1]
        state = RankerState.from_json((path / STATE_FILE).read_bytes())
        held: list[RankExample] = []
        training: list[RankExample] = []
        for part, ex in _read_examples(path / EXAMPLES_FILE):
            (held if part == "held" else training).append(ex)
        seen = orjson.loads((path / SEEN_FILE).read_bytes())
        return RankCheckpoint(state, held, training, seen)


def _read_examples(path: Path) -> Iterator[tuple[str, RankExample]]:
    with open(path, "rb") as fh:
        for line in fh:
            part, _, raw = line.rstrip(b"\n").partition(b"\t")
            yield part.decode(), decode_example(raw)
