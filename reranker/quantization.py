"""Quantized DeepSeek-VL weights (VLSEARCH_VLM_QUANTIZATION=none|int8|nf4), applied while the checkpoint loads.

- CUDA: bitsandbytes through transformers' `BitsAndBytesConfig`: int8 is LLM.int8 (`load_in_8bit`), nf4 is 4-bit
  NormalFloat with bf16 compute. bitsandbytes is the optional extra `gpu` (`pip install 'vlsearch[gpu]'`).
- CPU: int8 through torchao (a required dependency), `Int8DynamicActivationInt8WeightConfig` passed to
  `from_pretrained` as `TorchAoConfig`: every `nn.Linear` of the vision tower, the aligner and the language model
  gets per-row symmetric int8 weights, and each call quantizes its activations per token and runs an int8 matrix
  product, rescaled to float32. Embeddings and the output head (`lm_head`) stay float32 (transformers' default
  for torchao). nf4 has no CPU kernels: it is refused.

Why torchao's dynamic-activation int8 (W8A8) and not the other two candidates, measured on this project's 2-core
CPU with torch 2.14.1 and torchao 0.18 in eager mode (no torch.compile):
- `torch.ao.quantization.quantize_dynamic` still works, but warns that it is deprecated and to be removed in
  favour of torchao's `quantize_` (pytorch/ao#2259); it is not a maintained path.
- torchao's weight-only int8 (`Int8WeightOnlyConfig`) keeps the scores closest (mean Spearman ρ 0.9998 against fp32
  on the shipped model, against 0.998-0.999 for W8A8), but in eager mode it casts each int8 weight back to float32
  on every call: the same weight memory, no faster at rerank batch sizes, 30% slower in generation, where each new
  token pays that cast for every matrix.
- W8A8 saves the same weight memory and also runs the matrix products in int8: a 1.3B-shaped model scored
  candidates 2.6x faster than in fp32 (BENCHMARKS.md, "Quantized generative model"), well within the
  quality target on the shipped model (tests/reranker/test_quantization.py compares it with fp32 of the same
  checkpoint).

Quantization happens on every load; nothing quantized is saved. It is part of the weights' identity in
`reranker.model.WeightsKey`, so an int8 and a full-precision copy of one checkpoint are never confused.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Literal, get_args

import torch

from reranker.errors import UnsupportedQuantization


def _not_enum_registration(record: logging.LogRecord) -> bool:
    return "is an Enum subclass and is now natively supported" not in record.getMessage()


# With torchao installed, importing transformers' model classes imports it, and torchao registers Enums with torch's
# pytree, which torch 2.14 logs as deprecated on stderr, one line per Enum, in every command. A filter, not a level:
# torch._logging resets the levels of torch's loggers. reranker/__init__.py imports this module first for it.
logging.getLogger("torch.utils._pytree").addFilter(_not_enum_registration)

QUANTIZATION_SETTING = "VLSEARCH_VLM_QUANTIZATION"
Quantization = Literal["none", "int8", "nf4"]
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)


def check_quantization(quantization: str) -> None:
    """Refuse a value that is not one of QUANTIZATIONS (naming the setting)."""
    if quantization not in QUANTIZATIONS:
        raise UnsupportedQuantization(
            f"{QUANTIZATION_SETTING}={quantization!r} is not one of {', '.join(QUANTIZATIONS)}"
        )


def quantization_config(quantization: str, device: torch.device) -> Any | None:
    """The transformers `quantization_config` for `quantization` on `device`; None for 'none'.

    Raises UnsupportedQuantization, naming VLSEARCH_VLM_QUANTIZATION, for a value that cannot work on `device`
    or whose library is not installed; it is never silently ignored.
    """
    check_quantization(quantization)
    if quantization == "none":
        return None
    if device.type == "cuda":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UnsupportedQuantization(
                f"{QUANTIZATION_SETTING}={quantization} on CUDA needs bitsandbytes, which is not installed: "
                f"install the gpu extra (pip install 'vlsearch[gpu]'), or set {QUANTIZATION_SETTING}=none"
            )
        from transformers import BitsAndBytesConfig

        if quantization == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    if device.type == "cpu":
        if quantization == "nf4":
            raise UnsupportedQuantization(
                f"{QUANTIZATION_SETTING}=nf4 needs CUDA (bitsandbytes' 4-bit kernels) and the model runs on the CPU "
                f"here; set {QUANTIZATION_SETTING}=int8 (or none), or VLSEARCH_VLM_DEVICE=cuda on a machine with a GPU"
            )
        return _cpu_int8_config()
    raise UnsupportedQuantization(
        f"{QUANTIZATION_SETTING}={quantization} is supported on cuda (int8, nf4) and cpu (int8), "
        f"not on {device.type}; set {QUANTIZATION_SETTING}=none"
    )


def _cpu_int8_config() -> Any:
    if importlib.util.find_spec("torchao") is None:
        raise UnsupportedQuantization(
            f"{QUANTIZATION_SETTING}=int8 on the CPU needs torchao, which is not installed: reinstall vlsearch "
            f"(it is a dependency), or set {QUANTIZATION_SETTING}=none"
        )
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig
    from transformers import TorchAoConfig

    # set_inductor_config=False: the default changes torch._inductor's global settings, for torch.compile only.
    return TorchAoConfig(Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes `tensor` really holds: a quantized tensor subclass (torchao's) by the plain tensors inside it."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers (tied parameters once), quantized ones by their real storage."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(tensor_bytes(tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor) for tensor in tensors)
