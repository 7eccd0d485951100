"""The web page in real headless Chromium (Debian's `chromium`, driven by Playwright with `executable_path`:
`playwright install` cannot download a browser here) against a real `vlsearch serve` on a free loopback port with
the shipped shapes-world models; jobs on Redis database 13 with a real `vlsearch worker` where a test needs one.

Each test leaves a screenshot of its page in test-results/web/<test>.png.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

from core.keys import KeyStore
from core.service import Service
from models.shapes_world import generate_scenes, write_collection
from tests.api.conftest import (
    REPO_ROOT,
    Client,
    Server,
    model_settings,
    server_env,
    start_server,
    stop_server,
)
from tests.processes import start_worker, stop

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
REDIS_URL = "redis://127.0.0.1:6379/13"  # these tests' own database, flushed at the start
SCREENSHOTS = REPO_ROOT / "test-results" / "web"
TIMEOUT_MS = 30_000

if not CHROMIUM.exists():
    pytest.fail("tests/web need Debian's chromium at /usr/bin/chromium: apt-get install -y chromium", pytrace=False)


@dataclass(frozen=True)
class Site:
    server: Server
    scenes: Path  # the PNG files of collection "shapes"
    read_key: str
    write_key: str

    @property
    def url(self) -> str:
        return self.server.base_url

    def api(self, key: str | None = None) -> Client:
        return self.server.client(key or self.read_key)


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A server over collections `shapes` (30 scenes), `plain` (5, never captioned) and an empty `other`, a read
    key and a write key."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    client.close()
    root = tmp_path_factory.mktemp("web")
    scenes = root / "scenes"
    write_collection(generate_scenes("test", 30, seed=5), scenes, size=64)
    data_dir = root / "data"
    settings = model_settings(data_dir)
    with Service(settings) as service:
        assert service.index([scenes], "shapes").count == 30
        service.create_collection("other")
        plain = root / "plain"  # no test asks for captions here: alt text is the file name
        write_collection(generate_scenes("test", 5, seed=6), plain, size=64)
        assert service.index([plain], "plain").count == 5
    store = KeyStore.from_settings(settings)
    read_key = store.create("read", name="page-reader").secret
    write_key = store.create("read,write", name="page-writer").secret
    server = start_server(data_dir, root / "server.log", redis_url=REDIS_URL, chunk_size="4")
    yield Site(server, scenes, read_key, write_key)
    stop_server(server)


@pytest.fixture(scope="session")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="session")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    yield browser
    browser.close()


def _screenshot_name(node_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", node_id.split("::")[-1]).strip("-") + ".png"


@pytest.fixture
def page(browser: Browser, site: Site, request: pytest.FixtureRequest) -> Iterator[Page]:
    """A fresh browser context (empty local storage) at desktop size; its screenshot is saved at the end."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=site.url)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / _screenshot_name(request.node.nodeid)), full_page=True)
    context.close()
    assert not errors, f"the page threw: {errors}"


def open_with_key(page: Page, key: str, path: str = "/") -> None:
    """Load the page with key already in its local storage, as a returning user's browser has it."""
    page.add_init_script(f"localStorage.setItem('vlsearch.apiKey', {key!r})")
    page.goto(path)


def search(page: Page, text: str) -> list[str]:
    """Type text into the search box and press Enter; the ids of the results, once they are shown."""
    page.fill("#q", text)
    page.press("#q", "Enter")
    return result_ids(page)


def result_ids(page: Page) -> list[str]:
    expect(page.locator("#status")).to_have_attribute("data-state", re.compile("done|empty"))
    return page.locator("#results .result").evaluate_all("items => items.map(item => item.dataset.id)")


@pytest.fixture
def worker(site: Site, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A `vlsearch worker` on the embed queue of the site's Redis; each chunk starts half a second late
    (tests/workers/slow_chunks.py), so that a job lasts long enough to be cancelled."""
    env = server_env(site.server.data_dir, redis_url=REDIS_URL, chunk_size="4")
    process = start_worker(env, tmp_path / "worker.log", include=["tests.workers.slow_chunks"])
    yield process
    stop(process)


def scene_copy(site: Site, name: str, target: Path) -> Path:
    """A scene of the collection copied under another name (an upload is by content, not by name)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(site.scenes / name, target)
    return target
