"""``train_many(specs) -> list[Run]``: many small MLPs trained at once as stacked weights.

Members share layer shapes (``shape_key``) and choose the rest for themselves: activation, init, init
gain, bias init, residual flag, learning rate, seed, stop loss. Each member's Run equals
``train(spec)``'s within float rounding, records included, because nothing is approximated: its
initial weights come from the same ``nets.build`` under ``torch.manual_seed(seed)``, its batches from
the same seeded ``randperm``, its loss is the mean over its own batch (backward starts from the sum
over members, and d(sum)/d(loss_e) = 1), batch norm keeps statistics per member, and Adam and SGD are
elementwise, so stacking changes nothing. It is torch.func's model ensembling (``stack_module_state``
+ ``vmap``) written out by hand, which is about 3x faster on a CPU for nets this small (stack.py).

A member that meets NaN/Inf (status ``diverged``) or its ``stop_loss`` retires at the end of that
epoch, where ``train`` would stop: its state is set aside and its row zeroed with a zero learning
rate, so it neither stops nor slows the others (training.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from gradwatch.ensemble import results
from gradwatch.ensemble.training import Ensemble
from gradwatch.records import Run
from gradwatch.spec import Spec, SpecError, value_at

# what the members of one ensemble must share (besides PReLU, whose slopes are parameters too)
SHARED = ("data", "model.kind", "model.depth", "model.width", "model.output_activation", "model.norm",
          "train.optimizer", "train.epochs", "train.batch_size", "train.clip_norm", "train.clip_value")


def shape_key(spec: Spec) -> tuple:
    """Specs with equal keys can train in one ensemble (``sweep`` groups by it)."""
    return (*(value_at(spec, f) for f in SHARED), spec.model.activation == "prelu")


def stackable(spec: Spec) -> bool:
    """Whether ``train_many`` takes this spec: MLPs do; recurrent nets train one at a time."""
    return spec.model.kind == "mlp"


def _check(specs: list[Spec], cadence: dict[str, int]) -> None:
    for name, value in cadence.items():
        if value < 1:
            raise SpecError(f"{name}: got {value}; allowed: >= 1")
    for spec in specs:
        if not stackable(spec):
            raise SpecError(f"model.kind: got {spec.model.kind!r}; allowed: mlp (train others with train())")
        for field, key, first in zip((*SHARED, "model.activation"), shape_key(spec), shape_key(specs[0]),
                                     strict=True):
            if key != first:
                raise SpecError(f"{field}: got {value_at(spec, field)!r} and {value_at(specs[0], field)!r} in one "
                                f"ensemble; allowed: one shape per ensemble (group specs by ensemble.shape_key)")


def train_many(specs: Sequence[Spec], every: int = 10, thin: int = 1, evaluate_every: int = 1,
               names: Sequence[str] = (), group: str = "") -> list[Run]:
    """Train all ``specs`` together; returns one Run per spec, in the order given, as ``train`` would.

    All specs must share ``shape_key`` (else a one-line SpecError names the field). The cadences:
    ``every`` (steps) is the watcher's, for the sampled statistics; ``thin`` (steps) for the per-step
    gradient norm and RMS, kept as ``Records.thin(thin)`` would keep them; ``evaluate_every`` (epochs)
    for the full-data evaluation (accuracy, test loss) and the seed's weight-change measures, which
    each member also gets at its last epoch, so its summary never changes. The defaults give exactly
    ``train``'s records; a sweep of hundreds of runs wants ``thin=10, evaluate_every=10`` (a
    250-example evaluation costs a third of an epoch, and per-step norms are most of a run's rows).

    Examples:
        >>> from gradwatch.ensemble import train_many
        >>> base = gradwatch.Spec()
        >>> runs = train_many([base.replace(**{"train.seed": s}) for s in range(128)])
    """
    specs = list(specs)
    if not specs:
        return []
    cadence = {"every": every, "thin": thin, "evaluate_every": evaluate_every}
    _check(specs, cadence)
    names = list(names) or [""] * len(specs)
    # one slice of members per activation, and within it runs of equal learning rates
    order = sorted(range(len(specs)), key=lambda i: (specs[i].model.activation, specs[i].train.learning_rate))
    ensemble = Ensemble([specs[i] for i in order], **cadence)
    with warnings.catch_warnings():  # gradients are strided views of one buffer, on purpose (stack.py)
        warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
        while not ensemble.done:
            ensemble.epoch()
    trained = results.runs(ensemble, [names[i] for i in order], group)
    out: list[Run] = [trained[0]] * len(specs)
    for position, i in enumerate(order):
        out[i] = trained[position]
    return out
