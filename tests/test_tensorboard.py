import pytest
import torch
from torch import nn

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from gradwatch.records import Records  # noqa: E402
from gradwatch.tensorboard import Histograms, tag, to_tensorboard  # noqa: E402
from gradwatch.train import train  # noqa: E402
from gradwatch.watch import watch  # noqa: E402


def _read(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def test_every_record_becomes_a_scalar_tagged_stat_slash_layer(tmp_path, small_spec):
    records = train(small_spec).records
    to_tensorboard(records, tmp_path)
    assert list(tmp_path.glob("events.out.tfevents.*"))
    events = _read(tmp_path)
    expected = {tag(stat, layer) for _, _, layer, stat, _ in records.rows}
    assert {"loss", "accuracy", "grad_norm/dense1", "grad_norm/out", "percent_change/dense1"} <= expected
    assert set(events.Tags()["scalars"]) == expected
    steps, values = records.series("grad_norm", "dense1")
    written = events.Scalars("grad_norm/dense1")
    assert [e.step for e in written] == steps
    assert [e.value for e in written] == pytest.approx(values, rel=1e-6)


def test_non_finite_values_are_written_not_dropped(tmp_path):
    records = Records()
    records.add(0, 0, "loss", {"": float("nan")})
    records.add(1, 0, "loss", {"": 0.5})
    to_tensorboard(records, tmp_path)
    assert len(_read(tmp_path).Scalars("loss")) == 2


def _steps(model, optimizer, n):
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    for _ in range(n):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def test_histograms_only_on_sampled_steps_and_detach_removes_the_hook(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    w = watch(model, optimizer, every=2)
    with Histograms(w, tmp_path, weights=True):
        _steps(model, optimizer, 5)
    _steps(model, optimizer, 2)  # after detach: nothing more is written
    w.detach()
    events = _read(tmp_path)
    names = [n for n, _ in model.named_parameters()]
    assert set(events.Tags()["histograms"]) == {f"{kind}/{n}" for kind in ("grad", "weight") for n in names}
    assert [e.step for e in events.Histograms("grad/0.weight")] == [0, 2, 4]
    assert events.Histograms("grad/2.bias")[0].histogram_value.num == 1


def test_histograms_need_the_optimizer(tmp_path):
    w = watch(nn.Linear(2, 1))
    with pytest.raises(ValueError, match="optimizer"):
        Histograms(w, tmp_path)
    w.detach()
