#!/usr/bin/env bash
# The GPU checks of detkd in one script of at most 8 minutes (CI never needs it):
#
#   benchmarks/device_check.sh [--dry] [--out DIR]
#
# On a CUDA machine: the digits bench pair (Faster R-CNN ResNet-34 -> ResNet-18) at 128 px: train the
# teacher, distil the student (GID, AMP) with the float32 and with the float16 live teacher (the mAP
# check behind distill.teacher_dtype), with the teacher cache on; eval, predict and export the distilled
# student; a torchrun launch with the NCCL backend; PGM prototype selection at N = 1M; and the step cost
# of benchmarks/bench_teacher.py on the GPU. Every stage has its own time limit and is checked (its
# output files exist, the metrics are finite); the figures go to DIR/device_check.md with the device
# name, the exit status is 1 if a stage failed.
#
# --dry: the same stages on the CPU at toy sizes (64 px, 16 images, 1 epoch, gloo, N = 20k), to check
# the script itself on a machine without a GPU (about 3-5 minutes on 2 cores).
# DIR defaults to $OUT (the device tool's output folder) or runs/device_check.
set -uo pipefail

DRY=0
DIR="${OUT:-runs/device_check}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry) DRY=1 ;;
    --out) DIR="$2"; shift ;;
    *) echo "device_check.sh: unknown argument $1 (use --dry, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
PY="${PYTHON:-python}"
if [ "$DRY" = 1 ]; then
  DEVICE=cpu; SIZE=64; IMAGES=16; VAL=8; T_EPOCHS=1; S_EPOCHS=1; WORKERS=0; AMP=false; BACKEND=gloo
  PGM_N=20000; STEP_ARGS="--steps 1 --archs retinanet --methods fgfi --no-variants --threads 1"
else
  DEVICE=cuda; SIZE=128; IMAGES=500; VAL=200; T_EPOCHS=6; S_EPOCHS=3; WORKERS=4; AMP=true; BACKEND=nccl
  PGM_N=1000000; STEP_ARGS="--device cuda --steps 6 --methods fgfi gid kd crosskd"
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "device_check.sh: no CUDA device (torch.cuda.is_available() is False); use --dry on a CPU" >&2
    exit 2
  fi
fi

REPORT="$DIR/device_check.md"
BUDGET=${DEVICE_CHECK_BUDGET:-470}  # seconds for all stages (the device machine allows 8-10 minutes a command)
FAILED=0
T_ALL=$(date +%s)
DEVICE_NAME=$("$PY" -c "
import sys, torch
if '$DEVICE' == 'cuda':
    p = torch.cuda.get_device_properties(0)
    name = f'{p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s), CUDA {torch.version.cuda}'
else:
    sys.path.insert(0, 'benchmarks')
    from machine import cpu_name
    name = cpu_name()
print(f'{name}; torch {torch.__version__}')
")
{
  echo "# device_check $(date -u '+%Y-%m-%d %H:%M UTC') $( [ "$DRY" = 1 ] && echo '(--dry: CPU, toy sizes)')"
  echo
  echo "device: $DEVICE_NAME; commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo "| stage | status | seconds | result |"
  echo "|---|---|---|---|"
} > "$REPORT"

# stage NAME LIMIT_S CHECK_COMMAND -- COMMAND...: run COMMAND under a time limit, then CHECK_COMMAND, whose
# stdout is the result column; a non-zero exit of either marks the stage failed
stage() {
  local name="$1" limit="$2" check="$3"; shift 4
  local t0 t1 rc res status left
  left=$(( BUDGET - ($(date +%s) - T_ALL) ))  # the whole script stays within BUDGET seconds
  if [ "$left" -lt 15 ]; then
    echo "| $name | SKIPPED | 0 | the script's $BUDGET s were used up |" >> "$REPORT"; FAILED=1; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit} s)" >&2
  t0=$(date +%s)
  timeout "$limit" "$@" > "$DIR/$name.log" 2>&1
  rc=$?
  t1=$(date +%s)
  if [ $rc -eq 0 ]; then
    res=$(eval "$check" 2>>"$DIR/$name.log"); rc=$?
  else
    res="exit $rc$( [ $rc -eq 124 ] && echo ' (time limit)'); see $name.log: $(tail -1 "$DIR/$name.log" | cut -c1-160)"
  fi
  if [ $rc -eq 0 ]; then status=ok; else status=FAILED; FAILED=1; fi
  res=${res//$'\n'/; }
  echo "| $name | $status | $((t1 - t0)) | ${res//|//} |" >> "$REPORT"
  echo "   $status: $res" >&2
}

# the final metrics of a run folder, or a failure if they are missing / not finite
metrics() {
  "$PY" - "$1" <<'EOF'
import json, math, sys
m = json.load(open(sys.argv[1] + "/final.json"))
assert math.isfinite(m["mAP"]), m
print(f"mAP {m['mAP']:.4f} AP50 {m['AP50']:.4f}")
EOF
}

eval_check() {
  "$PY" -c 'import json, sys; m = json.load(open(sys.argv[1])); print("mAP %.4f" % m["mAP"])' "$DIR/eval.json"
}
predict_check() {
  "$PY" -c 'import json, sys; print("%d detections" % len(json.load(open(sys.argv[1]))))' "$DIR/predict/detections.json"
}

DATA=(data.root="$DIR/data" data.digits.image_size=$SIZE data.digits.train_images=$IMAGES
      data.digits.val_images=$VAL data.workers=$WORKERS model.min_size=$SIZE model.max_size=$SIZE
      train.device=$DEVICE train.amp=$AMP train.eval_every=0)
B="$REPO/configs/bench/digits"
for dtype in float32 float16; do
  cat > "$DIR/distil_$dtype.yaml" <<EOF
# written by benchmarks/device_check.sh: the digits bench pair at $SIZE px, GID, teacher in $dtype
base: $B/faster_rcnn_student.yaml
output_dir: $DIR/distil_$dtype
train: {epochs: $S_EPOCHS}
distill:
  teacher_config: $B/faster_rcnn_teacher.yaml
  teacher: {min_size: $SIZE, max_size: $SIZE}
  teacher_checkpoint: $DIR/teacher/last.pt
  methods: [gid]
  balance: 1.0
  teacher_dtype: $( [ "$dtype" = float16 ] && [ "$DRY" = 1 ] && echo bfloat16 || echo "$dtype" )
  cache_dir: $DIR/teacher_cache
EOF
done

rm -rf "$DIR/teacher" "$DIR/student" "$DIR/distil_float32" "$DIR/distil_float16" "$DIR/predict" "$DIR/export"
stage teacher 90 "metrics $DIR/teacher" -- \
  "$PY" -m detkd.cli train "$B/faster_rcnn_teacher.yaml" "${DATA[@]}" train.epochs=$T_EPOCHS \
  output_dir="$DIR/teacher" --quiet
stage student 40 "metrics $DIR/student" -- \
  "$PY" -m detkd.cli train "$B/faster_rcnn_student.yaml" "${DATA[@]}" train.epochs=$S_EPOCHS \
  output_dir="$DIR/student" --quiet
stage distil_float32 45 "metrics $DIR/distil_float32" -- \
  "$PY" -m detkd.cli distill "$DIR/distil_float32.yaml" "${DATA[@]}" --quiet
stage distil_float16 45 "metrics $DIR/distil_float16; grep -o 'teacher cache: [0-9]* of [0-9]* images reused ([0-9]*%)' $DIR/distil_float16.log | tail -1" -- \
  "$PY" -m detkd.cli distill "$DIR/distil_float16.yaml" "${DATA[@]}" --quiet
stage eval 20 eval_check -- \
  "$PY" -m detkd.cli eval "$DIR/distil_float16.yaml" "${DATA[@]}" --checkpoint "$DIR/distil_float16/last.pt" \
  --json "$DIR/eval.json" --quiet
stage predict 20 predict_check -- \
  "$PY" -m detkd.cli predict "$DIR/distil_float16" "$DIR/data/val" --out "$DIR/predict" --device $DEVICE --quiet
stage export 20 "ls $DIR/export | tr '\n' ' '" -- \
  "$PY" -m detkd.cli export "$DIR/distil_float16" "$DIR/export" --checkpoint last.pt --torchscript

NPROC=$( [ "$DRY" = 1 ] && echo 2 || "$PY" -c "import torch; print(max(1, min(2, torch.cuda.device_count())))")
cat > "$DIR/collective.py" <<EOF
# torchrun check: join the process group ($BACKEND), all-reduce, barrier
import os, torch, torch.distributed as dist
dist.init_process_group("$BACKEND")
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if "$BACKEND" == "nccl" else torch.device("cpu")
x = torch.full((1024,), float(rank + 1), device=device)
dist.all_reduce(x)
assert float(x[0]) == world * (world + 1) / 2, float(x[0])
dist.barrier()
if rank == 0:
    print(f"RESULT $BACKEND all_reduce ok, world size {world}")
dist.destroy_process_group()
EOF
stage torchrun 30 "grep -h RESULT $DIR/torchrun.log | sed 's/RESULT //'" -- \
  "$PY" -m torch.distributed.run --standalone --nproc_per_node=$NPROC "$DIR/collective.py"
if [ "$NPROC" -ge 2 ] && [ "$DRY" = 0 ]; then  # detkd's own DDP path needs 2 GPUs (NCCL refuses a shared one)
  stage torchrun_train 45 "metrics $DIR/ddp" -- \
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m detkd.cli train \
    "$B/faster_rcnn_student.yaml" "${DATA[@]}" train.epochs=1 output_dir="$DIR/ddp" --quiet
fi

stage pgm 40 "grep -h RESULT $DIR/pgm.log | sed 's/RESULT //'" -- "$PY" - <<EOF
import time, torch
from detkd.distill.pgm import select_prototypes
n, d, device = $PGM_N, 256, "$DEVICE"
g = torch.Generator().manual_seed(0)
ft = torch.randn(n, d, generator=g)
fs = ft @ (torch.randn(d, d, generator=g) / d**0.5) + 0.3 * torch.randn(n, d, generator=g)
ft, fs = ft.to(device), fs.to(device)
select_prototypes(ft[:1000], fs[:1000], k=2)  # kernels loaded
times = []
for _ in range(3):
    if device == "cuda": torch.cuda.synchronize()
    t0 = time.perf_counter()
    picks = select_prototypes(ft, fs, k=10, lam=10.0).indices.tolist()
    if device == "cuda": torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
peak = f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device == "cuda" else ""
print(f"RESULT PGM N = {n}, D = {d}, K = 10: {min(times):.3f} s (best of 3){peak}")
EOF

stage step_cost 90 "grep -E '^(faster_rcnn|retinanet)$|^(student|teacher|fgfi|gid|kd|crosskd)' $DIR/step_cost.log | tr -s ' ' | paste -sd ';' | cut -c1-900" -- \
  "$PY" benchmarks/bench_teacher.py $STEP_ARGS

{
  echo
  echo "total $(( $(date +%s) - T_ALL )) s; float32 / float16 teacher mAP: the distil_float32 / distil_float16 rows"
  echo "(--dry: bfloat16, CPU autocast); logs: $DIR/*.log"
} >> "$REPORT"
cat "$REPORT"
exit $FAILED
