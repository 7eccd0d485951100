"""API keys: hash-only storage, constant-time authentication, scopes and collections, the setting's format, and
the keys file shared by processes that create, revoke and read keys at once."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pydantic import SecretStr

from core.keys import (
    KEYS_FILE_NAME,
    ApiKey,
    KeyExists,
    KeyFileCorrupt,
    KeyNotFound,
    KeyStore,
    hash_secret,
    parse_scopes,
)
from core.settings import Settings
from indexer.errors import InvalidQuery, InvalidSetting

REPO = Path(__file__).resolve().parents[2]


def store_on(data_dir: Path, api_keys: object = None) -> KeyStore:
    value = None if api_keys is None else api_keys if isinstance(api_keys, str) else json.dumps(api_keys)
    return KeyStore.from_settings(Settings(data_dir=data_dir, api_keys=None if value is None else SecretStr(value)))


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return store_on(tmp_path / "data")


def test_created_key_authenticates_and_a_wrong_one_does_not(store: KeyStore) -> None:
    assert not store.configured
    created = store.create("read", name="web")
    assert created.secret.startswith("vls_") and len(created.secret) > 40
    assert store.configured
    assert store.authenticate(created.secret) == created.key
    assert store.authenticate(created.secret + "x") is None
    assert store.authenticate(created.secret[:-1]) is None
    assert store.authenticate("") is None
    other = store.create("read,write")
    assert store.authenticate(other.secret) == other.key  # each secret finds its own key
    assert other.secret != created.secret and other.key.id != created.key.id


def test_the_file_holds_only_the_hash_with_mode_0600(store: KeyStore) -> None:
    created = store.create("read,write", collections="a,b", name="ci")
    text = store.path.read_text()
    assert created.secret not in text
    assert created.secret[4:] not in text  # not even without its prefix
    assert hash_secret(created.secret) in text
    assert hashlib.sha256(created.secret.encode()).hexdigest() == created.key.sha256
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert [path.name for path in store.path.parent.iterdir() if path.name.startswith(".")] == []  # no temp left
    record = json.loads(text)["keys"][0]
    assert record == {
        "id": created.key.id,
        "name": "ci",
        "sha256": created.key.sha256,
        "scopes": ["read", "write"],
        "collections": ["a", "b"],
        "created": created.key.created,
    }
    assert abs(created.key.created - time.time()) < 60


def test_the_file_is_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        store = store_on(tmp_path / "data")
        store.create("read")
        store.create("read")  # the rewrite keeps the mode too
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.lock_path).st_mode) == 0o600


def test_list_shows_records_without_secrets_and_revoke_stops_a_key(store: KeyStore) -> None:
    first = store.create("read", name="one")
    second = store.create("write", name="two")
    assert store.list() == [first.key, second.key]
    shown = json.dumps([key.to_dict() for key in store.list()])
    assert first.secret not in shown and first.key.sha256 not in shown  # a prefix only
    assert first.key.sha256[:12] in shown

    assert store.revoke("one") == first.key  # by name
    assert store.authenticate(first.secret) is None
    assert store.revoke(second.key.id) == second.key  # by id
    assert store.authenticate(second.secret) is None
    assert store.list() == [] and not store.configured
    assert first.key.sha256 not in store.path.read_text()


def test_revoking_an_unknown_key_is_not_found(store: KeyStore) -> None:
    store.create("read", name="kept")
    with pytest.raises(KeyNotFound, match="'nope'") as caught:
        store.revoke("nope")
    assert caught.value.category == "not_found"
    assert [key.name for key in store.list()] == ["kept"]


def test_names_are_unique(store: KeyStore) -> None:
    store.create("read", name="web")
    with pytest.raises(KeyExists, match="'web'") as caught:
        store.create("write", name="web")
    assert caught.value.category == "conflict"
    assert len(store.list()) == 1


def test_write_implies_read_and_read_does_not_write(store: KeyStore) -> None:
    reader = store.create("read").key
    writer = store.create(["write"]).key
    assert reader.scopes == ("read",) and writer.scopes == ("read", "write")
    assert reader.allows("read") and not reader.allows("write")
    assert writer.allows("read") and writer.allows("write")
    assert parse_scopes(" Write , read ") == ("read", "write")


@pytest.mark.parametrize(("scopes", "message"), [("", "no scopes"), ("admin", "'admin'"), ("read,delete", "'delete'")])
def test_invalid_scopes_are_refused_clearly(store: KeyStore, scopes: str, message: str) -> None:
    with pytest.raises(InvalidQuery, match=message) as caught:
        store.create(scopes)
    assert caught.value.category == "invalid_input"
    assert "read, write or read,write" in str(caught.value)
    assert not store.path.exists()


def test_collection_limits(store: KeyStore) -> None:
    limited = store.create("read", collections="photos, scans").key
    everywhere = store.create("read").key
    assert limited.collections == ("photos", "scans")
    assert limited.may_access("photos") and limited.may_access("scans")
    assert not limited.may_access("other") and not limited.may_access("photo")
    assert everywhere.collections is None and everywhere.may_access("anything")
    with pytest.raises(InvalidQuery, match="empty collection name"):
        store.create("read", collections="a,,b")


def test_keys_from_the_setting_in_plaintext_and_sha256_form(tmp_path: Path) -> None:
    hashed_secret = "a secret that lives only in a vault"
    store = store_on(
        tmp_path / "data",
        [
            {"key": "plain-secret", "scopes": ["read"], "name": "dev"},
            {
                "sha256": hash_secret(hashed_secret).upper(),  # upper case hex is accepted too
                "scopes": ["write"],
                "collections": ["photos"],
                "name": "ingest",
            },
        ],
    )
    assert store.configured and not store.path.exists()  # the setting alone configures keys
    plain = store.authenticate("plain-secret")
    hashed = store.authenticate(hashed_secret)
    assert plain is not None and plain.name == "dev" and plain.scopes == ("read",) and plain.collections is None
    assert hashed is not None and hashed.name == "ingest" and hashed.allows("write")
    assert hashed.may_access("photos") and not hashed.may_access("other")
    assert hashed.source == "env" and hashed.sha256 == hash_secret(hashed_secret)
    assert store.authenticate(hash_secret(hashed_secret)) is None  # the hash itself is not a key
    assert store.authenticate("plain-secret ") is None
    # Ids are stable across processes (derived from the hash), so `keys list` shows the same id everywhere.
    assert store_on(tmp_path / "data", [{"key": "plain-secret", "scopes": ["read"]}]).list()[0].id == plain.id


def test_setting_keys_and_file_keys_work_together(tmp_path: Path) -> None:
    store = store_on(tmp_path / "data", [{"key": "from-env", "scopes": ["read"], "name": "env-key"}])
    created = store.create("write")
    assert [key.source for key in store.list()] == ["file", "env"]
    assert store.authenticate("from-env") is not None and store.authenticate(created.secret) == created.key
    with pytest.raises(InvalidQuery, match="VLSEARCH_API_KEYS"):
        store.revoke("env-key")  # lives in the setting, not the file
    with pytest.raises(KeyExists):
        store.create("read", name="env-key")
    assert store.authenticate("from-env") is not None


def test_the_setting_is_read_from_the_environment_and_kept_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLSEARCH_API_KEYS", json.dumps([{"key": "env-secret-123", "scopes": ["read"]}]))
    settings = Settings(data_dir=tmp_path)
    assert "env-secret-123" not in repr(settings) and "env-secret-123" not in str(settings.model_dump())
    assert KeyStore.from_settings(settings).authenticate("env-secret-123") is not None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("read-key:read", "not valid JSON"),
        ('{"key": "k", "scopes": ["read"]}', "JSON list"),
        ('["k"]', "expected an object"),
        ('[{"scopes": ["read"]}]', "exactly one of key"),
        ('[{"key": "k", "sha256": "' + "0" * 64 + '", "scopes": ["read"]}]', "exactly one of key"),
        ('[{"sha256": "abc", "scopes": ["read"]}]', "64 hex digits"),
        ('[{"key": "", "scopes": ["read"]}]', "non-empty"),
        ('[{"key": "k"}]', "scopes must be a list"),
        ('[{"key": "k", "scopes": "read"}]', "scopes must be a list"),
        ('[{"key": "k", "scopes": ["root"]}]', "'root'"),
        ('[{"key": "k", "scopes": ["read"], "collection": ["a"]}]', "unknown field collection"),
        ('[{"key": "k", "scopes": ["read"], "collections": "a"}]', "collections must be a list"),
    ],
)
def test_a_malformed_setting_names_the_variable_and_the_problem(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(InvalidSetting, match=message) as caught:
        store_on(tmp_path, value)
    assert "VLSEARCH_API_KEYS" in str(caught.value)


def test_a_damaged_keys_file_fails_closed_and_is_not_overwritten(store: KeyStore) -> None:
    created = store.create("read")
    store.path.write_text('{"keys": [{"id": "x"')
    with pytest.raises(KeyFileCorrupt, match=KEYS_FILE_NAME) as caught:
        store.authenticate(created.secret)
    assert caught.value.category == "unavailable"
    with pytest.raises(KeyFileCorrupt):
        store.create("read")
    assert store.path.read_text() == '{"keys": [{"id": "x"'


def test_a_deleted_keys_file_removes_its_keys(store: KeyStore) -> None:
    created = store.create("read")
    assert store.authenticate(created.secret) is not None
    store.path.unlink()
    assert store.authenticate(created.secret) is None and not store.configured


def test_changes_by_another_store_are_seen_at_once(tmp_path: Path) -> None:
    reader, writer = store_on(tmp_path), store_on(tmp_path)
    assert reader.list() == []
    # Two writes within one tick of the clock: each is still seen (a new inode per version).
    first, second = writer.create("read"), writer.create("read")
    assert reader.authenticate(first.secret) == first.key and reader.authenticate(second.secret) == second.key
    writer.revoke(first.key.id)
    assert reader.authenticate(first.secret) is None and reader.authenticate(second.secret) == second.key


CREATE_KEYS = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from core.keys import KeyStore
    from core.settings import Settings

    data_dir, go, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    store = KeyStore.from_settings(Settings(data_dir=data_dir))
    while not go.exists():  # start together, so that the writes overlap
        time.sleep(0.001)
    for _ in range(count):
        print(store.create("read").secret, flush=True)
    """
)


REVOKE_KEY = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from core.keys import KeyStore
    from core.settings import Settings

    KeyStore.from_settings(Settings(data_dir=Path(sys.argv[1]))).revoke(sys.argv[2])
    """
)


def run_python(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_two_processes_creating_keys_at_once_lose_none(tmp_path: Path) -> None:
    data_dir, go, count = tmp_path / "data", tmp_path / "go", 40
    processes = [run_python(CREATE_KEYS, str(data_dir), str(go), str(count)) for _ in range(2)]
    time.sleep(0.3)  # both imported and waiting
    go.touch()
    secrets = []
    for process in processes:
        out, errors = process.communicate(timeout=60)
        assert process.returncode == 0, errors
        secrets += out.split()
    assert len(set(secrets)) == 2 * count
    store = store_on(data_dir)
    assert len(store.list()) == 2 * count and len({key.id for key in store.list()}) == 2 * count
    assert all(isinstance(store.authenticate(secret), ApiKey) for secret in secrets)


def test_a_key_created_by_another_process_is_seen_without_reopening(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    store = store_on(data_dir)
    assert not store.configured
    go = tmp_path / "go"
    go.touch()
    process = run_python(CREATE_KEYS, str(data_dir), str(go), "1")
    out, errors = process.communicate(timeout=60)
    assert process.returncode == 0, errors
    secret = out.strip()
    found = store.authenticate(secret)
    assert found is not None and store.configured
    revoking = run_python(REVOKE_KEY, str(data_dir), found.id)
    assert revoking.wait(timeout=60) == 0, revoking.communicate()[1]
    assert store.authenticate(secret) is None
