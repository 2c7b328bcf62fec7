import math
import statistics

import pytest
import torch

from gradwatch.spec import Spec
from gradwatch.stats import percent_change, seed_gradient
from gradwatch.train import Training, train


def test_same_seed_same_run_different_seed_different_run(small_spec):
    a, b = train(small_spec), train(small_spec)
    c = train(small_spec.replace(**{"train.seed": 1}))
    assert a.records.series("loss")[1] == b.records.series("loss")[1]
    assert a.records.series("loss")[1] != c.records.series("loss")[1]


def test_seed_measures_are_the_notebooks_formulas(small_spec):
    run = train(small_spec)
    old = torch.tensor(run.summary["first_weights_start"])
    new = torch.tensor(run.summary["first_weights_end"])
    lr = small_spec.train.learning_rate
    assert run.summary["first_layer_grad"] == pytest.approx(((old - new) / lr).abs().mean().item(), rel=1e-6)
    assert run.summary["first_layer_pct_change"] == pytest.approx(  # the notebook's np.median
        statistics.median((100 * (old - new) / old).abs().reshape(-1).tolist()), rel=1e-6)
    assert torch.equal(seed_gradient(old, new, lr), (old - new) / lr)
    assert torch.equal(percent_change(old, new), (100 * (old - new) / old).abs())
    last = run.records.last("seed_gradient")["dense1"]
    assert last == pytest.approx(run.summary["first_layer_grad"], rel=1e-5)


def test_under_one_sgd_step_the_seed_gradient_is_the_gradient():
    spec = Spec().replace(**{"train.optimizer": "sgd", "train.learning_rate": 0.5, "train.epochs": 1,
                             "train.batch_size": 1000, "model.depth": 2})
    training = Training(spec)
    model = training.model
    x, y = training.data.x_train, training.data.y_train
    loss = training.loss_fn(model(x), y)
    (expected,) = torch.autograd.grad(loss, model.dense1.weight)
    training.epoch()
    old, new = training.initial["dense1"], model.dense1.weight.detach()
    assert torch.allclose(seed_gradient(old, new, 0.5), expected, atol=1e-6)


def test_recorded_gradient_norms_equal_autograd():
    spec = Spec().replace(**{"train.epochs": 1, "train.batch_size": 1000, "model.depth": 3})
    training = Training(spec)
    model = training.model
    loss = training.loss_fn(model(training.data.x_train), training.data.y_train)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected = {}
    for (name, _), g in zip(model.named_parameters(), grads, strict=True):
        layer = name.rsplit(".", 1)[0]
        expected[layer] = expected.get(layer, 0.0) + g.pow(2).sum().item()
    weights = {n.rsplit(".", 1)[0]: g.norm().item() for (n, _), g in zip(model.named_parameters(), grads, strict=True)
               if n.endswith("weight")}
    training.epoch()
    recorded = training.watcher.records.at("grad_norm", 0)
    assert recorded.keys() == expected.keys()
    for layer, sq in expected.items():
        assert recorded[layer] == pytest.approx(math.sqrt(sq), rel=1e-5)
    recorded_weights = training.watcher.records.at("weight_grad_norm", 0)
    assert recorded_weights == pytest.approx(weights, rel=1e-5)
    run = training.finish()
    assert run.summary["grad_ratio_first_last"] == pytest.approx(weights["dense1"] / weights["out"], rel=1e-5)


def test_divergence_is_recorded_not_raised():
    spec = Spec().replace(**{"model.activation": "relu", "model.init_gain": 30.0, "train.optimizer": "sgd",
                             "train.learning_rate": 50.0, "train.epochs": 30, "model.depth": 6})
    run = train(spec)
    assert run.status == "diverged" and run.summary["verdict"] == "exploding"
    assert len(run.records.series("loss")[1]) < 30


def test_clipping_records_the_norm_before_clipping():
    spec = Spec().replace(**{"train.epochs": 2, "train.clip_norm": 1e-3, "model.activation": "relu"})
    run = train(spec)
    before = run.records.series("grad_norm_before_clip")[1]
    assert len(before) == 2 and min(before) > 1e-3
    steps = sorted({r[0] for r in run.records.rows if r[3] == "clip_factor"})
    assert len(steps) >= 2
    for step in steps:  # grad_norm is the gradient before clipping; clip_factor takes it to the clipped one
        total = math.sqrt(sum(v**2 for v in run.records.at("grad_norm", step).values()))
        factors = list(run.records.at("clip_factor", step).values())
        assert total > 1e-2 and max(factors) == pytest.approx(min(factors), rel=1e-5)  # one for the whole model
        assert total * factors[0] == pytest.approx(1e-3, rel=1e-3)


def test_boundary_grid_covers_the_data(small_spec):
    run = train(small_spec)
    grid = run.summary["boundary"]
    assert len(grid["p"]) == len(grid["y"]) == 50 and all(0 <= p <= 1 for p in grid["p"][0])


def test_stop_loss_ends_training_once_reached():
    spec = Spec().replace(**{"model.activation": "relu", "model.depth": 3, "train.learning_rate": 0.01,
                             "train.epochs": 200, "train.stop_loss": 0.3})
    losses = train(spec).records.series("loss")[1]
    assert losses[-1] <= 0.3 and all(v > 0.3 for v in losses[:-1]) and len(losses) < 200
