"""``freshrec index``: follow changed items and publish item vectors, or build a whole index.

    freshrec index                                  # follow changed-items, publish item-vectors
    freshrec index --version v0003                  # start on that adapter instead of the latest
    freshrec index --build v0003 --out idx/v0003    # encode the catalog into a snapshot, then exit
    freshrec index --build base --out idx/base --items freshrec/sample
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from freshrec.settings import Settings

from models.encoder import BASE_VERSION


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="freshrec index", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--version", help="adapter version to encode with (default: the registry's latest, else base)")
    p.add_argument("--no-follow-adapters", action="store_true", help="keep --version; ignore new adapter announcements")
    p.add_argument("--max-seconds", type=float, help="stop after this long (tests, demos)")
    p.add_argument("--build", metavar="VERSION", help="build a complete index for VERSION and exit")
    p.add_argument("--out", type=Path, help="with --build: snapshot folder to write")
    p.add_argument("--items", type=Path, help="with --build: dataset folder or items.csv (default: the catalog in Redis)")
    p.add_argument("--adapter-dir", type=Path, help="with --build: adapter folder (default: from the registry)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str], settings: Settings) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.build:
        if args.out is None:
            print("freshrec index: --build needs --out PATH (where to write the snapshot)", file=sys.stderr)
            return 2
        return _build(args, settings)
    return _follow(args, settings)


def _follow(args: argparse.Namespace, settings: Settings) -> int:
    from freshrec.epochs import EpochMismatch

    from .process import IndexerProcess

    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        proc = IndexerProcess(settings, version=args.version, follow_adapters=not args.no_follow_adapters)
        stats = proc.run(stop=stop, max_seconds=args.max_seconds)  # a signal ends it after the batch
    except EpochMismatch as exc:
        # One paragraph that says what happened and the fix; a traceback adds nothing.
        print(f"freshrec index: stopped, nothing was skipped. {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"freshrec index: {stats.line()}")
    return 0


def _build(args: argparse.Namespace, settings: Settings) -> int:
    from models.build import build_version_index

    try:
        adapter_dir = args.adapter_dir if args.adapter_dir is not None else _registry_dir(settings, args.build)
        items = _read_catalog(args.items, settings)
    except (OSError, ValueError) as exc:
        print(f"freshrec index --build: {exc}", file=sys.stderr)
        return 2
    if not items:
        print("freshrec index --build: the catalog is empty; nothing to index", file=sys.stderr)
        return 2
    index = build_version_index(settings, args.build, adapter_dir, items, progress=not args.quiet, out=args.out)
    print(f"freshrec index: {len(index)} items of version {index.version} ({index.kind}) written to {args.out}")
    return 0


def _registry_dir(settings: Settings, version: str) -> Path | None:
    if version == BASE_VERSION:
        return None
    from models.registry import AdapterRegistry, AdapterRejected

    try:
        return AdapterRegistry(Path(settings.state_dir) / "adapters").load(version)[1]
    except AdapterRejected as exc:
        raise ValueError(str(exc)) from None


def _read_catalog(path: Path | None, settings: Settings) -> dict[str, Any]:
    """Items from a dataset folder / items.csv, or else the catalog the flows keep in Redis."""
    from freshrec.contracts import CatalogItem, InvalidRecord, parse_catalog

    if path is not None:
        from freshrec.dataset import read_items

        csv_path = path / "items.csv" if path.is_dir() else path
        if not csv_path.is_file():
            raise ValueError(f"no items.csv at {path}")
        items: dict[str, Any] = {}
        for row in read_items(csv_path):
            try:
                record = parse_catalog(row)
            except InvalidRecord:
                continue  # the producer dead-letters these on replay; an index just skips them
            if isinstance(record, CatalogItem):
                items[record.item_id] = record
        return items
    import redis

    from stores import catalog_store
    from stores.redis_client import connect

    try:
        return dict(catalog_store.all_items(connect(settings), settings))
    except redis.RedisError as exc:
        raise ValueError(f"cannot read the catalog from Redis at {settings.redis_url} ({exc}); pass --items") from None
