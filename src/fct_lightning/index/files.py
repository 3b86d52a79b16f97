"""What an index is on disk, and reading one back: a folder with the FAISS index and a JSON record beside it.

::

    INDEX/index.faiss      the FAISS index (faiss.write_index); its ids are the store's global row numbers
    INDEX/index.json       what it was built from: format, version, the store's digest of the space (and its
                           path, for messages), space, rows, dim, dtype, factory, metric, index type, how ids were
                           given, the training sample (rows, seed, sha256 of its row numbers), device, FAISS
                           version, build seconds
    INDEX/lists.ivfdata    on-disk IVF indexes only: the inverted lists, memory-mapped at search time

The folder appears under its name only when complete (it is built in ``INDEX.partial/`` and renamed), so a folder
called INDEX is always a whole index. Reading runs no code: the record is plain JSON, the index goes through
``faiss.read_index``. An index refuses a store whose space is not the one it was built on (:func:`check_store`):
the record holds ``Store.digest(space)``, which changes when the space or the items are rewritten, and not when
other spaces are added.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fct_lightning.store import Store

FORMAT = "fct-lightning index"
VERSION = 1
INDEX_FILE = "index.faiss"
RECORD_FILE = "index.json"
IVFDATA_FILE = "lists.ivfdata"
METRICS = ("l2", "ip")


def faiss_module() -> Any:
    """The ``faiss`` module, or an ImportError naming the package to install."""
    try:
        import faiss
    except ImportError as err:
        raise ImportError("fct-index needs FAISS: pip install faiss-cpu (or faiss-gpu)") from err
    return faiss


def faiss_metric(metric: str) -> int:
    """FAISS's constant for ``metric`` (``l2``: squared Euclidean, ``ip``: inner product)."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not known; use l2 (squared Euclidean distance) or ip (inner "
                         "product; on L2-normalised rows this is cosine similarity)")
    faiss = faiss_module()
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def use_gpu(device: str) -> bool:
    """Whether ``device`` (``auto``: the GPU when FAISS has GPUs, ``cpu``, ``cuda``) means building on a GPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {device!r} is not known; use auto (the GPU when FAISS has one), cpu or cuda")
    gpus = int(faiss_module().get_num_gpus()) if hasattr(faiss_module(), "get_num_gpus") else 0
    if device == "cuda" and gpus == 0:
        raise ValueError("device cuda asks for a GPU, but this FAISS has none (faiss-cpu, or no CUDA device); "
                         "use --device cpu (or auto), or install faiss-gpu")
    return device != "cpu" and gpus > 0


def read_record(path: str | Path) -> dict[str, Any]:
    """The record ``INDEX/index.json`` of the index folder ``path``, checked to be this format's."""
    path = Path(path)
    record_path = path / RECORD_FILE
    if not path.is_dir() or not (path / INDEX_FILE).is_file() or not record_path.is_file():
        hint = (f"{path}.partial holds an unfinished build: run the same fct-index again to finish it"
                if Path(f"{path}.partial").exists() else "build it with fct-index")
        raise FileNotFoundError(f"there is no index at {path} (a folder with {INDEX_FILE} and {RECORD_FILE}); {hint}")
    try:
        record = json.loads(record_path.read_bytes())
    except (OSError, ValueError) as err:
        raise ValueError(f"{record_path} cannot be read ({err}); rebuild the index with fct-index") from err
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{record_path} is not an fct-lightning index record; rebuild the index with fct-index")
    if record.get("version") != VERSION:
        raise ValueError(f"{record_path} has index format version {record.get('version')!r}; this fct-lightning "
                         f"reads version {VERSION}: rebuild the index with fct-index")
    return record


def load_index(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """The FAISS index of the folder ``path`` and its record.

    An on-disk index's lists are memory-mapped read-only from ``INDEX/lists.ivfdata`` wherever the folder now is.
    """
    record = read_record(path)
    faiss = faiss_module()
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY if record.get("ondisk") else 0
    try:
        index = faiss.read_index(str(Path(path) / INDEX_FILE), flags)
    except RuntimeError as err:
        raise ValueError(f"{Path(path) / INDEX_FILE} cannot be read by FAISS ({str(err).splitlines()[-1]}); "
                         "rebuild the index with fct-index") from err
    if index.ntotal != record.get("rows") or index.d != record.get("dim"):
        raise ValueError(f"{Path(path) / INDEX_FILE} holds {index.ntotal} rows of dim {index.d}, but its record says "
                         f"{record.get('rows')} of dim {record.get('dim')}: the files do not belong together; "
                         "rebuild the index with fct-index")
    return index, record


def check_store(record: dict[str, Any], store: Store, where: str | Path) -> None:
    """Refuse ``store`` unless its space is the version the index ``where`` (recorded in ``record``) was built on."""
    space = record["space"]
    if space not in store.spaces:
        raise ValueError(f"the index {where} was built on space {space!r}, which {store.path} does not have (it has "
                         f"{sorted(store.spaces) or 'none'}); give the store the index was built on "
                         f"({record.get('store')})")
    digest = store.digest(space)
    if digest != record["store_digest"]:
        raise ValueError(f"the index {where} was built on another version of space {space!r} (store digest "
                         f"{record['store_digest'][:19]}..., now {digest[:19]}... in {store.path}: its items or rows "
                         f"were rewritten); rebuild it: fct-index --store {store.path} --space {space} --factory "
                         f"{record['factory']!r} --out {where} --overwrite")
