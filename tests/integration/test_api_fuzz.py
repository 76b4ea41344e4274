"""Fuzz every operation of the HTTP API from its own OpenAPI schema (schemathesis).

Issue 13 item 7: 0 server errors, and answers that conform to the schema (status codes,
content types, bodies). The app is the real one (``create_app`` over a
``ServingRuntime``) on the session's real Tansu broker and Redis, with a small catalog
and one shopper seeded. Only the encoder is the toy :class:`serving.testing.HashEncoder`
(over the real registry, Redis catalog and ``LiveIndex``): the int8 ONNX export would
cost a minute of this test's budget and the fuzz is about the HTTP layer, not the
vectors. Both tokens are sent so the fuzz reaches the handlers behind them (the auth
answers are tested on their own in tests/unit/test_serving_edges.py).

Generated data is both schema-valid (positive) and schema-violating (negative), with a
fixed seed (``derandomize``), ``FUZZ_EXAMPLES`` per operation and mode, plus the
schema's own examples. Schemathesis drives Hypothesis directly here, not through its
pytest plugin (``schema.parametrize`` reads ``node._nodeid``, which pytest 9 removed).
The figures are printed at the end (``fuzz: N cases ...``).
"""

from __future__ import annotations

import collections
import dataclasses
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="the API fuzz needs the test extra: pip install -e '.[test]'")

from hypothesis import HealthCheck, given  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from freshrec.contracts import CatalogItem, Event  # noqa: E402
from freshrec.infra import Stack, create_topics  # noqa: E402
from freshrec.settings import Settings  # noqa: E402
from serving.app import create_app  # noqa: E402
from serving.runtime import ServingRuntime, redis_client  # noqa: E402
from serving.swap import default_tools  # noqa: E402
from serving.testing import HashEncoder  # noqa: E402
from tests.integration.helpers import seed_catalog  # noqa: E402

pytestmark = pytest.mark.integration

FUZZ_EXAMPLES = 40
ADMIN_TOKEN = "fuzz-admin"
USERS_TOKEN = "fuzz-users"
SHOPPER = "17841"  # the schema's example user id
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]

RESULTS: collections.Counter[tuple[str, int]] = collections.Counter()


def _tools(settings: Settings, redis: Any) -> Any:
    """The real registry and Redis catalog; :class:`HashEncoder` instead of the ONNX export."""
    from models.live_index import LiveIndex

    def build(encoder: Any, items: dict[str, Any], version: str, progress: Any) -> Any:
        index = LiveIndex(encoder.dim, version)
        ids = sorted(items)
        if ids:
            index.upsert(ids, encoder.encode([items[i].text() for i in ids]))
        progress(len(ids), len(ids))
        return index

    real = default_tools(settings, redis)
    return dataclasses.replace(real, make_encoder=lambda version, path: HashEncoder(version, 32), build_index=build)


def _seed_shopper(settings: Settings, items: list[str]) -> None:
    from ranking.user_state import StateRules, UserState, apply_event
    from stores.user_store import connect, write_partition_batch, write_user_states

    client = connect(settings)
    state = UserState(SHOPPER)
    t = 1_300_000_000.0
    for n, item in enumerate(items[:6]):
        event = Event(event_id=f"fuzz-{n}", user_id=SHOPPER, kind="purchase", item_id=item, ts=t + n * 3600)
        apply_event(state, event, StateRules.from_settings(settings))
    write_user_states(client, settings, [state])
    popularity = {item: (float(10 - n), t) for n, item in enumerate(items[:10])}
    write_partition_batch(client, settings, settings.topics.events, 0, 1, {}, popularity, t, {i: t for i in items[:10]})


@pytest.fixture(scope="module")
def fuzz_app(stack: Stack, tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> Iterator[Any]:
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        kafka_bootstrap=stack.bootstrap,
        redis_url=stack.redis_url,
        topic_prefix=f"fz{tag}.",
        redis_prefix=f"fz{tag}:",
        state_dir=tmp_path_factory.mktemp("fuzz") / "state",
        partitions=4,
        admin_token=ADMIN_TOKEN,
        users_token=USERS_TOKEN,
        serve_version="base",
        auto_activate=False,
        popularity_refresh_s=0.5,
    )
    create_topics(stack.bootstrap, settings.topics.all(), settings.partitions)
    items = seed_catalog(settings, sample_dir, 60)
    from stores import catalog_store
    from stores.user_store import connect

    catalog_store.write_items(connect(settings), settings, [CatalogItem(item_id="85123A", title="WHITE HANGING HEART T-LIGHT HOLDER")])
    _seed_shopper(settings, list(items))
    runtime = ServingRuntime(settings, tools=_tools(settings, redis_client(settings, 5.0)))
    app = create_app(runtime, manage_runtime=False)
    runtime.start()
    try:
        assert runtime.wait_ready(60), "the first pair never went live"
        assert runtime.popularity.loaded.wait(10)
        yield app
    finally:
        runtime.stop()


def _operations(schema: Any) -> list[Any]:
    return [result.ok() for result in schema.get_all_operations()]


def _fuzz(operation: Any, strategy: Any, examples: int, failures: list[str], negative: bool = False) -> None:
    """Run ``examples`` cases of ``strategy`` against the app; note (not raise) a failure."""

    @given(case=strategy)
    @hypothesis_settings(
        max_examples=examples, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )
    def run(case: Any) -> None:
        token = ADMIN_TOKEN if case.path.startswith("/admin") else USERS_TOKEN
        headers = {"Authorization": f"Bearer {token}"}
        response = case.call(headers=headers)
        RESULTS[(f"{case.method.upper()} {case.path}", response.status_code)] += 1
        case.validate_response(response, checks=CHECKS, headers=headers)

    try:
        run()
    except Unsatisfiable:
        if not negative:
            failures.append(f"{operation.label}: no valid input could be generated")
        # else: an operation without parameters has no invalid input to send
    except Exception as exc:  # one report per operation and mode, after Hypothesis shrank it
        failures.append(f"{operation.label}: {type(exc).__name__}: {str(exc)[:2000]}")


def test_every_operation_answers_without_server_errors_and_as_documented(
    fuzz_app: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    schema.config.generation.update(with_security_parameters=False)
    operations = _operations(schema)
    assert len(operations) >= 11, [op.label for op in operations]
    failures: list[str] = []
    for op in operations:
        from_examples = op.get_strategies_from_examples()
        if from_examples:
            _fuzz(op, st.one_of(from_examples), 5, failures)
        _fuzz(op, op.as_strategy(generation_mode=GenerationMode.POSITIVE), FUZZ_EXAMPLES, failures)
        _fuzz(op, op.as_strategy(generation_mode=GenerationMode.NEGATIVE), FUZZ_EXAMPLES, failures, negative=True)

    total = sum(RESULTS.values())
    statuses: collections.Counter[int] = collections.Counter()
    for (_, status), n in RESULTS.items():
        statuses[status] += n
    line = f"fuzz: {total} cases over {len(operations)} operations; statuses " + ", ".join(
        f"{s}: {n}" for s, n in sorted(statuses.items())
    )
    per_op: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for (op_label, status), n in RESULTS.items():
        per_op[op_label][status] += n
    table = "\n".join(
        f"  {label:<42} {sum(c.values()):>4}  " + ", ".join(f"{s}: {n}" for s, n in sorted(c.items()))
        for label, c in sorted(per_op.items())
    )
    with capsys.disabled():  # the figures are the point: shown without -s
        print("\n" + line + "\n" + table)
    assert not failures, line + "\n\n" + "\n\n".join(failures)
    assert not any(status >= 500 for status in statuses), line
    assert {op for op, _ in RESULTS} >= {f"{op.method.upper()} {op.path}" for op in operations}, "an operation was never called"
