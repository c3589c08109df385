"""The Fishr penalty (fishr_lite.penalty) against direct transcriptions of the two official
conventions and plain formulas (float64)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fishr_lite.grads import per_sample_grads
from fishr_lite.penalty import (
    COLORED_MNIST_CONVENTION,
    DOMAINBED_CONVENTION,
    DOMAINBED_EMA,
    DomainMovingAverage,
    convention_factor,
    domain_variances,
    fishr_penalty,
    reference_variance,
)

ENGINES = ["closed_form", "backpack", "torch.func"]


def binary_problem(sizes=(7, 9), d_in=5, d=4, seed=0):
    torch.manual_seed(seed)
    featurizer = nn.Sequential(nn.Linear(d_in, d), nn.Tanh()).double()
    head = nn.Linear(d, 1).double()
    xs = [torch.randn(n, d_in, dtype=torch.float64) for n in sizes]
    ys = [torch.randint(0, 2, (n,)).double() for n in sizes]
    return featurizer, head, xs, ys


# --- Colored MNIST script, transcribed: grads of the mean-reduced BCE times the batch size,
# per-parameter variance (or covariance / (n * D)), squared L2 summed, summed over domains.
def script_penalty(featurizer, head, xs, ys, variant="fishr"):
    variances = []
    for x, y in zip(xs, ys):
        z, n = featurizer(x), x.shape[0]
        rows = []
        for i in range(n):  # grad_batch of the mean loss: d (l_i / n) / d theta
            li = F.binary_cross_entropy_with_logits(head(z[i : i + 1]), y[i : i + 1, None]) / n
            rows.append(torch.autograd.grad(li, list(head.parameters()), create_graph=True))
        var = {}
        for k, name in enumerate(["weight", "bias"]):
            g = torch.stack([r[k].reshape(-1) for r in rows]) * n  # multiply by batch size
            if variant != "fishr_notcentered":
                g = g - g.mean(dim=0, keepdim=True)
            if variant == "fishr_offdiagonal":
                var[name] = torch.einsum("na,nb->ab", g, g) / (g.shape[0] * g.shape[1])
            else:
                var[name] = g.pow(2).mean(dim=0)
        variances.append(var)
    mean = {k: torch.stack([v[k] for v in variances]).mean(0) for k in variances[0]}
    l2 = lambda a, b: torch.cat([(a[k] - b[k]).reshape(-1) for k in sorted(a)]).pow(2).sum()
    return sum(l2(v, mean) for v in variances)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "variant, options",
    [
        ("fishr", {}),
        ("fishr_notcentered", {"centered": False}),
        ("fishr_offdiagonal", {"covariance": "full"}),
    ],
)
def test_colored_mnist_convention_value_and_featurizer_gradient(engine, variant, options):
    featurizer, head, xs, ys = binary_problem()
    expected = script_penalty(featurizer, head, xs, ys, variant)
    features = featurizer(torch.cat(xs))
    grads = per_sample_grads(head, features, torch.cat(ys), loss="bce", engine=engine)
    penalty = fishr_penalty(grads, [len(x) for x in xs], **options, **COLORED_MNIST_CONVENTION)
    torch.testing.assert_close(penalty, expected, rtol=1e-10, atol=1e-14)
    # gradient w.r.t. featurizer and head parameters vs the double-loop reference
    params = list(featurizer.parameters()) + list(head.parameters())
    for got, want in zip(torch.autograd.grad(penalty, params), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-13)


# --- DomainBed, transcribed: per-domain centered variance, MovingAverage with the 1/(1-ema)
# correction, mean squared difference over all coordinates, averaged over domains.
class TranscribedMovingAverage:
    def __init__(self, ema):
        self.ema, self.data, self.updates = ema, {}, 0

    def update(self, new):
        out = {}
        for name, value in new.items():
            value = value.view(1, -1)
            previous = torch.zeros_like(value) if self.updates == 0 else self.data[name]
            averaged = self.ema * previous + (1 - self.ema) * value
            out[name] = averaged / (1 - self.ema)
            self.data[name] = averaged.clone().detach()
        self.updates += 1
        return out


def domainbed_reference(grads, sizes, averages):
    per_domain = [{} for _ in sizes]
    for name, g in grads.items():
        start = 0
        for e, size in enumerate(sizes):
            block = g[start : start + size].reshape(size, -1)
            start += size
            per_domain[e][name] = (block - block.mean(0, keepdim=True)).pow(2).mean(0)
    per_domain = [avg.update(v) for avg, v in zip(averages, per_domain)]
    mean = {k: torch.stack([v[k] for v in per_domain]).mean(0) for k in per_domain[0]}
    l2 = lambda a, b: torch.cat([(a[k] - b[k]).reshape(-1) for k in sorted(a)]).pow(2).mean()
    return sum(l2(v, mean) for v in per_domain) / len(sizes)


def test_domainbed_convention_with_ema_over_steps():
    torch.manual_seed(3)
    sizes = [5, 6, 4]
    reference = [TranscribedMovingAverage(DOMAINBED_EMA) for _ in sizes]
    ours = DomainMovingAverage(DOMAINBED_EMA)
    for _ in range(4):
        grads = {"weight": torch.randn(15, 3, 4, dtype=torch.float64), "bias": torch.randn(15, 3, dtype=torch.float64)}
        expected = domainbed_reference(grads, sizes, reference)
        got = fishr_penalty(grads, sizes, moving_average=ours, **DOMAINBED_CONVENTION)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


def test_ema_gradient_flows_only_through_current_step():
    torch.manual_seed(4)
    ema = DomainMovingAverage(0.9)
    first = {"w": torch.rand(6, 3, dtype=torch.float64, requires_grad=True)}
    fishr_penalty(first, [3, 3], moving_average=ema)
    second = {"w": torch.rand(6, 3, dtype=torch.float64, requires_grad=True)}
    penalty = fishr_penalty(second, [3, 3], moving_average=ema)
    penalty.backward()
    assert first["w"].grad is None and second["w"].grad.abs().sum() > 0


def test_full_covariance_is_mean_outer_product():
    torch.manual_seed(5)
    g = {"w": torch.randn(7, 2, 3, dtype=torch.float64)}
    (v,) = domain_variances(g, [7], covariance="full")
    flat = g["w"].reshape(7, -1)
    centered = flat - flat.mean(0)
    expected = sum(torch.outer(c, c) for c in centered) / 7
    torch.testing.assert_close(v["w"], expected)


def test_diagonal_is_variance_and_notcentered_is_second_moment():
    torch.manual_seed(6)
    g = {"w": torch.randn(8, 5, dtype=torch.float64)}
    v_c, v_c2 = domain_variances(g, [3, 5])
    torch.testing.assert_close(v_c2["w"], g["w"][3:].var(0, unbiased=False))
    (v_nc,) = domain_variances(g, [8], centered=False)
    torch.testing.assert_close(v_nc["w"], g["w"].pow(2).mean(0))


def test_grad_scale_scales_variance_quadratically():
    g = {"w": torch.randn(6, 4, dtype=torch.float64)}
    base = fishr_penalty(g, [3, 3])
    torch.testing.assert_close(fishr_penalty(g, [3, 3], grad_scale=2.0), 16 * base)


@pytest.mark.parametrize(
    "sizes, match", [([1, 5], "at least 2"), ([3, 2], "add up"), ([], "empty")]
)
def test_bad_domain_sizes_raise(sizes, match):
    with pytest.raises(ValueError, match=match):
        fishr_penalty({"w": torch.randn(6, 2)}, sizes)


def test_non_finite_gradients_raise():
    g = torch.randn(6, 2)
    g[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fishr_penalty({"w": g}, [3, 3])


def test_moving_average_for_other_domains_or_shapes_raises():
    ema = DomainMovingAverage(0.95)
    fishr_penalty({"w": torch.randn(6, 2)}, [3, 3], moving_average=ema)
    with pytest.raises(ValueError, match="holds 2 domains"):
        fishr_penalty({"w": torch.randn(6, 2)}, [2, 2, 2], moving_average=ema)
    with pytest.raises(ValueError, match="shapes"):
        fishr_penalty({"w": torch.randn(6, 3)}, [3, 3], moving_average=ema)
    ema.reset()
    fishr_penalty({"w": torch.randn(6, 3)}, [3, 3], moving_average=ema)


@pytest.mark.parametrize(
    "kwargs", [{"covariance": "block"}, {"coordinate_reduction": "max"}, {"domain_reduction": "median"}]
)
def test_unknown_options_raise(kwargs):
    with pytest.raises(ValueError, match="not supported"):
        fishr_penalty({"w": torch.randn(6, 2)}, [3, 3], **kwargs)


def test_ema_out_of_range_raises():
    with pytest.raises(ValueError, match="ema"):
        DomainMovingAverage(1.0)


def test_per_domain_dicts_equal_concatenated_rows():
    torch.manual_seed(8)
    g = {"w": torch.randn(9, 2, 3, dtype=torch.float64), "b": torch.randn(9, 2, dtype=torch.float64)}
    per_domain = [{k: v[:4] for k, v in g.items()}, {k: v[4:] for k, v in g.items()}]
    torch.testing.assert_close(fishr_penalty(per_domain), fishr_penalty(g, [4, 5]))
    with pytest.raises(ValueError, match="differ"):
        fishr_penalty(per_domain, [5, 4])
    with pytest.raises(ValueError, match="at least 2"):
        fishr_penalty([{k: v[:1] for k, v in g.items()}, {k: v[1:] for k, v in g.items()}])


def test_reference_variance_is_the_formula_written_out():
    torch.manual_seed(9)
    g = torch.randn(6, 3, dtype=torch.float64)
    for centered in (True, False):
        expected = []
        for k in range(3):
            column = [float(g[i, k]) for i in range(6)]
            mean = sum(column) / 6 if centered else 0.0
            expected.append(sum((c - mean) ** 2 for c in column) / 6)
        torch.testing.assert_close(reference_variance(g, centered), torch.tensor(expected, dtype=torch.float64))


def test_the_two_conventions_differ_by_domains_times_coordinates():
    torch.manual_seed(10)
    sizes = [4, 5, 6]
    g = {"w": torch.randn(15, 2, 3, dtype=torch.float64), "b": torch.randn(15, 2, dtype=torch.float64)}
    domainbed = fishr_penalty(g, sizes, **DOMAINBED_CONVENTION)
    colored_mnist = fishr_penalty(g, sizes, **COLORED_MNIST_CONVENTION)
    assert convention_factor(3, 8) == 24  # E domains x D = 6 + 2 coordinates
    torch.testing.assert_close(colored_mnist, 24 * domainbed)
    # the first update of a moving average returns v_e itself: same factor at step one
    first = fishr_penalty(g, sizes, moving_average=DomainMovingAverage(), **DOMAINBED_CONVENTION)
    torch.testing.assert_close(colored_mnist, 24 * first)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "update_false"])
def test_evaluation_leaves_the_moving_average_alone(mode):
    torch.manual_seed(11)
    steps = [{"w": torch.rand(8, 3, dtype=torch.float64)} for _ in range(3)]
    probe = {"w": 100 * torch.rand(8, 3, dtype=torch.float64)}
    fresh, logged = DomainMovingAverage(0.9), DomainMovingAverage(0.9)
    contexts = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
    for g in steps:
        expected = fishr_penalty(g, [4, 4], moving_average=fresh)
        if mode == "update_false":
            fishr_penalty(probe, [4, 4], moving_average=logged, update=False)
        else:
            with contexts[mode]():
                fishr_penalty(probe, [4, 4], moving_average=logged)
        torch.testing.assert_close(fishr_penalty(g, [4, 4], moving_average=logged), expected)


def test_an_explicit_update_under_no_grad_is_stored():
    average = DomainMovingAverage(0.5)
    with torch.no_grad():
        fishr_penalty({"w": torch.ones(4, 2)}, [2, 2], moving_average=average, update=True)
    assert average.state is not None
