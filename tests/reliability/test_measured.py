"""The reliability table's figures are derived from what a run recorded (issue 17, item 1): the
step journal's arithmetic on constructed runs (a dropped clip is one clip lost, a recomputed step
one step lost), ``record`` refusing figures written in, and no test passing a literal."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from orchestrator.devtools.faults.report import ENV, Injected, Measured, markdown, record
from orchestrator.train.journal import StepJournal, read

REPO = Path(__file__).resolve().parents[2]
N, WORKERS, BATCH = 16, 2, 2      # 4 steps per epoch
STEPS_PER_EPOCH = N // (WORKERS * BATCH)


def _run(folder, order, resumes=(), drop=None):
    """Write the journal of a 2-epoch run over clips ``order`` (per epoch) through StepJournal.

    ``resumes``: (killed after computing step k, resumed from checkpoint step c) pairs; the
    attempt computes steps up to k and the next one restarts after c.  ``drop``: a clip id the
    run never trains (its slot is left out of its batch)."""
    total = 2 * STEPS_PER_EPOCH
    plan = list(resumes) + [(total, None)]
    step = 0
    for kill_after, resume_from in plan:
        journals = [StepJournal(r, str(folder)) for r in range(WORKERS)]
        while step < kill_after:
            step += 1
            epoch, i = divmod(step - 1, STEPS_PER_EPOCH)
            for r, j in enumerate(journals):
                start = i * WORKERS * BATCH + r * BATCH
                keys = [k for k in order[epoch][start:start + BATCH] if k != drop]
                j.batch("train", keys)
                j.step(step, epoch)
        if resume_from is not None:
            step = resume_from
    return read(str(folder))


def _orders():
    return [list(range(N)), list(reversed(range(N)))]


def test_a_fault_free_run_loses_nothing(tmp_path):
    m = Measured.from_journal(_run(tmp_path, _orders()), split_size=N, bad=0, epochs=2)
    assert (m.steps_lost, m.clips_lost) == (0, 0), m
    assert m.evidence["trained_per_epoch"] == [N, N]


def test_a_dropped_clip_is_one_clip_lost(tmp_path):
    m = Measured.from_journal(_run(tmp_path, _orders(), drop=5), split_size=N, bad=0, epochs=2)
    assert m.clips_lost == 2  # clip 5 missing from each of the 2 epochs
    one = Measured.from_journal(_run(tmp_path / "one", _orders(), drop=5), split_size=N, bad=0, epochs=1)
    assert one.clips_lost == 1 and one.steps_lost == 0
    counted = Measured.from_journal(_run(tmp_path / "bad", _orders(), drop=5), split_size=N, bad=2, epochs=2)
    assert counted.clips_lost == 0  # the same clip, counted bad in each epoch: not lost


def test_recomputed_steps_are_steps_lost_and_their_first_copy_does_not_count(tmp_path):
    # killed after computing step 3 with the last checkpoint at 2: step 3 is computed twice
    m = Measured.from_journal(_run(tmp_path, _orders(), resumes=[(3, 2), (7, 4)]), split_size=N, bad=0, epochs=2)
    assert m.steps_lost == 1 + 3 and m.clips_lost == 0, m
    assert m.evidence["attempts"] == 3


def test_a_resume_that_skips_steps_loses_their_clips(tmp_path):
    # resumed from 4 after computing only up to 2 (a checkpoint claimed more than was computed): 8 clips never trained
    m = Measured.from_journal(_run(tmp_path, _orders(), resumes=[(2, 4)]), split_size=N, bad=0, epochs=2)
    assert m.clips_lost == 2 * WORKERS * BATCH and m.steps_lost == 0, m


def test_rows_without_ids_say_so(tmp_path):
    j = StepJournal(0, str(tmp_path))
    for s in (1, 2, 2, 3):
        j.step(s, 0)
    m = Measured.from_journal(read(str(tmp_path)), split_size=None)
    assert m.steps_lost == 1 and m.clips_lost is None and "n/a" in m.how


def test_record_takes_only_measurements(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)  # these rows are examples, not the table's
    killed = [101, 102, 103]  # what a test's injector logs as it goes
    with pytest.raises(TypeError, match="Measured"):
        record("x", Injected.of(killed, "kills"), True, 0)  # a figure written in
    with pytest.raises(TypeError, match="never from figures written in"):
        Measured(object(), 0, 0, "made up", {})
    with pytest.raises(TypeError, match="Injected"):
        record("x", 3, True, Measured.not_a_run("x"))  # faults typed in (issue 31: 8 of 19 rows were)
    with pytest.raises(TypeError, match="never from a figure written in"):
        Injected(object(), 3, "made up")
    with pytest.raises(TypeError, match="outcome"):
        record("x", Injected.of(killed, "kills"), "yes", Measured.not_a_run("x"))
    row = record("storage", Injected.of(killed, "kills"), 4 - 1 == 3, Measured.from_clip_accounting(total=4, kept=3, bad=0))
    assert row["clips_lost"] == 1 and row["steps_lost"] is None and row["injected"] == 3
    assert "| n/a | 1 |" in markdown([row])
    two = record("a | b", Injected.counted(len(killed), by="proxy"), [len(killed) == 3, not killed],
                 Measured.not_a_run("x"), "max |diff| 0")
    assert (two["survived"], two["runs"]) == (1, 2)
    assert markdown([two]).endswith("| max \\|diff\\| 0 |") and "| 1/2 |" in markdown([two])


def _arg(node: ast.Call, index: int, name: str):
    return node.args[index] if len(node.args) > index else next((k.value for k in node.keywords if k.arg == name),
                                                                None)


def _constant(node) -> bool:
    """A literal: a constant, or a list/tuple of them (``[True]``), or ``Injected.counted(3, ...)``."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, (ast.List, ast.Tuple)):
        return all(_constant(e) for e in node.elts)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("of", "counted"):
        return bool(node.args) and _constant(node.args[0])
    return False


def test_no_reliability_row_is_given_a_literal():
    """Every ``record(...)`` call in the tests passes expressions computed from the run for every
    column: the faults injected, the outcome and the measurement, never a constant."""
    calls = 0
    for path in sorted(p for p in (REPO / "tests").rglob("*.py") if p.name != Path(__file__).name):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "record":
                measured = _arg(node, 3, "measured")
                if measured is None:
                    continue
                calls += 1
                for i, name in ((1, "injected"), (2, "survived"), (3, "measured")):
                    value = _arg(node, i, name)
                    assert value is not None and not _constant(value), \
                        f"{path}:{node.lineno}: a literal reaches the table's {name!r} column"
                injected = _arg(node, 1, "injected")
                assert isinstance(injected, ast.Call) and getattr(injected.func, "attr", "") in ("of", "counted"), \
                    f"{path}:{node.lineno}: faults injected must be Injected.of(events) / Injected.counted(count)"
    assert calls >= 14  # 14 calls give the 19 rows (two tests are parametrized)
