"""Stored embeddings on disk: a ``.npy`` array and the files that describe it, written so that nothing is lost.

``x.npy`` (float32 ``[N, d]``) comes with ``x.json`` (which checkpoint made it, from which items, and a
fingerprint of ``x.npy``: the sha256 of its whole content), and either ``x.ids.txt`` (image files, one JSON string
per line, in row order) or ``x.labels.npy`` (a dataset split's labels). A new ``x.npy`` is written to a temporary
file that replaces the old one only when complete; the old ``x.json`` is removed just before, and the new one
written last, so a crash never leaves a description next to rows it does not describe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "fct-lightning embeddings"
COMPANIONS = {"meta": ".json", "ids": ".ids.txt", "labels": ".labels.npy"}


def sidecar(path: Path, kind: str) -> Path:
    """A file that describes the array ``x.npy``: ``x.json`` (``meta``), ``x.ids.txt`` or ``x.labels.npy``."""
    return path.with_suffix(COMPANIONS[kind])


def family(path: Path) -> list[Path]:
    """``path`` and every file that may describe it."""
    return [path, *(sidecar(path, kind) for kind in COMPANIONS)]


def check_out(out: str | Path, overwrite: bool, flag: str = "--out") -> Path:
    """An output path ending in ``.npy`` in a usable folder, whose files exist only if ``overwrite``."""
    out = Path(out)
    if out.suffix != ".npy":
        raise ValueError(f"{flag} {out} must end in .npy (the embeddings are written as a NumPy array file)")
    if out.is_dir():
        raise ValueError(f"{flag} {out} is a folder; give a file name such as {out / 'gallery.npy'}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag} {out} cannot be written: {parent} is a file, not a folder")
            break
    existing = [p for p in family(out) if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"{existing[0]} exists; pass --overwrite to replace it (it is replaced only once the new "
                         f"file is complete), or choose another {flag}")
    return out


def refuse_collisions(outputs: dict[str, Path], inputs: list[Path]) -> None:
    """No output (or a file describing it) may be an input or a file describing one: it would be destroyed."""
    taken = {p.resolve(): p for path in inputs for p in family(path)}
    for flag, out in outputs.items():
        for p in family(out):
            if p.resolve() in taken:
                raise ValueError(f"{flag} {out} would replace {taken[p.resolve()]}, which is one of the inputs or "
                                 "describes one; write the results to new files")


def _part_prefix(path: Path) -> str:
    return f".{path.name}.{socket.gethostname()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_dead_parts(path: Path) -> None:
    """Remove temporary files left next to ``path`` by runs of this machine that were killed."""
    prefix = _part_prefix(path)
    for part in path.parent.glob(f"{prefix}*.part"):
        pid = part.name[len(prefix):].split(".")[0]
        if pid.isdigit() and not _alive(int(pid)):
            part.unlink(missing_ok=True)


@contextmanager
def writing(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on failure it is removed.

    An existing ``path`` stays as it was until the new file is complete, so an error loses nothing.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_parts(path)
    tmp = path.with_name(f"{_part_prefix(path)}{os.getpid()}.part")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


BLOCK = 4 << 20
"""Bytes read at a time by :func:`fingerprint`."""


def fingerprint(path: Path) -> str:
    """``"sha256:<hex>"``: the sha256 of the whole file, streamed in :data:`BLOCK` blocks (about 1 s per GB)."""
    h = hashlib.sha256()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return f"sha256:{h.hexdigest()}"


def partial_fingerprint(path: Path) -> str:
    """The fingerprint descriptions held before whole-file ones (16 hex digits): the file's size, first and last
    MiB only. Still checked, with a warning, so that stored galleries described that way stay usable."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
        if size > 1 << 20:
            fh.seek(max(size - (1 << 20), 1 << 20))
            h.update(fh.read())
    return h.hexdigest()[:16]


def fingerprint_matches(path: Path, recorded: Any, side: Path) -> bool:
    """Whether ``recorded`` (the fingerprint ``side`` holds) is that of ``path`` as it is now."""
    if isinstance(recorded, str) and recorded.startswith("sha256:"):
        return recorded == fingerprint(path)
    if isinstance(recorded, str) and re.fullmatch(r"[0-9a-f]{16}", recorded):
        log.warning("%s holds an older, partial fingerprint of %s (its size and first and last MiB): a change in the "
                    "middle of the array goes unnoticed. Re-create the files with fct-embed (or fct-transform) to "
                    "have all of it checked.", side, path.name)
        return recorded == partial_fingerprint(path)
    raise ValueError(f"{side} holds a fingerprint of an unknown kind ({recorded!r}; fct-lightning writes "
                     "'sha256:<hex>'); re-create the embeddings with fct-embed (or fct-transform)")


def publish(tmp: Path, out: Path) -> str:
    """The step before ``tmp`` replaces ``out``: fingerprint it and remove ``out``'s old description."""
    fp = fingerprint(tmp)
    sidecar(out, "meta").unlink(missing_ok=True)
    return fp


def write_json(path: Path, data: dict[str, Any]) -> None:
    with writing(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def copy_companions(src: Path, meta: dict[str, Any] | None, out: Path) -> dict[str, str | None]:
    """Copy ``src``'s ids or labels file next to ``out`` (the rows are the same items); remove stale ones."""
    names: dict[str, str | None] = {}
    for kind in ("ids", "labels"):
        names[kind] = None
        if meta and meta.get(kind):
            with writing(sidecar(out, kind)) as tmp:
                shutil.copyfile(sidecar(src, kind), tmp)
            names[kind] = sidecar(out, kind).name
        else:
            sidecar(out, kind).unlink(missing_ok=True)
    return names


def read_ids(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            yield json.loads(line)


def load_array(path: str | Path, what: str) -> np.ndarray:
    """A stored ``[N, d]`` float array, memory-mapped; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"the {what} file {path} does not exist; write it with fct-embed (or np.save an "
                                "[N, d] float array)")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" in str(err) or "Python objects" in str(err):
            raise ValueError(f"the {what} file {path} holds Python objects, not numbers; save an [N, d] float "
                             "array (np.save(path, np.asarray(rows, dtype=np.float32)))") from err
        raise ValueError(f"the {what} file {path} cannot be read as a .npy array ({err}); the file is corrupt or "
                         "not a NumPy array file. Re-create it with fct-embed.") from err
    except (OSError, EOFError) as err:
        raise ValueError(f"the {what} file {path} cannot be read as a .npy array ({err}); the file is corrupt or "
                         "not a NumPy array file. Re-create it with fct-embed.") from err
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"the {what} file {path} holds a {arr.dtype} array of shape {arr.shape}; an [N, d] "
                         "float array (one embedding per row) is needed")
    return arr


def _lines(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 24), b""))


def read_meta(path: Path, rows: int) -> dict[str, Any] | None:
    """The description of the ``rows``-row array ``path`` (None without one), checked against the files."""
    side = sidecar(path, "meta")
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (ValueError, OSError) as err:
        raise ValueError(f"{side} (the description of {path.name}) cannot be read ({err}); restore it, or delete "
                         "it to skip the checks it allows") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{side} is not an fct-lightning embeddings description; rename it or delete it")
    stale = f"{side} does not describe {path}: the two files do not belong together (one was replaced or " \
            "changed). Re-create both with fct-embed."
    if meta.get("rows") != rows or (meta.get("fingerprint") and not fingerprint_matches(path, meta["fingerprint"],
                                                                                          side)):
        raise ValueError(stale)
    if meta.get("ids"):
        ids = sidecar(path, "ids")
        if not ids.is_file():
            raise ValueError(f"{ids} is missing ({side} lists it): it says which image each row is. Restore it or "
                             "re-create the embeddings with fct-embed.")
        if _lines(ids) != rows:
            raise ValueError(f"{ids} lists {_lines(ids)} items but {path} has {rows} rows; restore the ids file "
                             "or re-create the embeddings with fct-embed")
    if meta.get("labels"):
        labels = sidecar(path, "labels")
        with contextlib.suppress(FileNotFoundError, ValueError, OSError):
            if len(np.load(labels, mmap_mode="r", allow_pickle=False)) == rows:
                return meta
        raise ValueError(f"{labels} is missing or does not have {rows} labels ({side} lists it); restore it or "
                         "re-create the embeddings with fct-embed")
    return meta
