"""DomainBed's IRM, VREx, IGA, CORAL, MMD, GroupDRO, Mixup, Fish, ANDMask and SANDMask against
independent transcriptions of DomainBed's ``update`` (plain autograd loops, float64, a tiny
network, several optimizer steps, including penalty annealing and the Adam reset)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import autograd, nn

from fishr_lite.domainbed.algorithms import ALGORITHM_CLASSES, get_algorithm_class
from fishr_lite.domainbed.hparams import default_hparams, random_hparams


class TinyFeaturizer(nn.Sequential):
    n_outputs = 3

    def __init__(self):
        super().__init__(nn.Flatten(), nn.Linear(4, 3), nn.Tanh())


SIZES = (6, 8, 7)


def batches(seed, n_domains):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (n,), generator=g)) for n in SIZES[:n_domains]]


def adam(net, hp):
    return torch.optim.Adam(net.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])


def backward_step(state, loss):
    state["opt"].zero_grad()
    loss.backward()
    state["opt"].step()


# ---- transcriptions of DomainBed's update rules (net = Sequential(featurizer, classifier)) ----

def irm_step(net, state, mb, step, hp):
    weight = hp["irm_lambda"] if step >= hp["irm_penalty_anneal_iters"] else 1.0
    all_logits, idx, nll, penalty = net(torch.cat([x for x, _ in mb])), 0, 0.0, 0.0
    for x, y in mb:
        logits = all_logits[idx:idx + len(x)]
        idx += len(x)
        nll += F.cross_entropy(logits, y)
        scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        g1 = autograd.grad(F.cross_entropy(logits[::2] * scale, y[::2]), [scale], create_graph=True)[0]
        g2 = autograd.grad(F.cross_entropy(logits[1::2] * scale, y[1::2]), [scale], create_graph=True)[0]
        penalty += torch.sum(g1 * g2)
    nll, penalty = nll / len(mb), penalty / len(mb)
    loss = nll + weight * penalty
    if step == hp["irm_penalty_anneal_iters"]:
        state["opt"] = adam(net, hp)
    backward_step(state, loss)
    return {"loss": loss.item(), "nll": nll.item(), "penalty": penalty.item()}


def vrex_step(net, state, mb, step, hp):
    weight = hp["vrex_lambda"] if step >= hp["vrex_penalty_anneal_iters"] else 1.0
    all_logits, idx = net(torch.cat([x for x, _ in mb])), 0
    losses = torch.zeros(len(mb), dtype=torch.float64)
    for i, (x, y) in enumerate(mb):
        losses[i] = F.cross_entropy(all_logits[idx:idx + len(x)], y)
        idx += len(x)
    mean = losses.mean()
    penalty = ((losses - mean) ** 2).mean()
    loss = mean + weight * penalty
    if step == hp["vrex_penalty_anneal_iters"]:
        state["opt"] = adam(net, hp)
    backward_step(state, loss)
    return {"loss": loss.item(), "nll": mean.item(), "penalty": penalty.item()}


def iga_step(net, state, mb, step, hp):
    params = list(net.parameters())
    total, grads = 0.0, []
    for x, y in mb:
        env_loss = F.cross_entropy(net(x), y)
        total += env_loss
        grads.append(autograd.grad(env_loss, params, create_graph=True))
    mean_loss = total / len(mb)
    mean_grad = autograd.grad(mean_loss, params, retain_graph=True)
    penalty = sum((g - m).pow(2).sum() for grad in grads for g, m in zip(grad, mean_grad))
    backward_step(state, mean_loss + hp["penalty"] * penalty)
    return {"loss": mean_loss.item(), "penalty": penalty.item()}


def coral_distance(a, b):
    ca, cb = a - a.mean(0, keepdim=True), b - b.mean(0, keepdim=True)
    cov_a, cov_b = ca.t() @ ca / (len(a) - 1), cb.t() @ cb / (len(b) - 1)
    return (a.mean(0) - b.mean(0)).pow(2).mean() + (cov_a - cov_b).pow(2).mean()


def mmd_distance(a, b):
    def k(u, v):
        d = ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)
        return sum(torch.exp(-g * d) for g in [0.001, 0.01, 0.1, 1, 10, 100, 1000])
    return k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()


def alignment_step(distance):
    def step_fn(net, state, mb, step, hp):
        featurizer, classifier = net[0], net[1]
        feats = [featurizer(x) for x, _ in mb]
        objective = sum(F.cross_entropy(classifier(z), y) for z, (_, y) in zip(feats, mb)) / len(mb)
        pairs = [(i, j) for i in range(len(mb)) for j in range(i + 1, len(mb))]
        penalty = sum(distance(feats[i], feats[j]) for i, j in pairs) / len(pairs)
        backward_step(state, objective + hp["mmd_gamma"] * penalty)
        return {"loss": objective.item(), "penalty": penalty.item()}
    return step_fn


def groupdro_step(net, state, mb, step, hp):
    if "q" not in state:
        state["q"] = torch.ones(len(mb), dtype=torch.float64)
    q, losses = state["q"], []
    for m, (x, y) in enumerate(mb):
        losses.append(F.cross_entropy(net(x), y))
        q[m] *= torch.exp(hp["groupdro_eta"] * losses[m].detach())
    q /= q.sum()
    loss = sum(q[m] * losses[m] for m in range(len(mb)))
    backward_step(state, loss)
    return {"loss": loss.item()}


def mixup_step(net, state, mb, step, hp):
    perm = torch.randperm(len(mb)).tolist()
    objective = 0.0
    for i in range(len(mb)):
        (xi, yi), (xj, yj) = mb[perm[i]], mb[perm[i + 1 if i < len(mb) - 1 else 0]]
        n = min(len(xi), len(xj))
        lam = np.random.beta(hp["mixup_alpha"], hp["mixup_alpha"])
        predictions = net(lam * xi[:n] + (1 - lam) * xj[:n])
        objective += lam * F.cross_entropy(predictions, yi[:n]) + (1 - lam) * F.cross_entropy(predictions, yj[:n])
    objective /= len(mb)
    backward_step(state, objective)
    return {"loss": objective.item()}


def fish_step(net, state, mb, step, hp):
    inner = copy.deepcopy(net)
    inner_opt = adam(inner, hp)
    if "inner_state" in state:
        inner_opt.load_state_dict(state["inner_state"])
    for x, y in mb:
        loss = F.cross_entropy(inner(x), y)
        inner_opt.zero_grad()
        loss.backward()
        inner_opt.step()
    state["inner_state"] = inner_opt.state_dict()
    meta, fast = net.state_dict(), inner.state_dict()
    net.load_state_dict({k: meta[k] + hp["meta_lr"] * (fast[k] - meta[k]) for k in meta})
    return {"loss": loss.item()}


def masked_step(mask_fn):
    def step_fn(net, state, mb, step, hp):
        params, per_param, mean_loss = list(net.parameters()), [[] for _ in net.parameters()], 0.0
        for x, y in mb:
            env_loss = F.cross_entropy(net(x), y)
            mean_loss += env_loss.item() / len(mb)
            for store, g in zip(per_param, autograd.grad(env_loss, params)):
                store.append(g)
        state["opt"].zero_grad()
        for p, grads in zip(params, per_param):
            grads = torch.stack(grads)
            mask = mask_fn(grads, hp)
            p.grad = mask * grads.mean(0)
            p.grad *= 1.0 / (1e-10 + mask.sum() / mask.numel())
        state["opt"].step()
        return {"loss": mean_loss}
    return step_fn


def and_mask(grads, hp):
    return (torch.sign(grads).mean(0).abs() >= hp["tau"]).to(grads.dtype)


def sand_mask(grads, hp):
    var = grads.var(dim=0)
    var[torch.isnan(var)] = 1e-17
    mask = torch.tanh(hp["k"] * (1.0 / var) * (torch.sign(grads).mean(0).abs() - hp["tau"]))
    mask = torch.clamp(mask, min=0.0)
    mask[torch.isnan(mask)] = 1e-17
    return mask


BASE = {"lr": 0.05, "weight_decay": 0.0}
CASES = {
    "IRM": (irm_step, {"irm_lambda": 30.0, "irm_penalty_anneal_iters": 2}, 2),
    "VREx": (vrex_step, {"vrex_lambda": 30.0, "vrex_penalty_anneal_iters": 2}, 3),
    "IGA": (iga_step, {"penalty": 10.0}, 2),
    "CORAL": (alignment_step(coral_distance), {"mmd_gamma": 3.0}, 3),
    "MMD": (alignment_step(mmd_distance), {"mmd_gamma": 3.0}, 3),
    "GroupDRO": (groupdro_step, {"groupdro_eta": 0.5}, 3),
    "Mixup": (mixup_step, {"mixup_alpha": 0.4}, 3),
    "Fish": (fish_step, {"meta_lr": 0.3}, 3),
    "ANDMask": (masked_step(and_mask), {"tau": 0.8}, 3),
    "SANDMask": (masked_step(sand_mask), {"tau": 0.5, "k": 1e-3}, 3),
}


def run_both(name, hparams=None, n_steps=5, wd=0.0):
    step_fn, specific, n_domains = CASES[name]
    hp = {**BASE, "weight_decay": wd, **specific, **(hparams or {})}
    torch.manual_seed(0)
    algo = get_algorithm_class(name)((1, 2, 2), 3, n_domains, hp, featurizer=TinyFeaturizer()).double()
    net = copy.deepcopy(algo.network)
    state = {"opt": adam(net, hp)}
    outputs = []
    for step in range(n_steps):
        mb = batches(step, n_domains)
        torch.manual_seed(100 + step)
        np.random.seed(100 + step)
        mine = algo.update(mb)
        torch.manual_seed(100 + step)
        np.random.seed(100 + step)
        ref = step_fn(net, state, mb, step, hp)
        outputs.append((mine, ref))
        for key, value in ref.items():
            assert mine[key] == pytest.approx(value, rel=1e-9, abs=1e-13), (name, step, key)
        for a, b in zip(algo.network.parameters(), net.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    return algo, net, outputs


@pytest.mark.parametrize("name", sorted(CASES))
def test_update_matches_domainbed_transcription(name):
    torch.manual_seed(0)
    start = [p.detach().clone() for p in TinyFeaturizer().parameters()]
    algo, _, outputs = run_both(name)
    assert len(outputs) == 5
    assert not torch.allclose(start[0].double(), algo.featurizer[1].weight)  # it trained


@pytest.mark.parametrize("name", ["IRM", "GroupDRO", "Fish", "SANDMask"])
def test_update_matches_with_weight_decay(name):
    run_both(name, n_steps=3, wd=1e-2)


@pytest.mark.parametrize("name,key", [("IRM", "irm_penalty_anneal_iters"), ("VREx", "vrex_penalty_anneal_iters")])
def test_the_adam_reset_matters(name, key):
    """Without the reset at the anneal step the parameters differ: the tests above can fail."""
    _, specific, n_domains = CASES[name]
    hp = {**BASE, **specific}
    torch.manual_seed(0)
    a = get_algorithm_class(name)((1, 2, 2), 3, n_domains, hp, featurizer=TinyFeaturizer()).double()
    b = copy.deepcopy(a)
    b.schedule.switches_on = lambda step: False
    for step in range(4):
        a.update(batches(step, n_domains))
        b.update(batches(step, n_domains))
    lam = specific[key.replace("penalty_anneal_iters", "lambda")]
    assert int(a.update_count) == 4 and (a.schedule(1), a.schedule(2)) == (1.0, lam)
    assert not torch.allclose(a.classifier.weight, b.classifier.weight)


def test_registry_hparams_are_domainbed_defaults_and_ranges():
    expected = {"IRM": {"irm_lambda": 1e2, "irm_penalty_anneal_iters": 500},
                "VREx": {"vrex_lambda": 1e1, "vrex_penalty_anneal_iters": 500},
                "CORAL": {"mmd_gamma": 1.0}, "MMD": {"mmd_gamma": 1.0},
                "GroupDRO": {"groupdro_eta": 1e-2}, "Mixup": {"mixup_alpha": 0.2},
                "Fish": {"meta_lr": 0.5}, "IGA": {"penalty": 1000}, "ANDMask": {"tau": 1},
                "SANDMask": {"tau": 1.0, "k": 10.0}}
    for name, values in expected.items():
        defaults = default_hparams(name, "ColoredMNIST")
        assert {k: defaults[k] for k in values} == values, name
    draws = {name: [random_hparams(name, "RotatedMNIST", s) for s in range(100)] for name in expected}
    assert all(0.1 <= d["irm_lambda"] <= 1e5 and 1 <= d["irm_penalty_anneal_iters"] < 1e4 for d in draws["IRM"])
    assert all(1e-3 <= d["groupdro_eta"] <= 0.1 for d in draws["GroupDRO"])
    assert all(0.1 <= d["mixup_alpha"] <= 10 and 0.1 <= d["mmd_gamma"] + 0 <= 10 for d in
               [{**a, **b} for a, b in zip(draws["Mixup"], draws["MMD"])])
    assert {d["meta_lr"] for d in draws["Fish"]} == {0.05, 0.1, 0.5}
    assert all(10 <= d["penalty"] <= 1e5 for d in draws["IGA"])
    assert all(0.5 <= d["tau"] <= 1 for d in draws["ANDMask"])
    assert all(0 <= d["tau"] <= 1 and 1e-3 <= d["k"] <= 1e5 for d in draws["SANDMask"])
    assert set(expected) | {"ERM", "Fishr"} == set(ALGORITHM_CLASSES)


@pytest.mark.slow
def test_every_algorithm_trains_the_default_network():
    for name in ALGORITHM_CLASSES:
        hp = {**default_hparams(name, "ColoredMNIST"), "mnist_cnn_width": 8, "penalty_anneal_iters": 0}
        torch.manual_seed(0)
        algo = get_algorithm_class(name)((2, 28, 28), 2, 2, hp)
        mb = [(torch.randn(4, 2, 28, 28), torch.randint(0, 2, (4,))) for _ in range(2)]
        before = [p.detach().clone() for p in algo.network.parameters()]
        out = algo.update(mb)
        assert np.isfinite(out["loss"]), name
        if name == "SANDMask":  # DomainBed's default tau = 1 gives a zero mask: no step at all
            assert all(torch.equal(a, b) for a, b in zip(before, algo.network.parameters()))
            continue
        assert any(not torch.equal(a, b) for a, b in zip(before, algo.network.parameters())), name
        assert algo.predict(mb[0][0]).shape == (4, 2)
