"""Artifact store: stage outputs under a root URI that is a local path or ``s3://bucket/prefix``.

Every stage output is one directory ``{root}/{stage}/{key}/`` holding data files and a
``manifest.json`` that is written last. A directory without a manifest is an unfinished
stage (its partial files may be reused to resume); the manifest is the only proof of
completion. File names are chosen by the stage and must be deterministic, so that a
rerun overwrites instead of duplicating.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

MANIFEST = "manifest.json"


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """Resolve a URI to (pyarrow filesystem, path inside it).

    S3 honours ``AWS_ENDPOINT_URL`` (a moto server in tests, MinIO or a VPC endpoint on a
    cluster) because pyarrow's own URI parser does not read it.
    """
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        kwargs: dict[str, Any] = {}
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs = {"endpoint_override": host, "scheme": scheme}
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), uri[len("s3://"):].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"artifact root {uri!r}: only local paths and s3:// URIs are supported")
    path = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
    return pafs.LocalFileSystem(), path


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


@dataclass
class Artifact:
    """One stage output directory. ``uri`` is what Ray Data and humans use; ``fs``/``path`` what code uses."""

    uri: str
    fs: pafs.FileSystem
    path: str
    manifest: dict[str, Any] = field(default_factory=dict)

    def child(self, name: str) -> str:
        """Filesystem path of a file inside this artifact."""
        return posixpath.join(self.path, name)

    def child_uri(self, name: str) -> str:
        return self.uri.rstrip("/") + "/" + name

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.child(name)).type != pafs.FileType.NotFound

    def _files(self, subdir: str = "") -> list[pafs.FileInfo]:
        """Every file under ``subdir`` (the whole artifact by default), temp files included."""
        base = self.child(subdir) if subdir else self.path
        if self.fs.get_file_info(base).type == pafs.FileType.NotFound:
            return []
        return [i for i in self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
                if i.type == pafs.FileType.File]

    def list(self, suffix: str = "", subdir: str = "") -> list[str]:
        """Names (relative to the artifact) of files ending in ``suffix``, sorted."""
        names = [posixpath.relpath(i.path, self.path) for i in self._files(subdir)]
        return sorted(n for n in names if n.endswith(suffix) and not _is_temp(n))

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.child(name)) as f:
            return f.read()

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomic per file: a local write goes to a temp name then is renamed; an S3 PUT is
        already all-or-nothing. The temp name starts with a dot, which directory readers
        (``pyarrow.dataset``, Ray Data) skip, so a writer killed before its rename leaves nothing
        they read as data."""
        path = self.child(name)
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        if is_local(self.fs):
            head, base = posixpath.split(path)
            tmp = posixpath.join(head, f".{base}.tmp-{uuid.uuid4().hex[:8]}")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_bytes(name, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def write_parquet(self, name: str, table: Any) -> int:
        """Write a pyarrow table as one Parquet file (atomically, as write_bytes); return its size."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        self.write_bytes(name, data)
        return len(data)

    def upload_dir(self, local_dir: str, prefix: str = "") -> None:
        """Copy a local directory (e.g. a safetensors export) into the artifact."""
        for dirpath, _, files in os.walk(local_dir):
            for fn in sorted(files):
                src = os.path.join(dirpath, fn)
                rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
                with open(src, "rb") as f:
                    self.write_bytes(posixpath.join(prefix, rel) if prefix else rel, f.read())

    def download_dir(self, prefix: str, local_dir: str) -> str:
        """Copy ``prefix/`` of the artifact to a local directory (for libraries that want paths)."""
        if is_local(self.fs):
            return self.child(prefix)
        for name in self.list(subdir=prefix):
            dst = os.path.join(local_dir, os.path.relpath(name, prefix))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open(dst, "wb") as f:
                f.write(self.read_bytes(name))
        return local_dir

    def sizes(self) -> tuple[int, int]:
        """(file count, total bytes) of the data files, the manifest excluded."""
        files = [i for i in self._files() if not i.path.endswith(MANIFEST) and not _is_temp(i.path)]
        return len(files), sum(i.size for i in files)

    def remove_temp(self, subdir: str = "") -> int:
        """Delete the temp files of atomic writes that never finished (a killed writer leaves its
        ``<name>.tmp-<id>``, which ``list`` hides but a directory reader such as
        ``pyarrow.dataset`` would read as data); returns how many."""
        stale = [i.path for i in self._files(subdir) if _is_temp(i.path)]
        for path in stale:
            self.fs.delete_file(path)
        return len(stale)

    def clear(self) -> None:
        """Remove everything (used by --force so that stale shards cannot survive a rerun)."""
        if self.fs.get_file_info(self.path).type != pafs.FileType.NotFound:
            self.fs.delete_dir(self.path)


def open_artifact(uri: str) -> Artifact:
    """An existing artifact from its URI (local path or s3://), with its manifest when it has one."""
    fs, path = filesystem(uri)
    art = Artifact(uri=uri.rstrip("/") if uri.startswith("s3://") else path, fs=fs, path=path)
    if art.exists(MANIFEST):
        art.manifest = art.read_json(MANIFEST)
    return art


def local_file(uri: str) -> str:
    """A path on this machine holding the file at ``uri``: the path itself when local; a remote file is
    downloaded once per machine into the temp directory (libraries such as open_clip open paths only)."""
    fs, path = filesystem(uri)
    if is_local(fs):
        return path
    cache = os.path.join(tempfile.gettempdir(), "genmodels-files", hashlib.sha1(uri.encode()).hexdigest()[:16])
    target = os.path.join(cache, posixpath.basename(path))
    if not os.path.exists(target):
        os.makedirs(cache, exist_ok=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, target)
    return target


def task_filenames():
    """A Ray Data ``filename_provider`` naming each write task's file ``part-{task:06d}.parquet``: a
    rerun replaces its files instead of adding new ones beside them."""
    from ray.data.datasource import FilenameProvider

    class TaskNames(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:06d}.parquet"

    return TaskNames()


def _is_temp(name: str) -> bool:
    return ".tmp-" in posixpath.basename(name)


class Store:
    """The artifact root. ``artifact(stage, key)`` is deterministic, so reruns land in place."""

    def __init__(self, root: str):
        self.root = root.rstrip("/") if root.startswith("s3://") else root
        self.fs, self.path = filesystem(root)
        if root.startswith("s3://"):
            self.uri = "s3://" + self.path
        else:
            self.uri = self.path
            self.fs.create_dir(self.path, recursive=True)

    def artifact(self, stage: str, key: str) -> Artifact:
        rel = f"{stage}/{key}"
        art = Artifact(uri=f"{self.uri}/{rel}", fs=self.fs, path=posixpath.join(self.path, rel))
        if art.exists(MANIFEST):
            art.manifest = art.read_json(MANIFEST)
        return art

    def run_dir(self, run_id: str) -> Artifact:
        return Artifact(uri=f"{self.uri}/runs/{run_id}", fs=self.fs,
                        path=posixpath.join(self.path, "runs", run_id))

    def check_writable(self) -> None:
        """Fail fast (before any cluster work) when the root cannot be written."""
        probe = Artifact(uri=self.uri, fs=self.fs, path=self.path)
        name = f".probe-{uuid.uuid4().hex[:8]}"
        try:
            probe.write_bytes(name, b"ok")
            self.fs.delete_file(probe.child(name))
        except Exception as e:  # noqa: BLE001 - re-raised with the root named
            raise ValueError(f"run.root {self.root!r}: cannot write there ({type(e).__name__}: {e})") from e


def write_manifest(art: Artifact, manifest: dict[str, Any]) -> None:
    """The completion marker: called only after every data file of the stage is written."""
    files, nbytes = art.sizes()
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest = {**manifest, "files": files, "bytes": nbytes, "created_at": created}
    art.write_json(MANIFEST, manifest)
    art.manifest = manifest
