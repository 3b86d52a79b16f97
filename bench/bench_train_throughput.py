"""Training throughput of the 32 px recipe: Lightning end to end vs hand-written loops, same process.

    python bench/bench_train_throughput.py --data_root data                       # GPU: bf16 + channels_last
    python bench/bench_train_throughput.py --data_root data --batch 512 1024 --profile --sync_check
    python bench/bench_train_throughput.py --data_root data --compile   # + rows with the backbone compiled
    python bench/bench_train_throughput.py --data_root data --batch 1024 512 --repeat 2 --skip_hand  # the spread
    python bench/bench_train_throughput.py --data_root data --device cpu --steps 20 --batch 128
    python bench/bench_train_throughput.py --data_root data --device cpu --backbone convnet --width 4 --batch 2 \
        --steps 300          # host time per step: the loop's own overhead when the network costs nothing

Rows, from the bare network to the whole stack, so the gap between them says where time goes:

* ``plain``: the network (our EmbeddingNet + classifier) trained on one synthetic batch already on the device,
  in fp32 and (CUDA) in bf16 + channels_last;
* ``module``: our in-memory CIFAR-10 loader (real images, crop + flip on tensors) and ``NewModel.training_step``
  (label checks, loss check, accuracy, epoch totals) in a hand-written loop: no Lightning;
* ``lightning``: the same model and datamodule under a Lightning Trainer (bf16-mixed and ``ChannelsLast`` on CUDA),
  measured by the ``Throughput`` callback (which also reports the share of time spent between batches).

``--profile`` (CUDA) adds, per row, the GPU's busy time per step (sum of kernel times, torch.profiler) next to
the wall time per step: a row whose wall time is well above its busy time is bound by the host, not the GPU.
``--sync_check`` (CUDA) runs a few Lightning steps with ``torch.cuda.set_sync_debug_mode("warn")`` and lists
every place that made the host wait for the device, with how often it did.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import time
import traceback
import warnings
from collections.abc import Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from fct_lightning.callbacks import ChannelsLast, Compile, Throughput
from fct_lightning.data import DATAMODULES
from fct_lightning.models.backbones import EmbeddingNet, make_classifier
from fct_lightning.stages import NewModel


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sgd(params, device: torch.device) -> torch.optim.Optimizer:
    # the optimiser the stages configure: fused SGD on CUDA (see RetrievalStage.configure_optimizers)
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                           fused=device.type == "cuda")


def timed(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per call of ``step`` after a warm-up (cuDNN autotuning, allocator)."""
    for _ in range(max(3, steps // 10)):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / steps


def kernel_seconds(prof) -> float:
    """Seconds of device kernels in a finished ``torch.profiler`` run.

    Only the device-side events count: an operator's own row also carries the time of the kernels it launched,
    so summing every row would count each kernel twice.
    """
    total = 0.0
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = getattr(event, "self_device_time_total", None)
        total += getattr(event, "self_cuda_time_total", 0.0) if t is None else t
    return total / 1e6


def busy_per_step(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """GPU busy seconds per call of ``step``: the sum of its kernels' device times (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    return kernel_seconds(prof) / steps


def plain_step(device: torch.device, batch: int, bf16: bool, backbone: str, width: int,
               compiled: bool = False) -> Callable[[], None]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(EmbeddingNet(backbone, 128, 3, cifar_stem=True, width=width),
                              make_classifier(128, 10)).to(device)
    if compiled:
        net[0].compile()  # what the Compile callback does to a stage's `net`
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(10, (batch,), device=device)
    if bf16:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = _sgd(net.parameters(), device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step() -> None:
        with ctx:
            loss = F.cross_entropy(net(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _model(backbone: str, width: int) -> NewModel:
    return NewModel(classes=list(range(10)), in_channels=3, backbone=backbone, cifar_stem=True, width=width,
                    dataset="cifar10")


def module_step(device: torch.device, batch: int, bf16: bool, root: str, backbone: str,
                width: int) -> Callable[[], None]:
    """Our loader and ``NewModel.training_step`` in a hand-written loop (what Lightning runs, minus Lightning)."""
    dm = DATAMODULES["cifar10"](root=root, batch_size=batch, in_memory_gpu=True, num_workers=0)
    dm.setup("fit")
    loader = dm.train_dataloader()
    model = _model(backbone, width).to(device)
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = _sgd(model.trainable_parameters(), device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    batches = iter(())

    def step() -> None:
        nonlocal batches
        try:
            images, labels, index = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, labels, index = next(batches)
        opt.zero_grad(set_to_none=True)
        with ctx:
            loss = model.training_step((images, labels, index), 0)
        loss.backward()
        opt.step()

    return step


def lightning_run(device: torch.device, batch: int, steps: int, bf16: bool, root: str, backbone: str, width: int,
                  profiler: contextlib.AbstractContextManager | None = None,
                  compiled: bool = False) -> dict[str, float]:
    dm = DATAMODULES["cifar10"](root=root, batch_size=batch, in_memory_gpu=True, num_workers=0)
    meter = Throughput(skip=min(10, steps // 4))
    callbacks: list[pl.Callback] = [meter] + ([ChannelsLast()] if bf16 else []) + ([Compile()] if compiled else [])
    trainer = pl.Trainer(accelerator=device.type, devices=1, precision="bf16-mixed" if bf16 else "32-true",
                         max_epochs=2, limit_train_batches=steps, limit_val_batches=0, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, benchmark=device.type == "cuda", callbacks=callbacks)
    with profiler or contextlib.nullcontext():
        trainer.fit(_model(backbone, width), datamodule=dm)
    return meter.history[-1]


def lightning_busy(device: torch.device, batch: int, steps: int, bf16: bool, root: str, backbone: str,
                   width: int) -> float:
    """GPU busy seconds per Lightning training step (2 epochs of ``steps``; the set-up's kernels are excluded)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    # record the second epoch only: skip the first epoch's steps (set-up, cuDNN autotuning)
    sched = schedule(wait=steps - 1, warmup=1, active=steps, repeat=1)

    class Stepper(pl.Callback):
        def on_train_batch_end(self, *args) -> None:
            prof.step()

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=sched)
    dm = DATAMODULES["cifar10"](root=root, batch_size=batch, in_memory_gpu=True, num_workers=0)
    trainer = pl.Trainer(accelerator=device.type, devices=1, precision="bf16-mixed" if bf16 else "32-true",
                         max_epochs=2, limit_train_batches=steps, limit_val_batches=0, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, benchmark=True,
                         callbacks=[Stepper()] + ([ChannelsLast()] if bf16 else []))
    with prof:
        trainer.fit(_model(backbone, width), datamodule=dm)
    return kernel_seconds(prof) / steps


def sync_sites(device: torch.device, batch: int, steps: int, bf16: bool, root: str, backbone: str,
               width: int) -> collections.Counter:
    """Where a Lightning training run makes the host wait for the GPU, and how often (sync debug mode)."""
    sites: collections.Counter = collections.Counter()
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        if "synchronizing" not in str(message):
            return
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "fct_lightning" in f.filename or "pytorch_lightning" in f.filename
                  or "torchmetrics" in f.filename]
        where = " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in reversed(frames[-3:]))
        sites[where or f"{filename}:{lineno}"] += 1

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            lightning_run(device, batch, steps, bf16, root, backbone, width)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = shown
    return sites


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_root", default="data")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[512])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--backbone", default="resnet18", help="resnet18 (the recipe) or convnet (host overhead)")
    p.add_argument("--width", type=int, default=32, help="width of the convnet backbone")
    p.add_argument("--profile", action="store_true", help="CUDA: GPU busy time per step of every row")
    p.add_argument("--sync_check", action="store_true", help="CUDA: list the host-device syncs of a Lightning run")
    p.add_argument("--repeat", type=int, default=0,
                   help="then this many more (plain bf16, Lightning) pairs per batch size: the spread of the ratio")
    p.add_argument("--skip_hand", action="store_true", help="leave out the hand-written loop row")
    p.add_argument("--compile", action="store_true",
                   help="add rows with the backbone compiled (torch.compile; the Compile callback under Lightning)")
    args = p.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    # every row autotunes its convolutions: a Trainer(benchmark=True) sets this for the whole process and leaves it
    # set, so without this line the rows before the first Lightning run would be measured untuned
    torch.backends.cudnn.benchmark = cuda
    name = torch.cuda.get_device_name(dev) if cuda else f"CPU, {torch.get_num_threads()} threads"
    net = "ResNet-18 (CIFAR stem)" if args.backbone == "resnet18" else f"{args.backbone} width {args.width}"
    for batch in args.batch:
        rows: list[tuple[str, float, float | None]] = []  # (run, s/step, GPU busy s/step)

        def add(run: str, step: Callable[[], None], rows: list = rows) -> None:
            wall = timed(step, args.steps, dev)
            busy = busy_per_step(step, min(args.steps, 20), dev) if args.profile and cuda else None
            rows.append((run, wall, busy))

        add("plain PyTorch fp32 (synthetic batch on the device)",
            plain_step(dev, batch, False, args.backbone, args.width))
        if cuda:
            add("plain PyTorch bf16 + channels_last", plain_step(dev, batch, True, args.backbone, args.width))
        mode = "bf16 + channels_last" if cuda else "fp32"
        if not args.skip_hand:
            add(f"our loader + NewModel.training_step, hand-written loop ({mode})",
                module_step(dev, batch, cuda, args.data_root, args.backbone, args.width))
        e2e = lightning_run(dev, batch, args.steps, cuda, args.data_root, args.backbone, args.width)
        busy = (lightning_busy(dev, batch, min(args.steps, 20), cuda, args.data_root, args.backbone, args.width)
                if args.profile and cuda else None)
        rows.append((f"Lightning end to end ({mode}, in-memory data + augmentation)", batch / e2e["items_per_s"],
                     busy))
        if args.compile:
            add(f"plain PyTorch {mode}, backbone compiled",
                plain_step(dev, batch, cuda, args.backbone, args.width, compiled=True))
            comp = lightning_run(dev, batch, args.steps, cuda, args.data_root, args.backbone, args.width,
                                 compiled=True)
            rows.append((f"Lightning end to end ({mode}) + Compile callback", batch / comp["items_per_s"], None))
        ref = rows[1][1] if cuda else rows[0][1]
        print(f"\n{net}, 32 px, batch {batch}, {name}")
        print("| run | images/s | ms / step | GPU busy ms / step | vs "
              + ("plain bf16" if cuda else "plain fp32") + " |")
        print("|---|---|---|---|---|")
        for run, wall, busy in rows:
            b = "" if busy is None else f"{1000 * busy:.2f}"
            print(f"| {run} | {batch / wall:,.0f} | {1000 * wall:.2f} | {b} | {ref / wall:.2f}x |")
        light = batch / e2e["items_per_s"]
        print(f"Lightning: share of training time between batches {100 * e2e['data_wait_share']:.1f}%", end="")
        if args.skip_hand:
            print()
        else:
            hand = rows[2 if cuda else 1][1]
            print(f"; Lightning - hand loop = {1000 * (light - hand):+.2f} ms / step")
        if args.repeat:
            pairs = [(ref, light)]
            for _ in range(args.repeat):
                plain = timed(plain_step(dev, batch, cuda, args.backbone, args.width), args.steps, dev)
                run = lightning_run(dev, batch, args.steps, cuda, args.data_root, args.backbone, args.width)
                pairs.append((plain, batch / run["items_per_s"]))
            print(f"repeats, batch {batch}: plain {'bf16' if cuda else 'fp32'} images/s, Lightning images/s, ratio")
            for plain, run in pairs:
                print(f"  {batch / plain:,.0f}  {batch / run:,.0f}  {plain / run:.2f}")
            ips = sorted(batch / run for _, run in pairs)
            print(f"  Lightning median {ips[len(ips) // 2]:,.0f} images/s, min {ips[0]:,.0f}, max {ips[-1]:,.0f}")
        if args.sync_check and cuda:
            sites = sync_sites(dev, batch, 30, cuda, args.data_root, args.backbone, args.width)
            print(f"host waits for the GPU in 2 epochs of 30 steps: {sum(sites.values())}")
            for where, count in sites.most_common(12):
                print(f"  {count:4d}  {where}")


if __name__ == "__main__":
    main()
