"""Paths under ``storage.root``: a local folder or an ``s3://`` / ``gs://`` URI.

Every stage reads and writes through this class so one code path serves a laptop and a
multi-node cluster. Writes are atomic: on a local disk a file is written beside its target
and renamed into place; on object stores a single PUT is already all-or-nothing. A task
killed halfway therefore never leaves a half file that a later run would take for done.
Folders (model exports) are published the same way by :func:`publish_folder` and
:meth:`Storage.put_folder`: finished beside the target, then renamed into place.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

TMP_PREFIX = ".tmp-"
CURRENT = "_current.json"
"""Beside the versions of a folder published on an object store: the one readers take."""


def publish_folder(staging: str | os.PathLike, target: str | os.PathLike, replace: bool) -> bool:
    """Move the finished folder ``staging`` to ``target`` by renames only, so a reader finds
    the old folder or the whole new one, never a half one. ``staging`` must be on the
    target's filesystem (e.g. a ``.tmp-`` folder beside it); it is gone afterwards.

    ``replace=False``: a folder already at ``target`` (another process published first) is
    kept, ``staging`` removed, and False returned. ``replace=True``: the old folder is renamed
    aside, the new one renamed in, then the old one removed; between the two renames a reader
    finds no folder, and if the second rename fails the old folder is put back.
    """
    staging, target = Path(staging), Path(target)
    if not replace:
        try:
            os.rename(staging, target)  # atomic; fails if another process published first
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            shutil.rmtree(staging, ignore_errors=True)
            return False
        return True
    old = None
    if target.exists():
        old = target.with_name(f"{TMP_PREFIX}old-{uuid.uuid4().hex[:8]}-{target.name}")
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return True


def publish_pretrained(target: str | os.PathLike, *parts) -> Path:
    """Save ``parts`` (a model, its tokenizer or processor: anything with
    ``save_pretrained``) into a ``.tmp-`` folder beside ``target`` and publish it there
    (:func:`publish_folder`): a folder another process published first is kept (the tiny
    random models are written the same way by every process). Returns ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)  # the rename must stay on one filesystem
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        for part in parts:
            part.save_pretrained(tmp)
        publish_folder(tmp, target, replace=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (target / "config.json").is_file():
        raise FileNotFoundError(f"{target} holds no config.json: not a model folder")
    return target


class Storage:
    """A root folder on any pyarrow filesystem, addressed by relative paths."""

    def __init__(self, root: str | os.PathLike):
        root = str(root)
        if "://" in root:
            self.fs, path = pafs.FileSystem.from_uri(root)
        else:
            path = str(Path(root).expanduser().resolve())
            self.fs = pafs.LocalFileSystem()
        # file:// URIs are local disks too: they need write-then-rename to stay atomic
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.root_uri = root if not self.local else path
        self.base = path.rstrip("/")

    def __repr__(self) -> str:
        return f"Storage({self.root_uri!r})"

    def path(self, *parts: str) -> str:
        """Filesystem path (no scheme) of a relative path, for pyarrow and Ray Data."""
        return "/".join([self.base, *[p.strip("/") for p in parts if p]])

    def uri(self, *parts: str) -> str:
        """Full URI (local: plain path) of a relative path."""
        if self.local:
            return self.path(*parts)
        root, sep, query = self.root_uri.partition("?")  # options (?region=…) stay at the end
        rel = "/".join(p.strip("/") for p in parts if p)
        return root.rstrip("/") + ("/" + rel if rel else "") + sep + query

    def makedirs(self, *parts: str) -> str:
        p = self.path(*parts)
        self.fs.create_dir(p, recursive=True)
        return p

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def listdir(self, *parts: str, suffix: str = "") -> list[str]:
        """Names (not paths) of the finished files in a folder; temporaries are hidden."""
        sel = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        names = [Path(i.path).name for i in self.fs.get_file_info(sel)]
        return sorted(n for n in names if not n.startswith(TMP_PREFIX) and n.endswith(suffix))

    def delete(self, *parts: str) -> None:
        p = self.path(*parts)
        info = self.fs.get_file_info(p)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(p)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(p)

    # -- bytes -------------------------------------------------------------------------
    @contextmanager
    def _local_atomic(self, target: str) -> Iterator[str]:
        """Yield a temporary path beside ``target``; on success fsync it and rename it into
        place, on failure remove it. A reader sees the old file or the whole new one."""
        parent, name = target.rsplit("/", 1)
        tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}-{name}"
        try:
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _target(self, rel: str) -> str:
        target = self.path(rel)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        return target

    def write_bytes(self, rel: str, data: bytes) -> str:
        """Atomically write ``data`` to ``rel`` (write then rename on local disks)."""
        target = self._target(rel)
        if not self.local:
            with self.fs.open_output_stream(target) as f:
                f.write(data)
            return target
        with self._local_atomic(target) as tmp, open(tmp, "wb") as f:
            f.write(data)
        return target

    def put_file(self, rel: str, local_path: str | os.PathLike) -> str:
        """Atomically place a local file at ``rel``, streaming it (it may be large).

        Local disks: copy beside the target, then rename. Object stores: one upload, which
        only becomes visible when complete.
        """
        target = self._target(rel)
        if not self.local:
            pafs.copy_files(
                str(local_path),
                target,
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=self.fs,
            )
            return target
        with self._local_atomic(target) as tmp:
            shutil.copyfile(local_path, tmp)
        return target

    def put_folder(
        self, rel: str, local_dir: str | os.PathLike, replace: bool = True, last: str = ""
    ) -> bool:
        """Publish a finished local folder at ``rel``; see :func:`publish_folder` for
        ``replace`` and the return value. The caller removes ``local_dir`` afterwards.
        Readers find what was published at :meth:`current` ``(rel)``.

        Local disks: the folder is moved (copied when on another filesystem) beside the
        target, then renamed into place. Object stores have no folder rename: the files go
        to a new version folder ``rel/v-<time>-<id>/`` (``last``, a marker such as
        ``voxtral.json``, after all the others), and then ``rel/_current.json``, one PUT,
        switches readers to it. A reader sees the old version or the whole new one, never a
        half one; the previous version stays for readers still copying it, older ones go.
        """
        target = self.path(rel)
        parent, name = target.rsplit("/", 1)
        self.fs.create_dir(parent, recursive=True)
        if self.local:
            tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}-{name}"
            try:
                try:
                    os.rename(local_dir, tmp)  # same filesystem: nothing is copied
                except OSError as exc:
                    if exc.errno != errno.EXDEV:
                        raise
                    shutil.copytree(local_dir, tmp)
                return publish_folder(tmp, target, replace)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        previous = self.current(rel)
        if not replace and self.exists(previous, last):
            return False
        version = f"v-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
        files.sort(key=lambda p: p.relative_to(local_dir).as_posix() == last)
        for f in files:
            self.put_file(f"{rel}/{version}/{f.relative_to(local_dir).as_posix()}", f)
        self.write_json(f"{rel}/{CURRENT}", {"version": version})
        keep = {version, CURRENT, previous.rsplit("/", 1)[-1]}
        for entry in self.listdir(rel):  # older versions, half uploads, an unversioned folder
            if entry not in keep:
                self.delete(f"{rel}/{entry}")
        return True

    def current(self, rel: str) -> str:
        """Where the content of the folder published at ``rel`` is: the version its
        ``_current.json`` names (published on an object store), else ``rel`` itself."""
        pointer = "/".join(p for p in (rel.strip("/"), CURRENT) if p)
        if not self.exists(pointer):
            return rel
        version = self.read_json(pointer)["version"]
        if not version.startswith("v-") or "/" in version:
            raise ValueError(f"{self.uri(pointer)} names no version folder: {version!r}")
        return "/".join(p for p in (rel.strip("/"), version) if p)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_file(self.path(rel)) as f:
            return f.read()

    def write_json(self, rel: str, obj: Any) -> str:
        return self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True).encode())

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    # -- parquet -----------------------------------------------------------------------
    def write_table(self, rel: str, table: pa.Table) -> str:
        """Atomically write one Parquet file."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        return self.write_bytes(rel, buf.getvalue())

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table | None:
        """Read a Parquet file or a folder of them; None if there is nothing yet."""
        files = self.parquet_files(rel)
        if not files:
            return None
        tables = [pq.read_table(f, filesystem=self.fs, columns=columns) for f in files]
        return pa.concat_tables(tables, promote_options="default")

    def parquet_schema(self, path: str) -> pa.Schema:
        """The schema of one Parquet file (a path from :meth:`parquet_files`): its footer only."""
        return pq.read_schema(path, filesystem=self.fs)

    def parquet_files(self, rel: str) -> list[str]:
        """Finished Parquet files under ``rel`` (recursively), as filesystem paths."""
        p = self.path(rel)
        info = self.fs.get_file_info(p)
        if info.type == pafs.FileType.File:
            return [p]
        if info.type != pafs.FileType.Directory:
            return []
        sel = pafs.FileSelector(p, recursive=True)
        return sorted(
            i.path
            for i in self.fs.get_file_info(sel)
            if i.type == pafs.FileType.File
            and i.path.endswith(".parquet")
            and not Path(i.path).name.startswith(TMP_PREFIX)
        )


class ParquetRowWriter:
    """Streams rows into a local Parquet file, a row group at a time (so a long video's
    chunks never sit in memory together); :meth:`Storage.put_file` then publishes it."""

    def __init__(
        self,
        path: str,
        schema: pa.Schema,
        row_group: int,
        compression: str | dict[str, str] = "snappy",
    ):
        self.path, self.schema, self.row_group, self.compression = (
            path,
            schema,
            row_group,
            compression,
        )
        self.rows: list[dict] = []
        self.count = 0
        self._writer: pq.ParquetWriter | None = None

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.row_group:
            self._flush()

    def _flush(self) -> None:
        if not self.rows:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(
                self.path, self.schema, compression=self.compression, use_dictionary=False
            )
        self._writer.write_table(pa.Table.from_pylist(self.rows, schema=self.schema))
        self.rows = []

    def close(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
