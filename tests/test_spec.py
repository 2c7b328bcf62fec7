import pytest
from pydantic import ValidationError

from gradwatch.spec import Spec, SpecError, from_flags

BAD = [
    ({"model.activation": "sigmod"}, "model.activation: got 'sigmod'; allowed: sigmoid, tanh, relu"),
    ({"model.init": "he"}, "model.init: got 'he'; allowed: default, glorot_uniform"),
    ({"model.norm": "group"}, "model.norm: got 'group'; allowed: none, batch, layer"),
    ({"data.name": "mnist"}, "data.name: got 'mnist'; allowed: moons, circles, spirals, xor, digits"),
    ({"train.optimizer": "rmsprop"}, "train.optimizer: got 'rmsprop'; allowed: sgd, adam"),
    ({"model.depth": -1}, "model.depth: got -1; allowed: >= 0 and <= 256"),
    ({"model.width": 0}, "model.width: got 0; allowed: >= 1 and <= 4096"),
    ({"train.learning_rate": 0}, "train.learning_rate: got 0; allowed: > 0"),
    ({"data.test_size": 1.5}, "data.test_size: got 1.5; allowed: > 0.0 and < 1.0"),
    ({"train.epochs": "many"}, "train.epochs: got 'many'; allowed:"),
    ({"model.dropout": 0.5}, "model.dropout: unknown field; allowed: kind, depth, width"),
    ({"train.clip_norm": -1.0}, "train.clip_norm: got -1.0; allowed: > 0.0"),
]


@pytest.mark.parametrize(("override", "message"), BAD)
def test_each_bad_value_gets_one_line_naming_field_and_allowed(override, message):
    with pytest.raises(SpecError) as err:
        Spec().replace(**override)
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(message)


def test_defaults_are_the_seed_notebook():
    spec = Spec()
    assert (spec.data.name, spec.data.n_samples, spec.data.noise, spec.data.seed) == ("moons", 250, 0.05, 42)
    assert (spec.model.depth, spec.model.width, spec.model.activation) == (10, 10, "sigmoid")
    assert (spec.train.optimizer, spec.train.learning_rate, spec.train.batch_size) == ("adam", 0.001, 32)


def test_key_is_stable_and_changes_with_any_field():
    assert Spec().key() == Spec().key()
    assert Spec().key() != Spec().replace(**{"train.seed": 1}).key()


def test_spec_is_frozen():
    with pytest.raises(ValidationError):
        Spec().model.depth = 3  # type: ignore[misc]


def test_from_flags_and_from_file_agree(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("model:\n  depth: 3\n  activation: relu\ntrain:\n  optimizer: sgd\n")
    flags = from_flags(["model.depth=3", "model.activation=relu", "train.optimizer=sgd"])
    assert Spec.from_file(path) == flags


def test_unreadable_or_malformed_files_are_one_line_errors(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        Spec.from_file(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="allowed: a mapping"):
        Spec.from_file(tmp_path / "list.yaml")
    with pytest.raises(SpecError, match="no '='"):
        from_flags(["model.depth"])


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        ({"data.n_samples": 8, "data.test_size": 0.99}, "data.test_size: got 0.99; allowed: at most 7/8"),
        ({"model.kind": "gru"}, "data.name: got 'moons'; allowed: adding, recall (for model.kind=gru)"),
        ({"data.name": "recall"}, "data.name: got 'recall'; allowed: moons, circles, spirals, xor, digits"),
        ({"model.norm": "batch", "train.batch_size": 199}, "train.batch_size: got 199; allowed: a size leaving >= 2"),
        ({"model.norm": "batch", "data.name": "digits", "data.n_samples": 5000, "train.batch_size": 1436},
         "train.batch_size: got 1436"),  # digits has 1,797 images whatever n_samples asks: 1,437 train
    ],
)
def test_fields_that_cannot_run_together_are_one_line(flags, line):
    with pytest.raises(SpecError) as err:
        Spec().replace(**flags)
    assert str(err.value).startswith(line) and "\n" not in str(err.value)


def test_the_cross_field_checks_agree_with_what_actually_trains():
    """The split the spec counts is scikit-learn's; batch norm trains when every batch has two samples."""
    from gradwatch.data import load
    from gradwatch.spec import train_size
    from gradwatch.train import train

    for n, test in ((8, 0.8), (250, 0.2), (37, 0.33), (1000, 0.999)):
        data = Spec().replace(**{"data.n_samples": n, "data.test_size": test}).data
        assert train_size(data) == len(load(data).x_train)
    ok = Spec().replace(**{"model.norm": "batch", "model.depth": 2, "train.batch_size": 198, "train.epochs": 1})
    assert train(ok).status == "finished"  # 200 = 198 + 2: the smallest last batch allowed


def test_sigma_w2_needs_a_unit_scale_init_and_keys_of_older_specs_stay():
    with pytest.raises(SpecError, match="model.sigma_w2: got 1.5; allowed: with model.init lecun_normal or orth"):
        Spec().replace(**{"model.sigma_w2": 1.5})
    with pytest.raises(SpecError, match="model.sigma_b2: got -1"):
        Spec().replace(**{"model.sigma_b2": -1})
    assert Spec().key() == "3f89219ceebeb95a"  # the key stored runs of the default spec already have
    scaled = Spec().replace(**{"model.init": "lecun_normal", "model.sigma_w2": 1.76})
    assert scaled.key() != Spec().replace(**{"model.init": "lecun_normal"}).key()
