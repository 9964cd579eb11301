"""Storage: paths under storage.root, atomic writes, Parquet round trips, failure records,
and publishing a finished folder."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from voxtral import failures, schema
from voxtral.storage import TMP_PREFIX, Storage, publish_folder


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
    rows = failures.read_failures(store, "scrape")
    assert {r["item_id"]: r["attempts"] for r in rows} == {"abc/../x": 2, "def": 1}
    assert failures.given_up(rows, max_attempts=2) == {"abc/../x"}
    assert failures.given_up(rows, 3, permanent=frozenset({"no_speech"})) == {"def"}
    assert failures.given_up(rows, 3) == set()
    assert store.listdir("failures/scrape") == ["abc_.._x.parquet", "def.parquet"]
    table = store.read_table("failures/scrape")
    assert table.schema.equals(schema.FAILURES)
    failures.clear_failure(store, "scrape", "abc/../x")
    assert [r["item_id"] for r in failures.read_failures(store, "scrape")] == ["def"]
    assert failures.read_failures(store, "preprocess") == []


def test_safe_name():
    assert schema.safe_name("dQw4w9WgXcQ") == "dQw4w9WgXcQ"
    assert schema.safe_name("../../etc/passwd") == "_.._etc_passwd"
    assert not schema.safe_name(".tmp-x").startswith(".")  # never hidden, never a temporary
    assert len(schema.safe_name("a" * 500)) == 200
    with pytest.raises(ValueError, match="empty file name"):
        schema.safe_name("...")


# -- publishing a folder -------------------------------------------------------------------
def _folder(path, files: dict[str, str]):
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def _contents(path) -> dict[str, str] | None:
    if not path.exists():
        return None
    return {p.relative_to(path).as_posix(): p.read_text() for p in path.rglob("*") if p.is_file()}


OLD = {"voxtral.json": "old", "model.safetensors": "old weights"}
NEW = {"voxtral.json": "new", "model.safetensors": "new weights", "sub/sample.wav": "new"}


@pytest.fixture
def spied(monkeypatch, store):
    """Every rename and copy publishing does, recording what a reader of
    ``models/m`` finds before and after each step."""
    target = store.path("models/m")
    seen: list[dict | None] = []
    rename, copytree, copy2 = os.rename, shutil.copytree, shutil.copy2

    def look():
        seen.append(_contents(Path(target)))

    def spy_rename(a, b):
        look()
        rename(a, b)
        look()

    def spy_copy(a, b, **kw):
        copy2(a, b, **kw)
        look()

    monkeypatch.setattr(os, "rename", spy_rename)
    monkeypatch.setattr(shutil, "copytree", _with_copy_function(copytree, spy_copy))
    return seen


def _with_copy_function(copytree, copy_function):
    """``shutil.copytree`` copying each file with ``copy_function`` (its recursive calls
    pass their arguments on positionally)."""

    def patched(src, dst, *args, **kw):
        if args:
            return copytree(src, dst, *args, **kw)
        return copytree(src, dst, copy_function=copy_function, **kw)

    return patched


def _cannot_rename(monkeypatch, folder):
    """``os.rename`` of ``folder`` fails as across disks, so publishing copies it."""
    rename = os.rename

    def patched(a, b):
        if Path(a) == folder:
            raise OSError(errno.EXDEV, "cross-device link")
        rename(a, b)

    monkeypatch.setattr(os, "rename", patched)


@pytest.mark.parametrize("cross_device", [False, True])
def test_put_folder_replaces_and_readers_never_see_half(
    store, tmp_path, spied, monkeypatch, cross_device
):
    store.put_folder("models/m", _folder(tmp_path / "a", OLD))
    target = Path(store.path("models/m"))
    assert _contents(target) == OLD
    staging = _folder(tmp_path / "b", NEW)
    if cross_device:  # the staging folder is on another disk: copied beside the target first
        _cannot_rename(monkeypatch, staging)
    spied.clear()
    assert store.put_folder("models/m", staging) is True
    assert _contents(target) == NEW
    assert spied and all(s in (None, OLD, NEW) for s in spied), spied
    assert os.listdir(target.parent) == ["m"]  # no staging copy or old folder left behind


def test_put_folder_failure_midway_keeps_the_old_folder(store, tmp_path, monkeypatch):
    store.put_folder("models/m", _folder(tmp_path / "a", OLD))
    target = Path(store.path("models/m"))
    rename = os.rename

    def fail_into_place(a, b):
        if Path(b) == target and TMP_PREFIX + "old-" not in str(a):
            raise OSError("disk full")
        rename(a, b)

    monkeypatch.setattr(os, "rename", fail_into_place)
    with pytest.raises(OSError, match="disk full"):
        store.put_folder("models/m", _folder(tmp_path / "b", NEW))
    assert _contents(target) == OLD
    assert os.listdir(target.parent) == ["m"]
    # a copy that fails halfway (another disk, disk full) leaves the old folder too
    monkeypatch.setattr(os, "rename", rename)
    copied: list[str] = []

    def copy_then_fail(a, b, **kw):
        if copied:
            raise OSError("disk full")
        copied.append(shutil.copy2(a, b, **kw))

    staging = _folder(tmp_path / "c", NEW)
    _cannot_rename(monkeypatch, staging)
    monkeypatch.setattr(shutil, "copytree", _with_copy_function(shutil.copytree, copy_then_fail))
    with pytest.raises(OSError, match="disk full"):
        store.put_folder("models/m", staging)
    assert _contents(target) == OLD
    assert os.listdir(target.parent) == ["m"]


def test_publish_without_replace_keeps_the_first(tmp_path):
    target = tmp_path / "cache" / "m"
    target.parent.mkdir()
    assert publish_folder(_folder(tmp_path / "a", OLD), target, replace=False) is True
    staging = _folder(tmp_path / "b", NEW)
    assert publish_folder(staging, target, replace=False) is False  # another process won
    assert _contents(target) == OLD and not staging.exists()
    with pytest.raises(FileNotFoundError):  # other errors are not taken for a lost race
        publish_folder(tmp_path / "missing", tmp_path / "cache" / "n", replace=False)


def test_put_folder_on_an_object_store_publishes_versions(tmp_path, monkeypatch):
    """No folder rename there: each publish uploads a new version folder (the marker readers
    wait for last), then switches ``_current.json``; a reader following :meth:`current`
    never sees a half folder, the previous version stays for readers still copying it, older
    ones go, and ``replace=False`` keeps a finished folder."""
    store = Storage(tmp_path / "bucket")
    monkeypatch.setattr(store, "local", False)  # the object-store path, on a local disk
    order = []
    put_file, write_bytes = store.put_file, store.write_bytes
    monkeypatch.setattr(store, "put_file", lambda rel, p: order.append(rel) or put_file(rel, p))
    monkeypatch.setattr(
        store, "write_bytes", lambda rel, b: order.append(rel) or write_bytes(rel, b)
    )
    files = {"_done": "1", "a/b.bin": "b", "z.bin": "z"}
    write_bytes("models/m/stale.bin", b"x")  # a folder from before versioning
    assert store.current("models/m") == "models/m"
    assert store.put_folder("models/m", _folder(tmp_path / "a", files), last="_done")
    v1 = store.current("models/m")
    assert v1.startswith("models/m/v-")
    assert order == [f"{v1}/a/b.bin", f"{v1}/z.bin", f"{v1}/_done", "models/m/_current.json"]
    assert _contents(Path(store.path(v1))) == files
    assert store.listdir("models/m") == sorted(["_current.json", v1.rsplit("/", 1)[1]])
    assert not store.put_folder("models/m", _folder(tmp_path / "b", OLD), False, "_done")
    assert store.current("models/m") == v1

    # a publisher that dies halfway: readers still get the whole v1
    def fail_second(rel, p, seen=[]):  # noqa: B006 - counts calls across this test
        seen.append(rel)
        if len(seen) == 2:
            raise OSError("connection reset")
        put_file(rel, p)

    monkeypatch.setattr(store, "put_file", fail_second)
    with pytest.raises(OSError, match="connection reset"):
        store.put_folder("models/m", _folder(tmp_path / "c", NEW))
    assert store.current("models/m") == v1 and _contents(Path(store.path(v1))) == files
    monkeypatch.setattr(store, "put_file", put_file)
    assert store.put_folder("models/m", _folder(tmp_path / "d", NEW))
    v2 = store.current("models/m")
    assert v2 != v1 and _contents(Path(store.path(v2))) == NEW
    # v1 stays (a reader may still copy it); the half upload is gone
    assert store.listdir("models/m") == sorted(
        ["_current.json", *(v.split("/")[-1] for v in (v1, v2))]
    )
    assert store.put_folder("models/m", _folder(tmp_path / "e", OLD))
    assert not store.exists(v1) and store.exists(v2)  # two back: removed
    assert _contents(Path(store.path(store.current("models/m")))) == OLD
