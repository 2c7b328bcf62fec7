"""A member of a stacked ensemble is the run ``train`` makes of its spec: records, summary and status."""

import math

import pytest
import torch

from gradwatch import nets
from gradwatch.ensemble import fast, shape_key, train_many
from gradwatch.spec import Spec, SpecError
from gradwatch.train import train

TINY = Spec().replace(**{"data.n_samples": 64, "model.depth": 3, "model.width": 5, "train.epochs": 2,
                         "train.batch_size": 16})
INITS = list(nets.INITS)
ACTIVATIONS = [a for a in nets.ACTIVATIONS if a != "prelu"]  # all, so a new one is covered; prelu: own shape
# Batch norm cancels the bias of the Dense layer before it, so that bias's gradient is pure rounding
# noise, which Adam turns into +-lr steps whatever its size; the update ratio and batch norm's running
# mean (so eval-mode accuracy and test loss) follow that noise. Only their presence is compared there.
NOISE = {"accuracy", "test_accuracy", "test_loss", "update_ratio", "train_accuracy"}
EVERY_STEP = {"loss", "grad_norm", "grad_rms", "weight_grad_norm", "seed_gradient", "percent_change", "weight_trace"}

CASES = {
    # every activation and init in one ensemble, with per-member residual flags and learning rates
    "activations_inits": [{"model.activation": a, "model.init": INITS[i % len(INITS)], "train.seed": i,
                           "model.residual": i % 2 == 0, "train.learning_rate": (0.001, 0.01)[i % 2]}
                          for i, a in enumerate(ACTIVATIONS)],
    "prelu": [{"model.activation": "prelu"}, {"model.activation": "prelu", "model.residual": True, "train.seed": 1}],
    "batch_norm": [{"model.norm": "batch"}, {"model.norm": "batch", "model.activation": "relu",
                                             "model.residual": True, "train.seed": 1}],
    "layer_norm": [{"model.norm": "layer", "model.activation": "tanh"},
                   {"model.norm": "layer", "model.activation": "selu", "model.init": "lecun_normal"}],
    "sgd_clipped": [{"train.optimizer": "sgd", "train.learning_rate": 0.5, "train.clip_norm": 0.05, **extra}
                    for extra in ({}, {"model.activation": "relu", "model.bias_init": 0.1, "model.init_gain": 2.0})],
    "tanh_output_clip_value": [{"model.output_activation": "tanh", "train.clip_value": 0.01, "train.seed": s}
                               for s in (0, 1)],
    "linear_output": [{"model.output_activation": "linear", "model.activation": a} for a in ("relu", "tanh")],
    "softmax_digits": [{"data.name": "digits", "model.output_activation": "softmax", "train.seed": s}
                       for s in (0, 1)],
}


def close(a: float, b: float, rel: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=1e-6)


def assert_same_run(single, member, noise: set[str] = frozenset()):
    """Every row (step, epoch, layer, stat) of the single run, values within float rounding; the loss within 1e-5."""
    ours = {row[:4]: row[4] for row in member.records.rows}
    theirs = {row[:4]: row[4] for row in single.records.rows}
    assert theirs.keys() <= ours.keys()  # the watcher records only on sampled steps what the ensemble takes
    assert {k for k in ours if k[3] in EVERY_STEP} == {k for k in theirs if k[3] in EVERY_STEP}
    for key, value in theirs.items():
        if key[3] == "loss":
            assert abs(ours[key] - value) <= 1e-5 or (math.isnan(value) and math.isnan(ours[key])), key
        elif key[3] not in noise:
            assert close(ours[key], value, 1e-4), (key, value, ours[key])
    assert (member.status, member.key, member.spec) == (single.status, single.key, single.spec)
    assert member.summary.keys() == single.summary.keys()
    for field, value in single.summary.items():
        if isinstance(value, float) and field not in noise:
            assert close(member.summary[field], value, 1e-4), field
        elif field in ("steps", "verdict"):
            assert member.summary[field] == value, field
    if "boundary" in single.summary and "test_loss" not in noise:
        mine, theirs = member.summary["boundary"]["p"], single.summary["boundary"]["p"]
        assert all(close(a, b, 1e-4) for r, s in zip(mine, theirs, strict=True) for a, b in zip(r, s, strict=True))


@pytest.mark.parametrize("case", CASES)
def test_member_equals_single_run(case):
    specs = [TINY.replace(**over) for over in CASES[case]]
    members = train_many(specs, names=[f"m{i}" for i in range(len(specs))], group="g")
    noise = NOISE if case == "batch_norm" else set()
    for i, (spec, member) in enumerate(zip(specs, members, strict=True)):
        assert (member.name, member.group) == (f"m{i}", "g")
        assert_same_run(train(spec), member, noise)
    first = members[0].summary["first_weights_start"]
    assert first == train(specs[0]).summary["first_weights_start"]  # the very same initial weights


def test_diverged_member_is_masked_and_the_others_train_on():
    base = TINY.replace(**{"train.optimizer": "sgd", "model.output_activation": "linear", "model.activation": "relu",
                           "train.epochs": 3})
    specs = [base.replace(**{"train.learning_rate": 0.1}), base.replace(**{"train.learning_rate": 10.0,
                                                                           "model.init_gain": 10.0}),
             base.replace(**{"train.learning_rate": 0.1, "train.seed": 1, "train.stop_loss": 0.9})]
    members = train_many(specs)
    assert [m.status for m in members] == ["finished", "diverged", "finished"]
    epochs = [len(m.records.series("loss")[1]) for m in members]
    assert epochs == [3, 1, 1]  # the diverged and the stop_loss member stop where train() stops them
    for spec, member in zip(specs, members, strict=True):
        assert_same_run(train(spec), member)


def test_members_of_different_shapes_are_refused_with_the_field_named():
    with pytest.raises(SpecError, match=r"^model.depth: got 2 and 3 in one ensemble"):
        train_many([TINY, TINY.replace(**{"model.depth": 2})])
    assert shape_key(TINY) == shape_key(TINY.replace(**{"model.activation": "relu", "train.seed": 5}))
    assert shape_key(TINY) != shape_key(TINY.replace(**{"model.activation": "prelu"}))  # slopes are parameters


def test_cheaper_cadences_keep_the_same_values_on_fewer_rows_and_the_same_summary():
    spec = TINY.replace(**{"train.epochs": 3})
    full, thin = train_many([spec])[0], train_many([spec], thin=3, evaluate_every=2)[0]
    rows = {r[:4]: r[4] for r in full.records.rows}
    kept = {r[:4]: r[4] for r in thin.records.rows}
    assert kept.items() <= rows.items()  # the same computation, only fewer rows of it
    assert {k[0] for k in kept if k[3] == "grad_norm"} == {k[0] for k in rows if k[3] == "grad_norm" and k[0] % 3 == 0}
    assert sorted({k[1] for k in kept if k[3] == "test_loss"}) == [0, 2]  # every 2nd epoch, and the last
    assert [k for k in kept if k[3] == "loss"] == [k for k in rows if k[3] == "loss"]
    assert thin.summary == full.summary


def test_clip_factor_rows_only_where_a_clip_happened_as_the_watcher_records_them():
    for clip_norm, clips in ((1e6, False), (1e-3, True)):
        spec = TINY.replace(**{"train.optimizer": "sgd", "train.clip_norm": clip_norm})
        for run in (train_many([spec])[0], train(spec)):
            factors = [r[4] for r in run.records.rows if r[3] == "clip_factor"]
            assert bool(factors) == clips and all(f < 1 for f in factors), (clip_norm, run.records.stats())


@pytest.mark.parametrize("name", list(nets.ACTIVATIONS))
def test_hand_written_activation_fills_a_strided_buffer_as_its_module(name):
    """fast.ACTS writes into a slice of the next layer's input, (E, H, B) of (E, H + 1, B), for many members."""
    module = nets.ACTIVATIONS[name]()
    if type(module).__name__ not in fast.ACTS:
        pytest.skip("trained through autograd")
    z, h = torch.randn(8, 10, 32), torch.ones(8, 11, 32)
    fast.ACTS[type(module).__name__][0](module, z, h[:, :-1])
    assert torch.allclose(h[:, :-1], module(z), atol=1e-6)


def test_a_whole_step_in_kernels_c_trains_the_same_bits_as_the_step_layer_by_layer():
    """kernels.step (member after member, forward, loss gradient and backward in one call) against the
    layer by layer step of the same members: sigmoid and ReLU members, a last batch of another size,
    every statistic of the sampled steps (taken from the layers' buffers that kernels.step fills).
    32 members, so that aten's loss gradient runs its vector loop on every batch (E x B a multiple
    of 32): the last E x B % 32 sigmoids of a call it takes with the C library's exp, an ulp apart."""
    from gradwatch.ensemble.training import Ensemble

    specs = [TINY.replace(**{"train.seed": s, "train.epochs": 4, "model.activation": ("relu", "sigmoid")[s < 16],
                             "model.width": 10}) for s in range(32)]  # grouped by activation, as train_many groups them
    trained = []
    for whole in (True, False):
        ens = Ensemble(specs, every=3)
        ens.whole_step = ens.whole_step and whole
        while not ens.done:
            ens.epoch()
        trained.append(ens)
        assert bool(ens.manual.steps) == whole and all(call is not None for _, call in ens.manual.steps.values())
    assert {size for size, _ in trained[0].manual.steps} == {16, 3}  # batches of 16 and the rest
    assert torch.equal(trained[0].stack.flat, trained[1].stack.flat)
    blocks = [[(*b[:4], b[4].nan_to_num(-1.0)) for b in ens.blocks] for ens in trained]
    assert len(blocks[0]) == len(blocks[1]) > 100
    for (*a, values), (*b, expected) in zip(*blocks, strict=True):
        assert a == b and torch.equal(values, expected), a
