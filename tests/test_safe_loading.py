"""Files a user hands in are read without running code: a crafted checkpoint, feature cache or CIFAR pickle is
refused by every command that reads one, with one clear message, and the code in it never runs.

The crafted files carry a payload whose unpickling calls :func:`_leave_marker`, which writes a marker file: the
marker existing afterwards would mean the file's code ran.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fct_lightning.data import CIFAR10DataModule
from fct_lightning.data.cifar import _unpickle
from fct_lightning.data.features import CacheError, build_or_load
from fct_lightning.stages.checkpoints import CheckpointError, read_checkpoint
from tests.commands import embed_main, eval_main, fit_main, transform_main
from tests.data.fakes import make_cifar_pickles

TINY = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "false", "--trainer.enable_model_summary", "false"]
REPO = Path(__file__).resolve().parents[1]


def _leave_marker(path: str) -> str:
    """What a crafted file runs when unpickled: harmless, but visible."""
    Path(path).write_text("the file's code ran")
    return "pwned"


PAYLOAD = f"{_leave_marker.__module__}._leave_marker"  # what the refusals name


class Payload:
    def __init__(self, marker: Path, call=_leave_marker, *args: str) -> None:
        self.call, self.args = call, args or (str(marker),)

    def __reduce__(self):
        return self.call, self.args


def craft_checkpoint(path: Path, marker: Path, stage: str = "old") -> Path:
    """A file shaped like a stage checkpoint (state_dict, fct metadata, hyperparameters) with a payload inside."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "epoch": 0, "global_step": 2, "pytorch-lightning_version": "2.6.0",
        "state_dict": {"net.stem.weight": torch.zeros(8, 1, 3, 3)},
        "fct": {"stage": stage, "dataset": "digits", "embedding_dim": 128, "classes": [0, 1, 2, 3, 4]},
        "hyper_parameters": {"width": 8, "dataset": "digits", "note": Payload(marker)},
    }, path)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    m = tmp_path / "MARKER"
    yield m
    assert not m.exists(), "the crafted file's code ran"


def refused(match_path: Path) -> str:
    """The refusal message's pattern (a regex) for the crafted file ``match_path``."""
    return (rf"{match_path}.* asks for a Python object that is not allowed in a checkpoint \({PAYLOAD}\).*"
            r"was not loaded.*Use a checkpoint written by fct-fit")


def test_the_crafted_checkpoint_really_runs_code_when_unpickled(tmp_path):
    """Without weights-only loading, the crafted file runs its payload (what the tests below show is refused)."""
    m = tmp_path / "M"
    torch.load(craft_checkpoint(tmp_path / "evil.ckpt", m), weights_only=False)
    assert m.read_text() == "the file's code ran"


def test_read_checkpoint_refuses_and_names_what_the_file_asks_for(tmp_path, marker):
    bad = craft_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(CheckpointError, match=refused(bad)):
        read_checkpoint(bad, "old")
    shell = tmp_path / "shell.ckpt"  # the classic: os.system (pickled as the module it lives in, posix on Linux)
    torch.save({"state_dict": {}, "fct": {"stage": "old", "x": Payload(marker, os.system, "true")}}, shell)
    with pytest.raises(CheckpointError, match=rf"asks for a Python object .*\({os.system.__module__}\.system\)"):
        read_checkpoint(shell, "old")
    legacy = tmp_path / "legacy.ckpt"  # torch's pre-zip format goes through the same restricted unpickler
    torch.save({"state_dict": {}, "x": Payload(marker)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=refused(legacy)):
        read_checkpoint(legacy, "old")


def test_plain_types_load_and_the_allowance_stays_in_its_context(tmp_path):
    """A checkpoint of a stage built from Python holds the Path objects it was given: read; torch's own
    weights-only load outside read_checkpoint still refuses them (nothing was allowed globally)."""
    path = tmp_path / "py.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "datamodule_hyper_parameters": {"root": Path("/data")}}, path)
    assert read_checkpoint(path, "old")["datamodule_hyper_parameters"]["root"] == Path("/data")
    with pytest.raises(pickle.UnpicklingError, match="PosixPath"):
        torch.load(path, weights_only=True)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")  # a damaged file keeps its own message
    with pytest.raises(CheckpointError, match="cannot be read .* the file is corrupt or not a PyTorch checkpoint"):
        read_checkpoint(tmp_path / "junk.ckpt", "old")


def test_fct_fit_refuses_a_crafted_resume_checkpoint(tmp_path, marker):
    bad = craft_checkpoint(tmp_path / "elsewhere" / "last.ckpt", marker)
    with pytest.raises(SystemExit, match="fct-fit: the old checkpoint " + refused(bad)):
        fit_main(["--stage", "old", "--artifacts", str(tmp_path / "art"), *TINY, "--model.width", "8",
                  "--ckpt_path", str(bad)])
    assert not (tmp_path / "art" / "digits" / "old" / "last.ckpt").exists()  # nothing trained


@pytest.mark.parametrize("stage", ["bct", "transformation"])
def test_fct_fit_refuses_a_crafted_upstream_model(tmp_path, marker, stage):
    bad = craft_checkpoint(tmp_path / "old.ckpt", marker)
    extra = ["--model.width", "8"] if stage == "bct" else ["--model.mixer_width", "64", "--model.cache_views", "2"]
    with pytest.raises(SystemExit, match="fct-fit: the old checkpoint " + refused(bad)):
        fit_main(["--stage", stage, "--artifacts", str(tmp_path / "art"), *TINY, *extra,
                  "--model.old_checkpoint", str(bad)])


def test_fct_eval_refuses_a_crafted_stage_checkpoint(tmp_path, marker):
    bad = craft_checkpoint(tmp_path / "art" / "digits" / "old" / "best.ckpt", marker)
    with pytest.raises(SystemExit, match="fct-eval: the old checkpoint " + refused(bad)):
        eval_main(["--artifacts", str(tmp_path / "art"), "--no_wandb"])


def test_fct_embed_and_fct_transform_refuse_a_crafted_checkpoint(tmp_path, marker):
    bad = craft_checkpoint(tmp_path / "best.ckpt", marker, stage="transformation")
    with pytest.raises(SystemExit, match="fct-embed: the embedding checkpoint " + refused(bad)):
        embed_main(["--checkpoint", str(bad), "--out", str(tmp_path / "q.npy")])
    old = tmp_path / "old.npy"
    np.save(old, np.zeros((4, 128), dtype=np.float32))
    with pytest.raises(SystemExit, match="fct-transform: the transformation checkpoint " + refused(bad)):
        transform_main(["--checkpoint", str(bad), "--old", str(old), "--out", str(tmp_path / "o.npy")])
    assert not (tmp_path / "q.npy").exists() and not (tmp_path / "o.npy").exists()


def test_the_console_script_refuses_it_too(tmp_path, marker):
    """As a serving machine runs it: the installed fct-transform, in a fresh process that could import the payload."""
    bad = craft_checkpoint(tmp_path / "h.ckpt", marker, stage="transformation")
    old = tmp_path / "old.npy"
    np.save(old, np.zeros((4, 128), dtype=np.float32))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("FCT_DEBUG", None)
    done = subprocess.run([str(Path(sys.executable).parent / "fct-transform"), "--checkpoint", str(bad), "--old",
                           str(old), "--out", str(tmp_path / "o.npy")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-2]  # the message, then the FCT_DEBUG hint
    assert last.startswith("fct-transform: the transformation checkpoint") and PAYLOAD in last, done.stderr


def test_a_crafted_feature_cache_is_refused(tmp_path, marker):
    folder = tmp_path / "cache" / "key"
    folder.mkdir(parents=True)
    torch.save({"index": torch.arange(3), "labels": torch.zeros(3, dtype=torch.long), "old": Payload(marker)},
               folder / "features.pt")
    with pytest.raises(CacheError, match=rf"(?s)the feature cache {folder / 'features.pt'} .*{PAYLOAD}.*delete "
                                         rf"{folder} and rerun"):
        build_or_load(tmp_path / "cache", "key", compute=lambda: pytest.fail("the cache exists: not rebuilt"))


def test_a_feature_cache_of_tensors_still_loads(tmp_path):
    feats = {"index": torch.arange(3), "labels": torch.tensor([0, 1, 1]), "old": torch.randn(2, 3, 4).half()}
    built = build_or_load(tmp_path, "key", compute=lambda: feats)
    again = build_or_load(tmp_path, "key", compute=lambda: pytest.fail("cached: not rebuilt"))
    assert all(torch.equal(built[k], feats[k]) and torch.equal(again[k], feats[k]) for k in feats)


def _py2_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR batch file as torchvision's were made (Python 2 cPickle, protocol 2, numpy 1): the same opcodes and
    globals (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``; strings as str)."""
    def text(b: bytes) -> bytes:  # SHORT_BINSTRING / BINSTRING: Python 2's str
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def num(n: int) -> bytes:  # BININT1 / BININT2 / BININT
        if n < 256:
            return b"K" + bytes([n])
        return b"M" + struct.pack("<H", n) if n < 65536 else b"J" + struct.pack("<i", n)

    dtype = (b"cnumpy\ndtype\n" + text(b"u1") + num(0) + num(1) + b"\x87R"
             + b"(" + num(3) + text(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff" + num(0) + b"tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + num(0) + b"\x85" + text(b"b") + b"\x87R"
             + b"(" + num(1) + num(data.shape[0]) + num(data.shape[1]) + b"\x86" + dtype + b"\x89"
             + text(data.tobytes()) + b"tb")
    return (b"\x80\x02}(" + text(b"batch_label") + text(b"testing batch 1 of 1") + text(b"labels")
            + b"](" + b"".join(num(y) for y in labels) + b"e" + text(b"data") + array + b"u.")


def test_cifar_files_load_as_torchvision_wrote_them(tmp_path):
    out = make_cifar_pickles(tmp_path, 10, train_per_batch=4, num_test=4)  # numpy 2 + Python 3, protocol 2
    fake = _unpickle(out / "test_batch")
    data = np.arange(6 * 3072, dtype=np.int64).reshape(6, 3072).astype(np.uint8)
    (out / "test_batch").write_bytes(_py2_batch(data, [3, 1, 4, 1, 5, 9]))
    with open(out / "test_batch", "rb") as fh:  # the hand-made file is a pickle as Python reads it
        assert np.array_equal(pickle.load(fh, encoding="latin1")["data"], data)
    src = CIFAR10DataModule(root=str(tmp_path)).source("test")
    assert np.array_equal(src.images.numpy().reshape(6, -1), data) and src.targets.tolist() == [3, 1, 4, 1, 5, 9]
    assert fake["data"].shape == (4, 3072) and fake["labels"] == [0, 1, 2, 3]


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_crafted_cifar_pickle_is_refused(tmp_path, marker, protocol):
    out = make_cifar_pickles(tmp_path, 10, train_per_batch=4, num_test=4)
    batch = {"batch_label": Payload(marker), "labels": [0, 1], "data": np.zeros((2, 3072), np.uint8)}
    (out / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
    with pytest.raises(ValueError, match=rf"{out / 'test_batch'} asks for the Python object {PAYLOAD}.*not loaded"):
        CIFAR10DataModule(root=str(tmp_path)).source("test")
    (out / "test_batch").write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00utf_7\x86R.")
    with pytest.raises(ValueError, match=r"asks for _codecs.encode with 'utf_7'"):  # only latin-1, as pickle writes
        _unpickle(out / "test_batch")
