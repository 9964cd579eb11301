"""Which model folder to serve, and the codec that goes with it.

``serve.model`` when set; else the newest export under ``<storage.root>/models/*``; else,
for ``model.base: tiny``, a tiny random speech LM exported once into
``<storage.root>/models/tiny-random-<mode>-<codec>-<hash>`` (one per codec and token layout)
— so ``jobs/serve.py`` works on a fresh checkout, in either serving mode.
Remote roots (``s3://``, ``gs://``) are copied to a local cache on the replica's node.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from voxtral.codec import codec_info, model_codec
from voxtral.config import CodecConfig, Config
from voxtral.layout import Layout
from voxtral.model import TINY, VOXTRAL_JSON, build_speech_lm, export_speech_lm
from voxtral.storage import TMP_PREFIX, Storage, publish_folder

TINY_EXPORT = "tiny-random"


@dataclass(frozen=True)
class ModelSource:
    uri: str  # local folder or remote URI of the exported folder
    kind: str  # "configured", "trained" or "tiny-random"

    def describe(self) -> dict[str, str]:
        return {"model": self.uri, "model_source": self.kind}


def resolve_model(cfg: Config) -> ModelSource:
    """The folder to serve (writes the tiny random export when that is what it comes to)."""
    if cfg.serve.model:
        return ModelSource(cfg.serve.model, "configured")
    storage = Storage(cfg.storage.root)
    newest: tuple[float, str] | None = None
    for name in storage.listdir("models"):
        if name.startswith(TINY_EXPORT):
            continue
        folder = storage.current(f"models/{name}")  # a versioned export: its current version
        info = storage.fs.get_file_info(storage.path(folder, VOXTRAL_JSON))
        if info.type.name == "File":
            mtime = info.mtime.timestamp() if info.mtime else 0.0
            if newest is None or mtime > newest[0]:
                newest = (mtime, folder)
    if newest is not None:
        return ModelSource(storage.uri(newest[1]), "trained")
    if cfg.model.base != TINY:
        raise FileNotFoundError(
            f"nothing to serve: serve.model is unset and {storage.uri('models')} holds no "
            "export; run the train stage first or set serve.model"
        )
    name = tiny_export_name(cfg)
    if not storage.exists(storage.current(f"models/{name}"), VOXTRAL_JSON):
        export_tiny(cfg, storage)
    return ModelSource(storage.uri(storage.current(f"models/{name}")), TINY_EXPORT)


def tiny_export_name(cfg: Config) -> str:
    """One tiny export per codec and token layout (``tiny-random-full-duplex-mimi-…``), so
    a storage root never serves a tiny model made for another config."""
    mode = "half-duplex" if cfg.tokenizer.streams == 1 else "full-duplex"
    what = {"codec": codec_info(cfg.codec).to_dict(), "tokenizer": cfg.tokenizer.model_dump()}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:8]
    return f"{TINY_EXPORT}-{mode}-{cfg.codec.name}-{digest}"


def export_tiny(cfg: Config, storage: Storage) -> None:
    """The tiny random speech LM of the local profile, exported like a trained one."""
    model, tokenizer, layout = build_speech_lm(cfg)
    staging = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{TINY_EXPORT}-"))
    try:
        meta = {"base": TINY, "source": TINY_EXPORT}
        export_speech_lm(model, tokenizer, layout, staging, extra=meta, codec=codec_info(cfg.codec))
        # another process may have published it first: theirs is the same model
        name = tiny_export_name(cfg)
        storage.put_folder(f"models/{name}", staging, replace=False, last=VOXTRAL_JSON)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def materialize(uri: str) -> Path:
    """A local folder holding the model: the folder itself, or a cached copy of a remote one
    (of its current version, when it was published on an object store)."""
    where = Storage(uri)
    uri = where.uri(where.current(""))
    if "://" not in uri:
        p = Path(uri).expanduser()
        if not (p / VOXTRAL_JSON).is_file():
            raise FileNotFoundError(f"{uri}: not a Voxtral model folder (no {VOXTRAL_JSON})")
        return p
    fs, path = pafs.FileSystem.from_uri(uri)
    stamp = fs.get_file_info(f"{path}/{VOXTRAL_JSON}")
    key = hashlib.sha1(f"{uri}@{stamp.mtime}".encode()).hexdigest()[:16]
    local = Path(tempfile.gettempdir()) / "voxtral-models" / key
    if not (local / VOXTRAL_JSON).is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=local.parent))
        try:
            pafs.copy_files(
                path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
            )
            publish_folder(tmp, local, replace=False)  # or another replica cached it first
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return local


def codec_config_for(meta: dict, layout: Layout, cfg: Config) -> CodecConfig:
    """The codec that made the model's codes, from the record in ``voxtral.json`` (older
    exports: see :func:`voxtral.codec.model_codec`); the weights (pretrained flag) come from
    the serve config when it names the same codec (a tiny random codec is its own weights)."""
    base = model_codec(meta, layout).to_config()
    if cfg.codec.name != base.name or base.size == "tiny":
        return base
    return base.model_copy(update={"pretrained": cfg.codec.pretrained})
