"""The config's sections, one per stage: every key, its default, its bounds and why.

Loaded by :func:`voxtral.config.load_config`; unknown keys and bad values fail before any
work starts, with a message that names the key. One file for the stages' sections (a
little over 400 lines: mostly field declarations, each with its reason) so that the whole
surface a user can set reads in one place; the endpoint's section is in ``config/serve.py``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from voxtral.config.base import Section
from voxtral.config.serve import ServeConfig, token_digest

ENCODEC_BANDWIDTH_NQ = {1.5: 2, 3.0: 4, 6.0: 8, 12.0: 16, 24.0: 32}
"""EnCodec 24 kHz target bandwidth (kbps) → codebooks."""
MIMI_MAX_NQ = 32


class StorageConfig(Section):
    root: str = "./runs/local"
    """Local folder or ``s3://`` / ``gs://`` URI shared by every stage."""


class IndexConfig(Section):
    source: Literal["youtube", "local"] = "youtube"
    local_dir: str = "data/sample"
    searches: str = "data/searches.txt"
    results_per_term: int = Field(50, ge=1)
    max_terms: int | None = Field(None, ge=1)
    min_duration_s: float = Field(600.0, ge=0)
    max_duration_s: float = Field(4 * 3600.0, gt=0)
    concurrency: int = Field(4, ge=1)
    max_retries: int = Field(5, ge=0)
    backoff_s: float = Field(2.0, ge=0)


class ScrapeConfig(Section):
    min_chunk_s: float = Field(10.0, gt=0)
    max_chunk_s: float = Field(30.0, gt=0)
    min_speech_ratio: float = Field(0.3, ge=0, le=1)
    max_attempts: int = Field(3, ge=1)
    num_cpus: float = Field(0.25, gt=0)
    """CPUs reserved per download task: fractional so a node keeps many in flight."""
    concurrency: int = Field(8, ge=1)
    """Scrape tasks in flight per node."""
    timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(3, ge=0)
    rate_limit: str | None = None
    """Download rate limit per task in bytes/s, yt-dlp style (``"2M"``); None = unlimited."""
    cookies_file: str | None = None
    proxy: str | None = None
    format: str = "bestaudio/best"
    """yt-dlp format selector: the best audio stream as served, never re-encoded."""
    vad_rate: Literal[8000, 16000] = 8000
    """Rate silero-vad runs at; 8 kHz costs about half of 16 kHz and finds the same pauses."""
    vad_threshold: float = Field(0.5, gt=0, lt=1)
    captions: bool = True
    """Attach caption words (YouTube automatic captions, ``.vtt`` sidecars of local files)."""
    tmp_dir: str | None = None
    """Where downloads wait while they are cut (a disk with room for a few videos per
    task); None = the system temporary folder. Each task's folder is removed when done."""
    max_download_mb: int = Field(1024, ge=1)
    """A download that announces or reaches more than this stops (``too_large``)."""
    allow_private_hosts: bool = False
    """Fetch non-local rows from loopback, private or link-local addresses too. Off: a
    hostile index must not reach the cluster's own services (metadata endpoints,
    dashboards). Only for an index you trust, e.g. the tests' loopback media server."""

    @model_validator(mode="after")
    def _chunk_bounds(self) -> ScrapeConfig:
        if self.min_chunk_s > self.max_chunk_s:
            raise ValueError("scrape.min_chunk_s must be <= scrape.max_chunk_s")
        return self


class CodecConfig(Section):
    name: Literal["encodec", "mimi"] = "encodec"
    bandwidth: float = 1.5
    """EnCodec target bandwidth in kbps (1.5 → 2 codebooks, 3 → 4, 6 → 8, 12 → 16, 24 → 32)."""
    n_q: int | None = Field(None, ge=1)
    """Codebooks kept; for EnCodec derived from ``bandwidth`` when unset, for Mimi default 8."""
    pretrained: bool | str = False
    """True loads the published weights, False random init (tests, offline demo), a path a
    local checkpoint."""
    size: Literal["full", "tiny"] = "full"
    """Random init only. ``tiny``: the same codec (rates, codebooks, code path) at a fraction
    of its width and depth, under 1 M parameters. It codes about ten times faster on a CPU,
    which the offline demo needs to keep real time in full duplex. Published weights are
    full size."""

    @model_validator(mode="after")
    def _codebooks(self) -> CodecConfig:
        if self.size == "tiny" and self.pretrained is not False:
            raise ValueError("codec.size tiny is random init only (codec.pretrained: false)")
        if self.name == "encodec":
            if self.bandwidth not in ENCODEC_BANDWIDTH_NQ:
                raise ValueError(
                    f"codec.bandwidth {self.bandwidth} is not an EnCodec bandwidth "
                    f"({sorted(ENCODEC_BANDWIDTH_NQ)})"
                )
            expected = ENCODEC_BANDWIDTH_NQ[self.bandwidth]
            if self.n_q is not None and self.n_q != expected:
                raise ValueError(
                    f"codec.n_q {self.n_q} does not match EnCodec bandwidth {self.bandwidth} "
                    f"kbps ({expected} codebooks)"
                )
        elif self.n_q is not None and self.n_q > MIMI_MAX_NQ:
            raise ValueError(f"codec.n_q must be in 1..{MIMI_MAX_NQ} for mimi, got {self.n_q}")
        return self


class DiarizeConfig(Section):
    """Who speaks when, per video, during the scrape (:mod:`voxtral.diarize`)."""

    enabled: bool = True
    """Diarise every scraped video: each chunk gets speaker turns, each caption word a
    speaker. Off: the columns stay empty and ``diarization`` says ``off``."""
    method: Literal["resemblyzer", "pyannote"] = "resemblyzer"
    """``resemblyzer``: its pretrained voice encoder (weights in the wheel: offline, CPU)
    and clustering, streamed with the scrape. ``pyannote``: pyannote.audio's pipeline on
    the whole file (optional package, hub weights behind a token in ``HF_TOKEN``)."""
    device: str = "cpu"
    """Where the speaker encoder runs (``cpu``, ``cuda``): small enough for the CPU."""
    max_speakers: int = Field(8, ge=1, le=64)
    """Most speakers one video may get (the clustering's cap)."""
    window_s: float = Field(1.5, ge=0.5, le=10.0)
    """Audio per speaker embedding: long enough to hear a voice, short enough to hold one."""
    hop_s: float = Field(0.25, ge=0.05, le=5.0)
    """Step between embeddings: the turn boundaries' resolution (and the cost: 1 / hop
    windows per second of speech)."""
    min_window_speech: float = Field(0.5, gt=0, le=1)
    """A window is embedded only when at least this share of it is speech (VAD)."""
    threshold: float = Field(0.1, gt=0, lt=2)
    """Least cosine distance between two speakers' mean embeddings: a split of the voices
    closer than this is one speaker (lower finds more speakers)."""
    min_speaker_share: float = Field(0.1, ge=0, lt=0.5)
    """A speaker must hold at least this share of a video's speech windows: a smaller
    cluster is odd windows of a known voice far more often than a new voice (a guest who
    says almost nothing is merged into the nearest voice)."""
    min_turn_s: float = Field(0.5, ge=0)
    """A speaker change shorter than this inside continuous speech is label flicker."""
    bridge_s: float = Field(0.3, ge=0)
    """A pause shorter than this inside one speaker's speech does not end the turn."""
    overlap_s: float = Field(0.25, ge=0, le=2.0)
    """On a mono mix, a hand-over without a pause counts as this much overlap on each side
    (0: never mark overlap there). By channel, overlap is measured exactly."""
    channel_split: bool = True
    """Split a stereo source by channel when its channels carry different speakers."""
    batch: int = Field(64, ge=1)
    """Windows per encoder call."""
    pyannote_model: str = "pyannote/speaker-diarization-3.1"

    @model_validator(mode="after")
    def _consistent(self) -> DiarizeConfig:
        if self.hop_s > self.window_s:
            raise ValueError("diarize.hop_s must be <= diarize.window_s (windows must touch)")
        if self.enabled and self.method == "pyannote":
            import importlib.util

            try:
                found = importlib.util.find_spec("pyannote.audio") is not None
            except ImportError:  # not even the pyannote namespace
                found = False
            if not found:
                raise ValueError(
                    "diarize.method=pyannote needs the pyannote.audio package, which is not "
                    "installed; use diarize.method=resemblyzer (the default)"
                )
        return self


class TokenizerConfig(Section):
    group_ms: float | None = None
    """Duration of one group (one text slot + whole codec frames); None = one frame."""
    text: bool = True
    text_lead_s: float = Field(0.5, ge=0)
    streams: Literal[1, 2] = 1
    """Audio streams in a group: 1 = the model's speech only; 2 = the model's and the user's
    speech side by side (full duplex, as in Moshi), so the model keeps hearing the user while
    it talks and can be interrupted. Both streams share the codec vocabulary."""
    model_first: bool = True
    """With 2 streams, the model's frames come before the user's in a group (Moshi's order):
    the model then speaks frame t without waiting for the user's frame t, which costs no
    latency. False conditions each model frame on the user's same frame, at one group more
    latency. The text slot stays first either way."""


class ModelConfig(Section):
    base: str = "mistralai/Mistral-7B-v0.3"
    """HF id, local folder, or ``tiny`` (a tiny random Mistral written under storage.root)."""
    keep_every: int = Field(1, ge=1)
    """Layer pruning: keep every k-th decoder layer (1 keeps all)."""
    gradient_checkpointing: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class PreprocessConfig(Section):
    batch_size: int = Field(8, ge=1)
    """Chunks per codec call (similar lengths are batched together)."""
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    """Codec actors: the pool grows from ``min_actors`` to ``max_actors`` with the backlog."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per codec actor; 0 encodes on CPU."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs reserved per codec actor; on CPU also its torch threads (rounded, at least 1)."""
    autocast: bool = False
    """Try half-precision autocast on GPU; kept only if a probe clip's codes stay identical."""
    sort_window: int = Field(512, ge=1)
    """Chunks a decode task sorts by length and packs into codec batches: the larger, the
    less padding the codec computes on (and the more memory a task holds: ~6 bytes per
    sample of the window). Two streams hold ~40 bytes a sample: a task takes a sixth."""
    max_pad: float = Field(0.25, ge=0, lt=1)
    """Most padding a codec batch may hold (share of its samples) before it is split."""
    write_rows: int = Field(1024, ge=1)
    """Token rows per ``tokens/*.parquet`` file."""
    max_attempts: int = Field(3, ge=1)
    """A chunk that failed this many times is skipped by later runs."""

    @model_validator(mode="after")
    def _actors(self) -> PreprocessConfig:
        if self.min_actors > self.max_actors:
            raise ValueError("preprocess.min_actors must be <= preprocess.max_actors")
        return self


class TextConfig(Section):
    """Where each chunk's words (the text stream) come from: captions, speech recognition."""

    source: Literal["captions", "asr", "auto"] = "auto"
    """``captions``: caption words only (a chunk without them gets no text; ASR never runs);
    ``asr``: Whisper's words for every chunk; ``auto``: captions where a chunk has caption
    words, Whisper elsewhere."""
    asr_model: str = "openai/whisper-large-v3-turbo"
    """Whisper for ``asr``/``auto``: a Hugging Face id, a local folder, or ``tiny`` (a tiny
    random Whisper written under the system temporary folder: nonsense words, real mechanics)."""
    batch_size: int = Field(16, ge=1, le=256)
    """30 s windows per Whisper call. Every window costs the same (Whisper pads to 30 s),
    so this is bounded by memory only: ~1 GB per 16 windows for large-v3-turbo in bf16."""
    max_new_tokens: int = Field(224, ge=1, le=440)
    """Text tokens per 30 s window: Whisper's own cap is 224 (448 positions in all, minus
    the prompt); lower it for a random model, which never ends on its own."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto``: bfloat16 on GPU, float32 on CPU."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per ASR actor; 0 runs Whisper on CPU. Fractional shares a GPU with the codec
    actors (e.g. 0.5 each)."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs reserved per ASR actor; on CPU also its torch threads (rounded, at least 1)."""
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    """ASR actors (each holds Whisper once): the pool grows with the backlog."""

    @model_validator(mode="after")
    def _actors(self) -> TextConfig:
        if self.min_actors > self.max_actors:
            raise ValueError("text.min_actors must be <= text.max_actors")
        return self


class TrainConfig(Section):
    run_name: str = Field("voxtral", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    """Names the Ray Train run (checkpoints under ``storage.root/train/<run_name>``) and the
    export (``storage.root/models/<run_name>``); rerunning the same name resumes it."""
    num_workers: int = Field(1, ge=1)
    """Ray Train workers: one per GPU (use_gpu) or per process on CPU."""
    use_gpu: bool = False
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 2 (shard optimizer + gradients) or 3 (parameters too)."""
    offload_optimizer: bool = False
    """Optimizer states and the step on the CPU (DeepSpeedCPUAdam, built on first use)."""
    offload_params: bool = False
    """Parameters on the CPU between uses (ZeRO-3 only)."""
    seq_len: int = Field(2048, ge=2)
    """Tokens per packed sequence: ``1 + k * group_len`` (``<bos>`` + whole groups)."""
    micro_batch: int = Field(1, ge=1)
    """Packed sequences per worker per forward pass."""
    attention: Literal["auto", "sdpa", "flex", "flash_varlen"] = "auto"
    """Attention kernel over the packed windows (:mod:`voxtral.stages.train.attention`):
    ``sdpa`` (dense block-diagonal mask, CPU and GPU), ``flex`` (FlexAttention document
    mask, GPU), ``flash_varlen`` (flash-attn varlen, GPU + the flash-attn package); ``auto``
    picks ``flash_varlen`` if installed, else ``flex``, on GPU and ``sdpa`` on CPU."""
    compile: bool = False
    """``torch.compile`` the model (DeepSpeed's ``engine.compile``): the first steps compile."""
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Floor of the cosine decay, as a fraction of ``lr``."""
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(100, ge=0)
    max_steps: int = Field(1000, ge=1)
    """Optimizer steps (each ``micro_batch * grad_accum * num_workers`` sequences)."""
    stop_after_step: int | None = Field(None, ge=1)
    """End this invocation after that step with a checkpoint, keeping the schedule of
    ``max_steps``; rerunning the same run name continues (time-boxed or preemptible jobs)."""
    grad_clip: float = Field(1.0, gt=0)
    log_every: int = Field(10, ge=1)
    """Steps between metric reports (each report is a barrier across workers)."""
    eval_every: int = Field(100, ge=1)
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of videos held out for eval (by a hash of video_id: no video in both)."""
    eval_max_batches: int = Field(20, ge=1)
    """Cap on held-out batches per worker per eval."""
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int | None = Field(2, ge=1)
    """Checkpoints kept in storage: the best by eval loss, plus always the latest (a restart
    resumes from it); None keeps all."""
    max_nonfinite_steps: int = Field(10, ge=1)
    """Steps in a row with a NaN/inf loss or gradient (each skipped: no update) before the
    run stops with an error; its latest checkpoint still holds the last good weights."""
    max_failures: int = Field(2, ge=-1)
    """Worker failures recovered from the latest checkpoint (-1: no limit)."""
    shuffle_buffer: int = Field(256, ge=1)
    """Windows held by each worker's seeded shuffle buffer (1 = file order)."""
    materialize_mb: int = Field(512, ge=0)
    """A split whose windows take less than this is read once and held in Ray's object
    store (small corpora: no re-reading each epoch); a larger one streams from storage."""
    seed: int = 0
    loss_weight_text: float = Field(1.0, ge=0)
    loss_weight_text_pad: float = Field(0.1, ge=0)
    loss_weight_audio_q0: float = Field(1.0, ge=0)
    loss_weight_audio_rest: float = Field(1.0, ge=0)
    loss_weight_user_audio: float = Field(0.0, ge=0)
    """The user's audio (``tokenizer.streams=2``): input the model listens to, so by default
    not a target (its loss is still reported); Moshi-style training gives it a small weight."""
    peak_tflops: float | None = Field(None, gt=0)
    """Peak dense bf16 TFLOP/s of one GPU for MFU; None looks the GPU's name up."""
    export: bool = True
    """At the end, consolidate the ZeRO shards into ``storage.root/models/<run_name>``."""
    sample_seconds: float = Field(3.0, ge=0)
    """Audio generated from a held-out prompt next to the export (0: none)."""
    prompt_seconds: float = Field(1.0, ge=0)

    @field_validator("zero_stage")
    @classmethod
    def _zero_stage(cls, v: int) -> int:
        if v not in (2, 3):
            raise ValueError(f"must be 2 or 3 (DeepSpeed ZeRO stage), got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("train.offload_params needs train.zero_stage=3")
        if self.attention in ("flex", "flash_varlen") and not self.use_gpu:
            raise ValueError(
                f"train.attention={self.attention} needs train.use_gpu=true (no CPU backward); "
                "use sdpa or auto on CPU"
            )
        if not any(
            (
                self.loss_weight_text,
                self.loss_weight_text_pad,
                self.loss_weight_audio_q0,
                self.loss_weight_audio_rest,
            )
        ):
            raise ValueError(
                "train.loss_weight_*: at least one of the model's streams (text, text_pad, "
                "audio_q0, audio_rest) needs a weight > 0"
            )
        return self

    def check_layout(self, group_len: int) -> None:
        """``seq_len`` must be ``<bos>`` + a whole number (>= 1) of groups of the layout."""
        groups, rest = divmod(self.seq_len - 1, group_len)
        if rest or groups < 1:
            near = max(1, round((self.seq_len - 1) / group_len))
            raise ValueError(
                f"train.seq_len={self.seq_len} is not 1 + a whole number of groups of "
                f"{group_len} tokens (<bos> then groups); e.g. {1 + near * group_len} "
                f"({near} groups)"
            )


class Config(Section):
    storage: StorageConfig = Field(default_factory=StorageConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    scrape: ScrapeConfig = Field(default_factory=ScrapeConfig)
    diarize: DiarizeConfig = Field(default_factory=DiarizeConfig)
    codec: CodecConfig = Field(default_factory=CodecConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _duplex_needs_speakers(self) -> Config:
        # Two-stream rows are made per speaker from the chunks' turns: without diarisation
        # there are none, and preprocess would make no row at all.
        if self.tokenizer.streams == 2 and not self.diarize.enabled:
            raise ValueError(
                "tokenizer.streams=2 (full duplex) needs speaker turns: set "
                "diarize.enabled=true (or tokenizer.streams=1)"
            )
        return self

    def for_cluster(self) -> dict[str, Any]:
        """This config as the plain data that Ray ships to Serve deployments and Ray Train
        workers. Ray shows both (Serve's REST API lists deployment arguments; Ray Train
        keeps ``train_loop_config``), so the token goes as its salted digest instead."""
        data = self.model_dump(mode="json")
        if self.serve.token is not None:
            data["serve"]["token"] = None
            data["serve"]["token_sha256"] = token_digest(self.serve.token)
        return data
