"""``train(spec) -> Run``: the one training loop, written the way the seed notebook's ``fit`` runs.

Keras semantics where the seed assumes them: shuffled mini-batches each epoch, the epoch's ``loss``
is the mean of its batch losses, Adam with epsilon 1e-7, BCE on a sigmoid output. The loop attaches
``watch()`` exactly as a user would; on top it keeps the first Dense layer's weight matrix at start
and end so the seed's ``(old - new) / lr`` and percent change come out as the notebook defines them.
It stores nothing: callers put the Run in a Store.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from gradwatch.data import check_output, load
from gradwatch.diagnose import verdict
from gradwatch.nets import OUTPUTS, build
from gradwatch.records import Run
from gradwatch.spec import Spec
from gradwatch.stats import STATS, Layout, percent_change, seed_gradient, seed_measures
from gradwatch.watch import watch

TRACE = 4  # first-layer weights traced per epoch (the seed's epoch-vs-weight plot)


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
            if first and hasattr(model, "keep_states"):
                model.keep_states = True  # one batch per epoch keeps h_t for dL/dh_t
            loss = self.loss_fn(model(data.x_train[batch]), data.y_train[batch])
            loss.backward()
            if first:
                self._record_weight_grads()
                self._record_state_grads()
            totals.append(clip_(spec, model.parameters()))
            self.optimizer.step()
            losses.append(loss.detach())
        scalars = {"loss": torch.stack(losses).mean().item()}  # sync: once per epoch
        if totals[0] is not None:
            scalars["grad_norm_before_clip"] = torch.stack(totals).max().item()
        scalars.update(evaluate(model, data, self.loss_fn, self.predict))
        w.log(epoch=self.epochs_done, **scalars)
        record_seed_measures(w, self.dense, self.initial, spec.train.learning_rate, self.epochs_done)
        self.epochs_done += 1
        self.last_loss = scalars["loss"]
        if not math.isfinite(scalars["loss"]):
            self.status = "diverged"
        return scalars

    def _record_weight_grads(self) -> None:
        """Dense weight-matrix gradient norms (biases left out), on each epoch's first batch.

        The seed's and AUTOTRAINER's measure: a large output-bias gradient would otherwise mask
        the first/last ratio at initialisation.
        """
        grads = [p.grad for p in self.dense.values()]
        if any(g is None for g in grads):
            return
        norms = STATS["weight_grad_norm"](grads, self.dense_layout).tolist()  # sync: once per epoch
        values = dict(zip(self.dense, norms, strict=True))
        self.watcher.records.add(self.watcher.step, self.epochs_done, "weight_grad_norm", values)

    def _record_state_grads(self) -> None:
        """dL/dh_t norm at every time step t of a recurrent net (layers ``t0`` .. ``t<T-1>``).

        The temporal gradient-flow picture of Pascanu et al. (2013): how much of the loss's signal
        reaches each earlier step.
        """
        states = getattr(self.model, "states", None)
        if not states or states[0].grad is None:
            return
        grads = [h.grad for h in states]
        norms = STATS["state_grad_norm"](grads, Layout.of([[g] for g in grads])).tolist()  # sync: once per epoch
        self.model.keep_states, self.model.states = False, []
        values = {f"t{t}": v for t, v in enumerate(norms)}
        self.watcher.records.add(self.watcher.step, self.epochs_done, "state_grad_norm", values)

    def finish(self) -> Run:
        """Detach the watcher and package the records and summary as a Run."""
        self.watcher.detach()
        summary = summarize(self.watcher, self.start, self.first.detach(), self.spec, self.status)
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
            out["test_loss"] = loss_fn(z, y).item()
        if data.task != "regression":
            out[f"{split}accuracy"] = (predict(z) == y).float().mean().item()
    model.train()
    return out


def _dense_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """layer name -> weight matrix of every Dense layer (or a cell's input weights)."""
    return {n.rsplit(".", 1)[0]: p for n, p in model.named_parameters() if n.endswith(("weight", "weight_ih"))
            and p.dim() == 2}


def record_seed_measures(w, dense: dict, initial: dict, learning_rate: float, epoch: int) -> None:
    """Per Dense layer, the seed's two measures from the start of training to now, plus a weight trace.

    ``seed_gradient`` is mean |(old - new) / lr| and ``percent_change`` the median |100 (old - new) / old|,
    exactly as the notebook computes them between the weights before and after ``fit``.
    """
    with torch.no_grad():
        now = {n: p.detach() for n, p in dense.items()}
        grads, pcts = seed_measures([initial[n] for n in dense], list(now.values()), learning_rate)
        first = next(iter(dense))
        values = torch.cat([grads, pcts, now[first].flatten()[:TRACE]]).tolist()  # sync: once per epoch
    k = len(dense)
    w.records.add(w.step, epoch, "seed_gradient", dict(zip(dense, values[:k], strict=True)))
    w.records.add(w.step, epoch, "percent_change", dict(zip(dense, values[k : 2 * k], strict=True)))
    w.records.add(w.step, epoch, "weight", {f"{first}[{j}]": v for j, v in enumerate(values[2 * k :])})


@torch.no_grad()
def boundary(model: torch.nn.Module, x: torch.Tensor, n: int = 50) -> dict:
    """The model's output probability on an n x n grid around the data (for decision-boundary plots)."""
    model.eval()
    lo, hi = x.min(0).values - 0.5, x.max(0).values + 0.5
    gx, gy = torch.linspace(lo[0], hi[0], n), torch.linspace(lo[1], hi[1], n)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1).reshape(-1, 2)
    prob = torch.sigmoid(model(grid)).reshape(n, n)
    return {"x": gx.tolist(), "y": gy.tolist(), "p": prob.tolist()}


def summarize(w, start: torch.Tensor, end: torch.Tensor, spec: Spec, status: str) -> dict:
    """The headline numbers of a run: final loss/accuracy, the seed's measures, the init gradient ratio.

    ``grad_ratio_first_last`` is first / last Dense layer's weight-gradient norm on the first batch.
    """
    recs = w.records
    last = {stat: recs.series(stat)[1][-1] for stat in ("loss", "accuracy", "test_accuracy", "test_loss")
            if recs.series(stat)[1]}
    init = recs.at("weight_grad_norm", 0)
    names = list(init)
    ratio = init[names[0]] / init[names[-1]] if len(names) > 1 and init[names[-1]] > 0 else float("nan")
    summary = {
        "final_loss": last.get("loss"),
        "accuracy": last.get("test_accuracy"),
        "train_accuracy": last.get("accuracy"),
        "test_loss": last.get("test_loss"),
        "first_layer_grad": seed_gradient(start, end, spec.train.learning_rate).abs().mean().item(),
        "first_layer_pct_change": percent_change(start, end).nanmedian().item(),
        "grad_ratio_first_last": ratio,
        "first_weights_start": start.tolist(),
        "first_weights_end": end.tolist(),
        "steps": w.step,
    }
    summary["verdict"] = verdict(ratio, status)
    return summary
