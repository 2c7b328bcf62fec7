"""GradWatch on the seed's Keras models: deep sigmoid and deep ReLU, 10 x Dense(10), on make_moons."""

import math
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":
    pytest.skip("these tests run on KERAS_BACKEND=torch", allow_module_level=True)

from gradwatch import keras as gradwatch_keras  # noqa: E402
from gradwatch.data import load  # noqa: E402
from gradwatch.keras import GradWatch  # noqa: E402
from gradwatch.spec import DataSpec  # noqa: E402
from gradwatch.stats import STATS  # noqa: E402

EPOCHS = 20  # the seed runs 100; the story is already plain at 20 and the file stays fast


@pytest.fixture(scope="module")
def moons():
    """make_moons(250, noise 0.05, random_state 42), 20% held out: the seed notebook's data."""
    data = load(DataSpec())
    return data.x_train.numpy(), data.y_train.numpy(), data.x_test.numpy(), data.y_test.numpy()


def seed_model(activation: str, optimizer, depth: int = 10, seed: int = 0, names=None) -> keras.Model:
    keras.utils.set_random_seed(seed)
    names = names or [None] * (depth + 1)
    hidden = [keras.layers.Dense(10, activation=activation, name=names[i]) for i in range(depth)]
    model = keras.Sequential([keras.Input((2,)), *hidden, keras.layers.Dense(1, "sigmoid", name=names[-1])])
    model.compile(optimizer=optimizer, loss="binary_crossentropy", metrics=["accuracy"])
    return model


def fit(model, moons, epochs=EPOCHS, **watch_args) -> GradWatch:
    x, y, x_test, y_test = moons
    watch_args.setdefault("probe", (x, y))
    watch_args.setdefault("verbose", 0)
    watch = GradWatch(**watch_args)
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0, callbacks=[watch], validation_data=(x_test, y_test))
    return watch


def first_layer_pct_change(watch: GradWatch) -> float:
    return next(iter(watch.records.last("percent_change").values()))


def test_with_sgd_sigmoid_first_layer_barely_moves_and_relu_first_layer_does(moons):
    sigmoid = fit(seed_model("sigmoid", keras.optimizers.SGD(0.1)), moons)
    relu = fit(seed_model("relu", keras.optimizers.SGD(0.1)), moons)
    assert first_layer_pct_change(sigmoid) < 1.0
    assert first_layer_pct_change(relu) >= 5.0
    assert [f.kind for f in sigmoid.diagnose()][0] == "vanishing"
    assert "vanishing" not in [f.kind for f in relu.diagnose()]


def test_under_adam_true_gradient_norms_show_vanishing_and_output_says_why(moons, capsys):
    watch = fit(seed_model("sigmoid", keras.optimizers.Adam(0.001)), moons, verbose=1)
    out = capsys.readouterr().out
    assert watch.run().summary["grad_ratio_first_last"] <= 1e-5  # at the start of fit
    vanishing = next(f for f in watch.diagnose() if f.kind == "vanishing")
    assert vanishing.evidence["grad_ratio_first_last"] <= 1e-5  # median over the fit
    assert first_layer_pct_change(watch) > first_layer_pct_change(
        fit(seed_model("sigmoid", keras.optimizers.SGD(0.1)), moons))  # Adam moves the weights anyway
    assert "misleads" in out and "about lr per step however small its gradient" in out
    assert "vanishing" in out


def test_seed_measures_are_the_notebooks_formulas_on_keras_weights(moons):
    model = seed_model("relu", keras.optimizers.SGD(0.05), depth=3)
    old = [w.copy() for w in model.get_weights()]
    watch = fit(model, moons, epochs=2)
    new, lr = model.get_weights(), 0.05
    names = [layer.name for layer in model.layers]
    for i, name in enumerate(names):
        o, n = old[2 * i], new[2 * i]  # kernels; the seed's get_weights()[0] is the first one
        assert watch.records.last("seed_gradient")[name] == pytest.approx(np.abs((o - n) / lr).mean(), rel=1e-5)
        pct = np.abs(100 * (o - n) / o)  # the notebook's np.median: the mean of the middle two of an even count
        assert pct.size % 2 == 0 and np.sort(pct, axis=None)[pct.size // 2 - 1] != np.median(pct)
        assert watch.records.last("percent_change")[name] == pytest.approx(np.median(pct), rel=1e-5)
        norm = math.sqrt((new[2 * i] ** 2).sum() + (new[2 * i + 1] ** 2).sum())
        assert watch.records.last("weight_norm")[name] == pytest.approx(norm, rel=1e-5)


def test_probe_gradient_norms_equal_one_full_batch_sgd_step(moons):
    """One SGD step on the whole probe batch moves each weight by lr * gradient: Keras's own step is the oracle."""
    x, y, _, _ = moons
    model = seed_model("sigmoid", keras.optimizers.SGD(0.5), depth=3)
    old = [w.copy() for w in model.get_weights()]
    watch = GradWatch(probe=(x, y), verbose=0)
    model.fit(x, y, epochs=1, batch_size=len(x), shuffle=False, verbose=0, callbacks=[watch])
    layer_norms, kernel_norms = watch.records.at("grad_norm", 0), watch.records.at("weight_grad_norm", 0)
    for i, layer in enumerate(model.layers):
        kernel, bias = [(o - n) / 0.5 for o, n in zip(old[2 * i : 2 * i + 2], model.get_weights()[2 * i : 2 * i + 2],
                                                     strict=True)]
        assert layer_norms[layer.name] == pytest.approx(math.sqrt((kernel**2).sum() + (bias**2).sum()), rel=1e-3)
        assert kernel_norms[layer.name] == pytest.approx(math.sqrt((kernel**2).sum()), rel=1e-3)


def test_records_round_trip_through_the_store_with_the_users_layer_names(moons, tmp_store):
    names = ["input_side", "middle", "out"]
    model = seed_model("relu", keras.optimizers.Adam(0.01), depth=2, names=names)
    watch = fit(model, moons, epochs=3, store=tmp_store, name="keras-relu")
    assert watch.records.layers("grad_norm") == names
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(watch.records.stats())
    assert watch.records.layers("loss") == [""]
    stored = tmp_store.get("keras-relu")
    assert list(stored.records.rows) == list(watch.records.rows)
    assert stored.summary["steps"] == 3 * math.ceil(len(moons[0]) / 32)
    frame = watch.frame()
    assert set(frame["layer"]) >= set(names) and set(frame["run"]) == {"keras-relu"}


def test_every_sets_the_epoch_cadence_and_the_last_epoch_is_always_measured(moons):
    watch = fit(seed_model("relu", keras.optimizers.SGD(0.1), depth=2), moons, epochs=5, every=2)
    assert watch.records.series("percent_change", watch.records.layers("percent_change")[0], by="epoch")[0] == [1, 3, 4]
    assert watch.records.series("loss", by="epoch")[0] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="every"):
        GradWatch(every=0)


def test_without_a_probe_or_a_gradient_backend_the_summary_says_so(moons, capsys, monkeypatch):
    fit(seed_model("relu", keras.optimizers.SGD(0.1), depth=2), moons, epochs=1, probe=None, verbose=1)
    assert "probe=(x, y)" in capsys.readouterr().out
    monkeypatch.delitem(gradwatch_keras.GRADIENTS, "torch")
    watch = fit(seed_model("relu", keras.optimizers.SGD(0.1), depth=2), moons, epochs=1, verbose=1)
    assert "grad_norm" not in watch.records.stats() and "percent_change" in watch.records.stats()
    assert "the torch backend gives none" in capsys.readouterr().out


def test_no_adam_note_under_sgd(moons, capsys):
    fit(seed_model("relu", keras.optimizers.SGD(0.1), depth=2), moons, epochs=1, verbose=1)
    assert "misleads" not in capsys.readouterr().out


def test_the_readme_the_table_and_a_fit_agree_on_what_the_callback_records(moons):
    from test_stats import readme_table

    offered = {name for name, s in STATS.items() if s.point in gradwatch_keras.READS}
    assert {name for name, row in readme_table().items() if row[2] == "yes"} == offered
    keras.utils.set_random_seed(0)  # a ReLU and a sigmoid hidden layer: both activation entries have a layer
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(8, "relu"), keras.layers.Dense(8, "sigmoid"),
                              keras.layers.Dense(1, "sigmoid")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="binary_crossentropy", metrics=["accuracy"])
    watch = fit(model, moons, epochs=1)
    logs = {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert set(watch.records.stats()) == offered | logs


def batch_norm_model(seed: int = 0) -> keras.Model:
    """Three Dense -> BatchNormalization -> sigmoid blocks: moving statistics that lag the batch's."""
    keras.utils.set_random_seed(seed)
    blocks = [[keras.layers.Dense(10), keras.layers.BatchNormalization(), keras.layers.Activation("sigmoid")]
              for _ in range(3)]
    model = keras.Sequential([keras.Input((2,)), *sum(blocks, []), keras.layers.Dense(1, "sigmoid")])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="binary_crossentropy")
    return model


def test_batch_norm_probe_gradient_is_the_one_fit_applies_and_leaves_the_moving_statistics(moons):
    """The probe is taken in training mode (batch statistics), as fit's own step; Keras's step is the oracle."""
    x, y, _, _ = moons
    model = batch_norm_model()
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    old = [layer.get_weights() for layer in dense]
    watch = GradWatch(probe=(x, y), verbose=0)
    model.fit(x, y, epochs=1, batch_size=len(x), shuffle=False, verbose=0, callbacks=[watch])
    for layer, before in zip(dense, old, strict=True):
        moved = [(o - n) / 0.5 for o, n in zip(before, layer.get_weights(), strict=True)]
        assert watch.records.at("grad_norm", 0)[layer.name] == pytest.approx(
            math.sqrt(sum((g**2).sum() for g in moved)), rel=1e-3)
    unwatched = batch_norm_model()
    unwatched.fit(x, y, epochs=1, batch_size=len(x), shuffle=False, verbose=0)
    for mine, theirs in zip(model.get_weights(), unwatched.get_weights(), strict=True):  # moving stats included
        np.testing.assert_allclose(mine, theirs, rtol=1e-6)
