"""The doctor on models built to fail and a healthy one: ranked by measurement, reproducible, honest."""

import functools
import subprocess
import sys
from collections import Counter

import pytest
import torch
from torch import nn

from gradwatch.data import load
from gradwatch.diagnose import Diagnosis, Finding, Remedy, diagnose
from gradwatch.doctor import FINALISTS, Treatment, doctor, final_loss, prescribe, run_trial
from gradwatch.doctor.patients import from_spec
from gradwatch.doctor.treatments import Plan, ReZero, residual
from gradwatch.nets import build
from gradwatch.spec import Spec

STEPS = 200


@pytest.fixture(scope="module")
def deep_sigmoid():
    """The seed's 10 x 10 sigmoid net on moons, two seeds of a short budget."""
    make_model, data, loss_fn, optimizer = from_spec(Spec())
    return doctor(make_model, data, loss_fn, optimizer, steps=STEPS, seeds=2)


def test_deep_sigmoid_net_is_treated_by_what_fixes_vanishing_first(deep_sigmoid):
    rx = deep_sigmoid
    assert {"vanishing", "plateau"} <= {f.kind for f in rx.findings}
    assert rx.treatments[0].name in {"relu_he", "batch_norm", "residual"}
    best = rx.treatments[0]
    assert best.loss < 0.5 * rx.untreated.loss and "vanishing" not in best.kinds
    measured, screened = rx.treatments[:FINALISTS], rx.treatments[FINALISTS:]
    # the finalists race on seed 0; only the winner goes on to every seed
    assert [len(t.losses) for t in measured] == [2] + [1] * (FINALISTS - 1)
    assert all(best.losses[0] <= t.losses[0] for t in measured)
    assert screened and all(not t.losses and t.screened == t.loss for t in screened)  # successive halving
    assert [t.screened for t in screened] == sorted(t.screened for t in screened)
    assert best.ratio("grad_norm") > 1e3 * rx.untreated.ratio("grad_norm")  # the evidence moved, not only the loss
    assert "fewer_layers" in rx.untried  # named, with why, never silently dropped
    text = str(rx)
    assert "untreated" in text and best.name in text and "not tried: fewer_layers" in text and "screened out" in text
    assert "seed 0 only" in text


@pytest.mark.parametrize("rank", [0, -1])
def test_build_reproduces_the_trial_loss_in_a_plain_loop(deep_sigmoid, rank):
    """The best treatment's loss on seed 1; the last one, screened out, its screening loss (seed 0, a quarter)."""
    treatment = deep_sigmoid.treatments[rank]
    seed, steps, expected = (1, STEPS, treatment.losses[1]) if treatment.losses else (0, STEPS // 4, treatment.screened)
    model, optimizer, clip_norm = treatment.build(seed=seed)
    losses = []
    for x, y in deep_sigmoid.batches(seed)[:steps]:
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        losses.append(loss.item())
    assert final_loss(losses) == pytest.approx(expected, abs=1e-5)


def test_healthy_model_has_nothing_to_treat():
    spec = Spec().replace(**{"model.activation": "relu", "model.init": "he_normal", "model.depth": 3,
                             "model.width": 32})
    make_model, (x, y), loss_fn, optimizer = from_spec(spec)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    rx = doctor(make_model, loader, loss_fn, optimizer, steps=STEPS, seeds=2)
    assert rx.findings == [] and rx.treatments == [] and "nothing to treat" in str(rx)


class FunctionalSigmoid(nn.Module):
    """Ten Linear layers with ``torch.sigmoid`` called in forward: no activation module to swap."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(2, 10)] + [nn.Linear(10, 10) for _ in range(9)])
        self.out = nn.Linear(10, 1)

    def forward(self, x):
        for layer in self.layers:
            x = torch.sigmoid(layer(x))
        return self.out(x)


def test_functional_activations_get_the_treatments_that_apply_and_say_why_not_the_rest():
    data = load(Spec().data)
    rx = doctor(FunctionalSigmoid, (data.x_train, data.y_train), nn.functional.binary_cross_entropy_with_logits,
                steps=STEPS, seeds=1)
    assert "functional" in rx.untried["relu_he"]
    assert {"batch_norm", "residual"} <= {t.name for t in rx.treatments}


def test_residual_wraps_each_shape_preserving_layer_with_its_activation():
    torch.manual_seed(0)
    model = build(Spec().model, 2, 1)
    x = torch.randn(8, 2)
    residual(model, x)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, ReZero)]
    assert wrapped == [f"dense{i}" for i in range(2, 11)]
    assert isinstance(model.act2, nn.Identity) and isinstance(model.dense2.block[1], nn.Sigmoid)
    model(x).sum().backward()  # alpha = 0: an identity at first, and still a gradient for alpha
    assert model.dense2.alpha.grad is not None


def test_a_user_factory_that_is_not_importable_is_one_line():
    from gradwatch.doctor.patients import find
    from gradwatch.spec import SpecError

    with pytest.raises(SpecError, match="make_model: got 'nosuchmodule:make'"):
        find("nosuchmodule:make", "make_model")


def test_cli_doctor_prints_the_ranked_table(tmp_path):
    (tmp_path / "mymodel.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def make_model():\n    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))\n"
        "g = torch.Generator().manual_seed(0)\nX = torch.randn(64, 2, generator=g)\n"
        "data = (X, (X[:, :1] > 0).float())\n")
    out = subprocess.run([sys.executable, "-m", "gradwatch", "doctor", "mymodel:make_model", "--data", "mymodel:data",
                          "--steps", "60", "--seeds", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "gradwatch doctor: 1 seed(s) x 60 steps" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "gradwatch", "doctor", "mymodel:make_model"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--data" in bad.stderr and "Traceback" not in bad.stderr


def test_factory_pieces_pickle_for_worker_processes():
    import pickle

    pieces = from_spec(Spec())
    assert isinstance(pieces[0], functools.partial)
    pickle.dumps(pieces)


def test_worker_processes_measure_what_this_process_measures():
    """The same race, losses and findings; there the untreated run's last seed ran beside the screening."""
    make_model, data, loss_fn, optimizer = from_spec(Spec())
    here = doctor(make_model, data, loss_fn, optimizer, steps=100, seeds=3, workers=1)
    there = doctor(make_model, data, loss_fn, optimizer, steps=100, seeds=3, workers=2)
    assert [(t.name, t.losses, t.kinds) for t in there.treatments] == [(t.name, t.losses, t.kinds)
                                                                       for t in here.treatments]
    assert there.untreated.losses == here.untreated.losses and len(there.untreated.found) == 2  # one left waiting
    assert here.findings and [f.kind for f in there.findings] == [f.kind for f in here.findings]


def test_surgeries_keep_the_model_runnable_and_do_what_they_say():
    from gradwatch.doctor.treatments import TREATMENTS, Plan, batch_norm, lsuv

    torch.manual_seed(0)
    x = torch.randn(64, 2)
    model = build(Spec().model, 2, 1)
    batch_norm(model, x)
    assert isinstance(model.dense1[1], nn.BatchNorm1d) and isinstance(model.out, nn.Linear)  # not the output
    model = build(Spec().model, 2, 1)
    variances = []
    lsuv(model, x)
    hook = model.dense5.register_forward_hook(lambda _m, _i, out: variances.append(out.var().item()))
    model(x)
    hook.remove()
    assert variances[0] == pytest.approx(1.0, abs=0.1)
    rnn = build(Spec().model.model_copy(update={"kind": "rnn"}), 2, 1)
    plan = TREATMENTS["gated_rnn"](Plan(), rnn)
    treated, _, _ = plan.build(lambda: build(Spec().model.model_copy(update={"kind": "rnn"}), 2, 1), x)
    assert isinstance(treated.cell, nn.GRUCell) and treated(torch.randn(4, 5, 2)).shape == (4, 1)
    assert "no LSTM" == TREATMENTS["forget_bias"](Plan(), rnn)
    lstm = nn.LSTM(2, 8)
    TREATMENTS["forget_bias"](Plan(), lstm).surgeries[0](lstm, x)
    assert (lstm.bias_ih_l0[8:16] == 1).all() and (lstm.bias_hh_l0[8:16] == 0).all()


def test_a_rate_100x_too_small_is_treated_by_the_range_tests_second_decade():
    spec = Spec().replace(**{"model.activation": "relu", "model.init": "he_normal", "model.depth": 2,
                             "model.width": 32, "train.learning_rate": 1e-5})
    rx = doctor(*from_spec(spec), steps=STEPS, seeds=1)
    assert [f.kind for f in rx.findings] == ["lr_too_small"]
    assert rx.treatments[0].name == "much_higher_lr"  # x10 is measured too, and is not enough
    assert rx.treatments[0].loss < 0.5 * rx.untreated.loss < [t for t in rx.treatments if t.name == "higher_lr"][0].loss


def test_an_exploding_rnn_and_one_vanishing_through_time_get_the_recurrent_cures():
    adding = {"data.name": "adding", "data.seq_len": 20, "data.n_samples": 200, "model.width": 16,
              "model.output_activation": "linear", "model.kind": "rnn", "model.activation": "tanh",
              "model.init": "orthogonal"}
    for gain, kind in ((0.3, "vanishing_in_time"), (3.0, "exploding")):
        rx = doctor(*from_spec(Spec().replace(**adding, **{"model.init_gain": gain})), steps=60, seeds=1)
        assert kind in {f.kind for f in rx.findings}
        assert {"gated_rnn", "orthogonal_init"} <= {t.name for t in rx.treatments}


def test_an_unwatched_screening_trial_trains_exactly_as_a_watched_one():
    from gradwatch.doctor import run_trial, schedule
    from gradwatch.doctor.treatments import Plan

    make_model, data, loss_fn, optimizer = from_spec(Spec())
    batches = schedule(data, 60, 0)
    watched, records = run_trial(Plan(optimizer=optimizer), make_model, batches, loss_fn, 0)
    unwatched, none = run_trial(Plan(optimizer=optimizer), make_model, batches, loss_fn, 0, watched=False)
    assert unwatched == watched and records.rows and none is None


def test_workers_are_started_once_per_process_and_batches_travel_packed():
    from gradwatch.doctor import schedule
    from gradwatch.doctor.workers import pack, pool_for, unpack

    pieces = from_spec(Spec())
    assert pool_for(2, pieces[0], pieces[2], pieces[3]) is pool_for(2, pieces[0], pieces[2], pieces[3])  # kept warm
    main_piece = functools.partial(lambda: None)
    main_piece.func.__module__ = "__main__"  # a notebook's or an unguarded script's factory: a worker re-runs it
    assert pool_for(None, main_piece, pieces[2], pieces[3]) is None
    batches = schedule(pieces[1], 14, 0)  # 200 samples in batches of 32: each epoch ends with a short one
    assert [len(x) for x, _ in batches][6] == 8
    assert all(torch.equal(a, b) for pair, back in zip(batches, unpack(pack(batches)), strict=True)
               for a, b in zip(pair, back, strict=True))


def _seen(*kinds_per_seed: tuple[str, ...]) -> Treatment:
    t = Treatment("untreated", "", Plan())
    t.found = [Diagnosis([Finding(k, [], {}, "medium") for k in kinds], {}) for kinds in kinds_per_seed]
    return t


@pytest.mark.parametrize(("seen", "seeds", "is_open"), [
    ((("vanishing",), ()), 3, True),  # a third seed decides whether vanishing is the majority's
    ((("vanishing", "plateau"), ("plateau", "vanishing")), 3, False),  # both a majority of three already
    (((), ()), 3, False),  # no kind can reach two of three from one seed left
    (((),), 2, False),  # two seeds: a kind needs both, and the first has none
    ((("plateau",),), 2, True),
])
def test_the_remaining_seeds_are_watched_only_while_they_could_change_the_majority(seen, seeds, is_open):
    assert _seen(*seen).unsettled(seeds) is is_open


def test_seeds_left_unwatched_change_no_finding_and_no_loss():
    """Every measured trial re-run watched on every seed: the same final losses, and the same majority kinds."""
    spec = Spec().replace(**{"model.activation": "leaky_relu", "model.init": "he_normal", "model.depth": 2,
                             "model.width": 32, "train.optimizer": "sgd", "train.learning_rate": 1e-4})
    make_model, data, loss_fn, optimizer = from_spec(spec)
    rx = doctor(make_model, data, loss_fn, optimizer, steps=STEPS, seeds=3)
    measured = [rx.untreated, *(t for t in rx.treatments if len(t.losses) == 3)]  # every seed: not screened, won
    assert rx.findings and len(measured) > 1 and any(len(t.found) < len(t.losses) for t in measured)  # one unwatched
    for t in measured:
        full = [run_trial(t.plan, make_model, rx.batches(s), loss_fn, s) for s in range(3)]
        assert [final_loss(losses) for losses, _ in full] == t.losses
        counts = Counter(kind for _, records in full for kind in {f.kind for f in diagnose(records)})
        assert sorted(t.kinds) == sorted(kind for kind, n in counts.items() if n >= 2)


# treatment -> (its final loss, the finding kinds every seed of it shows); a finding's remedies: REMEDY_OF
OUTCOMES = {"untreated": (0.69, ["vanishing"]), "lsuv": (0.27, ["lr_too_large"]), "residual": (0.6, ["plateau"]),
            "lsuv+lower_lr": (0.045, []), "lsuv+much_lower_lr": (0.2, [])}
REMEDY_OF = {"vanishing": ["lsuv", "residual"], "lr_too_large": ["lower_lr", "clip_norm", "much_lower_lr"],
             "plateau": ["adam"]}


def _prescribe(outcomes: dict, finalists: int = FINALISTS, combine: bool = True):
    """``prescribe`` over made-up trials: each treatment's loss and findings from ``outcomes``; clip_norm does
    not apply on top of lsuv here. Returns the Prescription and the names of every batch of trials run."""
    batches: list[list[str]] = []

    def trial(treatments):
        batches.append([t.name for t in treatments])
        for t in treatments:
            loss, kinds = outcomes[t.name]
            for _ in range(3):
                t.record([loss] * 10, None)
            t.found = [Diagnosis([Finding(k, [], {}, "medium", [Remedy(r, "") for r in REMEDY_OF[k]])
                                  for k in kinds], {})] * 3
        return treatments

    def propose(name):
        return "does not fit" if name.endswith("clip_norm") else Treatment(name, "", Plan())

    def screen(treatments):
        for t in treatments:
            t.screened = outcomes[t.name][0]

    return prescribe(trial, Treatment("untreated", "", Plan()), propose, screen, finalists, combine), batches


def test_a_finding_left_by_the_best_treatment_is_treated_on_top_of_it_in_a_second_round():
    rx, batches = _prescribe(OUTCOMES)
    assert [t.name for t in rx.treatments] == ["lsuv+lower_lr", "lsuv+much_lower_lr", "lsuv", "residual"]
    assert batches == [["untreated"], ["lsuv", "residual"], ["lsuv+lower_lr", "lsuv+much_lower_lr"]]
    assert "lsuv+clip_norm" not in rx.untried and not any(t.kinds for t in rx.treatments[:2])
    assert _prescribe(OUTCOMES, combine=False)[1] == batches[:2]  # the Keras doctor: one round


def test_no_second_round_where_the_best_treatment_leaves_no_finding():
    rx, batches = _prescribe({**OUTCOMES, "residual": (0.1, [])})
    assert [t.name for t in rx.treatments] == ["residual", "lsuv"] and len(batches) == 2


def test_a_combined_treatment_is_its_parts_in_order_and_says_why_where_one_does_not_apply():
    from gradwatch.doctor.treatments import lsuv
    from gradwatch.doctor.trials import plan_for

    make_model, _, _, _ = from_spec(Spec())
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    plan = plan_for("lsuv+lower_lr", Plan(optimizer=sgd), make_model)
    assert plan.surgeries == (lsuv,) and plan.optimizer(make_model().parameters()).param_groups[0]["lr"] == 0.1 * 0.1
    assert plan_for("lsuv+gated_rnn", Plan(optimizer=sgd), make_model) == "no nn.RNN/nn.RNNCell to swap for a GRU"
