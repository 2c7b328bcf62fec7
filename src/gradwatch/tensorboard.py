"""TensorBoard output: Records as scalars, and gradient histograms on a watcher's sampled steps.

An optional dependency (``pip install 'gradwatch[tensorboard]'``), written through torch's own
``SummaryWriter``. Scalar tags are ``stat/layer`` (``grad_norm/dense1``), so TensorBoard shows one
section per statistic with a curve per layer, as Lightning's ``grad_2.0_norm/<param>`` keys do;
whole-model scalars keep their own name (``loss``). Records are the only input, so a PyTorch watch,
a Keras fit (``GradWatch.records``) and a stored run (``Store().get(ref).records``) export alike.

Histograms copy every parameter's gradient to the host, which is why TensorBoard's
``add_histogram`` on each step costs several times the step itself; ``Histograms`` writes them only
on the watcher's sampled steps (every ``every`` steps), as fastai's ``HookCallback(every=...)``
samples its hooks.
"""

from __future__ import annotations

from pathlib import Path

from gradwatch.records import Records

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError as error:  # pragma: no cover - the optional dependency is missing
    raise ImportError("gradwatch.tensorboard needs tensorboard: pip install 'gradwatch[tensorboard]'") from error


def tag(stat: str, layer: str) -> str:
    """The scalar's TensorBoard tag: ``stat/layer``, or ``stat`` alone for whole-model scalars."""
    return f"{stat}/{layer}" if layer else stat


def to_tensorboard(records: Records, log_dir: str | Path) -> Path:
    """Write every record as a TensorBoard scalar (one curve per layer per stat, x = step); returns log_dir.

    Examples:
        >>> to_tensorboard(watcher.records, "runs/deep-sigmoid")   # then: tensorboard --logdir runs
    """
    with SummaryWriter(str(log_dir)) as writer:
        for step, _, layer, stat, value in records.rows:
            writer.add_scalar(tag(stat, layer), value, step)
    return Path(log_dir)


class Histograms:
    """Per-parameter gradient histograms (``grad/<param>``), and weights if asked (``weight/<param>``).

    Written just before the optimizer step, where the watcher reads gradients too (final, clipped,
    all-reduced), on the steps the watcher samples, or every ``every`` steps if given. The watcher
    must have been given the optimizer: that step pre-hook is the one call per step this adds.
    ``detach()`` (or leaving the ``with`` block) removes the hook and closes the event file.
    """

    def __init__(self, watcher, log_dir: str | Path, every: int | None = None, weights: bool = False):
        if watcher.optimizer is None:
            raise ValueError("watcher: got watch(model) without an optimizer; allowed: watch(model, optimizer)")
        self.watcher, self.every, self.weights = watcher, every or watcher.every, weights
        self.writer = SummaryWriter(str(log_dir))
        self.params = [(name.removeprefix("_orig_mod.").removeprefix("module."), p)
                       for name, p in watcher.model.named_parameters() if p.requires_grad]
        self._handle = watcher.optimizer.register_step_pre_hook(self._on_before_step)

    def _on_before_step(self, *_args) -> None:
        step = self.watcher.step
        if step % self.every:
            return
        for name, param in self.params:  # sync: one host copy per histogram, on sampled steps only
            if param.grad is not None:
                self.writer.add_histogram(f"grad/{name}", param.grad.detach(), step)
            if self.weights:
                self.writer.add_histogram(f"weight/{name}", param.detach(), step)

    def detach(self) -> None:
        self._handle.remove()
        self.writer.close()

    def __enter__(self) -> Histograms:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()
