"""CLI edges and launcher safety that need neither broker nor Redis."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from console.cli import build_parser, main
from freshrec.infra import Service, free_port, service_alive, stop_stack
from freshrec.reset import _key_pattern, safe_url


def test_produce_of_a_missing_file_prints_one_line_and_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A port nothing listens on: the file must be checked before any connection is tried.
    monkeypatch.setenv("FRESHREC_KAFKA_BOOTSTRAP", f"127.0.0.1:{free_port()}")
    missing = tmp_path / "nonexistent.jsonl"
    assert main(["produce", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip().splitlines() == [f"freshrec produce: cannot read {missing}: No such file or directory"]


def test_produce_of_a_directory_is_the_same_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["produce", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Is a directory" in err and "Traceback" not in err


def test_help_texts_say_what_up_clears_and_that_counts_are_a_lower_bound() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    helps = {c.dest: c.help for c in sub._choices_actions}  # type: ignore[attr-defined]
    assert "lower bound" in helps["status"] and "clean slate" in helps["up"]
    up_help = " ".join(sub.choices["up"].format_help().split())  # type: ignore[attr-defined]
    assert "freshrec reset" in up_help and "Redis keys" in up_help and "adapter and ranker registries stay" in up_help
    status_help = " ".join(sub.choices["status"].format_help().split())  # type: ignore[attr-defined]
    assert "lower bound on the embedded" in status_help and "Known broker quirk" in status_help


def test_a_recorded_pid_now_used_by_another_program_is_neither_taken_for_ours_nor_stopped(tmp_path: Path) -> None:
    """After a crash or reboot the broker's pid can belong to anything: `down` must not kill it."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        svc = Service("kafka", "127.0.0.1", free_port(), other.pid)
        assert not service_alive(svc)
        record = {"kafka": vars(svc), "redis": vars(Service("redis", "127.0.0.1", free_port(), None)), "topics": []}
        (tmp_path / "infra.json").write_text(json.dumps(record))
        lines = stop_stack(tmp_path)
        assert other.poll() is None, "down signalled a process that is not the broker"
        assert lines[0] == f"kafka (pid {other.pid}, 127.0.0.1:{svc.port}) had already exited"
        assert lines[1].startswith("left redis at") and not (tmp_path / "infra.json").exists()
    finally:
        other.kill()
        other.wait()


def test_key_pattern_escapes_glob_characters() -> None:
    assert _key_pattern("freshrec:") == "freshrec:*"
    assert _key_pattern("a*b?[c]\\:") == "a\\*b\\?\\[c\\]\\\\:*"


def test_safe_url_masks_a_password() -> None:
    assert safe_url("redis://:s3cret@host:6380/0") == "redis://:***@host:6380/0"
    assert safe_url("redis://user:s3cret@host/1") == "redis://user:***@host/1"
    assert safe_url("redis://127.0.0.1:6380/0") == "redis://127.0.0.1:6380/0"
