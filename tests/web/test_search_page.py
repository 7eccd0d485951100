"""Searching from the page: Enter searches, the results are the API's, the URL holds the query (reload, Back),
rerank and captions, load more, and the states (busy, empty)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

from playwright.sync_api import Page, Route, expect

from tests.web.conftest import Site, open_with_key, result_ids, search

PAGE_K = 20  # the page's default number of results


def api_hits(site: Site, **body: Any) -> list[dict[str, Any]]:
    with site.api() as client:
        answer = client.post("/v1/search", json={"collection": "shapes", "k": PAGE_K, **body})
    assert answer.status_code == 200, answer.text
    return answer.json()["hits"]  # type: ignore[no-any-return]


def query_of(page: Page) -> dict[str, list[str]]:
    return parse_qs(urlsplit(page.url).query)


def test_enter_searches_and_the_results_are_the_apis_in_its_order(page: Page, site: Site) -> None:
    open_with_key(page, site.read_key)
    ids = search(page, "a red circle")
    assert ids == [hit["id"] for hit in api_hits(site, text="a red circle")]
    assert len(ids) == PAGE_K
    expect(page.locator("#results .result .score").first).to_have_text(re.compile(r"^-?\d\.\d{3}$"))
    assert query_of(page)["q"] == ["a red circle"]
    assert query_of(page)["collection"] == ["shapes"]
    # thumbnails load lazily from the thumbnail route, through the key header
    first = page.locator("#results .result img.thumb").first
    expect(first).to_have_attribute("src", re.compile(r"^blob:"))
    assert first.evaluate("img => img.complete && img.naturalWidth > 0")


def test_the_url_holds_the_query_so_reload_and_back_show_the_same_results(page: Page, site: Site) -> None:
    open_with_key(page, site.read_key)
    first = search(page, "a red circle")
    second = search(page, "a blue square")
    assert first != second
    page.reload()
    assert result_ids(page) == second
    expect(page.locator("#q")).to_have_value("a blue square")
    page.go_back()
    expect(page.locator("#q")).to_have_value("a red circle")
    assert result_ids(page) == first
    # a bookmarked URL with options, opened in a fresh page
    page.goto("/?q=a+green+triangle&collection=shapes&mode=hybrid&k=5")
    ids = result_ids(page)
    assert ids == [hit["id"] for hit in api_hits(site, text="a green triangle", mode="hybrid", k=5)]
    expect(page.locator("#mode")).to_have_value("hybrid")
    expect(page.locator("#k")).to_have_value("5")


def test_rerank_and_captions_order_as_the_api_and_captions_are_alt_text(page: Page, site: Site) -> None:
    open_with_key(page, site.read_key)
    held: list[Route] = []
    page.route("**/v1/search", lambda route: held.append(route))  # hold the request: the busy state is visible
    page.check("#rerank")
    page.check("#captions")
    page.fill("#q", "a yellow diamond")
    page.press("#q", "Enter")
    status = page.locator("#status")
    expect(status).to_have_attribute("data-state", "busy")
    expect(status).to_contain_text("Reranking")
    expect(page.locator("#results")).to_have_attribute("aria-busy", "true")
    for _ in range(100):  # the route handler runs while the test waits on the browser
        if held:
            break
        page.wait_for_timeout(50)
    assert held, "the page sent no search"
    held[0].continue_()
    page.unroute("**/v1/search")
    ids = result_ids(page)
    hits = api_hits(site, text="a yellow diamond", rerank=True, captions=True)
    assert ids == [hit["id"] for hit in hits]
    assert query_of(page)["rerank"] == ["1"] and query_of(page)["captions"] == ["1"]
    cards = page.locator("#results .result")
    for index, hit in enumerate(hits[:5]):
        card = cards.nth(index)
        assert hit["rerank_score"] is not None and hit["caption"]
        expect(card.locator(".rerank-score")).to_have_count(1)
        expect(card.locator(".caption")).to_have_text(hit["caption"])
        expect(card.locator("img.thumb")).to_have_attribute("alt", hit["caption"])


def test_without_captions_the_file_name_is_alt_text_and_no_rerank_score_shows(page: Page, site: Site) -> None:
    open_with_key(page, site.read_key, "/?q=a+red+square&collection=plain")
    ids = result_ids(page)
    hits = api_hits(site, collection="plain", text="a red square")
    assert ids == [hit["id"] for hit in hits] and len(ids) == 5
    cards = page.locator("#results .result")
    expect(cards.locator(".rerank-score")).to_have_count(0)
    expect(cards.locator(".caption")).to_have_count(0)
    for index, hit in enumerate(hits):
        assert not hit["payload"]["captions"]
        expect(cards.nth(index).locator("img.thumb")).to_have_attribute("alt", hit["path"].rsplit("/", 1)[-1])
    expect(page.locator("#load-more")).to_be_hidden()  # a page short of k is the last


def test_load_more_appends_the_next_page(page: Page, site: Site) -> None:
    open_with_key(page, site.read_key, "/?q=a+red+circle&collection=shapes&k=8")
    first_page = result_ids(page)
    assert len(first_page) == 8
    page.click("#load-more")
    expect(page.locator("#results .result")).to_have_count(16)
    everything = [hit["id"] for hit in api_hits(site, text="a red circle", k=16)]
    assert result_ids(page) == everything


def test_an_empty_answer_says_so(page: Page, site: Site) -> None:
    open_with_key(page, site.read_key)
    page.select_option("#collection", "other")  # an empty collection
    assert search(page, "a red circle") == []
    status = page.locator("#status")
    expect(status).to_have_attribute("data-state", "empty")
    expect(status).to_contain_text(re.compile(r"no images", re.IGNORECASE))
    expect(page.locator("#load-more")).to_be_hidden()


def test_a_score_bound_nothing_reaches_says_so_and_is_in_the_url(page: Page, site: Site) -> None:
    open_with_key(page, site.read_key, "/?q=a+red+circle&collection=shapes&min_score=0.99")
    assert result_ids(page) == [] == api_hits(site, text="a red circle", min_score=0.99)
    status = page.locator("#status")
    expect(status).to_have_attribute("data-state", "empty")
    expect(status).to_contain_text("No images scored above 0.99")
    expect(page.locator("#min-score")).to_have_value("0.99")
    # a bound some results reach keeps those only, as the API does
    page.fill("#min-score", "0.3")
    page.press("#q", "Enter")
    expected = [hit["id"] for hit in api_hits(site, text="a red circle", min_score=0.3)]
    assert expected and result_ids(page) == expected
    assert query_of(page)["min_score"] == ["0.3"]
