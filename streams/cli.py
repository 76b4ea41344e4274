"""``freshrec stream users|catalog|collab``: run a dataflow with recovery and scaling flags."""

from __future__ import annotations

import argparse
import sys

from freshrec.settings import Settings

FLOWS = {
    "users": "events -> user state in Redis, train pairs, dead letters",
    "catalog": "catalog -> item records in Redis, changed-items",
    "collab": "events -> the shop's collaborative state in Redis, rank-examples, shopper-vectors, dead letters",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freshrec stream",
        description="Run a Bytewax dataflow until stopped; a restart resumes from the last snapshot "
        "in <state_dir>/streams/<flow>.",
    )
    parser.add_argument("flow", choices=sorted(FLOWS), help="; ".join(f"{k}: {v}" for k, v in FLOWS.items()))
    parser.add_argument("-w", "--workers", type=int, default=None, help="workers in this process (default: FRESHREC_STREAM_WORKERS)")
    parser.add_argument("-i", "--process-id", type=int, default=None, help="this process's index in a cluster")
    parser.add_argument("-a", "--addresses", default=None, help='all processes\' host:port, ";"-separated')
    parser.add_argument(
        "--no-recovery", action="store_true",
        help="no snapshots: a restart reprocesses the topic (also FRESHREC_STREAM_RECOVERY=false)",
    )
    return parser


def main(argv: list[str], settings: Settings) -> int:
    args = build_parser().parse_args(argv)
    if (args.process_id is None) != (args.addresses is None):
        print("freshrec stream: give -i/--process-id and -a/--addresses together", file=sys.stderr)
        return 2
    addresses = args.addresses.split(";") if args.addresses else None
    if addresses is not None and not 0 <= args.process_id < len(addresses):
        print(f"freshrec stream: process id {args.process_id} is not an index of the {len(addresses)} addresses", file=sys.stderr)
        return 2
    from freshrec.epochs import EpochMismatch
    from freshrec.topics import PartitionCountMismatch, check_partition_count

    from .flow_epoch import check_flow_epoch, flow_topic, topic_epoch
    from .runner import recovery_dir, run_flow

    recovery = settings.stream_recovery and not args.no_recovery
    try:
        if args.flow == "collab":
            # Reads events like the users flow but keeps its own offsets (collab:meta).
            from .collab_flow import build_collab_flow, check_collab_epoch

            epoch = topic_epoch(settings, settings.topics.events)
            check_collab_epoch(settings, recovery_dir(settings, args.flow) if recovery else None, epoch)
            flow = build_collab_flow(settings, epoch)
        else:
            epoch = topic_epoch(settings, flow_topic(settings, args.flow))
            check_flow_epoch(settings, args.flow, recovery_dir(settings, args.flow) if recovery else None, epoch)
            if args.flow == "users":
                from .users_flow import build_users_flow

                check_partition_count(settings)

                flow = build_users_flow(settings, epoch)
            else:
                from .catalog_flow import build_catalog_flow

                flow = build_catalog_flow(settings, epoch)
        workers = args.workers or settings.stream_workers
        run_flow(flow, settings, args.flow, workers, args.process_id, addresses, recovery=recovery)
    except BaseException as exc:
        # Bytewax wraps a Ctrl-C that lands inside Python code in its own runtime error.
        if _interrupted(exc):
            print(f"freshrec stream {args.flow}: stopped; a restart resumes from the last snapshot", file=sys.stderr)
            return 130
        mismatch = _find(exc, EpochMismatch) or _find(exc, PartitionCountMismatch)
        if mismatch is not None:
            # One paragraph that says what happened and the fix; a traceback adds nothing.
            print(f"freshrec stream {args.flow}: stopped, nothing was skipped. {mismatch}", file=sys.stderr)
            return 1
        raise
    return 0


def _find(exc: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """``exc`` or the first exception of type ``kind`` in its cause/context chain."""
    while exc is not None:
        if isinstance(exc, kind):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _interrupted(exc: BaseException | None) -> bool:
    return _find(exc, KeyboardInterrupt) is not None
