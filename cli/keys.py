"""The API key commands of `vlsearch`: keys create, keys list, keys revoke. Thin shells over core.keys."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from cli.main import JsonOpt, app, emit_json, err, reports_errors
from core.container import build_settings
from core.keys import ApiKey, KeyStore

keys = typer.Typer(help="API keys: create (printed once), list, revoke.", no_args_is_help=True)
app.add_typer(keys, name="keys")


def _store() -> KeyStore:
    return KeyStore.from_settings(build_settings())


def _collections(key: ApiKey) -> str:
    return "all" if key.collections is None else ",".join(key.collections)


@keys.command(name="create")
@reports_errors
def create_key(
    scopes: Annotated[str, typer.Option("--scopes", help="read, or read,write (write also reads).")],
    collections: Annotated[
        str | None, typer.Option("--collections", help="Only these collections, comma-separated (default: all).")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="A name to tell the key apart (unique).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a key and print it once: only its SHA-256 hash is stored (VLSEARCH_DATA_DIR/api_keys.json)."""
    created = _store().create(scopes, collections, name)
    key = created.key
    if as_json:
        emit_json({**key.to_dict(), "key": created.secret})
        return
    print(created.secret)  # alone on stdout, so that `KEY=$(vlsearch keys create ...)` works
    label = f" ({key.name})" if key.name else ""
    err.print(
        f"created API key {key.id}{label}, scopes {','.join(key.scopes)}, collections {_collections(key)}: "
        "store it now, it is not shown again",
        highlight=False,
        soft_wrap=True,
    )


@keys.command(name="list")
@reports_errors
def list_keys(as_json: JsonOpt = False) -> None:
    """Every key: id, name, scopes, collections, created, source (never a secret)."""
    records = _store().list()
    if as_json:
        emit_json([key.to_dict() for key in records])
        return
    print(f"{'id':<12}  {'name':<16}  {'scopes':<10}  {'collections':<24}  {'created':<19}  source")
    for key in records:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(key.created)) if key.created else "-"
        print(
            f"{key.id:<12}  {key.name or '-':<16}  {','.join(key.scopes):<10}  {_collections(key):<24}  "
            f"{created:<19}  {key.source}"
        )


@keys.command(name="revoke")
@reports_errors
def revoke_key(
    id_or_name: Annotated[str, typer.Argument(help="The key's id or name (as `vlsearch keys list` shows).")],
    as_json: JsonOpt = False,
) -> None:
    """Revoke a key of the keys file: it stops working at the next request (no restart needed)."""
    key = _store().revoke(id_or_name)
    if as_json:
        emit_json(key.to_dict())
    else:
        print(f"revoked API key {key.id}{f' ({key.name})' if key.name else ''}")
