"""Storage: paths under storage.root, atomic writes, Parquet round trips, failure records."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from voxtral import failures, schema
from voxtral.storage import TMP_PREFIX, Storage


@pytest.fixture
def store(tmp_path) -> Storage:
    return Storage(tmp_path / "root")


def tokens_table(n: int, start: int = 0) -> pa.Table:
    rows = []
    for i in range(start, start + n):
        codes = (np.arange(2 * (i + 3), dtype=np.int16) * 37 % 1024).reshape(2, i + 3)
        rows.append(
            {
                "chunk_id": f"vid{i}-0000",
                "video_id": f"vid{i}",
                "codec": "encodec",
                "n_q": 2,
                "frames": i + 3,
                "codes": codes.tobytes(),
                "text_ids": list(range(i)),
                "text_starts_s": [0.25 * k for k in range(i)],
            }
        )
    return pa.Table.from_pylist(rows, schema=schema.TOKENS)


def test_local_paths(tmp_path, store):
    root = str((tmp_path / "root").resolve())
    assert store.local and store.root_uri == root
    assert store.path() == root
    assert store.path("tokens", "a.parquet") == f"{root}/tokens/a.parquet"
    assert store.path("/tokens/", "", "a") == f"{root}/tokens/a"
    assert store.uri("tokens") == f"{root}/tokens"
    assert isinstance(store.fs, pafs.LocalFileSystem)
    assert "root" in repr(store)


def test_relative_and_home_roots(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Storage("runs/x").path() == str(tmp_path.resolve() / "runs" / "x")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Storage("~/r").path() == str(tmp_path.resolve() / "home" / "r")


def test_file_uri_is_local_and_atomic(tmp_path, monkeypatch):
    store = Storage(f"file://{tmp_path}/root")
    assert store.local  # write-then-rename, not a bare output stream
    assert store.path("a") == f"{tmp_path}/root/a"
    store.write_bytes("x/a.bin", b"abc")
    assert (tmp_path / "root" / "x" / "a.bin").read_bytes() == b"abc"
    monkeypatch.setattr(os, "fsync", _fail)
    with pytest.raises(OSError, match="disk full"):
        store.write_bytes("x/b.bin", b"abc")
    assert os.listdir(tmp_path / "root" / "x") == ["a.bin"]


def test_object_store_uri_parsing():
    """An s3 root with options (explicit region: no network needed to build the filesystem)."""
    store = Storage("s3://voxtral-runs/mistral7b?region=us-east-1")
    assert not store.local
    assert type(store.fs).__name__ == "S3FileSystem"
    assert store.path("tokens", "a.parquet") == "voxtral-runs/mistral7b/tokens/a.parquet"
    assert store.uri("tokens") == "s3://voxtral-runs/mistral7b/tokens?region=us-east-1"
    assert store.uri() == "s3://voxtral-runs/mistral7b?region=us-east-1"


def test_bytes_json_exists_listdir_delete(store):
    assert not store.exists("a")
    assert store.listdir("nothing") == []
    store.write_bytes("a/b/c.bin", b"\x00\x01")  # parents are created
    assert store.read_bytes("a/b/c.bin") == b"\x00\x01"
    store.write_bytes("a/b/c.bin", b"new")  # overwrite
    assert store.read_bytes("a/b/c.bin") == b"new"
    store.write_json("a/b/meta.json", {"codec": "encodec", "n_q": 2})
    assert store.read_json("a/b/meta.json") == {"codec": "encodec", "n_q": 2}
    assert store.listdir("a/b") == ["c.bin", "meta.json"]
    assert store.listdir("a/b", suffix=".json") == ["meta.json"]
    assert store.exists("a", "b") and store.exists("a/b/c.bin")
    store.delete("a/b/c.bin")
    assert not store.exists("a/b/c.bin")
    store.delete("a")
    assert not store.exists("a")
    store.delete("a")  # deleting what is gone is fine
    assert store.makedirs("m", "n") == store.path("m/n") and store.exists("m/n")


def _fail(*_args, **_kwargs):
    raise OSError("disk full")


def test_failed_write_leaves_nothing(store, monkeypatch):
    """An error mid-write (after the bytes went out, before the rename) leaves neither the
    target nor a temporary behind."""
    monkeypatch.setattr(os, "fsync", _fail)
    with pytest.raises(OSError, match="disk full"):
        store.write_bytes("chunks/v1.parquet", b"x" * 100_000)
    assert not store.exists("chunks/v1.parquet")
    assert os.listdir(store.path("chunks")) == []


def test_failed_overwrite_keeps_old_file(store, monkeypatch):
    store.write_table("tokens/a.parquet", tokens_table(2))
    monkeypatch.setattr(os, "replace", _fail)
    with pytest.raises(OSError, match="disk full"):
        store.write_table("tokens/a.parquet", tokens_table(5))
    assert os.listdir(store.path("tokens")) == ["a.parquet"]
    assert store.read_table("tokens").num_rows == 2


def test_temporaries_of_killed_writers_are_hidden(store):
    """A task killed mid-write leaves only a .tmp- file: nobody takes it for a finished one."""
    store.write_table("tokens/a.parquet", tokens_table(2))
    half = store.path("tokens", f"{TMP_PREFIX}0123-b.parquet")
    with open(half, "wb") as f:
        f.write(b"PAR1 half a file")
    assert store.listdir("tokens") == ["a.parquet"]
    assert store.parquet_files("tokens") == [store.path("tokens/a.parquet")]
    assert store.read_table("tokens").num_rows == 2  # the half file is not even opened


def test_parquet_round_trip(store):
    table = tokens_table(4)
    path = store.write_table("tokens/batch-0.parquet", table)
    assert path == store.path("tokens/batch-0.parquet")
    back = store.read_table("tokens/batch-0.parquet")
    assert back.schema.equals(schema.TOKENS)
    assert back.equals(table)
    row = back.slice(3, 1).to_pylist()[0]
    codes = np.frombuffer(row["codes"], dtype=np.int16).reshape(row["n_q"], row["frames"])
    assert codes.shape == (2, 6) and codes[1, 0] == (6 * 37) % 1024
    assert back.column("text_starts_s")[3].as_py() == [0.0, 0.25, 0.5]


def test_folder_of_parquet_files(store):
    assert store.read_table("tokens") is None
    assert store.parquet_files("tokens") == []
    store.write_table("tokens/b.parquet", tokens_table(2, start=2))
    store.write_table("tokens/a.parquet", tokens_table(2, start=0))
    store.write_table("tokens/sub/c.parquet", tokens_table(1, start=9))  # recursive
    store.write_json("tokens/_codec.json", {"codec": "encodec"})  # not Parquet: skipped
    names = [p.rsplit("/", 1)[1] for p in store.parquet_files("tokens")]
    assert names == ["a.parquet", "b.parquet", "c.parquet"]
    table = store.read_table("tokens", columns=["video_id", "frames"])
    assert table.column_names == ["video_id", "frames"]
    assert table.column("video_id").to_pylist() == ["vid0", "vid1", "vid2", "vid3", "vid9"]


def test_failure_records(store):
    assert failures.read_failures(store, "scrape") == []
    row = failures.record_failure(store, "scrape", "abc/../x", "abc", "http_404", "gone")
    assert row["attempts"] == 1
    row = failures.record_failure(store, "scrape", "abc/../x", "abc", "http_404", "e" * 5000)
    assert row["attempts"] == 2 and len(row["error"]) == 2000
    failures.record_failure(store, "scrape", "def", "def", "no_speech", "silence")
    assert failures.attempts(store, "scrape") == {"abc/../x": 2, "def": 1}
    assert store.listdir("failures/scrape") == ["abc_.._x.parquet", "def.parquet"]
    table = store.read_table("failures/scrape")
    assert table.schema.equals(schema.FAILURES)
    failures.clear_failure(store, "scrape", "abc/../x")
    assert failures.attempts(store, "scrape") == {"def": 1}
    assert failures.read_failures(store, "preprocess") == []


def test_safe_name():
    assert schema.safe_name("dQw4w9WgXcQ") == "dQw4w9WgXcQ"
    assert schema.safe_name("../../etc/passwd") == "_.._etc_passwd"
    assert not schema.safe_name(".tmp-x").startswith(".")  # never hidden, never a temporary
    assert len(schema.safe_name("a" * 500)) == 200
    with pytest.raises(ValueError, match="empty file name"):
        schema.safe_name("...")
