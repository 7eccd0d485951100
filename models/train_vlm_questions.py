"""Stage 2 of shapes-vlm: teach the captioning checkpoint to answer the world's questions and to say Yes/No.

Stage 1 (`.venv/bin/python -m models.train_vlm`) trains models/shapes-vlm-captions/ from random weights: it reads
images and captions them, but its P("Yes") stays at chance. This stage continues from that checkpoint, seeded:

    .venv/bin/python -m models.train_vlm_questions      # stage 2, about 45 min on 2 shared CPU cores

1. the tokenizer gains the question grammar's words (`QUESTION_WORDS`, appended: every old id keeps its meaning)
   and the embeddings grow to match (new rows start at the mean of the old ones);
2. every step trains, on the same images, exactly the token sequences the production code builds: a caption
   (keeps stage 1's captions), the VQAScore question with a true caption -> "Yes" and a false one -> "No"
   (hard negatives mostly: colours swapped, shapes swapped, relation inverted), and questions of the grammar
   (`models.shapes_world.sample_question`: every kind, yes/no ones balanced with hard noes) -> their answers;
3. a training-only linear head reads the language model's last hidden state at each content word of a quoted
   query or yes/no question and predicts whether the statement *so far* holds in the image ("a red" -> is there
   a red object; "... circle left of" -> does that circle stand left of something). That dense signal is what
   makes the yes/no answer learnable in minutes by a 4-layer model: the answer only has to copy the truth of
   the last word. Stage 1's patch-reading head is kept too, so the image tokens keep saying what they show;
4. after training, P("Yes") is calibrated on VALIDATION pairs by Platt scaling of its log-odds (`vqa_calibration`
   in vlsearch.json, applied by the production scorer), and the checkpoint is saved and evaluated through the
   production loader on test scenes (`models.vlm_eval.report`): every figure goes into training_log.txt.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DeepseekVLForConditionalGeneration, DeepseekVLProcessor

from models import MODELS_DIR
from models.shapes_world import (
    COLOURS,
    QUESTION_WORDS,
    RELATIONS,
    SHAPES,
    SIZES,
    Caption,
    ObjectPhrase,
    Question,
    Scene,
    caption_is_true,
    generate_scenes,
    parse_caption,
    relations_between,
    sample_question,
    true_captions,
)
from models.train_vlm import (
    IMAGE_SIZE,
    PATCH_SIZE,
    WORDS,
    Batch,
    PatchHead,
    Prompts,
    adamw,
    forward_rows,
    learning_rate,
    make_batch,
    optimise,
    patch_labels,
    prerender,
    sample_caption,
    sample_vqa_pair,
    set_lr,
)
from models.training_log import training_log
from reranker.model import VisionLanguageModel
from reranker.prompts import Turn, expand_image_tokens, render_conversation
from reranker.tiny import build_tiny_processor, save_tiny_model

STAGE1_DIR = MODELS_DIR / "shapes-vlm-captions"
CHECKPOINT_DIR = MODELS_DIR / "shapes-vlm"
# Sampling weights of question kinds while training: relations and what stands where are the hard ones.
KIND_WEIGHTS: dict[str, float] = {
    "colour": 0.1,
    "shape": 0.1,
    "size": 0.1,
    "count": 0.05,
    "exists": 0.15,
    "relation": 0.3,
    "what_relation": 0.2,
}
_RELATION_WORDS = {"of": None, "above": "above", "below": "below"}


def build_processor() -> DeepseekVLProcessor:
    """Stage 1's processor with the question words appended to the vocabulary."""
    processor = build_tiny_processor([*WORDS, *QUESTION_WORDS], image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    assert isinstance(processor, DeepseekVLProcessor)
    return processor


def load_stage1(source: Path, processor: DeepseekVLProcessor) -> DeepseekVLForConditionalGeneration:
    """Stage 1's weights, embeddings grown to the new vocabulary (old ids checked to mean the same words)."""
    old = DeepseekVLProcessor.from_pretrained(str(source))
    old_vocab, new_vocab = old.tokenizer.get_vocab(), processor.tokenizer.get_vocab()
    if any(new_vocab.get(word) != index for word, index in old_vocab.items()):
        raise AssertionError("the grown vocabulary moved a stage-1 token")
    model = DeepseekVLForConditionalGeneration.from_pretrained(str(source), dtype=torch.float32)
    grown = len(new_vocab)
    embeddings: Any = model.get_input_embeddings()
    mean = embeddings.weight.data.mean(dim=0, keepdim=True)
    model.resize_token_embeddings(grown, mean_resizing=False)
    with torch.no_grad():
        embeddings = model.get_input_embeddings()
        embeddings.weight[len(old_vocab) :] = mean
        output: Any = model.get_output_embeddings()
        if output is not None and output.weight.data_ptr() != embeddings.weight.data_ptr():
            output.weight[len(old_vocab) :] = output.weight[: len(old_vocab)].mean(dim=0, keepdim=True)
    return model


# ---------------------------------------------------------------- the truth of a statement, word by word


def prefix_truths(scene: Scene, words: Sequence[str]) -> list[bool | None]:
    """Per word of a statement in the caption grammar (or a yes/no question of it): whether what has been said
    up to and including that word holds in the scene; None for words that add nothing (a, the, is, left, ...).

    The statement is "[size] colour shape [relation [size] colour shape]" with any filler words around.
    """
    phrases: list[dict[str, str]] = [{}]
    relation: str | None = None
    pending_side: str | None = None
    out: list[bool | None] = []
    for word in words:
        changed = True
        if word in SIZES:
            phrases[-1]["size"] = word
        elif word in COLOURS:
            phrases[-1]["colour"] = word
        elif word in SHAPES:
            phrases[-1]["shape"] = word
        elif word in ("left", "right"):
            pending_side, changed = word, False
        elif word in _RELATION_WORDS and (word != "of" or pending_side) and relation is None:
            relation = f"{pending_side} of" if word == "of" else word
            phrases.append({})
        else:
            changed = False
        out.append(_holds(scene, phrases, relation) if changed else None)
    return out


def _matches(obj: Any, wanted: dict[str, str]) -> bool:
    return all(getattr(obj, key) == value for key, value in wanted.items())


def _holds(scene: Scene, phrases: list[dict[str, str]], relation: str | None) -> bool:
    subjects = [i for i, o in enumerate(scene.objects) if _matches(o, phrases[0])]
    if relation is None:
        return bool(subjects)
    target = phrases[1] if len(phrases) > 1 else {}
    return any(
        relation in relations_between(scene.objects[i], o) and _matches(o, target)
        for i in subjects
        for j, o in enumerate(scene.objects)
        if j != i
    )


# ---------------------------------------------------------------- training rows


class QuestionPrompts(Prompts):
    """Stage 1's caption and VQA rows, plus question rows: the question's chat prompt, then answer + EOS."""

    def __init__(self, processor: DeepseekVLProcessor) -> None:
        super().__init__(processor)
        self._questions: dict[tuple[tuple[Turn, ...], str], list[int]] = {}
        vocab = processor.tokenizer.get_vocab()
        self.word_of = {index: word for word, index in vocab.items()}

    def question(self, text: str, answer: str, turns: Sequence[Turn] = ()) -> tuple[list[int], int]:
        """Question row (after earlier `turns` of the conversation, if any) and where its answer starts (after
        "Assistant:" and a space, as generation reads it). The prompt is the one `converse()` renders."""
        key = (tuple(turns), text)
        if key not in self._questions:
            rendered = render_conversation(self.processor, turns, text)
            self._questions[key] = self.processor.tokenizer(expand_image_tokens(rendered, self.processor))["input_ids"]
        prompt = self._questions[key]
        return [*prompt, *self.words(" " + answer), self.eos], len(prompt)


Row = tuple[list[int], list[tuple[int, float]], int]


NEAR_MISS_EDITS = ("subject colour", "subject shape", "target colour", "target shape", "relation")


def sample_near_miss(scene: Scene, rng: np.random.Generator,
                     edit_weights: Sequence[float] = (1, 1, 1, 1, 1)) -> tuple[str, str]:
    """A true relation caption (a true object caption for one object) and a false one word away from it.

    What CLIP's top candidates for a relation query look like: the right objects but one colour, shape or the
    relation wrong, or only one of the two objects there. Hard negatives (swaps) alone leave these unlearnt.
    """
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        positive = f"a {obj.colour} {obj.shape}"
        other = f"a {_pick(rng, [c for c in COLOURS])} {_pick(rng, list(SHAPES))}"
        return positive, f"{positive} {_pick(rng, list(RELATIONS))} {other}"
    relations = true_captions(scene, ["relation"])
    positive = _pick(rng, relations)
    parsed = parse_caption(positive)
    assert parsed.relation is not None and parsed.target is not None
    subject, target = parsed.subject, parsed.target
    while True:
        weights = np.asarray(edit_weights, dtype=np.float64)
        edit = int(rng.choice(len(NEAR_MISS_EDITS), p=weights / weights.sum()))
        if edit == 0:
            subject = ObjectPhrase(_pick(rng, [c for c in COLOURS if c != subject.colour]), subject.shape)
        elif edit == 1:
            subject = ObjectPhrase(subject.colour, _pick(rng, [s for s in SHAPES if s != subject.shape]))
        elif edit == 2:
            target = ObjectPhrase(_pick(rng, [c for c in COLOURS if c != target.colour]), target.shape)
        elif edit == 3:
            target = ObjectPhrase(target.colour, _pick(rng, [s for s in SHAPES if s != target.shape]))
        relation = _pick(rng, [r for r in RELATIONS if r != parsed.relation]) if edit == 4 else parsed.relation
        negative = Caption(subject, relation, target)
        if subject != target and not caption_is_true(scene, negative):
            return positive, negative.text
        subject, target = parsed.subject, parsed.target


def _pick(rng: np.random.Generator, items: Sequence[str]) -> str:
    return items[int(rng.integers(len(items)))]


def training_rows(
    scenes: Sequence[Scene], prompts: QuestionPrompts, rng: np.random.Generator, args: argparse.Namespace
) -> tuple[list[Row], list[tuple[int, int, bool]]]:
    """Rows of one step and the truth labels of the head: (row, position, holds) for each content word.

    Weights make each objective a mean: caption tokens share 1 (relation words count 3 times, as in stage 1),
    VQA answers share `vqa_weight`, question answer tokens share `question_weight`.
    """
    kinds, weights = list(KIND_WEIGHTS), np.array(list(KIND_WEIGHTS.values()))
    captions: list[tuple[list[int], int, int]] = []
    answers: list[tuple[list[int], int, int, str]] = []  # ids, answer start, image, group
    truths: list[tuple[int, int, bool]] = []
    statements: list[tuple[int, int, int, Scene]] = []  # answer row index, first word, end, scene
    true_spans: list[tuple[int, int, int]] = []  # answer row index, first word, end: statements that hold
    for image, scene in enumerate(scenes):
        ids, start = prompts.caption(sample_caption(scene, rng, args.canonical_fraction))
        captions.append((ids, start, image))
        near = rng.random() < args.near_miss_fraction
        positive, negative = sample_near_miss(scene, rng, args.near_miss_edits) if near else sample_vqa_pair(scene, rng)
        for query, answer in ((positive, True), (negative, False)):
            row, query_start, query_end = prompts.vqa(query, answer)
            statements.append((len(answers), query_start, query_end, scene))
            if answer:
                true_spans.append((len(answers), query_start, query_end))
            answers.append((row, len(row) - 2, image, "vqa"))
        for _ in range(args.questions_per_image):
            question: Question | None = None
            while question is None:
                question = sample_question(scene, str(rng.choice(kinds, p=weights / weights.sum())), rng)
            # Some questions come after earlier turns about the same image (right answers), so that an answer
            # does not depend on what was asked before it.
            turns: list[Turn] = []
            while rng.random() < args.conversation_fraction and len(turns) < 3:
                earlier = sample_question(scene, _pick(rng, kinds), rng)
                if earlier is not None:
                    turns.append((earlier.text, earlier.answer))
            row, start = prompts.question(question.text, question.answer, turns)
            if question.kind in ("exists", "relation"):
                # The question's words end 2 tokens ("Assistant", ":") before its answer.
                first = start - len(prompts.words(" " + question.text)) - 2
                statements.append((len(answers), first, start, scene))
                if question.answer == "yes":
                    true_spans.append((len(answers), first, start))
            answers.append((row, start, image, "question"))
    caption_tokens = sum(len(ids) - start for ids, start, _ in captions)
    rows: list[Row] = [
        (
            ids,
            [
                (p, (3.0 if ids[p + 1] in prompts.relation_ids else 1.0) / caption_tokens)
                for p in range(start - 1, len(ids) - 1)
            ],
            image,
        )
        for ids, start, image in captions
    ]
    vqa_rows = sum(group == "vqa" for *_, group in answers)
    question_tokens = sum(len(ids) - start for ids, start, _, group in answers if group == "question")
    # A statement that holds is also read as a caption is (next-token loss on its words), so that the question
    # context predicts "left" after "the red circle" as captioning does: the truth is then a comparison.
    statement_tokens = max(1, sum(end - first for _, first, end in true_spans))
    spans: dict[int, list[tuple[int, float]]] = {}
    for index, first, end in true_spans:
        spans.setdefault(index, []).extend((p, args.query_weight / statement_tokens) for p in range(first - 1, end - 1))
    for index, (ids, start, image, group) in enumerate(answers):
        if group == "vqa":  # Yes/No, then EOS at a tenth of the weight
            targets = [(start - 1, args.vqa_weight / vqa_rows), (start, 0.1 * args.vqa_weight / vqa_rows)]
        else:
            targets = [(p, args.question_weight / question_tokens) for p in range(start - 1, len(ids) - 1)]
        rows.append((ids, [*spans.get(index, []), *targets], image))
    for answer_index, first, end, scene in statements:
        ids = answers[answer_index][0]
        words = [prompts.word_of[token] for token in ids[first:end]]
        for offset, holds in enumerate(prefix_truths(scene, words)):
            if holds is not None:
                truths.append((len(captions) + answer_index, first + offset, holds))
    return rows, truths


# ---------------------------------------------------------------- one step


class TruthHead(torch.nn.Module):
    """Reads a hidden state as "what has been said so far holds" (training only, never saved)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)


def training_step(
    model: DeepseekVLForConditionalGeneration,
    pixels: torch.Tensor,
    batch: Batch,
    truths: list[tuple[int, int, bool]],
    truth_head: TruthHead,
    prefix_length: int,
    patches: tuple[PatchHead, torch.Tensor, float],
    truth_weight: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted loss of one batch (images encoded once, the shared prefix run once) and its parts."""
    features, output = forward_rows(model, pixels, batch, hidden_states=True)
    patch_loss = patches[0].loss(features, patches[1])
    losses = F.cross_entropy(output.logits.float().transpose(1, 2), batch.labels, ignore_index=-100, reduction="none")
    text_loss = (losses * batch.weights).sum()
    parts = {"text": text_loss.item(), "patch": patch_loss.item()}
    total = text_loss + patches[2] * patch_loss
    if truths:
        hidden = output.hidden_states[-1]
        row_index = torch.tensor([r for r, _, _ in truths], device=hidden.device)
        column = torch.tensor([p - prefix_length for _, p, _ in truths], device=hidden.device)
        labels = torch.tensor([float(h) for _, _, h in truths], device=hidden.device)
        logits = truth_head(hidden[row_index, column])
        truth_loss = F.binary_cross_entropy_with_logits(logits, labels)
        parts["truth"] = truth_loss.item()
        parts["truth acc"] = float(((logits > 0) == labels.bool()).float().mean())
        total = total + truth_weight * truth_loss
    return total, parts


def train(
    args: argparse.Namespace,
    processor: DeepseekVLProcessor,
    log: Callable[[str], None],
    evaluate: Callable[[VisionLanguageModel], dict[str, float]],
) -> DeepseekVLForConditionalGeneration:
    """Continue stage 1 on captions, VQAScore and questions together, until the steps or the minutes run out."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng([args.seed, 2])
    started = time.time()
    scenes = generate_scenes("train", args.scenes, seed=args.seed)
    pixels = prerender(scenes, processor, rng)
    labels = torch.stack([patch_labels(scene) for scene in scenes])
    log(f"pre-rendered {len(scenes)} train scenes and their patch labels in {time.time() - started:.0f} s")

    model = load_stage1(args.stage1, processor)
    text_config: Any = model.config.text_config
    patch_head = PatchHead(text_config.hidden_size)
    truth_head = TruthHead(text_config.hidden_size)
    model.train()
    prompts = QuestionPrompts(processor)
    pad_id, image_id = int(processor.tokenizer.pad_token_id), int(processor.image_token_id)
    optimizer = adamw(
        [*model.named_parameters(), *patch_head.named_parameters(), *truth_head.named_parameters()],
        args.lr,
        args.weight_decay,
    )
    order, cursor, step, progress = rng.permutation(len(scenes)), 0, 0, 0.0
    train_started = time.time()
    while progress < 1:
        if cursor + args.batch_size > len(order):
            order, cursor = rng.permutation(len(scenes)), 0
        chosen = torch.from_numpy(order[cursor : cursor + args.batch_size])
        cursor += args.batch_size
        rows, truths = training_rows([scenes[i] for i in chosen], prompts, rng, args)
        lr = learning_rate(progress, args.lr)
        set_lr(optimizer, lr)
        batch = make_batch(rows, pad_id, image_id)
        loss, parts = training_step(
            model,
            pixels[chosen],
            batch,
            truths,
            truth_head,
            batch.prefix.shape[1],
            (patch_head, labels[chosen], args.patch_weight),
            args.truth_weight,
        )
        optimise(model, optimizer, loss)
        step += 1
        elapsed = time.time() - train_started
        progress = max(step / args.steps, elapsed / (60 * args.max_minutes))
        if step % args.log_every == 1 or progress >= 1:
            log(
                f"step {step:5d}/{args.steps}  loss {loss.item():.4f}  "
                + "  ".join(f"{k} {v:.3f}" for k, v in parts.items())
                + f"  lr {lr:.2e}  {elapsed:6.0f} s"
            )
        if args.eval_every and step % args.eval_every == 0:
            model.eval()
            vlm = VisionLanguageModel.from_components(model, processor, max_new_tokens=16)
            log("  validation " + json.dumps(evaluate(vlm)))
            model.train()
    if step < args.steps:
        log(f"stopped at step {step} of {args.steps}: the {args.max_minutes}-minute training budget ran out")
    model.eval()
    return model


def main(argv: Sequence[str] | None = None) -> None:
    """Train stage 2, save it with stage 1's preferences, calibrate P("Yes"), evaluate through the production
    loader, and record the default score method."""
    from models import vlm_eval  # the evaluation imports shapes-clip helpers; keep `--help` light

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--stage1", type=Path, default=STAGE1_DIR, help="stage 1's checkpoint (captions)")
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenes", type=int, default=20_000, help="pre-rendered train scenes")
    parser.add_argument("--steps", type=int, default=4500)
    parser.add_argument("--max-minutes", type=float, default=36.0, help="training-loop budget; ends early if hit")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16, help="images per step")
    parser.add_argument("--questions-per-image", type=int, default=3)
    parser.add_argument("--conversation-fraction", type=float, default=0.0,
                        help="chance of each further earlier turn before a question (up to 3)")
    parser.add_argument("--near-miss-edits", type=lambda text: [float(w) for w in text.split(",")],
                        default=[1.0] * 5, help="weights of the near-miss edits: " + ", ".join(NEAR_MISS_EDITS))
    parser.add_argument("--near-miss-fraction", type=float, default=0.0,
                        help="VQA negatives one word from a true caption (sample_near_miss) instead of swaps")
    parser.add_argument("--canonical-fraction", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=8e-4)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--patch-weight", type=float, default=0.2)
    parser.add_argument("--truth-weight", type=float, default=0.5, help="the statement-so-far head's loss")
    parser.add_argument("--vqa-weight", type=float, default=1.0)
    parser.add_argument("--question-weight", type=float, default=1.0)
    parser.add_argument("--query-weight", type=float, default=0.5, help="next-token loss on statements that hold")
    parser.add_argument("--validation-scenes", type=int, default=60)
    parser.add_argument("--calibration-scenes", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=1000, help="steps between validation figures; 0: never")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--no-report", action="store_true", help="skip the full test-split report")
    args = parser.parse_args(argv)

    with training_log(args.out) as log:
        started = time.time()
        log(f"shapes-vlm questions stage from {args.stage1}: { {k: str(v) for k, v in vars(args).items()} }")
        processor = build_processor()
        validation = generate_scenes("validation", args.validation_scenes, seed=args.seed)

        def evaluate(vlm: VisionLanguageModel) -> dict[str, float]:
            return vlm_eval.quick(vlm, validation)

        model = train(args, processor, log, evaluate)
        preferences = json.loads((args.stage1 / "vlsearch.json").read_text(encoding="utf-8"))
        save_tiny_model(args.out, model, processor)
        log(
            f"trained and saved in {(time.time() - started) / 60:.1f} min; "
            f"weights {(args.out / 'model.safetensors').stat().st_size / 1e6:.1f} MB"
        )
        # Stage 1's own log stays with stage 1's checkpoint; the chat template is the released one, unchanged.
        if not (args.out / "chat_template.jinja").exists():
            shutil.copy(args.stage1 / "chat_template.jinja", args.out / "chat_template.jinja")

        calibration_scenes = generate_scenes("validation", args.calibration_scenes, seed=args.seed, start=10_000)
        preferences.pop("vqa_calibration", None)
        (args.out / "vlsearch.json").write_text(json.dumps(preferences, indent=2) + "\n", encoding="utf-8")
        vlm = VisionLanguageModel(str(args.out), device="cpu", dtype="float32", max_new_tokens=16)
        scale, bias, before, after = vlm_eval.fit_calibration(vlm, calibration_scenes)
        log(
            f"P(Yes) calibration on {len(calibration_scenes)} validation scenes: log-odds x {scale:.3f} + {bias:.3f}"
            f" (ECE {before:.3f} -> {after:.3f})"
        )
        preferences["vqa_calibration"] = [round(scale, 4), round(bias, 4)]
        (args.out / "vlsearch.json").write_text(json.dumps(preferences, indent=2) + "\n", encoding="utf-8")
        if args.no_report:
            return
        vlm = VisionLanguageModel(str(args.out), device="cpu", dtype="float32", max_new_tokens=16)
        vlm.load()
        report = vlm_eval.report(vlm, log)
        method = vlm_eval.default_method(report)
        preferences["score_method"] = method
        (args.out / "vlsearch.json").write_text(json.dumps(preferences, indent=2) + "\n", encoding="utf-8")
        log(f"default score method (vlsearch.json): {method}; finished in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
