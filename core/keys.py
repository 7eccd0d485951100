"""API keys: created once, stored only as SHA-256 hashes, checked in constant time, limited by scope and collection.

Keys come from two places, both read by `KeyStore.from_settings`:

- The keys file `<data_dir>/api_keys.json`, written by `vlsearch keys create|revoke`. It holds records (id, name,
  sha256, scopes, collections, created), never a secret; it is written atomically (temporary file, fsync,
  os.replace) with mode 0600, under an exclusive `fcntl.flock` on `api_keys.json.lock` beside it, so processes
  that create or revoke keys at the same time lose none. A process re-reads it when the file changes (one stat per
  `authenticate`), so a running API sees keys created by the CLI without a restart.

- The setting `VLSEARCH_API_KEYS`: a JSON list of objects, one per key::

      [{"sha256": "<64 hex digits>", "scopes": ["read"], "collections": ["photos"], "name": "web"},
       {"key": "a-plaintext-secret", "scopes": ["read", "write"]}]

  Each object has exactly one of `key` (the secret itself) or `sha256` (the lowercase or uppercase hex SHA-256 of
  the secret's UTF-8 bytes, e.g. from `printf %s "$KEY" | sha256sum`, so that no secret needs to live in an env
  file); `scopes`, a non-empty list of "read" and "write"; optionally `collections`, a list of collection names
  (absent or null: every collection) and `name`. Other fields are refused, so that a typo does not silently widen
  a key. These keys cannot be revoked with the CLI: remove them from the setting.

Scopes: "read" (search, get, thumbnails, similar, ask) and "write" (jobs, deletes, collection create and delete,
indexing uploads). A write key also reads: "write" implies "read", and such a key's scopes are stored as both.
A key limited to collections sees no other collection at all (the API answers 404, as if it were absent).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from core.settings import Settings
from indexer.errors import ErrorCategory, InvalidQuery, InvalidSetting, VlsearchError

__all__ = [
    "KEYS_FILE_NAME",
    "SCOPES",
    "ApiKey",
    "CreatedKey",
    "KeyExists",
    "KeyFileCorrupt",
    "KeyNotFound",
    "KeyStore",
    "Scope",
    "hash_secret",
    "parse_collections",
    "parse_scopes",
]

Scope = Literal["read", "write"]
SCOPES: tuple[Scope, ...] = ("read", "write")
KEYS_FILE_NAME = "api_keys.json"
SECRET_PREFIX = "vls_"  # makes a leaked key easy to recognise (secret scanners, logs)
FILE_VERSION = 1
_HEX = frozenset("0123456789abcdef")
_ENV_FIELDS = frozenset({"key", "sha256", "scopes", "collections", "name"})


class KeyNotFound(VlsearchError):
    """No API key with that id or name."""

    category: ClassVar[ErrorCategory] = "not_found"


class KeyExists(VlsearchError):
    """An API key of that name exists already."""

    category: ClassVar[ErrorCategory] = "conflict"


class KeyFileCorrupt(VlsearchError):
    """The keys file exists but cannot be read; no key is accepted until it is fixed (fail closed)."""

    category: ClassVar[ErrorCategory] = "unavailable"


def hash_secret(secret: str) -> str:
    """The hex SHA-256 of a secret's UTF-8 bytes: the only form in which a key is stored."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """One API key, without its secret. `collections` None means every collection."""

    id: str
    name: str | None
    sha256: str
    scopes: tuple[Scope, ...]
    collections: tuple[str, ...] | None
    created: float  # epoch seconds; 0 for keys from the setting
    source: Literal["file", "env"] = "file"

    def allows(self, scope: Scope) -> bool:
        """Whether the key may do what needs `scope` (a write key also reads)."""
        return scope in self.scopes

    def may_access(self, collection: str) -> bool:
        """Whether the key may touch that collection at all."""
        return self.collections is None or collection in self.collections

    def to_dict(self) -> dict[str, Any]:
        """The key as plain data for people (CLI, API): a hash prefix to tell keys apart, never the whole hash."""
        return {
            "id": self.id,
            "name": self.name,
            "scopes": list(self.scopes),
            "collections": None if self.collections is None else list(self.collections),
            "created": self.created,
            "source": self.source,
            "sha256_prefix": self.sha256[:12],
        }


@dataclass(frozen=True)
class CreatedKey:
    """A new key's record and its secret: the only time the secret exists outside the caller's hands."""

    key: ApiKey
    secret: str


def parse_scopes(scopes: str | Iterable[str]) -> tuple[Scope, ...]:
    """Scopes from "read,write" or a list; "write" brings "read" along. InvalidQuery names a bad one."""
    items = scopes.split(",") if isinstance(scopes, str) else list(scopes)
    names = {str(item).strip().lower() for item in items} - {""}
    if not names:
        raise InvalidQuery("no scopes given: use read, write or read,write")
    unknown = sorted(names - set(SCOPES))
    if unknown:
        raise InvalidQuery(f"unknown scope {', '.join(map(repr, unknown))}: use read, write or read,write")
    if "write" in names:
        names.add("read")
    return tuple(scope for scope in SCOPES if scope in names)


def parse_collections(collections: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """Collection names from "a,b" or a list (None: every collection). InvalidQuery for an empty name."""
    if collections is None:
        return None
    items = collections.split(",") if isinstance(collections, str) else list(collections)
    names = [str(item).strip() for item in items]
    if not names or any(not name for name in names):
        raise InvalidQuery(f"empty collection name in {collections!r}: give names separated by commas, e.g. a,b")
    return tuple(dict.fromkeys(names))  # drop repeats, keep the order given


def _check_hash(value: Any, where: str) -> str:
    digest = str(value).strip().lower()
    if len(digest) != 64 or not set(digest) <= _HEX:
        raise InvalidSetting(f"{where}: sha256 must be 64 hex digits (the SHA-256 of the key), got {value!r}")
    return digest


def parse_env_keys(value: str | None) -> list[ApiKey]:
    """The keys of VLSEARCH_API_KEYS (format: see the module docstring); InvalidSetting says what is wrong."""
    if value is None or not value.strip():
        return []
    try:
        entries = json.loads(value)
    except json.JSONDecodeError as error:
        raise InvalidSetting(
            f"invalid setting VLSEARCH_API_KEYS: not valid JSON ({error.msg}); expected a list like "
            '[{"sha256": "<hex>", "scopes": ["read"]}]'
        ) from None
    if not isinstance(entries, list):
        raise InvalidSetting("invalid setting VLSEARCH_API_KEYS: expected a JSON list of objects")
    keys = []
    for index, entry in enumerate(entries):
        where = f"invalid setting VLSEARCH_API_KEYS (item {index})"
        if not isinstance(entry, dict):
            raise InvalidSetting(f"{where}: expected an object with key or sha256, and scopes")
        unknown = sorted(set(entry) - _ENV_FIELDS)
        if unknown:
            raise InvalidSetting(f"{where}: unknown field {', '.join(unknown)}; use {', '.join(sorted(_ENV_FIELDS))}")
        if ("key" in entry) == ("sha256" in entry):
            raise InvalidSetting(f"{where}: give exactly one of key (the secret) or sha256 (its hash)")
        if "key" in entry:
            if not isinstance(entry["key"], str) or not entry["key"]:
                raise InvalidSetting(f"{where}: key must be a non-empty string")
            digest = hash_secret(entry["key"])
        else:
            digest = _check_hash(entry["sha256"], where)
        if "scopes" not in entry or isinstance(entry["scopes"], str) or not isinstance(entry["scopes"], list):
            raise InvalidSetting(f'{where}: scopes must be a list such as ["read"] or ["read", "write"]')
        name = entry.get("name")
        if name is not None and not isinstance(name, str):
            raise InvalidSetting(f"{where}: name must be a string")
        collections = entry.get("collections")
        if collections is not None and not isinstance(collections, list):
            raise InvalidSetting(f'{where}: collections must be a list such as ["photos"], or null for every one')
        try:
            scopes = parse_scopes(entry["scopes"])
            allowed = parse_collections(collections)
        except InvalidQuery as error:
            raise InvalidSetting(f"{where}: {error}") from None
        # The id is derived from the hash (not secret: the hash of a key reveals nothing usable) so that it is the
        # same in every process that reads the setting.
        key_id = "env-" + hashlib.sha256(digest.encode()).hexdigest()[:8]
        keys.append(ApiKey(key_id, name or None, digest, scopes, allowed, 0.0, "env"))
    return keys


def _record_from_json(data: Any, path: Path) -> ApiKey:
    try:
        collections = data["collections"]
        return ApiKey(
            id=str(data["id"]),
            name=data.get("name"),
            sha256=_check_hash(data["sha256"], str(path)),
            scopes=parse_scopes(data["scopes"]),
            collections=None if collections is None else tuple(str(name) for name in collections),
            created=float(data["created"]),
        )
    except (KeyError, TypeError, ValueError, VlsearchError) as error:
        raise KeyFileCorrupt(f"keys file {path} holds a damaged record ({error!r}): fix or remove it") from None


def _record_to_json(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "name": key.name,
        "sha256": key.sha256,
        "scopes": list(key.scopes),
        "collections": None if key.collections is None else list(key.collections),
        "created": key.created,
    }


# What tells one version of the keys file from another: os.replace gives each version a new inode, so this changes
# even when two writes fall into one tick of the file system's clock.
_FileSignature = tuple[int, int, int, int]
_KeyList = list[ApiKey]  # named here: inside KeyStore, `list` is the method


def _signature(stat: os.stat_result) -> _FileSignature:
    return (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)


class KeyStore:
    """The keys of one deployment: those of the keys file (created, listed, revoked here) and those of the setting."""

    def __init__(self, path: Path, env_keys: Sequence[ApiKey] = ()) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        self.env_keys = tuple(env_keys)
        # The file's keys as last read, with the signature of the version read. Replaced whole (one assignment),
        # so threads that authenticate at once need no lock, and nothing is held across a fork.
        self._cache: tuple[_FileSignature | None, tuple[ApiKey, ...]] = (None, ())

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyStore:
        """The keys file under data_dir and the keys of VLSEARCH_API_KEYS (InvalidSetting if malformed)."""
        secret = settings.api_keys
        return cls(settings.data_dir / KEYS_FILE_NAME, parse_env_keys(secret.get_secret_value() if secret else None))

    # Reading.

    def _file_keys(self) -> tuple[ApiKey, ...]:
        """The keys file's records, re-read only when the file changed since the last read."""
        try:
            current = _signature(os.stat(self.path))
        except FileNotFoundError:
            self._cache = (None, ())
            return ()
        signature, keys = self._cache
        if signature == current:
            return keys
        try:
            with open(self.path, encoding="utf-8") as file:
                signature = _signature(os.fstat(file.fileno()))  # of the version actually read
                text = file.read()
        except FileNotFoundError:
            return ()
        keys = self._parse_file(text)
        self._cache = (signature, keys)
        return keys

    def _parse_file(self, text: str) -> tuple[ApiKey, ...]:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise KeyFileCorrupt(f"keys file {self.path} is not valid JSON: fix or remove it") from None
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise KeyFileCorrupt(f'keys file {self.path} has no "keys" list: fix or remove it')
        return tuple(_record_from_json(record, self.path) for record in data["keys"])

    def list(self) -> list[ApiKey]:
        """Every key, the file's (oldest first) then the setting's; records only, no secret."""
        return [*self._file_keys(), *self.env_keys]

    @property
    def configured(self) -> bool:
        """Whether any key exists (with none, the API refuses every protected request)."""
        return bool(self.env_keys or self._file_keys())

    def authenticate(self, secret: str) -> ApiKey | None:
        """The key whose secret this is, or None. The hash is compared with every stored hash in constant time."""
        if not secret:
            return None
        digest = hash_secret(secret).encode()
        found: ApiKey | None = None
        # No lookup keyed on the secret and no early exit: the time taken does not depend on which key matched.
        for key in (*self._file_keys(), *self.env_keys):
            if hmac.compare_digest(digest, key.sha256.encode()) and found is None:
                found = key
        return found

    # Writing (the keys file only), each a read-modify-write under the file lock.

    def create(
        self, scopes: str | Iterable[str], collections: str | Iterable[str] | None = None, name: str | None = None
    ) -> CreatedKey:
        """A new key with a random secret, stored as its hash; the secret is returned once and kept nowhere."""
        allowed_scopes = parse_scopes(scopes)
        allowed_collections = parse_collections(collections)
        name = name.strip() if name is not None else None
        if name == "":
            raise InvalidQuery("empty key name: give a name or leave it out")
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        with self._locked() as keys:
            taken_ids = {key.id for key in [*keys, *self.env_keys]}
            if name is not None and any(key.name == name for key in [*keys, *self.env_keys]):
                raise KeyExists(f"an API key named {name!r} exists already: revoke it or choose another name")
            key_id = secrets.token_hex(4)
            while key_id in taken_ids:
                key_id = secrets.token_hex(4)
            key = ApiKey(key_id, name, hash_secret(secret), allowed_scopes, allowed_collections, round(time.time(), 3))
            keys.append(key)
        return CreatedKey(key, secret)

    def revoke(self, id_or_name: str) -> ApiKey:
        """Remove a key of the file by id (or, failing that, by name); KeyNotFound if there is none."""
        with self._locked() as keys:
            match = next((key for key in keys if key.id == id_or_name), None) or next(
                (key for key in keys if key.name == id_or_name), None
            )
            if match is None:
                if any(id_or_name in (key.id, key.name) for key in self.env_keys):
                    raise InvalidQuery(
                        f"API key {id_or_name!r} comes from VLSEARCH_API_KEYS: remove it from that setting"
                    )
                raise KeyNotFound(f"no API key with id or name {id_or_name!r} in {self.path}")
            keys.remove(match)
        return match

    @contextlib.contextmanager
    def _locked(self) -> Iterator[_KeyList]:
        """The file's keys, read under the exclusive lock; what the caller leaves in the list is written back."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            try:
                text = self.path.read_text(encoding="utf-8")
            except FileNotFoundError:
                text = None
            keys = [] if text is None else list(self._parse_file(text))
            before = list(keys)
            yield keys
            if keys != before:
                self._write(keys)
        finally:
            os.close(descriptor)  # closing releases the lock

    def _write(self, keys: Sequence[ApiKey]) -> None:
        data = {"version": FILE_VERSION, "keys": [_record_to_json(key) for key in keys]}
        descriptor, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)  # mode 0600
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as file:
                json.dump(data, file, indent=2)
                file.write("\n")
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, 0o600)  # whatever the umask: the hashes are nobody else's business
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)
