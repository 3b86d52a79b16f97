"""Cached features: equal to on-the-fly features for the same augmentation seed; batching and caching rules."""

from __future__ import annotations

import time

import pytest
import torch

from fct_lightning.data import DATAMODULES
from fct_lightning.data.features import (
    FeatureBatches,
    build_or_load,
    cache_key,
    embed_views,
    merge_parts,
)
from fct_lightning.models.backbones import EmbeddingNet


def _models():
    torch.manual_seed(0)
    return {name: EmbeddingNet("convnet", 16, in_channels=1, width=4).eval() for name in ("old", "side", "new")}


def test_cached_features_equal_on_the_fly_features():
    dm = DATAMODULES["digits"](batch_size=64)
    models = _models()
    classes = [0, 1, 2]
    cached = embed_views(dm, models, split="train", classes=classes, views=2, seed=7, device=torch.device("cpu"),
                         dtype=torch.float32)
    ds = dm.dataset("train", classes, augment=True, seed=7)
    assert cached["old"].shape == (2, len(ds), 16)
    for view in (0, 1):
        ds.set_epoch(view)
        for i in (0, 5, len(ds) - 1):
            image, label, index = ds[i]
            with torch.no_grad():
                for name, model in models.items():
                    torch.testing.assert_close(cached[name][view, i], model(image[None])[0], rtol=1e-5, atol=1e-5)
            assert cached["labels"][i] == label and cached["index"][i] == index
    assert not torch.equal(cached["old"][0], cached["old"][1])  # views differ


@pytest.mark.parametrize("in_memory", [False, True])
def test_rank_shares_merge_to_the_single_process_cache(in_memory):
    dm = DATAMODULES["digits"](batch_size=64, in_memory_gpu=in_memory)
    models = _models()
    kw = {"split": "train", "classes": [3], "views": 1, "seed": 1, "device": torch.device("cpu"),
          "dtype": torch.float32}
    whole = embed_views(dm, models, **kw)
    parts = [embed_views(dm, models, rank=r, world_size=3, **kw) for r in range(3)]
    merged = merge_parts(parts)
    for key in whole:
        torch.testing.assert_close(merged[key], whole[key])


def test_cache_is_reused_and_keyed_by_content(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"index": torch.arange(3), "labels": torch.zeros(3, dtype=torch.long), "old": torch.ones(1, 3, 2)}

    key = cache_key(old="a", new="b")
    build_or_load(tmp_path, key, compute)
    build_or_load(tmp_path, key, compute)
    assert len(calls) == 1
    assert cache_key(old="a", new="c") != key  # a retrained model gets a new cache


def test_feature_batches_shard_and_reproduce():
    n = 11
    feats = {"old": torch.randn(2, n, 4), "new": torch.randn(2, n, 4), "labels": torch.arange(n)}
    seen = []
    for rank in range(2):
        fb = FeatureBatches(feats, batch_size=4, rank=rank, world_size=2, seed=3)
        fb.set_epoch(1)
        batches = list(fb)
        assert len(batches) == len(fb)
        seen += [b["index"] for b in batches]
        again = list(FeatureBatches(feats, batch_size=4, rank=rank, world_size=2, seed=3).__iter__())
        assert len(again) == len(batches)
    idx = torch.cat(seen)
    assert len(idx) == 12 and set(idx.tolist()) == set(range(n))  # padded to equal shares, covers every item
    b = batches[0]
    assert b["old"].dtype == torch.float32 and b["old"].shape[1] == 4


def test_concurrent_jobs_build_one_cache(tmp_path):
    """Two processes asking for the same cache at once (``make -j``): one computes, the other waits and loads."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys, time, torch
        from fct_lightning.data.features import build_or_load
        def compute():
            open({str(tmp_path)!r} + "/computed-" + sys.argv[1], "w").close()
            time.sleep(1.0)
            return {{"index": torch.arange(4), "labels": torch.zeros(4, dtype=torch.long), "old": torch.ones(2, 4, 3)}}
        out = build_or_load({str(tmp_path / "cache")!r}, "k", compute)
        assert out["old"].shape == (2, 4, 3)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)]) for i in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert len(list(tmp_path.glob("computed-*"))) == 1
    assert not list((tmp_path / "cache" / "k").glob("*.tmp"))


class _Scaled(torch.nn.Module):
    """A frozen model whose embeddings are another's times ``scale`` (e.g. beyond float16's range)."""

    def __init__(self, inner: torch.nn.Module, scale: float) -> None:
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale


def test_features_beyond_float16_are_cached_in_float32(caplog):
    dm = DATAMODULES["digits"](batch_size=64)
    models = _models()
    kw = {"split": "train", "classes": [0, 1], "views": 2, "seed": 3, "device": torch.device("cpu")}
    ref = embed_views(dm, models, dtype=torch.float32, **kw)
    models["side"] = _Scaled(models["side"], 1e6)
    with caplog.at_level("WARNING"):
        got = embed_views(dm, models, dtype=torch.float16, **kw)
    assert "side-info model's features reach" in caplog.text and "float32" in caplog.text
    assert got["side"].dtype == torch.float32 and got["old"].dtype == got["new"].dtype == torch.float16
    torch.testing.assert_close(got["side"], ref["side"] * 1e6)  # every view, none turned into inf
    # under DDP a rank may widen a model's features and another not: the merge takes the wider dtype
    parts = [embed_views(dm, _models(), dtype=torch.float16, rank=r, world_size=2, **kw) for r in range(2)]
    parts[1]["side"] = parts[1]["side"].float() * 1e6
    merged = merge_parts(parts)
    assert merged["side"].dtype == torch.float32 and torch.isfinite(merged["side"]).all()
    assert merged["side"].abs().max() > 65504


def test_non_finite_frozen_features_are_a_clear_error():
    dm = DATAMODULES["digits"](batch_size=64)
    models = _models()
    models["new"] = _Scaled(models["new"], float("nan"))
    with pytest.raises(ValueError, match="the frozen new model gives NaN or infinite embeddings .* retrain that stage"):
        embed_views(dm, models, split="train", classes=[0], views=1, seed=0, device=torch.device("cpu"))


def test_feature_batches_leave_out_a_one_item_tail():
    """A rank's last batch of one item is left out (h's BatchNorm1d cannot train on it); a bigger tail stays."""
    feats = {"old": torch.randn(1, 9, 4), "new": torch.randn(1, 9, 4), "labels": torch.arange(9)}
    fb = FeatureBatches(feats, batch_size=4)  # 9 = 2 * 4 + 1
    assert [len(b["labels"]) for b in fb] == [4, 4] and len(fb) == 2
    shards = [FeatureBatches(feats, batch_size=4, rank=r, world_size=2) for r in range(2)]  # 5 per rank
    assert [[len(b["labels"]) for b in s] for s in shards] == [[4], [4]] and len(shards[0]) == 1
    assert [len(b["labels"]) for b in FeatureBatches(feats, batch_size=3)] == [3, 3, 3]
    assert [len(b["labels"]) for b in FeatureBatches(feats, batch_size=5)] == [5, 4]


def test_two_ddp_jobs_building_one_cache_take_turns(tmp_path):
    """Two 2-rank jobs (threads here, each rank its own lock file handle) want the same cache at once: one job
    computes and merges its parts, the other waits for it and loads the result; no part is read or deleted by
    the wrong job."""
    import threading

    n, world = 10, 2
    calls: list[str] = []
    results: dict[str, dict] = {}
    barriers = {job: threading.Barrier(world) for job in "ab"}

    def compute(job, rank):
        def run():
            calls.append(job)
            idx = torch.arange(rank, n, world)
            time.sleep(0.2)  # long enough for the other job to try the lock meanwhile
            return {"index": idx, "labels": idx % 3, "old": idx.float().view(1, -1, 1).expand(1, -1, 4).clone()}
        return run

    def rank_main(job, rank):
        results[f"{job}{rank}"] = build_or_load(tmp_path, "k", compute(job, rank), rank=rank, world_size=world,
                                                barrier=barriers[job].wait)

    threads = [threading.Thread(target=rank_main, args=(job, r)) for job in "ab" for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 4 and len(calls) == world and len(set(calls)) == 1  # one job computed, on both ranks
    for res in results.values():
        assert torch.equal(res["index"], torch.arange(n)) and torch.equal(res["old"][0, :, 0], torch.arange(n).float())
    assert not list(tmp_path.glob("k/part-*"))
