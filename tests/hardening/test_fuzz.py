"""Fuzzing the HTTP API: schemathesis (4.x) against a real `vlsearch serve`, every operation of its OpenAPI schema,
with a write key, a fixed seed and a bounded number of examples per operation; no server error, and no answer that
breaks the schema (status code, content type, headers, body).

The command runs as CI runs it (`st run`, printed with its counts). The server has its own copy of a small data dir,
so deletes and new collections cost nothing; the write key goes in both headers the schema declares, else
schemathesis fills the other with a made-up key, which is (rightly) a 401.

Two of schemathesis' checks stay off, for what the schema cannot say:
- positive_data_acceptance: a request the schema allows may still be refused by a rule no JSON Schema states (one of
  text or an image; a model this server serves; a file on the server), and a form field the schema marks nullable
  cannot be sent as null in multipart;
- use_after_free: `DELETE /v1/jobs/{id}` cancels a job, whose record stays readable (state `cancelled`).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from core.keys import KeyStore
from core.service import Service
from models.shapes_world import generate_scenes, write_collection
from tests.api.conftest import Server, model_settings, start_server, stop_server

ST = str(Path(sys.executable).parent / "st")  # schemathesis' console script
REDIS_URL = "redis://127.0.0.1:6379/15"
SEED = 15
MAX_EXAMPLES = 40  # per operation and phase; about a minute on two shared cores
PHASES = "coverage,fuzzing,stateful"
EXCLUDED_CHECKS = "positive_data_acceptance,use_after_free"  # why: the module docstring


@dataclass(frozen=True)
class FuzzTarget:
    server: Server
    write_key: str
    image_ids: list[str]


def _new_keys(client: redis.Redis, before: set[bytes]) -> None:
    """Removes what this module's server wrote to Redis: the keys that were not there before (jobs, their queues)."""
    for key in set(client.scan_iter("*")) - before:
        if job := re.fullmatch(rb"vlsearch:job:([0-9a-f]{32})", key):
            client.zrem("vlsearch:jobs", job.group(1))
        client.delete(key)


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    """Collections `shapes` (6 scenes) and `scratch` (2: DELETE /v1/collections/{name} drops it), a read-write key,
    jobs on Redis database 15 (no worker takes them)."""
    root = tmp_path_factory.mktemp("fuzz")
    write_collection(generate_scenes("test", 6, seed=31), root / "scenes", size=64)
    write_collection(generate_scenes("test", 2, seed=32), root / "scratch", size=64)
    data_dir = root / "data"
    with Service(model_settings(data_dir)) as service:
        service.index([root / "scenes"], "shapes")
        service.index([root / "scratch"], "scratch")
        image_ids = service.point_ids("shapes")
    key = KeyStore.from_settings(model_settings(data_dir)).create("read,write", name="fuzzer").secret
    client = redis.Redis.from_url(REDIS_URL)
    before = set(client.scan_iter("*"))
    server = start_server(data_dir, root / "server.log", redis_url=REDIS_URL, max_upload_bytes=str(1024 * 1024))
    try:
        yield FuzzTarget(server, key, image_ids)
    finally:
        stop_server(server)
        _new_keys(client, before)
        client.close()


def schemathesis_config(target: FuzzTarget) -> str:
    """schemathesis.toml: the key, 413 as a fair refusal of data the schema forbids (a body over the upload limit),
    and real names and ids half the time, so that the image routes get past their 404."""
    ids = json.dumps(target.image_ids)
    bearer = f"Bearer {target.write_key}"
    return f"""
headers = {{ Authorization = "{bearer}", X-API-Key = "{target.write_key}" }}

[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]

[dictionaries.collections]
values = ["shapes"]

[dictionaries.images]
values = {ids}

[parameters]
"path.name" = {{ dictionary = "collections", probability = 0.5 }}
"path.image_id" = {{ dictionary = "images", probability = 0.5 }}
"body.collection" = {{ dictionary = "collections", probability = 0.5 }}
"body.indice_name" = {{ dictionary = "collections", probability = 0.5 }}
"body.image_id" = {{ dictionary = "images", probability = 0.5 }}
"body.ids[*]" = {{ dictionary = "images", probability = 0.5 }}

# A real name would drop `shapes` early in the run; the stateful phase would send its links' names to "scratch".
[[operations]]
include-name = "DELETE /v1/collections/{{name}}"
parameters = {{ "path.name" = "scratch" }}
phases = {{ stateful = {{ enabled = false }} }}
"""


@dataclass(frozen=True)
class Counts:
    operations: int
    generated: int
    passed: int
    failures: int  # junit: failed operations
    errors: int


def counts(output: str, junit: Path) -> Counts:
    tested = re.search(r"Tested: (\d+)", output)
    cases = re.search(r"(\d+) generated, (?:(\d+) passed)?", output)
    suite = ElementTree.parse(junit).getroot()
    suites = [suite] if suite.tag == "testsuite" else list(suite.iter("testsuite"))
    return Counts(
        operations=int(tested.group(1)) if tested else 0,
        generated=int(cases.group(1)) if cases else 0,
        passed=int(cases.group(2)) if cases and cases.group(2) else 0,
        failures=sum(int(s.get("failures", 0)) for s in suites),
        errors=sum(int(s.get("errors", 0)) for s in suites),
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_schemathesis_finds_no_server_error_and_no_answer_outside_the_schema(
    fuzz_target: FuzzTarget, tmp_path: Path
) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(schemathesis_config(fuzz_target))
    command = [
        ST, "--config-file", str(config), "--no-color",
        "run", f"{fuzz_target.server.base_url}/openapi.json",
        "--seed", str(SEED), "--max-examples", str(MAX_EXAMPLES), "--phases", PHASES,
        "--checks", "all", "--exclude-checks", EXCLUDED_CHECKS,
        "--workers", "1", "--generation-database", "none", "--request-timeout", "60",
        "--report", "junit", "--report-junit-path", str(tmp_path / "junit.xml"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=280)
    output = result.stdout + result.stderr
    found = counts(output, tmp_path / "junit.xml")
    shown = " ".join(command).replace(str(tmp_path), "$TMP").replace(fuzz_target.server.base_url, "$SERVER")
    summary = output[output.find("=== WARNINGS") if "=== WARNINGS" in output else output.find("=== SUMMARY") :]
    print(f"\n{shown}\n{found}\n{summary}")
    assert result.returncode == 0, output[-6000:] + "\n--- server log ---\n" + fuzz_target.server.log_tail()
    operations = sum(
        len(methods) for methods in httpx.get(f"{fuzz_target.server.base_url}/openapi.json").json()["paths"].values()
    )
    assert found.operations == operations and found.generated > 1000, found
    assert found.failures == 0 and found.errors == 0 and found.passed == found.generated, found
    log = fuzz_target.server.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
