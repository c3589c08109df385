"""DomainBed's ERM and Fishr against from-scratch autograd references (float64, tiny nets)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fishr_lite.domainbed.algorithms import ERM, FishrAlgorithm, get_algorithm_class


class TinyFeaturizer(nn.Sequential):
    n_outputs = 3

    def __init__(self):
        super().__init__(nn.Flatten(), nn.Linear(4, 3), nn.Tanh())


class WideFeaturizer(nn.Sequential):
    n_outputs = 8  # DomainBed's nonlinear classifier: 8 -> 4 -> 2 -> classes

    def __init__(self):
        super().__init__(nn.Flatten(), nn.Linear(4, 8), nn.Tanh())


HP = {"lr": 0.05, "weight_decay": 0.0, "lambda": 50.0, "penalty_anneal_iters": 2, "ema": 0.9}


def batches(seed, n_domains=2, sizes=(5, 7)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (n,), generator=g)) for n in sizes[:n_domains]]


def reference_fishr_penalty(featurizer, head, minibatches, ema_state, ema):
    """DomainBed's penalty by hand: per-sample head gradients one sample at a time."""
    variances = []
    for e, (x, y) in enumerate(minibatches):
        z = featurizer(x)
        rows = []
        for i in range(len(y)):
            loss = F.cross_entropy(head(z[i:i + 1]), y[i:i + 1], reduction="sum")
            grads = torch.autograd.grad(loss, list(head.parameters()), create_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        g = torch.stack(rows)
        v = (g - g.mean(0)).pow(2).mean(0)
        old = ema_state[e] if ema_state[e] is not None else torch.zeros_like(v)
        m = ema * old + (1 - ema) * v
        ema_state[e] = m.detach()
        variances.append(m / (1 - ema))
    v = torch.stack(variances)
    return (v - v.mean(0)).pow(2).mean(1).mean()


@pytest.mark.slow
@pytest.mark.parametrize("nonlinear", [False, True])
def test_fishr_update_matches_reference_including_warmup_and_adam_reset(nonlinear):
    torch.manual_seed(0)
    hparams = {**HP, "nonlinear_classifier": nonlinear}
    featurizer = WideFeaturizer() if nonlinear else TinyFeaturizer()
    algo = FishrAlgorithm((1, 2, 2), 3, 2, hparams, featurizer=featurizer).double()
    assert isinstance(algo.classifier, nn.Sequential) == nonlinear
    feat, head = copy.deepcopy(algo.featurizer), copy.deepcopy(algo.classifier)
    params = list(feat.parameters()) + list(head.parameters())
    make_adam = lambda: torch.optim.Adam(params, lr=HP["lr"], weight_decay=0.0)  # noqa: E731
    adam, ema_state = make_adam(), [None, None]
    for step in range(5):
        mb = batches(step)
        out = algo.update(mb)
        penalty = reference_fishr_penalty(feat, head, mb, ema_state, HP["ema"])
        x, y = torch.cat([b[0] for b in mb]), torch.cat([b[1] for b in mb])
        nll = F.cross_entropy(head(feat(x)), y)
        weight = HP["lambda"] if step >= HP["penalty_anneal_iters"] else 0.0
        if step == HP["penalty_anneal_iters"]:
            adam = make_adam()  # DomainBed re-creates Adam when the penalty starts
        objective = nll + weight * penalty
        adam.zero_grad()
        objective.backward()
        adam.step()
        assert out["penalty"] == pytest.approx(penalty.item(), rel=1e-10)
        assert out["loss"] == pytest.approx(objective.item(), rel=1e-10)
        for mine, ref in zip(algo.network.parameters(), params):
            torch.testing.assert_close(mine, ref, rtol=1e-9, atol=1e-12)
    assert int(algo.update_count) == 5


def test_fishr_without_adam_reset_would_differ():
    """The test above can fail: skipping the reset changes the parameters."""
    torch.manual_seed(0)
    a = FishrAlgorithm((1, 2, 2), 3, 2, HP, featurizer=TinyFeaturizer()).double()
    b = copy.deepcopy(a)
    b.fishr._switch_hooks.clear()
    for step in range(4):
        a.update(batches(step))
        b.update(batches(step))
    assert not torch.allclose(a.classifier.weight, b.classifier.weight)


def test_erm_update_is_adam_on_pooled_cross_entropy():
    torch.manual_seed(1)
    algo = ERM((1, 2, 2), 3, 2, HP, featurizer=TinyFeaturizer()).double()
    ref = copy.deepcopy(algo.network)
    adam = torch.optim.Adam(ref.parameters(), lr=HP["lr"])
    for step in range(3):
        mb = batches(10 + step)
        out = algo.update(mb)
        loss = F.cross_entropy(ref(torch.cat([b[0] for b in mb])), torch.cat([b[1] for b in mb]))
        adam.zero_grad()
        loss.backward()
        adam.step()
        assert out["loss"] == pytest.approx(loss.item())
    for mine, theirs in zip(algo.network.parameters(), ref.parameters()):
        torch.testing.assert_close(mine, theirs)
    assert algo.predict(torch.zeros(2, 1, 2, 2, dtype=torch.float64)).shape == (2, 3)


def test_bad_inputs_raise_value_error():
    algo = ERM((1, 2, 2), 3, 2, HP, featurizer=TinyFeaturizer())
    with pytest.raises(ValueError, match="training domains"):
        algo.update([(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long))])
    with pytest.raises(ValueError, match="unknown algorithm"):
        get_algorithm_class("DANN")
