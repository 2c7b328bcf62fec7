"""``GradWatch``: gradwatch as a Lightning ``Callback``, handing back the same Records, findings and Run.

Lightning calls ``on_before_optimizer_step`` once per optimizer update, after the last accumulation
micro-batch's backward, after mixed precision's unscale and before ``gradient_clip_val`` clips: the
gradient gradwatch records (README, "the gradient"), so the watcher commits it there. It is not taken
from the optimizer's own pre-step hook, which ``optimizer.step(closure)`` fires before the closure runs
the backward (the previous update's gradient). Only the first optimizer is watched.

Examples:
    >>> from gradwatch.lightning import GradWatch
    >>> gw = GradWatch(every=10)
    >>> lightning.Trainer(callbacks=[gw]).fit(model, loader)   # findings are logged when fit ends
    >>> gw.diagnose(), gw.frame()
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from gradwatch.trainers import Watching


class GradWatch(Callback, Watching):
    """Per-layer gradient health of the ``LightningModule`` being fit, every ``every`` updates."""

    def on_fit_start(self, trainer, pl_module) -> None:
        # every rank builds one, only rank 0's hooks record (DDP: the gradients are all-reduced already)
        self._start(pl_module, trainer.optimizers[0], driven=True)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.is_global_zero and optimizer is trainer.optimizers[0]:
            self.watcher.before_step()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}  # sync: epoch end
        self.watcher.log(epoch=trainer.current_epoch, **metrics)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._finish(trainer.is_global_zero)
