"""Load DeepSeek-VL by hub id or local directory: class from its config, processor, device."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from huggingface_hub.errors import HFValidationError
from transformers import (
    AutoConfig,
    DeepseekVLForConditionalGeneration,
    DeepseekVLHybridForConditionalGeneration,
    DeepseekVLHybridProcessor,
    DeepseekVLProcessor,
)
from transformers.utils.hub import cached_file, resolve_revision

from indexer.errors import WeightsUnavailable
from reranker.errors import UnsupportedModel
from reranker.quantization import quantization_config

MODEL_SETTING = "VLSEARCH_VLM_MODEL"
PREFERENCES_FILE = (
    "vlsearch.json"  # optional, next to config.json: score_method, caption_prompt, tag_prompt, tag_threshold
)

# model_type in config.json -> (model class, processor class)
MODEL_CLASSES: dict[str, tuple[type[Any], type[Any]]] = {
    "deepseek_vl": (DeepseekVLForConditionalGeneration, DeepseekVLProcessor),
    "deepseek_vl_hybrid": (DeepseekVLHybridForConditionalGeneration, DeepseekVLHybridProcessor),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class ModelPreferences:
    """What a checkpoint says about how vlsearch should use it (read from its vlsearch.json)."""

    score_method: str | None = None
    caption_prompt: str | None = None
    tag_prompt: str | None = None  # how a tag is put to the model when it is verified, e.g. "a {label}"
    tag_threshold: float | None = None  # the verification cut under the checkpoint's own score_method
    # Platt scaling of P("Yes")'s log-odds (scale, bias), fitted on held-out pairs: P = sigmoid(a * logit + b)
    vqa_calibration: tuple[float, float] | None = None


@dataclass(frozen=True)
class LoadedVLM:
    """A loaded model with its processor and where its inputs go."""

    model: Any  # DeepseekVLForConditionalGeneration | DeepseekVLHybridForConditionalGeneration
    processor: Any  # DeepseekVLProcessor | DeepseekVLHybridProcessor
    input_device: torch.device
    dtype: torch.dtype
    local_dir: Path | None
    commit: str | None  # the hub commit the files came from; None for a local directory
    preferences: ModelPreferences


def resolve_device(device: str) -> torch.device:
    """'auto' is CUDA where available, else CPU; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on CUDA and fp32 elsewhere (CPU bf16 matmuls are slow and less exact)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def local_directory(source: str) -> Path | None:
    """The local model directory `source` names, None for a hub id; a missing directory is an error."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WeightsUnavailable(
                f"{path} has no config.json, so it is not a saved model directory; "
                f"set {MODEL_SETTING} to a directory written by save_pretrained or to a DeepSeek-VL hub id"
            )
        return path
    if path.exists() or not _HUB_ID.match(source):
        raise WeightsUnavailable(
            f"model directory {path} does not exist; set {MODEL_SETTING} to an existing directory "
            f"or to a DeepSeek-VL hub id such as deepseek-community/deepseek-vl-1.3b-chat"
        )
    return None


def load_vlm(
    source: str,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | None = None,
    local_files_only: bool = False,
    revision: str | None = None,
    quantization: str = "none",
) -> LoadedVLM:
    """Load model and processor from a hub id or local directory; the class follows config.json's model_type.

    `quantization` (none, int8, nf4) quantizes the weights as they load (reranker.quantization says how).
    Raises WeightsUnavailable (naming VLSEARCH_VLM_MODEL, and HF_HUB_OFFLINE for the hub) when files are
    missing or the hub cannot be reached, UnsupportedModel for a checkpoint that is not DeepSeek-VL,
    UnsupportedQuantization (naming VLSEARCH_VLM_QUANTIZATION) for a quantization that cannot work on the device.
    """
    target = resolve_device(device)
    placement = target if device_map is None else resolve_device("auto")
    quantize = quantization_config(quantization, placement)  # refused before any file is read
    local_dir = local_directory(source)
    torch_dtype = resolve_dtype(dtype, placement)
    load_map: str | dict[str, str] | None = device_map
    if quantize is not None and device_map is None:
        load_map = {"": str(target)}  # quantized weights are placed while loading: bitsandbytes' refuse .to()
    hub_kwargs: dict[str, Any] = {"local_files_only": local_files_only}
    commit = None
    if local_dir is None:
        # One commit for every file of this load; it also names the weights in `identity`.
        resolved = resolve_revision(source, revision, local_files_only=local_files_only)
        commit = getattr(resolved, "resolved", None) or _commit_or_none(revision)
        hub_kwargs["revision"] = resolved

    where = str(local_dir) if local_dir is not None else source
    with _as_weights_unavailable(where, is_hub=local_dir is None, local_files_only=local_files_only):
        config = AutoConfig.from_pretrained(where, **hub_kwargs)
        model_type = getattr(config, "model_type", None)
        if model_type not in MODEL_CLASSES:
            raise UnsupportedModel(
                f"{where} is a {model_type!r} model, not DeepSeek-VL ({', '.join(MODEL_CLASSES)}); "
                f"set {MODEL_SETTING} to a DeepSeek-VL checkpoint"
            )
        model_class, processor_class = MODEL_CLASSES[model_type]
        model = model_class.from_pretrained(
            where, config=config, dtype=torch_dtype, device_map=load_map, quantization_config=quantize, **hub_kwargs
        )
        processor = processor_class.from_pretrained(where, **hub_kwargs)
        preferences = read_preferences(where, local_dir, hub_kwargs)

    if load_map is None:
        model.to(target)
    if quantize is not None and placement.type == "cpu":
        _release_checkpoint_mapping(model)
    model.eval()
    prepare_tokenizer(processor.tokenizer)
    return LoadedVLM(
        model=model,
        processor=processor,
        input_device=model.get_input_embeddings().weight.device,
        dtype=torch_dtype,
        local_dir=local_dir,
        commit=commit,
        preferences=preferences,
    )


def prepare_tokenizer(tokenizer: Any) -> None:
    """Left padding (answers and generation start right after the prompt in every row) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # what the released checkpoints do


def read_preferences(where: str, local_dir: Path | None, hub_kwargs: dict[str, Any]) -> ModelPreferences:
    """The checkpoint's vlsearch.json, if it has one; no file means no preferences."""
    if local_dir is not None:
        path: Path | None = local_dir / PREFERENCES_FILE
    else:
        found = cached_file(
            where,
            PREFERENCES_FILE,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )
        path = Path(found) if found else None
    if path is None or not path.is_file():
        return ModelPreferences()
    try:
        data = json.loads(path.read_text())
        threshold = data.get("tag_threshold")
        calibration = data.get("vqa_calibration")
        preferences = ModelPreferences(
            score_method=data.get("score_method"),
            caption_prompt=data.get("caption_prompt"),
            tag_prompt=data.get("tag_prompt"),
            tag_threshold=None if threshold is None else float(threshold),
            vqa_calibration=None if calibration is None else (float(calibration[0]), float(calibration[1])),
        )
        if preferences.tag_prompt is not None and "{label}" not in preferences.tag_prompt:
            raise ValueError(f"tag_prompt {preferences.tag_prompt!r} has no {{label}}")
        return preferences
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise UnsupportedModel(
            f"{path}: not a JSON object with score_method / caption_prompt / tag_prompt / tag_threshold / "
            f"vqa_calibration ({error})"
        ) from None


def directory_identity(directory: Path) -> str:
    """sha256 over the names and bytes of a model directory's weights and JSON configs, in name order."""
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.is_file() and (path.suffix in _WEIGHT_SUFFIXES or path.suffix == ".json"):
            digest.update(path.name.encode() + b"\0")
            with path.open("rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
    return "sha256:" + digest.hexdigest()


def weights_identity(model: Any) -> str:
    """sha256 over the names and bytes of a model's parameters and buffers, for a model that has no files."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + b"\0")
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def _release_checkpoint_mapping(model: Any) -> None:
    """Copy the float tensors that still live in the memory-mapped checkpoint (embeddings, head, norms) into the
    process's own memory, so that the mapping goes: after quantizing it keeps every page quantization read, i.e.
    the whole float32 file, resident (bench/rerank.py --quantization, 4 layers: 2.0 GiB resident, 1.0 without)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if type(tensor.data) is torch.Tensor:  # not a quantized tensor subclass
                tensor.data = tensor.data.clone()


def _commit_or_none(revision: str | None) -> str | None:
    return revision if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision) else None


@contextmanager
def _as_weights_unavailable(where: str, is_hub: bool, local_files_only: bool) -> Iterator[None]:
    """Turn the hub's and transformers' OSErrors into WeightsUnavailable that names the setting to change."""
    try:
        yield
    except (OSError, HFValidationError) as error:
        reason = (
            str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
        )
        if not is_hub:
            message = (
                f"cannot load the model in {where}: {reason}; the directory needs config.json, the weights "
                f"(model.safetensors) and the processor files; "
                f"set {MODEL_SETTING} to a complete model directory"
            )
        elif local_files_only or huggingface_hub.is_offline_mode():
            message = (
                f"{where} is neither a local directory nor in the local Hugging Face cache, and the hub "
                f"is off (HF_HUB_OFFLINE=1 or local_files_only); fetch it once with the hub reachable, "
                f"or set {MODEL_SETTING} to a local model directory"
            )
        else:
            message = (
                f"cannot fetch {where} from the Hugging Face hub: {reason}; check the id and the network, "
                f"set {MODEL_SETTING} to a local model directory, "
                f"or set HF_HUB_OFFLINE=1 to use a cached copy"
            )
        raise WeightsUnavailable(message) from error
