"""The learner's checkpoint: consumer offsets and training state, committed together.

Layout under ``settings.state_dir / "learner"``::

    checkpoints/ckpt-000000042/   one complete checkpoint (newest number wins)
        trainer.pt                LoRA weights, optimiser, step, trained-pairs count and digest
        state.json                offsets, held-out window, pending batch, counters, active version
    trained.log                   one JSON line per micro-batch: {"step": s, "pair_ids": [...]}
    epoch.json                    the train-pairs topic's id the offsets belong to (freshrec.epochs)

A checkpoint directory is written under a hidden staging name and renamed into place,
so the weights and the offsets that produced them appear together or not at all; a
SIGKILL at any moment leaves the previous checkpoint intact.

``offsets`` are the next offset per partition *after the last message processed*, not
the consumer's fetch position (a poll returns many messages; a checkpoint can fall
between two of them). Every consumed pair is then in exactly one place: trained (in
the weights and the log), in the window, in the pending batch, or dropped as a duplicate.

The training log is appended *before* the checkpoint that covers it, and a restart
drops every line with a step newer than the checkpoint's, so after recovery the log
lists exactly the pairs the restored weights were trained on.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from freshrec.contracts import TrainPair
from freshrec.epochs import check_epoch_file
from freshrec.files import fsync_dir_files, fsync_path

TRAINER_FILE = "trainer.pt"
STATE_FILE = "state.json"
EPOCH_FILE = "epoch.json"
_PREFIX = "ckpt-"


@dataclass
class LearnerState:
    """Everything besides the trainer that a restarted learner needs to continue."""

    topic: str
    offsets: dict[int, int] = field(default_factory=dict)
    window: list[TrainPair] = field(default_factory=list)
    pending: list[TrainPair] = field(default_factory=list)
    step: int = 0
    pairs_trained: int = 0
    batches_since_eval: int = 0
    trained_since_publish: int = 0
    active_version: str = "base"
    duplicates: int = 0
    skipped: int = 0
    created: float = 0.0
    # learner.evaluate.TargetPopularity.entries: what the publish gate ranks by beside similarity
    target_popularity: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> bytes:
        obj: dict[str, Any] = asdict(self)
        obj["offsets"] = {str(p): o for p, o in self.offsets.items()}
        obj["window"] = [p.model_dump() for p in self.window]
        obj["pending"] = [p.model_dump() for p in self.pending]
        return json.dumps(obj).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> LearnerState:
        obj = json.loads(raw)
        obj["offsets"] = {int(p): int(o) for p, o in obj["offsets"].items()}
        obj["window"] = [TrainPair.model_validate(p) for p in obj["window"]]
        obj["pending"] = [TrainPair.model_validate(p) for p in obj["pending"]]
        return cls(**obj)


class CheckpointStore:
    """Atomic checkpoints and the training log of one learner (``root`` = state_dir/learner)."""

    def __init__(self, root: Path | str, keep: int = 2) -> None:
        self.root = Path(root)
        self.dir = self.root / "checkpoints"
        self.log_path = self.root / "trained.log"
        self.epoch_path = self.root / EPOCH_FILE
        self.keep = max(keep, 1)

    def check_epoch(self, topic: str, current: str | None) -> None:
        """Refuse checkpoints taken in another incarnation of ``topic``
        (:class:`~freshrec.epochs.EpochMismatch`, naming ``freshrec reset``); record
        ``current`` when nothing is recorded.

        Without a checkpoint there are no offsets to vouch for, so a recorded epoch is
        simply replaced: a learner stopped before its first checkpoint may start on a
        recreated topic.
        """
        if self.latest() is None:
            self.epoch_path.unlink(missing_ok=True)
        check_epoch_file(self.epoch_path, "freshrec learn", topic, current)

    def checkpoints(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def read_state(self, checkpoint: Path) -> LearnerState:
        return LearnerState.from_json((checkpoint / STATE_FILE).read_bytes())

    def write(self, trainer: Any, state: LearnerState) -> Path:
        """Commit ``trainer`` (anything with ``save_state(path)``) and ``state`` as one checkpoint."""
        self.dir.mkdir(parents=True, exist_ok=True)
        latest = self.latest()
        seq = int(latest.name.removeprefix(_PREFIX)) + 1 if latest else 1
        staging = self.dir / f".staging-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            trainer.save_state(staging / TRAINER_FILE)
            state.created = time.time()
            (staging / STATE_FILE).write_bytes(state.to_json())
            fsync_dir_files(staging)
            final = self.dir / f"{_PREFIX}{seq:09d}"
            os.rename(staging, final)
            fsync_path(self.dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stray in self.dir.iterdir():
            if stray.name.startswith(".staging-"):
                shutil.rmtree(stray, ignore_errors=True)  # left by a killed writer (one learner per state_dir)
        return final

    # -- the training log ------------------------------------------------------------------

    def append_trained(self, step: int, pair_ids: list[str]) -> None:
        """Record one micro-batch; call before the checkpoint that covers ``step``."""
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"step": step, "pair_ids": pair_ids}) + "\n"
        with open(self.log_path, "a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def trained_batches(self) -> list[tuple[int, list[str]]]:
        """(step, pair ids) per micro-batch in the log; a torn last line is ignored."""
        if not self.log_path.exists():
            return []
        out = []
        with open(self.log_path) as fh:
            for line in fh:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    continue  # only the last line can be torn, by a kill mid-append
                out.append((int(obj["step"]), list(obj["pair_ids"])))
        return out

    def trained_ids(self) -> list[str]:
        return [pid for _, ids in self.trained_batches() for pid in ids]

    def truncate_log(self, max_step: int) -> int:
        """Drop log lines newer than ``max_step`` (trained after the last checkpoint); return how many."""
        batches = self.trained_batches()
        kept = [(s, ids) for s, ids in batches if s <= max_step]
        if len(kept) == len(batches) and self._log_is_clean():
            return 0
        tmp = self.log_path.with_name(self.log_path.name + ".tmp")
        with open(tmp, "w") as fh:
            for s, ids in kept:
                fh.write(json.dumps({"step": s, "pair_ids": ids}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.log_path)
        return len(batches) - len(kept)

    def _log_is_clean(self) -> bool:
        if not self.log_path.exists():
            return True
        data = self.log_path.read_bytes()
        return not data or data.endswith(b"\n")
