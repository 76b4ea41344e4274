"""Helpers several integration tests share: reading a topic back, and seeding the sample catalog."""

from __future__ import annotations

import time
from pathlib import Path

from freshrec.consumer import TopicFollower
from freshrec.contracts import CatalogItem
from freshrec.dataset import read_items
from freshrec.settings import Settings


def read_topic(settings: Settings, topic: str, expected: int, timeout: float = 30.0) -> list[bytes]:
    """Values on ``topic`` from the start: until ``expected`` arrived (or ``timeout``), then half a second more.

    The extra moment catches anything beyond the expected count, so a test can assert
    that nothing more (a duplicate, a stray dead letter) was written.
    """
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    with TopicFollower(settings, topic) as follower:
        while len(out) < expected and time.monotonic() < deadline:
            out.extend(m.value for m in follower.poll(0.2))
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            out.extend(m.value for m in follower.poll(0.1))
    return out


def sample_items(sample_dir: Path, n: int) -> dict[str, CatalogItem]:
    """The first ``n`` items of the bundled sample's catalog, by id."""
    items: dict[str, CatalogItem] = {}
    for row in read_items(sample_dir / "items.csv"):
        item = CatalogItem.model_validate(row)
        items[item.item_id] = item
        if len(items) == n:
            break
    return items


def seed_catalog(settings: Settings, sample_dir: Path, n: int) -> dict[str, CatalogItem]:
    """:func:`sample_items` written straight to the Redis catalog store (no flow), and returned."""
    from stores import catalog_store
    from stores.user_store import connect

    items = sample_items(sample_dir, n)
    catalog_store.write_items(connect(settings), settings, items.values())
    return items
