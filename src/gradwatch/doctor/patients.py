"""What the ``gradwatch doctor`` command treats: a Spec's net, or a user's ``module:make_model``.

Both become the doctor's three arguments, ``(make_model, data, loss_fn)``, plus an optimizer
factory; every piece is a module-level function or a ``functools.partial`` of one, so the trials
can run in worker processes.
"""

from __future__ import annotations

import importlib
import os
import sys
from functools import partial

import torch.nn.functional as F

from gradwatch.data import check_output, load
from gradwatch.nets import OUTPUTS, build
from gradwatch.spec import Spec, SpecError, from_flags
from gradwatch.train import make_optimizer


def _bce(z, y):
    return F.binary_cross_entropy_with_logits(z, y.float().reshape(z.shape))


# --loss name -> loss_fn(output, target); any other value is a module:name
LOSSES = {"bce": _bce, "cross_entropy": F.cross_entropy, "mse": F.mse_loss}


def find(path: str, field: str):
    """The object ``module:name`` names, the module imported from the current folder or the path."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise SpecError(f"{field}: got {path!r}; allowed: module:name, e.g. mymodel:make_model")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise SpecError(f"{field}: got {path!r}; allowed: an importable module:name ({exc})") from None


def from_spec(spec: Spec) -> tuple:
    """(make_model, (X, Y), loss_fn, optimizer) of a Spec: its net, its training split, its loss and optimizer."""
    data = load(spec.data)
    check_output(data.task, spec.model.output_activation, spec.data.name)
    make_model = partial(build, spec.model, data.x_train.shape[-1], data.n_outputs)
    return make_model, (data.x_train, data.y_train), OUTPUTS[spec.model.output_activation][0], partial(
        make_optimizer, spec)


def patient(target: list[str], data: str | None = None, loss: str = "bce") -> tuple:
    """The doctor's arguments from the command line: ``model.depth=10 ...`` or ``module:make_model``."""
    if target and ":" in target[0] and "=" not in target[0]:
        if data is None:
            raise SpecError("--data: got nothing; allowed: module:name of (X, Y) tensors or a DataLoader")
        loss_fn = LOSSES[loss] if loss in LOSSES else find(loss, "--loss")
        return find(target[0], "make_model"), find(data, "--data"), loss_fn, None
    return from_spec(from_flags(target))
