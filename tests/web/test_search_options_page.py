"""The search form's sort, relevance bound and taken-date filters: sent as the API takes them, kept in the URL
(reload restores them), the results are the API's for the same body, and a date range nothing was taken in shows
the empty state."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

from playwright.sync_api import Page, expect

from tests.web.conftest import Site, open_with_key, result_ids

TEXT = "a red circle"
MIN_RELEVANCE = "0.05"


def api_answer(site: Site, body: dict[str, Any]) -> list[dict[str, Any]]:
    with site.api() as client:
        answer = client.post("/v1/search", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()["hits"]  # type: ignore[no-any-return]


def submit_and_capture(page: Page) -> dict[str, Any]:
    """Presses Enter in the search box; the body of the search request the page sent."""
    with page.expect_request(lambda r: r.method == "POST" and urlsplit(r.url).path == "/v1/search") as sent:
        page.press("#q", "Enter")
    return json.loads(sent.value.post_data or "{}")  # type: ignore[no-any-return]


def test_sort_relevance_bound_and_taken_dates_are_sent_kept_in_the_url_and_shown(page: Page, site: Site) -> None:
    # the shapes' `taken` is their files' time: a range of whole days around all of them includes them all
    unfiltered = api_answer(site, {"collection": "shapes", "text": TEXT, "k": 30})
    days = sorted(hit["payload"]["taken"][:10] for hit in unfiltered)
    after, before = days[0], days[-1]

    open_with_key(page, site.read_key)
    page.fill("#q", TEXT)
    page.select_option("#collection", "shapes")
    page.select_option("#sort", "date")
    page.locator("#filters summary").click()
    page.fill("#min-relevance", MIN_RELEVANCE)
    page.fill("#taken-after", after)
    page.fill("#taken-before", before)
    body = submit_and_capture(page)
    assert body["sort"] == "date"
    assert body["min_relevance"] == float(MIN_RELEVANCE)
    # "on or before" a day takes in all of it: the API reads a bare date as its midnight
    assert body["filter"] == {"taken_after": after, "taken_before": f"{before}T23:59:59"}
    assert body["text"] == TEXT and body["collection"] == "shapes"

    ids = result_ids(page)
    hits = api_answer(site, body)
    assert ids == [hit["id"] for hit in hits] and ids, "the page's results are not the API's"
    takens = [hit["payload"]["taken"] for hit in hits]
    assert takens == sorted(takens, reverse=True)  # newest first
    cards = page.locator("#results .result")
    for index, hit in enumerate(hits[:5]):
        assert hit["relevance"] is not None and hit["relevance"] >= float(MIN_RELEVANCE)
        expect(cards.nth(index).locator(".relevance")).to_have_text(f"{hit['relevance']:.3f}")
        expect(cards.nth(index).locator(".taken")).to_have_text(hit["payload"]["taken"][:10])

    query = parse_qs(urlsplit(page.url).query)
    assert query["sort"] == ["date"] and query["min_relevance"] == [MIN_RELEVANCE]
    assert query["taken_after"] == [after] and query["taken_before"] == [before]

    # a reload of the URL restores the controls and sends the same search
    with page.expect_request(lambda r: r.method == "POST" and urlsplit(r.url).path == "/v1/search") as again:
        page.reload()
    assert json.loads(again.value.post_data or "{}") == body
    expect(page.locator("#sort")).to_have_value("date")
    expect(page.locator("#min-relevance")).to_have_value(MIN_RELEVANCE)
    expect(page.locator("#taken-after")).to_have_value(after)
    expect(page.locator("#taken-before")).to_have_value(before)
    expect(page.locator("#filters")).to_have_attribute("open", "")
    assert result_ids(page) == ids

    # a range in the past: nothing was taken then, the empty state, as the API answers
    page.fill("#taken-after", "2001-01-01")
    page.fill("#taken-before", "2001-12-31")
    empty_body = submit_and_capture(page)
    assert empty_body["filter"] == {"taken_after": "2001-01-01", "taken_before": "2001-12-31T23:59:59"}
    assert result_ids(page) == [] == api_answer(site, empty_body)
    status = page.locator("#status")
    expect(status).to_have_attribute("data-state", "empty")
    expect(status).to_contain_text("Try fewer filters")
    assert parse_qs(urlsplit(page.url).query)["taken_before"] == ["2001-12-31"]
