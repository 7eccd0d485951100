"""The contrastive tower: any open_clip model, loaded once, embedding images and texts into one L2-normalised space."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image

from indexer.errors import VlsearchError, WeightsUnavailable

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
UNTRAINED = "untrained"


class UnknownModel(VlsearchError):
    """open_clip knows no model of that name."""


@dataclass(frozen=True)
class EncoderSpec:
    """Which open_clip model to build: a name (or `hf-hub:` / `local-dir:` id) and where its weights come from."""

    name: str  # what the manifest records: an open_clip name, "hf-hub:org/repo", "local-dir:/path" or a shipped name
    pretrained: str | None = (
        None  # a tag ("laion2b_s34b_b79k"), "hf-hub:org/repo", a checkpoint file, or None (untrained)
    )
    source: str | None = None  # the open_clip id to load when it differs from name (a shipped name -> "local-dir:...")

    @property
    def load_name(self) -> str:
        return self.source or self.name

    def identity(self) -> str:
        """What the weights are, for the manifest: the tag, the hub id, or sha256 of the checkpoint file."""
        if self.load_name.startswith(LOCAL_DIR_PREFIX):
            return _local_dir_identity(Path(self.load_name[len(LOCAL_DIR_PREFIX) :]))
        if self.load_name.startswith(HF_HUB_PREFIX):
            return self.load_name
        if self.pretrained is None:
            return UNTRAINED
        if _looks_like_path(self.pretrained):
            return "sha256:" + _sha256_file(Path(self.pretrained))
        return self.pretrained


def _looks_like_path(pretrained: str) -> bool:
    return "/" in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES) or Path(pretrained).exists()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _local_dir_identity(directory: Path) -> str:
    weights = sorted(p for p in directory.glob("open_clip_*") if p.suffix in (".safetensors", ".bin"))
    if not weights:
        raise WeightsUnavailable(
            f"no open_clip weights (open_clip_model.safetensors or open_clip_pytorch_model.bin) in {directory}; "
            "set --model / VLSEARCH_CLIP_MODEL to a directory that has them"
        )
    return "sha256:" + _sha256_file(weights[0])


def resolve_device(device: str) -> str:
    """'auto' picks CUDA when present, else CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_precision(precision: str, device: str) -> str:
    """'auto' is fp32 on CPU and bf16 (fp16 where bf16 is unsupported) on CUDA."""
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


class ClipEncoder:
    """An open_clip model behind load()/encode_*: cheap to build, loaded once under a lock."""

    def __init__(
        self,
        spec: EncoderSpec,
        device: str = "auto",
        precision: str = "auto",
        templates: Sequence[str] = ("{}",),
        template_max_words: int = 4,
        config_dirs: Sequence[Path] = (),
    ) -> None:
        self.spec = spec
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.templates = tuple(templates) or ("{}",)
        self.template_max_words = template_max_words
        self.config_dirs = tuple(config_dirs)
        self._lock = threading.Lock()
        self._model: Any = None
        self._preprocess: Callable[[Image.Image], torch.Tensor] | None = None
        self._tokenizer: Any = None
        self._identity: str | None = None
        self._dim: int | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def load(self) -> None:
        """Build the model and fetch or read its weights; idempotent and thread-safe."""
        if self._model is not None:
            return
        with self._lock:
            if self._model is not None:
                return
            for directory in self.config_dirs:
                open_clip.add_model_config(directory)
            self._check_known()
            self._identity = self.spec.identity()
            model, preprocess = self._create()
            model.eval()
            self._tokenizer = open_clip.get_tokenizer(self.spec.load_name)
            self._preprocess = preprocess
            with torch.inference_mode():  # probing is simpler than reading the many config layouts open_clip has
                self._dim = int(model.encode_text(self._tokenizer(["x"]).to(self.device)).shape[-1])
            self._model = model

    def _check_known(self) -> None:
        name = self.spec.load_name
        if name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
            if name.startswith(LOCAL_DIR_PREFIX) and not Path(name[len(LOCAL_DIR_PREFIX) :]).is_dir():
                raise WeightsUnavailable(
                    f"model directory {name[len(LOCAL_DIR_PREFIX) :]} does not exist; "
                    "check --model / VLSEARCH_CLIP_MODEL"
                )
            return
        if open_clip.get_model_config(name) is None:
            raise UnknownModel(
                f"open_clip has no model named {name!r}; set --model / VLSEARCH_CLIP_MODEL to one of "
                "open_clip.list_models(), an 'hf-hub:org/repo' id, or 'local-dir:/path'"
            )
        pretrained = self.spec.pretrained
        if pretrained and _looks_like_path(pretrained) and not Path(pretrained).is_file():
            raise WeightsUnavailable(
                f"checkpoint file {pretrained} not found; "
                "set --pretrained / VLSEARCH_CLIP_PRETRAINED to an existing file"
            )

    def _create(self) -> tuple[Any, Callable[[Image.Image], torch.Tensor]]:
        name = self.spec.load_name
        pretrained = None if name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)) else self.spec.pretrained
        try:
            # Untrained weights are seeded, so separate processes (index, then search) build the same model.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=pretrained, precision=self.precision, device=self.device
                )
        except VlsearchError:
            raise
        except Exception as error:  # open_clip and huggingface_hub raise many types for "weights not here"
            raise WeightsUnavailable(
                f"could not load weights for model {self.spec.name!r} (pretrained {self.spec.pretrained!r}): "
                f"{type(error).__name__}: {error}. Without hub access set --pretrained / VLSEARCH_CLIP_PRETRAINED "
                "to a local checkpoint file, or --model / VLSEARCH_CLIP_MODEL to 'local-dir:/path'"
            ) from error
        return model, preprocess

    @property
    def model(self) -> Any:
        self.load()
        return self._model

    @property
    def preprocess(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image -> normalised tensor, exactly the model's own preprocessing."""
        self.load()
        assert self._preprocess is not None
        return self._preprocess

    @property
    def identity(self) -> str:
        self.load()
        assert self._identity is not None
        return self._identity

    @property
    def dim(self) -> int:
        self.load()
        assert self._dim is not None
        return self._dim

    @property
    def image_size(self) -> int:
        """The shorter side the model sees (used to ask JPEG draft mode for just enough pixels)."""
        size = open_clip.get_model_preprocess_cfg(self.model).get("size", 224)
        return int(min(size) if isinstance(size, (tuple, list)) else size)

    def preprocessing(self) -> dict[str, Any]:
        """The model's preprocessing as data, for the manifest."""
        cfg = dict(open_clip.get_model_preprocess_cfg(self.model))
        return {key: list(value) if isinstance(value, tuple) else value for key, value in cfg.items()}

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """A batch of preprocessed images (N, 3, H, W) -> (N, dim) L2-normalised float32."""
        features = self.model.encode_image(pixels.to(self.device, self._dtype()))
        return _normalise(features)

    def encode_pil(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Decoded RGB images -> (N, dim) L2-normalised float32."""
        return self.encode_images(torch.stack([self.preprocess(image) for image in images]))

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str], use_templates: bool = True) -> np.ndarray:
        """Texts -> (N, dim) L2-normalised float32; short texts are averaged over the prompt templates."""
        self.load()
        prompts: list[str] = []
        spans: list[tuple[int, int]] = []
        for text in texts:
            templates = self.templates if use_templates and len(text.split()) <= self.template_max_words else ("{}",)
            spans.append((len(prompts), len(prompts) + len(templates)))
            prompts.extend(template.format(text) for template in templates)
        tokens = self._tokenizer(prompts).to(self.device)
        features = _normalise(self.model.encode_text(tokens))
        return _normalise_np(np.stack([features[start:end].mean(axis=0) for start, end in spans]))


def _normalise(features: torch.Tensor) -> np.ndarray:
    return _normalise_np(features.float().cpu().numpy())


def _normalise_np(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
