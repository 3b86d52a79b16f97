#!/usr/bin/env bash
# The folder dataset's two data paths on one GPU, same recipe (configs/folder: ResNet-50, 224 px, bf16-mixed):
# per-item decoding in DataLoader workers vs the split decoded once into GPU memory (--data.in_memory_gpu true).
# A tree of real images is made from the CIFAR-10 JPEG archive (PER_CLASS train and VAL_PER_CLASS val images per
# class, linked). Stage `old`, EPOCHS epochs; images/s and the share of time between batches from the Throughput
# callback, per epoch, in $OUT/folder_<mode>.csv; the runs' output in $OUT/folder.txt.
# Expects .gpu/cifar10-jpeg.tar.gz (and, where jsonargparse is missing, the wheels in .whl/).
# Dry run on CPU: OUT=/tmp/o ACCEL=cpu PRECISION=32-true PER_CLASS=20 VAL_PER_CLASS=5 EPOCHS=1 \
#   EXTRA="--data.image_size 64 --model.backbone convnet" bash bench/gpu_folder.sh
set -u
OUT=${OUT:-/tmp/out}
PER_CLASS=${PER_CLASS:-500}
VAL_PER_CLASS=${VAL_PER_CLASS:-100}
EPOCHS=${EPOCHS:-3}
ACCEL=${ACCEL:-gpu}
PRECISION=${PRECISION:-bf16-mixed}
WORKERS=${WORKERS:-$(nproc)}
EXTRA=${EXTRA:-}
DATA=${DATA:-/tmp/data}
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import jsonargparse" 2> /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > /dev/null 2>&1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} WANDB_MODE=disabled PYTHONUNBUFFERED=1
if [ ! -d $DATA/cifar10 ]; then mkdir -p $DATA && tar xzf .gpu/cifar10-jpeg.tar.gz -C $DATA; fi
rm -rf /tmp/fold /tmp/fold_art
for split in train:$PER_CLASS:train val:$VAL_PER_CLASS:test; do
  IFS=: read -r name count src <<< "$split"
  for d in $DATA/cifar10/$src/*/; do
    c=$(basename "$d"); mkdir -p /tmp/fold/$name/$c
    ls "$d" | sort | head -n "$count" | while read -r f; do ln -s "$d$f" /tmp/fold/$name/$c/$f; done
  done
done
echo "tree: $(find /tmp/fold/train -name '*.jpg' | wc -l) train, $(find /tmp/fold/val -name '*.jpg' | wc -l) val images;" \
  "nproc $(nproc), workers $WORKERS" | tee -a "$OUT/folder.txt"
for mode in true false; do  # the in-memory path first: it is the one never measured on a GPU
  t=$(date +%s)
  python3 -m fct_lightning.commands.fit --stage old --dataset folder --data.root /tmp/fold --artifacts /tmp/fold_art/$mode \
    --trainer.accelerator $ACCEL --trainer.precision $PRECISION --trainer.max_epochs $EPOCHS \
    --trainer.enable_progress_bar false --trainer.callbacks+=fct_lightning.callbacks.Throughput \
    --trainer.logger pytorch_lightning.loggers.CSVLogger --trainer.logger.save_dir /tmp/fold_art/$mode/logs \
    --data.in_memory_gpu $mode --data.num_workers $([ $mode = true ] && echo 0 || echo "$WORKERS") $EXTRA \
    > /tmp/fold_$mode.log 2>&1
  echo "== in_memory_gpu=$mode rc=$? wall $(($(date +%s) - t)) s" | tee -a "$OUT/folder.txt"
  grep -h "done in\|last epoch\|Error\|error" /tmp/fold_$mode.log | tail -4 | tee -a "$OUT/folder.txt"
  f=$(find /tmp/fold_art/$mode -name metrics.csv | head -1)
  [ -n "$f" ] && cp "$f" "$OUT/folder_$mode.csv" && python3 - "$f" <<'PY' | tee -a "$OUT/folder.txt"
import csv, sys
for r in csv.DictReader(open(sys.argv[1])):
    if r.get("perf/train_items_per_s"):
        print(f"  epoch {r['epoch']}: {float(r['perf/train_items_per_s']):,.0f} images/s, "
              f"between batches {100 * float(r['perf/data_wait_share']):.1f} %")
PY
done
