"""Every STATS entry against a naive, slow, per-tensor reference (micrograd's check against torch).

References run in float64 over each layer's tensors concatenated, the way one would write the
statistic on paper. ``members=True`` is checked member by member against the same references.
"""

import math

import pytest
import torch

from gradwatch.stats import STATS, Layout, layer_norms, tensor_norms, update_ratio_

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


LAYERED = {  # STATS entries of the form fn(tensors, layout, members) -> (L,) or (L, E)
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


OTHERS = {"update_ratio", "saturated_frac", "dead_frac", "seed_gradient", "percent_change"}


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
    assert set(STATS) == set(LAYERED) | OTHERS


@pytest.mark.parametrize("stat", sorted(LAYERED))
def test_layered_stat_equals_naive_reference(stat):
    layers = groups()
    got = STATS[stat]([t for layer in layers for t in layer], Layout.of(layers))
    assert got.shape == (3,)
    check(got.tolist(), [LAYERED[stat](layer) for layer in layers])


@pytest.mark.parametrize("stat", sorted(LAYERED))
def test_layered_stat_with_members_equals_reference_per_member(stat):
    layers = groups(members=4)
    got = STATS[stat]([t for layer in layers for t in layer], Layout.of(layers, members=True), members=True)
    assert got.shape == (3, 4)  # (L, E)
    for e in range(4):
        check(got[:, e].tolist(), [LAYERED[stat]([t[e] for t in layer]) for layer in layers])


@pytest.mark.parametrize("stat", sorted(LAYERED))
def test_one_tensor_per_layer_takes_the_short_path_and_agrees(stat):
    layers = [[t] for t in groups()[1] + groups(1)[0]]
    layout = Layout.of(layers)
    assert layout.one_each
    check(STATS[stat]([t for [t] in layers], layout).tolist(), [LAYERED[stat](layer) for layer in layers])


def test_nan_and_inf_are_counted_and_poison_norm_and_max():
    layers = groups()
    layers[0][0][1, 2] = NAN
    layers[2][2][0] = INF
    layers[2][0][1, 1] = -INF
    flat, layout = [t for layer in layers for t in layer], Layout.of(layers)
    assert STATS["nonfinite"](flat, layout).tolist() == [1.0, 0.0, 2.0]
    max_abs = STATS["grad_max_abs"](flat, layout).tolist()
    assert math.isnan(max_abs[0]) and math.isfinite(max_abs[1]) and max_abs[2] == INF
    norms = STATS["grad_norm"](flat, layout).tolist()
    assert not math.isfinite(norms[0]) and math.isfinite(norms[1]) and not math.isfinite(norms[2])


@pytest.mark.parametrize("members", [None, 3])
def test_update_ratio_equals_reference_and_the_in_place_form_agrees(members):
    before, after = groups(0, members), groups(1, members)
    layout = Layout.of(before, members=bool(members))
    flat_before, flat_after = [t for layer in before for t in layer], [t for layer in after for t in layer]
    kept = [t.clone() for t in flat_before]
    got = STATS["update_ratio"](flat_before, flat_after, layout, members=bool(members))
    assert all(torch.equal(a, b) for a, b in zip(kept, flat_before, strict=True))  # the pure form: untouched
    for e in range(members or 1):
        pick = (lambda t, e=e: t[e]) if members else (lambda t: t)
        want = [ref_update_ratio([pick(t) for t in b], [pick(t) for t in a])
                for b, a in zip(before, after, strict=True)]
        check((got[:, e] if members else got).tolist(), want)
    in_place = update_ratio_(flat_before, flat_after, layout, members=bool(members))
    assert torch.allclose(in_place, got, rtol=1e-6)
    assert all(torch.equal(d, k - a) for d, k, a in zip(flat_before, kept, flat_after, strict=True))


def test_saturated_frac_equals_reference():
    g = torch.Generator().manual_seed(0)
    sig = torch.sigmoid(torch.randn(64, 9, generator=g) * 6)
    tanh = torch.tanh(torch.randn(3, 8, 5, generator=g) * 4)
    tanh[0, 0, 0] = -0.98  # exactly on the margin counts as saturated
    got = STATS["saturated_frac"]([sig, tanh], [(0.0, 1.0), (-1.0, 1.0)])
    check(got.tolist(), [ref_saturated(sig, 0.0, 1.0), ref_saturated(tanh, -1.0, 1.0)])
    stacked = torch.stack([sig, sig.flip(0)])  # (E=2, B, F)
    per_member = STATS["saturated_frac"]([stacked], [(0.0, 1.0)], members=True)
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
    check(STATS["dead_frac"]([dense, seq]).tolist(), [ref_dead(dense), ref_dead(seq)])
    assert STATS["dead_frac"]([dense]).item() == pytest.approx(1 / 10)  # only column 0 (with -0.0)
    one = torch.tensor([0.0, 2.0, 0.0, 1.0])  # a single example: each feature is its own unit
    assert STATS["dead_frac"]([one]).item() == 0.5
    stacked = torch.stack([dense, torch.relu(dense + 1)])  # (E=2, B, F)
    per_member = STATS["dead_frac"]([stacked], members=True)
    check(per_member[0].tolist(), [ref_dead(dense), ref_dead(torch.relu(dense + 1))])


def test_seed_formulas_are_the_notebooks():
    old, new = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.9, -2.5, 0.5])
    assert torch.allclose(STATS["seed_gradient"](old, new, 0.1), torch.tensor([1.0, 5.0, 0.0]))
    assert torch.allclose(STATS["percent_change"](old, new), torch.tensor([10.0, 25.0, 0.0]))


def test_tensor_norms_then_layer_norms_is_norm():
    layers = groups()
    flat, layout = [t for layer in layers for t in layer], Layout.of(layers)
    per_tensor = tensor_norms(flat)
    assert per_tensor.shape == (len(flat),)
    assert torch.allclose(layer_norms(per_tensor, layout), STATS["grad_norm"](flat, layout))
    many = torch.stack([per_tensor, 2 * per_tensor], dim=1)  # (P, steps): many steps combined at once
    assert torch.allclose(layer_norms(many, layout)[:, 1], 2 * STATS["grad_norm"](flat, layout))
