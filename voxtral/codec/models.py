"""The two neural codecs (EnCodec, Mimi) behind one small interface, built from a config.

``encode(wav[B, 1, T]) -> codes[B, n_q, F]`` and ``decode(codes) -> wav[B, 1, T']``, with the
record (:class:`~voxtral.codec.record.CodecInfo`) as ``codec.info``. ``pretrained: false``
builds the same architecture with random weights (codebooks calibrated on a probe signal),
so tests and the offline demo run the real code path without downloading anything.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from voxtral.codec.record import MIMI_DEFAULT_NQ, SAMPLE_RATE, CodecInfo, codec_info, weights_name
from voxtral.config import ENCODEC_BANDWIDTH_NQ, CodecConfig

MIMI_HF_ID = "kyutai/mimi"


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

    def __init__(
        self, bandwidth: float, n_q: int | None, pretrained: bool | str, size: str = "full"
    ):
        super().__init__()

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
            model = _encodec_24khz(pretrained is True, size)
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
            CodecConfig(name="encodec", bandwidth=bandwidth, pretrained=pretrained, size=size)
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

    def __init__(self, n_q: int | None, pretrained: bool | str, size: str = "full"):
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
                model = MimiModel(MimiConfig(**(TINY_MIMI if size == "tiny" else {})))
            _calibrate_mimi(model)
        n_q = n_q or MIMI_DEFAULT_NQ
        if not 1 <= n_q <= model.config.num_quantizers:
            raise ValueError(f"codec.n_q must be in 1..{model.config.num_quantizers}, got {n_q}")
        self.model = model.eval()
        cfg = model.config
        weights = weights_name(pretrained, size)
        self.info = CodecInfo(
            "mimi", n_q, cfg.codebook_size, cfg.sampling_rate, cfg.frame_rate, weights
        )

    @torch.inference_mode()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        return self.model.encode(self._check(wav), num_quantizers=self.n_q).audio_codes

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode(self._check_codes(codes)).audio_values


# `codec.size: tiny` (random init only): the same codecs, rates and codebooks at a fraction of
# their width and depth, for CPU demos and tests, where a random codec's sounds mean nothing
# anyway. Measured on 2 cores, one 80 ms step with 6 frames of context: EnCodec 15 M → 0.8 M
# parameters, Mimi 79 M → 0.6 M, each about 6-30 times faster (README, Known limits).
TINY_ENCODEC = {"n_filters": 8, "lstm": 1}
TINY_MIMI = {
    "hidden_size": 64,
    "num_filters": 8,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "intermediate_size": 128,
    "upsample_groups": 64,
    "codebook_dim": 64,
    "vector_quantization_hidden_dimension": 64,
}


def _encodec_24khz(pretrained: bool, size: str):
    """EnCodec 24 kHz as ``EncodecModel.encodec_model_24khz`` builds it (causal, weight norm,
    no normalisation); ``tiny`` narrows its SEANet encoder and decoder."""
    from encodec import EncodecModel
    from encodec.modules import SEANetDecoder, SEANetEncoder
    from encodec.quantization import ResidualVectorQuantizer

    if size != "tiny":
        return EncodecModel.encodec_model_24khz(pretrained=pretrained)
    seanet = {"channels": 1, "norm": "weight_norm", "causal": True, **TINY_ENCODEC}
    encoder, decoder = SEANetEncoder(**seanet), SEANetDecoder(**seanet)
    bandwidths = sorted(ENCODEC_BANDWIDTH_NQ)
    n_q = ENCODEC_BANDWIDTH_NQ[bandwidths[-1]]
    quantizer = ResidualVectorQuantizer(dimension=encoder.dimension, n_q=n_q, bins=1024)
    return EncodecModel(
        encoder, decoder, quantizer, bandwidths, SAMPLE_RATE, 1, normalize=False, name="tiny"
    )


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
        codec: Codec = EncodecCodec(cfg.bandwidth, cfg.n_q, cfg.pretrained, cfg.size)
    elif cfg.name == "mimi":
        codec = MimiCodec(cfg.n_q, cfg.pretrained, cfg.size)
    else:  # config validation makes this unreachable; kept for direct callers
        raise ValueError(f"unknown codec {cfg.name!r} (expected 'encodec' or 'mimi')")
    return codec.to(device).eval()
