"""Reporting on DomainBed's own test sweep (tests/data/domainbed_test_sweep, MIT, see README)."""

import shutil
from pathlib import Path

import pytest

from fishr_lite.domainbed.records import load_records
from fishr_lite.domainbed.report import main
from fishr_lite.domainbed.reporting import build_report
from fishr_lite.domainbed.selection import SELECTION_METHODS

SWEEP = Path(__file__).parent / "data" / "domainbed_test_sweep"


@pytest.fixture
def sweep_copy(tmp_path):
    return Path(shutil.copytree(SWEEP, tmp_path / "sweep"))


def test_text_report_matches_domainbed_collect_results_byte_for_byte():
    expected = (SWEEP / "test_sweep_results.txt").read_text()
    text = build_report(SWEEP).to_text()
    assert text.startswith(expected)
    assert text[len(expected):].strip().endswith(
        "Skipped corrupt lines: 0; incomplete runs (no 'done'): 0")


def test_per_environment_tables_for_all_three_selection_methods():
    report = build_report(SWEEP)
    sweep = report.sweep
    assert (len(sweep), sweep.n_runs, sweep.n_skipped_lines, sweep.n_incomplete_runs) == (200, 40, 0, 0)
    for method in SELECTION_METHODS:
        table = report.table("VLCS", method)
        assert table.col_labels == ["C", "L", "S", "V", "Avg"] and table.row_labels == ["ERM"]
        assert table.n_trials[0][:4] == [2, 2, 2, 2]
        means = table.means[0]
        assert all(50 < m < 100 for m in means)
        assert means[4] == pytest.approx(sum(means[:4]) / 4)
        frame = table.to_dataframe()
        assert frame.shape == (1, 5) and "±" in frame.loc["ERM", "C"]
        assert report.table("Averages", method).col_labels == ["VLCS", "Avg"]
    long = report.to_dataframe()
    assert len(long) == 3 * (5 + 2)
    flat = sweep.to_dataframe()
    assert flat.shape[0] == 200 and {"args.trial_seed", "hparams.lr", "env3_out_acc"} <= set(flat.columns)


def test_std_error_is_standard_error_times_sqrt_n():
    se = build_report(SWEEP).table("VLCS", "oracle")
    std = build_report(SWEEP, error="std").table("VLCS", "oracle")
    for j in range(4):
        assert std.errs[0][j] == pytest.approx(se.errs[0][j] * 2 ** 0.5)
    with pytest.raises(ValueError, match="error="):
        build_report(SWEEP, error="sem")


def test_truncated_line_is_skipped_with_warning_and_counted(sweep_copy):
    run = sorted(p for p in sweep_copy.iterdir() if p.is_dir())[3]
    lines = (run / "results.jsonl").read_text().splitlines(keepends=True)
    lines[2] = lines[2][: len(lines[2]) // 2] + "\n"  # a corrupt line inside the file
    lines[4] = lines[4][: len(lines[4]) // 3]  # a half-written last line, as from a killed job
    (run / "results.jsonl").write_text("".join(lines))
    with pytest.warns(UserWarning) as caught:
        report = build_report(sweep_copy)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2 and "results.jsonl, line 3: skipped, not valid JSON" in messages[0]
    assert messages[1].startswith(str(run / "results.jsonl") + ", line 5: skipped")
    assert report.sweep.skipped_lines == [(str(run / "results.jsonl"), 3), (str(run / "results.jsonl"), 5)]
    assert len(report.sweep) == 198
    assert "Skipped corrupt lines: 2;" in report.to_text()


def test_run_without_done_is_reported_incomplete_and_left_out(sweep_copy):
    run = sorted(p for p in sweep_copy.iterdir() if p.is_dir())[0]
    (run / "done").unlink()
    not_started = sweep_copy / ("f" * 32)  # a job folder (md5-named) made before any record
    not_started.mkdir()
    (sweep_copy / "logs" / "submitit").mkdir(parents=True)  # not a run: neither read nor counted
    (sweep_copy / "logs" / "submitit" / "0_log.out").write_text("log")
    sweep = load_records(sweep_copy)
    assert sorted(sweep.incomplete_runs) == sorted([str(run), str(not_started)])
    assert (len(sweep), sweep.n_runs) == (195, 41)
    assert "incomplete runs (no 'done'): 2" in build_report(sweep).to_text()
    assert len(load_records(sweep_copy, include_incomplete=True)) == 200


def test_command_line_markdown_latex_and_output_file(tmp_path, capsys):
    out = tmp_path / "r.tex"
    latex = main(["--input_dir", str(SWEEP), "--latex", "--output", str(out)])
    assert r"\begin{tabular}{lccccc}" in latex and r"$\pm$" in latex and out.read_text() == latex
    markdown = main(["--input_dir", str(SWEEP), "--markdown"])
    assert "| ERM | 98.0 ± 0.2 |" in markdown
    assert capsys.readouterr().out == latex + markdown


def test_missing_folder_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="is not a directory"):
        load_records(tmp_path / "nope")
