"""The doctor on the seed notebook's Keras model as is: 10 x Dense(10, sigmoid) on make_moons, compiled with Adam."""

import math
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("these tests run on KERAS_BACKEND=torch", allow_module_level=True)

from gradwatch.data import load  # noqa: E402
from gradwatch.doctor.keras import doctor  # noqa: E402
from gradwatch.spec import DataSpec, SpecError  # noqa: E402


def seed_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), *[keras.layers.Dense(10, "sigmoid") for _ in range(10)],
                              keras.layers.Dense(1, "sigmoid")])
    model.compile("adam", "binary_crossentropy", metrics=["accuracy"])
    return model


@pytest.fixture(scope="module")
def moons():
    data = load(DataSpec())
    return data.x_train.numpy(), data.y_train.numpy()


@pytest.fixture(scope="module")
def short(moons):
    """The doctor at its shortest budget: enough to propose and build every treatment."""
    return doctor(seed_model(), *moons, steps=40, seeds=1)


def test_seed_keras_model_is_treated_as_is_and_the_best_clears_vanishing(moons):
    x, y = moons
    model = seed_model()
    before = [w.copy() for w in model.get_weights()]
    rx = doctor(model, x, y, steps=150, seeds=1)
    assert {"vanishing", "plateau"} <= {f.kind for f in rx.findings}
    assert rx.untreated.loss > 0.65  # stuck at the guessing loss, ln 2
    best = rx.treatments[0]
    assert best.name in {"relu_he", "batch_norm"}, str(rx)
    assert best.loss < 0.5 * math.log(2) and "vanishing" not in best.kinds, str(rx)
    assert best.ratio("grad_norm") > 1e2 * rx.untreated.ratio("grad_norm")  # the evidence moved, not only the loss
    assert [t.loss for t in rx.treatments] == sorted(t.loss for t in rx.treatments)
    assert {"residual", "fewer_layers"} <= set(rx.untried)  # named, with why, never silently dropped
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))  # never trained
    assert best.name in str(rx) and "vanishing" in rx.rows()[1]["clears"]


def test_relu_he_swaps_the_hidden_layers_and_keeps_the_output(moons, short):
    treated, optimizer, clip = next(t for t in short.treatments if t.name == "relu_he").build()
    configs = [layer.get_config() for layer in treated.layers]
    assert [c["activation"] for c in configs] == ["relu"] * 10 + ["sigmoid"]
    assert [c["kernel_initializer"]["class_name"] for c in configs][:10] == ["HeNormal"] * 10
    assert isinstance(optimizer, keras.optimizers.Adam) and clip is None
    assert treated.predict(moons[0][:4], verbose=0).shape == (4, 1)


def test_batch_norm_wraps_each_hidden_layer_and_an_uncompiled_model_is_one_line(moons, short):
    x, y = moons
    treated, _, _ = next(t for t in short.treatments if t.name == "batch_norm").build()
    kinds = [[type(inner).__name__ for inner in layer.layers] for layer in treated.layers[:10]]
    assert kinds == [["Dense", "BatchNormalization", "Activation"]] * 10
    assert type(treated.layers[-1]).__name__ == "Dense"
    bare = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, "sigmoid")])
    with pytest.raises(SpecError, match="^model: got an uncompiled Keras model"):
        doctor(bare, x, y)
