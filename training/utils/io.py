"""Files and folders written so that a crash never leaves half of one under its final name.

- A file is written to a temporary name beside it (`.<name>.tmp-<pid>`, so a killed run's leftovers are easy to
  recognise and remove) and then `os.replace`d: readers see the old file or the new one (`atomic_path`,
  `atomic_open`, `atomic_write_bytes` / `_text` / `_json` / `_jsonl`, `save_figure` for matplotlib figures).
- A folder is built in a staging folder beside it and renamed into place, replacing an older one only once the new
  one is complete (`staged_folder`); or, for a folder that already holds other things (a run's checkpoints), its
  files are staged inside it and moved in one by one (`staged_files`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: str | os.PathLike) -> str:
    """The temporary file `path` is written to first: `.<name>.tmp-<pid>` in the same folder."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[str]:
    """Yield the temporary path to write `path` to; when the block ends it replaces `path` (after an fsync when
    asked), and if the block raises it is removed and `path` is untouched. Creates the parent folder."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", fsync: bool = False):
    """`open(path, mode)` (text modes in UTF-8) through `atomic_path`: the file appears whole when the block ends."""
    with atomic_path(path, fsync=fsync) as tmp:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            yield handle


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> str:
    """Write `data` to `path` atomically (fsync'd by default: readers see all of it or nothing); returns the path."""
    with atomic_open(path, "wb", fsync=fsync) as handle:
        handle.write(data)
    return os.fspath(path)


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> str:
    """Write `text` (UTF-8) to `path` atomically; returns the path."""
    with atomic_open(path, "w", fsync=fsync) as handle:
        handle.write(text)
    return os.fspath(path)


def atomic_write_json(path: str | os.PathLike, obj, fsync: bool = False, newline: bool = False, **dump_kwargs) -> str:
    """`json.dump(obj, **dump_kwargs)` to `path` atomically (indent 2 unless given; `newline`: end with one)."""
    dump_kwargs.setdefault("indent", 2)
    with atomic_open(path, "w", fsync=fsync) as handle:
        json.dump(obj, handle, **dump_kwargs)
        if newline:
            handle.write("\n")
    return os.fspath(path)


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable, fsync: bool = False) -> int:
    """Write `records` as JSON lines (UTF-8, not ASCII-escaped) to `path` atomically; returns how many."""
    count = 0
    with atomic_open(path, "w", fsync=fsync) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> str:
    """Save a matplotlib figure to `path` atomically (the format from its extension) and close it; returns the path."""
    path = os.fspath(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=os.path.splitext(path)[1].lstrip(".") or "png")
    finally:
        pyplot = sys.modules.get("matplotlib.pyplot")  # figures made through pyplot are closed; others need not be
        if pyplot is not None:
            pyplot.close(fig)
    return path


@contextlib.contextmanager
def staged_folder(final: str | os.PathLike, prefix: str | None = None) -> Iterator[str]:
    """Yield a fresh folder beside `final`; when the block ends it becomes `final` (an older `final` is replaced only
    then, and removed), and if the block raises it is removed and `final` is untouched."""
    final = os.fspath(final)
    parent = os.path.dirname(os.path.abspath(final))
    name = prefix or f".{os.path.basename(os.path.abspath(final))}-"
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"{name}staging-", dir=parent)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if os.path.lexists(final):
        old = tempfile.mkdtemp(prefix=f"{name}old-", dir=parent)
        os.rmdir(old)
        os.replace(final, old)
    os.replace(staging, final)
    if old:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.unlink(old)


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike, owner: bool = True) -> Iterator[str]:
    """For a folder that holds other things too (a run's checkpoints): yield `folder/.final-staging`; when the block
    ends, each file written there is moved into `folder` (each move atomic) and the staging folder is removed; if
    the block raises, `folder`'s own files are as they were. In a distributed run only the `owner` (main) process
    prepares, moves and removes: the others just get the path (for collective saves such as `Trainer.save_model`)."""
    folder = os.fspath(folder)
    staging = os.path.join(folder, ".final-staging")
    if owner:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    try:
        yield staging
        if owner:
            for name in os.listdir(staging):
                os.replace(os.path.join(staging, name), os.path.join(folder, name))
    finally:
        if owner:
            shutil.rmtree(staging, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
