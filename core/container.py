"""Builds vlsearch's components from Settings: the encoder, the stores; cached, so a process loads each model once."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from core.settings import Settings
from indexer.decode import DecodeLimits, load_image
from indexer.encoder import LOCAL_DIR_PREFIX, ClipEncoder, EncoderSpec
from indexer.errors import UnreadableFile, VlsearchError
from models import MODELS_DIR
from reranker.model import VisionLanguageModel, get_model
from retriever.errors import CollectionNotFound
from retriever.faiss_store import FaissStore
from retriever.store import Hit, Manifest, VectorStore

# Models shipped in models/, addressable by these names from settings and the CLI.
SHIPPED_CLIP_MODELS = {"shapes-clip": MODELS_DIR / "shapes-clip"}
SHIPPED_VLM_MODELS = {"shapes-vlm": MODELS_DIR / "shapes-vlm"}
CONFIG_DIRS = (MODELS_DIR / "configs",)
StoreKind = Literal["faiss", "qdrant"]


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
            score_method=self.settings.vlm_score_method,
            chunk_size=self.settings.vlm_chunk_size,
            max_new_tokens=self.settings.vlm_max_new_tokens,
            caption_prompt=self.settings.caption_prompt,
        )

    def load_hit_image(self, hit: Hit, draft_size: int | None = None) -> Image.Image:
        """The stored image behind a hit, decoded safely from the first of its paths that still exists.

        draft_size: a JPEG may be decoded scaled down (1/2 to 1/8) as long as both sides stay at least this.
        """
        paths = [Path(p) for p in hit.payload.get("paths", [])]
        existing = next((p for p in paths if p.exists()), None)
        if existing is None:
            raise UnreadableFile(
                f"image {hit.id}", f"no longer on disk (paths: {', '.join(map(str, paths)) or 'none'})"
            )
        return load_image(existing, self.decode_limits, draft_size=draft_size).image

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
            raise VlsearchError(f"invalid collection name {name!r}: use letters, digits, '-' and '_'")
        return self.settings.collections_dir / name

    def open_store(self, name: str | None = None, kind: StoreKind | None = None) -> VectorStore:
        """An existing collection of the settings' store (or of `kind`); CollectionNotFound names it otherwise."""
        return self.store(name or self.settings.collection, None, kind or self.settings.store)

    def create_or_open_store(self, name: str | None, encoder: ClipEncoder) -> VectorStore:
        """The collection, created for this encoder if new; an existing one built by another encoder is refused."""
        manifest = Manifest(
            encoder=encoder.name,
            weights=encoder.identity,
            dim=encoder.dim,
            pretrained=encoder.spec.pretrained,
            preprocessing=encoder.preprocessing(),
            store=self.settings.store,
            index_type=self.settings.index_type,
        )
        store = self.store(name or self.settings.collection, manifest, self.settings.store)
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
                directory, manifest, hnsw_ef_search=self.settings.hnsw_ef_search, ivf_nprobe=self.settings.ivf_nprobe
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
