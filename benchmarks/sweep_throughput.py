"""Runs per second of the seed experiment (or the criticality grid): one run at a time, and stacked.

The seed experiment: 10 hidden sigmoid layers of 10 units, Adam lr 0.001, batch 32, 100 epochs, on
``make_moons(250, noise=0.05, random_state=42)`` with a 20% test split (200 training points).

Lines, each a median over ``--repeats`` (blocks of every line interleaved in one process, in a
shuffled order per repeat, so drift on a shared machine hits them all alike):

- ``loop``: a plain PyTorch loop, one run after another: the baseline every ratio is taken against;
- ``gradwatch.train``: the same loop with the watcher attached and the seed's measures (the single-run path);
- ``ensemble E=...``: ``gradwatch.ensemble.train_many`` on E seeds at once, with the records a sweep
  keeps (``thin=10, evaluate_every=10``: per-step gradient norms every 10th step, accuracy and test
  loss every 10th epoch and at the last); ``full`` rows keep exactly ``train``'s records;
- ``keras fit``: the seed notebook's own ``Sequential.fit`` with ``KERAS_BACKEND=torch``, if Keras is
  installed.

``--workload criticality`` times the criticality study's grid instead: the loop trains one of its
nets (tanh, width 32, digits, SGD, batch 16) for one epoch, and ``ensemble`` lines all members of
one depth (every sigma_w^2, sigma_b^2, activation and seed of the study) as one stack for that epoch,
with the study's cadences (only the final accuracy recorded).

Every process runs one torch thread (these nets are too small for intra-op threads, which only
fight the other tenants of a shared machine: 10x slower here with two) and the allocator setting of
``gradwatch sweep`` (``sweep.keep_memory``). ``E=..., 2 procs`` lines split the E runs over two warm
worker processes (``gradwatch sweep --workers 2``), the way a sweep uses both cores of a 2-core machine;
the loop runs one run at a time by definition. Run with
``nice .venv/bin/python benchmarks/sweep_throughput.py``; ``--help`` lists the knobs.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

os.environ.setdefault("KERAS_BACKEND", "torch")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from gradwatch.data import load  # noqa: E402
from gradwatch.ensemble import kernels, train_many  # noqa: E402
from gradwatch.nets import ACTIVATIONS, OUTPUTS  # noqa: E402
from gradwatch.spec import Spec  # noqa: E402
from gradwatch.studies import criticality  # noqa: E402
from gradwatch.sweep import keep_memory  # noqa: E402
from gradwatch.train import train  # noqa: E402

SEED = Spec()  # the seed experiment is Spec's defaults
LOOP_RUNS = 3  # loop runs per block: the baseline every ratio divides by gets the most samples


def loop(seed: int, spec: Spec = SEED) -> None:
    """One run of ``spec`` in plain PyTorch: what a user would write without gradwatch."""
    data = load(spec.data)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = data.x_train.shape[1]
    for _ in range(spec.model.depth):
        layers += [nn.Linear(width, spec.model.width), ACTIVATIONS[spec.model.activation]()]
        width = spec.model.width
    model = nn.Sequential(*layers, nn.Linear(width, data.n_outputs))
    if spec.train.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=spec.train.learning_rate, eps=1e-7)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=spec.train.learning_rate)
    loss_fn = OUTPUTS[spec.model.output_activation][0]
    order = torch.Generator().manual_seed(seed)
    for _ in range(spec.train.epochs):
        for batch in torch.randperm(len(data.x_train), generator=order).split(spec.train.batch_size):
            optimizer.zero_grad()
            loss_fn(model(data.x_train[batch]), data.y_train[batch]).backward()
            optimizer.step()


def grid(depth: int) -> list[Spec]:
    """The criticality study's members at one depth, trained for one epoch."""
    return [spec.replace(**{"train.epochs": 1}) for _, _, spec in criticality.next_jobs([])
            if spec.model.depth == depth]


def grid_lines(depth: int, pool: ProcessPoolExecutor | None, processes: int):
    """The criticality workload's lines: one net by the plain loop, one depth's members stacked."""
    specs = grid(depth)
    cadence = criticality.CADENCE

    def stacked(_seed: int) -> None:
        train_many(specs, **cadence)

    out = [("loop (baseline)", lambda seed: loop(seed, specs[0]), 1),
           (f"ensemble E={len(specs)} depth {depth}", stacked, len(specs))]
    if pool is not None:
        out.append((f"ensemble E={len(specs)}, {processes} procs", ensembles_on(pool, processes, depth, True),
                    len(specs)))
    return out


def keras_fit(seed: int) -> None:
    """The seed notebook's Keras model and ``fit`` call."""
    import keras

    data = load(SEED.data)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((2,))] + [keras.layers.Dense(10, activation="sigmoid") for _ in range(10)]
                             + [keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(0.001), loss="binary_crossentropy", metrics=["accuracy"])
    model.fit(data.x_train.numpy(), data.y_train.numpy(), epochs=SEED.train.epochs, batch_size=32, verbose=0)


def ensemble(size: int, evaluate_every: int) -> Callable[[int], None]:
    """E runs as one stacked ensemble, with a sweep's cadences unless ``evaluate_every`` is 1 (train's)."""
    thin = 10 if evaluate_every > 1 else 1

    def run(first_seed: int) -> None:
        specs = [SEED.replace(**{"train.seed": first_seed + s}) for s in range(size)]
        train_many(specs, thin=thin, evaluate_every=evaluate_every)

    return run


def _setup() -> None:
    torch.set_num_threads(1)
    keep_memory()


def _half(args: tuple[int, int]) -> int:
    ensemble(args[1], 10)(args[0])
    return args[1]


def _grid_part(args: tuple[int, int, int]) -> int:
    depth, part, parts = args
    specs = grid(depth)[part::parts]
    train_many(specs, **criticality.CADENCE)
    return len(specs)


def ensembles_on(pool: ProcessPoolExecutor, processes: int, size: int, grid_depth: bool = False) -> Callable:
    """E runs as ``processes`` ensembles of E / processes trained at once, in warm worker processes
    (``grid_depth``: ``size`` is a depth of the criticality grid, whose members are split instead)."""
    def run(first_seed: int) -> None:
        if grid_depth:
            assert sum(pool.map(_grid_part, [(size, i, processes) for i in range(processes)])) == len(grid(size))
            return
        part = size // processes
        assert sum(pool.map(_half, [(first_seed + i * part, part) for i in range(processes)])) == size

    return run


def lines(sizes: list[int], full: bool, keras: bool, pool: ProcessPoolExecutor | None, processes: int):
    """(name, fn(seed), runs per call) for every line to time."""
    def gradwatch_train(seed: int) -> None:
        train(SEED.replace(**{"train.seed": seed}))

    def loops(seed: int) -> None:
        for i in range(LOOP_RUNS):
            loop(seed + i)

    out = [("loop (baseline)", loops, LOOP_RUNS), ("gradwatch.train", gradwatch_train, 1)]
    for size in sizes:
        out.append((f"ensemble E={size}", ensemble(size, 10), size))
        if full:
            out.append((f"ensemble E={size} full", ensemble(size, 1), size))
        if pool is not None:
            out.append((f"ensemble E={size}, {processes} procs", ensembles_on(pool, processes, size), size))
    if keras:
        try:
            import keras as _  # noqa: F401
        except ImportError:
            print("keras not installed: no keras line")
        else:
            out.append(("keras fit (torch backend)", keras_fit, 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 128, 1024], help="ensemble sizes E")
    parser.add_argument("--repeats", type=int, default=3, help="blocks per line; medians are printed")
    parser.add_argument("--processes", type=int, default=2, help="worker processes for the parallel lines (1: none)")
    parser.add_argument("--full", action="store_true", help="also time ensembles with train's exact records")
    parser.add_argument("--no-keras", action="store_true", help="leave the Keras line out")
    parser.add_argument("--workload", choices=("seed", "criticality"), default="seed")
    parser.add_argument("--depth", type=int, default=22, help="the criticality grid's depth to time")
    parser.add_argument("--torch-products", action="store_true",
                        help="the stacked step through torch (torch.bmm, aten's activations), not kernels.c "
                             "(GRADWATCH_KERNELS=torch)")
    args = parser.parse_args()
    if args.torch_products:  # before any process builds the library; the spawned workers inherit it
        os.environ["GRADWATCH_KERNELS"] = "torch"
    _setup()
    pool = None
    if args.processes > 1:
        pool = ProcessPoolExecutor(args.processes, mp_context=get_context("spawn"), initializer=_setup)
        list(pool.map(_half, [(0, 2)] * args.processes))  # start and warm the workers outside the timing
    todo = lines(args.sizes, args.full, not args.no_keras, pool, args.processes) if args.workload == "seed" \
        else grid_lines(args.depth, pool, args.processes)
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in todo}
    rng = random.Random(0)
    for repeat in range(args.repeats):
        for name, fn, runs in rng.sample(todo, len(todo)):
            start = time.perf_counter()
            fn(1000 * repeat)
            seconds[name].append((time.perf_counter() - start) / runs)
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)
    if pool is not None:
        pool.shutdown()
    per_run = {name: statistics.median(s) for name, s in seconds.items()}
    base = per_run["loop (baseline)"]
    what = f"seed experiment, {SEED.train.epochs} epochs" if args.workload == "seed" \
        else f"criticality grid at depth {args.depth}, 1 epoch"
    road = "kernels.c" if kernels.library() is not None else "torch"
    print(f"\n{what}; torch {torch.__version__}, 1 torch thread per process, step by {road}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; medians of {args.repeats}")
    print(f"{'line':<30}{'ms/run':>10}{'runs/s':>10}{'x loop':>9}")
    for name, _, _ in todo:
        print(f"{name:<30}{per_run[name] * 1e3:>10.1f}{1 / per_run[name]:>10.1f}{base / per_run[name]:>9.1f}")


if __name__ == "__main__":
    main()
