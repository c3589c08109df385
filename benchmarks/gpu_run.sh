#!/usr/bin/env bash
# The GPU checks of the project as one prepared script, for a machine lent by the `device` tool
# (python3 with a CUDA build of torch, no internet):
#
#   here:   bash benchmarks/gpu_run.sh --fetch       # wheels of what that image lacks -> .whl/
#   there:  bash benchmarks/gpu_run.sh               # steps 1-3 below; run with carry=[".whl"]
#   there:  bash benchmarks/gpu_run.sh --coloredmnist  # step 2 alone
#   there:  bash benchmarks/gpu_run.sh --domainbed   # step 3 alone, back within 9 minutes
#   here:   bash benchmarks/gpu_run.sh --smoke       # steps 2 (Table 2) and 3 on this CPU at
#                                                    # tiny sizes (tests)
#
# Steps: (1) the step benchmark on the GPU (the CNN per-sample target of issue #3); (2) the
# paper-profile Colored MNIST sweep, the 10 restarts of each algorithm trained together
# (fishr_lite.experiments.coloredmnist_batched; one at a time only for the moving-average
# ablation): Table 2 first, its time in coloredmnist_table2.txt, then chapter 8's ablations;
# records already stored are read back, so set COLOREDMNIST_ROOT to an empty folder to train
# them again (records go to $COLOREDMNIST_ROOT/data/results/coloredmnist, default: here); (3) the
# DomainBed sweep of benchmarks/domainbed_gpu_sweep.py: ColoredMNIST and RotatedMNIST, ERM and
# Fishr, 8 runs at a time on the GPU; it starts no run after $DOMAINBED_STOP_STARTING_AFTER
# seconds (default 360) and stops the runs still going at $DOMAINBED_TIME_LIMIT (default 510).
# Finished runs are skipped, so a second call resumes. The records come back as archives in $OUT
# (coloredmnist_records.tgz from step 2; domainbed_records.tgz from step 3, its finished runs
# and calls.jsonl; also when a time limit stops a step): unpack them at the repository root
# and commit. --smoke writes its tiny records to a temporary folder ($DOMAINBED_SMOKE_BASE if
# set) and its archives to $OUT (a temporary folder if unset). PYTHON names the interpreter
# (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-all}"

if [[ "$MODE" == "--fetch" ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    -d .whl backpack-for-pytorch==1.7.1 unfoldNd==0.2.3 pillow==13.0.0  # pillow: RotatedMNIST
  ls .whl
  exit 0
fi
case "$MODE" in
  all | --coloredmnist | --domainbed | --smoke) ;;
  *) echo "usage: bash benchmarks/gpu_run.sh [--fetch | --coloredmnist | --domainbed | --smoke]" >&2
     exit 2 ;;
esac

PY="${PYTHON:-python3}"
if [[ "$MODE" == "--smoke" ]]; then
  OUT="${OUT:-$(mktemp -d)}"
  DB_BASE="${DOMAINBED_SMOKE_BASE:-$(mktemp -d)}" DB_DIR=data/results/domainbed/gpu_sweep_smoke
  DB_SMOKE=--smoke CM_ROOT="$DB_BASE"
else
  OUT="${OUT:?set OUT to the folder that comes back}"
  DB_BASE=. DB_DIR=data/results/domainbed/gpu_sweep DB_SMOKE= CM_ROOT="${COLOREDMNIST_ROOT:-.}"
  if [[ -d .whl ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
  fi
fi
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 FISHR_PROGRESS=0

archive() {  # whatever finished comes back, also when a time limit stops a step
  if [[ "$MODE" != --domainbed && -d "$CM_ROOT/data/results/coloredmnist" ]]; then
    (cd "$CM_ROOT" && tar czf "$OUT/coloredmnist_records.tgz" data/results/coloredmnist)
  fi
  if [[ -d "$DB_BASE/$DB_DIR" ]]; then  # finished runs and calls.jsonl, not stopped runs
    (cd "$DB_BASE" && { find "$DB_DIR" -mindepth 2 -maxdepth 2 -name done -printf '%h\n'
      find "$DB_DIR" -maxdepth 1 -name calls.jsonl; } | sort | tar czf "$OUT/domainbed_records.tgz" -T -)
  fi
}
trap archive EXIT

table2() {  # Table 2: 4 algorithms x 10 restarts, each algorithm's restarts trained together
  "$PY" -m fishr_lite.experiments.coloredmnist_batched --algorithm erm --algorithm irm \
    --algorithm vrex --algorithm fishr --out "$CM_ROOT/data/results" "$@" \
    | tee "$OUT/coloredmnist_table2.txt"
}

if [[ "$MODE" == all ]]; then
  "$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU"; print(torch.__version__, torch.cuda.get_device_name())'
  "$PY" benchmarks/bench_step.py --device cuda --out-dir "$OUT" | tee "$OUT/bench_step.txt"
fi
if [[ "$MODE" == all || "$MODE" == --coloredmnist ]]; then
  table2 --profile paper --restarts 10 --device cuda
  sweep() { "$PY" -m fishr_lite.experiments.coloredmnist_batched --profile paper --device cuda \
    --restarts 10 --out "$CM_ROOT/data/results" "$@"; }
  sweep --algorithm erm --algorithm fishr --label-flip 0
  sweep --algorithm fishr-notcentered --algorithm fishr-fullcov
  "$PY" - "$CM_ROOT/data/results" <<'PY'
import sys
from fishr_lite.experiments import coloredmnist as cm
from fishr_lite.experiments.coloredmnist_batched import run_batched
options = dict(profile="paper", device="cuda", cache=sys.argv[1], restarts=10, progress=False)
for weight in (1e2, 1e3, 1e4):
    run_batched(["fishr"], penalty_weight=weight, **options)
for step in (0, 100, 300):
    run_batched(["fishr"], penalty_anneal_iters=step, **options)
cm.run(["fishr"], objective_options={"ema": 0.95}, **options)  # a moving average: one at a time
PY
  [[ "$MODE" == all ]] || exit 0
fi
if [[ "$MODE" == --smoke ]]; then  # step 2's Table 2 path at tiny sizes, then step 3's smoke
  table2 --profile quick --restarts 2 --steps 3 --fraction 0.01 --hidden-dim 8 --device cpu
fi

# $DB_SMOKE is empty or --smoke (one word): left unquoted on purpose.
"$PY" benchmarks/domainbed_gpu_sweep.py $DB_SMOKE --sweep-dir "$DB_BASE/$DB_DIR" \
  --time-limit "${DOMAINBED_TIME_LIMIT:-510}" \
  --stop-starting-after "${DOMAINBED_STOP_STARTING_AFTER:-360}" | tee "$OUT/domainbed_sweep.txt"
