"""``GradWatch``: gradwatch as a Hugging Face ``TrainerCallback``, handing back the same Records, findings, Run.

The ``Trainer`` clips (``max_grad_norm``) before ``on_pre_optimizer_step``, so no callback event sees the
gradient before clipping. The watcher reads it itself, at the end of each backward (the last accumulation
micro-batch's holds the sum), and commits it at the step of the torch optimizer inside Accelerate's
``AcceleratedOptimizer``, divided by the ``GradScaler``'s scale under fp16: the gradient gradwatch
records (README, "the gradient"), whose total is the ``grad_norm`` the Trainer logs.

Examples:
    >>> from gradwatch.transformers import GradWatch
    >>> gw = GradWatch(every=10)
    >>> Trainer(model, args, train_dataset=data, callbacks=[gw]).train()   # findings logged at the end
    >>> gw.diagnose(), gw.frame()
"""

from __future__ import annotations

from transformers import TrainerCallback

from gradwatch.trainers import Watching


class GradWatch(TrainerCallback, Watching):
    """Per-layer gradient health of the model a ``Trainer`` trains, every ``every`` optimizer updates."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        # Accelerate's wrapper keeps the fp16 GradScaler it steps through; the watcher unwraps the optimizer
        self._start(model, optimizer, scaler=getattr(optimizer, "scaler", None))

    def on_epoch_end(self, args, state, control, **kwargs):
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        self.watcher.log(epoch=round(state.epoch or 0) - 1, **({"loss": losses[-1]} if losses else {}))

    def on_train_end(self, args, state, control, **kwargs):
        self._finish(state.is_world_process_zero)
