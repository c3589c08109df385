"""The narrow MNIST_CNN, the protocol chapter's sweep profiles, and the step-time record."""

import json

import pytest
import torch

from fishr_lite.domainbed.hparams import default_hparams
from fishr_lite.domainbed.networks import MNIST_CNN, Featurizer
from fishr_lite.domainbed.profiles import SWEEP_PROFILES, profile_jobs
from fishr_lite.domainbed.timing import main as timing_main
from fishr_lite.domainbed.timing import measure_step_times


def test_mnist_cnn_width_default_is_domainbeds_network():
    default, narrow = MNIST_CNN((2, 28, 28)), MNIST_CNN((2, 28, 28), width=8)
    assert [m.out_channels for m in (default.conv1, default.conv2, default.conv3, default.conv4)] \
        == [64, 128, 128, 128] and default.n_outputs == 128
    assert [m.out_channels for m in (narrow.conv1, narrow.conv2, narrow.conv3, narrow.conv4)] \
        == [8, 16, 16, 16] and narrow.n_outputs == 16
    assert narrow(torch.zeros(3, 2, 28, 28)).shape == (3, 16)
    assert Featurizer((1, 28, 28), {"mnist_cnn_width": 16}).n_outputs == 32
    assert Featurizer((1, 28, 28), default_hparams("ERM", "RotatedMNIST")).n_outputs == 128
    assert "mnist_cnn_width" not in default_hparams("Fishr", "ColoredMNIST")
    for bad in (0, 12, 4):
        with pytest.raises(ValueError, match="multiple of 8"):
            MNIST_CNN((2, 28, 28), width=bad)


def test_profile_jobs_keep_the_protocol_and_fix_only_what_costs_time():
    quick = profile_jobs("/tmp/sweep", "quick")
    p = SWEEP_PROFILES["quick"]
    assert p["algorithms"] == ["ERM", "Fishr", "IRM", "VREx", "CORAL"]
    assert len(quick) == 5 * 2 * 1 * (3 + 3)  # algorithms x draws x trials x test envs and pairs
    assert len(quick) == len(p["algorithms"]) * p["n_hparams"] * p["n_trials"] * (3 + 3)
    fixed = {a: [json.loads(j.args["hparams"]) for j in quick if j.args["algorithm"] == a]
             for a in p["algorithms"]}
    base = {"batch_size": 32, "mnist_cnn_width": 8}
    # each penalty's warm-up is the fraction of training DomainBed's default leaves without it
    warmups = {"Fishr": {"penalty_anneal_iters": 50}, "IRM": {"irm_penalty_anneal_iters": 16},
               "VREx": {"vrex_penalty_anneal_iters": 16}}
    for algorithm, hparams in fixed.items():
        assert len(hparams) == 12
        assert all(h == {**base, **warmups.get(algorithm, {})} for h in hparams), algorithm
    assert {j.args["hparams_seed"] for j in quick} == {0, 1}
    assert {j.args["max_per_env"] for j in quick} == {1000}
    assert {(j.args["steps"], j.args["checkpoint_freq"]) for j in quick} == {(160, 80)}
    paper = profile_jobs("/tmp/sweep", "paper")
    assert len(paper) == 2 * 20 * 3 * 6
    assert all("hparams" not in j.args and "steps" not in j.args and "max_per_env" not in j.args
               for j in paper)  # DomainBed's defaults
    with pytest.raises(ValueError, match="unknown profile"):
        profile_jobs("/tmp/sweep", "fast")


@pytest.mark.slow
def test_step_times_record_has_positive_times_and_provenance(tmp_path):
    out = tmp_path / "t.json"
    timing_main(["--algorithms", "ERM", "Fishr", "--batch_size", "4", "--n_steps", "2",
                 "--warmup", "0", "--hparams", '{"mnist_cnn_width": 8}', "--out", str(out)])
    record = json.loads(out.read_text())
    assert set(record["seconds_per_step"]) == {"ERM", "Fishr"}
    assert all(t > 0 for t in record["seconds_per_step"].values())
    assert len(record["all_times_s"]["Fishr"]) == 2 and record["n_train_domains"] == 2
    assert {"device", "torch", "cpu_count", "torch_threads", "date"} <= set(record["machine"])
    with pytest.raises(ValueError, match="n_steps"):
        measure_step_times(n_steps=0)
    with pytest.raises(SystemExit):  # the --hparams of train and sweep: a JSON object
        timing_main(["--hparams", "[8]", "--out", str(tmp_path / "never.json")])
    assert not (tmp_path / "never.json").exists()
