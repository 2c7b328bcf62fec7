import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from gradwatch.cli import app

COMMANDS = ["demo", "train", "runs", "show", "diagnose"]


def gradwatch(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gradwatch", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_help_lists_every_command():
    out = CliRunner().invoke(app, ["--help"])
    assert out.exit_code == 0
    for command in COMMANDS:
        assert command in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command):
    out = CliRunner().invoke(app, [command, "--help"])
    assert out.exit_code == 0 and "Usage" in out.stdout


def test_bad_spec_value_is_one_red_line_exit_2_and_store_untouched(tmp_path):
    db = tmp_path / "runs.db"
    assert gradwatch("train", "model.depth=2", "train.epochs=1", "--name", "ok", "--store", str(db)).returncode == 0
    before = db.read_bytes()
    out = gradwatch("train", "model.activation=sigmod", "--store", str(db))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr + out.stdout
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == ["error: model.activation: got 'sigmod'; allowed: sigmoid, tanh, relu, leaky_relu, prelu, "
                     "elu, selu, gelu, linear"]
    assert db.read_bytes() == before


def test_unknown_run_is_a_one_line_error(tmp_path):
    out = gradwatch("show", "nope", "--store", str(tmp_path / "runs.db"))
    assert out.returncode == 2 and "error: run: got 'nope'" in out.stderr and "Traceback" not in out.stderr


def test_train_then_runs_show_and_diagnose(tmp_path):
    db = str(tmp_path / "runs.db")
    assert gradwatch("train", "train.epochs=2", "--name", "seedy", "--store", db).returncode == 0
    listed = gradwatch("runs", "--store", db)
    assert "seedy" in listed.stdout
    shown = gradwatch("show", "seedy", "--store", db)
    assert shown.returncode == 0 and "dense1" in shown.stdout and "vanishing" in shown.stdout
    diagnosed = gradwatch("diagnose", "seedy", "--store", db)
    assert "vanishing" in diagnosed.stdout and "try: 1." in diagnosed.stdout


def test_demo_writes_json_table_and_report(tmp_path):
    out = gradwatch("demo", "--epochs", "2", "--seeds", "1", "--workers", "2", "--json", "demo.json",
                    "--out", "report", "--store", "runs.db", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    cases = json.loads((tmp_path / "demo.json").read_text())["cases"]
    assert [c["name"] for c in cases] == ["deep_sigmoid", "shallow_sigmoid", "deep_relu", "deep_sigmoid_sgd",
                                          "deep_relu_sgd", "he_init", "batch_norm", "residual", "leaky_relu", "elu"]
    assert set(cases[0]) == {"name", "final_loss", "accuracy", "first_layer_grad", "first_layer_pct_change",
                             "grad_ratio_first_last", "verdict"}
    assert cases[0]["verdict"] == "vanishing" and cases[2]["verdict"] == "healthy"
    assert "The doctor: the remedies tried" in (tmp_path / "report" / "index.html").read_text()
    assert "deep_sigmoid" in out.stdout and "report:" in out.stdout and "1  relu_he" in out.stdout


def test_help_imports_no_heavy_library():
    """`gradwatch --help` must answer at once: torch, sklearn, matplotlib and pandas load only in the commands."""
    probe = ("import sys\nfrom gradwatch import cli\nprint(sorted(m for m in ('torch', 'sklearn', 'matplotlib', "
             "'pandas', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_each_command_writes_its_own_report_folder(tmp_path):
    out = gradwatch("train", "model.depth=2", "train.epochs=1", "--name", "one", "--store", "runs.db", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert gradwatch("report", "--store", "runs.db", cwd=tmp_path).returncode == 0
    assert (tmp_path / "gradwatch-report" / "report" / "index.html").exists()
    listed = gradwatch("runs", "--store", "runs.db", cwd=tmp_path)
    assert "1 run(s): page 1 of 1, newest first" in listed.stdout
