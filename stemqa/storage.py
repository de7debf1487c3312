"""One `storage_path` for every artifact: a local directory on one machine, shared storage on a cluster.

A storage path is either a local path (`runs`, `/mnt/shared/runs`, `file:///mnt/shared/runs`) or a URI that
pyarrow's filesystems understand (`s3://bucket/stemqa/runs`, `gs://bucket/runs`, with optional query options
such as `?region=us-east-1&endpoint_override=minio:9000`). Every helper here takes such a path, so a stage can
write its artifacts locally while it works and copy them to the storage path when done, on any filesystem.

Ray Train takes the same string (`RunConfig(storage_path=...)`, see `for_ray_train`), so checkpoints land in
the same place as everything else.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Union
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

PathLike = Union[str, os.PathLike]

# a scheme of 2+ letters; one letter would be a Windows drive (C:\...)
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


class StorageError(OSError):
    """A storage path that cannot be used or read; the message names the path."""


def is_uri(path: PathLike) -> bool:
    """True for remote URIs (s3://, gs://, hdfs://...); False for local paths and file:// URIs."""
    s = str(path)
    return bool(_URI.match(s)) and not s.startswith("file://")


def absolute(path: PathLike) -> str:
    """The storage path as a string every process can use: local paths made absolute, URIs unchanged."""
    s = os.fspath(path)
    if is_uri(s):
        return s
    if s.startswith("file://"):
        s = urlsplit(s).path
    return str(Path(s).expanduser().resolve())


def local_path(path: PathLike) -> Optional[Path]:
    """The local directory a storage path names, or None when it is remote."""
    return None if is_uri(path) else Path(absolute(path))


def join(base: PathLike, *parts: str) -> str:
    """`base/part/...` for local paths and URIs alike (a URI's query options stay at the end)."""
    rel = "/".join(str(p).strip("/") for p in parts if str(p).strip("/"))
    if not is_uri(base):
        return str(Path(absolute(base), rel)) if rel else absolute(base)
    u = urlsplit(str(base))
    path = u.path.rstrip("/") + ("/" + rel if rel else "")
    return urlunsplit((u.scheme, u.netloc, path, u.query, u.fragment))


def filesystem(path: PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a storage path."""
    s = absolute(path)
    try:
        return pafs.FileSystem.from_uri(s) if is_uri(s) else (pafs.LocalFileSystem(), s)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise StorageError(f"storage path {s!r}: {e}") from None


def for_ray_train(path: PathLike) -> dict:
    """Keyword arguments for `ray.train.RunConfig`: an absolute local path, or the URI with its filesystem
    (Ray Train would otherwise resolve the URI itself, dropping query options such as endpoint_override)."""
    s = absolute(path)
    if not is_uri(s):
        return {"storage_path": s}
    fs, inner = filesystem(s)
    return {"storage_path": inner, "storage_filesystem": fs}


def makedirs(path: PathLike) -> str:
    fs, p = filesystem(path)
    fs.create_dir(p, recursive=True)
    return absolute(path)


def exists(path: PathLike) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def is_dir(path: PathLike) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type == pafs.FileType.Directory


def write_bytes(path: PathLike, data: bytes) -> str:
    """Write a file, creating its parent directories (object stores have no directories to create)."""
    fs, p = filesystem(path)
    parent = p.rsplit("/", 1)[0]
    if parent and parent != p:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(data)
    return absolute(path)


def write_text(path: PathLike, text: str) -> str:
    return write_bytes(path, text.encode("utf-8"))


def read_bytes(path: PathLike) -> bytes:
    fs, p = filesystem(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{absolute(path)}: no such file in storage") from None


def read_text(path: PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def list_files(path: PathLike) -> list[str]:
    """Every file under a directory, as sorted paths relative to it."""
    fs, p = filesystem(path)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{absolute(path)}: no such directory in storage")
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    root = p.rstrip("/") + "/"
    return sorted(i.path[len(root):] for i in infos if i.type == pafs.FileType.File)


def copy(src: PathLike, dst: PathLike) -> str:
    """Copy a file or a directory tree from one storage path to another (local <-> s3/gs, or same kind).

    pyarrow.fs.copy_files does the transfer (multi-threaded, streaming); a directory is copied into `dst`."""
    src_fs, src_p = filesystem(src)
    dst_fs, dst_p = filesystem(dst)
    kind = src_fs.get_file_info(src_p).type
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{absolute(src)}: nothing to copy")
    if kind == pafs.FileType.Directory:
        dst_fs.create_dir(dst_p, recursive=True)
    else:
        parent = dst_p.rsplit("/", 1)[0]
        if parent and parent != dst_p:
            dst_fs.create_dir(parent, recursive=True)
    pafs.copy_files(src_p, dst_p, source_filesystem=src_fs, destination_filesystem=dst_fs)
    return absolute(dst)


def delete(path: PathLike) -> None:
    """Remove a file or a directory tree (missing paths are fine)."""
    fs, p = filesystem(path)
    kind = fs.get_file_info(p).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(p)
    elif kind == pafs.FileType.File:
        fs.delete_file(p)
