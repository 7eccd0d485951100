"""Service.ask with a conversation's history: by file or stored id, the turns the model read and dropped."""

from __future__ import annotations

from pathlib import Path

from core.service import Service
from reranker.model import VisionLanguageModel


def test_ask_with_history_matches_the_model_and_reports_its_turns(service: Service, indexed: Path) -> None:
    image_id = service.point_ids()[0]
    history = [("how many shapes are there?", "two"), ("is there a red circle?", "no")]
    answer = service.ask(image_id, "what colour is the circle?", history=history)
    vlm: VisionLanguageModel = service.container.vlm()
    reply = vlm.converse(service.load_image(image_id), "what colour is the circle?", history)
    assert (answer.answer, answer.turns_used, answer.turns_dropped) == (reply.answer, 2, 0)
    assert answer.to_dict() == {
        "image": image_id,
        "question": "what colour is the circle?",
        "answer": reply.answer,
        "turns_used": 2,
        "turns_dropped": 0,
    }
    alone = service.ask(image_id, "what colour is the circle?")
    assert (alone.turns_used, alone.turns_dropped) == (0, 0)


def test_a_long_history_is_cut_to_its_newest_turns(service: Service, indexed: Path) -> None:
    picture = next(indexed.rglob("*.png"))
    history = [(f"is there a red circle number {i}?", "no") for i in range(40)]
    answer = service.ask(str(picture), "how many shapes are there?", history=history)
    assert answer.turns_dropped > 0 and answer.turns_used + answer.turns_dropped == 40
    assert answer.image == str(picture)
