"""What watching costs: step time with and without gradwatch, beside the monitors people use today.

Two models, each trained with Adam: (a) an MLP with 20 hidden layers of 256 units, batch 128, and
(b) a 4-layer CNN on 32x32x3 images, batch 64. Every monitor gets its own copy of the model (same
initial weights) and stays attached for the whole run; blocks of steps of every monitor are
interleaved in one process, in a shuffled order per repeat, so drift on a shared machine hits them
all alike. A monitor's overhead is the median over repeats of its block time divided by the bare
block time of the same repeat; the quartiles of those ratios are printed beside it. A second
unwatched copy (``twin``) is timed the same way: its ratio is the noise floor, what two identical
models differ by here (memory placement, cache, neighbours), against which a small overhead is read.
The ``floor`` line is the least an exact monitor at gradwatch's cadence must read (``_floor``):
what is left for gradwatch's own bookkeeping is the gap between it and the gradwatch line.

Anchors, as the same loop would use them:

- ``tensorboard``: ``SummaryWriter.add_histogram`` of every parameter's gradient, every step;
- ``wandb``: ``wandb.watch(model, log="all", log_freq=1)`` in offline mode, with ``wandb.log`` per
  step (only if wandb is importable: ``pip install wandb`` into the same environment);
- ``naive``: a hand-written full-stats hook (the statistics gradwatch records, each read with
  ``.item()`` every step, the way a notebook would).

Run with ``nice .venv/bin/python benchmarks/monitor_overhead.py``; ``--help`` lists the knobs.
Measured on CPU only: no GPU numbers.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import random
import statistics
import tempfile
import time

import torch
from torch import nn

from gradwatch.watch import watch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """20 hidden ReLU layers of 256 units, batch 128, 10 classes."""
    layers: list[nn.Module] = []
    for _ in range(20):
        layers += [nn.Linear(256, 256), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(256, 10)), torch.randn(128, 256), torch.randint(0, 10, (128,))


def cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """4 ReLU conv layers (32, 32, 64, 64 channels, 3x3) with two max-pools, on 32x32x3, batch 64."""
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
    )
    return model, torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))


MODELS = {"mlp": mlp, "cnn": cnn}
ALWAYS = ("bare", "twin", "floor", "gradwatch")  # timed in every repeat; the anchors in the first few


# --- monitors: (model, optimizer, folder) -> (detach, called after each step or None) ------------
def _bare(model, optimizer, folder):
    return (lambda: None), None


def _gradwatch(model, optimizer, folder):
    w = watch(model, optimizer)  # the default cadence: every=10
    return w.detach, None


def _floor(model, optimizer, folder):
    """The least any exact monitor at gradwatch's cadence reads: no hooks, no records, no Python beyond the calls.

    Every step one ``_foreach_norm`` over the gradients; every 10th step the weights copied before
    the step, then ``||W_old||`` and ``||W_new - W_old||`` after it. On a memory-bound host this
    traffic alone is most of the monitor's cost.
    """
    params = list(model.parameters())
    before = [torch.empty_like(p) for p in params]
    step, kept = [0], []

    @torch.no_grad()
    def on_before_step(*_):
        kept.append(torch._foreach_norm([p.grad for p in params]))
        if step[0] % 10 == 0:
            torch._foreach_copy_(before, params)

    @torch.no_grad()
    def on_after_step(*_):
        if step[0] % 10 == 0:
            kept.append(torch._foreach_norm(before))
            torch._foreach_sub_(before, params)
            kept.append(torch._foreach_norm(before))
            kept.clear()
        step[0] += 1

    handles = [optimizer.register_step_pre_hook(on_before_step), optimizer.register_step_post_hook(on_after_step)]
    return (lambda: [h.remove() for h in handles]), None


def _tensorboard(model, optimizer, folder):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(folder)
    params = list(model.named_parameters())
    step = [0]

    def on_before_step(*_):
        for name, p in params:
            writer.add_histogram(f"grad/{name}", p.grad, step[0])
        step[0] += 1

    handle = optimizer.register_step_pre_hook(on_before_step)
    return (lambda: (handle.remove(), writer.close())), None


def _wandb(model, optimizer, folder):
    import wandb as wb

    os.makedirs(folder, exist_ok=True)
    run = wb.init(dir=folder, mode="offline", project="gradwatch-bench")  # its torch hooks log to wandb.run
    wb.watch(model, log="all", log_freq=1)
    return (lambda: (wb.unwatch(model), run.finish())), (lambda: run.log({}))


def _naive(model, optimizer, folder):
    """Every statistic gradwatch records, the way a notebook would: ``.item()`` per tensor per step."""
    values: list[float] = []
    handles = []
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            handles.append(module.register_forward_hook(
                lambda m, i, out: values.append((out.reshape(-1, out.shape[-1]) == 0).all(0).float().mean().item())))
        elif list(module.parameters(recurse=False)):
            def hook(m, i, out):
                values.append(out.pow(2).mean().sqrt().item())
                out.register_hook(lambda g: values.append(g.norm().item()))
            handles.append(module.register_forward_hook(hook))
    before: list[torch.Tensor] = []

    def on_before_step(*_):
        for p in model.parameters():
            g = p.grad
            values.extend((g.norm().item(), g.abs().max().item(), g.abs().mean().item(),
                           (~torch.isfinite(g)).sum().item(), p.norm().item()))
        before[:] = [p.detach().clone() for p in model.parameters()]

    def on_after_step(*_):
        for old, p in zip(before, model.parameters(), strict=True):
            values.append(((p - old).norm() / old.norm()).item())
        del values[:]

    handles += [optimizer.register_step_pre_hook(on_before_step), optimizer.register_step_post_hook(on_after_step)]
    return (lambda: [h.remove() for h in handles]), None


MONITORS = {"bare": _bare, "twin": _bare, "floor": _floor, "gradwatch": _gradwatch, "tensorboard": _tensorboard,
            "wandb": _wandb, "naive": _naive}
LABELS = {
    "bare": "no monitor",
    "twin": "no monitor, a second copy (the noise floor)",
    "floor": "floor: the statistics' reads alone (see _floor)",
    "gradwatch": "gradwatch watch(model, opt), every=10",
    "tensorboard": "TensorBoard add_histogram, every param, every step",
    "wandb": 'wandb.watch(log="all", log_freq=1), offline',
    "naive": "naive full-stats hooks (.item() each), every step",
}


def available(name: str) -> bool:
    module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name)
    if module is None:
        return True
    try:
        __import__(module)
    except ImportError:
        return False
    return True


class Trainee:
    """One monitor's own copy of the model, its Adam optimizer and the monitor attached to them."""

    def __init__(self, name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, folder: str):
        self.model, self.x, self.y = copy.deepcopy(model), x, y
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.detach, self.after = MONITORS[name](self.model, self.optimizer, os.path.join(folder, name))

    def steps(self, n: int) -> tuple[float, float]:
        """(wall, CPU) seconds per step over ``n`` steps."""
        model, optimizer, x, y, after = self.model, self.optimizer, self.x, self.y, self.after
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(n):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            if after is not None:
                after()
        return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def measure(model_name: str, names: list[str], repeats: int, block: int, anchor_repeats: int,
            folder: str) -> dict[str, dict[str, list[float]]]:
    """name -> {"wall", "cpu"} -> per-repeat ratios to the bare block of the same repeat.

    ``bare`` maps to its own seconds per step instead.
    """
    torch.manual_seed(0)
    model, x, y = MODELS[model_name]()
    trainees = {name: Trainee(name, model, x, y, folder) for name in names}
    for trainee in trainees.values():
        trainee.steps(block)  # warm-up: allocator, Adam state, lazy imports
    order = random.Random(0)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for r in range(repeats):
        chosen = [n for n in names if n in ALWAYS or r < anchor_repeats]
        order.shuffle(chosen)
        for name in chosen:
            gc.collect()
            times[name].append(trainees[name].steps(block))
    for trainee in trainees.values():
        trainee.detach()
    out = {"bare": {"wall": [t for t, _ in times["bare"]], "cpu": [c for _, c in times["bare"]]}}
    for name in names[1:]:
        pairs = list(zip(times[name], times["bare"], strict=False))
        out[name] = {"wall": [t / b for (t, _), (b, _) in pairs], "cpu": [c / d for (_, c), (_, d) in pairs]}
    return out


def report(model_name: str, ratios: dict[str, dict[str, list[float]]]) -> None:
    wall, cpu = (statistics.median(ratios["bare"][k]) for k in ("wall", "cpu"))
    print(f"\n{model_name}: bare step {wall * 1e3:.2f} ms wall, {cpu * 1e3:.2f} ms CPU "
          f"(medians of {len(ratios['bare']['wall'])} blocks)")
    print(f"  {'monitor':<52} {'wall ratio':>10}  {'quartiles':>14}  {'CPU ratio':>9}  {'overhead':>8}  repeats")
    for name, values in ratios.items():
        if name == "bare":
            continue
        q1, med, q3 = _quartiles(values["wall"])
        print(f"  {LABELS[name]:<52} {med:9.3f}x  [{q1:.3f}, {q3:.3f}]  {_quartiles(values['cpu'])[1]:8.3f}x  "
              f"{100 * (med - 1):+7.1f}%  {len(values['wall'])}")


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    return tuple(statistics.quantiles(values, n=4, method="inclusive")) if len(values) > 1 else (values[0],) * 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument("--repeats", type=int, default=40, help="interleaved blocks of bare and gradwatch steps")
    parser.add_argument("--anchor-repeats", type=int, default=5, help="of those, how many also run the anchors")
    parser.add_argument("--block", type=int, default=10, help="steps per block (a multiple of gradwatch's every=10)")
    parser.add_argument("--anchors", default="tensorboard,wandb,naive", help="comma-separated; '' for none")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: one core, as the "
                        "anchors' reference numbers were taken)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    anchors = [a for a in args.anchors.split(",") if a]
    missing = [a for a in anchors if not available(a)]
    names = [*ALWAYS, *[a for a in anchors if a not in missing]]
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU only (GPU not measured); "
          f"blocks of {args.block} steps, {args.repeats} repeats ({args.anchor_repeats} with anchors)")
    print("ratio = monitored block time / bare block time of the same repeat; median and quartiles over repeats")
    if missing:
        print(f"not installed, so not measured: {', '.join(missing)}")
    with tempfile.TemporaryDirectory() as folder:
        for model_name in args.models.split(","):
            report(model_name, measure(model_name, names, args.repeats, args.block, args.anchor_repeats, folder))


if __name__ == "__main__":
    main()
