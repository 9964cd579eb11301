"""Config: precedence (defaults < YAML < env < --set), both profiles, errors that name the key."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from tests.commands import ENCODEC
from voxtral.codec import codec_info
from voxtral.config import (
    DEFAULT_CONFIG,
    REPO_ROOT,
    Config,
    ConfigError,
    load_config,
    parse_cli,
    token_digest,
)
from voxtral.layout import make_layout

YOUTUBE = REPO_ROOT / "configs" / "youtube-mistral7b.yaml"


def write_yaml(tmp_path, text: str):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_defaults_without_file():
    cfg = load_config(None, env={})
    assert cfg == Config()
    assert cfg.model.base == "mistralai/Mistral-7B-v0.3"
    assert cfg.codec.name == "encodec" and cfg.codec.bandwidth == 1.5
    assert cfg.serve.port == 8000 and cfg.serve.token is None


def test_precedence_defaults_yaml_env_set(tmp_path):
    path = write_yaml(
        tmp_path,
        "train:\n  seed: 7\n  lr: 0.01\n  max_steps: 50\nserve:\n  port: 9000\n",
    )
    env = {"VOXTRAL_TRAIN__LR": "0.02", "VOXTRAL_SERVE__PORT": "9001"}
    cfg = load_config(path, ["serve.port=9002"], env=env)
    assert cfg.train.warmup_steps == 100  # default: set nowhere
    assert cfg.train.seed == 7  # YAML over default
    assert cfg.train.max_steps == 50
    assert cfg.train.lr == 0.02  # env over YAML
    assert cfg.serve.port == 9002  # --set over env over YAML
    # each layer alone also wins over the ones below it
    assert load_config(path, env={}).serve.port == 9000
    assert load_config(path, env=env).serve.port == 9001
    assert load_config(None, ["train.seed=3"], env={"VOXTRAL_TRAIN__SEED": "2"}).train.seed == 3


def test_later_set_wins_and_env_keys_are_case_insensitive():
    cfg = load_config(None, ["serve.port=1000", "serve.port=1001"], env={})
    assert cfg.serve.port == 1001
    cfg = load_config(None, env={"VOXTRAL_CODEC__NAME": "mimi", "voxtral_x": "ignored"})
    assert cfg.codec.name == "mimi"


def test_process_environment_is_read(monkeypatch):
    monkeypatch.setenv("VOXTRAL_SERVE__HOST", "0.0.0.0")
    monkeypatch.setenv("VOXTRAL_HOME", "/somewhere")  # no "__": not a config key
    assert load_config(None).serve.host == "0.0.0.0"


def test_values_are_parsed_like_yaml():
    cfg = load_config(
        None,
        [
            "model.gradient_checkpointing=true",
            "codec.pretrained=false",
            "serve.allowed_origins=[http://a.example, http://b.example]",
            "train.lr=3e-4",
            "index.max_terms=null",
            "tokenizer.group_ms=80",
        ],
        env={},
    )
    assert cfg.model.gradient_checkpointing is True
    assert cfg.codec.pretrained is False
    assert cfg.serve.allowed_origins == ["http://a.example", "http://b.example"]
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.index.max_terms is None
    assert cfg.tokenizer.group_ms == 80.0
    assert load_config(None, ["codec.pretrained=/ckpt/encodec.pt"], env={}).codec.pretrained == (
        "/ckpt/encodec.pt"
    )
    assert load_config(None, ["codec.pretrained=true"], env={}).codec.pretrained is True


def test_text_values_are_kept_verbatim():
    """A numeric-looking token or name stays the string typed (not YAML's int or octal)."""
    cfg = load_config(
        None, ["serve.token=0123", "storage.root=s3://b/run?region=eu-west-1"], env={}
    )
    assert cfg.serve.token == "0123"
    assert cfg.storage.root == "s3://b/run?region=eu-west-1"
    assert load_config(None, env={"VOXTRAL_SERVE__TOKEN": "12345"}).serve.token == "12345"
    assert load_config(None, env={"VOXTRAL_SERVE__TOKEN": "yes"}).serve.token == "yes"
    assert load_config(None, ["serve.token=abc", "serve.token=null"], env={}).serve.token is None


@pytest.mark.parametrize(
    ("overrides", "env", "names"),
    [
        (["nosuch.key=1"], {}, ["--set", "nosuch"]),
        (["serve.nosuch=1"], {}, ["--set", "serve.nosuch"]),
        ([], {"VOXTRAL_SERVE__BOGUS": "1"}, ["VOXTRAL_SERVE__BOGUS", "serve.bogus"]),
        ([], {"VOXTRAL_NOPE__PORT": "1"}, ["VOXTRAL_NOPE__PORT", "nope"]),
        (["port=1"], {}, ["section.key", "port"]),
        (["serve.port"], {}, ["section.key=value", "serve.port"]),
    ],
)
def test_unknown_or_malformed_keys_are_named(overrides, env, names):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, env=env)
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("serve.port=70000", "serve.port"),
        ("serve.port=abc", "serve.port"),
        ("codec.name=wav2vec", "codec.name"),
        ("index.source=tiktok", "index.source"),
        ("train.lr=-1", "train.lr"),
        ("model.keep_every=0", "model.keep_every"),
        ("tokenizer.text_lead_s=-0.5", "tokenizer.text_lead_s"),
        ("tokenizer.streams=3", "tokenizer.streams"),
        ("model.dtype=float8", "model.dtype"),
        ("scrape.min_chunk_s=60", "scrape.min_chunk_s"),  # > max_chunk_s (30)
        ("codec.bandwidth=2.0", "codec.bandwidth"),  # not an EnCodec bandwidth
        ("codec.n_q=4", "codec.n_q"),  # EnCodec 1.5 kbps has 2 codebooks
    ],
)
def test_bad_values_are_named(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override], env={})
    assert key in str(err.value)


def test_codec_codebooks_follow_the_codec():
    cfg = load_config(None, ["codec.bandwidth=6", "codec.n_q=8"], env={})
    assert codec_info(cfg.codec).n_q == 8
    assert load_config(None, ["codec.bandwidth=3"], env={}).codec.n_q is None
    # Mimi ignores the EnCodec bandwidth and takes up to 32 codebooks
    cfg = load_config(None, ["codec.name=mimi", "codec.bandwidth=2", "codec.n_q=16"], env={})
    assert codec_info(cfg.codec).n_q == 16
    with pytest.raises(ConfigError, match="codec.n_q"):
        load_config(None, ["codec.name=mimi", "codec.n_q=40"], env={})


def test_bad_value_from_env_is_named():
    with pytest.raises(ConfigError, match="serve.port"):
        load_config(None, env={"VOXTRAL_SERVE__PORT": "0"})


def test_yaml_file_errors_name_key_and_file(tmp_path):
    path = write_yaml(tmp_path, "train:\n  lr: 0.1\n  bogus: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert "train.bogus" in str(err.value) and str(path) in str(err.value)

    path = write_yaml(tmp_path, "serve:\n  port: -1\n")
    with pytest.raises(ConfigError, match="serve.port"):
        load_config(path, env={})

    path = write_yaml(tmp_path, "serve: 8000\n")
    with pytest.raises(ConfigError, match="'serve' must be a mapping"):
        load_config(path, env={})

    path = write_yaml(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path, env={})

    path = write_yaml(tmp_path, "storage:\n  root: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_config(path, env={})
    assert str(path) in str(err.value)


def test_empty_file_and_empty_section_are_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, ""), env={}) == Config()
    cfg = load_config(write_yaml(tmp_path, "train:\n  # lr: 0.1\nserve:\n  port: 1234\n"), env={})
    assert cfg.train == Config().train and cfg.serve.port == 1234


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as err:
        load_config(missing, env={})
    assert str(missing) in str(err.value)


def test_assignment_is_validated():
    cfg = Config()
    with pytest.raises(ValidationError):
        cfg.serve.port = 0
    with pytest.raises(ValidationError):
        cfg.serve.nosuch = 1


def test_local_profile_loads():
    cfg = load_config(DEFAULT_CONFIG, env={})
    assert cfg.index.source == "local" and cfg.index.local_dir == "data/sample"
    assert cfg.model.base == "tiny"
    # full duplex on a tiny random Mimi: one frame of 2 codebooks per stream and group
    assert (cfg.codec.name, cfg.codec.n_q, cfg.codec.size) == ("mimi", 2, "tiny")
    assert cfg.codec.pretrained is False
    assert not cfg.train.use_gpu and cfg.serve.num_gpus == 0
    layout = make_layout(codec_info(cfg.codec), 512, cfg.tokenizer)
    assert (layout.streams, layout.frames_per_group, layout.group_len) == (2, 1, 5)
    assert (cfg.train.seq_len - 1) % layout.group_len == 0  # <bos> + whole groups


def test_youtube_profile_loads():
    cfg = load_config(YOUTUBE, env={})
    assert cfg.index.source == "youtube"
    assert cfg.model.base == "mistralai/Mistral-7B-v0.3"
    assert cfg.codec.name == "mimi" and cfg.codec.pretrained is True  # tests/test_profiles.py
    assert cfg.storage.root.startswith("s3://")
    assert cfg.train.use_gpu and cfg.model.dtype == "bfloat16"
    layout = make_layout(codec_info(cfg.codec), 32768, cfg.tokenizer)
    assert (cfg.train.seq_len - 1) % layout.group_len == 0


def test_two_stream_layout_from_config():
    cfg = load_config(
        DEFAULT_CONFIG, [*ENCODEC, "tokenizer.streams=2", "tokenizer.model_first=false"], env={}
    )
    layout = make_layout(codec_info(cfg.codec), 512, cfg.tokenizer)
    assert (layout.streams, layout.model_first) == (2, False)
    assert layout.group_len == 1 + 2 * 3 * 2  # text + 3 frames of 2 codebooks per stream
    default = load_config(DEFAULT_CONFIG, env={}).tokenizer
    assert (default.streams, default.model_first) == (2, True)


def test_profile_with_override_still_validates():
    """Switching the local profile to 40 ms groups keeps its Mimi: half a Mimi frame."""
    from voxtral.layout import LayoutError

    cfg = load_config(DEFAULT_CONFIG, ["tokenizer.group_ms=40"], env={})
    with pytest.raises(LayoutError, match="group_ms"):
        make_layout(codec_info(cfg.codec), 512, cfg.tokenizer)


def test_parse_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VOXTRAL_SERVE__PORT", raising=False)
    path = write_yaml(tmp_path, "serve:\n  port: 9000\n")
    cfg, args = parse_cli(["--config", str(path), "--set", "serve.host=0.0.0.0"])
    assert (cfg.serve.port, cfg.serve.host) == (9000, "0.0.0.0")
    assert args.config == str(path)
    cfg, _ = parse_cli([])  # default: the local profile
    assert cfg.model.base == "tiny"
    with pytest.raises(SystemExit) as exc:
        parse_cli(["--set", "serve.port=99999"])
    assert exc.value.code == 2
    assert "serve.port" in capsys.readouterr().err


# -- serve: closed by default ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "env", "yaml_text"),
    [
        (["serve.token="], {}, None),
        ([], {"VOXTRAL_SERVE__TOKEN": ""}, None),
        ([], {}, 'serve:\n  token: ""\n'),
        (["serve.token=   "], {}, None),
        (["serve.token= padded "], {}, None),
    ],
)
def test_empty_or_padded_token_is_a_config_error(tmp_path, overrides, env, yaml_text):
    path = write_yaml(tmp_path, yaml_text) if yaml_text else None
    with pytest.raises(ConfigError, match=r"serve\.token"):
        load_config(path, overrides, env=env)


@pytest.mark.parametrize(
    ("host", "extra", "ok"),
    [
        ("127.0.0.1", [], True),
        ("127.0.0.5", [], True),
        ("localhost", [], True),
        ("::1", [], True),
        ("0.0.0.0", [], False),
        ("::", [], False),
        ("192.168.1.20", [], False),
        ("0.0.0.0", ["serve.token=a-long-random-secret"], True),
        ("0.0.0.0", ["serve.allow_anonymous=true"], True),
    ],
)
def test_public_host_needs_a_token_or_explicit_anonymous(host, extra, ok):
    cfg = load_config(None, [f"serve.host={host}", *extra], env={})  # loading never fails
    if ok:
        cfg.serve.check_exposure()
    else:
        with pytest.raises(ConfigError, match=r"serve\.token.*serve\.allow_anonymous"):
            cfg.serve.check_exposure()


def test_youtube_profile_is_closed_by_default():
    """The real profile listens publicly: its token comes from the environment, and it
    lists its browser origins instead of allowing all."""
    bare = load_config(YOUTUBE, env={})
    assert bare.serve.host == "0.0.0.0" and bare.serve.token is None
    assert not bare.serve.allow_anonymous
    with pytest.raises(ConfigError, match="VOXTRAL_SERVE__TOKEN"):
        bare.serve.check_exposure()  # starting it without the token fails
    assert bare.serve.allowed_origins and "*" not in bare.serve.allowed_origins
    assert all(o.startswith("https://") for o in bare.serve.allowed_origins)
    cfg = load_config(YOUTUBE, env={"VOXTRAL_SERVE__TOKEN": "0123abc"})
    assert cfg.serve.token == "0123abc"
    cfg.serve.check_exposure()


def test_local_profile_is_loopback_without_token():
    cfg = load_config(DEFAULT_CONFIG, env={})
    assert cfg.serve.host == "127.0.0.1" and cfg.serve.token is None
    cfg.serve.check_exposure()
    assert cfg.serve.allowed_origins == []  # only the page's own origin
    assert cfg.serve.max_sessions_per_client >= 1 and cfg.serve.max_messages_per_s > 0


def test_the_config_ray_sees_holds_the_token_only_as_a_salted_digest():
    token = "s3cret-" + "x" * 40
    cfg = load_config(None, [f"serve.token={token}"], env={})
    shipped = cfg.for_cluster()
    assert token not in json.dumps(shipped)
    assert shipped["serve"]["token"] is None
    again = Config.model_validate(shipped).serve  # what a deployment or worker rebuilds
    assert again.requires_token and again.token_matches(token)
    assert not again.token_matches(token + "!") and not again.token_matches(None)
    assert not again.token_matches("")
    again.check_exposure("0.0.0.0")  # a digest counts as a token: public host allowed
    # a fresh salt each time: equal tokens never show as equal digests
    assert cfg.for_cluster()["serve"]["token_sha256"] != shipped["serve"]["token_sha256"]
    assert load_config(None, env={}).for_cluster()["serve"]["token_sha256"] is None


def test_a_digest_can_be_configured_instead_of_the_token():
    digest = token_digest("tok-" + "y" * 30)
    s = load_config(None, [f"serve.token_sha256={digest}"], env={}).serve
    assert s.token is None and s.token_matches("tok-" + "y" * 30)
    for bad in ("nosalt", ":" + "0" * 64, "salt:" + "z" * 64, "salt:abc"):
        with pytest.raises(ConfigError, match="serve.token_sha256"):
            load_config(None, [f"serve.token_sha256={bad}"], env={})
