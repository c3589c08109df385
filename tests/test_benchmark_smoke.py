"""`benchmarks/bench_step.py --quick` runs and writes a complete JSON record (no timing checks)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, out_dir: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``benchmarks/<script>.py`` writing into ``out_dir``; check that it wrote exactly one
    ``<script>_*.json`` record, and return the process and that record."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args, "--out-dir", str(out_dir)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    files = list(out_dir.glob(f"{script}_*.json"))
    assert len(files) == 1
    return result, json.loads(files[0].read_text())


@pytest.mark.slow
def test_bench_step_quick_writes_a_complete_record(tmp_path):
    result, record = run_benchmark("bench_step", tmp_path, "--quick", "--breakdown")
    assert record["provenance"]["device"] == "cpu" and record["provenance"]["gpu"] is None
    for key in ("date", "host", "torch", "backpack", "cpu", "torch_threads", "fishr_lite"):
        assert record["provenance"][key] not in (None, ""), key
    kinds = {"erm", "fishr_closed_form", "fishr_closed_form_compiled", "fishr_backpack", "fishr_functorch",
             "naive_backpack_whole_network"}
    assert set(record["mlp"]["ratio_to_erm"]) == kinds
    assert record["mlp"]["ratio_to_erm"]["erm"] == 1.0
    times = record["mlp"]["times_s"]  # the per-round spread, recomputed from the raw times
    for kind in kinds:
        ratios = sorted(t / e for t, e in zip(times[kind], times["erm"]))
        spread = record["mlp"]["ratio_to_erm_per_round"][kind]
        assert (spread["min"], spread["max"]) == (ratios[0], ratios[-1]), kind
        assert spread["min"] <= spread["median"] <= spread["max"], kind
    assert "per round" in result.stdout
    for key in ("rate_gflops", "erm_matmul_gflop", "erm_over_gemm_time", "erm_over_step_shapes_gemm_time"):
        assert record["mlp"]["gemm"][key] > 0, key
    parts, medians = record["mlp"]["closed_form_node_parts"], record["mlp"]["median_s"]
    assert parts["step_extra_s"] == medians["fishr_closed_form"] - medians["erm"]
    assert parts["forward_extra_s"] == medians["closed_form_node_forward"] - medians["head_forward"]
    node_extra = medians["closed_form_node_forward_backward"] - medians["head_forward_backward"]
    assert abs(parts["forward_extra_s"] + parts["backward_extra_s"] - node_extra) < 1e-12
    assert min(medians[k] for k in ("head_forward", "closed_form_node_forward")) > 0
    assert "the closed form adds" in result.stdout
    assert set(record["cnn"]["median_s"]) == {"functorch", "backpack", "loop", "batch_gradient"}
    assert record["cnn"]["speedup_ceiling"] > 0
    assert set(record["cnn"]["speedup_over_loop"]) == {"functorch", "backpack"}
    assert set(record["targets_met"]) == {
        "fishr_closed_form_over_erm", "fishr_closed_form_compiled_over_erm", "fishr_backpack_over_erm",
        "erm_over_step_shapes_gemm_time", "cnn_share_of_ceiling"
    }
    share = record["targets_met"]["cnn_share_of_ceiling"][0]
    assert share == record["cnn"]["speedup_over_loop"]["functorch"] / record["cnn"]["speedup_ceiling"]
    assert record["provenance"]["reuse_freed_memory"] is True  # the default on glibc
    faults = record["mlp"]["minor_page_faults_median"]
    assert set(faults) >= kinds and all(f >= 0 for f in faults.values())
    split = record["mlp"]["where_time_goes"]  # --breakdown: the heaviest operators of three cases
    assert set(split) == {"erm", "fishr_closed_form", "fishr_backpack"}
    for case in split.values():
        assert 0 < sum(case["top_ops_ms"].values()) <= case["total_ms"] + 1e-6
    assert "where erm's" in result.stdout
    assert "Targets:" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_bench_step_without_cuda_says_so(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), "--quick", "--device", "cuda",
         "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 2 and "sees no CUDA GPU" in result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_paper_run_ab_short_run_writes_both_runs(tmp_path):
    result, record = run_benchmark("paper_run_ab", tmp_path, "--steps", "2")
    assert record["config"]["steps"] == 2 and record["config"]["hidden_dim"] == 390
    fused, plain = record["wall_time_s"]["fused"], record["wall_time_s"]["plain"]
    assert fused > 0 and plain > 0
    assert record["plain_over_fused"] == plain / fused
    for kind in ("fused", "plain"):
        assert 0.0 <= record["final_test_acc"][kind] <= 1.0
    # the same two steps with two kernels: float32 rounding apart, not a different run
    assert all(0.0 <= gap < 1e-3 for gap in record["history_max_abs_difference"].values())
    assert record["provenance"]["git_commit"] not in (None, "")
    assert "plain / fused" in result.stdout


@pytest.mark.slow
def test_paper_run_ab_compares_the_compiled_closed_form_with_the_eager_one(tmp_path):
    result, record = run_benchmark("paper_run_ab", tmp_path, "--steps", "2", "--switch", "compiled_closed_form")
    assert record["switch"] == "compiled_closed_form"
    compiled, eager = record["wall_time_s"]["compiled"], record["wall_time_s"]["eager"]
    assert record["eager_over_compiled"] == eager / compiled
    assert all(0.0 <= gap < 1e-3 for gap in record["history_max_abs_difference"].values())
    assert "eager / compiled" in result.stdout


def test_bench_step_goes_on_without_the_compiled_case_when_its_kernels_cannot_be_built(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_step

    from fishr_lite import compiled_variance

    def cannot_build(*args, **kwargs):
        raise RuntimeError("compiled_closed_form(): torch.compile could not build the closed form's kernels")

    monkeypatch.setattr(compiled_variance, "run", cannot_build)
    mlp = bench_step.bench_mlp(n_per_domain=50, repeats=1, gemm_size=32)
    assert "fishr_closed_form_compiled" not in mlp["ratio_to_erm"]
    assert "could not build" in mlp["skipped_cases"]["fishr_closed_form_compiled"]
    assert "fishr_closed_form" in mlp["ratio_to_erm"]
