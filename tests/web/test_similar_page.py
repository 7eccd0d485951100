"""Similar images from the page: a picked file, a dropped one, a pasted one, and "more like this" on a result."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from playwright.sync_api import Page, expect

from tests.web.conftest import Site, open_with_key, result_ids, scene_copy, search
from tests.web.test_search_page import PAGE_K, api_hits

SCENE = "00007.png"


def api_image_hits(site: Site, image: Path) -> list[dict[str, Any]]:
    with site.api() as client:
        answer = client.post(
            "/v1/search/image",
            files={"file": (image.name, image.read_bytes(), "image/png")},
            data={"options": f'{{"collection": "shapes", "k": {PAGE_K}}}'},
        )
    assert answer.status_code == 200, answer.text
    return answer.json()["hits"]  # type: ignore[no-any-return]


def test_a_picked_file_finds_its_scene_first(page: Page, site: Site, tmp_path: Path) -> None:
    upload = scene_copy(site, SCENE, tmp_path / "holiday.png")  # the same picture under another name
    open_with_key(page, site.read_key)
    search(page, "a red circle")
    page.set_input_files("#image-file", str(upload))
    expect(page.locator("#q")).to_have_value("")
    page.wait_for_function(
        "first => document.querySelector('#results .result')?.dataset.id === first",
        arg=api_image_hits(site, upload)[0]["id"],
    )
    hits = api_image_hits(site, upload)
    assert hits[0]["path"].endswith(SCENE)
    assert result_ids(page) == [hit["id"] for hit in hits]


def _drop_or_paste(page: Page, image: Path, event: str) -> None:
    page.evaluate(
        """([data, event]) => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
            const target = document.body;
            const options = {bubbles: true, cancelable: true};
            if (event === "drop") {
                target.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, ...options}));
                target.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, ...options}));
            } else {
                target.dispatchEvent(new ClipboardEvent("paste", {clipboardData: transfer, ...options}));
            }
        }""",
        [base64.b64encode(image.read_bytes()).decode(), event],
    )


def test_a_dropped_or_pasted_image_searches_too(page: Page, site: Site) -> None:
    open_with_key(page, site.read_key)
    expect(page.locator("#collection")).to_have_value("shapes")
    for event, scene in (("drop", "00011.png"), ("paste", "00019.png")):
        image = site.scenes / scene
        first = api_image_hits(site, image)[0]
        assert first["path"].endswith(scene)
        _drop_or_paste(page, image, event)
        page.wait_for_function(
            "first => document.querySelector('#results .result')?.dataset.id === first", arg=first["id"]
        )
        assert result_ids(page) == [hit["id"] for hit in api_image_hits(site, image)]


def test_more_like_this_searches_by_the_results_id(page: Page, site: Site) -> None:
    open_with_key(page, site.read_key)
    ids = search(page, "a blue triangle")
    chosen = ids[2]
    expected = [hit["id"] for hit in api_hits(site, image_id=chosen)]  # a stored image never finds itself
    assert chosen not in expected
    page.locator(f'#results .result[data-id="{chosen}"] .more-like-this').click()
    page.wait_for_function("first => document.querySelector('#results .result')?.dataset.id === first", arg=expected[0])
    assert result_ids(page) == expected
    query = parse_qs(urlsplit(page.url).query)
    assert query["image_id"] == [chosen] and "q" not in query
    expect(page.locator("#q")).to_have_value("")
    page.reload()  # a search by id is bookmarkable
    assert result_ids(page) == expected
