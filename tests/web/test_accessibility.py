"""axe-core in the page (axe-playwright-python's copy, run in Chromium): no violation of impact serious or
critical, on results, on the open detail view and on the jobs panel; and the page at 360 px wide."""

from __future__ import annotations

import re
from typing import Any

from axe_playwright_python.sync_playwright import Axe
from playwright.sync_api import Browser, Page, expect

from tests.web.conftest import SCREENSHOTS, TIMEOUT_MS, Site, open_with_key, result_ids, search

BLOCKING = ("serious", "critical")


def blocking_violations(page: Page) -> list[dict[str, Any]]:
    violations = Axe().run(page).response["violations"]
    return [
        {"id": item["id"], "impact": item["impact"], "nodes": [node["target"] for node in item["nodes"]][:5]}
        for item in violations
        if item["impact"] in BLOCKING
    ]


def test_no_serious_or_critical_violations(page: Page, site: Site) -> None:
    page.goto("/")  # no key yet: the hint, the empty grid
    assert blocking_violations(page) == []
    open_with_key(page, site.write_key, "/?q=a+red+circle&collection=shapes&captions=1")
    result_ids(page)
    expect(page.locator("#results .result img.thumb").first).to_have_attribute("src", re.compile("^blob:"))
    assert blocking_violations(page) == []
    page.locator("#results .result .open").first.click()
    expect(page.locator("#detail")).to_have_attribute("open", "")
    assert blocking_violations(page) == []


def test_every_control_has_a_label_and_focus_is_visible(page: Page, site: Site) -> None:
    open_with_key(page, site.read_key)
    search(page, "a red circle")
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button')]
            .filter(control => control.type !== 'hidden' && !control.closest('[hidden]'))
            .filter(control => !(control.labels?.length || control.getAttribute('aria-label')
                                 || control.getAttribute('aria-labelledby') || control.textContent.trim()))
            .map(control => control.id || control.outerHTML.slice(0, 80))"""
    )
    assert unlabelled == []
    page.locator("#q").focus()
    outline = page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
    shadow = page.evaluate("() => getComputedStyle(document.activeElement).boxShadow")
    assert outline != "none" or shadow != "none"


def test_the_page_fits_a_phone(browser: Browser, site: Site) -> None:
    context = browser.new_context(viewport={"width": 360, "height": 740}, base_url=site.url)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    try:
        open_with_key(page, site.read_key, "/?q=a+red+circle&collection=shapes")
        assert len(result_ids(page)) == 20
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 360
        box = page.locator("#results .result").first.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 360
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "test_the_page_fits_a_phone.png"))
    finally:
        context.close()
