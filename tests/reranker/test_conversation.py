"""Conversations about one image: the released DeepSeek-VL chat format, the image once, the oldest turns dropped
to fit the context. On the shipped shapes-world model, through the production loader."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from indexer.errors import InvalidQuery
from models import MODELS_DIR
from models.shapes_world import generate_scenes, render
from reranker.errors import PromptTooLong
from reranker.model import VisionLanguageModel
from reranker.prompts import Turn, render_conversation

CHECKPOINT = MODELS_DIR / "shapes-vlm"
if not (CHECKPOINT / "config.json").exists():
    pytest.skip("the shipped shapes-vlm is not built yet", allow_module_level=True)

# deepseek_vl/models/processing_vlm.py (VLChatProcessor.system_prompt) of deepseek-ai/DeepSeek-VL.
SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)
TURNS: list[Turn] = [
    ("what colour is the circle?", "red"),
    ("how many shapes are there?", "two"),
    ("is there a blue square?", "no"),
    ("what shape is the green object?", "triangle"),
    ("what size is the red circle?", "small"),
]
SELF_CONTAINED = ["what colour is the circle?", "how many shapes are there?", "is there a red square?"]


def released_prompt(turns: list[Turn], question: str) -> str:
    """The prompt as DeepSeek-VL's own code builds it: Conversation.get_prompt of template "deepseek" (sep "\\n\\n",
    sep2 end of sentence, roles User/Assistant), the image tag leading the first user message, then .strip()."""
    seps = ["\n\n", "<｜end▁of▁sentence｜>"]
    contents = [text for turn in turns for text in turn] + [question]
    contents[0] = "<image_placeholder>" + contents[0]
    messages = [(("User", "Assistant")[i % 2], text) for i, text in enumerate(contents)] + [("Assistant", "")]
    prompt = SYSTEM_PROMPT + seps[0]
    for i, (role, message) in enumerate(messages):
        prompt += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
    return prompt.strip()


@pytest.fixture(scope="module")
def vlm() -> VisionLanguageModel:
    model = VisionLanguageModel(str(CHECKPOINT), device="cpu", max_new_tokens=8)
    model.load()
    return model


@pytest.fixture(scope="module")
def scene_image() -> Image.Image:
    return render(generate_scenes("test", 1, seed=3)[0], 64)


def test_reference_is_the_documented_released_format() -> None:
    expected = (
        f"{SYSTEM_PROMPT}\n\nUser: <image_placeholder>q1\n\nAssistant: a1<｜end▁of▁sentence｜>User: q2\n\nAssistant:"
    )
    assert released_prompt([("q1", "a1")], "q2") == expected


@pytest.mark.parametrize("earlier", [0, 1, 2, 5])
def test_a_conversation_renders_as_the_released_deepseek_vl_format(vlm: VisionLanguageModel, earlier: int) -> None:
    turns, question = TURNS[:earlier], "what shape is the red object?"
    expected = released_prompt(turns, question)
    assert render_conversation(vlm.processor, turns, question) == expected
    prompt, dropped = vlm._fitted(question, turns, 8)  # what generation is given
    assert (prompt, dropped) == (expected, 0)


@pytest.mark.parametrize("earlier", [0, 1, 5])
def test_the_image_goes_once_in_the_first_user_turn(
    vlm: VisionLanguageModel, scene_image: Image.Image, earlier: int
) -> None:
    processor = vlm.processor
    prompt = render_conversation(processor, TURNS[:earlier], "is there a red square?")
    assert prompt.count(processor.image_token) == 1
    assert prompt.index(processor.image_token) == prompt.index("User: ") + len("User: ")
    inputs = processor(text=[prompt], images=[scene_image], return_tensors="pt")
    assert int((inputs["input_ids"] == processor.image_token_id).sum()) == processor.num_image_tokens


def test_a_history_longer_than_the_context_drops_the_oldest_turns_and_says_so(
    vlm: VisionLanguageModel, scene_image: Image.Image
) -> None:
    # 256 positions: 64 image tokens and the system prompt leave room for a few turns only.
    turns = [(f"what colour is the circle number {i}?", f"red {i}") for i in range(30)]
    question = "how many shapes are there?"
    reply = vlm.converse(scene_image, question, turns)
    assert reply.turns_dropped > 0 and reply.turns_used > 0
    assert reply.turns_used + reply.turns_dropped == len(turns)
    prompt, dropped = vlm._fitted(question, turns, vlm.max_new_tokens)
    assert dropped == reply.turns_dropped
    kept = turns[dropped:]
    assert prompt == released_prompt(kept, question)  # the newest turns, the image moved into the first kept one
    assert "number 29?" in prompt and "number 0?" not in prompt
    with vlm._ready().text_lock:
        fits = len(vlm._rendered_ids(vlm.processor, prompt))
        one_more = len(
            vlm._rendered_ids(vlm.processor, render_conversation(vlm.processor, turns[dropped - 1 :], question))
        )
    assert fits + vlm.max_new_tokens <= vlm.max_context < one_more + vlm.max_new_tokens


def test_a_short_history_is_kept_whole(vlm: VisionLanguageModel, scene_image: Image.Image) -> None:
    reply = vlm.converse(scene_image, "how many shapes are there?", TURNS[:2])
    assert (reply.turns_used, reply.turns_dropped) == (2, 0)


def test_a_question_too_long_even_alone_is_refused(vlm: VisionLanguageModel, scene_image: Image.Image) -> None:
    with pytest.raises(PromptTooLong, match="positions"):
        vlm.converse(scene_image, "red " * 300, TURNS[:2])


def test_the_image_placeholder_in_a_turn_is_refused(vlm: VisionLanguageModel, scene_image: Image.Image) -> None:
    with pytest.raises(InvalidQuery, match="image placeholder"):
        vlm.converse(scene_image, "what is it?", [("what is <image_placeholder>?", "red")])


def test_ask_without_history_is_the_single_turn_answer(vlm: VisionLanguageModel, scene_image: Image.Image) -> None:
    question = SELF_CONTAINED[0]
    assert vlm.ask(scene_image, question) == vlm.converse(scene_image, question).answer
    assert vlm.ask(scene_image, question, history=TURNS[:1]) == vlm.converse(scene_image, question, TURNS[:1]).answer


def test_a_self_contained_question_answers_the_same_after_earlier_turns(
    vlm: VisionLanguageModel, scene_image: Image.Image
) -> None:
    # Equality, not correctness: whatever the checkpoint answers alone, it should answer after a conversation.
    history: list[Turn] = []
    for question in SELF_CONTAINED:
        alone = vlm.ask(scene_image, question)
        assert vlm.ask(scene_image, question, history=history) == alone, (question, history)
        history.append((question, alone))


@pytest.mark.parametrize("kind", ["plain", "hybrid"])
def test_both_model_classes_converse(tiny_dirs: dict[str, Path], scene_image: Image.Image, kind: str) -> None:
    tiny = VisionLanguageModel(str(tiny_dirs[kind]), device="cpu", max_new_tokens=4)
    reply = tiny.converse(scene_image, "a red circle", [("a blue square", "Yes")])
    assert (reply.turns_used, reply.turns_dropped) == (1, 0) and isinstance(reply.answer, str)
    prompt, _ = tiny._fitted("a red circle", [("a blue square", "Yes")], 4)
    assert prompt.count(tiny.processor.image_token) == 1
