"""The one typed settings object, read from ``FRESHREC_*`` environment variables.

Every process builds a :class:`Settings` once at its entry point and passes it down;
nothing deeper reads the environment. Defaults point at the embedded services on
loopback, so ``freshrec demo`` needs no configuration at all.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from urllib.parse import urlparse

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "FRESHREC_"


class Topics:
    """Topic names under one prefix, so several deployments can share a broker."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.events = f"{prefix}events"
        self.catalog = f"{prefix}catalog"
        self.train_pairs = f"{prefix}train-pairs"
        self.item_vectors = f"{prefix}item-vectors"
        self.adapters = f"{prefix}adapters"
        self.dead_letter = f"{prefix}dead-letter"
        self.changed_items = f"{prefix}changed-items"

    def all(self) -> list[str]:
        return [
            self.events,
            self.catalog,
            self.train_pairs,
            self.item_vectors,
            self.adapters,
            self.dead_letter,
            self.changed_items,
        ]


class Settings(BaseSettings):
    """Configuration of every freshrec process (environment prefix ``FRESHREC_``)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma separated")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis holding user state and the catalog")
    redis_prefix: str = Field("freshrec:", description="Prefix of every Redis key this deployment writes")
    topic_prefix: str = Field("freshrec.", description="Prefix of every topic name")
    partitions: int = Field(4, ge=1, le=256, description="Partitions per topic created by `freshrec up`")
    state_dir: Path = Field(Path(".freshrec"), description="Snapshots, checkpoints, adapters, exports, pid files")
    data_dir: Path | None = Field(None, description="Dataset for replay/demo; default: the bundled sample")

    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    admin_token: str | None = Field(None, description="Bearer token for /admin; admin is off without one")
    auto_activate: bool = Field(True, description="Serving activates each newly announced adapter")

    history_size: int = Field(100, ge=1, le=10_000, description="Interactions kept per user")
    min_history_for_pair: int = Field(1, ge=1, description="Interactions needed before an event yields a train pair")
    popularity_half_life_days: float = Field(14.0, gt=0)
    repeat_half_life_days: float = Field(90.0, gt=0)

    learner_batch_size: int = Field(32, ge=2, description="Pairs per micro-batch")
    learner_flush_seconds: float = Field(5.0, gt=0, description="Train a partial micro-batch after this long")
    learner_eval_every: int = Field(10, ge=1, description="Evaluate and maybe publish every K micro-batches")
    learner_eval_window: int = Field(256, ge=8, description="Most recent untrained pairs kept for evaluation")
    learner_publish_margin: float = Field(0.0, ge=0, description="Allowed Recall@10 drop of a candidate")
    learner_lr: float = Field(2e-4, gt=0)
    lora_rank: int = Field(8, ge=1)

    device: str = Field("auto", description="auto, cpu or cuda")
    seed: int = 7

    # -- streams (add stream settings below this line) -----------------------------------

    # -- indexer and serving (add indexer/serving settings below this line) --------------
    # serving
    admin_enabled: bool | None = Field(
        None,
        description="Serve /admin: None = on exactly when admin_token is set; True without a token refuses to start",
    )
    serve_version: str | None = Field(
        None, description="Adapter version serving starts on; default: the registry's latest, else the base model"
    )
    max_k: int = Field(100, ge=1, le=1_000, description="Largest k a request may ask for")
    blend_repeat: float = Field(1.0, ge=0, description="/recommend weight of the user's normalised repeat-purchase score")
    blend_similarity: float = Field(0.3, ge=0, description="/recommend weight of cosine(user vector, item)")
    blend_popularity: float = Field(0.1, ge=0, description="/recommend weight of normalised fresh popularity")
    search_user_weight: float = Field(0.2, ge=0, le=1, description="/search: share of the user vector in the query vector")
    user_vector_half_life_days: float = Field(
        30.0, gt=0, description="Recency half-life of history items in the user vector, relative to the user's last event"
    )
    recommend_candidates: int = Field(200, ge=10, description="Nearest items and popular items considered per /recommend")
    popularity_refresh_s: float = Field(2.0, gt=0, description="How often serving re-reads fresh popularity from Redis")
    redis_timeout_s: float = Field(0.05, gt=0, description="Request-path Redis timeout; past it /recommend degrades")

    # -- learner (add learner settings below this line) ----------------------------------

    # -- evaluation (add evaluation settings below this line) ----------------------------

    @cached_property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def kafka_servers(self) -> list[str]:
        return [s.strip() for s in self.kafka_bootstrap.split(",") if s.strip()]

    @property
    def kafka_host_port(self) -> tuple[str, int]:
        host, _, port = self.kafka_servers[0].rpartition(":")
        return host or "127.0.0.1", int(port)

    @property
    def redis_host_port(self) -> tuple[str, int]:
        url = urlparse(self.redis_url)
        return url.hostname or "127.0.0.1", url.port or 6379

    def resolved_device(self) -> str:
        """CUDA when present and allowed; the CPU otherwise (invariant 5)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
