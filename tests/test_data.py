import pytest
import torch

from gradwatch.data import DATASETS, check_output, load
from gradwatch.spec import DataSpec, SpecError


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_dataset_shapes_split_and_seed_determinism(name):
    spec = DataSpec(name=name, n_samples=100, seq_len=12)
    a, b = load(spec), load(spec)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert len(a.x_train) == 80 and len(a.x_test) == 20
    assert not torch.equal(load(spec.model_copy(update={"seed": 1})).x_train, a.x_train)
    if name in ("adding", "recall"):
        assert a.x_train.shape[1] == 12


def test_moons_is_the_seed_notebooks_data():
    from sklearn.datasets import make_moons
    from sklearn.model_selection import train_test_split

    x, y = make_moons(n_samples=250, noise=0.05, random_state=42)
    x_train, _, y_train, _ = train_test_split(x, y, test_size=0.2, random_state=42)
    data = load(DataSpec())
    assert torch.allclose(data.x_train, torch.tensor(x_train, dtype=torch.float32))
    assert torch.equal(data.y_train.flatten(), torch.tensor(y_train, dtype=torch.float32))


def test_adding_problem_mean_predictor_scores_one_sixth():
    data = load(DataSpec(name="adding", n_samples=20000, seq_len=20))
    assert ((data.y_train - data.y_train.mean()) ** 2).mean().item() == pytest.approx(1 / 6, rel=0.05)


def test_wrong_output_for_task_is_refused():
    with pytest.raises(SpecError, match="model.output_activation: got 'sigmoid'; allowed: softmax"):
        check_output("multiclass", "sigmoid", "digits")
