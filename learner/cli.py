"""``freshrec learn``: train and publish LoRA adapters from the train-pairs topic (and rankers from rank-examples).

Settings come from ``FRESHREC_*`` (batch size, flush seconds, eval window and cadence,
margin, learning rate, LoRA rank: see ``freshrec.settings``). The catalog used to fill
missing target texts and to evaluate comes from Redis (what the catalog flow keeps),
or from a dataset's ``items.csv`` with ``--catalog-dir``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

from freshrec.contracts import CatalogItem
from freshrec.epochs import EpochMismatch
from freshrec.settings import Settings

from .loop import CatalogSource, Learner


def _redis_catalog(settings: Settings) -> CatalogSource:
    from stores.catalog_store import all_items
    from stores.redis_client import connect

    client = connect(settings)

    def read() -> Mapping[str, CatalogItem]:
        try:
            return all_items(client, settings)
        except Exception as exc:  # noqa: BLE001 - Redis down: keep training, evaluate later
            logging.getLogger("freshrec.learner").warning("catalog unavailable from Redis: %s", exc)
            return {}

    return read


def file_catalog(dataset_dir: Path) -> CatalogSource:
    """The catalog of a dataset folder's items.csv (read once; invalid rows left out)."""
    from freshrec.contracts import InvalidRecord, parse_catalog
    from freshrec.dataset import locate, read_items

    files = locate(dataset_dir)
    if files.items is None:
        raise FileNotFoundError(f"{dataset_dir} has no items.csv")
    items: dict[str, CatalogItem] = {}
    for raw in read_items(files.items):
        try:
            record = parse_catalog(raw)
        except InvalidRecord:
            continue
        if isinstance(record, CatalogItem):
            items[record.item_id] = record
    return lambda: items


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="freshrec learn", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--catalog-dir", type=Path, help="read the catalog from this dataset folder instead of Redis")
    p.add_argument("--device", help="cpu or cuda (default: settings.device, auto = CUDA when present)")
    p.add_argument("--max-pairs", type=int, help="exit after training this many pairs in total")
    p.add_argument("--idle-exit", type=float, metavar="SECONDS", help="exit when nothing arrives for this long")
    p.add_argument("--quiet", action="store_true", help="log warnings only")
    return p


def main(argv: list[str], settings: Settings) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO is per-connection chatter
    try:
        catalog = file_catalog(args.catalog_dir) if args.catalog_dir else _redis_catalog(settings)
    except FileNotFoundError as exc:
        print(f"freshrec learn: {exc}", file=sys.stderr)
        return 2
    try:
        learner = Learner(settings, catalog, device=args.device)
    except EpochMismatch as exc:
        # One paragraph that says what happened and the fix; a traceback adds nothing.
        print(f"freshrec learn: stopped, nothing was skipped. {exc}", file=sys.stderr)
        return 1
    learner.install_signal_handlers()
    try:
        summary = learner.run(max_pairs=args.max_pairs, idle_exit_s=args.idle_exit)
    finally:
        learner.close()
    print(
        f"learner: {summary.pairs_trained} pairs trained in {summary.steps} steps, "
        f"published {', '.join(summary.published) or 'nothing'} ({summary.reason})"
    )
    if learner.ranker is not None:
        r = learner.ranker.state
        print(f"ranker: {r.consumed} examples consumed, {r.updates} updates, "
              f"published {', '.join(r.published) or 'nothing'}")
    return 0
