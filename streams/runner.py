"""Run a dataflow with recovery in ``state_dir/streams/<name>`` and Bytewax scaling flags.

``freshrec stream`` goes through :func:`run_flow`; it is the same ``cli_main`` that
``python -m bytewax.run`` calls, with the recovery directory created on first use. The
directory also holds ``epoch.json``, the id of the topic its offsets were read from,
checked by ``freshrec stream`` before Bytewax resumes (:mod:`streams.flow_epoch`).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.run import cli_main

from freshrec.settings import Settings

# Recovery partitions are SQLite files; their count need not match the workers
# (Bytewax spreads snapshots over whatever partitions exist), but it must not change
# once written, so it is fixed here.
RECOVERY_PARTITIONS = 2


def recovery_dir(settings: Settings, name: str) -> Path:
    return settings.state_dir / "streams" / name


def ensure_recovery_dir(path: Path, partitions: int = RECOVERY_PARTITIONS) -> Path:
    """Create and initialise the recovery partitions unless they exist already."""
    if not any(path.glob("*.sqlite3")):
        path.mkdir(parents=True, exist_ok=True)
        init_db_dir(path, partitions)
    return path


def run_flow(
    flow: Dataflow,
    settings: Settings,
    name: str,
    workers: int = 1,
    process_id: int | None = None,
    addresses: list[str] | None = None,
    recovery: bool = True,
) -> None:
    """Run ``flow`` until it is stopped (the inputs tail their topics)."""
    recovery_config = None
    if recovery:
        directory = ensure_recovery_dir(recovery_dir(settings, name))
        recovery_config = RecoveryConfig(directory, timedelta(seconds=settings.stream_backup_seconds))
    cli_main(
        flow,
        workers_per_process=workers,
        process_id=process_id,
        addresses=addresses,
        epoch_interval=timedelta(seconds=settings.stream_snapshot_seconds),
        recovery_config=recovery_config,
    )
