"""The ``freshrec`` command.

Infrastructure and data commands live here; each component owns the arguments of its
own command (``streams.cli``, ``indexer.cli``, ...) and is imported only when that
command runs, so ``freshrec status`` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from .settings import Settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# command -> (module with `main(argv, settings) -> int`, one-line help)
COMPONENT_COMMANDS: dict[str, tuple[str, str]] = {
    "stream": ("streams.cli", "run a Bytewax dataflow: `stream users` or `stream catalog`"),
    "index": ("indexer.cli", "encode changed items and publish item vectors"),
    "serve": ("serving.cli", "run the recommend/search/similar API"),
    "learn": ("learner.cli", "train and publish LoRA adapters from train pairs"),
    "eval": ("evaluation.cli", "prequential next-basket evaluation on a dataset"),
    "demo": ("freshrec.demo", "start everything and replay the bundled sample"),
}


def _cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from .infra import InfraError, start_stack

    try:
        stack = start_stack(settings)
    except InfraError as exc:
        print(f"freshrec up: {exc}", file=sys.stderr)
        return 1
    owner = f"pid {stack.redis.pid}" if stack.redis.pid else "already running, reused"
    print(f"kafka  {stack.bootstrap}  (Tansu, pid {stack.kafka.pid}, {len(stack.topics)} topics x {settings.partitions} partitions)")
    print(f"redis  {stack.redis_url}  ({owner})")
    return 0


def _cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    from .infra import stop_stack

    stopped = stop_stack(settings.state_dir)
    if not stopped:
        print(f"nothing to stop: no freshrec services are recorded in {settings.state_dir}")
    for line in stopped:
        print(f"stopped {line}")
    return 0


def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from .infra import describe_stack

    lines = describe_stack(settings.state_dir)
    if not lines:
        print(f"not up: nothing recorded in {settings.state_dir} (run `freshrec up`)")
        return 1
    print("\n".join(lines))
    if args.counts:
        from .consumer import topic_counts

        for topic, n in topic_counts(settings).items():
            print(f"{topic:32} {n:>10,}")
    return 0


def _cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from .dataset import DatasetError
    from .replay import Pace, replay

    try:
        pace = Pace(rate=args.rate, speedup=args.speedup)
        report = replay(settings, Path(args.dataset_dir), pace, limit=args.limit, progress=not args.quiet)
    except (DatasetError, ValueError) as exc:
        print(f"freshrec replay: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.delivery.failed == 0 else 1


def _cmd_produce(args: argparse.Namespace, settings: Settings) -> int:
    """Send a JSON-lines file of events or catalog records through the validating producer."""
    from .producer import RecordProducer

    with RecordProducer(settings, client_id="freshrec-produce") as producer:
        send = producer.send_event if args.topic == "events" else producer.send_catalog
        with open(args.file, "rb") as fh:
            for line in fh:
                line = line.rstrip(b"\r\n")
                # An empty line separates nothing in JSON lines (a trailing newline, a
                # blank between blocks): skipped, not a record. Any other bad line, an
                # oversize one included, goes to dead-letter and the loop goes on.
                if line:
                    send(line)
        report = producer.flush()
    print(f"sent {report.sent}, rejected {report.rejected} (to dead-letter), confirmed {report.confirmed}, failed {report.failed}")
    # 0: every line is on its topic or in dead-letter; 1: some may be lost (failed or unconfirmed).
    return 0 if report.failed == 0 and report.pending == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freshrec", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("up", help="start the embedded broker and Redis, create the topics").set_defaults(func=_cmd_up)
    sub.add_parser("down", help="stop what `up` started").set_defaults(func=_cmd_down)
    p = sub.add_parser("status", help="say what runs where")
    p.add_argument("--counts", action="store_true", help="also count the messages in each topic")
    p.set_defaults(func=_cmd_status)
    p = sub.add_parser("replay", help="replay a dataset folder (catalog, then events) into Kafka")
    p.add_argument("dataset_dir", help="folder with events.csv[.gz] and items.csv")
    p.add_argument("--rate", type=float, help="events per second")
    p.add_argument("--speedup", type=float, help="times real time, by event timestamps")
    p.add_argument("--limit", type=int, help="send at most this many events")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_replay)
    p = sub.add_parser("produce", help="send a JSON-lines file through the validating producer")
    p.add_argument("file")
    p.add_argument("--topic", choices=["events", "catalog"], default="events")
    p.set_defaults(func=_cmd_produce)
    for name, (_module, help_text) in COMPONENT_COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = Settings()
    if argv and argv[0] in COMPONENT_COMMANDS:
        module = importlib.import_module(COMPONENT_COMMANDS[argv[0]][0])
        return int(module.main(argv[1:], settings) or 0)
    args = build_parser().parse_args(argv)
    return int(args.func(args, settings) or 0)


if __name__ == "__main__":
    sys.exit(main())
