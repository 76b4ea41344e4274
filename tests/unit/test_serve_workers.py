"""freshrec serve: how many worker processes it runs."""

from __future__ import annotations

from freshrec.settings import Settings
from serving.cli import worker_count


def test_both_cores_by_default() -> None:
    assert Settings().serving_workers == 2
    assert worker_count(Settings(), admin=False) == 2


def test_one_worker_with_admin_on() -> None:
    # an adapter activated through /admin would go live in the answering worker only
    assert worker_count(Settings(serving_workers=4), admin=True) == 1
    assert worker_count(Settings(serving_workers=3), admin=False) == 3
