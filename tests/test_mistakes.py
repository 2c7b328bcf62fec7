"""Every user mistake is one line: a table of bad inputs across the CLI, spec and study files, stores and the web API.

Each CLI row runs the real entry point (``cli.main``, click's parsing included) and asserts exit code 2,
one ``error:`` line on stderr, no traceback and a store whose runs are unchanged; each web row asserts
a 4xx with a one-line detail and no run stored.
"""

import sys

import pytest
from fastapi.testclient import TestClient

from gradwatch import cli
from gradwatch.records import Records, Run
from gradwatch.store import Store
from gradwatch.web.app import MAX_BODY, create_app

STUDY = "name: s\nbase: {train: {epochs: 1}}\ngrid: {model.depth: [1, 2]}\n"


@pytest.fixture
def place(tmp_path):
    """A folder with a store holding one run, and the bad files the table points at."""
    store = Store(tmp_path / "runs.db")
    records = Records()
    records.add(0, 0, "grad_norm", {"dense1": 0.1, "out": 1.0})
    store.put_run(Run(records=records, summary={"final_loss": 0.5}, name="kept", group="g"))
    store.close()
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "typo.yaml").write_text("model: {depht: 3}\n")
    (tmp_path / "study_typo.yaml").write_text(STUDY + "gird: {}\n")
    (tmp_path / "study.yaml").write_text(STUDY)
    (tmp_path / "notes.txt").write_text("not a database\n" * 100)
    (tmp_path / "truncated.db").write_bytes((tmp_path / "runs.db").read_bytes()[:1500])
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder").mkdir()
    return tmp_path


def stored(path):
    store = Store(path)
    try:
        return [(r["id"], r["name"], r["summary"]) for r in store.runs()]
    finally:
        store.close()


# (why, argv after `gradwatch`, the start of the one line after "error: "); {d} is the fixture's folder,
# and --store {d}/runs.db is added to every command that takes a store unless the row names its own
CLI = [
    ("no command", [], "gradwatch: got no command; allowed: demo"),
    ("unknown top-level flag", ["--bogus"], "gradwatch: No such option: --bogus"),
    ("unknown command", ["bogus"], "gradwatch: No such command 'bogus'"),
    ("unknown flag", ["runs", "--bogus"], "gradwatch runs: No such option: --bogus"),
    ("show without a run", ["show"], "gradwatch show: Missing argument"),
    ("zero workers", ["demo", "--workers", "0"], "gradwatch demo: Invalid value for '--workers'"),
    ("zero epochs", ["demo", "--epochs", "0"], "gradwatch demo: Invalid value for '--epochs'"),
    ("zero seeds", ["demo", "--seeds", "0"], "gradwatch demo: Invalid value for '--seeds'"),
    ("port not a number", ["serve", "--port", "abc"], "gradwatch serve: Invalid value for '--port'"),
    ("port out of range", ["serve", "--port", "70000"], "gradwatch serve: Invalid value for '--port'"),
    ("unknown backend", ["sweep", "{d}/study.yaml", "--backend", "dask"], "gradwatch sweep: Invalid value"),
    ("page zero", ["runs", "--page", "0"], "gradwatch runs: Invalid value for '--page'"),
    ("page past the end", ["runs", "--page", "9"], "--page: got 9; allowed: 1 to 1"),
    ("unknown group", ["runs", "--group", "nosuch"], "--group: got 'nosuch'; allowed: a group with stored runs (g)"),
    ("empty run name", ["show", ""], "run: got ''; allowed: a run id"),
    ("unknown run", ["show", "nope"], "run: got 'nope'"),
    ("diagnose unknown run", ["diagnose", "nope"], "run: got 'nope'"),
    ("report unknown run", ["report", "nope"], "run: got 'nope'"),
    ("report unknown group", ["report", "--group", "nosuch"], "--group: got 'nosuch'"),
    ("unsafe run name", ["train", "--name", "a/b"], "name: got 'a/b'; allowed: up to 100 letters"),
    ("flag without =", ["train", "model.depth"], "model.depth: got no '='"),
    ("unknown activation", ["train", "model.activation=sigmod"], "model.activation: got 'sigmod'; allowed: sigmoid"),
    ("unknown field", ["train", "model.depht=3"], "model.depht: unknown field; allowed: kind, depth"),
    ("markup in a field name", ["train", "model.[bold]x=3"], "model.[bold]x: unknown field"),
    ("out of range", ["train", "model.depth=-1"], "model.depth: got -1; allowed: >= 0 and <= 256"),
    ("recurrent on 2-D data", ["train", "model.kind=lstm"], "data.name: got 'moons'; allowed: adding, recall"),
    ("MLP on sequences", ["train", "data.name=adding"], "data.name: got 'adding'; allowed: moons"),
    ("empty train set", ["train", "data.n_samples=8", "data.test_size=0.99"], "data.test_size: got 0.99; allowed"),
    ("batch norm, last batch of 1", ["train", "model.norm=batch", "train.batch_size=199"],
     "train.batch_size: got 199; allowed: a size leaving >= 2"),
    ("batch norm, one sample", ["train", "model.norm=batch", "data.n_samples=10", "data.test_size=0.9"],
     "train.batch_size: got 32; allowed"),
    ("binary spec file", ["train", "--spec", "{d}/binary.yaml"], "{d}/binary.yaml: cannot read (UnicodeDecodeError"),
    ("missing spec file", ["train", "--spec", "{d}/nope.yaml"], "{d}/nope.yaml: cannot read"),
    ("spec file not a mapping", ["train", "--spec", "{d}/list.yaml"], "{d}/list.yaml: got list"),
    ("spec file typo", ["train", "--spec", "{d}/typo.yaml"], "model.depht: unknown field"),
    ("binary study file", ["sweep", "{d}/binary.yaml"], "{d}/binary.yaml: cannot read (UnicodeDecodeError"),
    ("missing study file", ["sweep", "{d}/nope.yaml"], "{d}/nope.yaml: cannot read"),
    ("study file typo", ["sweep", "{d}/study_typo.yaml"], "gird: unknown field"),
    ("unknown study", ["study", "nosuch"], "study: got 'nosuch'; allowed: all, depth"),
    ("--out on a file", ["report", "--out", "{d}/afile"], "--out: got '{d}/afile' (an existing file)"),
    ("--out in /proc", ["report", "--out", "/proc/x"], "--out: got '/proc/x' (No such file or directory)"),
    ("--out on a file, before training", ["demo", "--epochs", "1", "--out", "{d}/afile"], "--out: got '{d}/afile'"),
    ("store is a folder", ["runs", "--store", "{d}/folder"], "store: got '{d}/folder' (is a folder)"),
    ("store is a text file", ["runs", "--store", "{d}/notes.txt"], "store: got '{d}/notes.txt' (file is not a data"),
    ("store is truncated", ["show", "kept", "--store", "{d}/truncated.db"], "store: "),
    ("store under a file", ["train", "--store", "{d}/afile/runs.db"], "store: got '{d}/afile/runs.db' ("),
    ("store in /proc", ["train", "--store", "/proc/gw/runs.db"], "store: got '/proc/gw/runs.db'"),
]
TAKES_STORE = {"runs", "show", "diagnose", "report", "train", "demo", "sweep", "study"}


@pytest.mark.parametrize(("why", "argv", "line"), CLI, ids=[row[0] for row in CLI])
def test_cli_mistake_is_one_line_exit_2_and_store_unchanged(place, monkeypatch, capsys, why, argv, line):
    argv = [a.format(d=place) for a in argv]
    if argv and argv[0] in TAKES_STORE and "--store" not in argv:
        argv += ["--store", str(place / "runs.db")]
    before = stored(place / "runs.db")
    monkeypatch.chdir(place)
    monkeypatch.setattr(sys, "argv", ["gradwatch", *argv])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    out = capsys.readouterr()
    assert exit_.value.code == 2, out
    lines = [x for x in out.err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in out.err, out.err
    assert lines[0].startswith("error: " + line.format(d=place)), lines[0]
    assert out.out == ""
    assert stored(place / "runs.db") == before
    assert not (place / "gradwatch-report").exists()


def test_a_report_of_more_runs_than_fit_is_refused_before_reading_them(place, monkeypatch, capsys):
    monkeypatch.setattr(cli, "REPORT_MAX", 0)
    monkeypatch.setattr(sys, "argv", ["gradwatch", "report", "--store", str(place / "runs.db")])
    with pytest.raises(SystemExit):
        cli.main()
    assert capsys.readouterr().err.strip() == ("error: runs: got 1; allowed: at most 0 in one report (name them, "
                                               "or choose a --group)")


def test_usage_errors_of_either_click_are_one_line(monkeypatch, capsys):
    """typer bundles its own click: both its and the installed click's exceptions become one line."""
    classes, _ = cli.click_errors()
    assert len(classes) >= 1
    for cls in classes:
        monkeypatch.setattr(cli, "app", lambda cls=cls, **_: (_ for _ in ()).throw(cls("a two\nline message")))
        with pytest.raises(SystemExit) as exit_:
            cli.main()
        assert exit_.value.code == 2
        assert capsys.readouterr().err.strip().splitlines() == ["error: a two line message"]


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only user mistakes are shortened: an unexpected error still raises."""
    monkeypatch.setattr(cli, "app", lambda **_: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main()


SMALL = {"model.depth": 3, "model.width": 4, "train.epochs": 3}
OWN = {"host": "127.0.0.1:8000", "content-type": "application/json"}

# (why, method, path, headers over OWN, body bytes, status, start of the detail)
WEB = [
    ("foreign host", "POST", "/api/sessions", {"host": "evil.example"}, b"{}", 403, "host: got 'evil.example'"),
    ("rebinding host on a GET", "GET", "/api/options", {"host": "evil.example:8000"}, b"", 403, "host: got"),
    ("foreign origin", "POST", "/api/sessions", {"origin": "http://evil.example"}, b"{}", 403, "origin: got"),
    ("text/plain body", "POST", "/api/sessions", {"content-type": "text/plain"}, b"{}", 415,
     "content-type: got 'text/plain'; allowed: application/json"),
    ("no content type", "POST", "/api/sessions", {"content-type": ""}, b"{}", 415, "content-type: got 'none'"),
    ("body over the cap", "POST", "/api/sessions", {}, b" " * (MAX_BODY + 1), 413, f"body: got {MAX_BODY + 1} bytes"),
    ("nesting past the limit", "POST", "/api/sessions", {}, b'{"a": [[[[1]]]]}', 400, "body: got JSON nested deeper"),
    ("nesting past the parser", "POST", "/api/sessions", {}, b"[" * 50_000, 400, "body: got malformed JSON"),
    ("malformed JSON", "POST", "/api/sessions", {}, b"{nope", 400, "body: got malformed JSON"),
    ("a list, not an object", "POST", "/api/sessions", {}, b"[1, 2]", 400, "body: got list"),
    ("batch norm, last batch of 1", "POST", "/api/sessions", {},
     b'{"model.norm": "batch", "train.batch_size": 199}', 422, "train.batch_size: got 199"),
    ("empty train set", "POST", "/api/sessions", {}, b'{"data.n_samples": 8, "data.test_size": 0.99}', 422,
     "data.test_size: got 0.99"),
    ("recurrent net", "POST", "/api/sessions", {}, b'{"model.kind": "lstm"}', 422, "data.name: got 'moons'"),
    ("a query that is not a number", "GET", "/api/sessions/x/state?since=abc", {}, b"", 422,
     "since: got 'abc'; allowed: input should be a valid integer"),
    ("unknown session state", "GET", "/api/sessions/nope/state", {}, b"", 404, "session: got 'nope'"),
    ("unknown session close", "DELETE", "/api/sessions/nope", {}, b"", 404, "session: got 'nope'"),
    ("unknown session command", "POST", "/api/sessions/nope/train", {}, b"", 404, "session: got 'nope'"),
]


@pytest.mark.parametrize(("why", "method", "path", "headers", "body", "status", "detail"), WEB,
                         ids=[row[0] for row in WEB])
def test_web_mistake_is_a_one_line_4xx_and_nothing_stored(tmp_path, why, method, path, headers, body, status, detail):
    with TestClient(create_app(tmp_path / "runs.db"), base_url="http://127.0.0.1:8000") as client:
        sent = {k: v for k, v in {**OWN, **headers}.items() if v}
        res = client.request(method, path, content=body, headers=sent)
    assert res.status_code == status, res.text
    assert res.json()["detail"].startswith(detail) and "\n" not in res.json()["detail"]
    assert stored(tmp_path / "runs.db") == []


def test_web_unknown_command_and_early_save_are_4xx(tmp_path):
    with TestClient(create_app(tmp_path / "runs.db"), base_url="http://127.0.0.1:8000",
                    headers={"content-type": "application/json"}) as client:
        sid = client.post("/api/sessions", json=SMALL).json()["id"]
        res = client.post(f"/api/sessions/{sid}/fly")
        assert res.status_code == 404 and res.json()["detail"].startswith("command: got 'fly'; allowed: train")
        res = client.post(f"/api/sessions/{sid}/save")
        assert res.status_code == 409 and res.json()["detail"].startswith("status: got 'idle'")
    assert stored(tmp_path / "runs.db") == []


def test_the_table_covers_at_least_40_mistakes():
    assert len(CLI) + len(WEB) >= 40  # the acceptance floor; rows are only ever added
