"""The gradient the watcher records is the one the update applies, before clipping, on the stacks people train
with: mixed precision (bf16; fp16 with GradScaler, fused optimizers too), clipping, accumulation, layers
unfrozen mid-run, tied output heads. Each test computes that gradient by hand from ``p.grad`` at the moment it
is complete (after the last backward, before unscaling and clipping, divided by the loss scale) and checks
every recorded per-layer norm against it, and that the healthy run gets no finding.
"""

import math

import pytest
import torch
from torch import nn

from gradwatch.watch import watch


class Net(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.dense1, self.dense2, self.out = nn.Linear(6, width), nn.Linear(width, width), nn.Linear(width, 1)

    def forward(self, x):
        return self.out(torch.relu(self.dense2(torch.relu(self.dense1(x)))))


def data(steps, n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, n, 6, generator=g)
    return x, x[..., :1] * 2 - x[..., 1:2]


def by_layer(model: nn.Module, scale: float = 1.0) -> dict[str, float]:
    """The hand computation: each layer's gradient norm, in float64, divided by the loss scale."""
    out = {}
    for name, module in model.named_modules():
        grads = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
        if grads:
            out[name] = torch.cat([g.double().reshape(-1) for g in grads]).norm().item() / scale
    return out


def assert_recorded(w, expected: list[dict[str, float]]):
    w.flush()
    steps = sorted({r[0] for r in w.records.rows if r[3] == "grad_norm"})
    assert steps == list(range(len(expected)))  # one record per update, nothing else
    for step, want in enumerate(expected):
        got = w.records.at("grad_norm", step)
        assert got.keys() == want.keys(), step
        for layer, value in want.items():
            assert got[layer] == pytest.approx(value, rel=1e-5, abs=1e-12), (step, layer)


def test_bf16_autocast_with_clipping_records_the_gradient_before_clipping():
    torch.manual_seed(0)
    model, (xs, ys) = Net(), data(12)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    w, expected, totals = watch(model, opt, every=3), [], []
    for x, y in zip(xs, ys, strict=True):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
        expected.append(by_layer(model))
        totals.append(nn.utils.clip_grad_norm_(model.parameters(), 0.5).item())
        opt.step()
    assert_recorded(w, expected)
    assert min(totals) > 0.5  # every step was clipped
    for step in (0, 3, 6, 9):
        factors = w.records.at("clip_factor", step)
        assert set(factors) == {"dense1", "dense2", "out"}
        assert all(f == pytest.approx(0.5 / totals[step], rel=1e-4) for f in factors.values())
    assert w.diagnose() == []


@pytest.mark.parametrize("fused", [False, True])
def test_fp16_grad_scaler_unscaled_and_skipped_updates_are_not_findings(fused):
    torch.manual_seed(0)
    model, (xs, ys) = Net(), data(16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**18)  # fp16 overflows at first: the scaler skips
    w = watch(model, opt, every=2, scaler=None if fused else scaler)  # a fused optimizer is handed the scale
    expected, skipped = [], []
    for x, y in zip(xs, ys, strict=True):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        grads = by_layer(model, scale)
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() < scale:
            skipped.append(len(expected) + len(skipped))
        else:
            expected.append(grads)
    assert 0 < len(skipped) < 8 and len(expected) >= 8
    w.flush()
    rows = {r[0]: r[4] for r in w.records.rows if r[3] == "skipped"}
    assert [s for s, v in rows.items() if v > 0] == skipped
    applied = [s for s in range(16) if s not in skipped]
    for step, want in zip(applied, expected, strict=True):
        got = w.records.at("grad_norm", step)
        assert got.keys() == want.keys()
        assert all(got[k] == pytest.approx(v, rel=1e-5) for k, v in want.items()), step
    assert all(math.isfinite(r[4]) for r in w.records.rows)
    assert not {r[0] for r in w.records.rows if r[3] == "grad_norm"} & set(skipped)
    assert w.diagnose() == []
    assert w.run().summary["skipped_steps"] == len(skipped)


def test_fp16_backprop_norm_is_unscaled():
    torch.manual_seed(0)
    model, (xs, ys) = Net(), data(1)
    twin = Net()
    twin.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    w = watch(model, opt, every=1, scaler=scaler)
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = nn.functional.mse_loss(model(xs[0]).float(), ys[0])
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    with torch.autocast("cpu", dtype=torch.float16):
        out = twin.out(torch.relu(twin.dense2(torch.relu(twin.dense1(xs[0])))))
        out.retain_grad()
        (nn.functional.mse_loss(out.float(), ys[0]) * 2.0**10).backward()
    want = out.grad.double().norm().item() / 2.0**10
    w.flush()
    assert w.records.at("backprop_norm", 0)["out"] == pytest.approx(want, rel=1e-5)


def test_gradient_accumulation_is_one_record_per_update():
    torch.manual_seed(0)
    model, (xs, ys) = Net(), data(24)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    w, expected = watch(model, opt, every=2), []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        (nn.functional.mse_loss(model(x), y) / 4).backward()
        if i % 4 == 3:
            expected.append(by_layer(model))
            nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
            opt.zero_grad()
    assert_recorded(w, expected)
    assert w.diagnose() == []


def test_without_an_optimizer_a_warning_says_what_is_recorded():
    with pytest.warns(UserWarning, match="partial under accumulation"):
        watch(Net())


def test_a_layer_unfrozen_mid_run_is_recorded_from_then_on():
    torch.manual_seed(0)
    model, (xs, ys) = Net(), data(10)
    model.dense1.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    w, expected = watch(model, opt, every=2), []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if i == 5:
            model.dense1.requires_grad_(True)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        expected.append(by_layer(model))
        opt.step()
    assert "dense1" not in expected[4] and "dense1" in expected[5]
    assert_recorded(w, expected)
    assert set(w.records.at("update_ratio", 4)) == {"dense2", "out"}
    assert set(w.records.at("update_ratio", 6)) == {"dense1", "dense2", "out"}
    assert w.diagnose() == []


def test_the_first_and_last_layers_frozen_mid_run_still_give_the_gradient_before_clipping():
    """A backward is noticed by two hooks, on the first and the last trainable layer (not one per layer,
    each of which costs every step); freezing either moves its hook, so no update is read after clipping."""
    torch.manual_seed(0)
    model, (xs, ys) = Net(), data(9)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    w, expected = watch(model, opt, every=2), []
    hooks = [p for p in model.parameters() if p._post_accumulate_grad_hooks]
    assert hooks == [model.dense1.weight, model.out.weight]
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if i == 3:
            model.out.requires_grad_(False)
        if i == 6:
            model.dense1.requires_grad_(False)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        expected.append(by_layer(model))
        assert nn.utils.clip_grad_norm_(model.parameters(), 0.01) > 0.01  # every step clipped
        opt.step()
    assert set(expected[8]) == {"dense2"}
    assert_recorded(w, expected)
    assert set(w.records.at("clip_factor", 8)) == {"dense2"}
    w.detach()
    assert not [p for p in model.parameters() if p._post_accumulate_grad_hooks]


class TiedLM(nn.Module):
    """GPT-2's layout in miniature: the output head's weight is the token embedding."""

    def __init__(self, vocab=11, width=8):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(5, width)
        self.h, self.ln_f = nn.Linear(width, width), nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens):
        h = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        return self.lm_head(self.ln_f(h + torch.tanh(self.h(h))))


def test_a_tied_output_head_is_the_last_layer():
    torch.manual_seed(0)
    model = TiedLM()
    tokens = torch.randint(0, 11, (20, 8, 5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    w, expected = watch(model, opt, every=5), []
    for t in tokens:
        opt.zero_grad()
        nn.functional.cross_entropy(model(t[:, :-1]).flatten(0, 1), t[:, 1:].flatten()).backward()
        expected.append({n: v for n, v in by_layer(model).items() if n != "wte"})  # wte's weight is lm_head's
        opt.step()
    assert_recorded(w, expected)
    assert w.records.layers("grad_norm")[-1] == "lm_head"
    assert w.diagnose() == []


def test_a_layer_with_exactly_zero_gradient_stays_finite():
    torch.manual_seed(0)

    class Gated(Net):
        def forward(self, x):
            return self.out(torch.relu(self.dense1(x))) + 0.0 * self.dense2(x[:, :1].expand(-1, 16)).sum()

    model, (xs, ys) = Gated(), data(8)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    w, expected = watch(model, opt, every=1), []
    for x, y in zip(xs, ys, strict=True):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        expected.append(by_layer(model))
        nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
    assert expected[0]["dense2"] == 0.0
    assert_recorded(w, expected)
    assert all(math.isfinite(r[4]) for r in w.records.rows)
    assert w.records.at("clip_factor", 0)["dense2"] == 1.0  # 0 / 0: nothing was clipped there
    assert w.records.at("clip_factor", 0)["out"] < 1.0
    # dense2 never gets a gradient: that, and no exploding ratio or NaN/Inf from its 0, is the diagnosis
    assert [(f.kind, f.layers) for f in w.diagnose()] == [("no_gradient", ["dense2"])]


@pytest.mark.parametrize("order", ["watch_then_compile", "compile_then_watch", "model_compile"])
def test_torch_compile_records_the_eager_gradient_with_no_extra_graphs(order):
    from torch._dynamo.utils import counters

    def run(watched: bool):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model, (xs, ys) = Net(), data(6)
        if order == "model_compile":
            model.compile(backend="aot_eager")  # tracing and AOT autograd, no C++ build
        call = torch.compile(model, backend="aot_eager") if order == "compile_then_watch" else model
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        w = watch(call, opt, every=2) if watched else None
        if order == "watch_then_compile":
            call = torch.compile(model, backend="aot_eager")
        expected = []
        for x, y in zip(xs, ys, strict=True):
            opt.zero_grad()
            nn.functional.mse_loss(call(x), y).backward()
            expected.append(by_layer(model))
            opt.step()
        return w, expected, counters["stats"]["unique_graphs"], sum(counters["recompiles"].values())

    try:
        _, _, graphs, recompiles = run(watched=False)
    except Exception as error:  # noqa: BLE001 - no working compiler here
        pytest.skip(f"torch.compile unavailable: {error}")
    w, expected, watched_graphs, watched_recompiles = run(watched=True)
    assert (watched_graphs, watched_recompiles) == (graphs, recompiles)
    assert_recorded(w, expected)
    assert {"grad_max_abs", "update_ratio", "weight_norm"} <= set(w.records.stats())
    assert w.diagnose() == []


def test_a_driven_watcher_records_an_update_whose_step_never_came_as_skipped():
    """As Lightning drives it: the gradient committed after unscaling, then GradScaler skips the step."""
    from gradwatch.watch import Watcher

    torch.manual_seed(0)
    model, (xs, ys) = Net(), data(4)  # the scaler skips steps 0, 1 and 3, the last
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**18)
    w, expected, skipped = Watcher(model, opt, every=2, driven=True), [], []
    for step, (x, y) in enumerate(zip(xs, ys, strict=True)):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        w.before_step()  # Lightning's on_before_optimizer_step: unscaled, before clipping
        grads = by_layer(model)
        scaler.step(opt)
        scaler.update()
        (skipped if scaler.get_scale() < scale else expected).append(step if scaler.get_scale() < scale else grads)
    w.detach()
    assert skipped and [r[0] for r in w.records.rows if r[3] == "skipped"] == skipped
    assert skipped[-1] == 3  # only detach() can tell that the last step never came
    applied = [s for s in range(4) if s not in skipped]
    for step, want in zip(applied, expected, strict=True):
        assert w.records.at("grad_norm", step) == pytest.approx(want, rel=1e-5)
    assert all(math.isfinite(r[4]) for r in w.records.rows) and w.diagnose() == []
