"""Index: filtering yt-dlp's flat search entries, backoff, de-duplication, the local source,
and the Ray Data plan over search terms (with a stand-in for the network search)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest
import ray.cloudpickle
from _scrape_media import copy_sample

from voxtral import failures
from voxtral.config import REPO_ROOT, load_config
from voxtral.download import base_ydl_params
from voxtral.stages.index import (
    dedupe,
    entry_to_row,
    filter_entries,
    index_local,
    read_terms,
    run_index,
    search_youtube,
    term_item_id,
    with_backoff,
)
from voxtral.storage import Storage

# The stand-in search runs inside Ray workers, which cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def entry(vid: str, duration: float | None = 1800, **kw) -> dict:
    """A flat search entry shaped like yt-dlp's YouTube search results (``_extract_video``)."""
    base = {
        "_type": "url",
        "ie_key": "Youtube",
        "id": vid,
        "url": f"https://www.youtube.com/watch?v={vid}",
        "title": f"Episode {vid}",
        "description": "a long conversation",
        "duration": duration,
        "channel_id": "UCabcdefghijklmnopqrstuv",
        "channel": "Some Podcast",
        "channel_url": "https://www.youtube.com/channel/UCabcdefghijklmnopqrstuv",
        "uploader": "Some Podcast",
        "uploader_id": "@somepodcast",
        "uploader_url": "https://www.youtube.com/@somepodcast",
        "thumbnails": [{"url": f"https://i.ytimg.com/vi/{vid}/hq720.jpg", "height": 202}],
        "timestamp": None,
        "release_timestamp": None,
        "availability": None,
        "view_count": 12345,
        "live_status": None,
        "channel_is_verified": None,
    }
    return {**base, **kw}


def cfg_for(tmp_path: Path, *overrides: str):
    return load_config(
        None,
        [
            f"storage.root={tmp_path / 'run'}",
            "index.min_duration_s=600",
            "index.max_duration_s=14400",
            *overrides,
        ],
        env={},
    )


# -- pure filtering -------------------------------------------------------------------------------


def test_entries_are_filtered_like_the_issue_says(tmp_path):
    cfg = cfg_for(tmp_path).index
    entries = [
        entry("goodvideo01", 1800),
        entry("tooshort001", 300),
        entry("toolong0001", 5 * 3600),
        entry("noduration1", None),
        entry("livenow0001", None, live_status="is_live"),
        entry("livelong001", 7200, live_status="is_live"),
        entry("premiere001", 3600, live_status="is_upcoming"),
        entry("streamed001", 3600, live_status="was_live"),  # a finished stream is a video
        entry("ashortclip1", 900, url="https://www.youtube.com/shorts/ashortclip1"),
        entry(
            "PLabcdefghijklmnop",
            None,
            ie_key="YoutubeTab",
            url="https://www.youtube.com/playlist?list=PLabcdefghijklmnop",
        ),
        entry("../../etc/passwd", 1800),
        entry("goodvideo01", 1800, title="the same video again"),
        "not a dict",
        entry("goodvideo02", 600.0, channel=None, uploader="Uploader Name"),
    ]
    rows = filter_entries(entries, "podcast interview", cfg)
    assert [r["video_id"] for r in rows] == ["goodvideo01", "streamed001", "goodvideo02"]
    first = rows[0]
    assert first == {
        "video_id": "goodvideo01",
        "url": "https://www.youtube.com/watch?v=goodvideo01",
        "title": "Episode goodvideo01",
        "channel": "Some Podcast",
        "duration_s": 1800.0,
        "search_term": "podcast interview",
        "source": "youtube",
    }
    assert rows[2]["channel"] == "Uploader Name"
    assert entry_to_row(entry("x" * 11, 601), "t", cfg) is not None
    assert entry_to_row(entry("x" * 11, 599), "t", cfg) is None


def test_dedupe_across_terms_and_earlier_runs():
    seen = {"old00000001"}
    pairs = [
        ("a1b2c3d4e5f", "t0"),
        ("old00000001", "t0"),
        ("a1b2c3d4e5f", "t1"),
        ("zz" * 5 + "z", "t1"),
    ]
    rows = [{"video_id": v, "search_term": t} for v, t in pairs]
    new = dedupe(rows, seen)
    assert [(r["video_id"], r["search_term"]) for r in new] == [
        ("a1b2c3d4e5f", "t0"),
        ("zzzzzzzzzzz", "t1"),
    ]
    assert dedupe(rows, seen) == []  # a second pass adds nothing


def test_backoff_obeys_slow_down_and_gives_up():
    sleeps: list[float] = []
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] <= 2:
            raise RuntimeError("ERROR: [youtube:search] HTTP Error 429: Too Many Requests")
        return ["ok"]

    assert with_backoff(flaky, 5, 2.0, sleep=sleeps.append, jitter=lambda: 0.0) == ["ok"]
    assert sleeps == [2.0, 4.0]

    sleeps.clear()
    with pytest.raises(RuntimeError, match="slow down"):
        with_backoff(
            lambda: (_ for _ in ()).throw(RuntimeError("please slow down")),
            3,
            1.0,
            sleep=sleeps.append,
            jitter=lambda: 1.0,
        )
    assert sleeps == [1.5, 3.0, 6.0]

    sleeps.clear()
    with pytest.raises(ValueError):
        with_backoff(
            lambda: (_ for _ in ()).throw(ValueError("Unsupported URL")), 3, 1.0, sleeps.append
        )
    assert sleeps == []  # not transient: no point waiting


def test_terms_file_reading(tmp_path):
    f = tmp_path / "terms.txt"
    f.write_text("# comment\npodcast  interview\n\nPodcast Interview\ndébat politique\n対談\n")
    assert read_terms(f) == ["podcast interview", "débat politique", "対談"]
    assert read_terms(f, max_terms=2) == ["podcast interview", "débat politique"]
    assert term_item_id("対談") != term_item_id("討論") and term_item_id("a b").startswith("a-b-")


def test_bundled_search_terms_are_many_varied_and_multilingual():
    terms = read_terms(REPO_ROOT / "data" / "searches.txt")
    assert 450 <= len(terms) <= 600
    text = "\n".join(terms).casefold()
    for word in ["podcast", "interview", "panel", "debate", "call-in", "entrevista", "débat",
                 "gespräch", "intervista", "подкаст", "対談", "팟캐스트", "播客"]:  # fmt: skip
        assert word in text, word
    assert sum(not t.isascii() for t in terms) >= 100


def test_search_youtube_is_a_thin_real_wrapper(monkeypatch):
    seen = {}

    class FakeYDL:
        def __init__(self, params):
            seen["params"] = params

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def extract_info(self, query, download):
            seen["query"], seen["download"] = query, download
            return {"_type": "playlist", "entries": [entry("goodvideo01")]}

    import yt_dlp

    monkeypatch.setattr(yt_dlp, "YoutubeDL", FakeYDL)
    out = search_youtube("late night call-in show", 25, timeout_s=7, proxy="socks5://p:1")
    assert out == [entry("goodvideo01")]
    assert seen["query"] == "ytsearch25:late night call-in show" and seen["download"] is False
    assert seen["params"]["extract_flat"] is True
    assert seen["params"]["socket_timeout"] == 7 and seen["params"]["proxy"] == "socks5://p:1"
    assert base_ydl_params(7, "socks5://p:1").items() <= seen["params"].items()  # as scrape


# -- the Ray Data plan ---------------------------------------------------------------------------


class FakeSearch:
    """yt-dlp's search, offline: canned entries per term, a log of every call (start and
    end times), "HTTP Error 429" for the first calls of some terms, and broken terms."""

    def __init__(self, log_dir: Path, results: dict, rate_limited: dict, broken: set, delay: float):
        self.log_dir, self.results = Path(log_dir), results
        self.rate_limited, self.broken, self.delay = rate_limited, broken, delay

    def __call__(self, term: str, n: int, **kwargs) -> list[dict]:
        start = time.time()
        previous = len(list(self.log_dir.glob(f"{term_item_id(term)}-*.json")))
        time.sleep(self.delay)
        record = {"term": term, "start": start, "end": time.time()}
        (self.log_dir / f"{term_item_id(term)}-{uuid.uuid4().hex}.json").write_text(
            json.dumps(record)
        )
        if previous < self.rate_limited.get(term, 0):
            raise RuntimeError("ERROR: [youtube:search] HTTP Error 429: Too Many Requests")
        if term in self.broken:
            raise RuntimeError("ERROR: [youtube:search] This search is not supported")
        return self.results[term][:n]


def calls(log_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in log_dir.glob("*.json")]


def test_run_index_over_terms_with_ray(tmp_path, ray_session):
    terms = ["podcast interview", "débat politique", "call-in radio show", "broken term"]
    (tmp_path / "terms.txt").write_text("\n".join(terms) + "\n")
    logs = tmp_path / "calls"
    logs.mkdir()
    results = {
        terms[0]: [entry("aaaaaaaaaa1"), entry("bbbbbbbbbb2"), entry("shortvideo3", 60)],
        terms[1]: [
            entry("bbbbbbbbbb2"),
            entry("cccccccccc3", 3000, live_status="is_upcoming"),
            entry("dddddddddd4", 4000),
        ],  # fmt: skip
        terms[2]: [entry("eeeeeeeeee5", 7000)],
    }
    search = FakeSearch(logs, results, {terms[2]: 2}, {terms[3]}, delay=0.3)
    cfg = cfg_for(
        tmp_path,
        f"index.searches={tmp_path / 'terms.txt'}",
        "index.concurrency=2",
        "index.backoff_s=0.2",
        "index.max_retries=3",
    )
    first = run_index(cfg, search=search)
    storage = Storage(cfg.storage.root)
    rows = storage.read_table("index").to_pylist()
    assert sorted(r["video_id"] for r in rows) == [
        "aaaaaaaaaa1",
        "bbbbbbbbbb2",
        "dddddddddd4",
        "eeeeeeeeee5",
    ]
    assert {r["video_id"]: r["search_term"] for r in rows}["bbbbbbbbbb2"] == terms[0]
    assert first["new"] == 4 and first["found"] == 5  # "bbbbbbbbbb2" came twice
    assert first["terms"] == 4 and first["failed_terms"] == 1
    (fail,) = failures.read_failures(storage, "index")
    assert fail["reason"] == "search_error" and "broken term" in fail["error"]

    log = calls(logs)
    limited = sorted(c["start"] for c in log if c["term"] == terms[2])
    assert len(limited) == 3  # two "slow down" answers, then success
    gaps = [b - a for a, b in zip(limited, limited[1:], strict=False)]
    assert gaps[0] >= 0.2 + 0.3 - 0.05 and gaps[1] >= 0.4 + 0.3 - 0.05  # waited, doubling
    events = sorted([(c["start"], 1) for c in log] + [(c["end"], -1) for c in log])
    running, peak = 0, 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 2  # index.concurrency

    second = run_index(cfg, search=search)  # a rerun adds only new ids: none
    assert second["new"] == 0 and second["found"] == second["duplicates"] == 5
    assert len(storage.read_table("index")) == 4

    results[terms[1]].append(entry("ffffffffff6", 900))
    third = run_index(cfg, search=search)
    assert third["new"] == 1 and len(storage.read_table("index")) == 5


def test_local_source_indexes_audio_files_as_file_urls(tmp_path):
    corpus = copy_sample(tmp_path / "corpus")
    (corpus / "sub").mkdir()
    shutil.copy(corpus / "interview_en.mp3", corpus / "sub" / "interview en (copy).mp3")
    (corpus / "notes.txt").write_text("not indexed")
    (corpus / ".hidden.mp3").write_text("hidden")
    (corpus / "broken.mp3").write_text("text in an mp3's clothing")
    cfg = cfg_for(tmp_path, "index.source=local", f"index.local_dir={corpus}")
    rows = index_local(cfg.index)
    names = sorted(Path(r["url"]).name for r in rows)
    assert names == sorted(
        [
            "broken.mp3",
            "callin_de.wav",
            "charla_es.webm",
            "debat_fr.m4a",
            "interview_en.mp3",
            "interview%20en%20%28copy%29.mp3",
            "podcast_en.ogg",
        ]  # fmt: skip
    )
    assert len({r["video_id"] for r in rows}) == len(rows)
    for r in rows:
        assert r["url"].startswith("file:///") and r["source"] == "local"
        assert str(corpus.resolve().as_uri()) in r["url"]
        assert (r["duration_s"] > 30) == ("broken" not in r["url"])
    summary = run_index(cfg)
    assert summary["new"] == 7
    assert run_index(cfg)["new"] == 0


def test_jobs_index_entry_point(tmp_path, capsys):
    corpus = copy_sample(tmp_path / "corpus")
    spec = importlib.util.spec_from_file_location("jobs_index", REPO_ROOT / "jobs" / "index.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    summary = job.main(
        [
            "--set",
            f"storage.root={tmp_path / 'run'}",
            "--set",
            "index.source=local",
            "--set",
            f"index.local_dir={corpus}",
        ]  # fmt: skip
    )
    assert summary["new"] == 5
    assert "index summary" in capsys.readouterr().out
