"""studies.sequences: the machinery on a tiny budget, and conclusions that follow the numbers fed in."""

import math

import pytest
import torch

from gradwatch.data import load
from gradwatch.nets import build
from gradwatch.records import Records, Run
from gradwatch.spec import Spec
from gradwatch.studies import run
from gradwatch.studies import sequences as study
from gradwatch.train import train


def _run(task: str, kind: str, length: int, loss: float, seed: int = 0, status: str = "finished") -> Run:
    spec = study.spec(task, kind, length, seed, quick=True)
    return Run(Records(), spec=spec.model_dump(mode="json"), summary={"test_loss": loss}, status=status,
               name=f"{task}/{kind}", key=spec.key())


def _cells(losses: dict[tuple[str, int], float], seeds: int = 3) -> list[Run]:
    return [_run("adding", kind, length, loss, s) for (kind, length), loss in losses.items() for s in range(seeds)]


def test_tiny_budget_yields_the_table_and_both_figures(tmp_store):
    result = run("sequences", tmp_store, workers=1, quick=True)
    assert {(r["task"], r["cell"]) for r in result.rows} == {(t, k) for t in study.TASKS for k in study.KINDS}
    assert {"T=4", "learns_up_to", "stops_at"} <= set(result.rows[0])
    assert [stem for _, _, stem in result.figures] == ["sequence_lengths", "temporal_flow"]
    assert "Within this budget" in result.conclusion


def test_conclusion_follows_the_numbers():
    chance = study.CHANCE["adding"]
    lstm_wins = _cells({("rnn", 10): 0.01, ("rnn", 50): chance, ("lstm", 10): 0.01, ("lstm", 50): 0.005})
    rows = study.table(lstm_wins)
    assert study.contrast(lstm_wins) == (50, pytest.approx(1.0))
    text = study.conclude(rows, study.contrast(lstm_wins))
    assert "the LSTM learns the adding problem at T=50, where the plain RNN stays at chance" in text
    assert "rnn learns up to T=10 and stops at T=50" in text
    partly = _cells({("rnn", 50): 0.5 * chance, ("lstm", 50): 0.005})
    assert "where the plain RNN does not learn but beats chance" in study.conclude(rows, study.contrast(partly))
    both_fail = _cells({("rnn", 10): 0.01, ("rnn", 50): chance, ("lstm", 10): 0.01, ("lstm", 50): chance})
    assert study.contrast(both_fail) is None
    assert "NOT confirmed" in study.conclude(study.table(both_fail), None)


def test_diverged_runs_never_count_as_learned():
    runs = [_run("adding", "rnn", 10, 0.0, s, status="diverged") for s in range(3)]
    assert study.score(runs[0]) == math.inf
    assert not study.learned(runs)


def test_a_cell_stops_lengthening_once_most_seeds_fail_to_learn(monkeypatch):
    monkeypatch.setitem(study.QUICK, "lengths", (4, 8, 16))
    chance = study.CHANCE["adding"]
    first = [_run("adding", k, 4, chance if k == "rnn" else 0.01, s) for k in study.KINDS for s in range(2)]
    first += [_run("recall", k, 4, 0.01, s) for k in study.KINDS for s in range(2)]
    names = {name for name, _, _ in study.next_jobs(first, quick=True)}
    assert "adding/rnn" not in names
    assert {"adding/lstm", "adding/gru", "recall/rnn"} <= names
    second = [_run(task, k, 8, 0.01, s) for task in study.TASKS for k in study.KINDS for s in range(2)
              if (task, k) != ("adding", "rnn")]
    later = {name for name, _, spec in study.next_jobs(first + second, quick=True)}
    assert later and "adding/rnn" not in later  # a stopped cell is not resumed at a later length


def test_trace_at_init_ends_at_the_output_layers_gradient():
    """The last step's ||dL/dh_T|| on the first batch equals the closed form of MSE on a linear output; the
    trace of the last sampled step (3 epochs of 4 batches: steps 0 and 10) differs."""
    spec = Spec().replace(**{"data.name": "adding", "data.seq_len": 6, "data.n_samples": 40, "model.kind": "rnn",
                             "model.width": 8, "model.output_activation": "linear", "train.epochs": 3,
                             "train.batch_size": 8})
    run = train(spec)
    data = load(spec.data)
    torch.manual_seed(spec.train.seed)
    model = build(spec.model, 2, 1)
    batch = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(spec.train.seed))[:8]
    with torch.no_grad():
        residual = model(data.x_train[batch]) - data.y_train[batch]
        expected = (2 * residual @ model.out.weight / len(batch)).norm().item()
    init, trained = study.trace(run, "init"), study.trace(run, "trained")
    assert len(init) == len(trained) == 6
    assert init[-1] == pytest.approx(expected, rel=1e-5)
    assert init != trained
    assert study.w_hh_norm(run) == pytest.approx(torch.linalg.matrix_norm(model.cell.weight_hh, 2).item(), rel=1e-5)


@pytest.mark.slow
def test_real_budget_lstm_learns_adding_where_the_rnn_does_not(tmp_store):
    """The acceptance claim at the study's own budget (minutes on 2 cores; `pytest -m slow`)."""
    result = run("sequences", tmp_store)
    assert "the LSTM learns the adding problem at T=" in result.conclusion
