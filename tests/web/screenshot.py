"""docs/page.png, the README's picture of the page: `make screenshot` (or `.venv/bin/python -m tests.web.screenshot
PATH`). A shapes-world collection indexed with the shipped models, a real `vlsearch serve`, headless Chromium
searching it with rerank and captions on."""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from core.keys import KeyStore
from core.service import Service
from models.shapes_world import generate_scenes, write_collection
from tests.api.conftest import model_settings, start_server, stop_server
from tests.web.conftest import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS

QUERY = "/?q=a+red+circle&collection=shapes&rerank=1&captions=1&k=12"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, nargs="?", default=Path("docs/page.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        write_collection(generate_scenes("test", 60, seed=7), root / "scenes", size=128)
        settings = model_settings(root / "data")
        with Service(settings) as service:
            service.index([root / "scenes"], "shapes")
        key = KeyStore.from_settings(settings).create("read", name="screenshot").secret
        server = start_server(settings.data_dir, root / "server.log")
        try:
            with sync_playwright() as driver:
                browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 860}, base_url=server.base_url)
                page.set_default_timeout(TIMEOUT_MS)
                page.add_init_script(f"localStorage.setItem('vlsearch.apiKey', {key!r})")
                page.goto(QUERY)
                expect(page.locator("#status")).to_have_attribute("data-state", "done")
                thumbs = page.locator("#results .result img.thumb")
                for index in range(min(6, thumbs.count())):  # the first rows; the rest load on scrolling
                    expect(thumbs.nth(index)).to_have_attribute("src", re.compile("^blob:"))
                args.output.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.output))
                browser.close()
        finally:
            stop_server(server)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
