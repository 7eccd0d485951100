"""The detail view: the image larger with its paths, size, tags and caption; a question to the generative model;
the keyboard alone: open, next, previous, close."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from tests.web.conftest import Site, open_with_key, search


def focused_result(page: Page) -> str | None:
    return page.evaluate("() => document.activeElement?.closest('.result')?.dataset.id ?? null")


def test_a_result_opens_larger_with_its_details_and_answers_a_question(page: Page, site: Site) -> None:
    open_with_key(page, site.read_key)
    ids = search(page, "a red circle")
    page.locator("#results .result .open").first.click()
    detail = page.locator("#detail")
    expect(detail).to_have_attribute("open", "")
    expect(detail).to_have_attribute("data-id", ids[0])
    with site.api() as client:
        image = client.get(f"/v1/collections/shapes/images/{ids[0]}").json()
        asked = client.post(
            "/v1/ask", json={"collection": "shapes", "image_id": ids[0], "question": "What shape is in the image?"}
        )
    assert asked.status_code == 200, asked.text
    expect(page.locator("#detail-paths")).to_contain_text(image["paths"][0])
    payload = image["payload"]
    expect(page.locator("#detail-size")).to_contain_text(f"{payload['width']} × {payload['height']} px")
    expect(page.locator("#detail-image")).to_have_attribute("src", re.compile("^blob:"))
    page.fill("#question", "What shape is in the image?")
    page.press("#question", "Enter")
    expect(page.locator("#answer")).to_have_text(asked.json()["answer"])


def test_the_keyboard_alone_opens_moves_between_and_closes_results(page: Page, site: Site) -> None:
    open_with_key(page, site.read_key)
    ids = search(page, "a green square")
    page.locator("#results .result .open").first.focus()
    page.keyboard.press("Enter")
    detail = page.locator("#detail")
    expect(detail).to_have_attribute("data-id", ids[0])
    page.keyboard.press("ArrowRight")
    expect(detail).to_have_attribute("data-id", ids[1])
    page.keyboard.press("ArrowRight")
    expect(detail).to_have_attribute("data-id", ids[2])
    page.keyboard.press("ArrowLeft")
    expect(detail).to_have_attribute("data-id", ids[1])
    page.locator("#question").focus()  # arrows edit the question, they do not move
    page.keyboard.type("ab")
    page.keyboard.press("ArrowLeft")
    expect(detail).to_have_attribute("data-id", ids[1])
    page.keyboard.press("Escape")
    expect(detail).not_to_have_attribute("open", "")
    assert focused_result(page) == ids[1]  # focus returns to the result last shown
