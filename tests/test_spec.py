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
