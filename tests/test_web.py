"""The playground: the JSON API with TestClient (fast), and the page in Debian's chromium (marked browser).

The browser tests drive the seed's failing net and the ReLU + He fix end to end and fail on any request
that would leave the machine. Screenshots land in artifacts/; with GRADWATCH_DOCS_SCREENSHOTS=1 the two
README images in docs/ are rewritten too.
"""

import os
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from gradwatch.cli import app as cli
from gradwatch.store import Store
from gradwatch.web.app import create_app

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
SMALL = {"model.depth": 3, "model.width": 4, "train.epochs": 3}
# what the page's own requests carry: its loopback host, and JSON
OWN = {"base_url": "http://127.0.0.1:8000", "headers": {"content-type": "application/json"}}


@pytest.fixture
def client(tmp_path):
    with TestClient(create_app(tmp_path / "runs.db", max_sessions=3, idle_s=30), **OWN) as c:
        yield c


def wait_for(client, sid, status, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.get(f"/api/sessions/{sid}/state").json()
        if state["status"] == status:
            return state
        time.sleep(0.02)
    raise AssertionError(f"session {sid} never reached {status}: {state['status']}")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model.depth": 99}, "model.depth: got 99; allowed: >= 1 and <= 30"),
        ({"model.depth": 0}, "model.depth: got 0; allowed: >= 1"),
        ({"model.width": 65}, "model.width: got 65; allowed: >= 1 and <= 64"),
        ({"train.epochs": 5000}, "train.epochs: got 5000"),
        ({"data.name": "digits"}, "data.name: got 'digits'; allowed: moons, circles, spirals, xor"),
        ({"model.activation": "swish"}, "model.activation: got 'swish'; allowed: sigmoid"),
        ({"train.learning_rate": -1}, "train.learning_rate: got -1"),
        ({"model.depht": 3}, "model.depht: unknown field"),
        ({"model.depth": "ten"}, "model.depth: got 'ten'"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(client, body, field):
    res = client.post("/api/sessions", json=body)
    assert res.status_code == 422
    assert res.json()["detail"].startswith(field)


def test_malformed_bodies_are_400(client):
    assert client.post("/api/sessions", content=b"{nope").json()["detail"].startswith("body: got malformed JSON")
    res = client.post("/api/sessions", json=[1, 2])
    assert res.status_code == 400 and res.json()["detail"].startswith("body: got list")


def test_a_run_is_bounded_in_steps_not_only_field_by_field(client):
    huge = {"data.n_samples": 2000, "train.batch_size": 1, "train.epochs": 2000}  # each within its own limit
    res = client.post("/api/sessions", json=huge)
    assert res.status_code == 422
    assert res.json()["detail"].startswith("train.epochs: got 2000; allowed: <= 12 with 1600 training samples")
    assert client.post("/api/sessions", json={"train.epochs": 2000}).status_code == 201  # the seed's net: 7 steps


def test_every_offered_choice_starts_a_run_and_the_limits_are_enforced(client):
    options = client.get("/api/options").json()
    for field, values in options["choices"].items():
        for value in values:
            res = client.post("/api/sessions", json={**SMALL, field: value})
            assert res.status_code == 201, (field, value, res.json())
            client.delete(f"/api/sessions/{res.json()['id']}")
    low, high = options["limits"]["model.depth"]
    assert client.post("/api/sessions", json={**SMALL, "model.depth": high + 1}).status_code == 422


def test_train_to_the_end_then_save_for_gradwatch_show(client, tmp_path):
    sid = client.post("/api/sessions", json=SMALL).json()["id"]
    assert client.post(f"/api/sessions/{sid}/save").status_code == 409  # nothing trained yet
    client.post(f"/api/sessions/{sid}/train")
    state = wait_for(client, sid, "finished")
    assert state["epoch"] == 3 and len(state["history"]["loss"]) == 3
    assert list(state["layers"]["grad_norm"]) == ["dense1", "dense2", "dense3", "out"]
    assert list(state["theory"]) == ["dense1", "dense2", "dense3"] and state["theory"]["dense3"] == 1.0
    assert state["boundary"]["points"]["x1"] and len(state["boundary"]["p"]) == 40
    assert list(state["weights"]) == ["dense1", "dense2", "dense3", "out"]  # weight_trace: a line per layer
    assert all(len(v) == 3 for v in state["weights"].values())
    later = client.get(f"/api/sessions/{sid}/state", params={"since": 3, "boundary": state["boundary_version"]}).json()
    assert later["history"]["loss"] == [] and "boundary" not in later
    saved = client.post(f"/api/sessions/{sid}/save").json()
    out = CliRunner().invoke(cli, ["show", saved["run"], "--store", str(tmp_path / "runs.db")])
    assert out.exit_code == 0, out.output
    assert "grad_norm" in out.output
    assert Store(tmp_path / "runs.db").get(saved["run"]).summary["final_loss"] is not None


def test_step_trains_exactly_one_epoch_and_reset_starts_over(client):
    sid = client.post("/api/sessions", json={**SMALL, "train.epochs": 10}).json()["id"]
    client.post(f"/api/sessions/{sid}/step")
    client.post(f"/api/sessions/{sid}/step")
    deadline = time.monotonic() + 10
    while client.get(f"/api/sessions/{sid}/state").json()["epoch"] < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    state = client.get(f"/api/sessions/{sid}/state").json()
    assert (state["epoch"], state["status"]) == (2, "paused")
    res = client.post(f"/api/sessions/{sid}/reset", json={"model.depth": 31})
    assert res.status_code == 422 and res.json()["detail"].startswith("model.depth")
    client.post(f"/api/sessions/{sid}/reset", json={**SMALL, "model.depth": 5})
    state = client.get(f"/api/sessions/{sid}/state").json()
    assert (state["epoch"], state["status"]) == (0, "idle")


def test_sessions_are_bounded_and_unknown_ones_are_404(client):
    ids = [client.post("/api/sessions", json=SMALL).json()["id"] for _ in range(3)]
    res = client.post("/api/sessions", json=SMALL)
    assert res.status_code == 429 and res.json()["detail"].startswith("sessions: got 3 open; allowed: at most 3")
    client.delete(f"/api/sessions/{ids[0]}")
    assert client.post("/api/sessions", json=SMALL).status_code == 201
    res = client.get(f"/api/sessions/{ids[0]}/state")
    assert res.status_code == 404 and res.json()["detail"].startswith("session: got")
    res = client.post(f"/api/sessions/{ids[1]}/fly")
    assert res.status_code == 404 and res.json()["detail"].startswith("command: got 'fly'")


def test_a_trainer_that_dies_shows_error_with_its_reason_and_resets(client, monkeypatch):
    from gradwatch.train import Training

    sid = client.post("/api/sessions", json=SMALL).json()["id"]
    epoch = Training.epoch

    def broken(self):
        raise RuntimeError("Expected more than 1 value per channel when training\nsecond line")

    monkeypatch.setattr(Training, "epoch", broken)
    client.post(f"/api/sessions/{sid}/train")
    state = wait_for(client, sid, "error")
    assert state["error"] == "RuntimeError: Expected more than 1 value per channel when training"
    res = client.post(f"/api/sessions/{sid}/save")
    assert res.status_code == 409 and res.json()["detail"].startswith("status: got 'error'")
    monkeypatch.setattr(Training, "epoch", epoch)
    client.post(f"/api/sessions/{sid}/reset")
    state = client.get(f"/api/sessions/{sid}/state").json()
    assert (state["status"], state["error"]) == ("idle", None)
    client.post(f"/api/sessions/{sid}/train")
    assert wait_for(client, sid, "finished")["epoch"] == 3


def wait_for_treatment(client, sid, timeout=120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        treat = client.get(f"/api/sessions/{sid}/state").json()["treat"]
        if treat["status"] != "running":
            return treat
        time.sleep(0.1)
    raise AssertionError(f"the treatment of session {sid} never finished")


def test_treat_ranks_what_clears_vanishing_first_on_the_failing_net(client):
    sid = client.post("/api/sessions", json={}).json()["id"]  # the seed's failing 10 x 10 sigmoid net
    assert client.get(f"/api/sessions/{sid}/state").json()["treat"]["status"] == "idle"
    res = client.post(f"/api/sessions/{sid}/treat")
    assert res.status_code == 200 and res.json()["treat"] == "running"
    treat = wait_for_treatment(client, sid)
    assert treat["status"] == "done", treat["error"]
    assert "vanishing" in treat["findings"]
    untreated, best, *rest = treat["rows"]
    assert (untreated["#"], untreated["treatment"]) == ("-", "untreated") and "vanishing" in untreated["still"]
    assert best["#"] == "1" and "vanishing" in best["clears"].split(", "), treat["rows"]
    assert best["treatment"] in {"relu_he", "batch_norm", "residual"}
    assert best["vs untreated"].startswith("-")  # a lower final loss than the untreated net's, measured
    assert "fewer_layers" in treat["untried"]
    client.post(f"/api/sessions/{sid}/reset")
    assert client.get(f"/api/sessions/{sid}/state").json()["treat"]["status"] == "idle"  # settings changed


def test_treat_on_an_unknown_session_is_404_and_a_healthy_net_has_nothing_to_treat(client):
    res = client.post("/api/sessions/nope/treat")
    assert res.status_code == 404 and res.json()["detail"].startswith("session: got 'nope'")
    res = client.post("/api/sessions/nope/treat", content=b"x", headers={"content-type": "text/plain"})
    assert res.status_code == 415  # the same request checks as every other POST
    healthy = {"model.depth": 3, "model.width": 32, "model.activation": "relu", "model.init": "he_normal"}
    sid = client.post("/api/sessions", json=healthy).json()["id"]
    client.post(f"/api/sessions/{sid}/treat")
    treat = wait_for_treatment(client, sid)
    assert (treat["status"], treat["findings"], treat["rows"]) == ("done", [], [])


def test_sessions_nobody_polls_are_reaped(tmp_path):
    app = create_app(tmp_path / "runs.db", idle_s=0.3)
    with TestClient(app, **OWN) as c:
        sid = c.post("/api/sessions", json=SMALL).json()["id"]
        session = app.state.sessions[sid]
        time.sleep(0.4)
        assert c.get(f"/api/sessions/{sid}/state").status_code == 404
        session.thread.join(2)
        assert not session.thread.is_alive()


def test_serve_is_a_command():
    out = CliRunner().invoke(cli, ["serve", "--help"])
    assert out.exit_code == 0 and "--port" in out.output


# ---- in the browser ----

CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-gpu"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(tmp_path_factory.mktemp("web") / "runs.db")
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture
def page(server):
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian's chromium is not installed (make browser)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1250})
        leaks: list[str] = []

        def only_loopback(route):
            if urlparse(route.request.url).hostname in ("127.0.0.1", "localhost"):
                route.continue_()
            else:
                leaks.append(route.request.url)
                route.abort()

        context.route("**/*", only_loopback)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page
        browser.close()
        assert not leaks, f"requests left the machine: {leaks}"
        assert not errors, f"page errors: {errors}"


def shoot(page, name: str, docs: str | None = None) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
    if docs and os.environ.get("GRADWATCH_DOCS_SCREENSHOTS") == "1":
        page.screenshot(path=str(ROOT / "docs" / docs), full_page=False)


def train_preset(page, preset: str) -> dict:
    """Choose a preset, train it to the end, and return its history with the best update rate the page showed."""
    page.select_option("#preset", preset)
    page.wait_for_function("() => window.playground.state && window.playground.state.status === 'idle'")
    page.click("#train")
    rates, deadline = [0.0], time.monotonic() + 60
    # state is null for a moment while choosing a preset resets the session
    while page.evaluate("() => window.playground.state?.status") != "finished" and time.monotonic() < deadline:
        rates.append(float(page.inner_text("#rate")))
        page.wait_for_timeout(200)
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"update-rate-{preset}.txt").write_text(f"{max(rates)} updates/s\n")
    page.wait_for_function("() => window.playground.state.status === 'finished'", timeout=5_000)
    page.wait_for_timeout(400)  # the last poll's drawing
    history = page.evaluate("() => window.playground.history")  # every epoch so far, not just the last poll's
    return {**history, "rate": max(rates)}


@pytest.mark.browser
def test_failing_net_vanishes_and_relu_he_fixes_it(page, server):
    page.goto(server)
    page.wait_for_function("() => window.playground.state !== null")
    history = train_preset(page, "failing")
    assert "vanishing" in page.inner_text("#diagnosis")
    bars = page.evaluate("() => document.getElementById('grad').data[0]")
    assert bars["x"][0] == "dense1" and bars["x"][-1] == "out"
    assert bars["y"][0] < 1e-3 * bars["y"][-1], bars["y"]  # orders of magnitude below the last layer's
    assert history["loss"][-1] > 0.6 and len(history["loss"]) == 100  # stuck near ln 2
    # the page reports its update rate while training; how fast it is is measured by benchmarks/web_load.py
    assert history["rate"] > 0, history["rate"]
    assert "act=sigmoid" in page.url and "depth=10" in page.url
    shoot(page, "playground-sigmoid", "playground-sigmoid.png")

    page.click("#pin")
    history = train_preset(page, "relu")
    assert history["loss"][-1] < 0.05
    assert float(page.inner_text("#loss-value")) < 0.05
    traces = page.evaluate("() => document.getElementById('grad').data.map(t => t.type)")
    assert traces.count("bar") == 2 and "scatter" in traces, traces  # the pinned run beside it, theory over both
    assert "act=relu" in page.url and "init=he_normal" in page.url
    shoot(page, "playground-relu-he", "playground-relu-he.png")


@pytest.mark.browser
def test_treat_button_shows_the_ranked_table(page, server):
    page.goto(f"{server}/?preset=failing")
    page.wait_for_function("() => window.playground.state && window.playground.state.status === 'idle'")
    page.click("#treat")
    page.wait_for_function("() => window.playground.state.treat.status !== 'running'", timeout=120_000)
    page.wait_for_selector("#treatment tbody tr")
    rows = page.eval_on_selector_all("#treatment tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))")
    assert rows[0][:2] == ["#", "treatment"] and rows[1][:2] == ["-", "untreated"]
    assert rows[2][0] == "1" and "vanishing" in rows[2][4], rows
    assert "best first" in page.inner_text("#treat-status") and not page.is_disabled("#treat")
    shoot(page, "playground-treat")


@pytest.mark.browser
def test_link_reproduces_settings_and_bad_values_show_the_field(page, server):
    page.goto(f"{server}/?depth=4&width=8&act=tanh&epochs=30&lr=0.01")
    page.wait_for_function("() => window.playground.state && window.playground.state.status === 'idle'")
    assert page.input_value("#f-depth") == "4" and page.input_value("#f-act") == "tanh"
    page.click("#train")
    page.wait_for_function("() => window.playground.state && window.playground.state.status === 'finished'",
                           timeout=30_000)
    assert len(page.evaluate("() => window.playground.history.loss")) == 30
    page.fill("#f-epochs", "5000")
    page.dispatch_event("#f-epochs", "change")
    page.wait_for_function("() => document.getElementById('error').textContent.length > 0")
    assert page.inner_text("#error").startswith("train.epochs: got 5000; allowed: >= 1 and <= 2000")
    shoot(page, "playground-error")


def test_theory_overlay_predicts_vanishing_for_sigmoid_and_balance_for_relu_he():
    from gradwatch.spec import Spec
    from gradwatch.train import Training
    from gradwatch.web.sessions import predicted

    sigmoid = predicted(Training(Spec()))  # the seed's 10 x 10 sigmoid net
    relu_he = predicted(Training(Spec().replace(**{"model.activation": "relu", "model.init": "he_normal"})))
    assert sigmoid["dense1"] < 1e-3 and 0.3 < relu_he["dense2"] < 3
    assert predicted(Training(Spec().replace(**{"model.norm": "batch"}))) is None
