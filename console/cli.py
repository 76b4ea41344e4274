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

from freshrec.settings import Settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# command -> (module with `main(argv, settings) -> int`, one-line help)
COMPONENT_COMMANDS: dict[str, tuple[str, str]] = {
    "stream": ("streams.cli", "run a Bytewax dataflow: `stream users`, `stream catalog` or `stream collab`"),
    "index": ("indexer.cli", "encode changed items and publish item vectors"),
    "serve": ("serving.cli", "run the recommend/search/similar API"),
    "collect": ("collector.cli", "run the HTTP event collector (POST /events) for producers without Kafka"),
    "monitor": ("monitor.cli", "serve the flows' progress (lag, freshness, topic sizes) on a Prometheus /metrics"),
    "learn": ("learner.cli", "train and publish LoRA adapters (from train pairs) and rankers (from rank examples)"),
    "eval": ("evaluation.cli", "prequential next-basket evaluation on a dataset"),
    "demo": ("console.demo", "start everything and replay the bundled sample"),
}


UP_HELP = (
    "start the embedded broker and Redis, create the topics. The broker keeps topics in memory, so every "
    "`up` starts new, empty topics, and `up` therefore starts from a clean slate: it runs `freshrec reset` "
    "(flow snapshots, learner and indexer positions, freshrec's Redis keys, in a reused Redis too; the "
    "adapter and ranker registries stay) and prints what it cleared. With "
    "FRESHREC_REDIS_URL=redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002 it starts a Redis Cluster "
    "of those masters (memory only) instead of one Redis"
)
COUNTS_NOTE = (
    "note: the embedded broker (Tansu) under-reports end offsets (README, \"Known broker quirk\"), "
    "so these counts are a lower bound there; exact on Apache Kafka"
)


def _cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from freshrec.infra import InfraError, start_stack
    from freshrec.reset import safe_url

    try:
        stack = start_stack(settings)
    except InfraError as exc:
        print(f"freshrec up: {exc}", file=sys.stderr)
        return 1
    cleared = stack.cleared
    keys = f"cleared {cleared.redis_keys:,} keys under {settings.redis_prefix!r}" if cleared else "nothing cleared"
    if stack.redis_cluster:
        owner = f"Redis Cluster of {len(stack.redis_cluster)} masters, pids {', '.join(str(n.pid) for n in stack.redis_cluster)}, in memory: {keys}"
    elif stack.redis.pid is None:
        owner = f"already running, reused: {keys}"
    elif stack.redis_kept:
        owner = f"pid {stack.redis.pid}, left running by the previous `up`, reused: {keys}"
    else:
        owner = f"pid {stack.redis.pid}, AOF in {settings.state_dir / 'redis'}: {keys}"
    print(f"kafka  {stack.bootstrap}  (Tansu, pid {stack.kafka.pid}, {len(stack.topics)} new topics x "
          f"{settings.partitions} partitions, in memory)")
    print(f"redis  {safe_url(stack.redis_url)}  ({owner})")
    if cleared is not None:
        what = [str(p) for p in cleared.paths]
        print("clean slate for the new topics: "
              + (f"removed {', '.join(what)}" if what else "no stored positions in " + str(settings.state_dir)))
    return 0


def _cmd_topics(args: argparse.Namespace, settings: Settings) -> int:
    from freshrec.topics import TopicError, ensure_topics

    try:
        report = ensure_topics(settings, args.replication_factor, args.timeout)
    except TopicError as exc:
        print(f"freshrec topics: {exc}", file=sys.stderr)
        return 1
    for name in report.created:
        print(f"created {name} ({settings.partitions} partitions, replication factor {args.replication_factor})")
    for name, n in report.existing.items():
        print(f"exists  {name} ({n} partitions)")
    mismatched = report.mismatched(settings.partitions)
    if mismatched:
        print(
            f"freshrec topics: {', '.join(f'{t} has {n}' for t, n in mismatched.items())} partitions, not "
            f"FRESHREC_PARTITIONS={settings.partitions}: set FRESHREC_PARTITIONS to the topics' count in every process",
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    from freshrec.infra import stop_stack

    lines = stop_stack(settings.state_dir)
    if not lines:
        print(f"nothing to stop: no freshrec services are recorded in {settings.state_dir}")
    for line in lines:
        print(line)
    return 0


def _cmd_reset(args: argparse.Namespace, settings: Settings) -> int:
    """Remove every stored position and freshrec's Redis keys, after showing what will go."""
    from freshrec.reset import ResetError, plan_reset, reset

    try:
        plan = plan_reset(settings, everything=args.all)
        if plan.empty:
            print(f"nothing to reset: no stored positions in {settings.state_dir}, no Redis keys under "
                  f"{settings.redis_prefix!r}")
            return 0
        if not args.yes:
            print("freshrec reset will remove (stop the flows, learner and indexer first):")
            for line in plan.lines():
                print(f"  {line}")
            if not args.all:
                print("  (the adapter and ranker registries stay; --all removes them too)")
            if not _confirm("proceed? [y/N] "):
                print("freshrec reset: nothing removed (pass --yes to skip this question)", file=sys.stderr)
                return 1
        report = reset(settings, everything=args.all)
    except ResetError as exc:
        print(f"freshrec reset: {exc}", file=sys.stderr)
        return 1
    for line in report.lines():
        print(f"removed {line}")
    return 0


def _confirm(prompt: str) -> bool:
    try:
        return input(prompt).strip().lower() in {"y", "yes"}
    except EOFError:  # no terminal: never assume yes
        print()
        return False


def _cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from freshrec.infra import describe_stack

    lines = describe_stack(settings.state_dir)
    if not lines:
        print(f"not up: nothing recorded in {settings.state_dir} (run `freshrec up`)")
        return 1
    print("\n".join(lines))
    if args.counts:
        from freshrec.consumer import topic_counts

        for topic, n in topic_counts(settings).items():
            print(f"{topic:32} {n:>10,}")
        print(COUNTS_NOTE)
    return 0


def _cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from freshrec.dataset import DatasetError
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
    from freshrec.producer import RecordProducer

    try:
        fh = open(args.file, "rb")  # before connecting: a wrong path is the user's typo, not a broker problem
    except OSError as exc:
        print(f"freshrec produce: cannot read {args.file}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    with RecordProducer(settings, client_id="freshrec-produce") as producer:
        send = producer.send_event if args.topic == "events" else producer.send_catalog
        with fh:
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
    sub.add_parser(
        "up", help="start the embedded broker and Redis on new topics, from a clean slate (see `up --help`)",
        description=UP_HELP,
    ).set_defaults(func=_cmd_up)
    sub.add_parser("down", help="stop what `up` started").set_defaults(func=_cmd_down)
    p = sub.add_parser(
        "topics",
        help="create the missing topics on an existing Kafka (names and partitions from the settings)",
        description="Create every topic of FRESHREC_TOPIC_PREFIX that is missing, with FRESHREC_PARTITIONS "
        "partitions, through the FRESHREC_KAFKA_* security settings; existing topics stay as they are, and a "
        "partition count other than FRESHREC_PARTITIONS exits 1 naming them.",
    )
    p.add_argument("--replication-factor", type=int, default=1, help="replicas per partition (default 1)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the broker (default 60)")
    p.set_defaults(func=_cmd_topics)
    p = sub.add_parser(
        "reset",
        help="forget every stored Kafka position: the fix for a topic-epoch mismatch",
        description="Remove the flows' recovery snapshots (state_dir/streams/*: users, catalog, collab), the "
        "learner's checkpoints, the ranker's included (state_dir/learner), the indexer's offsets (state_dir/indexer) "
        "and every Redis key under FRESHREC_REDIS_PREFIX (SCAN + UNLINK, never FLUSHDB), so every consumer starts "
        "over from the topics' beginning. Stop the flows, learner and indexer first. The adapter and ranker "
        "registries stay.",
    )
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--all", action="store_true",
                   help="also remove the adapter and ranker registries and the adapters' ONNX exports")
    p.set_defaults(func=_cmd_reset)
    p = sub.add_parser(
        "status",
        help="say what runs where; with --counts, messages per topic (a lower bound on the embedded broker, "
        "which under-reports end offsets)",
        description="Say what runs where, and whether it answers. --counts adds the messages per topic, read from "
        "end offsets: a lower bound on the embedded Tansu broker, which under-reports them (README, "
        '"Known broker quirk"); exact on Apache Kafka.',
    )
    p.add_argument(
        "--counts", action="store_true",
        help="also count the messages in each topic (from end offsets: a lower bound on the embedded Tansu broker)",
    )
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
