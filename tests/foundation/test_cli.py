import subprocess
import sys

import pytest

from orchestrator.cli import main


def test_help_lists_verbs(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for verb in ("synth", "config"):
        assert verb in out


@pytest.mark.parametrize("verb", ["synth", "config"])
def test_each_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_config_verb_prints_resolved(capsys):
    assert main(["config", "train.lr=7e-5"]) == 0
    out = capsys.readouterr().out
    assert "lr: 7.0e-05" in out


def test_bad_override_exits_2_with_message(capsys):
    assert main(["config", "train.nope=1"]) == 2
    assert "unknown key 'train.nope'" in capsys.readouterr().err


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "orchestrator", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "synth" in r.stdout
