#!/usr/bin/env bash
# The GPU checks of one device session, in order of value, each guarded by what is left of a time budget.
#   0. set-up: carried wheels, CIFAR-10 extracted and decoded once (timed apart from the chain)
#   1. the CIFAR-10 chain at full length, stages in parallel where the     -> $OUT/chain.txt, $OUT/report.md
#      dependencies allow (`make -j cifar10`, or the same graph in bash)
#   2. ResNet-18 32 px throughput: Lightning end to end vs plain loops     -> $OUT/throughput.txt
#      (batch 1024 and 512, two more (plain, Lightning) pairs each, GPU busy time per step), then with the
#      backbone compiled
#                                                                          -> $OUT/throughput_compiled.txt
#   3. h training per epoch, cached vs on the fly, same process            -> $OUT/h.txt
#   4. backfilling curves in one pass vs one evaluate() per state, N=10k   -> $OUT/backfill.txt
#   5. the in-memory augmentation pipelines, batch 512                     -> $OUT/augment.txt
#   6. h trained on the fly at full length (accuracy vs the cached run)    -> $OUT/onthefly.txt
# Everything else (results json, configs, metrics) ends in $OUT/res.tgz; the timeline in $OUT/summary.txt.
# Expects the wheels of ../shared/wheels/gpu-py312 in .whl/ and the CIFAR-10 archive in .gpu/.
# Dry run on CPU (the laptop recipe: ResNet-18 feature caches take hours on a CPU):
#   OUT=/tmp/o TRAINER=cpu RECIPE=cifar10_cpu BUDGET=1500 QUICK="--trainer.max_epochs 1 --trainer.check_val_every_n_epoch 1
#   --trainer.limit_train_batches 2 --trainer.limit_val_batches 2" bash bench/gpu_session.sh
set -u
T0=$(date +%s)
BUDGET=${BUDGET:-570}  # seconds this script may use in all
OUT=${OUT:-/tmp/out}
TRAINER=${TRAINER:-gpu-fast}
RECIPE=${RECIPE:-}  # a configs/recipes folder (used by the make path)
QUICK=${QUICK:-}
JOBS=${JOBS:-8}  # the dependency graph runs at most 5 stages at once; the H200 machine showed nproc = 2
ART=/tmp/art
export DATA=${DATA:-/tmp/data}
rm -rf $ART /tmp/otf
RES=/tmp/res
mkdir -p "$OUT" "$RES"
left() { echo $((BUDGET - ($(date +%s) - T0))); }
stamp() { echo "t=$(($(date +%s) - T0))s $*" | tee -a "$OUT/summary.txt"; }

if [ -d .whl ] && ! python3 -c "import jsonargparse" 2> /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$RES/pip.txt" 2>&1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} WANDB_MODE=disabled PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
if [ ! -d $DATA/cifar10 ]; then mkdir -p $DATA && tar xzf .gpu/cifar10-jpeg.tar.gz -C $DATA; fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)"
  nproc; } >> "$OUT/summary.txt" 2>&1
stamp "decode CIFAR-10 once (cached as .npy for every stage)"
python3 - >> "$OUT/summary.txt" 2>&1 <<'EOF'
import os, time
from fct_lightning.data import DATAMODULES
t = time.perf_counter()
dm = DATAMODULES["cifar10"](root=os.environ["DATA"])
dm.prepare_data()
dm.setup("fit")
print(f"decoded and cached in {time.perf_counter() - t:.1f} s")
EOF

stamp "chain start (left $(left) s)"
EXTRA="--trainer.enable_progress_bar false --trainer.check_val_every_n_epoch 5 $QUICK"
PYM="python3 -m fct_lightning"
CHAIN_T0=$(date +%s)
if command -v make > /dev/null; then
  timeout $(($(left) - 40)) make -j"$JOBS" -O cifar10 SETUP= FIT="$PYM.cli" EVAL="$PYM.evaluation --no_wandb" \
    REPORT="$PYM.report --no_wandb" TRAINER="$TRAINER" RECIPE="$RECIPE" DATA_ROOT=$DATA ARTIFACTS=$ART EXTRA="$EXTRA" \
    > "$OUT/chain.txt" 2>&1
  echo "make rc=$?" >> "$OUT/chain.txt"
else  # the graph `make -j cifar10` runs, written out
  F="$PYM.cli --dataset cifar10 --artifacts $ART --seed 0 --data.root $DATA --config configs/trainer/$TRAINER.yaml $EXTRA"
  job() { local name=$1; shift; $F "$@" > "$RES/$name.log" 2>&1; echo "== $name rc=$?" >> "$OUT/chain.txt"; cat "$RES/$name.log" >> "$OUT/chain.txt"; }
  job old --stage old & p_old=$!
  job side_info --stage side_info & p_side=$!
  job new --stage new & p_new=$!
  wait $p_old; job bct --stage bct & p_bct=$!
  wait $p_side $p_new
  job transformation --stage transformation &
  job transformation_noside --stage transformation --model.use_side_info false &
  job fastfill --stage transformation --model.uncertainty true &
  job fastfill_noside --stage transformation --model.uncertainty true --model.use_side_info false &
  wait
  $PYM.evaluation --no_wandb --dataset cifar10 --artifacts $ART --data_root $DATA \
    --backfill random,uncertainty,distance --out $ART/cifar10/results/seed0.json >> "$OUT/chain.txt" 2>&1
  $PYM.report --no_wandb --dataset cifar10 --artifacts $ART >> "$OUT/chain.txt" 2>&1
fi
stamp "chain done in $(($(date +%s) - CHAIN_T0)) s"
cp $ART/cifar10/report.md "$OUT/report.md" 2>/dev/null
grep -h "done in\|best val\|last epoch" "$OUT/chain.txt" >> "$OUT/summary.txt" 2>/dev/null

if [ "$TRAINER" = gpu-fast ] && [ "$(left)" -gt 90 ]; then
  stamp throughput
  # batch 1024 and 512, repeated (these runs vary by up to 20 % from one to the next); per row the GPU's busy time
  # (add --sync_check to list where a Lightning run waits for the GPU)
  timeout $(($(left) - 60 < 170 ? $(left) - 60 : 170)) python3 bench/bench_train_throughput.py --data_root $DATA \
    --steps 60 --batch 1024 512 --repeat 2 --profile >> "$OUT/throughput.txt" 2>&1
fi
if [ "$TRAINER" = gpu-fast ] && [ "$(left)" -gt 150 ]; then
  stamp "throughput, backbone compiled"  # needs a C compiler on the machine (Triton); the output says if not
  timeout $(($(left) - 60 < 150 ? $(left) - 60 : 150)) python3 bench/bench_train_throughput.py --data_root $DATA \
    --steps 60 --batch 512 --compile >> "$OUT/throughput_compiled.txt" 2>&1
fi
if [ "$TRAINER" = gpu-fast ] && [ "$(left)" -gt 100 ] && [ -f $ART/cifar10/new/best.ckpt ]; then
  stamp "h bench"
  timeout $(($(left) - 60)) python3 bench/bench_transformation.py --artifacts $ART --dataset cifar10 \
    --data_root $DATA --epochs 3 --batch_size 1024 > "$OUT/h.txt" 2>&1
fi
if [ "$(left)" -gt 100 ]; then
  stamp "backfill bench"
  timeout $(($(left) - 15 < 90 ? $(left) - 15 : 90)) python3 bench/bench_backfill.py --n 10000 > "$OUT/backfill.txt" 2>&1
fi
if [ "$(left)" -gt 40 ]; then
  stamp "augmentation bench"  # the in-memory pipelines, batch 512, on the GPU (seconds)
  timeout 30 python3 bench/bench_augment.py --device cuda --batch 512 > "$OUT/augment.txt" 2>&1
fi
if [ "$(left)" -gt 60 ] && [ -f $ART/cifar10/new/best.ckpt ]; then
  stamp "h on the fly, full length"
  timeout $(($(left) - 15)) $PYM.cli --stage transformation --dataset cifar10 --artifacts /tmp/otf --data.root $DATA \
    --config configs/trainer/$TRAINER.yaml $EXTRA --model.cached false \
    --model.old_checkpoint $ART/cifar10/old/best.ckpt --model.side_info_checkpoint $ART/cifar10/side_info/best.ckpt \
    --model.new_checkpoint $ART/cifar10/new/best.ckpt > "$OUT/onthefly.txt" 2>&1
  echo "rc=$?" >> "$OUT/onthefly.txt"
fi
stamp end
mkdir -p "$RES/art"
cp -r $ART/cifar10/report.* $ART/cifar10/backfill.png $ART/cifar10/results "$RES/art/" 2> /dev/null
for d in $ART/cifar10/* /tmp/otf/cifar10/*; do
  [ -f "$d/config.yaml" ] && cp "$d/config.yaml" "$RES/art/$(basename "$(dirname "$d")")-$(basename "$d").config.yaml"
done
find $ART /tmp/otf -name metrics.csv 2> /dev/null | while read -r f; do cp "$f" "$RES/art/$(echo "$f" | tr / _)"; done
tar czf "$OUT/res.tgz" -C "$RES" . 2> /dev/null
