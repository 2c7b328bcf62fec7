"""gradwatch.lightning.GradWatch in a real Lightning fit on CPU: the recorded per-layer norms equal
Lightning's own ``grad_norm`` utility at ``on_before_optimizer_step`` (unscaled, summed over accumulation,
before ``gradient_clip_val``), one record per update, and the healthy run gets no finding.
"""

import math

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.utilities import grad_norm  # noqa: E402

from gradwatch.lightning import GradWatch  # noqa: E402


class Regressor(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.dense1, self.dense2, self.out = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 1)

    def forward(self, x):
        return self.out(torch.relu(self.dense2(torch.relu(self.dense1(x)))))

    def training_step(self, batch, _index):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Reference(pl.Callback):
    """Lightning's own per-parameter norms at the moment it hands the gradient to callbacks."""

    def __init__(self):
        self.norms = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.norms.append(grad_norm(pl_module, norm_type=2))


def loader(n=256, batch=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    data = torch.utils.data.TensorDataset(x, x[:, :1] * 2 - x[:, 1:2])
    return torch.utils.data.DataLoader(data, batch_size=batch)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_recorded_norms_equal_lightnings_own_before_clipping(precision):
    torch.manual_seed(0)
    gw, ref = GradWatch(every=4), Reference()
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, precision=precision, accumulate_grad_batches=2,
                         gradient_clip_val=0.05, callbacks=[gw, ref], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Regressor(), loader())
    assert len(ref.norms) == 24  # 3 epochs x 16 batches / 2 accumulated
    steps = sorted({r[0] for r in gw.records.rows if r[3] == "grad_norm"})
    assert steps == list(range(24))
    for step, norms in enumerate(ref.norms):
        got = gw.records.at("grad_norm", step)
        for layer in ("dense1", "dense2", "out"):
            want = math.sqrt(sum(norms[f"grad_2.0_norm/{layer}.{p}"].item() ** 2 for p in ("weight", "bias")))
            assert got[layer] == pytest.approx(want, rel=1e-5), (step, layer)
        total = math.sqrt(sum(v**2 for v in got.values()))
        assert total == pytest.approx(norms["grad_2.0_norm_total"].item(), rel=1e-5)
    clipped = gw.records.at("clip_factor", 0)
    assert clipped and all(f < 1 for f in clipped.values())  # gradient_clip_val=0.05 did clip
    assert set(gw.records.at("update_ratio", 4)) == {"dense1", "dense2", "out"}
    assert gw.records.series("loss", by="epoch")[0] == [0, 1, 2]
    assert gw.diagnose() == []
    assert len(gw.run().records) == len(gw.frame())
