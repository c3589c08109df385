"""CurvatureTracker: tidy records every k steps, values equal to the direct computations."""

import pytest
import torch
from torch import nn

from fishr_lite import diagnostics as dx
from fishr_lite.grads import loop_grads
from fishr_lite.penalty import fishr_penalty


def problem():
    torch.manual_seed(0)
    featurizer = nn.Sequential(nn.Linear(3, 4), nn.Tanh()).double()
    head = nn.Linear(4, 1).double()
    domains = []
    for n in (15, 12):
        x = torch.randn(n, 3, dtype=torch.float64)
        domains.append((x, torch.randint(0, 2, (n,)).double()))
    return featurizer, head, domains


def test_tracker_measures_every_k_steps_with_tidy_records():
    featurizer, head, domains = problem()
    tracker = dx.CurvatureTracker(featurizer, head, domains, names=["red", "green"], every=2)
    returned = [tracker(step) for step in range(5)]
    assert [bool(r) for r in returned] == [True, False, True, False, True]
    assert sorted({r["step"] for r in tracker.records}) == [0, 2, 4]
    assert all(set(r) == {"step", "domain", "quantity", "value"} for r in tracker.records)
    assert all(isinstance(r["value"], float) for r in tracker.records)
    at0 = {(r["domain"], r["quantity"]): r["value"] for r in returned[0]}
    assert {q for _, q in at0} == set(dx.DEFAULT_QUANTITIES)
    assert ("red vs green", "hessian_relative_distance") in at0 and ("all", "inconsistency") in at0
    frame = tracker.to_frame()
    assert list(frame.columns) == ["step", "domain", "quantity", "value"] and len(frame) == len(tracker.records)


def test_tracker_values_match_direct_computations():
    featurizer, head, domains = problem()
    tracker = dx.CurvatureTracker(featurizer, head, domains, names=["a", "b"], epsilon=0.2, damping=1e-3)
    got = {(r["domain"], r["quantity"]): r["value"] for r in tracker.measure(7)}
    hessians = dx.hessian(featurizer, head, domains)
    risks = dx.domain_risks(featurizer, head, domains)
    for name, (x, y), h, r in zip("ab", domains, hessians, risks):
        g = loop_grads(head, featurizer(x).detach(), y, loss="bce", create_graph=False)
        flat = torch.cat([g["weight"].reshape(len(y), -1), g["bias"]], dim=1)
        assert got[(name, "risk")] == pytest.approx(float(r), rel=1e-12)
        assert got[(name, "grad_variance_trace")] == pytest.approx(float(flat.var(0, unbiased=False).sum()), rel=1e-10)
        assert got[(name, "empirical_fisher_trace")] == pytest.approx(float(flat.square().sum(1).mean()), rel=1e-10)
        assert got[(name, "hessian_trace")] == pytest.approx(float(torch.trace(h)), rel=1e-10)
        assert got[(name, "fisher_trace")] == pytest.approx(float(torch.trace(h)), rel=1e-10)  # linear head: F = H
    per_sample = [loop_grads(head, featurizer(x).detach(), y, loss="bce", create_graph=False) for x, y in domains]
    assert got[("all", "fishr_penalty")] == pytest.approx(float(fishr_penalty(per_sample)), rel=1e-10)
    score = dx.inconsistency_score(risks, hessians, 0.2, damping=1e-3)
    assert got[("all", "inconsistency")] == pytest.approx(score.value, rel=1e-10)
    assert got[("a vs b", "hessian_cosine_similarity")] == pytest.approx(dx.cosine_similarity(*hessians), rel=1e-12)


def test_tracker_reads_but_does_not_train():
    featurizer, head, domains = problem()
    before = [p.detach().clone() for p in list(featurizer.parameters()) + list(head.parameters())]
    tracker = dx.CurvatureTracker(featurizer, head, domains, quantities=list(dx.TRACKED_QUANTITIES), hvp_samples=5)
    records = tracker.measure(0)
    assert {r["quantity"] for r in records} == set(dx.TRACKED_QUANTITIES)
    for p, b in zip(list(featurizer.parameters()) + list(head.parameters()), before):
        assert p.grad is None
        torch.testing.assert_close(p, b, rtol=0, atol=0)


def test_tracker_bad_arguments():
    featurizer, head, domains = problem()
    with pytest.raises(ValueError, match="unknown quantities"):
        dx.CurvatureTracker(featurizer, head, domains, quantities=["curvature"])
    with pytest.raises(ValueError, match="one name per domain"):
        dx.CurvatureTracker(featurizer, head, domains, names=["a"])
    with pytest.raises(ValueError, match="every=0"):
        dx.CurvatureTracker(featurizer, head, domains, every=0)
    with pytest.raises(ValueError, match="empty"):
        dx.CurvatureTracker(featurizer, head, [domains[0], (domains[0][0][:0], domains[0][1][:0])])
