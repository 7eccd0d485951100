"""`vlsearch keys create|list|revoke`: a key printed once, records without secrets, one-line errors.

The installed console script is run for what only a real process shows (the secret alone on stdout, errors on
stderr, exit statuses); the rest goes through Typer's runner in this process, since every start of the script
imports the models' libraries (seconds each).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from core.keys import KeyStore
from core.settings import Settings

VLSEARCH = str(Path(sys.executable).parent / "vlsearch")  # the installed console script


def script_env(data_dir: Path) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("VLSEARCH_")}
    return {**env, "VLSEARCH_DATA_DIR": str(data_dir)}


def start(data_dir: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [VLSEARCH, *args], env=script_env(data_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, errors = process.communicate(timeout=120)
    return process.returncode, out, errors


def store_on(data_dir: Path) -> KeyStore:
    return KeyStore.from_settings(Settings(data_dir=data_dir))


@pytest.mark.slow  # starts the script: each start imports torch and open_clip
def test_the_script_prints_a_new_key_once_and_errors_on_one_line(tmp_path: Path) -> None:
    # Three independent runs at once: each start of the script costs seconds.
    creating = start(tmp_path / "a", "keys", "create", "--scopes", "read", "--name", "web")
    bad_scope = start(tmp_path / "b", "keys", "create", "--scopes", "read,admin")
    unknown = start(tmp_path / "c", "keys", "revoke", "nope")

    code, out, errors = finish(creating)
    assert code == 0, errors
    secret = out.strip()
    assert out == secret + "\n" and secret.startswith("vls_")  # the secret alone on stdout
    key = store_on(tmp_path / "a").authenticate(secret)
    assert key is not None and key.name == "web" and key.scopes == ("read",)
    assert key.id in errors and "not shown again" in errors and secret not in errors
    assert secret not in (tmp_path / "a" / "api_keys.json").read_text()

    for process, message in ((bad_scope, "'admin'"), (unknown, "no API key with id or name 'nope'")):
        code, out, errors = finish(process)
        lines = errors.strip().splitlines()
        assert code == 1 and out == ""
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], errors
    assert not (tmp_path / "b" / "api_keys.json").exists()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str | None]:
    return {"VLSEARCH_DATA_DIR": str(tmp_path / "data"), "VLSEARCH_API_KEYS": None}


def invoke(env: dict[str, str | None], *args: str, code: int = 0) -> tuple[str, str]:
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == code, result.output
    return result.stdout, result.stderr


def test_create_json_list_and_revoke(env: dict[str, str | None], tmp_path: Path) -> None:
    out, _ = invoke(env, "keys", "create", "--scopes", "write", "--collections", "a,b", "--name", "ci", "--json")
    created = json.loads(out)
    assert created["name"] == "ci" and created["scopes"] == ["read", "write"] and created["collections"] == ["a", "b"]
    store = store_on(tmp_path / "data")
    key = store.authenticate(created["key"])
    assert key is not None and key.id == created["id"] and key.may_access("a") and not key.may_access("c")

    listed = json.loads(invoke(env, "keys", "list", "--json")[0])
    assert [row["id"] for row in listed] == [created["id"]]
    assert "key" not in listed[0] and created["key"] not in json.dumps(listed) and key.sha256 not in json.dumps(listed)

    table, _ = invoke(env, "keys", "list")
    header, row = table.splitlines()
    assert header.split()[:5] == ["id", "name", "scopes", "collections", "created"]
    assert row.split()[:4] == [created["id"], "ci", "read,write", "a,b"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", " ".join(row.split()[4:6])), row
    assert created["key"] not in table

    out, _ = invoke(env, "keys", "revoke", "ci")
    assert created["id"] in out
    assert store.authenticate(created["key"]) is None
    assert json.loads(invoke(env, "keys", "list", "--json")[0]) == []
    _, errors = invoke(env, "keys", "revoke", created["id"], code=1)
    assert "no API key" in errors


def test_a_taken_name_is_refused(env: dict[str, str | None]) -> None:
    invoke(env, "keys", "create", "--scopes", "read", "--name", "web")
    _, errors = invoke(env, "keys", "create", "--scopes", "read", "--name", "web", code=1)
    assert "'web' exists already" in errors


def test_list_shows_keys_of_the_setting(env: dict[str, str | None]) -> None:
    env = {**env, "VLSEARCH_API_KEYS": json.dumps([{"key": "env-secret", "scopes": ["read"], "name": "from-env"}])}
    table, _ = invoke(env, "keys", "list")
    assert "from-env" in table and "env" in table.splitlines()[1].split() and "env-secret" not in table
    _, errors = invoke(env, "keys", "revoke", "from-env", code=1)
    assert "VLSEARCH_API_KEYS" in errors
    broken = {**env, "VLSEARCH_API_KEYS": "not json"}
    _, errors = invoke(broken, "keys", "list", code=1)
    assert "VLSEARCH_API_KEYS" in errors and len(errors.strip().splitlines()) == 1
