"""Neural audio codecs behind one small interface, and the one record of which codec it was.

``encode(wav[B, 1, T]) -> codes[B, n_q, F]`` and ``decode(codes) -> wav[B, 1, T']``, plus the
numbers the tokenizer needs (``sample_rate``, ``frame_rate``, ``n_q``, ``codebook_size``).
``pretrained: false`` builds the same architecture with random weights, so tests and the
offline demo run the real code path without downloading anything.

**The codec record** (:class:`CodecInfo`) is the codec's identity everywhere: built from a
config (:func:`codec_info`), stored as a dict in ``tokens/_codec.json`` (preprocess) and in
the ``codec`` field of an export's ``voxtral.json``, and compared with
:meth:`CodecInfo.differences` by preprocess, training and serving. Codes made by another
codec (name, codebooks, rates or weights) mean other sounds, so every stage refuses them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from voxtral import schema
from voxtral.config import ENCODEC_BANDWIDTH_NQ, CodecConfig

if TYPE_CHECKING:
    from voxtral.storage import Storage
    from voxtral.tokenizer import Layout

SAMPLE_RATE = 24_000
MIMI_DEFAULT_NQ = 8
MIMI_HF_ID = "kyutai/mimi"
_NUMBERS = ("name", "n_q", "codebook_size", "sample_rate", "frame_rate")
"""The fields every stored record has (``weights`` and ``bandwidth`` may be unrecorded)."""


class CodecMismatchError(ValueError):
    """Codes made with another codec (name, codebooks, rates or weights) than expected."""


@dataclass(frozen=True)
class CodecInfo:
    """The codec record: what a token folder or a model records about the codec that made
    its codes. The numbers fix the token layout; ``weights`` (``"pretrained"``, ``"random"``
    or a checkpoint path) and EnCodec's ``bandwidth`` pin the rest, since random-init and
    pretrained codes are unrelated. None means not recorded (a layout knows no weights), and
    a check then does not ask for it."""

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
        pretrained = _pretrained(self.weights)
        if self.name == "encodec":
            if self.bandwidth is None:
                raise ValueError(f"EnCodec record without a bandwidth: {self.to_dict()}")
            return CodecConfig(name="encodec", bandwidth=self.bandwidth, pretrained=pretrained)
        return CodecConfig(name=self.name, n_q=self.n_q, pretrained=pretrained)


def _weights_name(pretrained: bool | str) -> str:
    """``CodecConfig.pretrained`` as recorded: ``"pretrained"``, ``"random"`` or the path."""
    if pretrained is True:
        return "pretrained"
    if pretrained is False:
        return "random"
    return str(pretrained)


def _pretrained(weights: str | None) -> bool | str:
    """:func:`_weights_name` backwards; unrecorded weights are the config default, random."""
    return {"pretrained": True, "random": False, None: False}.get(weights, weights)


class Codec(torch.nn.Module):
    info: CodecInfo

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def sample_rate(self) -> int:
        return self.info.sample_rate

    @property
    def frame_rate(self) -> float:
        return self.info.frame_rate

    @property
    def n_q(self) -> int:
        return self.info.n_q

    @property
    def codebook_size(self) -> int:
        return self.info.codebook_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _check(self, wav: torch.Tensor) -> torch.Tensor:
        if wav.ndim != 3 or wav.shape[1] != 1:
            raise ValueError(f"codec input must be [B, 1, T], got {tuple(wav.shape)}")
        if not wav.is_floating_point():
            raise ValueError(f"codec input must be float audio, got {wav.dtype}")
        param = next(self.parameters())
        return wav.to(param.device, dtype=param.dtype)

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        codes = torch.as_tensor(codes)
        if codes.ndim != 3 or not 1 <= codes.shape[1] <= self.n_q:
            raise ValueError(f"codes must be [B, n_q<={self.n_q}, F], got {tuple(codes.shape)}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")
        return codes.to(self.device, dtype=torch.long)  # stored codes are int16

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EncodecCodec(Codec):
    """Meta's EnCodec 24 kHz (causal, 75 Hz, 1024 entries); n_q follows the bandwidth."""

    def __init__(self, bandwidth: float, n_q: int | None, pretrained: bool | str):
        super().__init__()
        from encodec import EncodecModel

        if bandwidth not in ENCODEC_BANDWIDTH_NQ:
            raise ValueError(
                f"codec.bandwidth {bandwidth} is not an EnCodec bandwidth "
                f"({sorted(ENCODEC_BANDWIDTH_NQ)})"
            )
        if n_q is not None and n_q != ENCODEC_BANDWIDTH_NQ[bandwidth]:
            raise ValueError(
                f"codec.n_q {n_q} does not match EnCodec bandwidth {bandwidth} kbps "
                f"({ENCODEC_BANDWIDTH_NQ[bandwidth]} codebooks)"
            )
        state = _load_state_dict(pretrained) if isinstance(pretrained, str) else None
        with torch.random.fork_rng(devices=[]):  # random init: the same codec in every process
            torch.manual_seed(0)
            model = EncodecModel.encodec_model_24khz(pretrained=pretrained is True)
        if state is not None:
            model.load_state_dict(state)
        model.set_target_bandwidth(bandwidth)
        if pretrained is False:
            layers = model.quantizer.vq.layers
            with torch.no_grad():
                latents = model.encoder(_probe_audio())[0].T
            _calibrate_codebooks(latents, [layer._codebook.embed for layer in layers])
            for layer in layers:
                layer._codebook.embed_avg.copy_(layer._codebook.embed)
                layer._codebook.inited.fill_(1)
        self.model = model.eval()
        self.info = codec_info(
            CodecConfig(name="encodec", bandwidth=bandwidth, pretrained=pretrained)
        )

    @torch.inference_mode()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        frames = self.model.encode(self._check(wav))
        return torch.cat([codes for codes, _scale in frames], dim=-1)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode([(self._check_codes(codes), None)])


class MimiCodec(Codec):
    """Kyutai's Mimi through transformers (12.5 Hz, 2048 entries, up to 32 codebooks)."""

    def __init__(self, n_q: int | None, pretrained: bool | str):
        super().__init__()
        from transformers import MimiConfig, MimiModel

        if pretrained is True:
            model = MimiModel.from_pretrained(MIMI_HF_ID)
        elif isinstance(pretrained, str):
            if not Path(pretrained).exists():  # else from_pretrained would try the Hub
                raise FileNotFoundError(f"codec checkpoint not found: {pretrained}")
            model = MimiModel.from_pretrained(pretrained)
        else:
            with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
                torch.manual_seed(0)
                model = MimiModel(MimiConfig())
            _calibrate_mimi(model)
        n_q = n_q or MIMI_DEFAULT_NQ
        if not 1 <= n_q <= model.config.num_quantizers:
            raise ValueError(f"codec.n_q must be in 1..{model.config.num_quantizers}, got {n_q}")
        self.model = model.eval()
        cfg = model.config
        weights = _weights_name(pretrained)
        self.info = CodecInfo(
            "mimi", n_q, cfg.codebook_size, cfg.sampling_rate, cfg.frame_rate, weights
        )

    @torch.inference_mode()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        return self.model.encode(self._check(wav), num_quantizers=self.n_q).audio_codes

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(self._check_codes(codes)).audio_values


@torch.no_grad()
def _calibrate_mimi(model) -> None:
    """Random Mimi: calibrate both residual quantizers (semantic and acoustic) on the probe."""
    out = model.encoder(_probe_audio())
    latents = getattr(out, "latents", out)  # a plain tensor in older transformers
    split = model.quantizer
    for rvq in (split.semantic_residual_vector_quantizer, split.acoustic_residual_vector_quantizer):
        x = rvq.input_proj(latents) if rvq.input_proj is not None else latents
        books = [layer.codebook for layer in rvq.layers]
        embeds = [torch.empty_like(b.embed_sum) for b in books]
        _calibrate_codebooks(x[0].T, embeds)
        for book, embed in zip(books, embeds, strict=True):
            book.embed_sum.copy_(embed * book.cluster_usage[:, None])
            book._embed = None


def _probe_audio(seconds: float = 4.0) -> torch.Tensor:
    """A fixed, varied signal (chirps in bursts of noise) to calibrate random codebooks."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(int(SAMPLE_RATE * seconds)) / SAMPLE_RATE
    chirp = torch.sin(2 * math.pi * (100 + 400 * t) * t)
    envelope = (torch.sin(2 * math.pi * 1.5 * t) > 0).float() * 0.5 + 0.1
    noise = torch.randn(t.shape, generator=g) * 0.2
    return ((chirp + noise) * envelope * 0.3)[None, None]


@torch.no_grad()
def _calibrate_codebooks(latents: torch.Tensor, codebooks: list[torch.Tensor]) -> None:
    """Random-init codebooks as residual-VQ k-means would start: each codebook's entries are
    residual latents of a probe signal (plus jitter). Upstream random init leaves them zero
    or uniform, so every frame would map to one code and tests could not tell codes apart.
    ``latents`` is ``[N, D]``; each codebook is ``[K, D]`` and is filled in place."""
    g = torch.Generator().manual_seed(0)
    residual = latents.float()
    for embed in codebooks:
        k = embed.shape[0]
        pick = torch.randint(0, residual.shape[0], (k,), generator=g)
        jitter = torch.randn(embed.shape, generator=g) * residual.std() * 0.1
        embed.copy_(residual[pick] + jitter)
        nearest = torch.cdist(residual, embed.float()).argmin(dim=-1)
        residual = residual - embed[nearest]


def _load_state_dict(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"codec checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(p)
    return torch.load(p, map_location="cpu", weights_only=True)


def load_codec(cfg: CodecConfig, device: str | torch.device = "cpu") -> Codec:
    """Build the configured codec on ``device``."""
    if cfg.name == "encodec":
        codec: Codec = EncodecCodec(cfg.bandwidth, cfg.n_q, cfg.pretrained)
    elif cfg.name == "mimi":
        codec = MimiCodec(cfg.n_q, cfg.pretrained)
    else:  # config validation makes this unreachable; kept for direct callers
        raise ValueError(f"unknown codec {cfg.name!r} (expected 'encodec' or 'mimi')")
    return codec.to(device).eval()


def codec_info(cfg: CodecConfig) -> CodecInfo:
    """The record of the configured codec without building it (layouts, checks, exports)."""
    weights = _weights_name(cfg.pretrained)
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
