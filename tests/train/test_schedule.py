"""The train loop's per-step decisions and its resume skip, without Ray or DeepSpeed."""
import pytest

from orchestrator.train.schedule import ResumeSkip, StepSchedule


def _steps(schedule, what, upto):
    return [s for s in range(1, upto + 1) if getattr(schedule.at(s), what)]


def test_log_checkpoint_and_preemption_checks_follow_their_intervals():
    s = StepSchedule(max_steps=10, log_every=3, checkpoint_every=4, preemption_check_every=2)
    assert _steps(s, "log", 10) == [3, 6, 9, 10]               # and always at the last step
    assert _steps(s, "checkpoint", 10) == [4, 8, 10]
    assert _steps(s, "check_preemption", 10) == [2, 6]         # not where a checkpoint is taken anyway
    assert _steps(s, "last", 12) == [10, 11, 12]
    assert _steps(s, "validate", 10) == []                     # no validation rule: never
    assert _steps(s, "report", 10) == [3, 4, 6, 8, 9, 10]      # metrics go to Ray Train when logged or saved


def test_validation_forces_a_log_on_its_step():
    s = StepSchedule(max_steps=20, log_every=7, checkpoint_every=100, preemption_check_every=1,
                     validate_every=5)
    assert _steps(s, "validate", 20) == [5, 10, 15, 20]
    assert _steps(s, "log", 20) == [5, 7, 10, 14, 15, 20]
    a = s.at(20)
    assert a.last and a.checkpoint and a.validate and a.log and not a.check_preemption


def test_schedule_from_the_train_config_and_bad_intervals():
    from orchestrator.config import load_config

    t = load_config(None, ["train.max_steps=8", "train.log_every=2", "train.checkpoint_every=4",
                           "train.preemption_check_every=1"]).train
    s = StepSchedule.from_config(t)
    assert _steps(s, "checkpoint", 8) == [4, 8] and _steps(s, "log", 8) == [2, 4, 6, 8]
    assert _steps(s, "check_preemption", 8) == [1, 2, 3, 5, 6, 7]
    with pytest.raises(ValueError, match="log_every"):
        StepSchedule(max_steps=5, log_every=0, checkpoint_every=1, preemption_check_every=1)


def test_resume_skip_leaves_out_the_epochs_first_batches_and_the_mixed_in_ones_between():
    stream = [("train", 0), ("train_text", "t0"), ("train", 1), ("train_image", "i0"), ("train", 2),
              ("train_text", "t1"), ("train", 3)]
    skip = ResumeSkip(2)
    kept = list(skip.filter(stream))
    # train 0 and 1 were trained before the fault; the mixed-in t0 falls between skipped batches
    # (no mixed-in step until the epoch's stream is back where it was); i0 comes after the skip
    assert kept == [("train_image", "i0"), ("train", 2), ("train_text", "t1"), ("train", 3)]
    assert skip.seen == len(stream) and skip.remaining == 0
    assert list(ResumeSkip(0).filter(stream)) == stream


def test_resume_skip_carries_over_into_the_next_pass():
    skip = ResumeSkip(3)
    assert list(skip.filter([("train", 0), ("train", 1)])) == []      # a pass shorter than the skip
    assert skip.remaining == 1
    assert list(skip.filter([("train", 0), ("train", 1)])) == [("train", 1)]
    empty = ResumeSkip(5)
    assert list(empty.filter([])) == [] and empty.seen == 0          # an empty pass: nothing seen
