"""Tiny shared fixtures: small specs that train in well under a second, and a throwaway store."""

import os

import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")

torch.set_num_threads(1)  # tiny models: threads only fight the other test worker for the 2 cores

from gradwatch.spec import Spec  # noqa: E402
from gradwatch.store import Store  # noqa: E402


@pytest.fixture
def tmp_store(tmp_path):
    store = Store(tmp_path / "runs.db")
    yield store
    store.close()


@pytest.fixture
def small_spec():
    """The seed's deep sigmoid net on the seed's data, for 3 epochs."""
    return Spec().replace(**{"train.epochs": 3})
