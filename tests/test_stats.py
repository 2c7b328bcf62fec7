"""Every STATS entry against a naive, slow, per-tensor reference (micrograd's check against torch).

References run in float64 over each layer's tensors concatenated, the way one would write the
statistic on paper. ``members=True`` is checked member by member against the same references.
"""

import copy
import math
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gradwatch.ensemble import train_many
from gradwatch.spec import Spec
from gradwatch.stats import EVERY_STEP, POINTS, STATS, Layout, Stat, layer_norms, percent_change, read, tensor_norms
from gradwatch.stats import LAYERED as LAYERED_POINTS
from gradwatch.train import train
from gradwatch.watch import watch

INF, NAN = float("inf"), float("nan")


def _flat(group):
    return torch.cat([t.detach().double().reshape(-1) for t in group])


def ref_norm(group):
    return _flat(group).square().sum().sqrt().item()


def ref_rms(group):
    return _flat(group).square().mean().sqrt().item()


def ref_mean_abs(group):
    return _flat(group).abs().mean().item()


def ref_max_abs(group):
    flat = _flat(group)
    return NAN if flat.isnan().any() else flat.abs().max().item()


def ref_nonfinite(group):
    return float(sum(not math.isfinite(v) for v in _flat(group).tolist()))


LAYERED = {  # entries read at a layered point: fn(tensors, layout, members) -> (L,) or (L, E)
    "grad_norm": ref_norm,
    "grad_rms": ref_rms,
    "grad_mean_abs": ref_mean_abs,
    "grad_max_abs": ref_max_abs,
    "nonfinite": ref_nonfinite,
    "weight_grad_norm": ref_norm,
    "state_grad_norm": ref_norm,
    "weight_norm": ref_norm,
    "backprop_norm": ref_norm,
    "act_rms": ref_rms,
}


def ref_update_ratio(before, after):
    delta = _flat(after) - _flat(before)
    return (delta.norm() / _flat(before).norm()).item()


def ref_saturated(a, low, high):
    values = a.double().reshape(-1).tolist()
    margin = 0.01 * (high - low)
    return sum(v <= low + margin or v >= high - margin for v in values) / len(values)


def ref_dead(a):
    units = a.reshape(-1, a.shape[-1]).T.tolist()  # features are the last axis
    return sum(all(v == 0 for v in unit) for unit in units) / len(units)


def ref_seed_gradient(old, new, lr):
    return ((old.double() - new.double()) / lr).abs().mean().item()


def ref_percent_change(old, new, _lr):
    values = sorted(abs(100 * (o - n) / o) for o, n in zip(old.double().reshape(-1).tolist(),
                                                            new.double().reshape(-1).tolist(), strict=True) if o != 0)
    return statistics.median(values)  # the notebook's np.median: the mean of the two middle values


def ref_weight_trace(_old, new, _lr):
    return new.reshape(-1)[0].item()


KERNEL = {"seed_gradient": ref_seed_gradient, "percent_change": ref_percent_change, "weight_trace": ref_weight_trace}
OTHERS = {"update_ratio", "saturated_frac", "dead_frac", "clip_factor", "skipped"}


def groups(seed=0, members=None):
    """Three layers of different sizes: weight + bias, a single tensor, three tensors."""
    g = torch.Generator().manual_seed(seed)
    lead = (members,) if members else ()
    shapes = [[(5, 3), (5,)], [(4, 2, 3)], [(2, 2), (2,), (7,)]]
    return [[torch.randn(*lead, *s, generator=g) * 10.0 ** (-i) for s in layer] for i, layer in enumerate(shapes)]


def check(got, want, rel=1e-5):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (math.isnan(g) and math.isnan(w)) or g == pytest.approx(w, rel=rel, abs=1e-12), (got, want)


def test_every_stats_entry_has_a_reference_here():
    assert set(STATS) == set(LAYERED) | set(KERNEL) | OTHERS
    assert {name for name, s in STATS.items() if s.point in LAYERED_POINTS} == set(LAYERED)
    assert {name for name, s in STATS.items() if s.point == "kernel"} == set(KERNEL)


def test_every_entry_is_read_at_a_known_point_and_only_gradients_every_step():
    for name, s in STATS.items():
        assert s.point in POINTS, name
        assert not s.every_step or s.point in EVERY_STEP, name  # module hooks exist on sampled steps only
        assert (s.kinds is not None) == (s.point == "activation"), name
        assert s.proof is None or STATS[s.proof].point == s.point, name


@pytest.mark.parametrize("stat", sorted(LAYERED))
def test_layered_stat_equals_naive_reference(stat):
    layers = groups()
    flat, layout = [t for layer in layers for t in layer], Layout.of(layers)
    got = STATS[stat].fn(flat, layout)
    assert got.shape == (3,)
    check(got.tolist(), [LAYERED[stat](layer) for layer in layers])
    assert torch.allclose(read({stat: STATS[stat]}, flat, layout)[stat], got, rtol=1e-6)  # the parts agree


@pytest.mark.parametrize("stat", sorted(LAYERED))
def test_layered_stat_with_members_equals_reference_per_member(stat):
    layers = groups(members=4)
    flat, layout = [t for layer in layers for t in layer], Layout.of(layers, members=True)
    got = read({stat: STATS[stat]}, flat, layout, members=True)[stat]
    assert got.shape == (3, 4)  # (L, E)
    for e in range(4):
        check(got[:, e].tolist(), [LAYERED[stat]([t[e] for t in layer]) for layer in layers])


@pytest.mark.parametrize("stat", sorted(LAYERED))
def test_one_tensor_per_layer_takes_the_short_path_and_agrees(stat):
    layers = [[t] for t in groups()[1] + groups(1)[0]]
    layout = Layout.of(layers)
    assert layout.one_each
    check(STATS[stat].fn([t for [t] in layers], layout).tolist(), [LAYERED[stat](layer) for layer in layers])


@pytest.mark.parametrize("stat", sorted(s for s in LAYERED if STATS[s].parts))
def test_parts_read_step_by_step_then_combined_at_once_equal_each_step(stat):
    """How the watcher takes the every-step entries: one read per step, one combine for many steps."""
    steps = [groups(seed) for seed in range(3)]
    layout = Layout.of(steps[0])
    read_, combine = STATS[stat].parts
    reads = torch.stack([read_([t for layer in layers for t in layer]) for layers in steps], -1)  # (P, ..., 3)
    combined = combine(reads, layout)
    assert combined.shape == (3, 3)  # (L, steps)
    for i, layers in enumerate(steps):
        check(combined[:, i].tolist(), [LAYERED[stat](layer) for layer in layers])


def test_nan_and_inf_are_counted_and_poison_norm_and_max():
    layers = groups()
    layers[0][0][1, 2] = NAN
    layers[2][2][0] = INF
    layers[2][0][1, 1] = -INF
    flat, layout = [t for layer in layers for t in layer], Layout.of(layers)
    assert STATS["nonfinite"].fn(flat, layout).tolist() == [1.0, 0.0, 2.0]
    max_abs = STATS["grad_max_abs"].fn(flat, layout).tolist()
    assert math.isnan(max_abs[0]) and math.isfinite(max_abs[1]) and max_abs[2] == INF
    assert STATS["nonfinite"].proof == "grad_max_abs"  # its proof is not finite exactly where it counts some
    norms = STATS["grad_norm"].fn(flat, layout).tolist()
    assert not math.isfinite(norms[0]) and math.isfinite(norms[1]) and not math.isfinite(norms[2])


@pytest.mark.parametrize("members", [None, 3])
def test_update_ratio_equals_reference_and_leaves_its_inputs(members):
    before, after = groups(0, members), groups(1, members)
    layout = Layout.of(before, members=bool(members))
    flat_before, flat_after = [t for layer in before for t in layer], [t for layer in after for t in layer]
    kept = [t.clone() for t in flat_before]
    got = STATS["update_ratio"].fn(flat_before, flat_after, layout, members=bool(members))
    assert all(torch.equal(a, b) for a, b in zip(kept, flat_before, strict=True))
    for e in range(members or 1):
        pick = (lambda t, e=e: t[e]) if members else (lambda t: t)
        want = [ref_update_ratio([pick(t) for t in b], [pick(t) for t in a])
                for b, a in zip(before, after, strict=True)]
        check((got[:, e] if members else got).tolist(), want)


def test_saturated_frac_equals_reference():
    g = torch.Generator().manual_seed(0)
    sig = torch.sigmoid(torch.randn(64, 9, generator=g) * 6)
    tanh = torch.tanh(torch.randn(3, 8, 5, generator=g) * 4)
    tanh[0, 0, 0] = -0.98  # exactly on the margin counts as saturated
    got = STATS["saturated_frac"].fn([sig, tanh], [(0.0, 1.0), (-1.0, 1.0)])
    check(got.tolist(), [ref_saturated(sig, 0.0, 1.0), ref_saturated(tanh, -1.0, 1.0)])
    stacked = torch.stack([sig, sig.flip(0)])  # (E=2, B, F)
    per_member = STATS["saturated_frac"].fn([stacked], [(0.0, 1.0)], members=True)
    assert STATS["saturated_frac"].kinds == {"Sigmoid": (0.0, 1.0), "Tanh": (-1.0, 1.0)}
    assert per_member.shape == (1, 2)
    check(per_member[0].tolist(), [ref_saturated(sig, 0.0, 1.0)] * 2)


def test_dead_frac_equals_reference_for_dense_sequence_and_members():
    g = torch.Generator().manual_seed(0)
    dense = torch.relu(torch.randn(32, 10, generator=g) + 5)  # alive ...
    dense[:, :3] = 0.0  # ... but for three units
    dense[5, 0] = -0.0  # still zero
    dense[7, 1] = 1e-30  # tiny, but alive
    dense[9, 2] = NAN  # not zero: alive
    seq = torch.relu(torch.randn(4, 6, 8, generator=g) - 1.0)  # (B, T, H): units are the last axis
    seq[..., 5] = 0.0
    dead = STATS["dead_frac"]
    check(dead.fn([dense, seq]).tolist(), [ref_dead(dense), ref_dead(seq)])
    read_, combine = dead.parts  # the watcher's way: a piece in each module hook, combined at the step's end
    check(combine([read_(dense, None), read_(seq, None)]).tolist(), [ref_dead(dense), ref_dead(seq)])
    assert dead.fn([dense]).item() == pytest.approx(1 / 10)  # only column 0 (with -0.0)
    one = torch.tensor([0.0, 2.0, 0.0, 1.0])  # a single example: each feature is its own unit
    assert dead.fn([one]).item() == 0.5
    stacked = torch.stack([dense, torch.relu(dense + 1)])  # (E=2, B, F)
    per_member = dead.fn([stacked], members=True)
    check(per_member[0].tolist(), [ref_dead(dense), ref_dead(torch.relu(dense + 1))])


@pytest.mark.parametrize("members", [None, 3])
@pytest.mark.parametrize("stat", sorted(KERNEL))
def test_kernel_entries_equal_the_notebooks_formulas(stat, members):
    g, lead = torch.Generator().manual_seed(0), (members,) if members else ()
    start = [torch.randn(*lead, *shape, generator=g) for shape in ((5, 3), (4, 6), (2, 2))]  # weight matrices
    now = [t + 0.01 * torch.randn(t.shape, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(start)]
    start[0].view(-1)[1] = 0.0  # a zero weight: its % change is NaN, left out of the median
    lr = torch.tensor([0.1, 0.2, 0.5])[:, None, None] if members else 0.1
    got = STATS[stat].fn(start, now, lr, members=bool(members))
    assert got.shape == ((3, members) if members else (3,))
    for e in range(members or 1):
        rate = lr[e].item() if members else lr
        pick = (lambda t, e=e: t[e]) if members else (lambda t: t)
        want = [KERNEL[stat](pick(s), pick(n), rate) for s, n in zip(start, now, strict=True)]
        check((got[:, e] if members else got).tolist(), want)


def test_seed_formulas_by_hand():
    old, new = torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([[0.9, -2.5, 0.5]])
    assert STATS["seed_gradient"].fn([old], [new], 0.1).tolist() == pytest.approx([2.0])  # mean of 1, 5, 0
    assert STATS["percent_change"].fn([old], [new], 0.1).tolist() == pytest.approx([10.0])  # median of 10, 25, 0
    old, new = torch.tensor([[1.0, -2.0, 0.5, 4.0]]), torch.tensor([[0.9, -2.5, 0.5, 4.0]])
    assert STATS["percent_change"].fn([old], [new], 0.1).tolist() == pytest.approx([5.0])  # np.median(10, 25, 0, 0)


def test_tensor_norms_then_layer_norms_is_norm():
    layers = groups()
    flat, layout = [t for layer in layers for t in layer], Layout.of(layers)
    per_tensor = tensor_norms(flat)
    assert per_tensor.shape == (len(flat),)
    assert torch.allclose(layer_norms(per_tensor, layout), STATS["grad_norm"].fn(flat, layout))
    many = torch.stack([per_tensor, 2 * per_tensor], dim=1)  # (P, steps): many steps combined at once
    assert torch.allclose(layer_norms(many, layout)[:, 1], 2 * STATS["grad_norm"].fn(flat, layout))


# --- a made-up statistic, one entry, recorded by every monitor with no other edit --------------------
def l4_norm(tensors, layout, members=False):
    """The L4 norm per layer, (sum x^4)^(1/4): a statistic no monitor has heard of."""
    return STATS["grad_norm"].fn([t * t for t in tensors], layout, members).sqrt()


def ref_l4(group):
    return _flat(group).pow(4).sum().pow(0.25).item()


@pytest.fixture
def l4(monkeypatch):
    monkeypatch.setitem(STATS, "grad_l4_norm", Stat("grad", False, l4_norm))


def test_a_new_entry_is_recorded_by_the_watcher(l4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2), nn.ReLU(), nn.Linear(2, 1))
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    twin = copy.deepcopy(model)
    nn.functional.mse_loss(twin(x), y).backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, opt, every=2) as w:
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    assert sorted({r[0] for r in w.records.rows if r[3] == "grad_l4_norm"}) == [0, 2]  # sampled steps
    want = {name: ref_l4([p.grad for p in m.parameters()]) for name, m in twin.named_children() if list(m.parameters())}
    check(list(w.records.at("grad_l4_norm", 0).values()), list(want.values()))
    assert list(w.records.at("grad_l4_norm", 0)) == list(want)


def test_a_new_entry_is_recorded_by_an_ensemble_member_as_by_its_single_run(l4):
    base = Spec().replace(**{"data.n_samples": 64, "model.depth": 3, "model.width": 5, "train.epochs": 2,
                             "train.batch_size": 16})
    specs = [base, base.replace(**{"model.activation": "relu", "train.seed": 1})]
    for spec, member in zip(specs, train_many(specs), strict=True):
        single = {r[:3]: r[4] for r in train(spec).records.rows if r[3] == "grad_l4_norm"}
        mine = {r[:3]: r[4] for r in member.records.rows if r[3] == "grad_l4_norm"}
        assert single and single.keys() == mine.keys()
        check([mine[k] for k in single], list(single.values()), rel=1e-4)


def test_a_new_entry_is_recorded_by_the_keras_callback(l4):
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("the Keras callback's gradients are tested on KERAS_BACKEND=torch")
    from gradwatch.keras import GradWatch

    keras.utils.set_random_seed(0)
    x, y = np.random.default_rng(0).normal(size=(64, 2)), np.random.default_rng(1).integers(0, 2, size=(64, 1))
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4, "sigmoid"), keras.layers.Dense(1, "sigmoid")])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="binary_crossentropy")
    old = [w.copy() for w in model.get_weights()]
    watch = GradWatch(probe=(x, y), verbose=0)  # one full-batch SGD step: (old - new) / lr is the gradient
    model.fit(x, y, epochs=1, batch_size=len(x), shuffle=False, verbose=0, callbacks=[watch])
    grads = [torch.tensor((o - n) / 0.5) for o, n in zip(old, model.get_weights(), strict=True)]
    got = watch.records.at("grad_l4_norm", 0)
    assert list(got) == [layer.name for layer in model.layers]
    check(list(got.values()), [ref_l4(grads[0:2]), ref_l4(grads[2:4])], rel=1e-3)


def readme_table() -> dict[str, tuple[str, str, str]]:
    """statistic -> (read at, how often, Keras callback) from the README's table of statistics."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = re.finditer(r"^\| `(\w+)` \| `(\w+)` \| (\w+) \| (yes|no) \|", text, re.M)
    return {m[1]: (m[2], m[3], m[4]) for m in rows}


def test_the_readmes_statistics_are_the_table_read_where_and_when_it_says():
    assert {name: row[:2] for name, row in readme_table().items()} == {
        name: (s.point, s.cadence) for name, s in STATS.items()}


def test_clip_factor_is_after_over_before_and_one_without_a_gradient():
    before, after = torch.tensor([2.0, 0.0, 4.0]), torch.tensor([1.0, 0.0, 2.0])
    assert STATS["clip_factor"].fn(before, after).tolist() == [0.5, 1.0, 0.5]
    with_members = STATS["clip_factor"].fn(before[:, None].expand(3, 2), after[:, None].expand(3, 2), members=True)
    assert with_members.tolist() == [[0.5, 0.5], [1.0, 1.0], [0.5, 0.5]]


def test_skipped_is_the_scalers_found_inf_flag():
    assert STATS["skipped"].fn(torch.tensor([0.0, 1.0, 2.0])).tolist() == [0.0, 1.0, 1.0]
    assert STATS["skipped"].fn(torch.tensor(1.0)).tolist() == [1.0]  # GradScaler's found_inf is a scalar


def test_percent_change_of_a_weight_that_starts_at_zero_is_skipped_not_inf():
    got = percent_change(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]))
    assert math.isnan(got[0]) and got[1] == 50.0
