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
    expect(page.locator("#conversation .turn-answer")).to_have_text([asked.json()["answer"]])
    expect(page.locator("#answer")).to_have_attribute("data-state", "done")


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
    page.evaluate("() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)))")
    assert focused_result(page) == ids[1]  # focus returns to the result last shown


def test_questions_about_one_image_are_a_conversation_that_resets(page: Page, site: Site) -> None:
    open_with_key(page, site.read_key)
    ids = search(page, "a blue triangle")
    page.locator("#results .result .open").first.click()
    questions = ["how many shapes are there?", "what colour is the circle?"]
    with site.api() as client:  # the same conversation through the API: greedy, so the same answers
        first = client.post("/v1/ask", json={"collection": "shapes", "image_id": ids[0], "question": questions[0]})
        history = [{"question": questions[0], "answer": first.json()["answer"]}]
        second = client.post(
            "/v1/ask",
            json={"collection": "shapes", "image_id": ids[0], "question": questions[1], "history": history},
        )
    assert second.status_code == 200 and second.json()["turns_used"] == 1, second.text
    new_conversation = page.locator("#new-conversation")
    expect(new_conversation).to_be_hidden()
    for question in questions:
        page.fill("#question", question)
        page.press("#question", "Enter")
        expect(page.locator("#conversation .turn-question").last).to_have_text(question)
    answers = page.locator("#conversation .turn-answer")
    expect(answers).to_have_text([first.json()["answer"] or "(no answer)", second.json()["answer"] or "(no answer)"])
    expect(page.locator("#question")).to_have_value("")
    new_conversation.click()
    expect(page.locator("#conversation .turn")).to_have_count(0)
    expect(new_conversation).to_be_hidden()
    page.fill("#question", questions[1])
    page.press("#question", "Enter")
    expect(answers).to_have_text([first_answer_alone(site, ids[0], questions[1])])
    page.locator("#detail-next").click()
    expect(page.locator("#detail")).to_have_attribute("data-id", ids[1])
    expect(page.locator("#conversation .turn")).to_have_count(0)  # another image: another conversation


def test_older_turns_left_out_of_the_context_are_said_and_dimmed(page: Page, site: Site) -> None:
    open_with_key(page, site.read_key)
    search(page, "a red square")
    page.locator("#results .result .open").first.click()
    long = "is there a red circle or a blue square or a green triangle or a purple diamond left of a yellow circle?"
    # Ten turns of ~30 tokens each outgrow the shipped model's 256 positions (64 of them the image's),
    # however short its answers.
    for index in range(10):
        page.fill("#question", long)
        page.press("#question", "Enter")
        expect(page.locator("#conversation .turn")).to_have_count(index + 1)
    expect(page.locator("#answer")).to_contain_text("left out to fit the model's context")
    expect(page.locator("#conversation .turn[data-dropped]").first).to_be_visible()
    expect(page.locator("#conversation .turn").last).not_to_have_attribute("data-dropped", "true")


def first_answer_alone(site: Site, image_id: str, question: str) -> str:
    with site.api() as client:
        answer = client.post("/v1/ask", json={"collection": "shapes", "image_id": image_id, "question": question})
    return str(answer.json()["answer"]) or "(no answer)"
