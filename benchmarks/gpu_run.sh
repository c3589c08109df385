#!/usr/bin/env bash
# The GPU checks of the project as one prepared script, for a machine lent by the `device` tool
# (python3 with a CUDA build of torch, no internet). Two steps:
#
#   here:   bash benchmarks/gpu_run.sh --fetch   # wheels of what that image lacks -> .whl/
#   there:  bash benchmarks/gpu_run.sh           # run with carry=[".whl"]; results under $OUT
#
# There it runs (1) the step benchmark on the GPU (the CNN per-sample target of issue #3),
# (2) the paper-profile Colored MNIST sweep: Table 2 (10 restarts) and chapter 7's ablations.
# Finished runs are skipped, so a second call resumes. The records come back as one archive
# ($OUT/coloredmnist_records.tgz): unpack it at the repository root and commit.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch" ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 -d .whl \
    backpack-for-pytorch==1.7.1 unfoldNd==0.2.3
  ls .whl
  exit 0
fi

OUT="${OUT:?set OUT to the folder that comes back}"
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 FISHR_PROGRESS=0
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU"; print(torch.__version__, torch.cuda.get_device_name())'

python3 benchmarks/bench_step.py --device cuda --out-dir "$OUT" | tee "$OUT/bench_step.txt"

sweep() { python3 -m fishr_lite.experiments.coloredmnist --profile paper --device cuda --out data/results "$@"; }
archive() { tar czf "$OUT/coloredmnist_records.tgz" data/results/coloredmnist; }
trap archive EXIT  # whatever finished comes back, also when the time limit stops the sweep
sweep --algorithm erm --algorithm irm --algorithm vrex --algorithm fishr --restarts 10
sweep --algorithm erm --algorithm fishr --label-flip 0 --restarts 10
sweep --algorithm fishr-notcentered --algorithm fishr-fullcov --restarts 10
python3 - <<'PY'
from fishr_lite.experiments import coloredmnist as cm
options = dict(profile="paper", device="cuda", cache="data/results", restarts=10, progress=False)
for weight in (1e2, 1e3, 1e4):
    cm.run(["fishr"], penalty_weight=weight, **options)
for step in (0, 100, 300):
    cm.run(["fishr"], penalty_anneal_iters=step, **options)
cm.run(["fishr"], objective_options={"ema": 0.95}, **options)
PY
