"""Every setting of vlsearch, in one place. Environment variables use the prefix VLSEARCH_."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    """The user's data folder: $XDG_DATA_HOME/vlsearch, else ~/.local/share/vlsearch."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "vlsearch"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VLSEARCH_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir, description="Where collections live.")
    collection: str = "default"

    # Contrastive tower. A name open_clip knows (or one registered from models/*.json, or "hf-hub:org/repo"),
    # and a pretrained tag, "hf-hub:org/repo" or a local checkpoint file; fetched on first use where reachable.
    clip_model: str = "ViT-B-32"
    clip_pretrained: str | None = "laion2b_s34b_b79k"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    text_templates: list[str] = Field(
        default_factory=lambda: ["a photo of {}.", "a picture of {}.", "an image of {}."],
        description="Prompt ensemble for short text queries; ['{}'] turns it off.",
    )
    template_max_words: int = Field(default=4, ge=0)  # queries of at most this many words get the ensemble

    # Generative model (DeepSeek-VL): a hub id, a local directory, or a shipped name ("shapes-vlm").
    vlm_model: str = "deepseek-community/deepseek-vl-1.3b-chat"
    vlm_device: str = "auto"
    vlm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    vlm_device_map: str | None = None  # e.g. "auto" to spread a model larger than one GPU
    # Weights quantized at load: int8 (CUDA: bitsandbytes, the `gpu` extra; CPU: torchao) or nf4 (CUDA only).
    vlm_quantization: Literal["none", "int8", "nf4"] = "none"
    vlm_score_method: Literal["vqa", "caption"] | None = None  # None: the model's own preference, else vqa
    vlm_chunk_size: int = Field(default=8, ge=1)  # candidates per forward: bounds peak memory
    vlm_max_new_tokens: int = Field(default=32, ge=1)
    caption_prompt: str | None = None  # None: the model's own (or "Describe the image in one short sentence.")
    rerank_k: int = Field(default=20, ge=1)  # candidates the generative model rescores
    fusion_weight: float = Field(default=1.0, ge=0.0, le=1.0)  # 1: order by the rerank score alone; 0: by CLIP alone
    tag_threshold: float = 0.5

    # Store. FAISS keeps collections under data_dir/collections; Qdrant on a server (qdrant_url, compose or a
    # cluster) or embedded (no url: one directory per collection under qdrant_path, one process at a time).
    store: Literal["faiss", "qdrant"] = "faiss"
    index_type: Literal["flat", "hnsw", "ivfpq"] = "flat"  # Qdrant: flat (exact search) or hnsw
    # HNSW search breadth (recall against speed). None: FAISS grows it with the collection
    # (retriever.faiss_store.default_ef_search); Qdrant server uses 128.
    hnsw_ef_search: int | None = Field(default=None, ge=1)
    ivf_nprobe: int = Field(default=16, ge=1)  # IVF-PQ lists searched per query (recall against speed)
    # Many processes share a collection: how long a read or write waits for another process's write lock before
    # it fails with StoreBusy (seconds).
    lock_timeout: float = Field(default=5.0, gt=0)
    # Processes that search keep every point's id and payload in memory up to this many points (0: never);
    # larger collections read each search's hits from SQLite. See README ("Payloads in memory").
    payload_cache_max_points: int = Field(default=4_000_000, ge=0)
    faiss_device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: a GPU build of faiss with a GPU, else CPU
    qdrant_url: str | None = None  # e.g. http://qdrant:6333
    qdrant_api_key: SecretStr | None = None
    qdrant_path: Path | None = None  # default: data_dir/qdrant

    # Indexing.
    batch_size: int = Field(default=32, ge=1)
    decode_workers: int = Field(default_factory=lambda: max(1, (os.cpu_count() or 2)), ge=1)
    # Threads that decode and prepare rerank/caption candidates in one process (each API or worker process has
    # its own pool of this size, so it is not every core per process).
    image_workers: int = Field(default_factory=lambda: max(1, min(4, os.cpu_count() or 2)), ge=1)
    max_image_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=100_000_000, ge=1)

    # Workers (Celery on Redis). Time limits of tasks stay below the visibility timeout: a message of a worker
    # killed outright comes back to the queue only after it (SIGKILL leaves it unacknowledged).
    redis_url: str = "redis://127.0.0.1:6379/0"
    visibility_timeout: float = Field(default=3600.0, gt=0)  # seconds
    chunk_size: int = Field(default=256, ge=1)  # images per task
    max_chunk_attempts: int = Field(default=3, ge=1)  # deliveries of a chunk before it is marked failed
    fetch_allow: list[str] = Field(default_factory=list)  # addresses, networks or hosts the URL fetcher may reach

    # Queries.
    max_k: int = Field(default=1000, ge=1)
    dupes_threshold: float = Field(default=0.95, ge=-1.0, le=1.0)

    # The HTTP API (api/). Jobs routes and the Redis checks need VLSEARCH_REDIS_URL set explicitly: an API left on
    # the default URL serves search without Redis (the demo) and answers the jobs routes with 503.
    open_read: bool = False  # with no key, read routes answer anyone; never the default (write routes always need one)
    cors_origins: list[str] = Field(default_factory=list)  # origins allowed cross-site; empty: CORS off
    # Folders an API client's index job (paths) and tag job (labels_file) may name, a JSON list: anything else
    # on the server is 403. Empty: whatever the workers can read (the CLI, which runs as its user, is not bound).
    index_roots: list[Path] = Field(default_factory=list)
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1)  # request bodies: 413 past this, before read whole
    # A request's head must arrive within this many seconds of its first byte, and its body within as many again
    # (408 past either): a client that trickles bytes cannot hold a connection and its buffers for ever.
    request_timeout: float = Field(default=120.0, gt=0)
    max_request_head_bytes: int = Field(default=64 * 1024, ge=1024)  # request line + headers: 414 / 431 past this
    api_max_k: int = Field(default=100, ge=1)  # results per request
    api_max_offset: int = Field(default=10_000, ge=0)  # pagination depth
    api_max_rerank_k: int = Field(default=100, ge=1)  # candidates the generative model rescores per request
    rate_limit: int = Field(default=0, ge=0)  # requests per key per rate_limit_window seconds; 0: unlimited
    rate_limit_window: int = Field(default=60, ge=1)  # seconds (60: rate_limit is per minute)
    metrics_open: bool = True  # /metrics without a key (it names route templates, never collections or ids)
    api_preload: bool = True  # load the encoder and generative model at start (/readyz waits for them)
    # torch intra-op threads of an API process; 0: torch's own (one per core). Requests run side by side in the
    # thread pool and each thread that calls torch gets an OpenMP team of this size, spinning between ops: one a
    # request leaves the cores to the other requests and to the event loop that answers them.
    api_torch_threads: int = Field(default=1, ge=0)

    # API keys besides those of data_dir/api_keys.json: a JSON list of {"key" or "sha256", "scopes", "collections",
    # "name"} (format in core/keys.py). Secret: it may hold plaintext keys, so it never shows in a repr or a log.
    api_keys: SecretStr | None = None

    @field_validator("clip_pretrained", mode="before")
    @classmethod
    def _no_pretrained_weights(cls, value: object) -> object:
        """VLSEARCH_CLIP_PRETRAINED=none (or empty): the architecture with random weights (speed measurements)."""
        return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value

    @property
    def collections_dir(self) -> Path:
        return self.data_dir / "collections"

    @property
    def qdrant_dir(self) -> Path:
        """Where embedded Qdrant keeps collections (used when qdrant_url is not set)."""
        return self.qdrant_path or self.data_dir / "qdrant"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment (tests build their own Settings instead)."""
    return Settings()
