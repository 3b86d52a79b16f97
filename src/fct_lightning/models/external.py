"""External image models: a TorchScript or ``torch.export`` file the library did not train, as an old (or other) model.

FCT needs of the old model only its embeddings (a store holds them); to embed *new* gallery items with it, the model
itself is needed. A model trained elsewhere comes as a file that maps ``[B, C, H, W]`` float images to ``[B, d]``
embeddings, with a JSON sidecar next to it (``<file>.json``) saying how it reads images, since the file records none::

    {"sha256": "<sha256 of the model file, 64 hex digits>",   # required: see "Trust" below
     "image_size": 224,                                       # required: the side the model reads
     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],  # required: per-channel normalisation
     "role": "old",                                           # optional: the space it fills (default old)
     "normalized": false}                                     # optional: its rows are L2-normalised

An image is read as a uint8 RGB array (grey for one-channel ``mean``), its shorter side resized to ``image_size``,
centre-cropped to ``image_size`` x ``image_size``, scaled to ``[0, 1]`` and normalised with ``mean`` / ``std``.

Formats (told apart by content, not by the file name):

* TorchScript (``torch.jit.script(model).save(path)`` or ``torch.jit.trace``), read with :func:`torch.jit.load`.
* ``torch.export`` (``torch.export.save(torch.export.export(model, (x,), dynamic_shapes=...), "m.pt2")``), read with
  :func:`torch.export.load`. Export the batch dimension as dynamic (``{"x": {0: torch.export.Dim("batch")}}``):
  the last batch of a folder is smaller than the others.
* Anything else is refused, in particular a pickled ``nn.Module`` (``torch.save(model)``): unpickling it runs
  whatever Python code the file names.

Trust. Neither format can be loaded safely from an untrusted source, and this module does not pretend otherwise:

* TorchScript: :func:`torch.jit.load` reads the archive with TorchScript's own C++ deserializer, not Python's pickle,
  so loading imports and runs no Python code. But the archive *is* a program: its TorchScript code runs when the model
  is called, and may use any registered torch operator (reading files, e.g. ``torch.from_file``, included);
  PyTorch's SECURITY.md says to treat a TorchScript model "the same way as locally executable code from an unknown
  source", and its maintainers answer crashes of the deserializer on crafted files with "trusted inputs only".
* ``torch.export``: the graph is stored as JSON of torch operators and the weights as raw bytes, but
  :func:`torch.export.load` unpickles some parts with Python's pickle (``weights_only=False`` for weights and
  constants saved as pickles, and as a fallback when a weights-only read fails), which can run any Python code.
  :func:`load_external` therefore runs it with every ``torch.load`` forced to ``weights_only=True`` and the pickle
  path for constants refused: a file that needs them is an error, not code that runs.

So an external model is loaded only when its sidecar pins the file's sha256: writing that sidecar is the statement
that this exact file is trusted as a program is, and a file swapped or altered after that is refused before any of
it is read by torch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

FORMATS = ("torchscript", "export")
_ROLE = re.compile(r"^[A-Za-z0-9_+\-]+$")


class ExternalModelError(ValueError):
    """An external model file, or its sidecar, that cannot be used."""


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar of an external model file: ``<file>.json`` (``model.pt2`` -> ``model.pt2.json``)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def sha256(path: str | Path) -> str:
    """The full sha256 (64 hex digits) of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def archive_format(path: str | Path | io.BytesIO) -> str | None:
    """``torchscript`` or ``export`` when ``path`` (a file, or its bytes) is such an archive (read from its zip
    directory, nothing loaded); None for anything else (a Lightning checkpoint, a pickled module, not a zip file)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            pt2 = [n for n in names if n.split("/", 1)[-1] == "archive_format"]
            if pt2 and z.read(pt2[0]).strip() == b"pt2":
                return "export"
    except (zipfile.BadZipFile, OSError, KeyError):
        return None
    if any("/code/__torch__/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names):
        return "torchscript"
    return None


def is_external(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript or ``torch.export`` archive (see :func:`archive_format`)."""
    return Path(path).is_file() and archive_format(path) is not None


def read_sidecar(path: str | Path, content_sha256: str | None = None) -> dict[str, Any]:
    """The checked sidecar of the external model ``path``: ``sha256``, ``image_size``, ``mean``, ``std``,
    ``in_channels`` (the length of ``mean``), ``role``, ``normalized``.

    ``content_sha256``: the sha256 of the bytes that will be loaded (default: of the file now).

    Raises:
        ExternalModelError: The sidecar is missing or malformed, or the file's sha256 is not the pinned one.
    """
    path, side = Path(path), sidecar_path(path)
    if not side.is_file():
        raise ExternalModelError(
            f"{path} is an external model (TorchScript or torch.export) without its sidecar {side}. Write it: "
            '{"sha256": "<sha256sum of the file>", "image_size": N, "mean": [...], "std": [...], "role": "old"}; '
            "the file records neither how it reads images nor whether it can be trusted (see "
            "fct_lightning.models.external)")
    try:
        spec = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExternalModelError(f"the sidecar {side} is not readable JSON ({err})") from err
    if not isinstance(spec, dict):
        raise ExternalModelError(f"the sidecar {side} must hold a JSON object, not {type(spec).__name__}")
    unknown = sorted(set(spec) - {"sha256", "image_size", "mean", "std", "role", "normalized"})
    if unknown:
        raise ExternalModelError(f"the sidecar {side} has unknown keys {unknown}; allowed: sha256, image_size, "
                                 "mean, std, role, normalized")
    want = spec.get("sha256")
    if not isinstance(want, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", want):
        raise ExternalModelError(
            f"the sidecar {side} must pin the model file's content: \"sha256\": the 64 hex digits of "
            f"`sha256sum {path.name}` (got {want!r}). The file is a program (see fct_lightning.models.external); "
            "pinning it says you trust exactly this file")
    got = content_sha256 or sha256(path)
    if got != want.lower():
        raise ExternalModelError(f"{path} has sha256 {got}, but its sidecar {side} pins {want.lower()}: the file "
                                 "changed since it was trusted; it was not loaded. Restore it, or check the new file "
                                 "and pin its sha256")
    size = spec.get("image_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ExternalModelError(f"the sidecar {side}: image_size={size!r} must be a positive integer (the side in "
                                 "pixels the model reads)")
    mean, std = spec.get("mean"), spec.get("std")
    for key, value in (("mean", mean), ("std", std)):
        if not isinstance(value, list) or len(value) not in (1, 3) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise ExternalModelError(f"the sidecar {side}: {key}={value!r} must be a list of 1 (grey) or 3 (RGB) "
                                     "numbers, the per-channel normalisation of images scaled to [0, 1]")
    if len(mean) != len(std) or not all(s > 0 for s in std):
        raise ExternalModelError(f"the sidecar {side}: mean {mean} and std {std} must have one value per channel, "
                                 "std positive")
    role = spec.get("role", "old")
    if not isinstance(role, str) or not _ROLE.match(role):
        raise ExternalModelError(f"the sidecar {side}: role={role!r} must be a space name (letters, digits, _ + -), "
                                 "e.g. old")
    normalized = spec.get("normalized", False)
    if not isinstance(normalized, bool):
        raise ExternalModelError(f"the sidecar {side}: normalized={normalized!r} must be true or false")
    return {"sha256": got, "image_size": size, "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "in_channels": len(mean), "role": role, "normalized": normalized}


@contextlib.contextmanager
def _no_pickle() -> Iterator[None]:
    """Inside: every ``torch.load`` is weights-only and the ``torch.export`` archive reader's own ``pickle.loads``
    is refused, so that :func:`torch.export.load` rebuilds tensors and torch's allowlisted types only."""
    original = torch.load

    @functools.wraps(original)
    def weights_only(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return original(*args, **kwargs)

    class _Refuse:
        @staticmethod
        def loads(*args: Any, **kwargs: Any) -> Any:
            raise ExternalModelError("the torch.export file holds a pickled constant; unpickling could run code, "
                                     "so it is not loaded (export the model with tensor constants only)")

        def __getattr__(self, name: str) -> Any:
            import pickle

            return getattr(pickle, name)

    package = None
    with contextlib.suppress(ImportError):
        from torch.export.pt2_archive import _package as package
    saved = getattr(package, "pickle", None)
    torch.load = weights_only
    if saved is not None:
        package.pickle = _Refuse()
    try:
        yield
    finally:
        torch.load = original
        if saved is not None:
            package.pickle = saved


def _load_module(path: Path, data: bytes, kind: str) -> nn.Module:
    try:
        if kind == "torchscript":
            return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
        with _no_pickle():
            return torch.export.load(io.BytesIO(data)).module()
    except ExternalModelError:
        raise
    except Exception as err:  # a damaged archive or one needing a newer torch: one message naming the file
        raise ExternalModelError(f"the {kind} file {path} cannot be loaded ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0] if str(err) else ''}); it is damaged, was written by "
                                 "an incompatible torch version, or needs unpickling (refused)") from err


class ExternalModel(nn.Module):
    """A loaded external model: ``[B, C, H, W]`` normalised float images -> ``[B, embedding_dim]`` float embeddings.

    It offers what ``fct-embed`` asks of a stage (``query_embed``, ``gallery_embed``, ``embedding_dim``); build it
    with :func:`load_external`.

    Args:
        net: The TorchScript module or the ``torch.export`` program's module.
        spec: The checked sidecar (:func:`read_sidecar`).
        kind: ``torchscript`` or ``export``.
    """

    def __init__(self, net: nn.Module, spec: dict[str, Any], kind: str) -> None:
        super().__init__()
        self.net, self.spec, self.kind = net, spec, kind
        probe = self._run(torch.zeros(2, spec["in_channels"], spec["image_size"], spec["image_size"]))
        self.embedding_dim = int(probe.shape[1])

    def _run(self, images: Tensor) -> Tensor:
        try:
            out = self.net(images)
        except Exception as err:
            hint = (" Export it with a dynamic batch dimension (dynamic_shapes={'x': {0: torch.export.Dim('batch')}})."
                    if self.kind == "export" else "")
            raise ExternalModelError(f"the external {self.kind} model failed on a batch {tuple(images.shape)} "
                                     f"({type(err).__name__}: {err}).{hint}") from err
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != images.shape[0]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ExternalModelError(f"the external {self.kind} model must return one [B, d] tensor for a batch of "
                                     f"B images; it returned {got} for {tuple(images.shape)}")
        return out.float()

    def train(self, mode: bool = True) -> ExternalModel:
        """Only this wrapper's flag: the external model runs as it was saved (a ``torch.export`` module refuses
        ``train()``/``eval()``; a TorchScript module is put in eval mode once, when loaded). Export models in eval
        mode (BatchNorm statistics, no dropout)."""
        self.training = mode
        return self

    def forward(self, images: Tensor) -> Tensor:
        return self._run(images)

    def query_embed(self, images: Tensor) -> Tensor:
        return self._run(images)

    def gallery_embed(self, images: Tensor) -> Tensor:
        return self._run(images)


def load_external(path: str | Path) -> ExternalModel:
    """The external model at ``path``, in eval mode, after its sidecar was checked and its sha256 matched (see the
    module docstring for what loading and running it can execute).

    Raises:
        ExternalModelError: Not a TorchScript / ``torch.export`` archive (a pickled module, a state dict), a missing
            or wrong sidecar, a changed file, an archive that cannot be loaded, or a model whose output is not
            ``[B, d]``.
    """
    path = Path(path)
    if not path.is_file():
        raise ExternalModelError(f"the external model {path} does not exist")
    data = path.read_bytes()  # hashed and loaded from the same bytes: a file changed in between is not loaded
    kind = archive_format(io.BytesIO(data))
    if kind is None:
        raise ExternalModelError(
            f"{path} is neither a TorchScript nor a torch.export archive. A pickled nn.Module (torch.save(model)) is "
            "refused: unpickling it would run the Python code it names. Save the model with "
            "torch.jit.script(model).save(PATH) or torch.export.save(torch.export.export(model, (x,)), PATH)")
    spec = read_sidecar(path, hashlib.sha256(data).hexdigest())  # before torch reads any of it
    model = ExternalModel(_load_module(path, data, kind), spec, kind)
    return model.eval()


__all__ = ["FORMATS", "ExternalModel", "ExternalModelError", "archive_format", "is_external", "load_external",
           "read_sidecar", "sha256", "sidecar_path"]
