#!/usr/bin/env bash
# The GPU measurements of issue 19 (stores), as one device call of about 9 minutes:
#   1. fct-transform over a 4M-row store (128-d old + side-info, float16 on disk), bf16 and fp32, float16 and float32
#      output, against h's forward on device batches and the 5M rows/s target   -> $OUT/transform.txt
#   2. fct-embed --store images/s against a plain torch.no_grad() loop, ResNet-18 at 32 px -> $OUT/embed18.txt
#   3. the same, ResNet-50 at 224 px, bf16                                        -> $OUT/embed50.txt
# Each step has its own timeout, so a slow one cannot eat the others' time. FAISS on the GPU is not measured: the
# carried wheels hold faiss-cpu only.
# Use (device tool): copy ../shared/wheels/gpu-py312/*.whl into .whl/ (see ../shared/wheels/README.md), then
#   run(command="bash bench/gpu_stores.sh", carry=[".whl"], timeout_s=600)
# Dry run on a CPU: OUT=/tmp/o DEVICE=cpu ROWS=20000 IMAGES=200 bash bench/gpu_stores.sh
set -u
OUT=${OUT:-/tmp/out}
DEVICE=${DEVICE:-cuda}
ROWS=${ROWS:-4000000}
IMAGES=${IMAGES:-100000}
mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || exit 1
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} WANDB_MODE=disabled
PY=${PY:-python3}
{ date; nproc; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1; } > "$OUT/machine.txt"
step() {  # step NAME SECONDS COMMAND...: run with a timeout, log its wall time
  local name=$1 limit=$2 t=$SECONDS
  shift 2
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  echo "$name: rc $? in $((SECONDS - t)) s" | tee -a "$OUT/summary.txt"
}
step transform 270 $PY bench/bench_store_transform.py device --device "$DEVICE" --store /tmp/gpu-store --rows "$ROWS" \
  --batch_size 65536 --seconds 5
# float32 on disk: the bench's models are fitted for one batch, and their eval-mode BatchNorm (running statistics
# barely moved) can send a deep trunk's features past float16's range
step embed18 140 $PY bench/bench_store_embed.py --preset resnet18-32 --images "$IMAGES" --num_workers 8 --device "$DEVICE" \
  --dtype float32
step embed50 140 $PY bench/bench_store_embed.py --preset resnet50-224 --images $((IMAGES / 5)) --num_workers 16 \
  --device "$DEVICE" --dtype float32 $([ "$DEVICE" = cpu ] || echo --precision bf16-mixed)
rm -rf /tmp/gpu-store
