"""The watcher against autograd: every recorded statistic equals a naive per-parameter twin, on the
models people actually watch (frozen, shared, recurrent, compiled, DDP-wrapped), at the promised cost.
"""

import copy
import gc
import math
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from torch import nn

from gradwatch import stats
from gradwatch.watch import watch
from test_stats import LAYERED, ref_dead, ref_saturated, ref_update_ratio

# activation entry -> its naive reference on one module's output, given the entry's parameter for its kind
ACTIVATION = {"saturated_frac": lambda out, bounds: ref_saturated(out, *bounds),
              "dead_frac": lambda out, _: ref_dead(out)}

GRADWATCH = str(Path(__file__).resolve().parents[1] / "src" / "gradwatch")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8),
                         nn.Sigmoid(), nn.Linear(8, 1))


def batch(seed=1, n=32, features=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randn(n, 1, generator=g)


def sgd_step(model, opt, x, y):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss


def at(w, stat, step=0):
    return w.records.at(stat, step)


def close(a, b, rel=1e-5):
    return a == pytest.approx(b, rel=rel, abs=1e-10)


def references(model, x, y, lr):
    """Per layer, what each STATS entry the watcher reads should be: from a copy, autograd and
    test_stats' naive per-layer references, so a new entry is checked here with no edit."""
    twin = copy.deepcopy(model)
    outputs, layers = {}, {n: m for n, m in twin.named_modules() if list(m.parameters(recurse=False))}

    def keep(name):
        def hook(_m, _i, out):
            out.retain_grad()
            outputs[name] = out
        return hook

    for name, module in twin.named_modules():
        if name:
            module.register_forward_hook(keep(name))
    nn.functional.mse_loss(twin(x), y).backward()
    points = ("grad", "weight", "update", "output", "signal", "activation")  # what the watcher reads
    ref = {stat: {} for point in points for stat in stats.at(point)}
    for name, module in layers.items():
        params = list(module.parameters(recurse=False))
        tensors = {"grad": [p.grad for p in params], "weight": params, "output": [outputs[name]],
                   "signal": [outputs[name].grad]}
        for point, group in tensors.items():
            for stat in stats.at(point):
                ref[stat][name] = LAYERED[stat](group)
        for stat in stats.at("update"):  # SGD: W_new - W_old = -lr g
            ref[stat][name] = ref_update_ratio(params, [p.detach() - lr * p.grad for p in params])
    for name, module in twin.named_modules():
        for stat, s in stats.at("activation").items():
            if type(module).__name__ in s.kinds:
                out = outputs[name].detach()
                ref[stat][name] = ACTIVATION[stat](out, s.kinds[type(module).__name__])
    return ref


def test_every_recorded_statistic_equals_its_autograd_reference():
    model, (x, y) = mlp(), batch()
    with torch.no_grad():  # some dead ReLU units and saturated sigmoids, so the fractions are not all 0
        model[0].bias[:6] = -20.0
        model[4].weight.mul_(40.0)
    ref = references(model, x, y, lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, opt, every=1) as w:
        sgd_step(model, opt, x, y)
    assert ref["dead_frac"]["1"] > 0 and ref["saturated_frac"]["5"] > 0
    for stat, want in ref.items():
        got = at(w, stat)
        assert got.keys() == want.keys(), stat
        for layer, value in want.items():
            assert close(got[layer], value, rel=1e-4 if stat == "update_ratio" else 1e-5), (stat, layer)


def test_gradient_norms_every_step_the_rest_every_few_steps():
    model, (x, y) = mlp(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = watch(model, opt, every=4)
    for _ in range(9):
        sgd_step(model, opt, x, y)
    w.flush()
    steps = {stat: sorted({r[0] for r in w.records.rows if r[3] == stat}) for stat in w.records.stats()}
    assert steps["grad_norm"] == steps["grad_rms"] == list(range(9))
    for stat in ("grad_max_abs", "grad_mean_abs", "nonfinite", "update_ratio", "backprop_norm", "act_rms",
                 "saturated_frac", "dead_frac"):
        assert steps[stat] == [0, 4, 8], stat
    assert w.records.layers("backprop_norm") == ["0", "2", "4", "6"]  # input to output, as grad_norm


def test_no_optimizer_each_backward_is_a_step_and_norms_match():
    model, (x, y) = mlp(), batch()
    ref = references(model, x, y, lr=0.0)
    w = watch(model, every=2)
    for _ in range(3):
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
    w.detach()
    assert w.step == 3 and "update_ratio" not in w.records.stats()
    for layer, value in ref["grad_norm"].items():
        assert close(at(w, "grad_norm", 2)[layer], value)
    assert close(at(w, "backprop_norm", 2)["4"], ref["backprop_norm"]["4"])


def test_nan_and_inf_gradients_are_recorded_not_raised():
    model, (x, y) = mlp(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = watch(model, opt, every=1)
    sgd_step(model, opt, x, y)
    y[0] = float("nan")  # one bad label: NaN gradients, masked only where a ReLU was off
    ref = references(model, x, y, lr=0.01)
    sgd_step(model, opt, x, y)
    w.detach()
    assert set(at(w, "nonfinite", 0).values()) == {0.0}
    assert at(w, "nonfinite", 1) == ref["nonfinite"]
    assert ref["nonfinite"]["6"] == 9.0 and ref["nonfinite"]["4"] == 104.0  # every weight and bias
    assert all(math.isnan(at(w, "grad_norm", 1)[k]) for k in ("2", "4", "6"))
    assert "non_finite" in [f.kind for f in w.diagnose()]


def test_frozen_gradless_and_shared_parameters():
    torch.manual_seed(0)
    a, b, unused, frozen = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1)
    b.weight = a.weight  # shared: counted once, under the last module that holds it (a tied output head)
    frozen.requires_grad_(False)
    model = nn.ModuleDict({"a": a, "b": b, "unused": unused, "frozen": frozen})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    w = watch(model, opt, every=1)
    for _ in range(2):
        opt.zero_grad()
        frozen(b(torch.relu(a(x)))).sum().backward()
        opt.step()
    w.detach()
    norms = at(w, "grad_norm", 1)
    assert set(norms) == {"a", "b"}  # no gradient for `unused`; `frozen` is not trainable
    assert close(norms["a"], a.bias.grad.norm().item())  # a's own parameter only
    assert close(norms["b"], torch.cat([b.weight.grad.reshape(-1), b.bias.grad]).norm().item())
    assert set(at(w, "update_ratio", 1)) == {"a", "b", "unused"}


@pytest.mark.parametrize("kind", [nn.LSTM, nn.RNN])
def test_recurrent_modules(kind):
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.out = kind(3, 5, batch_first=True), nn.Linear(5, 1)

        def forward(self, x):
            return self.out(self.rnn(x)[0][:, -1])

    model, x = Net(), torch.randn(4, 7, 3)
    twin = copy.deepcopy(model)
    seq = twin.rnn(x)[0]
    seq.retain_grad()
    twin.out(seq[:, -1]).sum().backward()
    opt = torch.optim.Adam(model.parameters())
    with watch(model, opt, every=1) as w:
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    grads = torch.cat([p.grad.reshape(-1) for p in twin.rnn.parameters()])
    assert close(at(w, "grad_norm")["rnn"], grads.norm().item())
    assert close(at(w, "backprop_norm")["rnn"], seq.grad.norm().item())
    assert close(at(w, "act_rms")["rnn"], seq.detach().square().mean().sqrt().item())


def test_dead_units_of_a_conv_are_its_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 1))
    with torch.no_grad():
        model[0].bias[:2] = -100.0  # channels 0 and 1 dead
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, opt) as w:
        sgd_step(model, opt, torch.randn(5, 2, 8, 8), torch.randn(5, 1))
    assert at(w, "dead_frac") == {"1": 0.5}


def test_torch_compiled_model():
    model, (x, y) = mlp(), batch()
    ref = references(model, x, y, lr=0.1)
    try:
        compiled = torch.compile(model, backend="aot_eager")  # tracing and AOT autograd, no C++ build
        opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
        w = watch(compiled, opt, every=1)
        sgd_step(compiled, opt, x, y)
    except Exception as error:  # noqa: BLE001 - no working compiler here
        pytest.skip(f"torch.compile unavailable: {error}")
    w.detach()
    for stat in ("grad_norm", "update_ratio"):
        assert at(w, stat).keys() == ref[stat].keys()
        assert all(close(at(w, stat)[k], v, rel=1e-4) for k, v in ref[stat].items())


def test_ddp_wrapped_model_is_named_like_the_model(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already in use")
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    except Exception as error:  # noqa: BLE001 - no gloo backend here
        pytest.skip(f"gloo unavailable: {error}")
    try:
        model, (x, y) = mlp(), batch()
        ref = references(model, x, y, lr=0.1)
        wrapped = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
        with watch(wrapped, opt, every=1) as w:
            sgd_step(wrapped, opt, x, y)
        grads, signal = at(w, "grad_norm"), at(w, "backprop_norm")
        # DDP's reducer holds the process group: it goes first, so the group is not torn down under it
        del w, wrapped, opt
        gc.collect()
    finally:
        dist.destroy_process_group()
    assert grads.keys() == ref["grad_norm"].keys()  # "0", not "module.0"
    assert all(close(grads[k], v) for k, v in ref["grad_norm"].items())
    assert close(signal["6"], ref["backprop_norm"]["6"])


def test_at_most_one_host_sync_per_every_steps(monkeypatch):
    calls = []

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(GRADWATCH):
                calls.append(name)
            return original(self, *args, **kwargs)
        return wrapper

    for name in ("tolist", "item", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    model, (x, y) = mlp(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watch(model, opt, every=10)
    for _ in range(30):
        sgd_step(model, opt, x, y)
    assert calls == ["tolist"] * 3


def test_module_hooks_exist_only_on_sampled_steps():
    model, (x, y) = mlp(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = watch(model, opt, every=3)
    hooked = []
    for _ in range(7):
        hooked.append(sum(len(m._forward_hooks) for m in model.modules()))
        sgd_step(model, opt, x, y)
    assert hooked == [7, 0, 0, 7, 0, 0, 7]  # 4 layers + 3 activations, on steps 0, 3, 6
    w.detach()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_detach_leaves_forward_and_backward_bit_identical():
    watched, (x, y) = mlp(), batch()
    plain = copy.deepcopy(watched)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (watched, plain)]
    w = watch(watched, opts[0], every=2)
    for _ in range(5):  # watching changes nothing either
        for model, opt in zip((watched, plain), opts, strict=True):
            sgd_step(model, opt, x, y)
    w.detach()
    assert not opts[0]._optimizer_step_pre_hooks and not opts[0]._optimizer_step_post_hooks
    assert not any(getattr(p, "_post_accumulate_grad_hooks", None) for p in watched.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in watched.modules())
    outs = []
    for model in (watched, plain):
        model.zero_grad()
        out = model(x)
        nn.functional.mse_loss(out, y).backward()
        outs.append((out, [p.grad for p in model.parameters()], [p.detach() for p in model.parameters()]))
    (out_w, grads_w, weights_w), (out_p, grads_p, weights_p) = outs
    assert torch.equal(out_w, out_p)
    assert all(torch.equal(a, b) for a, b in zip(grads_w + weights_w, grads_p + weights_p, strict=True))


def test_ten_thousand_steps_stay_within_the_record_buffer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    w = watch(model, opt, every=10, buffer=500)
    tracemalloc.start()
    for step in range(10_000):
        sgd_step(model, opt, x, y)
        if step == 999:
            gc.collect()  # empties CPython's free lists, which would otherwise count as growth
            settled = tracemalloc.get_traced_memory()[0]
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - settled
    tracemalloc.stop()
    assert w.step == 10_000 and len(w.records) == 500 and w.records.rows[-1][0] == 9_990  # the last flush
    assert len(w._reads.steps) == 9 and not w._pending and not w._patterns.some  # steps 9991-9999 wait for the next one
    w.flush()
    assert len(w.records) == 500 and w.records.rows[-1][0] == 9_999 and not w._reads.steps
    assert grown < 64_000, grown  # bytes: nothing piles up beyond the 500 rows already held at step 1000


def test_an_evaluation_pass_between_steps_is_not_recorded():
    model, (x, y) = mlp(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = references(model, x, y, lr=0.1)
    w = watch(model, opt, every=1)
    with torch.no_grad():
        model(torch.randn(3, 6) * 100)  # hooks are armed, but this is not a training step
    sgd_step(model, opt, x, y)
    w.detach()
    assert all(close(at(w, "act_rms")[k], v) for k, v in ref["act_rms"].items())


def test_bad_cadence_or_buffer_fail_in_one_line():
    with pytest.raises(ValueError, match="every: got 0; allowed: >= 1"):
        watch(mlp(), every=0)
    with pytest.raises(ValueError, match="buffer: got 0; allowed: >= 1"):
        watch(mlp(), buffer=0)


def test_outputs_frame_and_run():
    model, (x, y) = mlp(), batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, opt, every=2) as w:
        for epoch in range(2):
            loss = sgd_step(model, opt, x, y)
            w.log(epoch=epoch, loss=loss.item())
    frame = w.frame()
    assert list(frame.columns) == ["run", "step", "epoch", "layer", "stat", "value"]
    assert set(frame[frame.stat == "loss"].epoch) == {0, 1}
    assert len(w.run(name="mine").records) == len(frame)


def _state_rows(w) -> list[float]:
    return [r[4] for r in w.records.rows if r[3] == "state_grad_norm"]


@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_an_unrolled_cell_records_dl_dh_t_at_every_time_step(kind):
    from gradwatch.nets import build
    from gradwatch.spec import ModelSpec

    torch.manual_seed(0)
    model, x = build(ModelSpec(kind=kind, width=8), 2, 1), torch.randn(5, 7, 2)
    states, h = [], None  # the reference: the same unrolled loop with every h_t kept
    for t in range(7):
        h = model.cell(x[:, t], h)
        states.append(h[0] if kind == "lstm" else h)
        states[-1].retain_grad()
    model.out(states[-1]).sum().backward()
    expected = [s.grad.norm().item() for s in states]
    model.zero_grad()
    with watch(model, torch.optim.SGD(model.parameters(), lr=0.0), every=1) as w:
        model(x).sum().backward()
        w.optimizer.step()
    assert _state_rows(w) == pytest.approx(expected, rel=1e-5)
    assert [r[2] for r in w.records.rows if r[3] == "state_grad_norm"] == [f"t{t}" for t in range(7)]


def test_a_fused_rnn_records_the_signal_reaching_each_input_step():
    torch.manual_seed(0)
    rnn, out = nn.RNN(2, 8, batch_first=True), nn.Linear(8, 1)
    model = nn.Sequential()
    model.rnn, model.out = rnn, out
    model.forward = lambda x: out(rnn(x)[0][:, -1])
    x = torch.randn(5, 7, 2, requires_grad=True)
    model(x).sum().backward()
    expected = x.grad.norm(dim=(0, 2)).tolist()
    with watch(model, torch.optim.SGD(model.parameters(), lr=0.0), every=1) as w:
        model(x.detach()).sum().backward()
        w.optimizer.step()
    assert _state_rows(w) == pytest.approx(expected, rel=1e-5)
    assert expected[0] < expected[-1]  # the signal fades toward the sequence's start
