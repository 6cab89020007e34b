#!/usr/bin/env bash
# The GPU run of mhd_fast in one call, at most about 9 minutes on one card:
#   1. the GPU tests (pytest -m gpu);
#   2. bench_ops.py on S3 and S4: triton against torch.compile and eager, GB/s against the
#      card's peak (its data sheet, else the measured copy);
#   3. bench_round.py: 1,024 clients mlp and cnn, batched against the per-client loop, and
#      16,384 mlp clients batched (synthetic data: digits has too few rows for them); 256 cnn
#      clients with --conv grouped (the GPU default) and loop side by side;
#   4. one table of the targets beside the figures (bench/gpu_summary.py).
# CSV files go to bench/results/gpu_*.csv (and are copied to $OUT when it is set). Each step has
# its own time limit, so that one slow step cannot take the others' time; a step that fails or
# runs out of time is reported and the next one runs.
#
#   bash bench/gpu.sh            # on a CUDA machine, from anywhere
#   bash bench/gpu.sh --smoke    # every step at tiny sizes on CPU (CSV in $TMPDIR): checks the script
#
# PYTHON picks the interpreter (default: python); MHD_DATA_DIR, when it holds Fashion-MNIST,
# adds 16,384 cnn clients.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
RES=bench/results
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
if [ "$SMOKE" = 1 ]; then
  DEV=cpu; PREFIX=smoke; RES=${TMPDIR:-/tmp}/mhd_fast_gpu_smoke  # figures of no interest: not kept
  OPS_ARGS="--shapes S1 --modes fwd,fwd_bwd --impls eager,fused --reps 1"
  SMALL=4; BIG=8; CONV=4; LOOP_ROUNDS=1; BIG_ROUNDS=1
  T_TEST=60; T_OPS=120; T_SMALL=300; T_BIG=120; T_CONV=120
else
  DEV=cuda; PREFIX=gpu
  OPS_ARGS="--shapes S3,S4 --modes fwd,fwd_bwd --impls eager,compile,fused --reps 20"
  SMALL=1024; BIG=16384; CONV=256; LOOP_ROUNDS=2; BIG_ROUNDS=3
  T_TEST=110; T_OPS=190; T_SMALL=100; T_BIG=60; T_CONV=40  # 500 s in all
fi
mkdir -p "$RES"
OPS_CSV=$RES/${PREFIX}_ops.csv
ROUND_SMALL_CSV=$RES/${PREFIX}_round_${SMALL}.csv
ROUND_BIG_CSV=$RES/${PREFIX}_round_${BIG}.csv
ROUND_CONV_CSV=$RES/${PREFIX}_round_conv.csv
rm -f "$OPS_CSV" "$ROUND_SMALL_CSV" "$ROUND_BIG_CSV" "$RES/${PREFIX}_round_${BIG}_cnn.csv" "$ROUND_CONV_CSV"
STATUS=()

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, note how it ended
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  local how="ok"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && how="out of time"
  [ $rc -ne 0 ] && [ "$how" = ok ] && how="failed (exit $rc)"
  STATUS+=("$name: $how in $((SECONDS - t0))s")
}

if [ "$SMOKE" = 1 ]; then
  STATUS+=("gpu tests: skipped (--smoke)")
else
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
    || { echo "bench/gpu.sh: error: no CUDA device (use --smoke to check the script on CPU)" >&2; exit 2; }
  # The new GPU checks first: the simulator's step without host syncs, --compile against eager.
  step "gpu tests" "$T_TEST" "$PY" -m pytest -q -x -m gpu -p no:cacheprovider tests/test_gpu_step.py tests/
fi

step "bench_ops" "$T_OPS" "$PY" bench/bench_ops.py --device "$DEV" $OPS_ARGS --csv "$OPS_CSV"

step "bench_round $SMALL" "$T_SMALL" "$PY" bench/bench_round.py --device "$DEV" --clients "$SMALL" \
  --models mlp,cnn --loop-clients "$SMALL" --rounds "$LOOP_ROUNDS" --memory-clients "" --csv "$ROUND_SMALL_CSV"
# digits has 1,797 rows: this many clients need the synthetic mixture (100 classes, 20,000 rows)
step "bench_round $BIG mlp" "$T_BIG" "$PY" bench/bench_round.py --device "$DEV" --clients "$BIG" \
  --models mlp --dataset synthetic --num-classes 100 --no-loop --rounds "$BIG_ROUNDS" --memory-clients "" \
  --csv "$ROUND_BIG_CSV"
# whether the GPU default (grouped) is the faster way to run convolutional clients there
step "bench_round $CONV conv" "$T_CONV" "$PY" bench/bench_round.py --device "$DEV" --clients "$CONV" \
  --cases cnn:16x32-64@digits@5@conv=grouped,cnn:16x32-64@digits@5@conv=loop --no-loop \
  --rounds "$BIG_ROUNDS" --memory-clients "" --csv "$ROUND_CONV_CSV"
ROUND_CSVS=("$ROUND_SMALL_CSV" "$ROUND_BIG_CSV")
if [ -n "${MHD_DATA_DIR:-}" ] && [ "$SMOKE" = 0 ]; then
  step "bench_round $BIG cnn" "$T_BIG" "$PY" bench/bench_round.py --device "$DEV" --clients "$BIG" \
    --models cnn --dataset fashion_mnist --data-dir "$MHD_DATA_DIR" --no-loop --rounds "$BIG_ROUNDS" \
    --memory-clients "" --csv "$RES/${PREFIX}_round_${BIG}_cnn.csv"
  ROUND_CSVS+=("$RES/${PREFIX}_round_${BIG}_cnn.csv")
fi

"$PY" bench/gpu_summary.py --ops "$OPS_CSV" --rounds "${ROUND_CSVS[@]}" --csv "$RES/${PREFIX}_summary.csv"
echo
printf '%s\n' "${STATUS[@]}"
if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  cp "$RES"/"${PREFIX}"_*.csv "$OUT"/ 2>/dev/null || true
fi
