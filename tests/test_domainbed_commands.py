"""DomainBed's command lines: train (its flags; what is not implemented is an error), sweep
(launch, delete_incomplete; local and submitit launchers), collect_results, list_top_hparams."""

import json

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from fishr_lite.domainbed import collect_results, list_top_hparams, sweep, train
from fishr_lite.domainbed.reporting import build_report
from fishr_lite.domainbed.sweep import DONE, INCOMPLETE, make_jobs, summary

HP = json.dumps({"batch_size": 4, "mnist_cnn_width": 8})
TINY = ["--steps", "2", "--checkpoint_freq", "1", "--max_per_env", "12", "--hparams", HP]


def sweep_args(out, *extra, algorithms=("ERM", "IRM")):
    return ["--datasets", "ColoredMNIST", "--algorithms", *algorithms, "--n_hparams", "1",
            "--n_trials", "1", "--single_test_envs", "--output_dir", str(out), *TINY,
            "--skip_confirmation", *extra]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    launched = sweep.main(["launch", *sweep_args(out, "--command_launcher", "local")])
    assert len(launched) == 6
    return out


@pytest.mark.parametrize("flags, message", [
    (["--task", "domain_adaptation"], "not implemented"),
    (["--uda_holdout_fraction", "0.1"], "domain adaptation"),
    (["--hparams", '{"lr": '], "is not valid JSON"),
    (["--hparams", "[0.001]"], "JSON but not an object"),
])
def test_train_rejects_what_it_cannot_run(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        train.main(["--output_dir", str(tmp_path / "run"), *flags])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit):
        train.main(["--output_dir", str(tmp_path / "run"), "--resnet50"])
    with pytest.raises(ValueError, match="unknown argument"):
        train.train({"output_dir": str(tmp_path / "run"), "n_steps": 3})


def test_train_command_line_saves_models_as_domainbed(tmp_path):
    out = train.main(["--dataset", "ColoredMNIST", "--algorithm", "VREx", "--test_envs", "2",
                      "--output_dir", str(tmp_path / "run"), "--save_model_every_checkpoint", *TINY])
    assert {p.name for p in out.iterdir()} == {"results.jsonl", "done", "model.pkl",
                                               "model_step0.pkl", "model_step1.pkl"}
    saved = torch.load(out / "model.pkl", weights_only=False)
    assert saved["model_num_domains"] == 2 and saved["model_hparams"]["vrex_lambda"] == 10.0
    assert saved["args"]["algorithm"] == "VREx" and "model_dict" in saved
    out2 = train.main(["--output_dir", str(tmp_path / "run2"), "--skip_model_save", *TINY])
    assert not (out2 / "model.pkl").exists()


def test_class_balanced_draws():
    y = torch.tensor([0, 0, 0, 1, 0, 0, 0, 0])
    split = Subset(TensorDataset(torch.zeros(8, 1), y), list(range(8)))
    w = train.class_balanced_weights(split)
    torch.testing.assert_close(w, torch.where(y == 1, 0.5, 1 / 14).double())
    batches = train.infinite_minibatches(split, 4000, torch.Generator().manual_seed(0), weights=w)
    _, yb = next(batches)
    assert 0.45 < yb.float().mean() < 0.55  # one sample in eight, drawn half the time


def test_sweep_launch_and_delete_incomplete(sweep_dir, capsys):
    jobs = make_jobs(sweep_dir, datasets=["ColoredMNIST"], algorithms=["ERM", "IRM"], n_hparams=1,
                     n_trials=1, single_test_envs=True, steps=2, checkpoint_freq=1, max_per_env=12,
                     hparams=json.loads(HP))
    assert summary(jobs)[DONE] == 6  # the command line made the same jobs as make_jobs
    (jobs[2].output_dir / "done").unlink()
    capsys.readouterr()
    # as DomainBed: a submitit/Slurm launch leaves incomplete jobs alone (they may be queued)
    assert sweep.main(["launch", *sweep_args(sweep_dir, "--command_launcher", "submitit")]) == []
    assert "6 jobs: 5 done, 1 incomplete, 0 not launched." in capsys.readouterr().out
    deleted = sweep.main(["delete_incomplete", *sweep_args(sweep_dir, "--command_launcher", "local")])
    assert [j.output_dir for j in deleted] == [jobs[2].output_dir] and not jobs[2].output_dir.exists()
    relaunched = sweep.main(["launch", *sweep_args(sweep_dir, "--command_launcher", "local")])
    assert [j.output_dir for j in relaunched] == [jobs[2].output_dir] and summary(jobs)[DONE] == 6
    assert summary(jobs)[INCOMPLETE] == 0
    # the local launcher starts again an incomplete job that no process is training
    (jobs[4].output_dir / "done").unlink()
    relaunched = sweep.main(["launch", *sweep_args(sweep_dir, "--command_launcher", "local")])
    assert [j.output_dir for j in relaunched] == [jobs[4].output_dir] and summary(jobs)[DONE] == 6


def test_sweep_rejects_unknown_algorithm_before_launching(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown algorithm"):
        make_jobs(tmp_path, datasets=["ColoredMNIST"], algorithms=["ERM", "DANN"])
    with pytest.raises(SystemExit):
        sweep.main(["launch", *sweep_args(tmp_path / "s", "--command_launcher", "local",
                                          algorithms=("ERM", "MLDG"))])
    assert "unknown algorithm" in capsys.readouterr().err and not (tmp_path / "s").exists()
    with pytest.raises(SystemExit):
        sweep.main(["launch", *sweep_args(tmp_path / "s", "--command_launcher", "dummy")])


def test_collect_results_writes_results_txt_and_tex(sweep_dir, capsys):
    text = collect_results.main(["--input_dir", str(sweep_dir)])
    assert capsys.readouterr().out == text == (sweep_dir / "results.txt").read_text()
    assert text == build_report(sweep_dir).to_text()
    assert "Dataset: ColoredMNIST, model selection method: test-domain validation set (oracle)" in text
    tex = collect_results.main(["--input_dir", str(sweep_dir), "--latex"])
    assert tex == (sweep_dir / "results.tex").read_text()
    assert tex.startswith("\\documentclass{article}") and tex.rstrip().endswith("\\end{document}")
    assert "\\section{Full DomainBed results}" in tex and "\\begin{tabular}" in tex


def test_list_top_hparams(sweep_dir):
    text = list_top_hparams.main(["--input_dir", str(sweep_dir), "--dataset", "ColoredMNIST",
                                  "--algorithm", "IRM", "--test_env", "1"])
    assert text.count("Model selection:") == 3 and text.count("trial_seed: 0") == 3
    assert text.count("'val_acc'") == 2  # one draw, ranked by IID and oracle (no pairs for LOO)
    assert "\t\t\tirm_lambda: 100.0" in text and "'val_acc'" in text and str(sweep_dir) in text
    empty = list_top_hparams.main(["--input_dir", str(sweep_dir), "--dataset", "ColoredMNIST",
                                   "--algorithm", "Fishr", "--test_env", "0"])
    assert "No records" in empty


@pytest.mark.slow
def test_sweep_command_line_through_submitit(tmp_path):
    pytest.importorskip("submitit")
    launched = sweep.main(["launch", *sweep_args(tmp_path / "s", "--command_launcher", "submitit",
                                                 "--timeout_min", "5", algorithms=("Mixup",))])
    assert len(launched) == 3 and all(j.state == DONE for j in launched)
    assert (tmp_path / "s" / ".submitit").is_dir()
    assert len(build_report(tmp_path / "s").sweep.records) == 6  # 3 runs x checkpoints 0 and 1


def test_sweep_refuses_hparams_that_are_not_a_json_object(tmp_path, capsys):
    for text, message in [('{"lr": ', "is not valid JSON"), ("[0.001]", "JSON but not an object")]:
        with pytest.raises(SystemExit):  # the last --hparams wins over the one in TINY
            sweep.main(["launch", *sweep_args(tmp_path / "out", "--command_launcher", "local",
                                              "--hparams", text)])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
