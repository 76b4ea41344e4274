"""Redis connection and server-side scripts shared by the two stores of this package."""

from __future__ import annotations

from typing import Any

import redis
from redis.exceptions import NoScriptError

from freshrec.settings import Settings


def connect(settings: Settings) -> redis.Redis:
    """A client for ``settings.redis_url`` (bytes in, bytes out)."""
    return redis.Redis.from_url(settings.redis_url, decode_responses=False)


def run_script(client: redis.Redis, script: str, sha: str, keys: list[str], args: list[Any]) -> Any:
    """EVALSHA, loading the script on first use (saves resending it with every batch)."""
    try:
        return client.evalsha(sha, len(keys), *keys, *args)
    except NoScriptError:
        return client.eval(script, len(keys), *keys, *args)
