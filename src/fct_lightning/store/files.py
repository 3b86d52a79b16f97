"""Writing a store's files so that nothing is lost: temporary names, fsync, rename, checksums, locks.

Every file is written under a temporary name that no reader matches (it ends in ``.tmp``), synced, and renamed
into place; the folder is synced after the rename. Locks are ``fcntl.flock`` locks on files that are never
removed: the kernel releases them when the holder dies, so a lock file left by a killed job blocks nothing. While
held a lock file names its holder (host, pid, command); it is emptied on release, so a finished store holds
the same bytes however many times its jobs were interrupted.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fct_lightning.store.format import StoreError, StoreLocked

CHUNK_BYTES = 16 << 20
"""Bytes converted, checked, hashed and written at a time: what a shard write holds in memory beyond its input."""

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def write_block(fh: BinaryIO, data: bytes | memoryview) -> None:
    """Write ``data`` to ``fh``: every byte of a shard goes through here (tests replace it to fill the disk)."""
    fh.write(data)


def fsync_dir(path: Path) -> None:
    """Make a rename in the folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(path: Path, tmp: Path) -> Iterator[Path]:
    """Yield ``tmp`` to write (and fsync) ``path``'s new content into; on success it is renamed over ``path``.

    On any error ``tmp`` is removed and ``path`` is as it was; a full disk becomes a StoreError naming the file.
    """
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno in FULL_DISK:
            raise StoreError(f"the disk is full: {path} could not be written ({err.strerror}). Nothing is lost "
                             "(its temporary file was removed, the manifest is unchanged): free some space and "
                             "run the same command again; complete shards are kept") from err
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes, tmp: Path | None = None) -> None:
    """Replace ``path`` by ``data`` atomically (through ``tmp``, default ``.<name>.<pid>.tmp`` beside it)."""
    tmp = tmp or path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with replacing(path, tmp), open(tmp, "wb") as fh:
        write_block(fh, data)
        fh.flush()
        os.fsync(fh.fileno())


def dump_json(data: Any) -> bytes:
    """The canonical bytes of a JSON record (sorted keys, so equal records are equal files)."""
    return (json.dumps(data, indent=1, sort_keys=True) + "\n").encode()


def read_json(path: Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable (a record that cannot be trusted)."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def sha256_file(path: Path) -> str:
    """``sha256:<hex>`` of the whole file, streamed."""
    h = hashlib.sha256()
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return f"sha256:{h.hexdigest()}"


def npy_header(rows: int, dim: int, dtype: str) -> bytes:
    """The ``.npy`` header of a C-order little-endian ``[rows, dim]`` array (the bytes ``np.save`` writes)."""
    buf = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype).newbyteorder("<"))
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": (rows, dim)})
    return buf.getvalue()


def npy_size(rows: int, dim: int, dtype: str) -> int:
    """The size in bytes of the ``.npy`` file of a ``[rows, dim]`` array."""
    return len(npy_header(rows, dim, dtype)) + rows * dim * np.dtype(dtype).itemsize


EXPONENT = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000), 8: (np.uint64, 0x7FF0000000000000)}


def first_non_finite(block: np.ndarray) -> int | None:
    """The first row of a C-contiguous float ``block`` holding a NaN or inf (all exponent bits set), or None.

    A bit test: several times faster than ``np.isfinite`` on float16, which matters at GB/s.
    """
    kind, mask = EXPONENT[block.itemsize]
    exp = np.bitwise_and(block.view(kind), kind(mask))
    if exp.size == 0 or exp.max() != mask:
        return None
    return int(np.argmax((exp == mask).any(axis=1)))


def write_npy(tmp: Path, data: np.ndarray, dtype: str, describe: Callable[[int], str]) -> str:
    """Write ``data`` ([rows, dim] floats, possibly memory-mapped) to ``tmp`` as ``dtype``, block by block; fsync.

    Returns the file's ``sha256:<hex>``. A row that is not finite once stored (NaN, inf, or beyond float16's
    +-65504) is refused with a StoreError naming it (``describe(row)``).
    """
    dt = np.dtype(dtype).newbyteorder("<")
    rows, dim = data.shape
    header = npy_header(rows, dim, dtype)
    h = hashlib.sha256(header)
    step = max(1, CHUNK_BYTES // (dim * max(dt.itemsize, data.dtype.itemsize)))
    with open(tmp, "wb") as fh:
        write_block(fh, header)
        for a in range(0, rows, step):
            with np.errstate(over="ignore", invalid="ignore"):
                block = np.ascontiguousarray(data[a:a + step], dtype=dt)
            bad = first_non_finite(block)
            if bad is not None:
                raise StoreError(f"{describe(a + bad)} is not finite as {dtype} (NaN, inf, or "
                                 "beyond float16's range +-65504); nothing of the shard was kept. Fix the model or "
                                 "the input rows (or store float32) and run again")
            buf = memoryview(block).cast("B")
            h.update(buf)
            write_block(fh, buf)
        fh.flush()
        os.fsync(fh.fileno())
    return f"sha256:{h.hexdigest()}"


def write_parquet(tmp: Path, table: Any) -> str:
    """Write the pyarrow ``table`` to ``tmp`` as parquet and fsync it; returns the file's ``sha256:<hex>``.

    The bytes depend only on the table and the pyarrow version, so a rewritten shard has the same checksum.
    """
    import pyarrow.parquet as pq

    with open(tmp, "wb") as fh:
        pq.write_table(table, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return sha256_file(tmp)


def holder_info() -> dict[str, Any]:
    """Who this process is, as a lock file names its holder."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv)}


class FileLock:
    """An exclusive ``flock`` on ``path`` (created when missing, never removed), naming its holder while held.

    Args:
        path: the lock file.
        what: what the lock guards, for the message when another job holds it (e.g. "shard part-00003 of space
            'old' in /data/gallery").
    """

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = Path(path), what
        self._fd: int | None = None

    def acquire(self, wait: float = 0.0) -> FileLock:
        """Take the lock, retrying for up to ``wait`` seconds; StoreLocked (naming the holder) when it stays taken."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    held_by = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a job that is starting"
                    os.close(fd)
                    raise StoreLocked(f"{self.what} is being written by another job ({held_by}; lock file "
                                      f"{self.path}). Wait for that job to end, or stop it, then run again; two "
                                      "jobs never write the same shard (a lock left by a job that died does not "
                                      "block)") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_info()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the lock file and let go of it (a no-op when not held)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            finally:
                os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> FileLock:
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc: object) -> None:
        self.release()
