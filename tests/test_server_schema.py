"""The server's own OpenAPI schema, fuzzed with schemathesis: for every endpoint a bounded, seeded number of
generated requests, valid and invalid. No answer may be a 5xx, every answer must be one the schema lists,
with the content type and body it describes, and invalid bodies must be refused."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from server_process import ServerProcess

pytestmark = pytest.mark.slow

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
OPERATIONS = [
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/v1/models"),
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/version"),
]


@pytest.fixture(scope="module")
def api_schema(smollm2_path):
    proc = ServerProcess(smollm2_path, "--max-completion-tokens", "4", "--max-n", "2", "--max-prompts", "2")
    yield schemathesis.openapi.from_url(proc.root + "/openapi.json")
    assert proc.stop() == 0
    proc.close()


def test_the_schema_lists_every_operation(api_schema):
    assert {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()} == set(OPERATIONS)


# GET endpoints take no parameters, so there is no invalid request to make of them.
CASES = [
    (m, p, mode) for m, p in OPERATIONS for mode in GenerationMode if m == "POST" or mode is GenerationMode.POSITIVE
]


@pytest.mark.parametrize("method, path, mode", CASES, ids=[f"{m} {p} {mode.value}" for m, p, mode in CASES])
def test_every_answer_matches_the_schema(api_schema, method, path, mode):
    @given(case=api_schema[path][method].as_strategy(generation_mode=mode))
    @settings(max_examples=20, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
    def fuzz(case):
        case.call_and_validate(checks=CHECKS, timeout=60)

    fuzz()
