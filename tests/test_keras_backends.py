"""GradWatch on whichever Keras backend this process runs (the Makefile runs this file once per backend:
torch, tensorflow, jax, each in its own pytest process): the probe's gradient norms equal an independent
gradient of the loss in training mode (``torch.autograd``, ``tf.GradientTape``, ``jax.grad``), the probe
changes no layer's state, and without gradient norms the verdict is ``unknown``.
"""

import math

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from gradwatch.data import load  # noqa: E402
from gradwatch.keras import GradWatch  # noqa: E402
from gradwatch.spec import DataSpec  # noqa: E402

BACKEND = keras.backend.backend()


@pytest.fixture(scope="module")
def moons():
    data = load(DataSpec())
    return data.x_train.numpy(), data.y_train.numpy().reshape(-1, 1)


def bn_model(dropout: float = 0.0) -> keras.Model:
    """The seed's deep sigmoid net with batch normalisation before each activation (and optional dropout)."""
    keras.utils.set_random_seed(0)
    layers = [keras.Input((2,))]
    for _ in range(6):
        layers += [keras.layers.Dense(10), keras.layers.BatchNormalization(), keras.layers.Activation("sigmoid")]
        layers += [keras.layers.Dropout(dropout)] if dropout else []
    model = keras.Sequential([*layers, keras.layers.Dense(1, "sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    return model


def gradients(model, x, y) -> list[np.ndarray]:
    """The loss's gradient w.r.t. every trainable weight in training mode, by the backend's own autodiff."""
    def loss(out):
        return keras.ops.mean(keras.losses.binary_crossentropy(y, out))

    weights = model.trainable_weights
    if BACKEND == "torch":
        import torch

        return [g.numpy() for g in torch.autograd.grad(loss(model(x, training=True)), [w.value for w in weights])]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value = loss(model(x, training=True))
        return [g.numpy() for g in tape.gradient(value, weights)]
    import jax

    state = [v.value for v in model.non_trainable_variables]
    return [np.asarray(g) for g in jax.grad(lambda vs: loss(model.stateless_call(vs, state, x, training=True)[0]))(
        [w.value for w in weights])]


def dense_norms(model, x, y) -> list[float]:
    """Each Dense layer's gradient L2 norm (kernel and bias together), by the backend's own autodiff."""
    grads = gradients(model, keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y))
    dense = [i for i, w in enumerate(model.trainable_weights) if "dense" in w.path]
    return [math.sqrt(float((grads[i] ** 2).sum() + (grads[i + 1] ** 2).sum())) for i in dense[::2]]


def test_probe_norms_equal_the_backends_own_gradient_in_training_mode(moons):
    x, y = moons
    want = dense_norms(bn_model(), x, y)  # on a twin: the same weights
    watch = GradWatch(probe=(x, y), verbose=0)
    bn_model().fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[watch])
    got = list(watch.records.at("grad_norm", 0).values())
    assert got == pytest.approx(want, rel=1e-4)
    assert got[0] / got[-1] > 1e-2  # batch norm keeps the first layer's gradient: not the plain sigmoid net's


def test_fits_of_one_structure_share_the_probes_step_and_each_model_reads_its_own_gradient(moons):
    """The probe's step is compiled once per model structure and process; a net of the same shapes with
    another activation is another structure, and every net, sharing or not, reads its own gradient."""
    from gradwatch.keras import probe

    x, y = moons

    def fit(activation: str, seed: int) -> set:
        keras.utils.set_random_seed(seed)
        model = keras.Sequential([keras.Input((2,)), *[keras.layers.Dense(7, activation) for _ in range(4)],
                                  keras.layers.Dense(1, "sigmoid")])
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="binary_crossentropy")
        want, before = dense_norms(model, x, y), set(probe.SHARED)
        watch = GradWatch(probe=(x, y), verbose=0)
        model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[watch])
        assert list(watch.records.at("grad_norm", 0).values()) == pytest.approx(want, rel=1e-4)
        return set(probe.SHARED) - before  # the structures this fit added

    assert len(fit("sigmoid", 1)) == 1
    assert len(fit("relu", 2)) == 1  # the same shapes, another graph
    assert fit("sigmoid", 3) == set()  # other weights, the first fit's step


def test_the_watched_fit_ends_with_the_bare_fits_weights(moons):
    x, y = moons
    bare, watched = bn_model(dropout=0.2), bn_model(dropout=0.2)
    keras.utils.set_random_seed(1)
    bare.fit(x, y, epochs=2, batch_size=32, verbose=0, shuffle=False)
    keras.utils.set_random_seed(1)
    watched.fit(x, y, epochs=2, batch_size=32, verbose=0, shuffle=False, callbacks=[GradWatch(probe=(x, y), verbose=0)])
    for a, b in zip(bare.get_weights(), watched.get_weights(), strict=True):  # moving statistics included
        np.testing.assert_array_equal(a, b)


def fit_reading(model, x, y, read=None, epochs: int = 4) -> tuple[GradWatch, list]:
    """A watched fit (shuffled by seed 1); ``read(watch, epoch)`` is called after GradWatch at every epoch's end."""

    class Reader(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(read(watch, epoch))

    seen, watch = [], GradWatch(probe=(x, y), verbose=0)
    keras.utils.set_random_seed(1)
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0, callbacks=[watch] + ([Reader()] if read else []))
    return watch, seen


def same_rows(a: list, b: list) -> bool:
    """Row for row the same keys and the same float64 values (NaN equal to NaN); a layer by its position
    in the records, as two models of one build have other automatic layer names."""
    def keys(rows: list) -> list:
        position = {name: i for i, name in enumerate(dict.fromkeys(r[2] for r in rows))}
        return [(step, epoch, position[layer], stat) for step, epoch, layer, stat, _ in rows]

    return keys(a) == keys(b) and np.array_equal([r[4] for r in a], [r[4] for r in b], equal_nan=True)


def wide_model() -> keras.Model:
    """Kernels of 40,000 entries: over torch's 32,768, where it splits a lone tensor's sum between threads."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(200, "tanh"), keras.layers.Dense(200, "relu"),
                              keras.layers.Dense(1, "sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    return model


@pytest.mark.parametrize("build", [bn_model, wide_model])
def test_records_read_mid_fit_are_complete_to_that_epoch_and_equal_those_computed_at_the_end(moons, build):
    """The statistics of measured epochs wait for a read (``epochs.Pending``): read after every epoch, one
    epoch at a time, they are that epoch's rows complete, and the same rows, bit for bit, as the fit's
    epochs computed all at once when read at its end, with two threads too."""
    import torch

    x, y = moons
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        at_end, _ = fit_reading(build(), x, y)
        final = list(at_end.records.rows)
        watch, seen = fit_reading(build(), x, y, lambda watch, epoch: (epoch, list(watch.records.rows)))
    finally:
        torch.set_num_threads(threads)
    assert {r[1] for r in final} == {0, 1, 2, 3} and {"grad_norm", "percent_change", "act_rms"} <= {
        r[3] for r in final}
    for epoch, rows in seen:
        assert same_rows(rows, [r for r in final if r[1] <= epoch])
    assert same_rows(list(watch.records.rows), final)


def test_waiting_epochs_are_flushed_at_the_memory_bound(moons, monkeypatch):
    """Unread, a fit's measured epochs wait (the seed's net holds 0.2 MB an epoch); over ``FLUSH_BYTES`` each
    epoch's statistics are computed at its end, with the same rows."""
    from gradwatch.keras import epochs

    x, y = moons
    waiting = fit_reading(bn_model(), x, y, lambda watch, epoch: len(watch._pending.epochs))
    monkeypatch.setattr(epochs, "FLUSH_BYTES", 1)
    flushed = fit_reading(bn_model(), x, y, lambda watch, epoch: len(watch._pending.epochs))
    assert waiting[1] == [2, 3, 4, 5] and flushed[1] == [0, 0, 0, 0]  # the first also holds fit's start
    assert same_rows(list(waiting[0].records.rows), list(flushed[0].records.rows))


def test_without_a_probe_the_verdict_is_unknown(moons):
    x, y = moons
    watch = GradWatch(verbose=0)
    bn_model().fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[watch])
    assert watch.run().summary["verdict"] == "unknown"


@pytest.mark.parametrize("case", ["x_only", "x_in_a_tuple", "wrong_width", "wrong_length", "positional"])
def test_a_bad_probe_is_one_line_naming_it_before_fit_starts(moons, case):
    x, y = moons
    model = bn_model()
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError) as error:
        if case == "positional":
            GradWatch(x, y)
        probe = {"x_only": x, "x_in_a_tuple": (x,), "wrong_width": (x[:, :1], y), "wrong_length": (x[:10], y)}[case]
        model.fit(x, y, epochs=1, verbose=0, callbacks=[GradWatch(probe=probe, verbose=0)])
    message = str(error.value)
    assert "\n" not in message and message.startswith("every: got" if case == "positional" else "probe: got")
    assert "(x, y)" in message and ("x of shape (None, 2)" in message or case == "positional")
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))  # no step was taken


def test_a_callback_reused_on_a_second_model_starts_clean(moons):
    x, y = moons
    watch = GradWatch(probe=(x, y), verbose=0)
    bn_model().fit(x, y, epochs=2, batch_size=64, verbose=0, callbacks=[watch])
    first = len(watch.records)
    second = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4, name="only"), keras.layers.Dense(1)])
    second.compile(optimizer="sgd", loss="binary_crossentropy")
    second.fit(x, y, epochs=1, batch_size=64, verbose=0, callbacks=[watch])
    assert 0 < len(watch.records) < first
    assert watch.records.layers("grad_norm")[0] == "only" and len(watch.records.layers("grad_norm")) == 2


def test_a_kernel_that_starts_at_zero_has_no_percent_change_and_no_finding(moons):
    x, y = moons
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(10, "relu"),
                              keras.layers.Dense(10, "relu", kernel_initializer="zeros", name="zeros"),
                              keras.layers.Dense(1, "sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    watch = GradWatch(probe=(x, y), verbose=0)
    model.fit(x, y, epochs=3, batch_size=32, verbose=0, callbacks=[watch])
    changes = watch.records.last("percent_change")
    assert "zeros" not in changes and len(changes) == 2 and all(math.isfinite(v) for v in changes.values())
    assert "non_finite" not in [f.kind for f in watch.diagnose()]


def mlp(activation: str, depth: int = 4, width: int = 10, lr: float = 0.01, **dense) -> keras.Model:
    keras.utils.set_random_seed(0)
    hidden = [keras.layers.Dense(width, activation, **dense) for _ in range(depth)]
    model = keras.Sequential([keras.Input((2,)), *hidden, keras.layers.Dense(1, "sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="binary_crossentropy")
    return model


def watched(model, x, y, epochs: int = 3, probe=None) -> GradWatch:
    watch = GradWatch(probe=probe or (x, y), verbose=0)
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0, callbacks=[watch])
    return watch


def test_activation_statistics_are_the_stats_entries_on_the_probes_training_mode_outputs(moons):
    """saturated_frac, dead_frac and act_rms equal the STATS functions on each layer's output, taken by hand."""
    import torch

    from gradwatch.stats import RECTIFIERS, SATURATING, STATS

    x, y = moons
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(16, "relu", name="r"),
                              keras.layers.Dense(16, name="lin"), keras.layers.Activation("tanh", name="t"),
                              keras.layers.Dense(1, "sigmoid", name="out")])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="binary_crossentropy")  # lr 0: the weights stay
    watch = watched(model, x, y, epochs=1)
    outputs, h = {}, keras.ops.convert_to_tensor(x)
    for layer in model.layers:
        h = layer(h, training=True)
        outputs[layer.name] = torch.tensor(keras.ops.convert_to_numpy(h), dtype=torch.float64)
    assert watch.records.at("dead_frac", 0) == pytest.approx(
        {"r": STATS["dead_frac"].fn([outputs["r"]], [RECTIFIERS["ReLU"]]).item()})
    assert watch.records.at("saturated_frac", 0) == pytest.approx(
        {"t": STATS["saturated_frac"].fn([outputs["t"]], [SATURATING["Tanh"]]).item()})
    rms = {n: outputs[n].square().mean().sqrt().item() for n in ("r", "lin", "out")}  # the kernel layers
    assert watch.records.at("act_rms", 0) == pytest.approx(rms, rel=1e-5)


def test_a_saturated_sigmoid_net_is_diagnosed_saturated_and_a_dead_relu_net_dying(moons):
    x, y = moons
    saturated = watched(mlp("sigmoid", kernel_initializer=keras.initializers.RandomNormal(stddev=8.0)), x, y)
    assert "saturation" in [f.kind for f in saturated.diagnose()]
    dead = watched(mlp("relu", bias_initializer=keras.initializers.Constant(-5.0)), x, y)
    assert "dying_relu" in [f.kind for f in dead.diagnose()]
    assert max(dead.records.last("dead_frac").values()) == 1.0


@pytest.mark.parametrize("net", ["relu", "batch_norm"])
def test_healthy_nets_get_no_saturation_or_dying_relu_finding(moons, net):
    """The seed's ReLU net and the batch-norm sigmoid net train; their activations are read and stay silent."""
    x, y = moons
    model = mlp("relu", depth=10, lr=0.001) if net == "relu" else bn_model()
    watch = watched(model, x, y, epochs=30)
    assert set(watch.records.stats()) >= {"dead_frac" if net == "relu" else "saturated_frac", "act_rms"}
    assert not {"saturation", "dying_relu", "non_finite"} & {f.kind for f in watch.diagnose()}


def test_a_probe_whose_outputs_overflow_is_a_non_finite_finding_at_step_0_and_fit_goes_on(moons):
    """exp(50 x) overflows float32 on a probe with large inputs (torch's binary cross-entropy then refuses
    the NaN prediction); the moons themselves stay finite, so fit trains."""
    x, y = moons
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(10, "exponential", name="exp",
                                                                    kernel_initializer=keras.initializers.Constant(1.0)),
                              keras.layers.Dense(1, "sigmoid", name="out")])
    model.compile(optimizer=keras.optimizers.SGD(1e-6), loss="binary_crossentropy")
    history = model.fit(x, y, epochs=2, batch_size=32, verbose=0,
                        callbacks=[watch := GradWatch(probe=(x * 50, y), verbose=0)])
    assert len(history.history["loss"]) == 2 and all(math.isfinite(v) for v in history.history["loss"])
    finding = next(f for f in watch.diagnose() if f.kind == "non_finite")
    assert finding.evidence["first_step"] == 0 and "exp" in finding.layers


def test_huge_but_finite_numbers_are_not_non_finite(moons):
    """Kernels of 1e19: their float32 norms would overflow to Inf, but no value is NaN/Inf anywhere."""
    x, y = moons
    model = mlp("sigmoid", depth=2, kernel_initializer=keras.initializers.Constant(1e19))
    watch = watched(model, x, y, epochs=2)
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert np.isfinite(model.predict(x, verbose=0)).all()
    assert all(math.isfinite(v) for v in watch.records.series("loss")[1])
    assert max(watch.records.last("weight_norm").values()) > 1e19
    assert "non_finite" not in [f.kind for f in watch.diagnose()]
