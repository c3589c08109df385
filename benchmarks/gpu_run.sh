#!/usr/bin/env bash
# The GPU checks of the project as one prepared script, for a machine lent by the `device` tool
# (python3 with a CUDA build of torch, no internet):
#
#   here:   bash benchmarks/gpu_run.sh --fetch       # wheels of what that image lacks -> .whl/
#   there:  bash benchmarks/gpu_run.sh               # steps 1-3 below; run with carry=[".whl"]
#   there:  bash benchmarks/gpu_run.sh --domainbed   # step 3 alone, back within 9 minutes
#   here:   bash benchmarks/gpu_run.sh --smoke       # step 3 on this CPU at tiny sizes (tests)
#
# Steps: (1) the step benchmark on the GPU (the CNN per-sample target of issue #3); (2) the
# paper-profile Colored MNIST sweep: Table 2 (10 restarts) and chapter 8's ablations; (3) the
# DomainBed sweep of benchmarks/domainbed_gpu_sweep.py: ColoredMNIST and RotatedMNIST, ERM and
# Fishr, 8 runs at a time on the GPU; it starts no run after $DOMAINBED_STOP_STARTING_AFTER
# seconds (default 360) and stops the runs still going at $DOMAINBED_TIME_LIMIT (default 510).
# Finished runs are skipped, so a second call resumes. The records come back as archives in $OUT
# (coloredmnist_records.tgz from step 2; domainbed_records.tgz from step 3, its finished runs
# and calls.jsonl; also when a time limit stops a step): unpack them at the repository root
# and commit. --smoke writes its tiny records to a temporary folder ($DOMAINBED_SMOKE_BASE if
# set) and its archive to $OUT (a temporary folder if unset). PYTHON names the interpreter
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
  all | --domainbed | --smoke) ;;
  *) echo "usage: bash benchmarks/gpu_run.sh [--fetch | --domainbed | --smoke]" >&2; exit 2 ;;
esac

PY="${PYTHON:-python3}"
if [[ "$MODE" == "--smoke" ]]; then
  OUT="${OUT:-$(mktemp -d)}"
  DB_BASE="${DOMAINBED_SMOKE_BASE:-$(mktemp -d)}" DB_DIR=data/results/domainbed/gpu_sweep_smoke
  DB_SMOKE=--smoke
else
  OUT="${OUT:?set OUT to the folder that comes back}"
  DB_BASE=. DB_DIR=data/results/domainbed/gpu_sweep DB_SMOKE=
  if [[ -d .whl ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
  fi
fi
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 FISHR_PROGRESS=0

archive() {  # whatever finished comes back, also when a time limit stops a step
  if [[ "$MODE" == all && -d data/results/coloredmnist ]]; then
    tar czf "$OUT/coloredmnist_records.tgz" data/results/coloredmnist
  fi
  if [[ -d "$DB_BASE/$DB_DIR" ]]; then  # finished runs and calls.jsonl, not stopped runs
    (cd "$DB_BASE" && { find "$DB_DIR" -mindepth 2 -maxdepth 2 -name done -printf '%h\n'
      find "$DB_DIR" -maxdepth 1 -name calls.jsonl; } | sort | tar czf "$OUT/domainbed_records.tgz" -T -)
  fi
}
trap archive EXIT

if [[ "$MODE" == all ]]; then
  "$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU"; print(torch.__version__, torch.cuda.get_device_name())'
  "$PY" benchmarks/bench_step.py --device cuda --out-dir "$OUT" | tee "$OUT/bench_step.txt"

  sweep() { "$PY" -m fishr_lite.experiments.coloredmnist --profile paper --device cuda --out data/results "$@"; }
  sweep --algorithm erm --algorithm irm --algorithm vrex --algorithm fishr --restarts 10
  sweep --algorithm erm --algorithm fishr --label-flip 0 --restarts 10
  sweep --algorithm fishr-notcentered --algorithm fishr-fullcov --restarts 10
  "$PY" - <<'PY'
from fishr_lite.experiments import coloredmnist as cm
options = dict(profile="paper", device="cuda", cache="data/results", restarts=10, progress=False)
for weight in (1e2, 1e3, 1e4):
    cm.run(["fishr"], penalty_weight=weight, **options)
for step in (0, 100, 300):
    cm.run(["fishr"], penalty_anneal_iters=step, **options)
cm.run(["fishr"], objective_options={"ema": 0.95}, **options)
PY
fi

# $DB_SMOKE is empty or --smoke (one word): left unquoted on purpose.
"$PY" benchmarks/domainbed_gpu_sweep.py $DB_SMOKE --sweep-dir "$DB_BASE/$DB_DIR" \
  --time-limit "${DOMAINBED_TIME_LIMIT:-510}" \
  --stop-starting-after "${DOMAINBED_STOP_STARTING_AFTER:-360}" | tee "$OUT/domainbed_sweep.txt"
