"""One place that turns a path or URI into a filesystem: what every reader and writer of run data goes through.

    "runs/x", "/abs/x", "file:///abs/x"   -> pyarrow's LocalFileSystem, an absolute local path
    "s3://bucket/key", "gs://bucket/key"  -> pyarrow's S3FileSystem / GcsFileSystem, "bucket/key"

S3 options come from the usual environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION) plus
AWS_ENDPOINT_URL (an S3-API server that is not AWS: MinIO, moto, Ceph), which pyarrow reads itself.

Object stores have no atomic rename, so "complete" cannot mean "renamed into place" there. A directory written
through `upload_dir` / `write_complete_dir` is complete when its marker file `COMPLETE`, written after every other
file, exists (`is_complete_dir`); readers check the marker, never a half-uploaded directory.

Every process that reads an object-store file as a local one (a checkpoint, a tokenizer) or writes files before
uploading them uses a node-local cache under Ray's temp root (`cache_dir`: $TMPDIR/ray/rayllama): disposable, never
the copy of record, so a run on an object store leaves nothing on a node outside Ray's temp dirs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pyarrow.fs as pafs

COMPLETE_MARKER = "COMPLETE"
SCHEMES = ("s3", "gs", "gcs", "file", "hdfs")


class StorageError(ValueError):
    """A path or URI that cannot be opened; the message names it and the fix."""


def cache_dir(kind: str) -> Path:
    """This node's cache for `kind` ("copies", "scratch", "runs", ...) under Ray's temp root (RAY_TMPDIR, else
    TMPDIR, else /tmp: followed by `ray`, as Ray picks its own)."""
    path = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray" / "rayllama" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def key_of(path: str | os.PathLike) -> str:
    """A short stable name for `path` (a cache entry's directory name)."""
    return hashlib.sha1(str(path).encode()).hexdigest()[:16]


def is_uri(path: str | os.PathLike) -> bool:
    s = str(path)
    return "://" in s and s.split("://", 1)[0] in SCHEMES and not s.startswith("file://")


def filesystem(path: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, file:// URI or object-store URI. pyarrow parses the URI:
    s3://[KEY:SECRET@]bucket/key?endpoint_override=http://host:port&region=... (options in the URI reach every
    Ray worker with the path; without them pyarrow reads the AWS_* environment)."""
    s = str(path)
    if s.startswith("file://"):
        s = s[len("file://"):]
    if not is_uri(s):
        return pafs.LocalFileSystem(), str(Path(s).absolute())
    try:
        fs, inner = pafs.FileSystem.from_uri(s)
    except (OSError, ValueError) as e:  # pyarrow's ArrowIOError / ArrowInvalid
        raise StorageError(f"cannot open storage {s.split('?')[0]}: {str(e).splitlines()[0]}; check the URI and "
                           f"credentials") from None
    return fs, inner.rstrip("/")


def join(base: str | os.PathLike, *parts: str) -> str:
    """base / parts for a local path or a URI (a URI keeps its scheme and its ?options at the end)."""
    s, _, query = str(base).partition("?") if is_uri(base) else (str(base), "", "")
    if not is_uri(s):
        return str(Path(s, *parts))
    joined = "/".join([s.rstrip("/"), *[p.strip("/") for p in parts]])
    return f"{joined}?{query}" if query else joined


def name_of(path: str | os.PathLike) -> str:
    """The last component of a path or URI (without the URI's ?options)."""
    return str(path).partition("?")[0].rstrip("/").rsplit("/", 1)[-1] if is_uri(path) else Path(path).name


def exists(path: str | os.PathLike) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_file(path: str | os.PathLike) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type == pafs.FileType.File


def is_dir(path: str | os.PathLike) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def list_files(path: str | os.PathLike) -> list[str]:
    """Every file under the directory `path`, recursively, as paths / URIs in the same form as `path`, sorted."""
    fs, p = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True, allow_not_found=True))
    rel = sorted(i.path[len(p):].lstrip("/") for i in infos if i.type == pafs.FileType.File)
    return [join(path, r) for r in rel]


def list_dirs(path: str | os.PathLike) -> list[str]:
    """The directories directly under `path` (local or object store), in the same form as `path`, sorted by name.
    On an object store a directory is any prefix that holds a file."""
    fs, p = filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False, allow_not_found=True))
    return [join(path, name) for name in sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)]


def delete_dir(path: str | os.PathLike) -> None:
    """Remove the directory `path` and everything under it; nothing if it does not exist."""
    fs, p = filesystem(path)
    if fs.get_file_info(p).type == pafs.FileType.Directory:
        fs.delete_dir(p)


def relative(path: str, base: str) -> str:
    """`path` (from list_files(base)) relative to `base`."""
    return path.partition("?")[0][len(str(base).partition("?")[0].rstrip("/")):].lstrip("/")


@contextmanager
def open_input(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A seekable binary stream of the file (local, or an object-store object read by ranges)."""
    fs, p = filesystem(path)
    try:
        f = fs.open_input_file(p)
    except (FileNotFoundError, OSError) as e:
        raise StorageError(f"cannot read {path}: {str(e).splitlines()[0]}; check the path") from None
    try:
        yield f
    finally:
        f.close()


def read_bytes(path: str | os.PathLike) -> bytes:
    with open_input(path) as f:
        return f.read()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a whole file: locally through a temp file and a rename, on an object store as one PUT (atomic there:
    an object appears whole or not at all)."""
    fs, p = filesystem(path)
    if not is_uri(path):
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(p).with_name(f".{Path(p).name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, p)
        return
    with fs.open_output_stream(p) as f:
        f.write(data)


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode()


def upload_files(local: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy every file of the local directory `local` to `dest` (an object-store URI), no marker."""
    fs, p = filesystem(dest)
    for f in sorted(Path(local).rglob("*")):
        if f.is_file():
            with open(f, "rb") as src, fs.open_output_stream(f"{p}/{f.relative_to(local).as_posix()}") as out:
                shutil.copyfileobj(src, out, length=8 << 20)


def mark_complete(dest: str | os.PathLike) -> None:
    """Write the COMPLETE marker of the object-store directory `dest` (after every other file of it)."""
    fs, p = filesystem(dest)
    with fs.open_output_stream(f"{p}/{COMPLETE_MARKER}") as out:
        out.write(b"")


@contextmanager
def writing_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """A local directory to write `dest`'s files into: `dest` itself when local; for a URI a fresh scratch dir
    whose files are uploaded to `dest` (no marker: the caller marks the whole directory complete) when the block
    ends without an error, then removed."""
    if not is_uri(dest):
        Path(dest).mkdir(parents=True, exist_ok=True)
        yield Path(dest)
        return
    tmp = Path(tempfile.mkdtemp(prefix=f"{key_of(dest)}-", dir=cache_dir("scratch")))
    try:
        yield tmp
        upload_files(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_complete_dir(dest: str | os.PathLike, fill: Callable[[Path], object]) -> None:
    """`fill(directory)` writes a directory that must appear whole: locally `fill(dest)` (which is atomic itself:
    rayllama.checkpoint.save_state); on an object store into a scratch dir, uploaded with the marker last."""
    if not is_uri(dest):
        fill(Path(dest))
        return
    with tempfile.TemporaryDirectory(dir=cache_dir("scratch")) as tmp:
        fill(Path(tmp) / "out")
        upload_dir(Path(tmp) / "out", dest)


def upload_dir(local: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy the local directory `local` to `dest` (a path or URI), then write the COMPLETE marker last."""
    if not is_uri(dest):
        raise StorageError(f"upload_dir wants an object-store URI, got {dest}; use a local copy instead")
    upload_files(local, dest)
    mark_complete(dest)


def is_complete_dir(path: str | os.PathLike) -> bool:
    """An object-store directory is complete when its COMPLETE marker (written last) exists."""
    return is_file(join(path, COMPLETE_MARKER))


def download_dir(src: str | os.PathLike, local: str | os.PathLike, stamp: str | None = None) -> Path:
    """Copy the complete object-store directory `src` to the local directory `local` (replaced atomically).
    With `stamp`, the copy carries it in `.downloaded`, and a `local` another process finished first with the same
    stamp is kept (ours is dropped): processes on one node may fetch the same version at once.
    StorageError if `src` lacks its COMPLETE marker (an upload that did not finish)."""
    if not is_complete_dir(src):
        raise StorageError(f"{src} has no {COMPLETE_MARKER} marker: its upload did not finish; write it again")
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{local.name}.tmp-", dir=local.parent))
    try:
        for uri in list_files(src):
            rel = relative(uri, str(src))
            if rel == COMPLETE_MARKER:
                continue
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open_input(uri) as f, open(target, "wb") as out:
                shutil.copyfileobj(f, out, length=8 << 20)
        if stamp is not None:
            (tmp / ".downloaded").write_text(stamp)
        if _stamped(local, stamp):
            shutil.rmtree(tmp)
            return local
        if local.exists():
            shutil.rmtree(local)
        try:
            os.rename(tmp, local)
        except OSError:  # another process renamed its copy in between
            if not _stamped(local, stamp):
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return local


def _stamped(local: Path, stamp: str | None) -> bool:
    marker = local / ".downloaded"
    return stamp is not None and marker.is_file() and marker.read_text() == stamp


def local_dir(path: str | os.PathLike) -> Path:
    """A local directory holding `path`: itself when local, else this node's copy of the complete object-store
    directory (made once per version of its marker: a directory written again is copied again; processes that
    ask at once each download, and the first copy renamed into place is the one they all use)."""
    if not is_uri(path):
        return Path(filesystem(path)[1])
    version = f"{path}@{marker_version(path)}"
    target = cache_dir("copies") / key_of(version)
    if not _stamped(target, version):
        download_dir(path, target, stamp=version)
    return target


def marker_version(path: str | os.PathLike) -> str:
    """Which writing of the object-store directory `path` is there: its COMPLETE marker's mtime ("none": no
    marker)."""
    fs, p = filesystem(path)
    marker = fs.get_file_info(f"{p}/{COMPLETE_MARKER}")
    return str(marker.mtime_ns) if marker.type == pafs.FileType.File else "none"


def local_file(path: str | os.PathLike) -> Path:
    """A local path of the file `path`: itself when local, else this node's copy (made once)."""
    if not is_uri(path):
        return Path(filesystem(path)[1])
    target = cache_dir("copies") / key_of(path) / name_of(path)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tmp.write_bytes(read_bytes(path))
        os.replace(tmp, target)
    return target


def parent(path: str | os.PathLike) -> str:
    """The directory above a path or URI (a URI keeps its ?options)."""
    if not is_uri(path):
        return str(Path(path).parent)
    s, _, query = str(path).partition("?")
    up = s.rstrip("/").rsplit("/", 1)[0]
    return f"{up}?{query}" if query else up
