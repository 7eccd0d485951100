"""Stage 1 of the tiny shapes-world DeepSeek-VL: from random weights to captions (models/shapes-vlm-captions/).

Stage 2 (`models.train_vlm_questions`) continues from this checkpoint to answer questions and say Yes/No; its
output, models/shapes-vlm/, is the shipped model. Stage 1 keeps its own checkpoint so that stage 2 can be re-run.

What it does, in one command (`.venv/bin/python -m models.train_vlm`):
1. builds a `DeepseekVLForConditionalGeneration` with a small config and its processor through `reranker.tiny`
   (word-level tokenizer over the world's vocabulary and the prompts' words, the released chat template, 64 px
   input in 8 px patches: 64 image tokens);
2. pre-renders train-split scenes once, each at a random canvas side in [64, 256] px, through the production
   preprocessing (`reranker.images.prepare`, then the checkpoint's image processor), held in memory;
3. first teaches the vision tower and aligner alone to read each patch (what colour, shape and size covers it,
   how that object stands to the other one, where the patch is) through a linear head used only in training;
4. then trains on exactly the token sequences the production code builds (`render_prompt`, `expand_image_tokens`,
   the tokenizer with BOS, left padding with positions that count real tokens), loss on answer tokens only:
   first captioning alone (the caption prompt -> a complete caption), which teaches grounding. Half the captions
   are the scene's canonical one (left object first with `left of`, else upper object first with `above`, no
   sizes), so that greedy decoding has one answer to learn; the other half are any true complete caption, so
   that every phrasing a query may use gets its likelihood (the `caption` score). Then captioning
   mixed with the VQAScore question, a true caption -> "Yes" and, on the same image, a false one (mostly a hard
   negative: colours swapped, shapes swapped, relation inverted) -> "No", plus next-token loss on the quoted
   query of the true questions, so that the question context reads the image as a caption does;
5. saves with `save_pretrained` (model and processor) and `vlsearch.json`, reloads the directory through the
   production loader (`reranker.model.VisionLanguageModel`) and measures on test-split scenes at 64 and 256 px:
   caption accuracy, true caption vs its hard negatives for both score methods, and relation-query R@1 of
   shapes-clip alone and reranked (top 20) by each method; the method with the better rerank R@1 becomes the
   checkpoint's default `score_method`. Everything goes into models/shapes-vlm/training_log.txt.

Figures reached (seed 0, 2 shared CPU cores; the full table ends training_log.txt):
- vision phase 1800 steps (4.5 min), caption-only 2400 steps then 600 mixed with VQA (30.0 min with the vision
  phase and pre-rendering), 32.7 min in all with the evaluation; 1.11 M parameters, 4.4 MB;
- on 400 test scenes at 64 / 256 px: captions fully correct 0.922 / 0.932 (two-object scenes 0.885 / 0.900);
  the true relation caption beats all its hard negatives 0.862 (caption score) and 0.15 (vqa score: the yes/no
  objective stays at chance, as the issue's own measurement found);
- relation-query R@1 over 1000 scenes, 200 queries: shapes-clip alone 0.27; reranked by the caption score 0.92
  at both sizes (vqa score 0.105), so `caption` is the checkpoint's default method.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from transformers import DeepseekVLForConditionalGeneration, DeepseekVLProcessor, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from models import MODELS_DIR
from models.shapes_world import (
    COLOURS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    caption_is_complete,
    complete_captions,
    generate_scenes,
    hard_negatives_for,
    parse_caption,
    queries,
    relations_between,
    relevance_matrix,
    render,
    true_captions,
)
from models.train_clip import embed_images, embed_texts, recall_at_k
from models.training_log import training_log
from reranker.images import input_side, prepare
from reranker.model import VisionLanguageModel
from reranker.prompts import DEFAULT_CAPTION_PROMPT, VQA_QUESTION, expand_image_tokens, render_prompt
from reranker.scoring import CAPTION, SCORE_METHODS, VQA
from reranker.tiny import build_tiny_model, build_tiny_processor, save_tiny_model

CHECKPOINT_DIR = MODELS_DIR / "shapes-vlm-captions"  # stage 2 reads it; models/shapes-vlm is stage 2's
CLIP_DIR = MODELS_DIR / "shapes-clip"
WORDS: tuple[str, ...] = (*SIZES, *COLOURS, *SHAPES, *RELATIONS, "a")
IMAGE_SIZE = 64
PATCH_SIZE = 8
MODEL_SIZES: dict[str, Any] = {
    "hidden_size": 128, "intermediate_size": 384, "num_layers": 4, "num_heads": 4,
    "max_position_embeddings": 256,
    "vision_hidden_size": 64, "vision_intermediate_size": 256, "vision_layers": 4, "vision_heads": 2,
}
RERANK_K = 20  # CLIP candidates the generative model rescores, as the service's rerank_k default
_QUERY_SLOT = "QUERYSLOT"  # one unknown word: marks where the query goes in the tokenised VQA prompt


# ---------------------------------------------------------------- prompts, exactly as the production code builds them

def build_processor() -> DeepseekVLProcessor:
    """The checkpoint's processor: tiny word-level tokenizer, released chat template, 64 px in 8 px patches."""
    processor = build_tiny_processor(list(WORDS), image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    assert isinstance(processor, DeepseekVLProcessor)
    return processor


def prompt_ids(processor: DeepseekVLProcessor, text: str) -> list[int]:
    """Token ids of the chat prompt for one image and `text`, as VisionLanguageModel._prompt_ids builds them."""
    ids: list[int] = processor.tokenizer(expand_image_tokens(render_prompt(processor, text), processor))["input_ids"]
    return ids


class Prompts:
    """Token ids of training rows: caption prompt + caption + EOS, VQA question + Yes/No + EOS."""

    def __init__(self, processor: DeepseekVLProcessor) -> None:
        self.processor = processor
        tokenizer = processor.tokenizer
        self.eos = int(tokenizer.eos_token_id)
        self.yes = int(tokenizer.convert_tokens_to_ids("Yes"))
        self.no = int(tokenizer.convert_tokens_to_ids("No"))
        self.caption_prompt = prompt_ids(processor, DEFAULT_CAPTION_PROMPT)
        self.relation_ids = {int(tokenizer.convert_tokens_to_ids(r.split()[0])) for r in RELATIONS}
        # The VQA prompt is prefix + query + suffix; splitting once avoids rendering the template per example.
        slotted = prompt_ids(processor, VQA_QUESTION.format(query=_QUERY_SLOT))
        slot = slotted.index(tokenizer.unk_token_id)
        self.vqa_prefix, self.vqa_suffix = slotted[:slot], slotted[slot + 1:]
        self._words: dict[str, list[int]] = {}
        for query in ("a red circle left of a blue square", "a small green diamond"):
            if self.vqa(query)[0] != prompt_ids(processor, VQA_QUESTION.format(query=query)):
                raise AssertionError("the split VQA prompt differs from the production prompt")

    def words(self, text: str) -> list[int]:
        """Ids of `text` without special tokens (cached: the world has few distinct texts)."""
        if text not in self._words:
            self._words[text] = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._words[text]

    def caption(self, caption: str) -> tuple[list[int], int]:
        """Caption row and where its answer (caption + EOS) starts; the answer follows "Assistant:" with a space."""
        return [*self.caption_prompt, *self.words(" " + caption), self.eos], len(self.caption_prompt)

    def vqa(self, query: str, answer: bool | None = None) -> tuple[list[int], int, int]:
        """VQA row (prompt, then Yes/No + EOS when `answer` is given), where the query starts, where it ends."""
        words = self.words(query)
        row = [*self.vqa_prefix, *words, *self.vqa_suffix]
        if answer is not None:
            row += [self.yes if answer else self.no, self.eos]
        return row, len(self.vqa_prefix), len(self.vqa_prefix) + len(words)


# ---------------------------------------------------------------- data

def prerender(scenes: Sequence[Scene], processor: DeepseekVLProcessor, rng: np.random.Generator,
              sizes: tuple[int, int] = (64, 256), batch: int = 256) -> torch.Tensor:
    """Pixel values (float16 NCHW) of each scene rendered at a random side in `sizes`, preprocessed as in production."""
    image_processor = processor.image_processor
    side = input_side(image_processor)
    out = torch.empty((len(scenes), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.float16)
    for start in range(0, len(scenes), batch):
        images = [prepare(render(s, int(rng.integers(sizes[0], sizes[1] + 1))), side)
                  for s in scenes[start:start + batch]]
        pixels = image_processor(images, return_tensors="pt")["pixel_values"]
        out[start:start + len(images)] = pixels.to(torch.float16)
    return out


PATCH_CLASSES: tuple[tuple[str, ...], ...] = (tuple(COLOURS), SHAPES, SIZES)  # background is one more class each
PATCH_TARGETS = len(PATCH_CLASSES) + len(RELATIONS)  # the covering object's classes, then its relation bits


def patch_labels(scene: Scene, grid: int = IMAGE_SIZE // PATCH_SIZE) -> torch.Tensor:
    """Per patch (row-major, as the vision tower orders them), uint8 (PATCH_TARGETS, grid * grid).

    For the object covering at least a quarter of the patch (the most): its colour, shape and size indices,
    then 1 for each relation it stands in to the other object (left of, right of, above, below). Background
    patches get the last index of each class and no relation.
    """
    side = grid * 8
    coverage = []
    for obj in scene.objects:  # each object alone, white on black: its area per patch
        alone = Scene((replace(obj, rgb=(255, 255, 255)),), (0, 0, 0))
        pixels = np.asarray(render(alone, side), dtype=np.float32)[..., 0] / 255
        coverage.append(pixels.reshape(grid, 8, grid, 8).mean(axis=(1, 3)).reshape(-1))
    best = np.argmax(coverage, axis=0)
    covered = np.max(coverage, axis=0) >= 0.25
    labels = np.zeros((PATCH_TARGETS, grid * grid), dtype=np.uint8)
    for row, classes in enumerate(PATCH_CLASSES):
        labels[row] = len(classes)
    for patch in np.flatnonzero(covered):
        me = scene.objects[best[patch]]
        for row, (classes, value) in enumerate(zip(PATCH_CLASSES, (me.colour, me.shape, me.size), strict=True)):
            labels[row, patch] = classes.index(value)
        if len(scene.objects) == 2:
            for name in relations_between(me, scene.objects[1 - best[patch]]):
                labels[len(PATCH_CLASSES) + RELATIONS.index(name), patch] = 1
    return torch.from_numpy(labels)


class PatchHead(torch.nn.Module):
    """Reads each image token (the aligner's output) as what covers its patch (colour, shape, size), how that
    object stands to the other one (relation bits) and where the patch is.

    Used only while training and never saved. Learning from a few caption words per image, the language model
    was still blind after 300 steps (loss at the text-only floor); this dense signal makes the image tokens say
    plainly what and where each object is, first on its own (cheap: no language model), then alongside.
    """

    def __init__(self, hidden_size: int, grid: int = IMAGE_SIZE // PATCH_SIZE) -> None:
        super().__init__()
        self.sizes = [len(classes) + 1 for classes in PATCH_CLASSES]
        self.linear = torch.nn.Linear(hidden_size, sum(self.sizes) + len(RELATIONS) + 2)
        steps = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid * 2 - 1
        y, x = torch.meshgrid(steps, steps, indexing="ij")
        self.where: torch.Tensor
        self.register_buffer("where", torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1))

    def _split(self, features: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        out = self.linear(features)
        logits, start = [], 0
        for size in self.sizes:
            logits.append(out[..., start:start + size])
            start += size
        return logits, out[..., start:start + len(RELATIONS)], out[..., -2:]

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropies of the classes and the relation bits, plus squared error of the position."""
        logits, relations, where = self._split(features)
        total = F.mse_loss(where, self.where.expand_as(where))
        for row, class_logits in enumerate(logits):
            total = total + F.cross_entropy(class_logits.transpose(1, 2), labels[:, row].long())
        bits = labels[:, len(PATCH_CLASSES):].transpose(1, 2).float()
        return total + F.binary_cross_entropy_with_logits(relations, bits)

    @torch.no_grad()
    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """On patches an object covers: accuracy of its colour, shape and size, and of all its relation bits."""
        logits, relations, _ = self._split(features)
        on_object = labels[:, 0] < len(PATCH_CLASSES[0])
        result = {}
        for row, name in enumerate(("colour", "shape", "size")):
            result[name] = float((logits[row].argmax(-1) == labels[:, row].long())[on_object].float().mean())
        bits = labels[:, len(PATCH_CLASSES):].transpose(1, 2).bool()
        result["relations"] = float(((relations > 0) == bits).all(-1)[on_object].float().mean())
        return result


def _choice(rng: np.random.Generator, items: Sequence[str]) -> str:
    return items[int(rng.integers(len(items)))]


def canonical_caption(scene: Scene) -> str:
    """The one caption greedy decoding should learn to say: no sizes; of two objects, the left one first with
    `left of` when a horizontal relation holds, else the upper one first with `above`."""
    phrases = [f"a {o.colour} {o.shape}" for o in scene.objects]
    if len(phrases) == 1:
        return phrases[0]
    for name in ("left of", "above"):
        for relation in scene.relations():
            if relation.name == name:
                return f"{phrases[relation.subject]} {name} {phrases[relation.target]}"
    raise AssertionError("a two-object scene always has a relation")


def sample_caption(scene: Scene, rng: np.random.Generator, canonical_fraction: float = 0.0) -> str:
    """A complete caption: the canonical one with probability `canonical_fraction`; otherwise any true complete
    caption, half the time without sizes (the form of relation queries), half with some."""
    if rng.random() < canonical_fraction:
        return canonical_caption(scene)
    complete = complete_captions(scene)
    plain = [c for c in complete if parse_caption(c).kind in ("object", "relation")]
    sized = [c for c in complete if c not in plain]
    return _choice(rng, plain if rng.random() < 0.5 or not sized else sized)


_ALL_QUERIES: dict[str, list[str]] = {}


def _random_query(kind: str, rng: np.random.Generator) -> str:
    if kind not in _ALL_QUERIES:
        _ALL_QUERIES[kind] = queries(kind)
    return _choice(rng, _ALL_QUERIES[kind])


def sample_vqa_pair(scene: Scene, rng: np.random.Generator, hard_fraction: float = 0.7) -> tuple[str, str]:
    """A true caption of the scene and a false one, mostly a hard negative of a true relation caption."""
    two = len(scene.objects) == 2
    kind = str(rng.choice(["relation", "sized_relation", "object", "attribute"], p=[0.5, 0.2, 0.15, 0.15]) if two
               else rng.choice(["object", "attribute"]))
    positive = _choice(rng, true_captions(scene, [kind]))
    if two and rng.random() < hard_fraction:
        relation = positive if kind in ("relation", "sized_relation") else _choice(
            rng, true_captions(scene, ["relation"]))
        negatives = hard_negatives_for(scene, relation)
        if negatives:
            return positive, _choice(rng, negatives)
    while True:  # an easy negative: any query of the world that is false here
        negative = _random_query(str(rng.choice(["object", "attribute", "relation", "relation"])), rng)
        if not _is_true(scene, negative):
            return positive, negative


def _is_true(scene: Scene, caption: str) -> bool:
    return parse_caption(caption).text in true_captions(scene)


@dataclass
class Batch:
    """Rows that share a prefix (BOS, system prompt, "User: "), their right-padded rest and per-token targets."""

    prefix: torch.Tensor  # (1, prefix length): computed once per batch, its keys and values shared by every row
    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask (prefix included), position_ids of the rest
    images: torch.Tensor  # (rows,) index into the batch's images
    labels: torch.Tensor  # (rows, width), -100 where no loss
    weights: torch.Tensor  # (rows, width)

    def to(self, device: torch.device) -> Batch:
        """The same batch on `device`."""
        return Batch(self.prefix.to(device), {k: v.to(device) for k, v in self.inputs.items()},
                     self.images.to(device), self.labels.to(device), self.weights.to(device))


def make_batch(rows: list[tuple[list[int], list[tuple[int, float]], int]], pad_id: int, image_id: int) -> Batch:
    """Rows of (ids, [(position predicting ids[position + 1], weight)], image index) as one batch.

    Every row starts with the same text before its image; its keys and values are computed once and the rest
    of each row continues at the positions it has alone, so each row is scored exactly as the production code
    scores it (left padding with positions that count real tokens), for a third less compute.
    """
    first = rows[0][0]
    length = first.index(image_id)
    if any(ids[:length] != first[:length] for ids, _, _ in rows):
        raise ValueError("training rows do not share the text before the image")
    width = max(len(ids) for ids, _, _ in rows) - length
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length + width), dtype=torch.long)
    attention_mask[:, :length] = 1
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    weights = torch.zeros((len(rows), width))
    for r, (ids, targets, _) in enumerate(rows):
        rest = ids[length:]
        input_ids[r, : len(rest)] = torch.tensor(rest)
        attention_mask[r, length : length + len(rest)] = 1
        for position, weight in targets:
            labels[r, position - length] = ids[position + 1]
            weights[r, position - length] = weight
    position_ids = (length + torch.arange(width)).expand(len(rows), width)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    return Batch(torch.tensor([first[:length]]), inputs, torch.tensor([i for _, _, i in rows]), labels, weights)


def training_rows(scenes: Sequence[Scene], prompts: Prompts, rng: np.random.Generator, vqa: bool,
                  vqa_weight: float, query_weight: float, relation_weight: float = 1.0,
                  canonical_fraction: float = 0.0) -> list[tuple[list[int], list[tuple[int, float]], int]]:
    """Per scene a caption row; with `vqa` also a true and a false question on the same image.

    Weights make each objective a mean: caption tokens share 1 (a relation word counts `relation_weight`
    times), answers share `vqa_weight`, query tokens of the true questions share `query_weight`.
    """
    caption_rows, answer_rows, query_tokens = [], [], 0
    for index, scene in enumerate(scenes):
        ids, start = prompts.caption(sample_caption(scene, rng, canonical_fraction))
        caption_rows.append((ids, start, index))
        if vqa:
            positive, negative = sample_vqa_pair(scene, rng)
            for query, answer in ((positive, True), (negative, False)):
                row, query_start, query_end = prompts.vqa(query, answer)
                answer_rows.append((row, query_start, query_end, answer, index))
                query_tokens += (query_end - query_start) if answer else 0
    relation_ids = prompts.relation_ids
    caption_tokens = sum(len(ids) - start for ids, start, _ in caption_rows)
    rows = [(ids, [(p, (relation_weight if ids[p + 1] in relation_ids else 1.0) / caption_tokens)
                   for p in range(start - 1, len(ids) - 1)], image)
            for ids, start, image in caption_rows]
    for row, query_start, query_end, answer, image in answer_rows:
        answer_at = len(row) - 3  # the position that predicts Yes/No (then EOS)
        targets = [(answer_at, vqa_weight / len(answer_rows)), (answer_at + 1, 0.1 * vqa_weight / len(answer_rows))]
        if answer and query_weight > 0:
            # The query's first word comes right after the opening quote: predict each of its words.
            targets += [(p, query_weight / query_tokens) for p in range(query_start - 1, query_end - 1)]
        rows.append((row, targets, image))
    return rows


# ---------------------------------------------------------------- training

def build_model(processor: DeepseekVLProcessor, seed: int) -> DeepseekVLForConditionalGeneration:
    """A randomly initialised model of MODEL_SIZES matching the processor."""
    model = build_tiny_model(processor, seed=seed, **MODEL_SIZES)
    assert isinstance(model, DeepseekVLForConditionalGeneration)
    return model


def learning_rate(progress: float, peak: float) -> float:
    """Linear warm-up over the first 3% of training, then cosine decay to a tenth of the peak."""
    if progress < 0.03:
        return peak * max(progress, 0.003) / 0.03
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (progress - 0.03) / 0.97)))


def training_step(model: DeepseekVLForConditionalGeneration, pixels: torch.Tensor, batch: Batch,
                  patches: tuple[PatchHead, torch.Tensor, float] | None = None) -> torch.Tensor:
    """The weighted loss of one batch: each image encoded once, the shared prefix run once.

    `patches` is (head, labels, weight): adds the weighted patch-reading loss of the batch's images.
    """
    features, output = forward_rows(model, pixels, batch)
    extra = patches[2] * patches[0].loss(features, patches[1]) if patches is not None else 0.0
    losses = F.cross_entropy(output.logits.float().transpose(1, 2), batch.labels, ignore_index=-100, reduction="none")
    return (losses * batch.weights).sum() + extra


def forward_rows(model: DeepseekVLForConditionalGeneration, pixels: torch.Tensor, batch: Batch,
                 hidden_states: bool = False) -> tuple[torch.Tensor, Any]:
    """The batch's image features and the model's output for its rows: each image encoded once, the rows'
    shared prefix run once and its keys and values shared by every row."""
    features = model.model.get_image_features(pixels.float(), return_dict=True).pooler_output
    text_config: Any = model.config.text_config
    cache = DynamicCache(config=text_config)
    model.model.language_model(input_ids=batch.prefix, cache=cache, use_cache=True)
    rows = len(batch.images)
    for layer in cache.layers:
        assert isinstance(layer, DynamicLayer) and layer.keys is not None and layer.values is not None
        layer.keys, layer.values = layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1)
    encoded = BaseModelOutputWithPooling(pooler_output=features[batch.images])
    output = model(**batch.inputs, cache=cache, mm_encoder_outputs={"image": encoded}, use_cache=True,
                   output_hidden_states=hidden_states)
    return features, output


def adamw(parameters: Sequence[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float
          ) -> torch.optim.AdamW:
    """AdamW that decays matrices only (not embeddings, norms or biases)."""
    decays = [p for n, p in parameters if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in parameters if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decays, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.98))


def optimise(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One optimiser step on `loss`, the model's gradient norm clipped at 1."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_vision(model: DeepseekVLForConditionalGeneration, head: PatchHead, pixels: torch.Tensor,
                 labels: torch.Tensor, args: argparse.Namespace, rng: np.random.Generator,
                 log: Callable[[str], None]) -> None:
    """Phase 1: vision tower and aligner learn to read patches (colour, shape, size, position), no language model."""
    parameters = [(n, p) for n, p in model.named_parameters()
                  if n.startswith(("model.vision_model.", "model.aligner."))]
    optimizer = adamw([*parameters, *head.named_parameters()], args.lr, args.weight_decay)
    started, step, progress = time.time(), 0, 0.0
    while progress < 1:
        chosen = torch.from_numpy(rng.choice(len(pixels), args.vision_batch_size, replace=False))
        device = next(model.parameters()).device
        # Flat after warm-up: patch shapes are learnt late (after ~1000 steps), and the next phase continues this.
        set_lr(optimizer, args.lr * min(1.0, max(progress, 0.003) / 0.03))
        features = model.model.get_image_features(pixels[chosen].to(device).float(), return_dict=True).pooler_output
        loss = head.loss(features, labels[chosen].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        progress = max(step / args.vision_steps, (time.time() - started) / (60 * args.vision_minutes))
        if step % (4 * args.log_every) == 1 or progress >= 1:
            log(f"vision step {step:5d}/{args.vision_steps}  patch loss {loss.item():.4f}  "
                f"{time.time() - started:6.0f} s")


def train(args: argparse.Namespace, processor: DeepseekVLProcessor, log: Callable[[str], None]
          ) -> DeepseekVLForConditionalGeneration:
    """Vision warm-up on patch labels, caption warm-up, then captioning mixed with VQA.

    Each phase ends at its step count or its minutes, whichever comes first.
    """
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    started = time.time()
    scenes = generate_scenes("train", args.scenes, seed=args.seed)
    pixels = prerender(scenes, processor, rng)
    labels = torch.stack([patch_labels(scene) for scene in scenes])
    log(f"pre-rendered {len(scenes)} train scenes and their patch labels in {time.time() - started:.0f} s")
    validation = generate_scenes("validation", args.validation_scenes, seed=args.seed)
    validation_pixels = prerender(validation, processor, np.random.default_rng(args.seed))
    validation_labels = torch.stack([patch_labels(scene) for scene in validation])

    device = torch.device(args.device)
    model = build_model(processor, args.seed)
    model.to(device)  # type: ignore[arg-type]  # transformers types .to() as a decorated method
    text_config: Any = model.config.text_config
    head = PatchHead(text_config.hidden_size).to(device)
    validation_pixels, validation_labels = validation_pixels.to(device), validation_labels.to(device)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    model.train()

    def patch_accuracy() -> str:
        with torch.no_grad():
            features = model.model.get_image_features(validation_pixels.float(), return_dict=True).pooler_output
        return ", ".join(f"{kind} {value:.3f}" for kind, value in head.accuracy(features, validation_labels).items())

    train_vision(model, head, pixels, labels, args, rng, log)
    log(f"  validation patches read: {patch_accuracy()}")

    prompts = Prompts(processor)
    pad_id, image_id = int(processor.tokenizer.pad_token_id), int(processor.image_token_id)
    trained = [(n, p) for n, p in model.named_parameters()
               if not (args.freeze_vision and n.startswith("model.vision_model."))]
    if args.freeze_vision:  # keep what the vision phase learnt to read; the language model learns to use it
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(not name.startswith("model.vision_model."))
    optimizer = adamw([*trained, *head.named_parameters()], args.lr, args.weight_decay)
    order, cursor, step, progress = rng.permutation(len(scenes)), 0, 0, 0.0
    train_started = time.time()
    # Progress is the larger of steps done and time used, so a busy shared machine ends sooner, not later.
    while progress < 1:
        vqa = progress >= args.caption_only
        batch_size = args.mixed_batch_size if vqa else args.batch_size
        if cursor + batch_size > len(order):
            order, cursor = rng.permutation(len(scenes)), 0
        chosen = torch.from_numpy(order[cursor:cursor + batch_size])
        cursor += batch_size
        rows = training_rows([scenes[i] for i in chosen], prompts, rng, vqa, args.vqa_weight, args.query_weight,
                             args.relation_weight, args.canonical_fraction)
        lr = learning_rate(progress, args.lr)
        set_lr(optimizer, lr)
        patches = (head, labels[chosen].to(device), args.patch_weight) if args.patch_weight > 0 else None
        batch = make_batch(rows, pad_id, image_id).to(device)
        loss = training_step(model, pixels[chosen].to(device), batch, patches)
        optimise(model, optimizer, loss)
        step += 1
        elapsed = time.time() - train_started
        progress = max(step / args.steps, elapsed / (60 * args.max_minutes))
        if step % args.log_every == 1 or progress >= 1:
            log(f"step {step:5d}/{args.steps}  {'mixed' if vqa else 'caption'}  loss {loss.item():.4f}  "
                f"lr {lr:.2e}  {elapsed:6.0f} s")
        if args.eval_every and step % args.eval_every == 0:
            vlm = VisionLanguageModel.from_components(model, processor, max_new_tokens=16)
            log("  validation " + json.dumps(quick_eval(vlm, validation, np.random.default_rng(0))))
            model.train()
    if step < args.steps:
        log(f"stopped at step {step} of {args.steps}: the {args.max_minutes}-minute training budget ran out")
    log(f"  validation patches read: {patch_accuracy()}")
    model.eval()
    return model


# ---------------------------------------------------------------- evaluation (used by the tests too)

def caption_accuracy(vlm: VisionLanguageModel, scenes: Sequence[Scene], side: int) -> float:
    """Fraction of scenes, rendered at `side` px, whose generated caption is complete and true."""
    captions = vlm.caption([render(s, side) for s in scenes])
    return float(np.mean([caption_is_complete(s, c) for s, c in zip(scenes, captions, strict=True)]))


def hard_negative_accuracy(vlm: VisionLanguageModel, scenes: Sequence[Scene], side: int, method: str,
                           rng: np.random.Generator) -> float:
    """Over two-object scenes: how often a true relation caption outscores every one of its false hard negatives."""
    picked = []
    for scene in scenes:
        if len(scene.objects) < 2:
            continue
        caption = _choice(rng, true_captions(scene, ["relation"]))
        negatives = hard_negatives_for(scene, caption)
        scores = vlm.score_texts(render(scene, side), [caption, *negatives], method=method)
        picked.append(scores[0] > max(scores[1:]))
    return float(np.mean(picked))


def quick_eval(vlm: VisionLanguageModel, scenes: Sequence[Scene], rng: np.random.Generator) -> dict[str, float]:
    """Caption accuracy and hard-negative accuracy of both methods at 64 px: the figures logged while training."""
    result = {"caption": caption_accuracy(vlm, scenes, 64)}
    for method in SCORE_METHODS:
        result[f"hard-neg {method}"] = hard_negative_accuracy(vlm, scenes, 64, method, rng)
    return {k: round(v, 3) for k, v in result.items()}


def load_clip(directory: Path = CLIP_DIR) -> tuple[Any, Any, Any]:
    """The shipped shapes-clip model, preprocessing and tokenizer through open_clip's `local-dir:`."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{directory}")


def relation_queries_with_a_match(scenes: Sequence[Scene], count: int, rng: np.random.Generator) -> list[str]:
    """Up to `count` relation queries (seeded choice) that are true of at least one of `scenes`."""
    everything = queries("relation")
    matched = [q for q, row in zip(everything, relevance_matrix(everything, scenes), strict=True) if row.any()]
    chosen = rng.choice(len(matched), size=min(count, len(matched)), replace=False)
    return [matched[i] for i in sorted(chosen)]


def rerank_recall(vlm: VisionLanguageModel, clip: tuple[Any, Any, Any], scenes: Sequence[Scene],
                  query_texts: Sequence[str], side: int, methods: Sequence[str] = SCORE_METHODS,
                  k: int = RERANK_K) -> dict[str, float]:
    """R@1 of CLIP alone, R@k of CLIP, and R@1 after each method reranks CLIP's top k (scenes rendered at `side`)."""
    model, preprocess, tokenizer = clip
    images = [render(s, side) for s in scenes]
    relevant = relevance_matrix(query_texts, scenes)
    clip_scores = embed_texts(model, tokenizer, query_texts) @ embed_images(model, preprocess, images).T
    recall = recall_at_k(clip_scores, relevant, ks=(1, k))
    result = {"clip R@1": recall[1], f"clip R@{k}": recall[k]}
    top = np.argsort(-clip_scores, axis=1, kind="stable")[:, :k]
    for method in methods:
        hits = []
        for q, query in enumerate(query_texts):
            scores = vlm.score(query, [images[i] for i in top[q]], method=method)
            hits.append(bool(relevant[q, top[q][int(np.argmax(scores))]]))
        result[f"rerank {method} R@1"] = float(np.mean(hits))
    return result


def full_report(vlm: VisionLanguageModel, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Every figure on the test split at 64 and 256 px, logged as it is measured."""
    rng = np.random.default_rng(args.seed)
    test = generate_scenes("test", args.test_scenes, seed=args.seed)
    collection = generate_scenes("test", args.collection_scenes, seed=args.seed + 1)
    query_texts = relation_queries_with_a_match(collection, args.test_queries, rng)
    clip = load_clip()
    log(f"test split (seed {args.seed}): {len(test)} scenes for captions and hard negatives "
        f"({sum(len(s.objects) == 2 for s in test)} with two objects); rerank over {len(collection)} scenes "
        f"(seed {args.seed + 1}) with {len(query_texts)} relation queries that have a match, CLIP top {RERANK_K}")
    report: dict[str, Any] = {}
    for side in (64, 256):
        figures: dict[str, float] = {"caption": caption_accuracy(vlm, test, side)}
        two = [s for s in test if len(s.objects) == 2]
        figures["caption (two objects)"] = caption_accuracy(vlm, two, side)
        for method in SCORE_METHODS:
            figures[f"hard-neg {method}"] = hard_negative_accuracy(vlm, test, side, method, np.random.default_rng(0))
        figures.update(rerank_recall(vlm, clip, collection, query_texts, side))
        report[str(side)] = figures
        log(f"{side} px: " + json.dumps({k: round(v, 3) for k, v in figures.items()}))
    return report


def default_method(report: dict[str, Any]) -> str:
    """The method whose worst rerank R@1 over the render sizes is higher (vqa on a tie, the production default)."""
    worst = {m: min(figures[f"rerank {m} R@1"] for figures in report.values()) for m in SCORE_METHODS}
    return CAPTION if worst[CAPTION] > worst[VQA] else VQA


def main(argv: Sequence[str] | None = None) -> None:
    """Train, save, reload through the production loader, evaluate, and record the default score method."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenes", type=int, default=20_000, help="pre-rendered train scenes")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--max-minutes", type=float, default=30.0, help="training-loop budget; ends early if hit")
    parser.add_argument("--caption-only", type=float, default=0.8, help="fraction of training that only captions")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="where to train (the shipped model is trained on cpu)")
    parser.add_argument("--freeze-vision", action="store_true",
                        help="after the vision phase, train the aligner and language model only")
    parser.add_argument("--canonical-fraction", type=float, default=0.5,
                        help="fraction of caption rows that use the canonical caption (what greedy decoding says)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per caption-only step")
    parser.add_argument("--mixed-batch-size", type=int, default=16, help="images per mixed step (3 rows each)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--vision-steps", type=int, default=1800, help="patch-reading steps before any text")
    parser.add_argument("--vision-minutes", type=float, default=7.0)
    parser.add_argument("--vision-batch-size", type=int, default=64)
    parser.add_argument("--patch-weight", type=float, default=0.2, help="patch-reading loss kept while captioning")
    parser.add_argument("--relation-weight", type=float, default=3.0,
                        help="weight of a caption's relation word: inverting it was the commonest caption error")
    parser.add_argument("--vqa-weight", type=float, default=1.0)
    parser.add_argument("--query-weight", type=float, default=0.5, help="next-token loss on true VQA queries")
    parser.add_argument("--validation-scenes", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=500, help="steps between validation figures; 0: never")
    parser.add_argument("--test-scenes", type=int, default=400)
    parser.add_argument("--collection-scenes", type=int, default=1000)
    parser.add_argument("--test-queries", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args(argv)

    with training_log(args.out) as log:
        started = time.time()
        log(f"shapes-vlm training: { {k: str(v) for k, v in vars(args).items()} }")
        log(f"model sizes: {json.dumps(MODEL_SIZES)}; image {IMAGE_SIZE} px, patch {PATCH_SIZE} px")
        processor = build_processor()
        model = train(args, processor, log)
        save_tiny_model(args.out, model, processor)
        weights = args.out / "model.safetensors"
        minutes = (time.time() - started) / 60
        log(f"trained and saved in {minutes:.1f} min; weights {weights.stat().st_size / 1e6:.1f} MB")

        vlm = VisionLanguageModel(str(args.out), device=args.device, dtype="float32", max_new_tokens=16)
        vlm.load()
        report = full_report(vlm, args, log)
        method = default_method(report)
        preferences = {"score_method": method}
        (args.out / "vlsearch.json").write_text(json.dumps(preferences, indent=2) + "\n", encoding="utf-8")
        log(f"default score method (vlsearch.json): {method}; finished in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
