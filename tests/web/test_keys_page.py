"""The key: kept in local storage and sent as a header; a wrong key shows the API's message, no key says what
to do."""

from __future__ import annotations

from playwright.sync_api import Page, expect

from tests.web.conftest import Site, result_ids


def test_no_key_says_what_to_do_and_a_key_entered_is_kept(page: Page, site: Site) -> None:
    page.goto("/?q=a+red+circle&collection=shapes")
    status = page.locator("#status")
    expect(status).to_have_attribute("data-state", "nokey")
    expect(status).to_contain_text("API key")
    expect(page.locator("#results .result")).to_have_count(0)
    page.fill("#api-key", site.read_key)
    page.dispatch_event("#api-key", "change")
    assert len(result_ids(page)) == 20  # the search runs once there is a key
    assert page.evaluate("() => localStorage.getItem('vlsearch.apiKey')") == site.read_key
    page.reload()
    expect(page.locator("#api-key")).to_have_value(site.read_key)
    assert len(result_ids(page)) == 20


def test_a_wrong_key_shows_the_apis_message(page: Page, site: Site) -> None:
    page.goto("/")
    page.fill("#api-key", "not-a-key")
    page.dispatch_event("#api-key", "change")
    page.fill("#q", "a red circle")
    page.press("#q", "Enter")
    status = page.locator("#status")
    expect(status).to_have_attribute("data-state", "error")
    expect(status).to_contain_text("invalid API key")
    expect(page.locator("#results .result")).to_have_count(0)
