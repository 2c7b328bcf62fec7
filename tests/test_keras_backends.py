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


def test_probe_norms_equal_the_backends_own_gradient_in_training_mode(moons):
    x, y = moons
    twin = bn_model()  # the same weights; the independent gradient is taken on it
    grads = gradients(twin, keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y))
    dense = [i for i, w in enumerate(twin.trainable_weights) if "dense" in w.path]
    want = [math.sqrt(float((grads[i] ** 2).sum() + (grads[i + 1] ** 2).sum())) for i in dense[::2]]
    watch = GradWatch(probe=(x, y), verbose=0)
    bn_model().fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[watch])
    got = list(watch.records.at("grad_norm", 0).values())
    assert got == pytest.approx(want, rel=1e-4)
    assert got[0] / got[-1] > 1e-2  # batch norm keeps the first layer's gradient: not the plain sigmoid net's


def test_the_watched_fit_ends_with_the_bare_fits_weights(moons):
    x, y = moons
    bare, watched = bn_model(dropout=0.2), bn_model(dropout=0.2)
    keras.utils.set_random_seed(1)
    bare.fit(x, y, epochs=2, batch_size=32, verbose=0, shuffle=False)
    keras.utils.set_random_seed(1)
    watched.fit(x, y, epochs=2, batch_size=32, verbose=0, shuffle=False, callbacks=[GradWatch(probe=(x, y), verbose=0)])
    for a, b in zip(bare.get_weights(), watched.get_weights(), strict=True):  # moving statistics included
        np.testing.assert_array_equal(a, b)


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
    assert "(x, y)" in message
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
