"""Schemathesis fuzzing of every operation in a live server's /openapi.json (/api/v1 with extension management,
/sdapi/v1, an extension's own route): never a 5xx; and the bodies that once gave 500s, as fixed cases.
Must not import webui (the server is a separate process); needs schemathesis (the `test` extra)."""

from __future__ import annotations

import collections
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.control import SkipTest

from tests.api.conftest import ApiServer, data_dir_with_models, start_server, stop_server
from tests.fixtures.extension_repos import make_repo, stamp_extension

# Bounded so that the whole file stays within a few minutes on a 2-core machine with the tiny model.
POSITIVE_EXAMPLES_PER_OPERATION = 50
NEGATIVE_EXAMPLES_PER_OPERATION = 30
# A slow answer is no failure here; a hanging one is (the load route waits at most its clamped timeout).
REQUEST_TIMEOUT_SECONDS = 60.0
# Every route but the schema and its viewer (the `stamp` extension adds /stamp/version).
FUZZED_PATHS = r"^/(?!docs|openapi)"
# A1111's --api-server-stop routes would end the server under test.
NEVER_FUZZED_PATHS = r"/server-(kill|stop|restart)"
# Generation routes get only valid input: an "invalid" 1000-step request is still within the server's real
# limits and would run for minutes. Their bad-input handling is covered by test_jobs.py and the sdapi tests.
GENERATING_PATHS = r"^/api/v1/jobs$|2img"

# The server's own limits allow jobs of minutes; the fuzzer gets a schema clamped to tiny jobs. The key is
# matched against every property and query parameter name, wherever it appears in the schema.
CLAMPED_MAXIMUMS: tuple[tuple[re.Pattern[str], float], ...] = (
    (re.compile(r"(^|_)steps$"), 2),
    (re.compile(r"(^|_)(width|height|resize_x|resize_y)$|^seed_resize_from_[hw]$"), 64),
    (re.compile(r"^(batch_size|batch_count|n_iter)$"), 1),
    (re.compile(r"^hr_scale$"), 1),
    (re.compile(r"^timeout$"), 5),
)

# (method, path template, status) of every request sent, for the summary at the end.
requests_made: list[tuple[str, str, int]] = []


def clamp_number_schema(schema: object, maximum: float) -> None:
    if not isinstance(schema, dict):
        return
    for key in ("anyOf", "oneOf", "allOf"):
        for member in schema.get(key, []):
            clamp_number_schema(member, maximum)
    if schema.get("type") in ("integer", "number"):
        minimum = schema.get("minimum", schema.get("exclusiveMinimum", maximum))
        schema["maximum"] = max(min(schema.get("maximum", maximum), maximum), minimum)
        schema.pop("exclusiveMaximum", None)
        default = schema.get("default")
        if isinstance(default, (int, float)) and default > schema["maximum"]:
            schema["default"] = schema["maximum"]


def clamped_maximum(name: str) -> float | None:
    for pattern, maximum in CLAMPED_MAXIMUMS:
        if pattern.search(name):
            return maximum
    return None


def clamp_generation_limits(node: object) -> None:
    """Walks the whole OpenAPI document, clamping body properties and parameters named in CLAMPED_MAXIMUMS.

    Clamped ones are also made required: a value left out means the server's default (A1111's is 50 steps
    at 512x512), which is exactly what must not run hundreds of times here.
    """
    if isinstance(node, dict):
        properties = node.get("properties")
        if isinstance(properties, dict):
            for name, property_schema in properties.items():
                maximum = clamped_maximum(name)
                if maximum is not None:
                    clamp_number_schema(property_schema, maximum)
                    node["required"] = sorted({*node.get("required", []), name})
        if isinstance(node.get("name"), str) and node.get("in") in ("query", "path") and "schema" in node:
            maximum = clamped_maximum(node["name"])
            if maximum is not None:
                clamp_number_schema(node["schema"], maximum)
                node["required"] = True
        for value in node.values():
            clamp_generation_limits(value)
    elif isinstance(node, list):
        for item in node:
            clamp_generation_limits(item)


def fuzz_schema(server: ApiServer, mode: GenerationMode, max_examples: int) -> schemathesis.BaseSchema:
    with urllib.request.urlopen(f"{server.url}/openapi.json", timeout=30) as response:
        document = json.load(response)
    clamp_generation_limits(document)
    schema = schemathesis.openapi.from_dict(document)
    schema.config.update(base_url=server.url, request_timeout=REQUEST_TIMEOUT_SECONDS)
    schema.config.generation.update(modes=[mode], max_examples=max_examples)
    schema = schema.include(path_regex=FUZZED_PATHS).exclude(path_regex=NEVER_FUZZED_PATHS)
    if mode is GenerationMode.NEGATIVE:
        schema = schema.exclude(path_regex=GENERATING_PATHS)
    return schema


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ApiServer]:
    """A server of its own: fuzzed option and model changes must not leak into the other API tests. The `stamp`
    extension is enabled, so an extension's own route is fuzzed too."""
    data_dir = data_dir_with_models(tmp_path_factory.mktemp("api-fuzz-data"), tiny_model_dir)
    make_repo(data_dir / "extensions" / "stamp", stamp_extension("v1"))
    (data_dir / "extensions.json").write_text(json.dumps({"enabled": ["stamp"]}))
    server = start_server(data_dir, [], data_dir / "server.log")
    yield server
    stop_server(server)


FUZZ_SETTINGS = dict(
    deadline=None,
    # Shrinking a failure would replay it hundreds of times; the first failing example is reported as is.
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
    suppress_health_check=list(hypothesis.HealthCheck),
    database=None,
)


def call_and_check(case: schemathesis.Case) -> None:
    response = case.call()
    requests_made.append((case.method, case.path, response.status_code))
    case.validate_response(response, checks=[not_a_server_error])


def fuzz_operation(operation: schemathesis.APIOperation, mode: GenerationMode, max_examples: int) -> None:
    @hypothesis.settings(max_examples=max_examples, **FUZZ_SETTINGS)  # type: ignore[arg-type]
    @hypothesis.given(operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        call_and_check(case)

    run()


# Schemathesis' own pytest integration (schemathesis.pytest.from_fixture) needs pytest internals that pytest 9
# no longer has, so each operation gets a plain Hypothesis test through the Python API instead.
@pytest.mark.parametrize(("mode", "max_examples"), [
    (GenerationMode.POSITIVE, POSITIVE_EXAMPLES_PER_OPERATION),
    (GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES_PER_OPERATION),
], ids=["positive", "negative"])
def test_no_input_gives_a_server_error(fuzz_server: ApiServer, mode: GenerationMode, max_examples: int) -> None:
    schema = fuzz_schema(fuzz_server, mode, max_examples)
    failures: list[str] = []
    fuzzed: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        fuzzed.append(operation.label)
        # Every operation is fuzzed even after a failure, so one run reports them all.
        try:
            fuzz_operation(operation, mode, max_examples)
        except SkipTest:
            # Negative mode only: an operation whose every input is optional (or that has none) may draw a
            # case with nothing invalid in it, and schemathesis then ends that operation's run.
            continue
        except (Exception, BaseExceptionGroup) as error:  # noqa: BLE001 - collected and reported below
            # Schemathesis reports check failures as a BaseExceptionGroup, which `except Exception` misses.
            failures.append(f"{operation.label}: {type(error).__name__}: {error}")
    expected = ["POST /api/v1/extensions/install", "POST /api/v1/extensions/index", "GET /stamp/version",
                "POST /api/v1/extensions/{name}/enable", "DELETE /api/v1/extensions/{name}", "POST /sdapi/v1/options"]
    if mode is GenerationMode.POSITIVE:
        expected.append("POST /api/v1/jobs")
    assert not set(expected) - set(fuzzed), (set(expected) - set(fuzzed), fuzzed)
    assert not failures, "\n\n".join(failures)


# Bodies a hostile client sent that once answered a 500 (some a plain-text one). Python's json writes NaN and
# Infinity as the bare words, which Python's (and FastAPI's) parser reads back.
FIXED_CASES = [
    ("/sdapi/v1/options", {"samples_filename_pattern": "\udc80"}, "samples_filename_pattern"),
    ("/sdapi/v1/options", {"filename_pattern": "\udc80"}, "filename_pattern"),
    ("/api/v1/extensions/install", {"url": float("nan")}, "url"),
    ("/api/v1/extensions/install", {"url": "\udc80"}, "url"),
    ("/api/v1/extensions/install", {"url": "https://example.invalid/x.git", "branch": float("inf")}, "branch"),
    ("/api/v1/extensions/install", {"url": "https://example.invalid/x.git", "extra": float("nan")}, "extra"),
    ("/api/v1/extensions/wildcards/enable", {"install_requirements": float("nan")}, "install_requirements"),
    ("/api/v1/extensions/index", {"url": float("nan")}, "url"),
]


@pytest.mark.parametrize(("path", "body", "field"), FIXED_CASES, ids=[f"{p} {f}" for p, _, f in FIXED_CASES])
def test_bodies_that_once_gave_500s_answer_a_json_4xx_naming_the_field(
    fuzz_server: ApiServer, path: str, body: dict[str, object], field: str,
) -> None:
    config = fuzz_server.data_dir / "config.json"
    config_before = config.read_bytes() if config.exists() else None
    request = urllib.request.Request(f"{fuzz_server.url}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SECONDS) as response:
            status, answer, content_type = response.status, response.read(), response.headers["content-type"]
    except urllib.error.HTTPError as error:
        status, answer, content_type = error.code, error.read(), error.headers["content-type"]
    requests_made.append(("POST", path, status))
    assert status == 422 and content_type.startswith("application/json"), (status, answer[:300])
    assert field in json.dumps(json.loads(answer)), answer[:300]
    assert (config.read_bytes() if config.exists() else None) == config_before


def test_fuzzing_made_requests() -> None:
    per_operation = collections.Counter(f"{method} {path}" for method, path, _ in requests_made)
    per_status = collections.Counter(status for _, _, status in requests_made)
    print(f"\nfuzzing: {len(requests_made)} requests over {len(per_operation)} operations; "
          f"statuses {dict(sorted(per_status.items()))}")
    for operation, count in sorted(per_operation.items()):
        print(f"  {count:4d}  {operation}")
    assert len(requests_made) > 0
