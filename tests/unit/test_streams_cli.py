"""``freshrec stream``'s flags and settings, without a broker: what reaches the runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from freshrec.settings import Settings


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every run_flow call of streams.cli.main, with the epoch checks and the flow build stubbed out."""
    import streams.flow_epoch as flow_epoch
    import streams.runner as runner
    import streams.users_flow as users_flow

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(flow_epoch, "topic_epoch", lambda settings, topic: None)
    monkeypatch.setattr(flow_epoch, "check_flow_epoch", lambda *args: None)
    monkeypatch.setattr(users_flow, "build_users_flow", lambda settings, epoch: "flow")
    monkeypatch.setattr(runner, "run_flow", lambda flow, settings, name, *args, recovery: calls.append(
        {"name": name, "recovery": recovery}))
    return calls


@pytest.mark.parametrize(("setting", "flag", "recovery"), [
    (True, [], True), (True, ["--no-recovery"], False), (False, [], False),
])
def test_stream_recovery_setting_and_flag(
    started: list[dict[str, Any]], tmp_path: Path, setting: bool, flag: list[str], recovery: bool
) -> None:
    from streams.cli import main

    assert main(["users", *flag], Settings(state_dir=tmp_path, stream_recovery=setting)) == 0
    assert started == [{"name": "users", "recovery": recovery}]
