"""The one typed settings object, read from ``FRESHREC_*`` environment variables.

Every process builds a :class:`Settings` once at its entry point and passes it down;
nothing deeper reads the environment. Defaults point at the embedded services on
loopback, so ``freshrec demo`` needs no configuration at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, SecretStr, model_validator
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
        # the ranking stage (DESIGN.md): labelled examples, shoppers' vectors, ranker announcements
        self.rank_examples = f"{prefix}rank-examples"
        self.shopper_vectors = f"{prefix}shopper-vectors"
        self.rankers = f"{prefix}rankers"

    def all(self) -> list[str]:
        return [
            self.events,
            self.catalog,
            self.train_pairs,
            self.item_vectors,
            self.adapters,
            self.dead_letter,
            self.changed_items,
            self.rank_examples,
            self.shopper_vectors,
            self.rankers,
        ]


class Settings(BaseSettings):
    """Configuration of every freshrec process (environment prefix ``FRESHREC_``)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma separated")
    # TLS and SASL for an existing Kafka (freshrec.kafka_security turns them into each client's options).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol, as Kafka names it"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism (needed with SASL_PLAINTEXT / SASL_SSL)"
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user name")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password (never logged)")
    kafka_ssl_cafile: Path | None = Field(None, description="CA bundle (PEM) to verify the brokers; default: the system's")
    kafka_ssl_certfile: Path | None = Field(None, description="Client certificate (PEM) for mutual TLS")
    kafka_ssl_keyfile: Path | None = Field(None, description="Client private key (PEM) for mutual TLS")
    kafka_ssl_check_hostname: bool = Field(True, description="Check that the broker's certificate names its host")
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis holding user state and the catalog: redis://host:port/db (rediss:// for TLS) for one "
        "server, redis+cluster://host:port[,host:port...] (rediss+cluster:// for TLS) for a Redis Cluster, whose "
        "other nodes the client finds by itself (freshrec.redis_url)",
    )
    redis_prefix: str = Field(
        "freshrec:", description="Prefix of every Redis key this deployment writes (no braces: they are hash tags)"
    )
    topic_prefix: str = Field("freshrec.", description="Prefix of every topic name")
    partitions: int = Field(
        4,
        ge=1,
        le=256,
        description="Partitions per topic created by `freshrec up`; with an existing Kafka, the events topic's "
        "partition count: readers find a shopper's Redis keys in murmur2(user id) modulo it (stores.user_store)",
    )
    state_dir: Path = Field(Path(".freshrec"), description="Snapshots, checkpoints, adapters, exports, pid files")
    data_dir: Path | None = Field(None, description="Dataset for replay/demo; default: the bundled sample")

    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    admin_token: str | None = Field(None, description="Bearer token for /admin; admin is off without one")
    auto_activate: bool = Field(True, description="Serving activates each newly announced adapter")

    history_size: int = Field(100, ge=1, le=10_000, description="Interactions kept per user")
    min_history_for_pair: int = Field(1, ge=1, description="Interactions needed before an event yields a train pair")
    popularity_half_life_days: float = Field(7.0, gt=0, description="Half-life of fresh popularity (everyone's purchases)")
    repeat_half_life_days: float = Field(
        180.0, gt=0, description="Half-life of a shopper's decayed purchase counts (freq: whether a cancel undoes a purchase)"
    )
    repeat_basket_decay: float = Field(
        0.9, gt=0, lt=1,
        description="Repeat signal: weight of an item's basket one place older (per basket, not per day); see user_state",
    )

    learner_batch_size: int = Field(32, ge=2, description="Pairs per micro-batch")
    learner_flush_seconds: float = Field(5.0, gt=0, description="Train a partial micro-batch after this long")
    learner_eval_every: int = Field(10, ge=1, description="Evaluate and maybe publish every K micro-batches")
    learner_eval_window: int = Field(256, ge=8, description="Most recent untrained pairs kept for evaluation")
    learner_publish_margin: float = Field(
        0.0, ge=0, description="Allowed mean per-pair drop (in gate_metric) of a candidate; 0: only a gain beyond gate_z s.e."
    )
    # 1e-3 with catalog negatives lifted the window Recall@10 0.020 -> 0.043; 2e-4 changed nothing (learner/README.md).
    learner_lr: float = Field(1e-3, gt=0)
    lora_rank: int = Field(8, ge=1)

    device: str = Field("auto", description="auto, cpu or cuda")
    seed: int = 7

    # -- streams (add stream settings below this line) -----------------------------------
    stream_dedupe_ids: int = Field(64, ge=0, description="Event ids kept per user to drop duplicates (producer retries)")
    stream_max_freq_items: int = Field(256, ge=1, description="Most items kept in a user's repeat-purchase counts")
    stream_baskets_kept: int = Field(63, ge=1, le=63, description="A shopper's most recent baskets kept for the repeat signal")
    stream_snapshot_seconds: float = Field(
        5.0, gt=0, description="Bytewax epoch length: how often state and Kafka offsets are snapshotted"
    )
    stream_backup_seconds: float = Field(
        0.0, ge=0, description="Keep superseded snapshots this long (set to your backup interval of state_dir)"
    )
    stream_recovery: bool = Field(True, description="Snapshot to state_dir/streams and resume from it on restart")
    stream_batch_size: int = Field(2000, ge=1, description="Kafka messages taken per poll by a flow")
    # The broker answers a held fetch as soon as data arrives (measured on Tansu with
    # librdkafka and kafka-python, 2026-12-04: a lone event's latency 3 ms at 5 ms, ~7 ms at
    # 250-500 ms), so a long wait costs little freshness, while a short one makes every idle
    # consumer fetch hundreds of times a second (bench/idle.py: the whole idle stack 99 % of
    # a core with 5 ms here and 50 ms for followers).
    stream_fetch_wait_ms: int = Field(
        250, ge=0, description="Longest the broker may hold an empty fetch of a flow (data ends the wait at once)"
    )
    follower_fetch_wait_ms: int = Field(
        500, ge=0, description="The same for the followers (serving, indexer, learner, monitor)"
    )
    stream_workers: int = Field(1, ge=1, description="Bytewax workers per process for `freshrec stream`")
    stream_pair_context: int = Field(10, ge=1, description="Recent items in a train pair's context")
    stream_query_window_s: float = Field(
        1800.0, ge=0, description="A search this recent before a click/cart/purchase is taken as what led to it"
    )
    stream_title_cache: int = Field(200_000, ge=0, description="Item titles cached per flow process for train pairs")
    stream_dedupe_window: int = Field(
        1_000_000, ge=0,
        description="Event ids (64-bit hashes) remembered per events partition: a repeat within them is dropped",
    )
    stream_redis_backoff_max_s: float = Field(
        5.0, gt=0, description="Longest wait between a flow's Redis retries during an outage (doubling from 0.1 s)"
    )
    stream_redis_check_s: float = Field(
        2.0, gt=0, description="How often an idle flow checks that Redis still holds its state (rebuilds it if not)"
    )
    # Bounded state (issue 16 item 7, streams/retention.py): judged in event time, so a
    # replay forgets exactly what the first run forgot. 730 days keeps every shopper of the
    # bundled data set (2009-12 .. 2011-12) until after the evaluation's report window.
    stream_retention_days: float = Field(
        730.0, ge=0,
        description="A shopper or item with no event for this long (event time) is forgotten by the users flow "
        "and deleted from Redis, and a shopper by the collaborative flow too (state, shopper index, vector); "
        "0 keeps everything",
    )
    stream_popularity_items: int = Field(
        100_000, ge=1, description="Most popularity entries a users-flow partition keeps (the top ones, each event-time day)"
    )
    stream_live_states: int = Field(
        10_000, ge=0, description="Decoded shopper states a users-flow partition keeps beside the encoded ones"
    )

    # -- indexer and serving (add indexer/serving settings below this line) --------------
    # indexer
    encoder_precision: str = Field(
        "auto", description="ONNX encoder precision: auto (fp16 on CUDA, else int8), int8, fp32 or fp16"
    )
    onnx_threads: int = Field(
        1, ge=1, le=64, description="ONNX Runtime intra-op threads per encoder; 1 is fastest for one query on 2 cores"
    )
    indexer_threads: int = Field(2, ge=1, le=64, description="ONNX Runtime threads of the indexer's batch encoder")
    indexer_batch_size: int = Field(64, ge=1, le=4096, description="Changed items encoded per micro-batch")
    indexer_flush_seconds: float = Field(
        0.2, gt=0, description="Longest the indexer waits for changed items per poll (and between adapter checks)"
    )
    exports_keep: int = Field(
        6, ge=1, description="ONNX exports (~200 MB each) the indexer keeps in state_dir/exports; older are pruned"
    )
    # serving
    users_token: str | None = Field(
        None,
        description="Bearer token for /users/{user_id} (a shopper's history); the endpoint is off without one. "
        "Separate from admin_token because the demo page carries it into a browser",
    )
    demo_actions: bool = Field(
        False,
        description="Serve the demo's write path (POST /demo/act: the page acts as a shopper, sending events "
        "to Kafka; GET /demo/stats). Demo only: anyone who reaches the API can then send events",
    )
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
    blend_mode: Literal["log", "linear"] = Field(
        "log", description="/recommend blend: 'log' (blend_log_*, won the evaluation) or 'linear' (blend_*)"
    )
    blend_log_repeat: float = Field(1.5, ge=0, description="log blend: weight of log(normalised repeat + 0.005)")
    blend_log_similarity: float = Field(2.0, ge=0, description="log blend: weight of cosine(user vector, item)")
    blend_log_popularity: float = Field(0.8, ge=0, description="log blend: weight of log(normalised popularity + 0.001)")
    blend_log_new: float = Field(0.5, ge=0, description="log blend: bonus of an item first seen within blend_new_days")
    blend_calibrate_similarity: bool = Field(
        True, description="Map each adapter version's cosines onto the reference spread below before blending"
    )
    blend_similarity_mean: float = Field(
        0.20, description="Reference mean item-to-item cosine (the base model's on the bundled catalogs)"
    )
    blend_similarity_std: float = Field(
        0.11, gt=0, description="Reference standard deviation of item-to-item cosines (the base model's)"
    )
    blend_new_days: float = Field(
        30.0, gt=0, description="log blend: an item first seen this recently (event time) is new and joins the candidates"
    )
    search_user_weight: float = Field(0.2, ge=0, le=1, description="/search: share of the user vector in the query vector")
    user_vector_half_life_days: float = Field(
        30.0, gt=0, description="Recency half-life of history items in the user vector, relative to the user's last event"
    )
    recommend_candidates: int = Field(200, ge=10, description="Nearest items and popular items considered per /recommend")
    popularity_refresh_s: float = Field(2.0, gt=0, description="How often serving re-reads fresh popularity from Redis")
    redis_timeout_s: float = Field(0.25, gt=0, description="Request-path Redis timeout; past it /recommend degrades")
    serving_build_nice: int = Field(
        10, ge=0, le=19, description="Nice value of serving's pair builder and export worker: requests keep the CPU first"
    )
    serving_faiss_threads: int = Field(
        1, ge=1, le=64, description="OpenMP threads FAISS may use in serving; one query per search gains nothing from more"
    )
    serving_workers: int = Field(
        2,
        ge=1,
        le=64,
        description="Processes `freshrec serve` answers with (uvicorn workers on one port), each with its own pair "
        "and topic followers: one per core is the measured best (bench.serving); 1 when admin is on (activation "
        "through /admin is per process)",
    )
    # False since 2026-12-04: two workers with their handlers on the event loop held 400
    # /recommend req/s against 300 with Starlette's threadpool, whose threads contend for the
    # GIL under load (docs/bench/serving_workers.json). Request-path Redis reads time out
    # after redis_timeout_s, so a Redis outage stalls a worker's loop at most that long a request.
    serving_threadpool: bool = Field(
        False,
        description="Run the Redis reads, ranking and encoding of a request in a worker thread, off the event loop "
        "(measured slower under load on 2 cores: bench.serving's `after` against `workers`)",
    )
    # result cache (issue 15 item 2): serving/result_cache.py says what an entry is keyed by and how stale it can be
    result_cache_size: int = Field(
        10_000,
        ge=0,
        description="/recommend answers each serving process keeps (least recently used dropped first); 0 turns "
        "the cache off. An answer is invalidated by any change of the shopper's state, the pair, the ranker, "
        "popularity or the shop view",
    )
    result_cache_ttl_s: float = Field(
        2.0,
        gt=0,
        description="Oldest cached /recommend answer served: bounds how old the per-request collaborative rows "
        "(co-purchase rows, nearest shoppers) of a hit can be; default the popularity refresh interval",
    )
    # the HTTP collector (collector/: POST /events for producers without a Kafka client)
    collector_host: str = Field("127.0.0.1", description="Bind address of `freshrec collect`")
    collector_port: int = Field(8010, ge=1, le=65535, description="Port of `freshrec collect`")
    collector_token: str | None = Field(
        None,
        description="Bearer token producers send to POST /events; the collector refuses to start without one "
        "unless given --insecure-no-token (a local demo)",
    )
    collector_max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest POST /events body; a bigger one is a 413 and nothing is sent"
    )
    collector_max_records: int = Field(10_000, ge=1, description="Most records in one POST /events; more is a 413")
    collector_send_timeout_s: float = Field(
        10.0, gt=0, description="Longest a batch waits for the broker's confirmation; what is not confirmed by then is a 503"
    )
    collector_connect_timeout_s: float = Field(
        5.0, gt=0, description="Longest the collector's producer tries to reach the bootstrap servers per attempt"
    )
    collector_retry_after_s: int = Field(5, ge=1, description="Retry-After (seconds) of a 503 while the broker is away")
    # the flows' progress exporter (monitor/: `freshrec monitor`, scraped by Prometheus)
    monitor_host: str = Field("127.0.0.1", description="Bind address of `freshrec monitor`'s /metrics")
    monitor_port: int = Field(8020, ge=0, le=65535, description="Port of `freshrec monitor`'s /metrics (0: any free port)")

    # -- collaborative state and the ranking stage (ranking.collab, ranking.features) ----
    collab_top_k: int = Field(
        100, ge=1, description="Co-purchase partners an item's row keeps when it is cut back (the most specific, by cosine)"
    )
    collab_row_cap: int = Field(
        200, ge=1, description="Co-purchase entries held per item before the row is cut back to collab_top_k (memory bound)"
    )
    collab_copurchase_half_life_days: float = Field(180.0, gt=0, description="Half-life of co-purchase counts (event time)")
    collab_max_basket_lines: int = Field(64, ge=1, description="Distinct lines of one basket that pair up for co-purchase")
    collab_pop_short_days: float = Field(3.0, gt=0, description="Half-life of short-horizon popularity (a ranker feature)")
    collab_pop_long_days: float = Field(60.0, gt=0, description="Half-life of long-horizon popularity (a ranker feature)")
    collab_shopper_dim: int = Field(256, ge=8, description="Buckets of the hashed shopper vector (nearest-shopper search)")
    collab_neighbours: int = Field(50, ge=1, description="Nearest shoppers whose baskets feed a shopper's features")
    collab_order_log: int = Field(
        20_000, ge=100, description="Batches whose application order Redis keeps (collab:order) so a restarted collaborative "
        "flow replays its input partitions in the order it first applied them (streams.collab_partition)"
    )
    ranker_copurchase_candidates: int = Field(50, ge=0, description="Candidates proposed by co-purchase per ranking")
    ranker_neighbour_candidates: int = Field(50, ge=0, description="Candidates proposed by nearest shoppers per ranking")
    ranker_ann_candidates: int = Field(100, ge=0, description="Candidates proposed by the item index (nearest to the user vector)")
    ranker_popular_candidates: int = Field(100, ge=0, description="Most popular items proposed per ranking")
    ranker_new_candidates: int = Field(100, ge=0, description="Newest arrivals proposed per ranking")
    # 200/200 rank better than 20/20 (+0.0024 Recall@10 on validation, docs/ranker_study.md) at the
    # cost of reading up to 400 co-purchase rows per ranked request; not in the feature schema, so
    # the flows, the learner and serving must agree on them.
    ranker_profile_items: int = Field(
        200, ge=1, description="The shopper's strongest items whose co-purchase rows make log_cooc (rows read per ranking)"
    )
    ranker_last_basket_items: int = Field(
        200, ge=1, description="Lines of the shopper's last basket whose co-purchase rows make log_cooc_last"
    )
    ranker_family: Literal["lgbm", "lgbm_continue", "torch"] = Field(
        "lgbm",
        description="Ranker model: LightGBM lambdarank refit on the sliding window, continued with new trees, or a small "
        "torch ranker trained incrementally (chosen by measurement: docs/ranker_family.md)",
    )
    ranker_update_baskets: int = Field(1000, ge=1, description="Update the ranker after this many new labelled baskets")
    ranker_update_days: float = Field(
        14.0, gt=0, description="... or after this many days of event time with any new labelled basket"
    )
    ranker_window_baskets: int = Field(3000, ge=10, description="Newest labelled baskets a ranker update trains on")
    ranker_gate_baskets: int = Field(
        300, ge=10, description="Newest labelled baskets held back from training to judge a ranker candidate"
    )
    ranker_train_negatives: int = Field(
        50, ge=1, description="Most non-bought candidates per basket in a training set (a seeded sample; all bought ones stay)"
    )
    ranker_eval_history_days: float = Field(
        90.0, ge=0, description="`freshrec eval` ranker: days of history before the first scored basket that make examples"
    )
    # the ranker in the learner process (learner.rank_intake, learner.rank_loop)
    ranker_learn: bool = Field(
        True, description="`freshrec learn` also trains rankers from rank-examples, beside the adapter (a thread)"
    )
    ranker_update_seconds: float = Field(
        300.0, gt=0, description="`freshrec learn`: also update the ranker after this many wall-clock seconds with any new basket"
    )
    ranker_dedupe_ids: int = Field(
        100_000, ge=1, description="Most recent rank-example ids the learner remembers (and checkpoints) to drop duplicates"
    )
    learner_metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Port of the learner's Prometheus /metrics (None: off; 0: any free port)"
    )
    learner_metrics_host: str = Field(
        "127.0.0.1", description="Bind address of the learner's /metrics (0.0.0.0 in a container Prometheus scrapes)"
    )

    # -- learner (add learner settings below this line) ----------------------------------
    learner_temperature: float = Field(0.05, gt=0, description="Softmax temperature of the in-batch contrastive loss")
    learner_lora_targets: str = Field(
        "query,value", description="Comma-separated names of the BERT linear modules that get LoRA weights"
    )
    learner_lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch while training")
    learner_min_eval_pairs: int = Field(
        8, ge=1, description="Window pairs with a known target needed before a candidate may be published"
    )
    learner_dedupe_ids: int = Field(
        1_000_000, ge=1, description="Most recent pair ids remembered to drop duplicate train pairs"
    )
    learner_log_seconds: float = Field(10.0, gt=0, description="Seconds between learner progress lines")
    learner_catalog_negatives: int = Field(
        64, ge=0, description="Extra negatives added to every micro-batch (0: in-batch only); see learner_negatives"
    )
    learner_negatives: Literal["recent", "catalog"] = Field(
        "recent", description="Extra negatives: 'recent' (targets of recent pairs: popularity-shaped) or 'catalog' (uniform)"
    )
    learner_negative_pool: int = Field(2048, ge=1, description="Recent pair targets the 'recent' negatives are drawn from")
    learner_anchor_weight: float = Field(
        3.0, ge=0, description="Weight of the pull of each encoded text back to its base-model vector (0: none)"
    )
    learner_mix_pool: int = Field(
        256, ge=1, description="Pairs pooled to mix each micro-batch across shoppers (<= batch size: no mixing)"
    )
    # the publish gate (learner.publish), for adapters and rankers alike
    gate_z: float = Field(
        1.0, ge=0,
        description="Publish a candidate only if its mean per-example gain over the active version (paired, same "
        "held-out examples) is above 0 and above gate_z standard errors; ties are held",
    )
    gate_metric: Literal["recall@10", "ndcg@10"] = Field(
        "recall@10", description="Per-example metric the gate compares (per window pair; per held-back basket for rankers)"
    )
    ranker_min_gate_baskets: int = Field(
        30, ge=1, description="Held-back baskets with a bought candidate needed before a ranker candidate may be published"
    )
    # the ranker model (models.ranker.RankerParams; the family is ranker_family)
    ranker_trees: int = Field(200, ge=1, description="Trees of a refitted LightGBM ranker (scoring cost ~ trees)")
    ranker_more_trees: int = Field(25, ge=1, description="Trees one lgbm_continue update adds to the parent's")
    ranker_max_trees: int = Field(
        300, ge=1, description="lgbm_continue refits instead once a model would pass this many trees (bounds scoring cost)"
    )
    ranker_mlp_hidden: str = Field("64,32", description="Hidden layer widths of the torch ranker, comma-separated")
    ranker_mlp_lr: float = Field(3e-3, gt=0, description="Adam learning rate of the torch ranker")
    ranker_poll_s: float = Field(
        2.0, gt=0, description="How often serving re-reads the ranker registry's active version (announcements also wake it)"
    )
    ranker_decode_cache: int = Field(
        5000, ge=1, description="Decoded neighbour states (and, apart, co-purchase rows) serving keeps, keyed by their stored bytes"
    )

    # -- evaluation (add evaluation settings below this line) ----------------------------
    # frozen/full run the system with the system's own settings (blend_mode, blend_log_*,
    # blend_new_days, *_half_life_days), so the evaluation measures what serving serves.
    eval_train_every_days: float = Field(
        14.0, gt=0, description="`freshrec eval` full: train the adapter and re-encode the catalog this often (event time)"
    )
    eval_pairs_per_update: int = Field(
        512, ge=0, description="`freshrec eval` full: most train pairs (a seeded sample) per adapter update"
    )
    eval_pretrain_days: float = Field(
        28.0, ge=0, description="`freshrec eval` full: days of history before --eval-from whose pairs train the first adapter"
    )
    eval_pretrain_pairs: int = Field(
        1024, ge=0, description="`freshrec eval` full: most train pairs (a seeded sample) for the first adapter"
    )
    eval_epochs: int = Field(1, ge=1, description="`freshrec eval` full: passes over each update's pairs")
    eval_gate: bool = Field(
        True,
        description="`freshrec eval` full: adopt an update only if the learner's publish gate passes it (as the live learner)",
    )
    eval_repeat_half_life_days: float = Field(
        365.0, gt=0, description="`freshrec eval` repeat and cooccurrence baselines: half-life of the shopper's frequency"
    )
    # encoder student (issue 15 item 4): models/student.py, bench/compression.py, docs/compression.md
    eval_encoder_dir: Path | None = Field(
        None,
        description="`freshrec eval` frozen/ranker: encode the catalog with this distilled student folder "
        "(models.student; ONNX export cached in <dir>/onnx) instead of the bundled encoder; evaluation only, "
        "serving and the indexer ignore it. Not with `full` (its adapters are the bundled encoder's)",
    )

    @model_validator(mode="after")
    def _kafka_security_complete(self) -> Settings:
        """SASL without its mechanism or credentials would fail later, on every client, less clearly."""
        if self.kafka_security_protocol.startswith("SASL_"):
            missing = [
                f"FRESHREC_{n.upper()}"
                for n in ("kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password")
                if getattr(self, n) is None
            ]
            if missing:
                raise ValueError(
                    f"kafka_security_protocol {self.kafka_security_protocol} needs {', '.join(missing)}"
                )
        return self

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

    def child_env(self, inherit: Mapping[str, str]) -> dict[str, str]:
        """``inherit`` plus the FRESHREC_* variables that rebuild these settings in a child.

        Unset (None) settings are removed rather than left to whatever ``inherit`` holds,
        so the child sees exactly these settings.
        """
        env = dict(inherit)
        for name, value in self.model_dump().items():
            key = ENV_PREFIX + name.upper()
            if value is None:
                env.pop(key, None)
            elif isinstance(value, SecretStr):
                env[key] = value.get_secret_value()
            else:
                env[key] = str(value).lower() if isinstance(value, bool) else str(value)
        return env

    def resolved_device(self) -> str:
        """CUDA when present and allowed; the CPU otherwise (invariant 5)."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
