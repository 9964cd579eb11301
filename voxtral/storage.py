"""Paths under ``storage.root``: a local folder or an ``s3://`` / ``gs://`` URI.

Every stage reads and writes through this class so one code path serves a laptop and a
multi-node cluster. Writes are atomic: on a local disk a file is written beside its target
and renamed into place; on object stores a single PUT is already all-or-nothing. A task
killed halfway therefore never leaves a half file that a later run would take for done.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

TMP_PREFIX = ".tmp-"


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
