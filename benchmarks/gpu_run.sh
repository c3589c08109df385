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
#
# A call keeps within GPU_RUN_BUDGET seconds (default 560, inside the device tool's 600 s per
# command): a step is not started with less than its reserve of the budget left (200 s for steps
# 1 and 3, 150 s for Table 2, 90 s for each later Colored MNIST sweep), and is named in
# $OUT/left_for_next_call.txt instead; the next call resumes it (stored records are skipped).
# Step 3's time limits shrink to what is left: its runs stop 20 s before the budget's end, and
# none starts in the last 150 s of its limit.
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

BUDGET="${GPU_RUN_BUDGET:-560}"
start_if() {  # start_if SECONDS WHAT: true while SECONDS of the call's budget are left
  if (( BUDGET - SECONDS >= $1 )); then return 0; fi
  echo "gpu_run: left for the next call ($(( BUDGET - SECONDS )) s of the ${BUDGET} s budget left, needs $1 s): $2" \
    | tee -a "$OUT/left_for_next_call.txt"
  return 1
}

table2() {  # Table 2: 4 algorithms x 10 restarts, each algorithm's restarts trained together
  "$PY" -m fishr_lite.experiments.coloredmnist_batched --algorithm erm --algorithm irm \
    --algorithm vrex --algorithm fishr --out "$CM_ROOT/data/results" "$@" \
    | tee "$OUT/coloredmnist_table2.txt"
}

if [[ "$MODE" == all ]] && start_if 200 "step 1, the step benchmark on the GPU"; then
  "$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU"; print(torch.__version__, torch.cuda.get_device_name())'
  "$PY" benchmarks/bench_step.py --device cuda --out-dir "$OUT" | tee "$OUT/bench_step.txt"
fi
if [[ "$MODE" == all || "$MODE" == --coloredmnist ]]; then
  if start_if 150 "step 2, Table 2 (bash benchmarks/gpu_run.sh --coloredmnist)"; then
    table2 --profile paper --restarts 10 --device cuda
  fi
  sweep() { "$PY" -m fishr_lite.experiments.coloredmnist_batched --profile paper --device cuda \
    --restarts 10 --out "$CM_ROOT/data/results" "$@"; }
  if start_if 90 "step 2, the label-flip-0 ablation"; then
    sweep --algorithm erm --algorithm fishr --label-flip 0
  fi
  if start_if 90 "step 2, the Fishr variants"; then
    sweep --algorithm fishr-notcentered --algorithm fishr-fullcov
  fi
  # one ablation at a time while 90 s of the budget are left
  GPU_RUN_DEADLINE=$(( $(date +%s) + BUDGET - SECONDS - 90 )) \
  "$PY" - "$CM_ROOT/data/results" "$OUT/left_for_next_call.txt" <<'PY'
import os, sys, time
from fishr_lite.experiments import coloredmnist as cm
from fishr_lite.experiments.coloredmnist_batched import run_batched
options = dict(profile="paper", device="cuda", cache=sys.argv[1], restarts=10, progress=False)
sweeps = [(f"penalty weight {w:g}", run_batched, ["fishr"], {"penalty_weight": w}) for w in (1e2, 1e3, 1e4)]
sweeps += [(f"warm-up {s} steps", run_batched, ["fishr"], {"penalty_anneal_iters": s}) for s in (0, 100, 300)]
sweeps += [("moving average 0.95, one restart at a time", cm.run, ["fishr"], {"objective_options": {"ema": 0.95}})]
for k, (name, run, algorithms, change) in enumerate(sweeps):
    if time.time() > int(os.environ["GPU_RUN_DEADLINE"]):
        with open(sys.argv[2], "a", encoding="utf-8") as left:
            for later in sweeps[k:]:
                print(f"gpu_run: left for the next call: step 2, the ablation {later[0]}", file=left)
        print(f"gpu_run: {len(sweeps) - k} ablations left for the next call", flush=True)
        break
    run(algorithms, **change, **options)
PY
  [[ "$MODE" == all ]] || exit 0
fi
if [[ "$MODE" == --smoke ]] && start_if 30 "step 2, Table 2 at tiny sizes"; then
  # step 2's Table 2 path at tiny sizes, then step 3's smoke
  table2 --profile quick --restarts 2 --steps 3 --fraction 0.01 --hidden-dim 8 --device cpu
fi

# Step 3 within what is left of the budget: runs stop 20 s before its end, none starts in its
# last 150 s.
LIMIT=$(( BUDGET - SECONDS - 20 )) LIMIT_SET="${DOMAINBED_TIME_LIMIT:-510}"
(( LIMIT < LIMIT_SET )) || LIMIT="$LIMIT_SET"
START_BEFORE="${DOMAINBED_STOP_STARTING_AFTER:-360}"
(( START_BEFORE <= LIMIT - 150 )) || START_BEFORE=$(( LIMIT - 150 ))
if start_if 200 "step 3, the DomainBed sweep (bash benchmarks/gpu_run.sh --domainbed)"; then
  # $DB_SMOKE is empty or --smoke (one word): left unquoted on purpose.
  "$PY" benchmarks/domainbed_gpu_sweep.py $DB_SMOKE --sweep-dir "$DB_BASE/$DB_DIR" \
    --time-limit "$LIMIT" --stop-starting-after "$START_BEFORE" | tee "$OUT/domainbed_sweep.txt"
fi
