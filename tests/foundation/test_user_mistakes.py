"""User mistakes get one clear line (issue 31, class 5): the setting or file, and how to fix it; no
traceback (``--verbose`` shows it), exit status 2 — also when the mistake surfaces inside a Ray
worker.  Before: a missing data root ended in a tokenizer traceback, a typo in ``workload=`` in a
``ModuleNotFoundError`` traceback, a zero-byte video in a clear message at the bottom of one."""
from __future__ import annotations

import sys

import pytest

from orchestrator import errors
from orchestrator.cli import main
from orchestrator.data.quality import TooManyBadClips

TINY = "workloads/configs/pretrain_tiny.yaml"


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("verb", ["train", "evaluate"])
def test_a_missing_data_root_is_named_with_its_fix(tmp_path, capsys, verb):
    extra = ["--checkpoint", str(tmp_path / "ckpt")] if verb == "evaluate" else []
    rc = main([verb, "--config", TINY, *extra, f"data.root={tmp_path / 'absent'}", f"storage={tmp_path / 's'}",
               "tracking.enabled=false"])
    line = _one_line(capsys)
    assert rc == 2 and "data.root" in line and str(tmp_path / "absent") in line and "synth --out" in line


def test_a_root_without_a_tokenizer_names_the_setting(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    rc = main(["train", "--config", TINY, f"data.root={tmp_path / 'data'}", f"storage={tmp_path / 's'}",
               "tracking.enabled=false"])
    line = _one_line(capsys)
    assert rc == 2 and "data.tokenizer" in line and "save_pretrained" in line


@pytest.mark.parametrize("typo,hint", [("workloads.retreival", "did you mean 'workloads.retrieval'"),
                                       ("mypkg.my_workload", "no module named 'mypkg'")])
def test_a_workload_typo_is_a_config_error(capsys, typo, hint):
    rc = main(["config", f"workload={typo}"])
    line = _one_line(capsys)
    assert rc == 2 and f"workload = '{typo}'" in line and hint in line and "accepted:" in line


def test_a_workload_module_that_fails_to_import_says_so(tmp_path, capsys, monkeypatch):
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text("")
    (tmp_path / "brokenpkg" / "wl.py").write_text("import not_installed_anywhere_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rc = main(["config", "workload=brokenpkg.wl"])
    line = _one_line(capsys)
    assert rc == 2 and "its module failed to import" in line and "not_installed_anywhere_xyz" in line
    for name in ("brokenpkg.wl", "brokenpkg"):
        sys.modules.pop(name, None)


def _ray_wrapped_stop() -> BaseException:
    """What a train or evaluate run raises when its decode tasks stopped it (zero-byte videos)."""
    from ray.exceptions import RayTaskError

    stop = TooManyBadClips("too many bad clips: 2 bad of 2 clips (100.0%) by reason: empty=2; examples: empty: "
                           "/d/videos/zero.mp4; the limit is data.max_bad_fraction=0.05. Fix or drop these files, or "
                           "raise data.max_bad_fraction.")
    wrapped = RayTaskError("process_batch", "Traceback (most recent call last):\n  ...", stop).as_instanceof_cause()
    outer = RuntimeError("Training failed due to worker errors")
    outer.worker_failures = {0: wrapped}
    return outer


@pytest.mark.parametrize("verbose", [False, True])
def test_a_data_quality_stop_from_a_worker_is_one_line(capsys, monkeypatch, verbose):
    from orchestrator.commands import train

    def run(args):
        raise _ray_wrapped_stop()

    monkeypatch.setattr(train, "run", run)
    rc = main([*(["--verbose"] if verbose else []), "train", "--config", TINY])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: too many bad clips: 2 bad of 2")
    assert "empty: /d/videos/zero.mp4" in lines[0] and "Traceback" not in lines[0]
    assert ("Traceback" in err) == verbose  # --verbose shows where it came from


def test_anything_else_still_raises_with_its_traceback(monkeypatch):
    from orchestrator.commands import train

    monkeypatch.setattr(train, "run", lambda args: (_ for _ in ()).throw(KeyError("a bug")))
    with pytest.raises(KeyError):
        main(["train", "--config", TINY])
    assert errors.find(_ray_wrapped_stop(), (errors.UserError,)) is not None
