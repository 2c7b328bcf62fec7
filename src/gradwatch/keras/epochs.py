"""The measured epochs' statistics, computed for many epochs at once when the records are read.

At an epoch's end ``GradWatch`` takes only what cannot wait: the probe's step, whose packed result (a fresh
backend array nothing writes again) stays on the device, or, without a probe, host copies of the weights;
and the logs and the learning rate. ``Pending.flush`` then reads the STATS entries of every waiting epoch on
the member axis: each weight, gradient and output stacked over the epochs, as the ensemble stacks its
models (one read per tensor, not one per tensor and epoch), and the kernels grouped by shape
(``_by_shape``). Each member is reduced alone and serially, over the same values in the same order, so the
rows are bit for bit, and in the order, those of one epoch at a time. Read every epoch, the statistics cost
the seed's ~14 ms jax epoch more than the probe's step did (~1.5 ms against ~1); a flush of 100 epochs
costs ~0.3 ms an epoch. The torch watcher likewise reads its buffers once per flush (``watch``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from gradwatch.records import Records
from gradwatch.stats import Layout, at, read

# a flush when the waiting epochs' numbers would take this many float64 bytes on the host (the seed's net:
# 0.2 MB an epoch), so a large model holds a few epochs, not a fit's worth; and at least every FLUSH_EPOCHS
# epochs, by when one more epoch in the batch saves almost nothing and a flush's pause stays short
FLUSH_BYTES = 64 * 2**20
FLUSH_EPOCHS = 100


@dataclass
class Epoch:
    """What one epoch's end took, for ``Pending.flush`` to turn into rows.

    ``lr`` is set when the weights were measured (the kernel and weight rows); their numbers are then
    ``weights`` (float64 host copies, one per trainable weight of each kernel layer) or, with a probe, in
    ``probe``: ``Probe.measure``'s result, unpacked at the flush.
    """

    step: int
    epoch: int
    scalars: dict[str, float] = field(default_factory=dict)
    lr: float | None = None
    weights: list[torch.Tensor] | None = None
    probe: object = None
    numel: int = 0  # numbers it holds, for FLUSH_BYTES


@contextmanager
def _serial():
    """One intra-op thread for the block: every reduction runs serially, so a member's numbers are those it
    would have alone, whatever the thread count. With more threads torch splits a lone tensor of over 32768
    entries between them (each sums its chunk) but reduces each row of a stack in one piece: a float64 norm
    would differ in its last bit between a flush of one epoch and one of many."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _proved(stats: dict, *args) -> dict:
    """``read`` of ``stats`` on the member axis, an entry with a ``proof`` read only where its proof is not finite
    everywhere: zeros otherwise, as the PyTorch watcher records them (a finite max |g| proves no NaN/Inf in a
    layer's gradient)."""
    values = read({name: s for name, s in stats.items() if not s.proof}, *args, members=True)
    for name, s in stats.items():
        if s.proof and torch.isfinite(values[s.proof]).all():  # sync: none, host tensors
            values[name] = torch.zeros_like(values[s.proof])
        elif s.proof:
            values[name] = s.fn(*args, members=True)
    return {name: values[name] for name in stats}  # table order


def _stacked(per_epoch: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Each position's tensors of every epoch stacked on the STATS member axis: (K, *shape) each."""
    return [torch.stack(tensors) for tensors in zip(*per_epoch, strict=True)]


def _epoch_major(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(L, K) member-axis values as (K * L,) rows, epoch by epoch, each in layer order."""
    return {stat: value.T.reshape(-1) for stat, value in values.items()}


def _by_shape(read_members, *columns: list) -> dict[str, torch.Tensor]:
    """``read_members(*columns)``'s entries, (R,) each in row order, from one call per group of rows whose
    tensors agree in shape (and whose other items agree): each group's tensors stacked on the STATS member
    axis, so the seed's nine 10 x 10 kernels of a hundred epochs are one call, not nine hundred. Each member
    is reduced alone, over the same values in the same order: the numbers are those of one call per row."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(zip(*columns, strict=True)):
        key = tuple(tuple(c.shape) if isinstance(c, torch.Tensor) else c for c in row)
        groups.setdefault(key, []).append(i)
    out: dict[str, torch.Tensor] = {}
    for rows in groups.values():
        args = [[torch.stack([c[i] for i in rows]) if isinstance(c[rows[0]], torch.Tensor) else c[rows[0]]]
                for c in columns]
        for name, value in read_members(*args).items():  # (1, members) each
            out.setdefault(name, value.new_empty(len(columns[0])))[rows] = value[0]
    return out


def _collect(blocks: list[list], where: list[tuple[int, str]], values: dict[str, torch.Tensor],
             skip_nan: bool = False) -> None:
    """Append to ``blocks[i]`` epoch i's rows ``(stat, layers, values)`` of ``values`` (stat -> (R,), row r
    being layer ``where[r][1]`` of epoch ``where[r][0]``, each epoch's rows together); ``skip_nan``: a NaN
    value (the median % change of a kernel that starts at 0: it has no relative change) is left out."""
    if not values:
        return
    table = torch.stack(list(values.values())).tolist()  # host tensors: a copy, no device sync
    names = [name for _, name in where]
    runs: list[list[int]] = []  # [epoch, first row, end row] of each epoch's rows
    for r, (i, _) in enumerate(where):
        if runs and runs[-1][0] == i:
            runs[-1][2] = r + 1
        else:
            runs.append([i, r, r + 1])
    for stat, column in zip(values, table, strict=True):
        for i, start, end in runs:
            layers, row = names[start:end], column[start:end]
            if skip_nan:
                layers, row = [n for n, v in zip(layers, row, strict=True) if not math.isnan(v)], [
                    v for v in row if not math.isnan(v)]
            blocks[i].append((stat, layers, row))


class Pending:
    """One fit's measured epochs whose statistics wait for ``flush``, and what the flush needs of its model.

    ``layers``: (name, trainable weights, index of the kernel among them) of each kernel layer; ``acts``:
    (name, module class) of each hidden activation; ``initial``: each kernel at the start of fit.
    """

    def __init__(self, layers: list[tuple[str, int, int]] = (), acts: list[tuple[str, str]] = (),
                 initial: list[torch.Tensor] = (), unpack=None):
        self.names = [name for name, _, _ in layers]
        self.sizes = [size for _, size, _ in layers]
        self.kernels = [k for _, _, k in layers]
        self.acts, self.initial, self.unpack = list(acts), list(initial), unpack
        self.epochs: list[Epoch] = []

    def add(self, epoch: Epoch, records: Records) -> None:
        """Keep ``epoch``; flush into ``records`` when the waiting numbers reach FLUSH_BYTES or FLUSH_EPOCHS."""
        self.epochs.append(epoch)
        if len(self.epochs) >= FLUSH_EPOCHS or 8 * sum(e.numel for e in self.epochs) >= FLUSH_BYTES:
            self.flush(records)

    def flush(self, records: Records) -> None:
        """Every waiting epoch's rows into ``records``, in epoch order: its logs, then its statistics."""
        epochs, self.epochs = self.epochs, []
        if not epochs:
            return
        numbers = [self.unpack(e.probe) if e.probe is not None else {} for e in epochs]  # float64 host copies
        blocks: list[list] = [[] for _ in epochs]  # per epoch: (stat, layers, values), in recording order
        with _serial():
            self._weights([(i, e.lr, numbers[i]["weight"] if e.weights is None else e.weights)
                           for i, e in enumerate(epochs) if e.lr is not None], blocks)
            self._gradients([(i, n["grad"]) for i, n in enumerate(numbers) if n.get("grad") is not None], blocks)
            self._outputs([(i, n["output"]) for i, n in enumerate(numbers) if n.get("output")], blocks)
        for e, block in zip(epochs, blocks, strict=True):
            for stat, value in e.scalars.items():
                records.add(e.step, e.epoch, stat, {"": value})
            for stat, names, values in block:
                records.add_layers(e.step, e.epoch, stat, names, values)

    def _groups(self, flat: list) -> list[list]:
        """One list per kernel layer of its trainable weights' entries in ``flat``."""
        ends = [sum(self.sizes[: i + 1]) for i in range(len(self.sizes))]
        return [flat[end - size : end] for size, end in zip(self.sizes, ends, strict=True)]

    def _weights(self, measured: list[tuple[int, float, list]], blocks: list[list]) -> None:
        """The ``kernel`` entries of STATS on each kernel since the start of fit (the seed's measures) and the
        ``weight`` entries on each layer's weights, of each (epoch, learning rate, flat weights) in ``measured``."""
        if not measured:
            return
        where = [(i, name) for i, _, _ in measured for name in self.names]
        kernels = [group[k] for _, _, flat in measured
                   for group, k in zip(self._groups(flat), self.kernels, strict=True)]
        kernel = _by_shape(lambda start, now, lr: read(at("kernel"), start, now, lr[0], members=True),
                           self.initial * len(measured), kernels, [lr for _, lr, _ in measured for _ in self.names])
        _collect(blocks, where, kernel, skip_nan=True)
        weights = _stacked([flat for _, _, flat in measured])
        layout = Layout.of(self._groups(weights), members=True)
        _collect(blocks, where, _epoch_major(read(at("weight"), weights, layout, members=True)))

    def _gradients(self, measured: list[tuple[int, list]], blocks: list[list]) -> None:
        """On the probe batch: the ``grad`` entries of STATS on the compiled loss's gradient per layer and the
        ``kernel_grad`` entries per kernel (biases left out, as train.py measures the first/last ratio), of each
        (epoch, flat gradients) in ``measured``."""
        if not measured:
            return
        grads = _stacked([flat for _, flat in measured])
        kernels = [[group[k]] for group, k in zip(self._groups(grads), self.kernels, strict=True)]
        values = _proved(at("grad"), grads, Layout.of(self._groups(grads), members=True))
        values.update(read(at("kernel_grad"), [k for [k] in kernels], Layout.of(kernels, members=True), members=True))
        _collect(blocks, [(i, name) for i, _ in measured for name in self.names], _epoch_major(values))

    def _outputs(self, measured: list[tuple[int, dict]], blocks: list[list]) -> None:
        """On the probe batch: the ``output`` entries of STATS on each kernel layer's output and the
        ``activation`` entries on each hidden activation's, of each (epoch, layer -> output) in ``measured``,
        each layer's outputs of all epochs stacked once on the member axis. A probe whose loss failed on
        NaN/Inf outputs has these rows alone."""
        by_layers: dict[tuple[str, ...], list[tuple[int, dict]]] = {}
        for i, out in measured:  # epochs by the layers they have outputs of: the same, but for a failed probe
            by_layers.setdefault(tuple(out), []).append((i, out))
        for names, group in by_layers.items():
            stacked = dict(zip(names, _stacked([[out[name] for name in names] for _, out in group]), strict=True))
            epochs = [i for i, _ in group]
            kernels = [stacked[name] for name in self.names if name in stacked]  # (K, ...) each
            if kernels:
                values = read(at("output"), kernels, Layout.of([[t] for t in kernels], members=True), members=True)
                _collect(blocks, [(i, name) for i in epochs for name in self.names if name in stacked],
                         _epoch_major(values))
            for stat, s in at("activation").items():
                hit = [(name, kind) for name, kind in self.acts if kind in s.kinds and name in stacked]
                if hit:
                    value = s.fn([stacked[name] for name, _ in hit], [s.kinds[kind] for _, kind in hit], members=True)
                    _collect(blocks, [(i, name) for i in epochs for name, _ in hit], _epoch_major({stat: value}))
