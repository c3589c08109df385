"""Training-step cost of Fishr vs ERM on this machine, side by side in one process.

    python benchmarks/bench_step.py            # full run (a few minutes on 2 CPU cores)
    python benchmarks/bench_step.py --quick    # tiny sizes, for CI smoke runs
    python benchmarks/bench_step.py --device cuda   # the same cases on a GPU

Measures (repeats interleaved round-robin, medians reported):

1. Colored MNIST MLP (392 -> 390 -> 390 -> 1, full batch, 2 domains x 25,000 samples):
   one Adam step of ERM; of Fishr with each per-sample gradient engine, the model stopping
   at the features and the penalty applying the head (``FishrObjective.logits_and_penalty``),
   and with the closed form's kernels compiled (``fishr_lite.compiled_variance``: then the
   head and the variances are one node, ``fishr_lite.fused_head``); of the naive pattern
   (BackPACK hooks fired by a whole-network ``backward(create_graph=True)``).
2. The ERM step next to the time its matrix products need: at the GEMM rate of a square
   float32 matmul measured in the same run, and timed directly with the step's own shapes.
3. DomainBed's MNIST_CNN shape (conv 64/128/128/128 + GroupNorm, 2x28x28 input, batch 64):
   per-sample gradients of all parameters by torch.func and BackPACK vs a Python loop.

Writes ``benchmarks/results/bench_step_<date>_<host>.json`` (or ``--out-dir``).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import fishr_lite
from fishr_lite.cpu_memory import minor_page_faults, reuse_freed_memory, reusing_freed_memory
from fishr_lite.domainbed.networks import MNIST_CNN
from fishr_lite.experiments.coloredmnist import MLP, training_batches
from fishr_lite.compiled_variance import compiled_closed_form
from fishr_lite.fused_head import linear_head_with_variances
from fishr_lite.grads import loop_grads, per_sample_grads, summed_loss
from fishr_lite.linear_relu import _KERNEL as _ONEDNN_LINEAR
from fishr_lite.linear_relu import fused_linear_relu, takes_fused_path
from fishr_lite.objectives import make_objective
from fishr_lite.penalty import COLORED_MNIST_CONVENTION, fishr_penalty

TARGETS = {
    "fishr_closed_form_over_erm_max": 1.05,  # also checked for the closed form's compiled kernels
    "fishr_backpack_over_erm_max": 1.25,
    "erm_over_step_shapes_gemm_time_max": 1.15,
    "cnn_share_of_ceiling_min_cpu": 0.80,  # torch.func's speed-up over the loop / the ceiling
    "per_sample_speedup_over_loop_min_gpu": 20.0,
}
L2_WEIGHT = 0.00110794568  # the Colored MNIST script's weight decay term
PENALTY_WEIGHT = 91257.18613115903


def mnist_cnn(in_channels: int = 2, classes: int = 2) -> nn.Sequential:
    """DomainBed's MNIST_CNN featurizer (conv -> ReLU -> GroupNorm, x4) plus a linear head."""
    featurizer = MNIST_CNN((in_channels, 28, 28))
    return nn.Sequential(featurizer, nn.Linear(featurizer.n_outputs, classes))


def make_mlp_step(kind: str, model: MLP, data) -> Callable[[], None]:
    """One full-batch Adam step: risk + l2 + weight * penalty, loss divided by the weight."""
    optimizer = torch.optim.Adam(model.parameters(), lr=4.9e-4)
    params = list(model.parameters())

    def regularized(risk: torch.Tensor) -> torch.Tensor:
        return risk + L2_WEIGHT * sum(p.pow(2).sum() for p in params)

    if kind == "naive_backpack_whole_network":
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad

        extend(model.head)

        def step() -> None:
            sizes = [len(y) for _, y in data]
            all_logits = model.head(torch.cat([model.features(x) for x, _ in data])).squeeze(-1)
            logits = torch.split(all_logits, sizes)  # one head call: BackPACK stores one input
            risk = torch.stack([F.binary_cross_entropy_with_logits(s, y) for s, (_, y) in zip(logits, data)]).mean()
            with backpack(BatchGrad()):
                summed_loss(all_logits, torch.cat([y for _, y in data]), "bce").backward(
                    retain_graph=True, create_graph=True
                )
            grads = {n: p.grad_batch for n, p in model.head.named_parameters()}
            penalty = fishr_penalty(grads, sizes, **COLORED_MNIST_CONVENTION)
            loss = (regularized(risk) + PENALTY_WEIGHT * penalty) / PENALTY_WEIGHT
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for p in model.head.parameters():
                del p.grad_batch

        return step

    # the case names are record keys: "fishr_functorch" is the engine now called "torch.func"
    compiled = kind == "fishr_closed_form_compiled"  # the closed form with its compiled kernels
    engine = "closed_form" if compiled else kind.removeprefix("fishr_")
    options = {} if kind == "erm" else {"engine": engine, "convention": "colored_mnist"}
    objective = make_objective("erm" if kind == "erm" else "fishr", model.head, "bce", **options)

    def step() -> None:  # the training script's batches: with Fishr the penalty applies the head
        with compiled_closed_form(compiled):
            batches, penalty = training_batches(model, objective, data)
            loss = regularized(objective.risks(batches).mean())
            if penalty is not None:
                loss = (loss + PENALTY_WEIGHT * penalty) / PENALTY_WEIGHT
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return step


def erm_matmul_flops(n_total: int, dims=(392, 390, 390, 1)) -> float:
    """Forward (2 n in out per layer), weight grads (same), input grads (all but the first layer)."""
    pairs = list(zip(dims[:-1], dims[1:]))
    forward = sum(2 * n_total * a * b for a, b in pairs)
    return 2 * forward + sum(2 * n_total * a * b for a, b in pairs[1:])


def make_step_gemms(n: int, domains: int, dims=(392, 390, 390, 1),
                    device: str = "cpu") -> tuple[Callable[[], None], str]:
    """The ERM step's matrix products with their exact shapes, on random data, by the kernels
    the step calls: the hidden layers' forward and input gradient by oneDNN's linear kernel
    where ``fishr_lite.linear_relu`` takes it (float32 on a CPU), everything else by ``@``.
    Returns the timed call and a description of those kernels."""
    pairs = list(zip(dims[:-1], dims[1:]))
    acts = [torch.randn(n, a, device=device) for a, _ in pairs]
    weights = [torch.randn(b, a, device=device) for a, b in pairs]
    outs = [torch.randn(n, b, device=device) for _, b in pairs]
    hidden = len(pairs) - 1  # the last pair is the head, an nn.Linear
    onednn = [takes_fused_path(a, w, torch.zeros(w.shape[0], device=device)) and k < hidden
              for k, (a, w) in enumerate(zip(acts, weights))]

    def run() -> None:
        for _ in range(domains):
            for k, (a, w, g) in enumerate(zip(acts, weights, outs)):
                if onednn[k]:
                    _ONEDNN_LINEAR(a, w, None, "none", [], "")  # forward
                else:
                    a @ w.T
                g.T @ a  # weight gradient
                if k > 0:  # input gradient
                    _ONEDNN_LINEAR(g, w.t(), None, "none", [], "") if onednn[k] else g @ w
    kernels = "onednn forward and input gradient of the hidden layers, @ for the rest" if any(onednn) else "@"
    return run, kernels


def make_closed_form_parts(n: int, domains: int, device: str = "cpu") -> dict[str, Callable[[], None]]:
    """The head and the closed-form penalty alone, on stored features (n, 390) of ``domains``
    domains: the head's scores and their mean BCE, forward only and forward with the backward
    to the features and the head's parameters (what ERM's head costs in the step), and the
    same with the head and the variances in one node (``fishr_lite.fused_head``, as the
    closed-form step computes them), the variances added to the risk."""
    gen = torch.Generator().manual_seed(1)
    head = nn.Linear(390, 1).to(device)
    features = [torch.rand(n, 390, generator=gen).to(device).requires_grad_() for _ in range(domains)]
    targets = [torch.randint(0, 2, (n,), generator=gen).float().to(device) for _ in range(domains)]
    inputs = features + list(head.parameters())

    def head_loss() -> torch.Tensor:
        return sum(F.binary_cross_entropy_with_logits(head(z).squeeze(-1), y) for z, y in zip(features, targets))

    def node_loss() -> torch.Tensor:
        total = 0
        for z, y in zip(features, targets):
            scores, variances = linear_head_with_variances(head, z, y)
            total = total + F.binary_cross_entropy_with_logits(scores.squeeze(-1), y)
            total = total + variances["weight"].sum() + variances["bias"].sum()
        return total

    def forward_only(loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                loss()
        return run

    def forward_backward(loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
        return lambda: torch.autograd.grad(loss(), inputs)

    return {"head_forward": forward_only(head_loss), "head_forward_backward": forward_backward(head_loss),
            "closed_form_node_forward": forward_only(node_loss),
            "closed_form_node_forward_backward": forward_backward(node_loss)}


def make_square_gemm(size: int, device: str = "cpu") -> Callable[[], None]:
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    return lambda: a @ b


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that a timer measures it (no-op on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def round_robin(tasks: dict[str, Callable[[], None]], repeats: int, warmup: int = 1,
                device: str = "cpu", faults: dict[str, list[int]] | None = None) -> dict[str, list[float]]:
    """Run each task ``warmup`` times, then ``repeats`` rounds of one call each, interleaved;
    if ``faults`` is given, it receives each call's count of minor page faults."""
    for task in tasks.values():
        for _ in range(warmup):
            task()
    times: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(repeats):
        for name, task in tasks.items():
            synchronize(device)
            faults_before = minor_page_faults()
            start = time.perf_counter()
            task()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            if faults is not None:
                faults.setdefault(name, []).append(minor_page_faults() - faults_before)
    return times


def per_round_spread(times: dict[str, list[float]], kinds: list[str]) -> dict[str, dict[str, float]]:
    """min, median and max over the rounds of time[kind][i] / time["erm"][i]: the cases of one
    round share the machine's load, so these ratios show the spread a single median hides."""
    spread = {}
    for kind in kinds:
        ratios = [t / e for t, e in zip(times[kind], times["erm"])]
        spread[kind] = {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)}
    return spread


def where_time_goes(tasks: dict[str, Callable[[], None]], kinds: list[str], top: int = 8) -> dict:
    """Self time (ms) of the ``top`` heaviest operators of one call of each case, by
    ``torch.profiler`` after the timed rounds (the profiler's overhead stays out of the times)."""
    from torch.profiler import ProfilerActivity, profile

    breakdown = {}
    for kind in kinds:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            tasks[kind]()
        events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in events)
        breakdown[kind] = {"total_ms": total / 1e3,
                           "top_ops_ms": {e.key: e.self_cpu_time_total / 1e3 for e in events[:top]}}
    return breakdown


def bench_mlp(n_per_domain: int, repeats: int, gemm_size: int, device: str = "cpu",
              breakdown: bool = False) -> dict:
    torch.manual_seed(0)
    data = [(torch.rand(n_per_domain, 392, device=device),
             torch.randint(0, 2, (n_per_domain,), device=device).float()) for _ in range(2)]
    base = MLP(hidden_dim=390).to(device)
    kinds = ["erm", "fishr_closed_form", "fishr_closed_form_compiled", "fishr_backpack", "fishr_functorch",
             "naive_backpack_whole_network"]
    tasks = {kind: make_mlp_step(kind, copy.deepcopy(base), data) for kind in kinds}
    skipped = {}
    try:  # its first call compiles the kernels: where torch.compile cannot build them, say why
        tasks["fishr_closed_form_compiled"]()
    except RuntimeError as error:
        skipped["fishr_closed_form_compiled"] = str(error)
        kinds.remove("fishr_closed_form_compiled")
        del tasks["fishr_closed_form_compiled"]
    erm_plain = make_mlp_step("erm", copy.deepcopy(base), data)

    def erm_plain_layers() -> None:  # Linear, then ReLU: the ERM step without the fused kernel
        with fused_linear_relu(False):
            erm_plain()

    tasks["erm_plain_layers"] = erm_plain_layers
    tasks["gemm_square"] = make_square_gemm(gemm_size, device)
    tasks["gemm_step_shapes"], step_gemm_kernels = make_step_gemms(n_per_domain, 2, device=device)
    tasks.update(make_closed_form_parts(n_per_domain, 2, device=device))
    faults: dict[str, list[int]] = {}
    times = round_robin(tasks, repeats, device=device, faults=faults)
    medians = {name: statistics.median(t) for name, t in times.items()}
    gemm_rate = 2 * gemm_size**3 / medians["gemm_square"]
    flops = erm_matmul_flops(2 * n_per_domain)
    extra = {"where_time_goes": where_time_goes(tasks, ["erm", "fishr_closed_form", "fishr_backpack"])} if breakdown else {}
    return {**extra,
        "n_per_domain": n_per_domain,
        "domains": 2,
        "repeats": repeats,
        "times_s": times,
        "median_s": medians,
        **({"skipped_cases": skipped} if skipped else {}),  # case -> why it could not run
        "ratio_to_erm": {k: medians[k] / medians["erm"] for k in kinds},
        "ratio_to_erm_per_round": per_round_spread(times, kinds),
        # the ERM step with Linear then ReLU (no fused kernel) over the step the cases use
        "erm_plain_layers_over_erm": medians["erm_plain_layers"] / medians["erm"],
        "erm_plain_layers_over_erm_per_round": per_round_spread(times, ["erm_plain_layers"])["erm_plain_layers"],
        # the closed form's extra time in the step, and the node of head and variances timed
        # alone against the head alone (make_closed_form_parts; records before 2026-12-06, 21:00
        # have "closed_form_parts" instead: the penalty alone, eager, then the addition of its
        # feature gradient to the head's)
        "closed_form_node_parts": closed_form_parts(medians),
        # 4 KB pages the kernel had to supply during one call: fresh memory for large tensors
        "minor_page_faults_median": {name: statistics.median(f) for name, f in faults.items()},
        "gemm": {
            "square_size": gemm_size,
            "rate_gflops": gemm_rate / 1e9,
            "erm_matmul_gflop": flops / 1e9,
            "erm_matmul_time_at_rate_s": flops / gemm_rate,
            "erm_over_gemm_time": medians["erm"] / (flops / gemm_rate),
            "step_shapes_gemm_time_s": medians["gemm_step_shapes"],
            # from 2026-12-06 on, the hidden layers' forward and input-gradient products by the
            # oneDNN kernel the step uses (before: every product by `@`)
            "step_shapes_kernels": step_gemm_kernels,
            "erm_over_step_shapes_gemm_time": medians["erm"] / medians["gemm_step_shapes"],
            "erm_plain_layers_over_step_shapes_gemm_time": medians["erm_plain_layers"] / medians["gemm_step_shapes"],
        },
    }


def closed_form_parts(medians: dict[str, float]) -> dict[str, float]:
    """Where the closed form's extra step time goes: the node of head and variances alone,
    forward and forward + backward, minus the head alone, against the step's extra time."""
    extra = medians["fishr_closed_form"] - medians["erm"]
    forward = medians["closed_form_node_forward"] - medians["head_forward"]
    both = medians["closed_form_node_forward_backward"] - medians["head_forward_backward"]
    return {"step_extra_s": extra, "forward_extra_s": forward, "backward_extra_s": both - forward,
            "node_extra_over_step_extra": both / extra if extra > 0 else float("nan")}


def bench_cnn(batch: int, repeats: int, device: str = "cpu") -> dict:
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    torch.manual_seed(0)
    model = mnist_cnn().to(device)
    x, y = torch.randn(batch, 2, 28, 28, device=device), torch.randint(0, 2, (batch,), device=device)
    bp_model = copy.deepcopy(model)
    for module in bp_model.modules():  # BackPACK has no BatchGrad rule for GroupNorm
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            extend(module)

    def functorch() -> None:
        with torch.no_grad():
            per_sample_grads(model, x, y, loss="ce", engine="torch.func")

    def backpack_batchgrad() -> None:
        with backpack(BatchGrad()):
            summed_loss(bp_model(x), y, "ce").backward()
        for p in bp_model.parameters():
            p.grad = None
            if hasattr(p, "grad_batch"):
                del p.grad_batch

    def loop() -> None:
        loop_grads(model, x, y, loss="ce", create_graph=False)

    def batch_gradient() -> None:  # the summed gradient only: a floor for any per-sample engine
        model.zero_grad(set_to_none=True)
        summed_loss(model(x), y, "ce").backward()

    tasks = {"functorch": functorch, "backpack": backpack_batchgrad, "loop": loop, "batch_gradient": batch_gradient}
    times = round_robin(tasks, repeats, device=device)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "batch": batch,
        "input_shape": [2, 28, 28],
        "repeats": repeats,
        "times_s": times,
        "median_s": medians,
        "speedup_over_loop": {k: medians["loop"] / medians[k] for k in ("functorch", "backpack")},
        # per-sample gradients cost at least one batched backward: loop / batch_gradient bounds
        # the speed-up any engine can reach on this machine
        "speedup_ceiling": medians["loop"] / medians["batch_gradient"],
        "note": "BackPACK has no BatchGrad rule for GroupNorm: its per-sample gradients cover conv and linear parameters only.",
    }


def provenance(device: str = "cpu") -> dict:
    try:
        import backpack

        backpack_version = getattr(backpack, "__version__", None)
        if backpack_version is None:
            from importlib.metadata import version

            backpack_version = version("backpack-for-pytorch")
    except Exception:  # pragma: no cover
        backpack_version = None
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except Exception:
        commit = None
    try:  # transparent huge pages: the kernel's mode, and whether PyTorch asks for them
        thp_mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        thp_mode = None
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "fishr_lite": fishr_lite.__version__,
        "torch": torch.__version__,
        "backpack": backpack_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None,
        "transparent_hugepage": thp_mode,
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "reuse_freed_memory": reusing_freed_memory(),
        "git_commit": commit,
    }


def check_targets(mlp: dict, cnn: dict, device: str = "cpu") -> dict:
    """[value, met] for each target: the MLP ratios, and for the CNN the torch.func speed-up
    as a share of the machine's ceiling (CPU) or over the loop (GPU)."""
    ratios, erm_over_gemms = mlp["ratio_to_erm"], mlp["gemm"]["erm_over_step_shapes_gemm_time"]
    met = {
        f"{case}_over_erm": [ratios[case], ratios[case] <= TARGETS["fishr_closed_form_over_erm_max"]]
        for case in ("fishr_closed_form", "fishr_closed_form_compiled") if case in ratios  # compiled: if built
    }
    met["fishr_backpack_over_erm"] = [ratios["fishr_backpack"], ratios["fishr_backpack"] <= TARGETS["fishr_backpack_over_erm_max"]]
    met["erm_over_step_shapes_gemm_time"] = [erm_over_gemms, erm_over_gemms <= TARGETS["erm_over_step_shapes_gemm_time_max"]]
    speedup = cnn["speedup_over_loop"]["functorch"]
    if torch.device(device).type == "cuda":
        met["per_sample_speedup_over_loop"] = [speedup, speedup >= TARGETS["per_sample_speedup_over_loop_min_gpu"]]
    else:
        share = speedup / cnn["speedup_ceiling"]
        met["cnn_share_of_ceiling"] = [share, share >= TARGETS["cnn_share_of_ceiling_min_cpu"]]
    return met


def print_table(record: dict) -> None:
    mlp, cnn = record["mlp"], record["cnn"]
    where = record["provenance"].get("gpu") or record["provenance"]["cpu"]
    print(f"Colored MNIST MLP step, {mlp['domains']} x {mlp['n_per_domain']} samples, median of {mlp['repeats']}, on {where}:")
    spread = mlp.get("ratio_to_erm_per_round", {})
    for kind, ratio in mlp["ratio_to_erm"].items():
        rounds = spread.get(kind)
        per_round = f"   (per round {rounds['min']:.2f}-{rounds['max']:.2f})" if rounds else ""
        faults = mlp.get("minor_page_faults_median", {}).get(kind)
        paged = f"   {faults * 4096 / 1e6:5.0f} MB paged in" if faults is not None else ""
        print(f"  {kind:32s} {mlp['median_s'][kind] * 1e3:9.1f} ms   {ratio:5.2f} x ERM{per_round}{paged}")
    g = mlp["gemm"]
    print(f"  GEMM rate {g['rate_gflops']:.1f} GFLOP/s; ERM matmuls {g['erm_matmul_gflop']:.1f} GFLOP -> "
          f"{g['erm_matmul_time_at_rate_s'] * 1e3:.1f} ms; ERM step = {g['erm_over_gemm_time']:.2f} x that "
          f"({g['erm_over_step_shapes_gemm_time']:.2f} x the step's own GEMMs, {g['step_shapes_gemm_time_s'] * 1e3:.1f} ms)")
    if "erm_plain_layers_over_erm" in mlp:
        rounds = mlp["erm_plain_layers_over_erm_per_round"]
        print(f"  ERM step with Linear then ReLU (no fused kernel): {mlp['median_s']['erm_plain_layers'] * 1e3:.1f} ms = "
              f"{mlp['erm_plain_layers_over_erm']:.2f} x the ERM step (per round {rounds['min']:.2f}-{rounds['max']:.2f}), "
              f"{g['erm_plain_layers_over_step_shapes_gemm_time']:.2f} x its own GEMMs")
    if "closed_form_node_parts" in mlp:
        parts = mlp["closed_form_node_parts"]
        print(f"  the closed form adds {parts['step_extra_s'] * 1e3:.1f} ms to the step; alone, on stored features, "
              f"its node of head and variances takes {parts['forward_extra_s'] * 1e3:.1f} ms (forward) + "
              f"{parts['backward_extra_s'] * 1e3:.1f} ms (backward) more than the head "
              f"({parts['node_extra_over_step_extra']:.2f} x the step's extra)")
    for kind, reason in mlp.get("skipped_cases", {}).items():
        print(f"  {kind} did not run: {reason}")
    print(f"MNIST_CNN per-sample gradients, batch {cnn['batch']}, median of {cnn['repeats']}:")
    for name, t in cnn["median_s"].items():
        speed = cnn["speedup_over_loop"].get(name)
        print(f"  {name:14s} {t * 1e3:9.1f} ms" + (f"   {speed:5.1f} x faster than the loop" if speed else ""))
    if "speedup_ceiling" in cnn:
        print(f"  ceiling: the loop takes {cnn['speedup_ceiling']:.1f} x one batched backward (summed "
              "gradient), which bounds any per-sample engine's speed-up here")
    for kind, split in mlp.get("where_time_goes", {}).items():
        ops = ", ".join(f"{op} {ms:.0f}" for op, ms in split["top_ops_ms"].items())
        print(f"  where {kind}'s {split['total_ms']:.0f} ms go (profiled, ms): {ops}")
    print("Targets:")
    for name, (value, ok) in record["targets_met"].items():
        print(f"  {name:36s} {value:7.2f}  {'met' if ok else 'MISSED'}")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (CI smoke run)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--repeats", type=int, default=None, help="MLP repeats (default 7, quick 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:k]")
    parser.add_argument("--breakdown", action="store_true",
                        help="after the timed rounds, profile one step of ERM, closed form and BackPACK "
                        "and store each one's heaviest operators (mlp.where_time_goes)")
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's allocator as it is (default: fishr_lite.cpu_memory."
                        "reuse_freed_memory(), so large freed tensors are reused, not page-faulted again)")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch sees no CUDA GPU; run on a GPU machine or use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.default_allocator:
        reuse_freed_memory()
    warnings.filterwarnings("ignore", category=UserWarning)  # BackPACK / create_graph chatter
    quick = args.quick
    mlp = bench_mlp(n_per_domain=500 if quick else 25_000, repeats=args.repeats or (2 if quick else 7),
                    gemm_size=256 if quick else 2048, device=args.device, breakdown=args.breakdown)
    cnn = bench_cnn(batch=4 if quick else 64, repeats=1 if quick else 3, device=args.device)
    record = {"benchmark": "bench_step", "quick": quick, "provenance": provenance(args.device), "targets": TARGETS,
              "mlp": mlp, "cnn": cnn}
    record["targets_met"] = check_targets(mlp, cnn, args.device)
    print_table(record)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out_dir / f"bench_step_{stamp}_{record['provenance']['host']}{'_quick' if quick else ''}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
