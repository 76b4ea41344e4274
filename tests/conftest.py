"""Session fixtures: one real Tansu broker and one real redis-server on free loopback ports.

They go through the same launcher as `freshrec up`. Each test that asks for
`fresh_settings` gets its own topic and Redis-key prefix, so tests share the two
servers without seeing each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from freshrec.infra import Stack, create_topics, free_port, start_stack, stop_stack  # noqa: E402
from freshrec.settings import Settings  # noqa: E402

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "freshrec" / "sample"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("infra")
    base = Settings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        state_dir=state,
        topic_prefix="boot.",
    )
    # Never reuse a Redis found there: the tests own theirs.
    s = start_stack(base, reuse_redis=False)
    yield s
    stop_stack(state)


@pytest.fixture
def fresh_settings(stack: Stack, tmp_path: Path) -> Settings:
    """Settings for one test: its own topics (created) and Redis keys, its own state dir."""
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        kafka_bootstrap=stack.bootstrap,
        redis_url=stack.redis_url,
        topic_prefix=f"t{tag}.",
        redis_prefix=f"t{tag}:",
        state_dir=tmp_path / "state",
        partitions=4,
    )
    create_topics(stack.bootstrap, settings.topics.all(), settings.partitions)
    return settings


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE_DIR
