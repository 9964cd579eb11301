"""Stage 4 end to end on CPU: 2 Ray Train workers, DeepSpeed ZeRO-2/3, the tiny model.

The token rows are built here (patterned codes with a little noise, timed caption ids), in
the TOKENS schema with the codec record preprocess writes, so these tests depend on
neither scrape nor preprocess. Runs share one storage root and differ by run name.

The runs here are two-stream (full duplex, ``tokenizer.streams=2``: each row has the
model's track and the user's), so training, resume and export are covered for it; the
single-stream path runs end to end in tests/test_pipeline.py.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.commands import ENCODEC
from voxtral.config import DEFAULT_CONFIG, Config, ConfigError, load_config
from voxtral.schema import CODEC_RECORD
from voxtral.storage import Storage

TRAIN = [
    *ENCODEC,
    "train.num_workers=2",
    "tokenizer.streams=2",
    # groups of 1 + 2 streams * 3 frames * 2 codebooks = 13 tokens (0.04 s): 1 + 40 groups,
    # so a 3 s chunk is two windows (1.6 s of context: shorter ones do not generalise to
    # the held-out video's patterns in 30 steps)
    "train.seq_len=521",
    "train.micro_batch=2",
    "train.max_steps=30",
    "train.warmup_steps=3",
    "train.lr=0.005",
    "train.log_every=5",
    "train.eval_every=10",
    "train.checkpoint_every=10",
    "train.max_failures=2",
    "train.sample_seconds=1",
    "train.prompt_seconds=0.5",
    "train.eval_fraction=0.2",
]
WORDS = "so what do you think about that i mean it is a really good question".split()


def make_cfg(root: Path, *overrides: str) -> Config:
    return load_config(DEFAULT_CONFIG, [f"storage.root={root}", *TRAIN, *overrides], env={})


CORPUS_VIDEOS = 6
"""Videos in ``write_tokens``' corpus (``vid0``…), unless a test asks for fewer."""


def write_tokens(
    cfg: Config,
    videos: int = CORPUS_VIDEOS,
    chunks: int = 2,
    seconds: float = 3.0,
    user: bool = True,
    root: Path | None = None,
) -> None:
    """Token rows a model can learn quickly: each codebook follows a per-video pattern, and
    so does the user's track (another one); ``user=False`` writes single-stream rows."""
    from voxtral.codec import codec_info
    from voxtral.model import load_text_tokenizer, resolve_base
    from voxtral.schema import TOKENS

    info = codec_info(cfg.codec)
    tok = load_text_tokenizer(resolve_base(cfg.model))
    rng = np.random.default_rng(0)
    frames = int(seconds * info.frame_rate)
    f = np.arange(frames)
    rows = []
    for v in range(videos):
        for c in range(chunks):
            codes = np.stack(
                [
                    (7 * v + 3 * q + 5 * (f // (2 + q)) + c) % info.codebook_size
                    for q in range(info.n_q)
                ]
            )
            noise = rng.random(codes.shape) < 0.05
            codes[noise] = rng.integers(0, info.codebook_size, noise.sum())
            user_codes = np.stack(
                [
                    (11 * v + 2 * q + 3 * (f // (3 + q)) + 7 * c) % info.codebook_size
                    for q in range(info.n_q)
                ]
            )
            ids, starts = [], []
            for i, word in enumerate(WORDS[(v + c) % 5 :][:8]):
                for tid in tok(" " + word, add_special_tokens=False)["input_ids"]:
                    ids.append(tid)
                    starts.append(0.3 * i)
            rows.append(
                dict(
                    chunk_id=f"vid{v}-{c:03d}",
                    video_id=f"vid{v}",
                    codec=info.name,
                    n_q=info.n_q,
                    frames=frames,
                    codes=codes.astype("<i2").tobytes(),
                    text_ids=ids,
                    text_starts_s=starts,
                    model_speaker="SPEAKER_00" if user else None,
                    user_codes=user_codes.astype("<i2").tobytes() if user else None,
                )
            )
    st = Storage(root or cfg.storage.root)
    half = len(rows) // 2
    st.write_table("tokens/part-000.parquet", pa.Table.from_pylist(rows[:half], schema=TOKENS))
    st.write_table("tokens/part-001.parquet", pa.Table.from_pylist(rows[half:], schema=TOKENS))
    st.write_json(CODEC_RECORD, codec_info(cfg.codec).to_dict())


def held_out_videos(cfg: Config) -> frozenset[str]:
    """The videos of ``write_tokens``' corpus that ``run_train`` holds out for eval."""
    from voxtral.stages.train.data import eval_videos

    videos = [f"vid{v}" for v in range(CORPUS_VIDEOS)]
    return frozenset(eval_videos(videos, cfg.train.eval_fraction, cfg.train.seed))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train") / "run"
    write_tokens(make_cfg(root))
    return root


@pytest.fixture(scope="module")
def zero2(root, ray_session):
    """The uninterrupted ZeRO-2 run: trained, checkpointed, exported."""
    from voxtral.stages.train.run import read_metrics, run_train

    cfg = make_cfg(root, "train.run_name=zero2", "train.zero_stage=2")
    before = signal.getsignal(signal.SIGINT)
    summary = run_train(cfg)
    SIGINT_HANDLERS["zero2"] = (before, signal.getsignal(signal.SIGINT))
    return cfg, summary, read_metrics(cfg)


SIGINT_HANDLERS: dict[str, tuple] = {}
"""SIGINT's handler before and after the ZeRO-2 run (the fixture above records them)."""


@pytest.mark.slow
def test_ctrl_c_is_given_back_once_training_returns(zero2):
    """Ray Train installs a SIGINT handler that aborts the run and leaves it after the run
    is over: ``jobs/everything.py``'s serve phase could then not be stopped with Ctrl-C."""
    before, after = SIGINT_HANDLERS["zero2"]
    assert after is before


class WorkerKiller(threading.Thread):
    """SIGKILLs one of this test process's Ray Train workers once the run has committed a
    checkpoint at ``after_step`` or later (the controller writes the metrics line after
    registering the report's checkpoint), so the restart has something to resume from."""

    def __init__(self, cfg: Config, after_step: int):
        super().__init__(daemon=True)
        self.cfg, self.after_step = cfg, after_step
        self.killed: int | None = None
        self.stop = threading.Event()

    def committed(self) -> bool:
        from voxtral.stages.train.run import read_metrics

        try:
            steps = [m["step"] for m in read_metrics(self.cfg)]
        except (OSError, ValueError):
            return False
        return any(s >= self.after_step for s in steps)

    def workers(self) -> list:
        import psutil

        out = []
        for p in psutil.Process(os.getpid()).children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(p.cmdline()):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def run(self) -> None:
        while not self.stop.is_set():
            if self.committed():
                procs = self.workers()
                if procs:
                    victim = max(procs, key=lambda p: p.pid)
                    os.kill(victim.pid, signal.SIGKILL)
                    self.killed = victim.pid
                    return
            time.sleep(0.05)


@pytest.fixture(scope="module")
def zero3(root, ray_session):
    """The ZeRO-3 run, interrupted twice: stopped after its step-10 checkpoint, rerun under
    the same name, and a worker SIGKILLed once the step-20 checkpoint is committed."""
    from voxtral.stages.train.run import read_metrics, run_train

    names = ("train.run_name=zero3", "train.zero_stage=3", "train.export=false")
    stopped = run_train(make_cfg(root, *names, "train.stop_after_step=10"))
    cfg = make_cfg(root, *names)
    killer = WorkerKiller(cfg, after_step=20)
    killer.start()
    try:
        summary = run_train(cfg)
    finally:
        killer.stop.set()
        killer.join()
    return cfg, summary, read_metrics(cfg), stopped, killer.killed


def assert_trained(cfg: Config, summary: dict, history: list[dict]) -> None:
    assert summary["finished"] and summary["step"] == cfg.train.max_steps
    first, last = history[0], history[-1]
    assert last["step"] == cfg.train.max_steps
    assert last["loss"] < first["loss"] - 0.5, [round(m["loss"], 3) for m in history]
    evals = [m["eval_loss"] for m in history if "eval_loss" in m]
    assert len(evals) == cfg.train.max_steps // cfg.train.eval_every and evals[-1] < evals[0]
    for key in (
        "loss_text",
        "loss_text_pad",
        "loss_audio_q0",
        "loss_audio_rest",
        "loss_user_audio",
        "eval_loss_user_audio",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "audio_s_per_s",
        "eval_loss",
    ):
        assert np.isfinite(last[key]), key
    assert "mfu" not in last  # CPU: no peak to compare with
    assert last["lr"] < max(m["lr"] for m in history)  # warmup, then cosine decay


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stage_trains_and_loss_falls(stage, request):
    cfg, summary, history, *_ = request.getfixturevalue(f"zero{stage}")
    assert cfg.train.zero_stage == stage
    assert_trained(cfg, summary, history)
    assert summary["videos_held_out"] >= 1
    # ZeRO-3 partitions the weights as they load: each of the 2 workers holds half of every
    # large tensor. Tensors under stage3_param_persistence_threshold (1e5 elements: most of
    # the tiny model, the norms of a 7B one) stay whole on every rank.
    built = history[0]["built_param_fraction"]
    assert 0.5 <= built < 0.95 if stage == 3 else built == 1.0


@pytest.mark.slow
def test_stopped_run_resumes_to_the_same_result(zero2, zero3):
    _, _, reference, *_ = zero2
    _, _, history, stopped, _ = zero3
    assert stopped["step"] == 10 and not stopped["finished"]
    resumed = {m["step"]: m["resumed_from_step"] for m in history}
    assert resumed[10] == 0 and resumed[15] == 10  # the rerun picked up the step-10 checkpoint
    # Same losses, step by step, as the uninterrupted run (ZeRO-2 and -3 are the same
    # optimizer; the data position is restored exactly).
    ref = {m["step"]: m for m in reference}
    assert sorted(ref) == sorted(m["step"] for m in history)
    for m in history:
        assert m["loss"] == pytest.approx(ref[m["step"]]["loss"], rel=0.01), m["step"]
    assert history[-1]["eval_loss"] == pytest.approx(reference[-1]["eval_loss"], rel=0.01)


@pytest.mark.slow
def test_killed_worker_is_restarted_and_the_run_completes(zero3):
    cfg, summary, history, _, killed = zero3
    assert killed is not None, "no training worker was killed"
    assert summary["finished"]
    # The restart resumed from the step-20 checkpoint, not from the start of this rerun.
    assert history[-1]["resumed_from_step"] >= 20
    # The final ZeRO-3 shards consolidate into the model.
    from voxtral.stages.train.checkpoint import checkpoint_tag
    from voxtral.stages.train.export import consolidated_state_dict, load_trained

    state = consolidated_state_dict(summary["checkpoint"], checkpoint_tag(cfg.train.max_steps))
    load_trained(cfg, state)


@pytest.mark.slow
def test_export_loads_and_generates_well_formed_streams(zero2):
    import soundfile as sf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from voxtral.interleave import StreamDecoder
    from voxtral.layout import Layout
    from voxtral.model import read_voxtral_json
    from voxtral.stages.train.export import SAMPLE_JSON, SAMPLE_WAV
    from voxtral.stages.train.run import validate
    from voxtral.stages.train.sample import generate_ids, user_continuation

    cfg, summary, _ = zero2
    folder = Path(summary["export"])
    assert (folder / "model.safetensors").is_file()
    layout = Layout.from_dict(read_voxtral_json(folder)["layout"])
    assert layout == validate(cfg)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert model.get_input_embeddings().weight.shape[0] == layout.vocab.padded_size
    AutoTokenizer.from_pretrained(folder)

    note = json.loads((folder / SAMPLE_JSON).read_text())
    assert layout.streams == 2 and note["channels"] == ["user", "model"]
    sample = np.asarray(note["ids"])
    prompt = sample[: layout.seq_len_for_groups(5)]
    # ten whole groups, then a text slot and half a model frame (held back by the decoder);
    # the user's slots are given: the sample's own user track
    n = 10 * layout.group_len + 2
    start = len(prompt)
    given = user_continuation(layout, sample, start, n, np.zeros(layout.vocab.n_q, int))
    new = generate_ids(model, layout, prompt, n, seed=1, given=given)
    assert all(layout.is_allowed(start + i, int(t)) for i, t in enumerate(new))
    user_slots = given >= 0
    assert user_slots.any()
    assert np.array_equal(new[user_slots], sample[start : start + n][user_slots])
    decoder = StreamDecoder(layout, index=start)
    codes, _text, user = decoder.push_duplex(new)
    assert decoder.dropped == 0
    assert codes.shape == (layout.vocab.n_q, 10 * layout.frames_per_group)
    assert user.shape == (layout.vocab.n_q, 10 * layout.frames_per_group)

    wav, sr = sf.read(folder / SAMPLE_WAV)
    assert sr == 24_000 and wav.ndim == 2 and wav.shape[1] == 2  # user left, model right
    expected = cfg.train.prompt_seconds + cfg.train.sample_seconds
    assert abs(len(wav) / sr - expected) < 0.2
    assert np.isfinite(wav).all()


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.zero_stage=4", "train.zero_stage"),
        ("train.num_workers=0", "train.num_workers"),
        ("train.offload_params=true", "train.offload_params"),
    ],
)
def test_bad_train_config_is_refused_when_loaded(override, key, tmp_path):
    with pytest.raises(ConfigError, match=key):
        make_cfg(tmp_path, override)


def test_train_workers_get_the_serve_token_only_as_a_digest(root, ray_session, monkeypatch):
    """Ray Train keeps ``train_loop_config`` (the dashboard shows it): the config in it holds
    no secret."""
    from voxtral.stages.train import run
    from voxtral.stages.train.run import run_train

    class Captured(Exception):
        pass

    def trainer(*args, **kwargs):
        raise Captured(kwargs)

    monkeypatch.setattr(run, "TorchTrainer", trainer)
    token = "train-side-" + "t" * 32
    with pytest.raises(Captured) as got:
        run_train(make_cfg(root, f"serve.token={token}", "train.run_name=secret"))
    shipped = got.value.args[0]["train_loop_config"]
    assert token not in json.dumps(shipped)
    assert Config.model_validate(shipped["cfg"]).serve.token_matches(token)


def test_bad_configs_fail_before_any_work(root):
    from voxtral.codec import CodecMismatchError
    from voxtral.stages.train.run import run_train

    storage = Storage(root)
    with pytest.raises(ConfigError, match=r"train\.seq_len=280 .* groups of 13"):
        run_train(make_cfg(root, "train.seq_len=280", "train.run_name=bad1"))
    with pytest.raises(CodecMismatchError, match="n_q"):  # tokens are 2-codebook EnCodec
        # 4 codebooks: groups of 1 + 2 * 3 * 4 = 25, so seq_len 501 is valid for that layout
        run_train(make_cfg(root, "codec.bandwidth=3.0", "train.seq_len=501", "train.run_name=bad2"))
    assert not storage.exists("train", "bad1") and not storage.exists("train", "bad2")


def test_windows_cut_in_the_driver_are_those_of_the_ray_data_plan(root, ray_session):
    """A corpus of a few MB is cut into windows in the driver (no read and map tasks to
    start); the training split holds the same windows, in the same order, as from the
    Ray Data plan that a larger corpus streams through."""
    from voxtral.stages.train.run import validate, window_dataset

    cfg = make_cfg(root)
    layout, storage, held_out = validate(cfg), Storage(root), held_out_videos(cfg)
    rows = {
        in_driver: window_dataset(
            storage, layout, cfg.train.seq_len, held_out, False, True, in_driver
        ).take_all()
        for in_driver in (False, True)
    }
    assert rows[True] and not {str(r["chunk_id"])[:4] for r in rows[True]} & held_out
    assert [(r["chunk_id"], r["window"]) for r in rows[True]] == [
        (r["chunk_id"], r["window"]) for r in rows[False]
    ]


def test_two_stream_run_refuses_single_stream_tokens_before_any_work(tmp_path):
    """Tokens from before full duplex (no user_codes column) or with single-stream rows
    mixed in are refused up front under ``tokenizer.streams=2``, from the file footers."""
    import pyarrow.parquet as pq

    from voxtral.stages.train.run import run_train
    from voxtral.stages.train.token_check import TokenMismatchError

    for name, kwargs in (("old", {"user": False}), ("mixed", {})):
        root = tmp_path / name
        cfg = make_cfg(root, "train.run_name=mono")
        write_tokens(cfg, videos=2, chunks=1, user=kwargs.get("user", True))
        storage = Storage(root)
        if name == "mixed":  # plus a file of single-stream rows (user_codes null)
            write_tokens(cfg, videos=2, chunks=1, user=False, root=root / "tokens" / "more")
        else:  # files written before the column existed
            for path in storage.parquet_files("tokens"):
                table = pq.read_table(path)
                pq.write_table(table.drop_columns(["model_speaker", "user_codes"]), path)
        with pytest.raises(TokenMismatchError, match=r"no user_codes.*tokenizer\.streams=2"):
            run_train(cfg)
        assert not Storage(root).exists("train", "mono")


# -- the loop itself, in one process ------------------------------------------------------
# Ray Train's local mode (``num_workers=0``) runs ``train_loop`` in this process, on a real
# one-rank gloo group and real DeepSpeed, so the loop's internals can be watched and a fault
# injected by patching ``voxtral.stages.train.loop._forward``. What the loop hands to
# ``ray.train.report`` is recorded, checkpoints copied as Ray's storage would keep them.
LOCAL = [
    "train.num_workers=1",
    "train.export=false",
    "train.log_every=1",
    "train.warmup_steps=1",
    "model.gradient_checkpointing=true",
]


class Reported:
    """Wraps ``ray.train.report``: keeps every report's metrics and a copy of each
    checkpoint folder (the loop deletes its own once reported)."""

    def __init__(self, keep: Path):
        import ray.train

        self.keep, self.real = keep, ray.train.report
        self.metrics: list[dict] = []
        self.checkpoints: dict[int, Path] = {}

    def __call__(self, metrics, checkpoint=None, checkpoint_dir_name=None, **kw):
        import shutil

        self.metrics.append(dict(metrics))
        if checkpoint is not None:
            dest = self.keep / checkpoint_dir_name
            shutil.copytree(checkpoint.path, dest)
            self.checkpoints[metrics["step"]] = dest
        self.real(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name, **kw)


def run_local(cfg: Config, monkeypatch, reported: Reported) -> Reported:
    """``train_loop`` through ``TorchTrainer`` in local mode, reports going to ``reported``."""
    import socket

    import ray.train
    import torch.distributed as dist
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from voxtral.stages.train.loop import train_loop
    from voxtral.stages.train.run import validate, window_dataset

    layout = validate(cfg)
    storage = Storage(cfg.storage.root)
    held_out = held_out_videos(cfg)
    datasets = {
        split: window_dataset(storage, layout, cfg.train.seq_len, held_out, split == "eval", True)
        for split in ("train", "eval")
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(
        RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, LOCAL_WORLD_SIZE=1, MASTER_ADDR="127.0.0.1"
    ).items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setattr(ray.train, "report", reported)

    def train_then_release(config: dict) -> None:
        import deepspeed.comm

        try:
            train_loop(config)
        finally:  # DeepSpeed's destroy also drops its cached groups: the next run makes new
            deepspeed.comm.destroy_process_group()

    trainer = TorchTrainer(
        train_then_release,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "layout": layout.to_dict()},
        scaling_config=ScalingConfig(num_workers=0),
        run_config=RunConfig(name=cfg.train.run_name, storage_path=str(reported.keep)),
        datasets=datasets,
    )
    trainer.fit()
    assert not dist.is_initialized()
    return reported


class WatchForward:
    """Replaces ``loop._forward``: per call, whether autograd was on, the module's training
    flag and how often layer 1's MLP had run so far; ``bad`` steps (1-based training calls)
    get a NaN loss and NaN stats; ``snapshots[step]`` holds the weights as that step began."""

    def __init__(self, real, bad: set[int] = frozenset(), snapshot: bool = False, poison: int = 0):
        self.real, self.bad, self.snapshot, self.poison = real, bad, snapshot, poison
        self.calls: list[tuple[bool, bool, int]] = []
        self.snapshots: dict[int, list] = {}
        self.mlp = None
        self.step = 0

    def __call__(self, engine, batch, weights):
        import torch

        grad = torch.is_grad_enabled()
        mlp_calls = self.mlp.calls if self.mlp is not None else -1
        self.calls.append((grad, engine.module.training, mlp_calls))
        if grad:
            self.step += 1
            if self.step == self.poison:  # a weight turns NaN (a bad update, a bit flip)
                norm = dict(engine.module.named_parameters())["model.norm.weight"]
                norm.data.view(-1)[0] = float("nan")  # used by every forward
            if self.snapshot:  # (ZeRO-3: the rank's flat shard, here all of it)
                self.snapshots[self.step] = {
                    name: getattr(p, "ds_tensor", p).detach().clone()
                    for name, p in engine.module.named_parameters()
                }
        loss, stats = self.real(engine, batch, weights)
        if grad and self.step in self.bad:
            return loss + float("nan"), stats + float("nan")
        return loss, stats


def watch(
    monkeypatch, bad: set[int] = frozenset(), snapshot: bool = False, poison: int = 0
) -> WatchForward:
    import voxtral.stages.train.loop as loop
    from tests.test_model import CountCalls

    watcher = WatchForward(loop._forward, bad, snapshot, poison)
    build = loop.build_speech_lm

    def build_and_count(*args, **kwargs):
        model, tok, layout = build(*args, **kwargs)
        watcher.mlp = CountCalls(model.model.layers[1].mlp)
        return model, tok, layout

    monkeypatch.setattr(loop, "build_speech_lm", build_and_count)
    monkeypatch.setattr(loop, "_forward", watcher)
    return watcher


def test_train_loop_trains_in_training_mode_from_the_first_step(root, tmp_path, monkeypatch):
    """``from_pretrained`` hands back a model in eval mode; the loop must switch it to
    training before its first step (dropout, gradient checkpointing) and back after each
    eval."""
    cfg = make_cfg(
        root,
        *LOCAL,
        "train.run_name=mode",
        "train.max_steps=4",
        "train.eval_every=2",
        "train.checkpoint_every=4",
        "train.eval_max_batches=1",
    )
    watcher = watch(monkeypatch)
    run_local(cfg, monkeypatch, Reported(tmp_path))
    train_calls = [c for c in watcher.calls if c[0]]
    eval_calls = [c for c in watcher.calls if not c[0]]
    assert len(train_calls) == 4 and eval_calls
    assert all(training for _, training, _ in train_calls), watcher.calls
    assert not any(training for _, training, _ in eval_calls), watcher.calls
    # Gradient checkpointing is live from step 1: each training forward runs the MLP twice
    # (forward, then recomputed in backward); an eval forward runs it once.
    counts = [c[2] for c in watcher.calls] + [watcher.mlp.calls]
    ran = [b - a for a, b in zip(counts, counts[1:], strict=False)]
    assert ran == [2 if grad else 1 for grad, _, _ in watcher.calls], watcher.calls


@pytest.mark.parametrize("stage", [2, 3])
def test_nonfinite_steps_are_skipped_and_a_streak_stops_the_run(stage, root, tmp_path, monkeypatch):
    from voxtral.stages.train.checkpoint import checkpoint_tag
    from voxtral.stages.train.export import consolidated_state_dict
    from voxtral.stages.train.loop import NonFiniteTraining

    cfg = make_cfg(
        root,
        *LOCAL,
        f"train.run_name=nan{stage}",
        f"train.zero_stage={stage}",
        "train.max_steps=10",
        "train.log_every=2",
        "train.eval_every=4",
        "train.checkpoint_every=4",
        "train.eval_max_batches=1",
        "train.max_nonfinite_steps=3",
    )
    watcher = watch(monkeypatch, bad={3, 6, 7, 8}, snapshot=True)
    reported = Reported(tmp_path)
    with pytest.raises(NonFiniteTraining, match=r"3 training steps in a row .*\(step 4\)"):
        run_local(cfg, monkeypatch, reported)
    by_step = {m["step"]: m for m in reported.metrics}
    snap = watcher.snapshots  # the weights as each step began

    def same(a: int, b: int) -> bool:
        return all(bool((snap[a][k] == snap[b][k]).all()) for k in snap[a])

    # Step 3 was skipped: no update, counted, and its NaN kept out of the window's loss.
    assert not same(2, 3) and same(3, 4) and not same(4, 5)
    assert by_step[2]["nonfinite_steps"] == 0 and by_step[4]["nonfinite_steps"] == 1
    assert np.isfinite(by_step[4]["loss"]) and np.isfinite(by_step[4]["eval_loss"])
    # The streak 6, 7, 8 stopped the run at step 8: no update in it, nothing saved after 4.
    assert by_step[6]["nonfinite_steps"] == 2 and same(6, 7) and same(7, 8)
    assert max(by_step) == 6 and sorted(reported.checkpoints) == [4]
    # The checkpoint left is step 4's: finite, and the weights that training went on from.
    state = consolidated_state_dict(str(reported.checkpoints[4]), checkpoint_tag(4))
    shared = [k for k in snap[5] if k in state]
    assert len(shared) >= len(snap[5]) - 1  # (a tied head may be stored once)
    for k in shared:
        assert bool(state[k].isfinite().all()), k
        n = state[k].numel()
        assert torch_equal(state[k].flatten(), snap[5][k].flatten()[:n]), k


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a.to(torch.float32), b.to(torch.float32))


def test_non_finite_weights_are_never_checkpointed(root, tmp_path, monkeypatch):
    from voxtral.stages.train.loop import NonFiniteTraining

    cfg = make_cfg(
        root,
        *LOCAL,
        "train.run_name=nanweights",
        "train.max_steps=8",
        "train.log_every=2",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "train.eval_max_batches=1",
        "train.max_nonfinite_steps=5",
    )
    watch(monkeypatch, poison=3)  # from step 3 on, every loss is NaN and every step skipped
    reported = Reported(tmp_path)
    with pytest.raises(NonFiniteTraining, match=r"weights are non-finite at step 4.*\(step 2\)"):
        run_local(cfg, monkeypatch, reported)
    assert sorted(reported.checkpoints) == [2]
