"""The codec record (:class:`CodecInfo`): which codec made a set of codes, built from a config,
stored (``tokens/_codec.json``, an export's ``voxtral.json``) and compared. Codes made by
another codec (name, codebooks, rates or weights) mean other sounds, so every stage refuses
them."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from voxtral import schema
from voxtral.config import ENCODEC_BANDWIDTH_NQ, CodecConfig

if TYPE_CHECKING:
    from voxtral.layout import Layout
    from voxtral.storage import Storage

SAMPLE_RATE = 24_000
MIMI_DEFAULT_NQ = 8
_NUMBERS = ("name", "n_q", "codebook_size", "sample_rate", "frame_rate")
"""The fields every stored record has (``weights`` and ``bandwidth`` may be unrecorded)."""


class CodecMismatchError(ValueError):
    """Codes made with another codec (name, codebooks, rates or weights) than expected."""


@dataclass(frozen=True)
class CodecInfo:
    """The codec record: what a token folder or a model records about the codec that made
    its codes. The numbers fix the token layout; ``weights`` (``"pretrained"``, ``"random"``,
    ``"random-tiny"`` or a checkpoint path) and EnCodec's ``bandwidth`` pin the rest, since
    random-init and pretrained codes are unrelated. None means not recorded (a layout knows
    no weights), and a check then does not ask for it."""

    name: str
    n_q: int
    codebook_size: int
    sample_rate: int
    frame_rate: float
    weights: str | None = None
    bandwidth: float | None = None

    @property
    def hop(self) -> int:
        """Samples per frame."""
        return round(self.sample_rate / self.frame_rate)

    def frames(self, num_samples: int) -> int:
        """Frames the codec produces for ``num_samples`` of audio: ``ceil(T / hop)``."""
        return math.ceil(num_samples / self.hop)

    @classmethod
    def from_layout(cls, layout: Layout) -> CodecInfo:
        """The part of the record a token layout pins (no weights, no bandwidth)."""
        v = layout.vocab
        return cls(layout.codec, v.n_q, v.codebook_size, layout.sample_rate, layout.frame_rate)

    def to_dict(self) -> dict[str, Any]:
        """The stored form (JSON): every recorded field."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> CodecInfo:
        """A stored record back; keys it does not know (from a later version) are ignored."""
        missing = [k for k in _NUMBERS if stored.get(k) is None]
        if missing:
            raise ValueError(f"codec record {stored!r} lacks {', '.join(missing)}")
        bandwidth = stored.get("bandwidth")
        return cls(
            name=str(stored["name"]),
            n_q=int(stored["n_q"]),
            codebook_size=int(stored["codebook_size"]),
            sample_rate=int(stored["sample_rate"]),
            frame_rate=float(stored["frame_rate"]),
            weights=None if stored.get("weights") is None else str(stored["weights"]),
            bandwidth=None if bandwidth is None else float(bandwidth),
        )

    def differences(self, expected: CodecInfo) -> list[str]:
        """One ``"field found ≠ wanted"`` line per field this record does not share with
        ``expected``; the fields ``expected`` leaves unrecorded are not compared."""
        diffs = []
        for f in fields(expected):
            want, got = getattr(expected, f.name), getattr(self, f.name)
            if want is None:
                continue
            same = (
                got is not None and math.isclose(float(got), float(want))
                if f.name == "frame_rate"
                else got == want
            )
            if not same:
                diffs.append(f"{f.name} {got!r} ≠ {want!r}")
        return diffs

    def describe(self) -> str:
        """For error messages: ``encodec (n_q=2, 1024 codes, 24000 Hz, 75 frames/s, …)``."""
        weights = f", {self.weights} weights" if self.weights else ""
        return (
            f"{self.name} (n_q={self.n_q}, {self.codebook_size} codes, "
            f"{self.sample_rate} Hz, {self.frame_rate:g} frames/s{weights})"
        )

    def to_config(self) -> CodecConfig:
        """The codec config that builds this codec (serving rebuilds an export's codec so)."""
        weights = _weights_config(self.weights)
        if self.name == "encodec":
            if self.bandwidth is None:
                raise ValueError(f"EnCodec record without a bandwidth: {self.to_dict()}")
            return CodecConfig(name="encodec", bandwidth=self.bandwidth, **weights)
        return CodecConfig(name=self.name, n_q=self.n_q, **weights)


def weights_name(pretrained: bool | str, size: str = "full") -> str:
    """``CodecConfig.pretrained`` (and ``size``) as recorded: ``"pretrained"``, ``"random"``,
    ``"random-tiny"`` or the checkpoint's path."""
    if pretrained is True:
        return "pretrained"
    if pretrained is False:
        return "random-tiny" if size == "tiny" else "random"
    return str(pretrained)


def _weights_config(weights: str | None) -> dict[str, Any]:
    """:func:`weights_name` backwards, as config fields; unrecorded weights are the config
    default, random."""
    if weights == "random-tiny":
        return {"pretrained": False, "size": "tiny"}
    return {"pretrained": {"pretrained": True, "random": False, None: False}.get(weights, weights)}


def codec_info(cfg: CodecConfig) -> CodecInfo:
    """The record of the configured codec without building it (layouts, checks, exports)."""
    weights = weights_name(cfg.pretrained, cfg.size)
    if cfg.name == "encodec":
        if cfg.bandwidth not in ENCODEC_BANDWIDTH_NQ:
            raise ValueError(f"codec.bandwidth {cfg.bandwidth} is not an EnCodec bandwidth")
        n_q = ENCODEC_BANDWIDTH_NQ[cfg.bandwidth]
        return CodecInfo("encodec", n_q, 1024, SAMPLE_RATE, 75.0, weights, cfg.bandwidth)
    if cfg.name == "mimi":
        return CodecInfo("mimi", cfg.n_q or MIMI_DEFAULT_NQ, 2048, SAMPLE_RATE, 12.5, weights)
    raise ValueError(f"unknown codec {cfg.name!r} (expected 'encodec' or 'mimi')")


def model_codec(meta: dict[str, Any], layout: Layout) -> CodecInfo:
    """The record of the codec behind an exported model, from its ``voxtral.json``.

    Exports store it as ``codec``. Older ones only had a ``codec_config`` (or nothing): the
    record is then rebuilt from that config when it names the layout's codec, else from the
    layout (for EnCodec, the bandwidth that gives the layout's codebooks)."""
    stored = meta.get("codec")
    if isinstance(stored, dict) and all(k in stored for k in _NUMBERS):
        record = CodecInfo.from_dict(stored)
        diffs = record.differences(CodecInfo.from_layout(layout))
        if diffs:
            raise CodecMismatchError(
                f"voxtral.json records the codec {record.describe()}, which does not make "
                f"the codes of its own layout ({'; '.join(diffs)})"
            )
        return record
    legacy = meta.get("codec_config") or stored
    if isinstance(legacy, dict) and legacy.get("name") == layout.codec:
        fields_ = {k: v for k, v in legacy.items() if k in CodecConfig.model_fields}
        return codec_info(CodecConfig.model_validate(fields_))
    if layout.codec == "encodec":
        inverse = {n: bw for bw, n in ENCODEC_BANDWIDTH_NQ.items()}
        if layout.vocab.n_q not in inverse:
            raise ValueError(f"no EnCodec bandwidth gives {layout.vocab.n_q} codebooks")
        return codec_info(CodecConfig(name="encodec", bandwidth=inverse[layout.vocab.n_q]))
    return codec_info(CodecConfig(name=layout.codec, n_q=layout.vocab.n_q))


# -- the record beside the tokens ----------------------------------------------------------
def read_codec_record(storage: Storage) -> CodecInfo | None:
    """The record of the codec that made ``tokens/``: ``tokens/_codec.json``, else the legacy
    ``tokens/codec.json`` of runs made before the rename; None before the first preprocess."""
    for rel in (schema.CODEC_RECORD, schema.LEGACY_CODEC_RECORD):
        if storage.exists(rel):
            return CodecInfo.from_dict(storage.read_json(rel))
    return None


def check_codec_compatible(storage: Storage, expected: CodecInfo) -> CodecInfo:
    """Refuse tokens made with another codec than ``expected``; return the stored record.

    ``expected`` is ``codec_info(cfg)`` (which also pins the weights: random-init and
    pretrained codes are unrelated), a built codec's ``info``, or
    ``CodecInfo.from_layout(layout)`` (training, serving)."""
    found = read_codec_record(storage)
    if found is None:
        raise FileNotFoundError(
            f"{storage.uri(schema.CODEC_RECORD)} not found: no tokens here yet; "
            "run preprocess first"
        )
    diffs = found.differences(expected)
    if diffs:
        raise CodecMismatchError(
            f"tokens under {storage.uri(schema.TOKENS_DIR)} were made with {found.describe()}, "
            f"but {expected.describe()} is expected ({'; '.join(diffs)}). Re-run preprocess "
            "with this codec into another storage.root, or use the codec config that made "
            "these tokens."
        )
    return found


def ensure_codec_record(storage: Storage, cfg: CodecConfig) -> CodecInfo:
    """Write ``tokens/_codec.json`` on the first run; later runs must use the same codec.

    A legacy ``tokens/codec.json`` that matches is moved to the new name (copied first,
    then the old one removed, so a reader always finds one), after which ``tokens/`` holds
    only files that Parquet readers take or skip.
    """
    if read_codec_record(storage) is None:
        record = codec_info(cfg)
        storage.write_json(schema.CODEC_RECORD, record.to_dict())
        return record
    found = check_codec_compatible(storage, codec_info(cfg))
    if not storage.exists(schema.CODEC_RECORD):
        storage.write_bytes(schema.CODEC_RECORD, storage.read_bytes(schema.LEGACY_CODEC_RECORD))
        storage.delete(schema.LEGACY_CODEC_RECORD)
    return found
