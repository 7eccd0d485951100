"""VisionLanguageModel: one DeepSeek-VL, loaded once under a lock, that scores, captions and answers."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import GenerationConfig

from indexer.errors import InvalidQuery
from reranker.errors import EmptyQuery, PromptTooLong, UnknownScoreMethod, UnsupportedModel, UnsupportedQuantization
from reranker.images import decode_side, input_side, prepare_all
from reranker.loading import (
    MODEL_SETTING,
    PREFERENCES_FILE,
    LoadedVLM,
    ModelPreferences,
    directory_identity,
    load_vlm,
    local_directory,
    prepare_tokenizer,
    weights_identity,
)
from reranker.prompts import (
    DEFAULT_CAPTION_PROMPT,
    NO_VARIANTS,
    VQA_QUESTION,
    YES_VARIANTS,
    Turn,
    clean_generated_text,
    expand_image_tokens,
    render_conversation,
    render_prompt,
    single_token_ids,
)
from reranker.quantization import check_quantization
from reranker.scoring import (
    SCORE_METHODS,
    VQA,
    answer_log_likelihood,
    forward_with_features,
    image_features,
    left_padded,
    shared_prefix_length,
    yes_probability,
)

# What names one copy of the weights and where it lives: source, device, dtype, device_map, revision,
# local_files_only, quantization. Behaviour options (chunk size, score method, prompts …) are not part of it.
WeightsKey = tuple[str, str, str, str | None, str | None, bool, str]


@dataclass(frozen=True)
class Reply:
    """An answer in a conversation, and how many of the earlier turns the prompt held."""

    answer: str
    turns_used: int  # the newest earlier turns the model read
    turns_dropped: int  # the oldest earlier turns left out so that the prompt fits the context


@dataclass(eq=False)
class SharedWeights:
    """One loaded copy of the weights and the locks of everyone who uses it.

    `run_lock`: one inference at a time on these weights (concurrent calls would multiply the activations
    chunk_size allows). `text_lock`: every use of the tokenizer and processor; transformers sets padding and
    truncation on the shared Rust tokenizer before each call, so concurrent calls raise `RuntimeError:
    Already borrowed` or silently get each other's settings (huggingface/tokenizers#537). Order: run_lock,
    then text_lock, never the other way round.
    """

    loaded: LoadedVLM
    run_lock: threading.Lock = field(default_factory=threading.Lock)
    text_lock: threading.Lock = field(default_factory=threading.Lock)


class VisionLanguageModel:
    """DeepSeek-VL by hub id or local directory: `score` (rerank), `caption`, `ask`, `score_texts` (tags).

    Building one does no I/O; the first use (or `load()`) loads the weights once, under a lock. Inference
    runs one call at a time per copy of the weights, in chunks of `chunk_size` candidates: peak memory is what
    chunk_size allows. Safe to call from several threads. `shared=True` (what `get_model` does) takes the
    process's one copy of these weights, shared by models that differ only in behaviour options; otherwise the
    object loads a copy of its own. In a forked child the object forgets what it loaded in the parent and loads
    again on first use (CUDA does not survive a fork; a prefork Celery child gets its own model).
    """

    def __init__(
        self,
        source: str,
        device: str = "auto",
        dtype: str = "auto",
        device_map: str | None = None,
        score_method: str | None = None,
        chunk_size: int = 8,
        max_new_tokens: int = 32,
        caption_prompt: str | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        image_workers: int | None = None,
        shared: bool = False,
        quantization: str = "none",
    ) -> None:
        check_quantization(quantization)  # whether it can work on the device is known at load
        if score_method is not None and score_method not in SCORE_METHODS:
            raise UnknownScoreMethod(
                f"score method {score_method!r} (score_method argument) "
                f"is not one of {', '.join(SCORE_METHODS)}"
            )
        if chunk_size < 1 or max_new_tokens < 1:
            raise ValueError(
                f"chunk_size ({chunk_size}) and max_new_tokens ({max_new_tokens}) must be at least 1"
            )
        if image_workers is not None and image_workers < 1:
            raise ValueError(f"image_workers ({image_workers}) must be at least 1")
        self.source = source
        self.device = device
        self.dtype = dtype
        self.device_map = device_map
        self.chunk_size = chunk_size
        self.max_new_tokens = max_new_tokens
        self.local_files_only = local_files_only
        self.revision = revision
        self.quantization = quantization  # none | int8 | nf4 (reranker.quantization), applied at load
        self.image_workers = image_workers  # threads that prepare candidate images; None: a small default
        self.shared = shared
        self._requested_score_method = score_method
        self._requested_caption_prompt = caption_prompt
        self._weights: SharedWeights | None = None
        self._yes_ids: list[int] = []
        self._no_ids: list[int] = []
        self._identity: str | None = None
        self._in_memory = False
        self._load_lock = threading.Lock()
        _INSTANCES.add(self)

    # --- loading -------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Load weights and processor if not loaded yet; safe to call from several threads."""
        self._ready()

    def _ready(self) -> SharedWeights:
        """The weights this object runs on, loaded on first call."""
        weights = self._weights
        if weights is not None:
            return weights
        with self._load_lock:
            current = self._weights
            if current is None:
                if self.shared:
                    current = _shared_weights(self.weights_key, self._load_weights)
                else:
                    current = SharedWeights(self._load_weights())
                self._install(current)
            return current

    def _load_weights(self) -> LoadedVLM:
        return load_vlm(
            self.source,
            device=self.device,
            dtype=self.dtype,
            device_map=self.device_map,
            local_files_only=self.local_files_only,
            revision=self.revision,
            quantization=self.quantization,
        )

    @property
    def weights_key(self) -> WeightsKey:
        """What names this object's weights and their placement (a local directory by its resolved path)."""
        path = Path(self.source).expanduser()
        source = str(path.resolve()) if path.is_dir() else self.source
        return (
            source, self.device, self.dtype, self.device_map, self.revision, self.local_files_only, self.quantization
        )

    @classmethod
    def from_components(
        cls, model: Any, processor: Any, source: str = "in-memory", **options: Any
    ) -> VisionLanguageModel:
        """Wrap a model and processor already in memory (a trainer's, a benchmark's); reads no files.

        Its identity is a sha256 of the parameters, since there are no files to name. It is never shared
        with other objects, and a forked child keeps using it (there is nothing to reload it from).
        """
        if options.get("quantization", "none") != "none":
            raise UnsupportedQuantization("from_components wraps a model as it is: quantize it before, not by option")
        vlm = cls(source, **{**options, "shared": False})
        prepare_tokenizer(processor.tokenizer)
        device = model.get_input_embeddings().weight.device
        memory = LoadedVLM(model.eval(), processor, device, model.dtype, None, None, ModelPreferences())
        with vlm._load_lock:
            vlm._install(SharedWeights(memory))
        vlm._in_memory = True
        return vlm

    def _install(self, weights: SharedWeights) -> None:
        """Check what scoring needs from loaded weights, then make them this object's (caller holds _load_lock)."""
        loaded = weights.loaded
        preferred = loaded.preferences.score_method
        if preferred is not None and preferred not in SCORE_METHODS:
            raise UnknownScoreMethod(
                f"{PREFERENCES_FILE} of {self.source} asks for score method {preferred!r}, "
                f"which is not one of {', '.join(SCORE_METHODS)}"
            )
        with weights.text_lock:  # shared weights: other objects may be tokenising right now
            yes_ids = single_token_ids(loaded.processor.tokenizer, YES_VARIANTS)
            no_ids = single_token_ids(loaded.processor.tokenizer, NO_VARIANTS)
        if not yes_ids or not no_ids:
            raise UnsupportedModel(
                f"the tokenizer of {self.source} has no single token for {YES_VARIANTS} or "
                f"{NO_VARIANTS}, which the vqa score reads; set {MODEL_SETTING} to another checkpoint"
            )
        self._yes_ids, self._no_ids = yes_ids, no_ids
        self._weights = weights

    def _forget_after_fork(self) -> None:
        """In a forked child: drop the parent's weights (loaded again on first use) and its locks."""
        self._load_lock = threading.Lock()
        weights = self._weights
        if weights is None:
            return
        _PARENT_WEIGHTS.append(weights.loaded)
        # An in-memory model has no files to reload from: keep it, with fresh locks.
        self._weights = SharedWeights(weights.loaded) if self._in_memory else None

    @property
    def loaded(self) -> LoadedVLM:
        """The loaded model and processor (loads on first access)."""
        return self._ready().loaded

    @property
    def model(self) -> Any:
        """The transformers model (DeepseekVLForConditionalGeneration or the hybrid class)."""
        return self.loaded.model

    @property
    def processor(self) -> Any:
        """The checkpoint's processor (tokenizer, image processor, chat template).

        Its tokenizer is not safe to call from several threads at once; the methods of this class serialise
        their own use of it.
        """
        return self.loaded.processor

    @property
    def identity(self) -> str:
        """Names the weights for caches: 'hub-id@commit', or 'sha256:…' of a local dir's weights, configs.

        A quantized copy adds '+int8' or '+nf4': its captions may differ from the full-precision model's.
        """
        if self._identity is None and self._in_memory:
            self._identity = weights_identity(self.model)
        if self._identity is None:
            directory = local_directory(self.source)
            if directory is not None:
                identity = directory_identity(directory)
            else:
                identity = f"{self.source}@{self.loaded.commit or self.revision or 'main'}"
            self._identity = identity if self.quantization == "none" else f"{identity}+{self.quantization}"
        return self._identity

    @property
    def score_method(self) -> str:
        """The default method of `score`: the argument, else the checkpoint's vlsearch.json, else 'vqa'."""
        return self._requested_score_method or self.loaded.preferences.score_method or VQA

    @property
    def caption_prompt(self) -> str:
        """The prompt of `caption`: the argument, else the checkpoint's vlsearch.json, else the default."""
        return (
            self._requested_caption_prompt or self.loaded.preferences.caption_prompt or DEFAULT_CAPTION_PROMPT
        )

    @property
    def tag_prompt(self) -> str:
        """How verify_tags puts a tag to the model: the checkpoint's vlsearch.json, else the tag as it is."""
        return self.loaded.preferences.tag_prompt or "{label}"

    @property
    def tag_threshold(self) -> float | None:
        """The checkpoint's verification cut for its own score method (vlsearch.json); None if it names none."""
        preferences = self.loaded.preferences
        own_method = self._requested_score_method in (None, preferences.score_method)
        return preferences.tag_threshold if own_method else None

    @property
    def vqa_token_ids(self) -> tuple[list[int], list[int]]:
        """The (yes, no) token ids the vqa score sums: those variants of Yes / No that are one token."""
        self.load()
        return list(self._yes_ids), list(self._no_ids)

    @property
    def decode_side(self) -> int:
        """Decode candidates with both sides at least this (JPEG draft): smaller than a photo, all the model uses."""
        return decode_side(self.processor.image_processor)

    @property
    def max_context(self) -> int:
        """Positions the language model reads (text_config.max_position_embeddings)."""
        return int(self.model.config.text_config.max_position_embeddings)

    # --- scoring -------------------------------------------------------------------------------------------

    def score(self, query: str, images: Sequence[Image.Image], method: str | None = None) -> list[float]:
        """Relevance of each image to `query`, higher is better, in input order.

        'vqa' (VQAScore): P("Yes") to 'Does this figure show "{query}"? Please answer yes or no.', in [0, 1].
        'caption' (VisualGPTScore): mean log-probability of the query's tokens as the answer to the caption
        prompt, in (-inf, 0]. Each image is encoded once; candidates run in chunks of `chunk_size`.
        A query that does not fit in the model's context raises PromptTooLong (it is never truncated);
        an empty one raises EmptyQuery.
        """
        chosen = self._method(method)
        if not images:
            return []
        rows, answers = self._rows([query], chosen)
        weights = self._ready()
        scores: list[float] = []
        with weights.run_lock:
            for start in range(0, len(images), self.chunk_size):
                chunk = images[start : start + self.chunk_size]
                features = self._encode(chunk)
                scores += self._score_chunk(rows * len(chunk), answers * len(chunk), features, chosen)
        return scores

    def score_texts(self, image: Image.Image, texts: Sequence[str], method: str | None = None) -> list[float]:
        """How well each of `texts` describes `image` (the scores of `score`); the image is encoded once."""
        chosen = self._method(method)
        if not texts:
            return []
        rows, answers = self._rows(texts, chosen)
        weights = self._ready()
        scores: list[float] = []
        with weights.run_lock:
            features = self._encode([image])
            for start in range(0, len(texts), self.chunk_size):
                stop = start + self.chunk_size
                chunk_features = features.expand(len(rows[start:stop]), -1, -1)
                scores += self._score_chunk(rows[start:stop], answers[start:stop], chunk_features, chosen)
        return scores

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The aligned image embeddings the language model reads, (images, image tokens, hidden size)."""
        with self._ready().run_lock:
            return self._encode(images)

    def _method(self, method: str | None) -> str:
        chosen = method or self.score_method
        if chosen not in SCORE_METHODS:
            raise UnknownScoreMethod(f"score method {chosen!r} is not one of {', '.join(SCORE_METHODS)}")
        return chosen

    def _encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Image features of `images` (caller holds run_lock, which also guards the image processor)."""
        loaded = self.loaded
        image_processor = loaded.processor.image_processor
        side = input_side(image_processor)
        # Grouped: candidates of one shape are resized and normalised as one stacked tensor, not one by one
        # (transformers' default on CPU); the same values, in a fraction of the time for a chunk of photos.
        prepared = prepare_all(images, side, self.image_workers)
        pixels = image_processor(prepared, return_tensors="pt", disable_grouping=False)
        inputs = {name: self._to_device(name, tensor) for name, tensor in pixels.items()}
        return image_features(loaded.model, inputs)

    def _prompt_ids(self, processor: Any, text: str) -> list[int]:
        """Ids of the chat-formatted prompt for one image and `text`: image tokens expanded, BOS included.

        The caller holds text_lock.
        """
        return self._rendered_ids(processor, render_prompt(processor, text))

    def _rendered_ids(self, processor: Any, prompt: str) -> list[int]:
        """Ids of a chat-formatted prompt for one image: image tokens expanded, BOS included (caller: text_lock)."""
        ids: list[int] = processor.tokenizer(expand_image_tokens(prompt, processor))["input_ids"]
        return ids

    def _rows(self, texts: Sequence[str], method: str) -> tuple[list[list[int]], list[list[int]]]:
        """Per text: prompt ids (vqa: question; caption: caption prompt + text), answer ids scored."""
        if any(not text.strip() for text in texts):
            raise EmptyQuery("the query (or a tag) is empty; there is no text to score")
        weights = self._ready()
        processor = weights.loaded.processor
        max_context = self.max_context
        caption_prompt = self.caption_prompt
        with weights.text_lock:
            if method == VQA:
                rows = [self._prompt_ids(processor, VQA_QUESTION.format(query=text.strip())) for text in texts]
                answers: list[list[int]] = [[] for _ in texts]
            else:
                prompt = self._prompt_ids(processor, caption_prompt)
                # The template renders an assistant turn as "Assistant: {text}": the answer starts with a space.
                answers = [
                    processor.tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"] for text in texts
                ]
                rows = [prompt + answer for answer in answers]
        for text, row in zip(texts, rows, strict=True):
            if len(row) > max_context:
                raise PromptTooLong(
                    f"the query {text[:40]!r}… makes a prompt of {len(row)} tokens, more than the "
                    f"{max_context} positions of {self.source} (max_position_embeddings in its "
                    f"config.json); shorten the query"
                )
        return rows, answers

    def _score_chunk(
        self, rows: list[list[int]], answers: list[list[int]], features: torch.Tensor, method: str
    ) -> list[float]:
        loaded = self.loaded
        pad_id = loaded.processor.tokenizer.pad_token_id
        inputs = left_padded(rows, pad_id, loaded.input_device)
        prefix = shared_prefix_length(rows, loaded.processor.image_token_id)
        if method == VQA:
            logits = forward_with_features(loaded.model, inputs, features, logits_to_keep=1, prefix_length=prefix)
            values = yes_probability(
                logits[:, -1], self._yes_ids, self._no_ids, loaded.preferences.vqa_calibration
            )
        else:
            keep = max(len(answer) for answer in answers) + 1
            logits = forward_with_features(loaded.model, inputs, features, logits_to_keep=keep, prefix_length=prefix)
            values = answer_log_likelihood(logits, answers)
        return [float(value) for value in values.cpu()]

    # --- generation ----------------------------------------------------------------------------------------

    def caption(
        self, images: Sequence[Image.Image], prompt: str | None = None, max_new_tokens: int | None = None
    ) -> list[str]:
        """One caption per image, in input order: greedy, at most `max_new_tokens` tokens, plain text."""
        if not images:
            return []
        tokens = max_new_tokens or self.max_new_tokens
        fitted, _ = self._fitted(prompt or self.caption_prompt, (), tokens)
        return self._generate(images, fitted, tokens)

    def ask(
        self, image: Image.Image, question: str, max_new_tokens: int | None = None, history: Sequence[Turn] = ()
    ) -> str:
        """The model's answer to `question` about `image`: greedy, plain text without template artefacts.

        `history`: earlier (question, answer) turns about the same image, oldest first (see `converse`).
        """
        return self.converse(image, question, history, max_new_tokens).answer

    def converse(
        self, image: Image.Image, question: str, history: Sequence[Turn] = (), max_new_tokens: int | None = None
    ) -> Reply:
        """The answer to `question` about `image` after the earlier turns `history` (oldest first).

        The prompt is the released chat: the image once, in the first user turn kept. The oldest turns are left
        out until the prompt and max_new_tokens fit the context (the Reply says how many); a question that does
        not fit even alone raises PromptTooLong.
        """
        turns = [(asked.strip(), answered.strip()) for asked, answered in history]
        question = question.strip()
        if not question or any(not asked for asked, _ in turns):
            raise EmptyQuery("the question (or one of the history's questions) is empty")
        image_token = self.processor.image_token
        if any(image_token in text for turn in [*turns, (question, "")] for text in turn):
            raise InvalidQuery(f"a question or answer holds the image placeholder {image_token!r}; leave it out")
        tokens = max_new_tokens or self.max_new_tokens
        prompt, dropped = self._fitted(question, turns, tokens)
        answer = self._generate([image], prompt, tokens)[0]
        return Reply(answer, len(turns) - dropped, dropped)

    def _fitted(self, question: str, turns: Sequence[Turn], max_new_tokens: int) -> tuple[str, int]:
        """The chat prompt of `question` after as many of the newest `turns` as fit the context with
        max_new_tokens, and how many of the oldest were left out."""
        weights = self._ready()
        processor = weights.loaded.processor
        max_context = self.max_context

        def length(dropped: int) -> tuple[str, int]:
            prompt = render_conversation(processor, turns[dropped:], question)
            return prompt, len(self._rendered_ids(processor, prompt)) + max_new_tokens

        with weights.text_lock:
            # The length only shrinks as turns are left out: search for the fewest left out that fit.
            low, high = 0, len(turns)
            prompt, needed = length(high)
            if needed > max_context:
                raise PromptTooLong(
                    f"a prompt of {needed - max_new_tokens} tokens plus {max_new_tokens} new ones is more than "
                    f"the {max_context} positions of {self.source}; shorten the question or lower max_new_tokens"
                )
            while low < high:
                middle = (low + high) // 2
                candidate, needed = length(middle)
                if needed <= max_context:
                    high, prompt = middle, candidate
                else:
                    low = middle + 1
        return prompt, high

    def _generate(self, images: Sequence[Image.Image], prompt: str, max_new_tokens: int) -> list[str]:
        """Greedy answers to one chat-formatted `prompt` (from `_fitted`), one per image, in input order."""
        weights = self._ready()
        loaded = weights.loaded
        processor, tokenizer = loaded.processor, loaded.processor.tokenizer
        settings = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            suppress_tokens=[processor.image_token_id],
        )
        side = input_side(processor.image_processor)
        texts: list[str] = []
        with weights.run_lock, torch.inference_mode():
            for start in range(0, len(images), self.chunk_size):
                chunk = prepare_all(images[start : start + self.chunk_size], side, self.image_workers)
                with weights.text_lock:  # pads: sets padding on the shared tokenizer
                    inputs = processor(text=[prompt] * len(chunk), images=chunk, return_tensors="pt", padding=True)
                inputs = {name: self._to_device(name, tensor) for name, tensor in inputs.items()}
                output = loaded.model.generate(**inputs, generation_config=settings)
                new_tokens = output[:, inputs["input_ids"].shape[1] :]
                with weights.text_lock:
                    decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                texts += [clean_generated_text(answer) for answer in decoded]
        return texts

    def _to_device(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        loaded = self.loaded
        if name.endswith("pixel_values"):
            return tensor.to(loaded.input_device, loaded.dtype)
        return tensor.to(loaded.input_device)


# Per process: models by all their arguments, and one copy of the weights per WeightsKey that they share.
_MODELS: dict[tuple[str, tuple[tuple[str, Any], ...]], VisionLanguageModel] = {}
_MODELS_LOCK = threading.Lock()
_WEIGHTS: dict[WeightsKey, SharedWeights] = {}
_WEIGHTS_LOADING: dict[WeightsKey, threading.Lock] = {}  # one load at a time per key, others may run meanwhile
_WEIGHTS_LOCK = threading.Lock()
_INSTANCES: weakref.WeakSet[VisionLanguageModel] = weakref.WeakSet()
# In a forked child, what the parent had loaded: kept referenced, never freed there (its pages are shared
# copy-on-write with the parent, and CUDA memory of the parent's context must not be touched in a child).
_PARENT_WEIGHTS: list[LoadedVLM] = []


def _shared_weights(key: WeightsKey, load: Callable[[], LoadedVLM]) -> SharedWeights:
    """The process's one copy of the weights `key` names, loaded by `load()` on first request."""
    with _WEIGHTS_LOCK:
        weights = _WEIGHTS.get(key)
        if weights is not None:
            return weights
        loading = _WEIGHTS_LOADING.setdefault(key, threading.Lock())
    with loading:
        with _WEIGHTS_LOCK:
            weights = _WEIGHTS.get(key)
        if weights is None:
            weights = SharedWeights(load())
            with _WEIGHTS_LOCK:
                _WEIGHTS[key] = weights
        return weights


def get_model(source: str, **options: Any) -> VisionLanguageModel:
    """The process's loaded VisionLanguageModel for these arguments, built and loaded on first request.

    Models whose arguments differ only in behaviour (chunk_size, score_method, max_new_tokens, caption_prompt,
    image_workers) are different objects on one shared copy of the weights.
    """
    key = (source, tuple(sorted(options.items())))
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            model = VisionLanguageModel(source, **options, shared=True)
            _MODELS[key] = model
    model.load()  # outside the registry lock: loading one model must not block using another
    return model


def _forget_models_in_child() -> None:
    """A forked child (a prefork Celery worker) shares no model with its parent: it loads its own on first use.

    Locks are replaced too: a thread of the parent may have held one at the fork, and it does not exist here.
    A parent that loaded weights has run torch on its OpenMP threads, which the child lacks: a parallel region in
    the child then waits for them forever (pytorch/pytorch#17199, #41197), so such a child runs torch on one
    thread. A parent that never loaded a model (a Celery prefork parent) leaves the child's threads alone.
    """
    global _MODELS_LOCK, _WEIGHTS_LOCK
    parent_ran_torch = bool(_WEIGHTS) or any(model._weights is not None for model in list(_INSTANCES))
    _MODELS_LOCK = threading.Lock()
    _WEIGHTS_LOCK = threading.Lock()
    _MODELS.clear()
    _PARENT_WEIGHTS.extend(weights.loaded for weights in _WEIGHTS.values())
    _WEIGHTS.clear()
    _WEIGHTS_LOADING.clear()
    for model in list(_INSTANCES):
        model._forget_after_fork()
    if parent_ran_torch:
        torch.set_num_threads(1)


os.register_at_fork(after_in_child=_forget_models_in_child)
