#!/usr/bin/env bash
# GPU benchmark in one call (a few minutes on an H100/H200 machine whose working tree is a
# copy of this repository): inference tiles/s from a store for efficientnet_lite0, resnet50
# and the bundled cell detector brca-cells-lite0 as a share of each model's throughput on
# device tensors; GPU JPEG decode (torchvision.io.decode_jpeg on the device) against CPU
# decode workers; slides per hour end to end (`tmequant run`) for a ~15,000-tile slide.
#
#   bash scripts/bench_gpu.sh                      # CUDA; results in $OUT (default ./gpu_out)
#   bash scripts/bench_gpu.sh --device cpu --quick # the same code paths on a CPU, small slide
#
# Writes $OUT/bench_gpu.json, $OUT/bench_gpu.txt (the table), $OUT/make_slide.json,
# $OUT/env.txt and $OUT/bench_gpu.log. Scratch (slide ~1.5 GB, store ~2 GB) goes to
# $BENCH_WORK (default: a temporary folder under /tmp, removed at the end unless KEEP=1),
# never under $OUT. The slide's pixels come from ../shared/testdata (or $TMEQUANT_TESTDATA)
# when present, else from rendered phantoms (make_bench_slide.py --source auto).
# Time limits: slide 300 s, benchmark parts 480 s (the whole run stays under 10 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
QUICK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK="--quick"; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (use --device cuda|cpu, --quick)" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-./gpu_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/bench_gpu.log") 2>&1
echo "[bench_gpu.sh] $(date -u +%FT%TZ) device=$DEVICE quick=${QUICK:-no} out=$OUT"

# 1. the package (offline: no dependency resolution unless it is needed)
if ! "$PY" -c "import tmequant, torch, torchvision, timm, zarr, tifffile, imagecodecs, openslide" 2>/dev/null; then
  echo "[bench_gpu.sh] installing the package (pip install -e .)"
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . || "$PY" -m pip install -q -e . || {
    echo "[bench_gpu.sh] cannot install tmequant" >&2; exit 3; }
fi
{
  "$PY" -c "import torch, torchvision, tmequant, platform; print('python', platform.python_version()); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('torchvision', torchvision.__version__); print('tmequant', tmequant.__version__); [print('gpu', torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]"
  echo "nproc $(nproc)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if [ "$DEVICE" != cpu ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "[bench_gpu.sh] no CUDA device visible to torch: use --device cpu" >&2; exit 4
fi

# 2. the slide: ~15,000 kept tiles (44 x 33 blocks of 2048 px at 0.25 um/px); small with --quick
WORK=${BENCH_WORK:-$(mktemp -d /tmp/tmq-bench-gpu-XXXXXX)}
mkdir -p "$WORK"
if [ -n "$QUICK" ]; then W=4096; H=4096; else W=90112; H=67584; fi
SLIDE="$WORK/bench_${W}x${H}.svs"
if [ ! -s "$SLIDE" ]; then
  echo "[bench_gpu.sh] writing a ${W} x ${H} px slide"
  timeout 300 "$PY" scripts/make_bench_slide.py --out "$SLIDE" --width "$W" --height "$H" \
    --workers "$(nproc)" > "$OUT/make_slide.json" || { echo "[bench_gpu.sh] slide failed" >&2; exit 5; }
  cat "$OUT/make_slide.json"
fi

# 3. the benchmark parts (tile, infer, decode, e2e), each recorded even if another fails
THREADS=""
if [ "$DEVICE" = cpu ]; then THREADS="--threads $(( $(nproc) < 2 ? 1 : 2 ))"; fi
timeout 480 "$PY" scripts/bench_gpu.py --slide "$SLIDE" --out "$OUT" --work "$WORK/work" \
  --device "$DEVICE" $QUICK $THREADS
rc=$?
[ "$rc" = 124 ] && echo "[bench_gpu.sh] bench_gpu.py ran past 480 s: partial results in $OUT/bench_gpu.json"
if [ "${KEEP:-0}" != 1 ] && [ -z "${BENCH_WORK:-}" ]; then rm -rf "$WORK"; fi
echo "[bench_gpu.sh] done rc=$rc; results in $OUT"
exit $rc
