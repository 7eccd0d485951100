"""Builds vlsearch's components from Settings: the encoder, the stores; cached, so a process loads each model once."""

from __future__ import annotations

import contextlib
import re
import shutil
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from pydantic import ValidationError
from pydantic_settings import SettingsError

from core.media import BLOBS_DIR, THUMBNAILS_DIR, BlobStore, ThumbnailCache
from core.settings import Settings
from indexer.decode import DecodeLimits, decode_image, load_image, read_image_file
from indexer.encoder import LOCAL_DIR_PREFIX, ClipEncoder, EncoderSpec
from indexer.errors import InvalidQuery, InvalidSetting, UnreadableFile, VlsearchError
from indexer.fetch import SafeFetcher
from models import MODELS_DIR, shipped_models
from reranker.model import VisionLanguageModel, get_model
from retriever.errors import CollectionNotFound
from retriever.faiss_store import FaissStore
from retriever.store import Hit, Manifest, VectorStore

# Models shipped in models/ (listed in models/shipped.json), addressable by name from settings and the CLI.
SHIPPED_CLIP_MODELS = shipped_models("clip")
SHIPPED_VLM_MODELS = shipped_models("vlm")
CONFIG_DIRS = (MODELS_DIR / "configs",)
StoreKind = Literal["faiss", "qdrant"]
ENV_PREFIX = "VLSEARCH_"


def build_settings(**update: Any) -> Settings:
    """Settings from the environment with `update` on top (both validated); InvalidSetting names the variable."""
    try:
        return Settings(**update)
    except ValidationError as error:
        problems = []
        for problem in error.errors(include_url=False):
            name = str(problem["loc"][0]) if problem["loc"] else "?"
            where = ".".join(str(part) for part in problem["loc"][1:])
            value = problem.get("input")
            shown = f"={value!r}" if isinstance(value, str | int | float) and value != "" else ""
            problems.append(f"{ENV_PREFIX}{name.upper()}{shown}{f' (item {where})' if where else ''}: {problem['msg']}")
        raise InvalidSetting(f"invalid setting {'; '.join(problems)}") from None
    except SettingsError as error:  # a value that is not JSON where a list is expected
        found = re.search(r'field "(\w+)"', str(error))
        name = f"{ENV_PREFIX}{found.group(1).upper()}" if found else "a VLSEARCH_ variable"
        raise InvalidSetting(f"invalid setting {name}: not valid JSON (e.g. '[\"{{}}\"]' for a list)") from None


def encoder_spec(model: str, pretrained: str | None) -> EncoderSpec:
    """A shipped name resolves to its directory; anything else goes to open_clip as given."""
    if model in SHIPPED_CLIP_MODELS:
        return EncoderSpec(model, None, source=LOCAL_DIR_PREFIX + str(SHIPPED_CLIP_MODELS[model]))
    return EncoderSpec(model, pretrained)


class Container:
    """One per process (or per test): settings in, ready components out."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._encoders: dict[tuple[str, str | None], ClipEncoder] = {}

    @property
    def decode_limits(self) -> DecodeLimits:
        return DecodeLimits(max_bytes=self.settings.max_image_bytes, max_pixels=self.settings.max_image_pixels)

    def encoder(self, model: str | None = None, pretrained: str | None = None) -> ClipEncoder:
        """The encoder named (default: the settings'), built once per process; load() happens on first use."""
        if model is None:
            model, pretrained = self.settings.clip_model, self.settings.clip_pretrained
        key = (model, pretrained)
        with self._lock:
            if key not in self._encoders:
                self._encoders[key] = ClipEncoder(
                    encoder_spec(model, pretrained),
                    device=self.settings.device,
                    precision=self.settings.precision,
                    templates=self.settings.text_templates,
                    template_max_words=self.settings.template_max_words,
                    config_dirs=CONFIG_DIRS,
                )
            return self._encoders[key]

    def vlm(self) -> VisionLanguageModel:
        """The generative model of the settings, loaded once per process (reranker.model.get_model caches it)."""
        source = self.settings.vlm_model
        source = str(SHIPPED_VLM_MODELS.get(source, source))
        return get_model(
            source,
            device=self.settings.vlm_device,
            dtype=self.settings.vlm_dtype,
            device_map=self.settings.vlm_device_map,
            quantization=self.settings.vlm_quantization,
            score_method=self.settings.vlm_score_method,
            chunk_size=self.settings.vlm_chunk_size,
            max_new_tokens=self.settings.vlm_max_new_tokens,
            caption_prompt=self.settings.caption_prompt,
            image_workers=self.settings.image_workers,
        )

    def fetcher(self, total_timeout: float = 60.0) -> SafeFetcher:
        """The safe URL fetcher: public addresses only, except those VLSEARCH_FETCH_ALLOW names; the decoder's byte
        limit caps every download; total_timeout bounds one fetch (an API request waits less than a worker)."""
        return SafeFetcher(
            allow=self.settings.fetch_allow, max_bytes=self.settings.max_image_bytes, total_timeout=total_timeout
        )

    @property
    def blobs(self) -> BlobStore:
        """Where images indexed from bytes are kept (content-addressed, shared by every collection)."""
        return BlobStore(self.settings.data_dir / BLOBS_DIR)

    @property
    def thumbnails(self) -> ThumbnailCache:
        return ThumbnailCache(self.settings.data_dir / THUMBNAILS_DIR)

    def load_hit_image(self, hit: Hit, draft_size: int | None = None) -> Image.Image:
        """The stored image behind a hit, decoded safely from the first of its paths that still exists, else from
        its kept bytes (an image indexed from bytes).

        draft_size: a JPEG may be decoded scaled down (1/2 to 1/8) as long as both sides stay at least this.
        """
        paths = [Path(p) for p in hit.payload.get("paths", [])]
        existing = next((p for p in paths if p.exists()), None)
        if existing is not None:
            return load_image(existing, self.decode_limits, draft_size=draft_size).image
        blob = self.blobs.find(str(hit.payload["blob"])) if hit.payload.get("blob") else None
        if blob is None:
            kept = " or kept bytes" if hit.payload.get("blob") else ""
            raise UnreadableFile(
                f"image {hit.id}", f"no longer on disk (paths: {', '.join(map(str, paths)) or 'none'}{kept})"
            )
        name = str(hit.payload.get("source_name") or f"image {hit.id}")
        data = read_image_file(blob, self.decode_limits)
        return decode_image(data, name, self.decode_limits, draft_size=draft_size).image

    def hit_image_loader(self, vlm: VisionLanguageModel | None) -> Callable[[Hit], Image.Image]:
        """How search loads hits for the generative model: decoded no larger than it uses (`decode_side`)."""
        if vlm is None:
            return self.load_hit_image
        return partial(self.load_hit_image, draft_size=vlm.decode_side)

    def model_was_chosen(self) -> bool:
        """Whether the user named a model (flag or environment) rather than leaving the default."""
        return bool({"clip_model", "clip_pretrained"} & self.settings.model_fields_set)

    def encoder_for(self, store: VectorStore) -> ClipEncoder:
        """The encoder for a collection: the user's choice if any (checked later), else the one that built it."""
        if self.model_was_chosen():
            return self.encoder()
        return self.encoder(store.manifest.encoder, store.manifest.pretrained)

    def collection_dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise InvalidQuery(f"invalid collection name {name!r}: use letters, digits, '-' and '_'")
        return self.settings.collections_dir / name

    def open_store(self, name: str | None = None, kind: StoreKind | None = None) -> VectorStore:
        """An existing collection of the settings' store (or of `kind`); CollectionNotFound names it otherwise."""
        return self.store(name or self.settings.collection, None, kind or self.settings.store)

    def index_type_chosen(self) -> bool:
        """Whether the user named an index type (option or environment): only then is a collection converted."""
        return "index_type" in self.settings.model_fields_set

    def create_or_open_store(self, name: str | None, encoder: ClipEncoder) -> VectorStore:
        """The collection, created for this encoder if new; an existing one built by another encoder is refused.
        An existing collection keeps its index type unless the settings name one."""
        name = name or self.settings.collection
        index_type: str = self.settings.index_type
        if not self.index_type_chosen() and self.settings.store == "faiss":
            with contextlib.suppress(OSError, ValueError, TypeError):  # new, or unreadable: the store says why
                index_type = Manifest.from_json((self.collection_dir(name) / "manifest.json").read_text()).index_type
        manifest = Manifest(
            encoder=encoder.name,
            weights=encoder.identity,
            dim=encoder.dim,
            pretrained=encoder.spec.pretrained,
            preprocessing=encoder.preprocessing(),
            store=self.settings.store,
            index_type=index_type,
        )
        store = self.store(name, manifest, self.settings.store)
        store.manifest.check_encoder(encoder.name, encoder.identity, encoder.dim)
        return store

    def store(self, name: str, manifest: Manifest | None, kind: StoreKind) -> VectorStore:
        """The store factory: collection `name` in the FAISS or Qdrant store of the settings, created with manifest
        when given and missing."""
        directory = self.collection_dir(name)  # checks the name for both stores
        if kind == "faiss":
            if manifest is None and not (directory / "manifest.json").exists():
                raise CollectionNotFound(
                    f"no collection {name!r} in {self.settings.collections_dir} (VLSEARCH_DATA_DIR)"
                )
            return FaissStore.open(
                directory,
                manifest,
                hnsw_ef_search=self.settings.hnsw_ef_search,
                ivf_nprobe=self.settings.ivf_nprobe,
                lock_timeout=self.settings.lock_timeout,
                payload_cache_max_points=self.settings.payload_cache_max_points,
                faiss_device=self.settings.faiss_device,
            )
        if kind == "qdrant":
            from retriever.qdrant_store import QdrantStore  # imported when used: qdrant-client adds 1.5 s to startup

            # hnsw_ef applies on a server; embedded Qdrant searches exactly
            hnsw_ef = self.settings.hnsw_ef_search or 128
            return QdrantStore.open(name, manifest, hnsw_ef=hnsw_ef, **self._qdrant_location())
        raise VlsearchError(f"unknown store {kind!r}: use faiss or qdrant (VLSEARCH_STORE)")

    def _qdrant_location(self) -> dict[str, Any]:
        """Server mode when a URL is set, else embedded Qdrant under qdrant_dir."""
        settings = self.settings
        if settings.qdrant_url:
            key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
            return {"url": settings.qdrant_url, "api_key": key}
        return {"path": settings.qdrant_dir}

    def list_collections(self) -> list[str]:
        if self.settings.store == "qdrant":
            from retriever.qdrant_store import list_qdrant_collections

            return list_qdrant_collections(**self._qdrant_location())
        root = self.settings.collections_dir
        return sorted(p.name for p in root.iterdir() if (p / "manifest.json").exists()) if root.is_dir() else []

    def drop_collection(self, name: str) -> None:
        directory = self.collection_dir(name)
        if self.settings.store == "qdrant":
            from retriever.qdrant_store import QdrantStore

            QdrantStore.open(name, None, **self._qdrant_location()).drop()
            return
        if not (directory / "manifest.json").exists():
            raise CollectionNotFound(f"no collection {name!r} in {self.settings.collections_dir} (VLSEARCH_DATA_DIR)")
        shutil.rmtree(directory)
