"""The page's relevance cutoff, date order and taken bounds: sent as the API's fields, held in the URL, shown on the
cards (relevance, date taken) and in the detail view."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

from playwright.sync_api import Page, expect

from tests.web.conftest import Site, open_with_key, result_ids


def api_hits(site: Site, **body: Any) -> list[dict[str, Any]]:
    with site.api() as client:
        answer = client.post("/v1/search", json={"collection": "shapes", "k": 20, **body})
    assert answer.status_code == 200, answer.text
    return answer.json()["hits"]  # type: ignore[no-any-return]


def test_min_relevance_date_order_and_taken_bounds_go_to_the_api_and_into_the_url(page: Page, site: Site) -> None:
    open_with_key(page, site.read_key)
    page.locator("#filters summary").click()
    page.fill("#min-relevance", "0.1")
    page.fill("#taken-after", "2000-01-01")
    page.fill("#taken-before", "2099-12-31")
    page.select_option("#sort", "date")
    with page.expect_request("**/v1/search") as sent:
        page.fill("#q", "a red circle")
        page.press("#q", "Enter")
    body = sent.value.post_data_json
    assert body["min_relevance"] == 0.1 and body["sort"] == "date"
    # "on or before" a day includes the whole day
    assert body["filter"] == {"taken_after": "2000-01-01", "taken_before": "2099-12-31T23:59:59"}
    ids = result_ids(page)
    expected = api_hits(site, text="a red circle", min_relevance=0.1, sort="date", filter=body["filter"])
    assert ids == [hit["id"] for hit in expected] and ids
    query = parse_qs(urlsplit(page.url).query)
    assert (query["min_relevance"], query["sort"]) == (["0.1"], ["date"])
    assert (query["taken_after"], query["taken_before"]) == (["2000-01-01"], ["2099-12-31"])
    card = page.locator("#results .result").first
    expect(card.locator(".relevance")).to_have_text(re.compile(r"^\d\.\d{3}$"))
    taken = expected[0]["payload"]["taken"]
    expect(card.locator(".taken time")).to_have_text(taken[:10])  # the day; the detail view has the time
    card.locator("button.open").click()
    expect(page.locator("#detail-taken")).to_have_text(taken[:16].replace("T", " "))


def test_a_bookmarked_url_fills_the_new_controls_and_a_future_bound_finds_nothing(page: Page, site: Site) -> None:
    open_with_key(page, site.read_key, "/?q=a+circle&collection=shapes&sort=date&taken_after=2100-01-01")
    expect(page.locator("#status")).to_have_attribute("data-state", "empty")
    expect(page.locator("#sort")).to_have_value("date")
    expect(page.locator("#taken-after")).to_have_value("2100-01-01")
    expect(page.locator("#filter-count")).to_have_text("(1 set)")
    assert result_ids(page) == []
