"""Training throughput of the 32 px ResNet-18 recipe: Lightning end to end vs plain PyTorch, same process.

    python bench/bench_train_throughput.py --data_root data            # GPU: bf16 + channels_last
    python bench/bench_train_throughput.py --data_root data --device cpu --steps 20 --batch 128

Plain PyTorch references: the same network (our EmbeddingNet, CIFAR stem, + classifier) trained on images
already on the device, no augmentation, in fp32 and in bf16 + channels_last. The end-to-end run is
``NewModel`` + ``CIFAR10DataModule`` under a Lightning Trainer: real CIFAR-10 images, augmentation
(in-memory path on the GPU when ``--in_memory``), bf16-mixed and channels_last, measured by the
``Throughput`` callback (which also reports the share of time spent waiting for data).
"""

from __future__ import annotations

import argparse
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from fct_lightning.callbacks import ChannelsLast, Throughput
from fct_lightning.data import DATAMODULES
from fct_lightning.models.backbones import EmbeddingNet, make_classifier
from fct_lightning.stages import NewModel


def plain(device: torch.device, batch: int, steps: int, bf16: bool) -> float:
    torch.manual_seed(0)
    net = torch.nn.Sequential(EmbeddingNet("resnet18", 128, 3, cifar_stem=True), make_classifier(128, 10)).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(10, (batch,), device=device)
    if bf16:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    # the optimiser the stages configure: fused SGD on CUDA (see RetrievalStage.configure_optimizers)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          fused=device.type == "cuda")
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step() -> None:
        with ctx:
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(max(3, steps // 10)):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def lightning(device: torch.device, batch: int, steps: int, bf16: bool, root: str, in_memory: bool,
              workers: int) -> dict[str, float]:
    dm = DATAMODULES["cifar10"](root=root, batch_size=batch, in_memory_gpu=in_memory,
                                num_workers=0 if in_memory else workers)
    model = NewModel(classes=list(range(10)), in_channels=3, backbone="resnet18", cifar_stem=True, dataset="cifar10")
    meter = Throughput(skip=min(10, steps // 4))
    callbacks: list[pl.Callback] = [meter] + ([ChannelsLast()] if bf16 else [])
    trainer = pl.Trainer(accelerator=device.type, devices=1, precision="bf16-mixed" if bf16 else "32-true",
                         max_epochs=2, limit_train_batches=steps, limit_val_batches=0, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, benchmark=device.type == "cuda", callbacks=callbacks)
    trainer.fit(model, datamodule=dm)
    return meter.history[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_root", default="data")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no_in_memory", action="store_true", help="use the DataLoader path instead of the in-memory one")
    args = p.parse_args()
    dev = torch.device(args.device)
    bf16 = dev.type == "cuda"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    ref32 = plain(dev, args.batch, args.steps, bf16=False)
    ref16 = plain(dev, args.batch, args.steps, bf16=True) if bf16 else None
    e2e = lightning(dev, args.batch, args.steps, bf16, args.data_root, not args.no_in_memory, args.workers)
    print(f"ResNet-18 (CIFAR stem), 32 px, batch {args.batch}, {name}")
    print("| run | images/s | vs plain fp32 |")
    print("|---|---|---|")
    print(f"| plain PyTorch fp32 (synthetic batch on device) | {ref32:,.0f} | 1.00x |")
    if ref16:
        print(f"| plain PyTorch bf16 + channels_last | {ref16:,.0f} | {ref16 / ref32:.2f}x |")
    mode = ("bf16 + channels_last, " if bf16 else "fp32, ") + ("in-memory data" if not args.no_in_memory else "DataLoader")
    print(f"| Lightning end to end ({mode}, real images + augmentation) | {e2e['items_per_s']:,.0f} | "
          f"{e2e['items_per_s'] / ref32:.2f}x |")
    if ref16:
        print(f"Lightning end to end / plain bf16: {e2e['items_per_s'] / ref16:.2f}")
    print(f"share of training time waiting for data: {100 * e2e['data_wait_share']:.1f}%")


if __name__ == "__main__":
    main()
