"""VisionLanguageModel: one DeepSeek-VL, loaded once under a lock, that scores, captions and answers."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import GenerationConfig

from reranker.errors import EmptyQuery, PromptTooLong, UnknownScoreMethod, UnsupportedModel
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
    clean_generated_text,
    expand_image_tokens,
    render_prompt,
    single_token_ids,
)
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


class VisionLanguageModel:
    """DeepSeek-VL by hub id or local directory: `score` (rerank), `caption`, `ask`, `score_texts` (tags).

    Building one does no I/O; the first use (or `load()`) loads the weights once, under a lock. Inference
    runs one call at a time, in chunks of `chunk_size` candidates: peak memory is what chunk_size allows.
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
    ) -> None:
        if score_method is not None and score_method not in SCORE_METHODS:
            raise UnknownScoreMethod(
                f"score method {score_method!r} (score_method argument) "
                f"is not one of {', '.join(SCORE_METHODS)}"
            )
        if chunk_size < 1 or max_new_tokens < 1:
            raise ValueError(
                f"chunk_size ({chunk_size}) and max_new_tokens ({max_new_tokens}) must be at least 1"
            )
        self.source = source
        self.device = device
        self.dtype = dtype
        self.device_map = device_map
        self.chunk_size = chunk_size
        self.max_new_tokens = max_new_tokens
        self.local_files_only = local_files_only
        self.revision = revision
        self._requested_score_method = score_method
        self._requested_caption_prompt = caption_prompt
        self._loaded: LoadedVLM | None = None
        self._yes_ids: list[int] = []
        self._no_ids: list[int] = []
        self._identity: str | None = None
        self._in_memory = False
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()  # concurrent calls would multiply the activations chunk_size allows

    # --- loading -------------------------------------------------------------------------------------------

    def load(self) -> None:
        """Load weights and processor if not loaded yet; safe to call from several threads."""
        if self._loaded is not None:
            return
        with self._load_lock:
            if self._loaded is not None:
                return
            loaded = load_vlm(
                self.source,
                device=self.device,
                dtype=self.dtype,
                device_map=self.device_map,
                local_files_only=self.local_files_only,
                revision=self.revision,
            )
            self._install(loaded)

    @classmethod
    def from_components(
        cls, model: Any, processor: Any, source: str = "in-memory", **options: Any
    ) -> VisionLanguageModel:
        """Wrap a model and processor already in memory (a trainer's, a benchmark's); reads no files.

        Its identity is a sha256 of the parameters, since there are no files to name.
        """
        vlm = cls(source, **options)
        prepare_tokenizer(processor.tokenizer)
        device = model.get_input_embeddings().weight.device
        memory = LoadedVLM(model.eval(), processor, device, model.dtype, None, None, ModelPreferences())
        with vlm._load_lock:
            vlm._install(memory)
        vlm._in_memory = True
        return vlm

    def _install(self, loaded: LoadedVLM) -> None:
        """Check what scoring needs from a loaded model, then make it this object's model."""
        preferred = loaded.preferences.score_method
        if preferred is not None and preferred not in SCORE_METHODS:
            raise UnknownScoreMethod(
                f"{PREFERENCES_FILE} of {self.source} asks for score method {preferred!r}, "
                f"which is not one of {', '.join(SCORE_METHODS)}"
            )
        tokenizer = loaded.processor.tokenizer
        self._yes_ids = single_token_ids(tokenizer, YES_VARIANTS)
        self._no_ids = single_token_ids(tokenizer, NO_VARIANTS)
        if not self._yes_ids or not self._no_ids:
            raise UnsupportedModel(
                f"the tokenizer of {self.source} has no single token for {YES_VARIANTS} or "
                f"{NO_VARIANTS}, which the vqa score reads; set {MODEL_SETTING} to another checkpoint"
            )
        self._loaded = loaded

    @property
    def loaded(self) -> LoadedVLM:
        """The loaded model and processor (loads on first access)."""
        self.load()
        assert self._loaded is not None
        return self._loaded

    @property
    def model(self) -> Any:
        """The transformers model (DeepseekVLForConditionalGeneration or the hybrid class)."""
        return self.loaded.model

    @property
    def processor(self) -> Any:
        """The checkpoint's processor (tokenizer, image processor, chat template)."""
        return self.loaded.processor

    @property
    def identity(self) -> str:
        """Names the weights for caches: 'hub-id@commit', or 'sha256:…' of a local dir's weights, configs."""
        if self._identity is None and self._in_memory:
            self._identity = weights_identity(self.model)
        if self._identity is None:
            directory = local_directory(self.source)
            if directory is not None:
                self._identity = directory_identity(directory)
            else:
                self._identity = f"{self.source}@{self.loaded.commit or self.revision or 'main'}"
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
        scores: list[float] = []
        with self._run_lock:
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
        scores: list[float] = []
        with self._run_lock:
            features = self._encode([image])
            for start in range(0, len(texts), self.chunk_size):
                stop = start + self.chunk_size
                chunk_features = features.expand(len(rows[start:stop]), -1, -1)
                scores += self._score_chunk(rows[start:stop], answers[start:stop], chunk_features, chosen)
        return scores

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The aligned image embeddings the language model reads, (images, image tokens, hidden size)."""
        with self._run_lock:
            return self._encode(images)

    def _method(self, method: str | None) -> str:
        chosen = method or self.score_method
        if chosen not in SCORE_METHODS:
            raise UnknownScoreMethod(f"score method {chosen!r} is not one of {', '.join(SCORE_METHODS)}")
        return chosen

    def _encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        loaded = self.loaded
        image_processor = loaded.processor.image_processor
        side = input_side(image_processor)
        # Grouped: candidates of one shape are resized and normalised as one stacked tensor, not one by one
        # (transformers' default on CPU); the same values, in a fraction of the time for a chunk of photos.
        pixels = image_processor(prepare_all(images, side), return_tensors="pt", disable_grouping=False)
        inputs = {name: self._to_device(name, tensor) for name, tensor in pixels.items()}
        return image_features(loaded.model, inputs)

    def _prompt_ids(self, text: str) -> list[int]:
        """Ids of the chat-formatted prompt for one image and `text`: image tokens expanded, BOS included."""
        processor = self.processor
        prompt = expand_image_tokens(render_prompt(processor, text), processor)
        ids: list[int] = processor.tokenizer(prompt)["input_ids"]
        return ids

    def _rows(self, texts: Sequence[str], method: str) -> tuple[list[list[int]], list[list[int]]]:
        """Per text: prompt ids (vqa: question; caption: caption prompt + text), answer ids scored."""
        if any(not text.strip() for text in texts):
            raise EmptyQuery("the query (or a tag) is empty; there is no text to score")
        tokenizer = self.processor.tokenizer
        if method == VQA:
            rows = [self._prompt_ids(VQA_QUESTION.format(query=text.strip())) for text in texts]
            answers: list[list[int]] = [[] for _ in texts]
        else:
            prompt = self._prompt_ids(self.caption_prompt)
            # The template renders an assistant turn as "Assistant: {text}": the answer starts with a space.
            answers = [tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"] for text in texts]
            rows = [prompt + answer for answer in answers]
        for text, row in zip(texts, rows, strict=True):
            if len(row) > self.max_context:
                raise PromptTooLong(
                    f"the query {text[:40]!r}… makes a prompt of {len(row)} tokens, more than the "
                    f"{self.max_context} positions of {self.source} (max_position_embeddings in its "
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
            values = yes_probability(logits[:, -1], self._yes_ids, self._no_ids)
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
        return self._generate(images, prompt or self.caption_prompt, max_new_tokens or self.max_new_tokens)

    def ask(self, image: Image.Image, question: str, max_new_tokens: int | None = None) -> str:
        """The model's answer to `question` about `image`: greedy, plain text without template artefacts."""
        if not question.strip():
            raise EmptyQuery("the question is empty")
        return self._generate([image], question.strip(), max_new_tokens or self.max_new_tokens)[0]

    def _generate(self, images: Sequence[Image.Image], text: str, max_new_tokens: int) -> list[str]:
        loaded = self.loaded
        processor, tokenizer = loaded.processor, loaded.processor.tokenizer
        prompt = render_prompt(processor, text)
        prompt_length = len(self._prompt_ids(text))
        if prompt_length + max_new_tokens > self.max_context:
            raise PromptTooLong(
                f"a prompt of {prompt_length} tokens plus {max_new_tokens} new ones is more than the "
                f"{self.max_context} positions of {self.source}; shorten the question or lower max_new_tokens"
            )
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
        with self._run_lock, torch.inference_mode():
            for start in range(0, len(images), self.chunk_size):
                chunk = prepare_all(images[start : start + self.chunk_size], side)
                inputs = processor(
                    text=[prompt] * len(chunk), images=chunk, return_tensors="pt", padding=True
                )
                inputs = {name: self._to_device(name, tensor) for name, tensor in inputs.items()}
                output = loaded.model.generate(**inputs, generation_config=settings)
                new_tokens = output[:, inputs["input_ids"].shape[1] :]
                decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                texts += [clean_generated_text(answer) for answer in decoded]
        return texts

    def _to_device(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        loaded = self.loaded
        if name.endswith("pixel_values"):
            return tensor.to(loaded.input_device, loaded.dtype)
        return tensor.to(loaded.input_device)


_MODELS: dict[tuple[str, tuple[tuple[str, Any], ...]], VisionLanguageModel] = {}
_MODELS_LOCK = threading.Lock()


def get_model(source: str, **options: Any) -> VisionLanguageModel:
    """The process's loaded VisionLanguageModel for these arguments, built and loaded on first request."""
    key = (source, tuple(sorted(options.items())))
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            model = VisionLanguageModel(source, **options)
            _MODELS[key] = model
    model.load()  # outside the registry lock: loading one model must not block using another
    return model
