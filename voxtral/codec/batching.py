"""Batched codec encoding that gives exactly the codes of encoding each chunk alone.

Chunks are decoded to PCM at the codec rate (int16 when that is exact: half the bytes through
the object store and to the GPU), grouped by length (:func:`plan_batches`), zero-padded to
the longest one's whole frames (:func:`pad_batch`) and encoded in one call
(:func:`encode_padded`); a batch the codec rejects is retried one chunk at a time
(:func:`encode_group`), so only the chunk at fault fails.

**Why batching does not change the codes.** Both codecs are causal: frame ``f`` depends
only on samples up to the end of frame ``f``. In a batch every chunk is padded with zeros to
the longest one, so each chunk is encoded as its audio followed by silence up to whole
frames, exactly what :func:`encode_alone` feeds the codec for one chunk, and keeps
``ceil(samples / hop)`` frames. (Feeding the codec a partial last frame instead would let its
own edge padding, ``reflect`` for EnCodec, decide that frame, so it would depend on the
batch.) The tests check the equality for every chunk of the sample corpus. Floating point
is the limit: Mimi's encoder transformer sums over the padded length in another order,
EnCodec's LSTM multiplies matrices whose blocking may follow the batch size (on CPU too: one
code of 1,200 flipped on an AMD EPYC), and GPU kernels are picked per shape, so the last bits
can differ and a code flips where two codebook entries are near ties (the tests allow those
only; bench/preprocess.py measures them).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch

from voxtral.audio import AudioError, flac_decode, prepare
from voxtral.codec.models import Codec

log = logging.getLogger(__name__)

PCM16_SCALE = 32768.0


def decode_chunk(audio: bytes, target_sr: int) -> np.ndarray:
    """FLAC bytes → mono float32 samples at the codec rate (the tokenizer's own path)."""
    wav, sr = flac_decode(audio)
    return prepare(wav, sr, target_sr).numpy()


def as_pcm16(wav: np.ndarray) -> np.ndarray | None:
    """The int16 samples whose ``/ 32768`` is exactly ``wav``, or None if there are none.

    16-bit FLAC at the codec rate decodes to such samples: shipping them as int16 halves
    what goes through the object store and to the GPU, and changes no value.
    """
    scaled = wav * np.float32(PCM16_SCALE)
    if scaled.size and (scaled.min() < -PCM16_SCALE or scaled.max() > PCM16_SCALE - 1):
        return None
    pcm = scaled.astype(np.int16)
    return pcm if np.array_equal(pcm, scaled) else None


def decode_pcm(audio: bytes, target_sr: int) -> np.ndarray:
    """FLAC bytes → PCM at the codec rate: int16 when exact, else float32."""
    wav = decode_chunk(audio, target_sr)
    pcm = as_pcm16(wav)
    return wav if pcm is None else pcm


def plan_batches(lengths: Sequence[int], max_batch: int, max_pad: float) -> list[list[int]]:
    """Group indices of similar length: at most ``max_batch`` per group, and at most
    ``max_pad`` of a group's padded samples are padding. Longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    total = 0
    for i in order:
        if groups:
            group = groups[-1]
            longest = lengths[group[0]]
            padded = longest * (len(group) + 1)
            if len(group) < max_batch and (padded - total - lengths[i]) <= max_pad * padded:
                group.append(i)
                total += lengths[i]
                continue
        groups.append([i])
        total = lengths[i]
    return groups


def pad_batch(pcms: Sequence[np.ndarray], hop: int) -> np.ndarray:
    """Chunks → ``[n, width]`` zero-padded to the longest one's whole frames; int16 if every
    chunk is int16 PCM, else float32 (int16 rows scaled by 1/32768, exactly)."""
    frames = [math.ceil(len(p) / hop) for p in pcms]
    if not pcms or min(frames) < 1:
        raise AudioError("chunk holds no samples")
    pcm16 = all(p.dtype == np.int16 for p in pcms)
    out = np.zeros((len(pcms), max(frames) * hop), dtype=np.int16 if pcm16 else np.float32)
    for i, p in enumerate(pcms):
        out[i, : len(p)] = p if pcm16 or p.dtype != np.int16 else p / np.float32(PCM16_SCALE)
    return out


def _autocast(codec: Codec, enabled: bool):
    if enabled and codec.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def encode_padded(
    codec: Codec, pcm: np.ndarray, samples: Sequence[int], autocast: bool = False
) -> list[np.ndarray]:
    """One codec call on a padded ``[n, width]`` batch; each chunk keeps exactly
    ``ceil(samples / hop)`` frames. Returns int16 ``[n_q, frames]`` arrays."""
    info = codec.info
    frames = [info.frames(n) for n in samples]
    if min(frames) < 1:
        raise AudioError("chunk holds no samples")
    if pcm.shape != (len(samples), pcm.shape[1]) or pcm.shape[1] < max(frames) * info.hop:
        raise ValueError(f"pcm {pcm.shape} does not hold {len(samples)} chunks of {samples}")
    with warnings.catch_warnings():  # a read-only view of the object store; only copied
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(pcm)
    x = x.to(codec.device)
    if x.dtype == torch.int16:
        x = x.float().div_(PCM16_SCALE)  # exact: the same floats as decoding to float32
    with _autocast(codec, autocast):
        codes = codec.encode(x[:, None, :])
    codes = codes.to("cpu", torch.int16).numpy()
    if codes.shape[1] != info.n_q or codes.shape[2] < max(frames):
        raise ValueError(f"codec returned {codes.shape}, expected [{len(samples)}, {info.n_q}, ≥F]")
    out = [codes[i, :, :f] for i, f in enumerate(frames)]
    for c in out:
        if c.min() < 0 or c.max() >= info.codebook_size:
            raise ValueError(f"codec returned codes outside [0, {info.codebook_size})")
    return out


def encode_group(
    codec: Codec, pcm: np.ndarray, samples: Sequence[int], autocast: bool = False
) -> list[np.ndarray | Exception]:
    """Encode a packed batch; if the codec rejects it, retry one chunk at a time so only
    the chunk at fault becomes an exception (later a ``failures/`` row)."""
    try:
        return list(encode_padded(codec, pcm, samples, autocast))
    except Exception as exc:  # noqa: BLE001 - isolated below, one chunk at a time
        if len(samples) == 1:
            return [exc]
        log.warning("codec batch of %d failed (%s); encoding one by one", len(samples), exc)
        _release_cuda_memory()
    results: list[np.ndarray | Exception] = []
    for i, n in enumerate(samples):
        width = codec.info.frames(n) * codec.info.hop
        try:
            results.append(encode_padded(codec, pcm[i : i + 1, :width], [n], autocast)[0])
        except Exception as exc:  # noqa: BLE001 - becomes a failures/ row
            results.append(exc)
    return results


def encode_batch(codec: Codec, wavs: Sequence[np.ndarray], autocast: bool = False) -> list:
    """Float chunks → codes in one codec call (pad, encode, trim)."""
    return encode_padded(codec, pad_batch(wavs, codec.info.hop), [len(w) for w in wavs], autocast)


def encode_alone(codec: Codec, wav: np.ndarray) -> np.ndarray:
    """One chunk on its own: the reference that batched encoding must reproduce."""
    return encode_batch(codec, [wav])[0]


def _release_cuda_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def probe_clip(sample_rate: int, seconds: float = 3.0) -> np.ndarray:
    """A fixed speech-like clip (voiced bursts with pitch glides and a little noise)."""
    t = np.arange(int(sample_rate * seconds), dtype=np.float64) / sample_rate
    f0 = 140 + 40 * np.sin(2 * np.pi * 0.8 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 2.5 * t), 0, None) ** 0.5
    noise = np.random.default_rng(0).standard_normal(t.size) * 0.01
    return (0.2 * voiced * envelope + noise).astype(np.float32)


def autocast_keeps_codes(codec: Codec, seconds: float = 3.0) -> bool:
    """Whether half-precision autocast gives the same codes as fp32 on a probe clip."""
    if codec.device.type != "cuda":
        return False
    clip = probe_clip(codec.sample_rate, seconds)
    return bool(np.array_equal(encode_alone(codec, clip), encode_batch(codec, [clip], True)[0]))
