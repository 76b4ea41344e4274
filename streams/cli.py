"""``freshrec stream users|catalog``: run a dataflow with recovery and scaling flags."""

from __future__ import annotations

import argparse
import sys

from freshrec.settings import Settings

FLOWS = {
    "users": "events -> user state in Redis, train pairs, dead letters",
    "catalog": "catalog -> item records in Redis, changed-items",
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
    parser.add_argument("--no-recovery", action="store_true", help="no snapshots: a restart reprocesses the topic")
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
    from .runner import run_flow

    if args.flow == "users":
        from .users_flow import build_users_flow

        flow = build_users_flow(settings)
    else:
        from .catalog_flow import build_catalog_flow

        flow = build_catalog_flow(settings)
    workers = args.workers or settings.stream_workers
    try:
        run_flow(flow, settings, args.flow, workers, args.process_id, addresses, recovery=not args.no_recovery)
    except BaseException as exc:
        # Bytewax wraps a Ctrl-C that lands inside Python code in its own runtime error.
        if _interrupted(exc):
            print(f"freshrec stream {args.flow}: stopped; a restart resumes from the last snapshot", file=sys.stderr)
            return 130
        raise
    return 0


def _interrupted(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, KeyboardInterrupt):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
