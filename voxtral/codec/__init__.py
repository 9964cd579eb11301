"""Neural audio codecs: the models, the one record of which codec made a set of codes, and
batched encoding that is exact to one-at-a-time encoding.

- :mod:`voxtral.codec.record`: :class:`CodecInfo`, built from a config (:func:`codec_info`),
  stored in ``tokens/_codec.json`` and an export's ``voxtral.json``, compared by every stage.
- :mod:`voxtral.codec.models`: EnCodec and Mimi behind ``encode``/``decode``
  (:func:`load_codec`); ``pretrained: false`` is the same architecture with random weights.
- :mod:`voxtral.codec.batching`: length-grouped, padded batches for preprocess.
"""

from voxtral.codec.models import Codec, EncodecCodec, MimiCodec, load_codec
from voxtral.codec.record import (
    MIMI_DEFAULT_NQ,
    SAMPLE_RATE,
    CodecInfo,
    CodecMismatchError,
    check_codec_compatible,
    codec_info,
    ensure_codec_record,
    model_codec,
    read_codec_record,
)

__all__ = [
    "MIMI_DEFAULT_NQ",
    "SAMPLE_RATE",
    "Codec",
    "CodecInfo",
    "CodecMismatchError",
    "EncodecCodec",
    "MimiCodec",
    "check_codec_compatible",
    "codec_info",
    "ensure_codec_record",
    "load_codec",
    "model_codec",
    "read_codec_record",
]
