"""The API end to end: a real `vlsearch serve` process (uvicorn) on a free loopback port, real HTTP (httpx), the
shipped shapes-world models, real Redis (database 9) for jobs and the rate limit.

One server for the whole session (`server`: keys configured, no open read) over a copy of a data dir built once
(`template`: collections `shapes` and `other`, API keys); modules that need other settings start their own. Every
request the tests make is recorded (CALLS), so that the last module can check each route of the OpenAPI schema
was called.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from core.container import SHIPPED_CLIP_MODELS, SHIPPED_VLM_MODELS
from core.keys import KeyStore
from core.service import Service
from core.settings import Settings
from models.shapes_world import generate_scenes, write_collection
from tests.processes import stop

if (
    not (SHIPPED_CLIP_MODELS["shapes-clip"] / "open_clip_config.json").exists()
    or not (SHIPPED_VLM_MODELS["shapes-vlm"] / "config.json").exists()
):
    pytest.skip("the shipped shapes-world models are not built yet", allow_module_level=True)

REPO_ROOT = Path(__file__).resolve().parents[2]
VLSEARCH = str(Path(sys.executable).parent / "vlsearch")  # the installed console script
REDIS_URL = "redis://127.0.0.1:6379/9"  # these tests' own database
MAIN_UPLOAD_LIMIT = 256 * 1024
CALLS: set[tuple[str, str]] = set()  # (method, path) of every request the tests sent


def model_settings(data_dir: Path, **extra: Any) -> Settings:
    """What the servers run on: the shipped models on CPU, small pools (2 shared cores)."""
    return Settings(
        data_dir=data_dir,
        collection="shapes",
        clip_model="shapes-clip",
        clip_pretrained=None,
        device="cpu",
        text_templates=["{}"],
        vlm_model="shapes-vlm",
        vlm_device="cpu",
        vlm_max_new_tokens=12,
        decode_workers=1,
        image_workers=1,
        batch_size=8,
        **extra,
    )


def server_env(data_dir: Path, **settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("VLSEARCH_")}
    env.update(
        {
            "PYTHONPATH": str(REPO_ROOT),
            "VLSEARCH_DATA_DIR": str(data_dir),
            "VLSEARCH_COLLECTION": "shapes",
            "VLSEARCH_CLIP_MODEL": "shapes-clip",
            "VLSEARCH_TEXT_TEMPLATES": '["{}"]',
            "VLSEARCH_DEVICE": "cpu",
            "VLSEARCH_VLM_MODEL": "shapes-vlm",
            "VLSEARCH_VLM_DEVICE": "cpu",
            "VLSEARCH_VLM_MAX_NEW_TOKENS": "12",
            "VLSEARCH_DECODE_WORKERS": "1",
            "VLSEARCH_IMAGE_WORKERS": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update({f"VLSEARCH_{name.upper()}": value for name, value in settings.items()})
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Client(httpx.Client):
    """httpx against one server, recording every request in CALLS."""

    def __init__(self, base_url: str, key: str | None = None, **options: Any) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        super().__init__(
            base_url=base_url,
            headers=headers,
            timeout=60,
            event_hooks={"request": [lambda request: CALLS.add((request.method, request.url.path))]},
            **options,
        )


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    data_dir: Path
    log: Path

    def client(self, key: str | None = None, **options: Any) -> Client:
        return Client(self.base_url, key, **options)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def start_server(data_dir: Path, log: Path, **settings: str) -> Server:
    """`vlsearch serve` on a free port, once /readyz answers 200 (the models are loaded)."""
    port = free_port()
    handle = open(log, "wb")  # noqa: SIM115  # the child writes into it until it ends
    process = subprocess.Popen(
        [VLSEARCH, "serve", "--port", str(port), "--log-level", "warning", "--no-access-log"],
        cwd=REPO_ROOT,
        env=server_env(data_dir, **settings),
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    handle.close()
    server = Server(process, f"http://127.0.0.1:{port}", data_dir, log)
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=server.base_url, timeout=5) as probe:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"vlsearch serve exited with {process.returncode}:\n{server.log_tail()}")
            try:
                if probe.get("/readyz").status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.2)
    stop_server(server)
    raise AssertionError(f"vlsearch serve was not ready within 120 s:\n{server.log_tail()}")


def stop_server(server: Server) -> None:
    stop(server.process, timeout=20)


@dataclass(frozen=True)
class Keys:
    read: str
    write: str
    limited: str  # read and write, on collection "other" only
    other_read: str  # read, on "other" only

    def all(self) -> dict[str, str]:
        return {"read": self.read, "write": self.write, "limited": self.limited}


@dataclass(frozen=True)
class Template:
    data_dir: Path
    scenes: Path  # the PNG files of collection "shapes" (12 scenes, one of them also under a second name)
    keys: Keys


@pytest.fixture(scope="session")
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"the API tests need Redis at {REDIS_URL}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    """A data dir with collections `shapes` (12 scenes + an exact copy of one) and `other` (3 scenes), and keys."""
    root = tmp_path_factory.mktemp("api-template")
    scenes = root / "scenes"
    write_collection(generate_scenes("test", 12, seed=11), scenes, size=64)
    shutil.copy(scenes / "00000.png", scenes / "copy-of-00000.png")
    others = root / "others"
    write_collection(generate_scenes("test", 3, seed=23), others, size=64)
    data_dir = root / "data"
    with Service(model_settings(data_dir)) as service:
        assert service.index([scenes], "shapes").count == 12
        assert service.index([others], "other").count == 3
    store = KeyStore.from_settings(model_settings(data_dir))
    keys = Keys(
        read=store.create("read", name="reader").secret,
        write=store.create("read,write", name="writer").secret,
        limited=store.create("read,write", collections="other", name="limited").secret,
        other_read=store.create("read", collections="other", name="other-reader").secret,
    )
    return Template(data_dir, scenes, keys)


def copy_data(template: Template, target: Path) -> Path:
    shutil.copytree(template.data_dir, target)
    return target


@pytest.fixture(scope="session")
def server(template: Template, tmp_path_factory: pytest.TempPathFactory, redis_client: redis.Redis) -> Iterator[Server]:
    """The session's server: keys configured, no open read, a small upload limit, jobs on Redis database 9, the
    URL fetcher allowed to reach 127.0.0.1 (a test serves images there)."""
    root = tmp_path_factory.mktemp("api-main")
    server = start_server(
        copy_data(template, root / "data"),
        root / "server.log",
        redis_url=REDIS_URL,
        max_upload_bytes=str(MAIN_UPLOAD_LIMIT),
        fetch_allow='["127.0.0.1"]',
    )
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def keys(template: Template) -> Keys:
    return template.keys


@pytest.fixture(scope="session")
def server_service(server: Server) -> Iterator[Service]:
    """A service of the test process on the server's data dir (another process on the same collections)."""
    with Service(model_settings(server.data_dir)) as service:
        yield service


@pytest.fixture(scope="session")
def image_ids(server_service: Service) -> list[str]:
    """The ids of collection `shapes`, in id order."""
    return server_service.point_ids("shapes")


@pytest.fixture(scope="session")
def created_jobs(redis_client: redis.Redis) -> Iterator[list[str]]:
    """Ids of the jobs the tests submit; their records and queued tasks are removed from database 9 afterwards."""
    created: list[str] = []
    yield created
    for job_id in created:
        for key in redis_client.scan_iter(f"vlsearch:job:{job_id}*"):
            redis_client.delete(key)
        redis_client.zrem("vlsearch:jobs", job_id)
    for queue in ("embed", "vlm"):  # no worker takes them in these tests
        redis_client.delete(queue)


def error_of(response: Any) -> dict[str, str]:  # an httpx response (TestClient: its own httpx)
    """The error object of a JSON error answer (checking its shape)."""
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert set(body) >= {"error"} and set(body["error"]) == {"code", "message"}, body
    assert "Traceback" not in response.text
    return body["error"]  # type: ignore[no-any-return]


def scene_bytes(template: Template, name: str = "00003.png") -> bytes:
    return (template.scenes / name).read_bytes()


def jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def image_site(template: Template) -> Iterator[str]:
    """A web server on 127.0.0.1 serving the scenes (the session server's fetcher may reach it)."""
    folder = str(template.scenes)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, directory=folder, **kwargs)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
