"""``train(spec) -> Run``: the one training loop, written the way the seed notebook's ``fit`` runs.

Keras semantics where the seed assumes them: shuffled mini-batches each epoch, the epoch's ``loss``
is the mean of its batch losses, Adam with epsilon 1e-7, BCE on a sigmoid output. The loop attaches
``watch()`` exactly as a user would; on top it records the STATS entries read once per epoch on the
Dense weight matrices (their gradients on the first batch; the seed's ``(old - new) / lr`` and percent
change since the start, as the notebook defines them) and, for a recurrent net, dL/dh_t.
It stores nothing: callers put the Run in a Store.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from gradwatch.data import GRID, check_output, load, plane
from gradwatch.nets import OUTPUTS, build
from gradwatch.records import Run
from gradwatch.spec import Spec
from gradwatch.stats import Layout, at, read
from gradwatch.summary import summarize
from gradwatch.watch import watch


def make_optimizer(spec: Spec, params) -> torch.optim.Optimizer:
    """Adam with Keras's epsilon (1e-7, not torch's 1e-8), or plain SGD.

    Adam's fused kernel and SGD's foreach path: for the seed's small nets the default per-tensor
    loop spends more on launching ops than on arithmetic (a third of a run); the fused kernel is
    also the one the stacked ensembles call, so a member and its single run take the same steps.
    """
    if spec.train.optimizer == "adam":
        return torch.optim.Adam(params, lr=spec.train.learning_rate, eps=1e-7, fused=True)
    return torch.optim.SGD(params, lr=spec.train.learning_rate, foreach=True)


def clip_(spec: Spec, params) -> torch.Tensor | None:
    """Clip gradients as the spec asks; returns the total norm before clipping (optax's norm_before_clip)."""
    total = None
    if spec.train.clip_norm is not None:
        total = torch.nn.utils.clip_grad_norm_(params, spec.train.clip_norm)
    if spec.train.clip_value is not None:
        torch.nn.utils.clip_grad_value_(params, spec.train.clip_value)
    return total


def first_weight(model: torch.nn.Module) -> torch.Tensor:
    """The first layer's weight matrix: ``dense1.weight`` in our MLPs, the input weights of a cell."""
    return next(p for n, p in model.named_parameters() if n.endswith("weight") or n.endswith("weight_ih"))


class Training:
    """One run, advanced an epoch at a time: ``train()`` loops it; the web page steps it live.

    Holds the model, its optimizer and the attached Watcher; ``epoch()`` trains one shuffled pass
    and returns its scalars; ``finish()`` detaches the watcher and returns the Run.
    """

    def __init__(self, spec: Spec, every: int = 10, name: str = "", group: str = ""):
        self.spec, self.name, self.group = spec, name, group
        self.data = load(spec.data)
        check_output(self.data.task, spec.model.output_activation, spec.data.name)
        torch.manual_seed(spec.train.seed)
        self.model = build(spec.model, self.data.x_train.shape[-1], self.data.n_outputs)
        self.optimizer = make_optimizer(spec, self.model.parameters())
        self.loss_fn, self.predict = OUTPUTS[spec.model.output_activation]
        self.order = torch.Generator().manual_seed(spec.train.seed)
        self.watcher = watch(self.model, self.optimizer, every=every)
        self.first = first_weight(self.model)
        self.start = self.first.detach().clone()
        self.dense = _dense_weights(self.model)
        self.initial = {n: p.detach().clone() for n, p in self.dense.items()}
        self.dense_layout = Layout.of([[p] for p in self.dense.values()])
        self.epochs_done, self.status, self.last_loss = 0, "finished", float("inf")

    @property
    def done(self) -> bool:
        """Diverged, out of epochs, or at ``train.stop_loss`` (Keras EarlyStopping's ``baseline``, inverted)."""
        stop = self.spec.train.stop_loss
        return (self.status == "diverged" or self.epochs_done >= self.spec.train.epochs
                or (stop is not None and self.last_loss <= stop))

    def epoch(self) -> dict[str, float]:
        """Train one epoch; NaN/Inf marks the run ``diverged`` (a finding, never an exception)."""
        spec, data, model, w = self.spec, self.data, self.model, self.watcher
        w.epoch = self.epochs_done  # the steps of this epoch are tagged with it, not with the last log()'s
        model.train()
        losses, totals = [], []
        for batch in torch.randperm(len(data.x_train), generator=self.order).split(spec.train.batch_size):
            self.optimizer.zero_grad()
            first = not losses
            loss = self.loss_fn(model(data.x_train[batch]), data.y_train[batch])
            loss.backward()
            if first:
                self._record_weight_grads()
            totals.append(clip_(spec, model.parameters()))
            self.optimizer.step()
            losses.append(loss.detach())
        scalars = {"loss": torch.stack(losses).mean().item()}  # sync: once per epoch
        if totals[0] is not None:
            scalars["grad_norm_before_clip"] = torch.stack(totals).max().item()  # sync: once per epoch
        scalars.update(evaluate(model, data, self.loss_fn, self.predict))
        w.log(epoch=self.epochs_done, **scalars)
        self._record_kernels()
        self.epochs_done += 1
        self.last_loss = scalars["loss"]
        if not math.isfinite(scalars["loss"]):
            self.status = "diverged"
        return scalars

    def _record(self, point: str, layers: list[str], *args) -> None:
        """Every STATS entry of ``point`` (once per epoch) into the watcher's records, in one sync."""
        values = read(at(point), *args)
        if values:
            flat = torch.cat(list(values.values())).tolist()  # sync: once per epoch and point
            for i, stat in enumerate(values):
                self.watcher.records.add_layers(self.watcher.step, self.epochs_done, stat, layers,
                                                flat[i * len(layers) : (i + 1) * len(layers)])

    def _record_weight_grads(self) -> None:
        """The ``kernel_grad`` entries: Dense weight matrices' gradients (biases left out), each epoch's first batch.

        The seed's and AUTOTRAINER's measure: a large output-bias gradient would otherwise mask
        the first/last ratio at initialisation.
        """
        grads = [p.grad for p in self.dense.values()]
        if all(g is not None for g in grads):
            self._record("kernel_grad", list(self.dense), grads, self.dense_layout)

    @torch.no_grad()
    def _record_kernels(self) -> None:
        """The ``kernel`` entries per Dense layer, from the start of training to now: the seed's measures.

        ``seed_gradient`` is mean |(old - new) / lr| and ``percent_change`` the median |100 (old - new) / old|,
        exactly as the notebook computes them between the weights before and after ``fit``.
        """
        now = [p.detach() for p in self.dense.values()]
        self._record("kernel", list(self.dense), list(self.initial.values()), now, self.spec.train.learning_rate)

    def finish(self) -> Run:
        """Detach the watcher and package the records and summary as a Run."""
        self.watcher.detach()
        summary = summarize(self.watcher.records, self.status, first_weights_start=self.start.tolist(),
                            first_weights_end=self.first.detach().tolist())  # sync: once per run
        x = self.data.x_train
        if self.data.task == "binary" and x.dim() == 2 and x.shape[1] == 2:
            summary["boundary"] = boundary(self.model, x)
        return Run(records=self.watcher.records, spec=self.spec.model_dump(mode="json"), summary=summary,
                   status=self.status, name=self.name, group=self.group, key=self.spec.key())


def train(spec: Spec, every: int = 10, on_epoch: Callable[[int], None] | None = None, name: str = "",
          group: str = "") -> Run:
    """Train ``spec``'s model on its data and return the Run (stored by the caller, if at all).

    Examples:
        >>> run = gradwatch.train(gradwatch.Spec().replace(**{"model.activation": "relu"}))
        >>> run.summary["final_loss"], run.summary["verdict"]
    """
    training = Training(spec, every, name, group)
    while not training.done:
        training.epoch()
        if on_epoch:
            on_epoch(training.epochs_done - 1)
    return training.finish()


@torch.no_grad()
def evaluate(model, data, loss_fn, predict) -> dict[str, float]:
    """Training-set accuracy and test loss/accuracy, in eval mode (batch norm uses running stats)."""
    model.eval()
    out = {}
    for split, x, y in (("", data.x_train, data.y_train), ("test_", data.x_test, data.y_test)):
        z = model(x)
        if split:
            out["test_loss"] = loss_fn(z, y).item()  # sync: once per epoch
        if data.task != "regression":
            out[f"{split}accuracy"] = (predict(z) == y).float().mean().item()  # sync: once per epoch
    model.train()
    return out


def _dense_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """layer name -> weight matrix of every Dense layer (or a cell's input weights)."""
    return {n.rsplit(".", 1)[0]: p for n, p in model.named_parameters() if n.endswith(("weight", "weight_ih"))
            and p.dim() == 2}


@torch.no_grad()
def boundary(model: torch.nn.Module, x: torch.Tensor, n: int = GRID) -> dict:
    """The model's output probability on ``data.plane``'s n x n grid around the data (decision-boundary plots)."""
    model.eval()
    xs, ys, points = plane(x, n)
    prob = torch.sigmoid(model(points)).reshape(n, n)
    return {"x": xs.tolist(), "y": ys.tolist(), "p": prob.tolist()}  # sync: once per drawing
