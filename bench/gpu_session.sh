#!/usr/bin/env bash
# The GPU checks of one device session, in order of value; every step logs to $OUT and goes on after a failure.
#   1. retrieval evaluation at N = 50,000 on the GPU       -> $OUT/retrieval.txt
#   2. ResNet-18 32 px throughput: Lightning vs plain loop -> $OUT/throughput.txt
#   3. the CIFAR-10 chain at full length via `make cifar10` -> $OUT/chain.log, report, results, timings
#   4. h training per epoch, cached vs on the fly          -> $OUT/h_cached_vs_onthefly.txt
# Expects the wheels of ../shared/wheels/gpu-py312 in .whl/ and the CIFAR-10 archive in .gpu/.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$OUT/pip.txt" 2>&1
export PYTHONPATH=$PWD/src:/tmp/site:${PYTHONPATH:-} WANDB_MODE=disabled PYTHONUNBUFFERED=1
mkdir -p /tmp/data && tar xzf .gpu/cifar10-jpeg.tar.gz -C /tmp/data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, pytorch_lightning as pl; print(torch.__version__, pl.__version__)" >> "$OUT/gpu.txt" 2>&1
stamp() { echo "$(date +%s) $1" >> "$OUT/timeline.txt"; }

stamp retrieval
timeout 60 python3 bench/bench_retrieval.py --device cuda --sizes 50000 --classes 100 --ref-n 0 > "$OUT/retrieval.txt" 2>&1
stamp throughput
timeout 120 python3 bench/bench_train_throughput.py --data_root /tmp/data --steps 60 > "$OUT/throughput.txt" 2>&1
stamp chain
PYM="python3 -m fct_lightning"
if command -v make > /dev/null; then
  ( time make cifar10 SETUP= FIT="$PYM.cli" EVAL="$PYM.evaluation --no_wandb" REPORT="$PYM.report --no_wandb" \
      TRAINER=gpu-fast DATA_ROOT=/tmp/data ARTIFACTS=/tmp/art EXTRA="--trainer.enable_progress_bar false --trainer.check_val_every_n_epoch 5" ) \
      > "$OUT/chain.log" 2>&1
else  # the same commands `make cifar10` runs
  F="$PYM.cli --dataset cifar10 --artifacts /tmp/art --seed 0 --data.root /tmp/data --config configs/trainer/gpu-fast.yaml --trainer.enable_progress_bar false --trainer.check_val_every_n_epoch 5"
  ( time { for args in "--stage old" "--stage side_info" "--stage new" "--stage transformation" \
        "--stage transformation --model.use_side_info false" "--stage transformation --model.uncertainty true" "--stage bct"; do
        echo "== $args"; $F $args || break; done
      $PYM.evaluation --no_wandb --dataset cifar10 --artifacts /tmp/art --data_root /tmp/data \
        --backfill random,uncertainty,distance --out /tmp/art/cifar10/results/seed0.json
      $PYM.report --no_wandb --dataset cifar10 --artifacts /tmp/art; } ) > "$OUT/chain.log" 2>&1
fi
stamp chain-done
mkdir -p "$OUT/art" && cp -r /tmp/art/cifar10/report.* /tmp/art/cifar10/backfill.png /tmp/art/cifar10/results "$OUT/art/" 2>/dev/null
for s in old side_info new transformation transformation_noside fastfill bct; do
  cp /tmp/art/cifar10/$s/config.yaml "$OUT/art/$s.config.yaml" 2>/dev/null
  find /tmp/art -path "*$s*" -name metrics.csv -exec cp {} "$OUT/art/$s.metrics.csv" \; 2>/dev/null
done
stamp h-bench
timeout 150 python3 bench/bench_transformation.py --artifacts /tmp/art --dataset cifar10 --data_root /tmp/data \
  --epochs 3 --batch_size 512 > "$OUT/h_cached_vs_onthefly.txt" 2>&1
stamp end
