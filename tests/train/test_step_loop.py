"""The worker's step loop (``loop.run_steps`` + ``finish``) on fakes: no Ray cluster, no DeepSpeed.
What it checks: optimizer steps under gradient accumulation, when metrics are reported, when
checkpoints are taken (schedule, preemption, the last step once), epochs, and the resume skip."""
import pytest
import torch

from orchestrator.config import load_config
from orchestrator.train import loop
from orchestrator.train.plan import WorkerPlan


class Engine:
    def __init__(self, accum):
        self.global_steps, self.micro, self.accum, self.module = 0, 0, accum, None

    def backward(self, loss):
        pass

    def is_gradient_accumulation_boundary(self):
        return (self.micro + 1) % self.accum == 0

    def step(self):
        self.micro += 1
        if self.micro % self.accum == 0:
            self.global_steps += 1


class Progress:
    def has_keys(self, stream):
        return False

    def begin_pass(self, stream, epoch=None):
        pass

    def end_pass(self, stream):
        pass

    def record(self, stream, keys):
        pass


class Preemption:
    def __init__(self, at):
        self.at, self.asked = at, []

    def should_checkpoint(self):
        self.asked.append(True)
        return len(self.asked) == self.at


def _worker(monkeypatch, overrides, batches_per_epoch, accum=1, epoch_batches=0, preempt_at=None):
    run = load_config(None, ["workload=pretrain", f"train.grad_accum_steps={accum}", *overrides])
    plan = WorkerPlan(run=run, run_name="r", run_dir="/nowhere", model_config=None)
    seen = []

    class Workload:
        @staticmethod
        def loss(module, batch, task_cfg):
            seen.append(batch["i"])
            return {"loss": torch.tensor(float(batch["i"]))}

    class Validator:
        def due(self, step):
            return False

        def run(self, engine):
            return {}

    saved, reported = [], []

    def save_and_report(w):
        saved.append(w.state.step)
        w.saved_step = w.state.step

    monkeypatch.setattr(loop, "save_and_report", save_and_report)
    monkeypatch.setattr(loop, "epoch_batches", lambda *a, **k: iter([{"i": i} for i in range(batches_per_epoch)]))
    monkeypatch.setattr(loop.quality, "end_epoch_report", lambda run_name: {})
    import ray.train

    monkeypatch.setattr(ray.train, "report", lambda metrics, **k: reported.append(metrics["step"]))
    scheduler = type("S", (), {"get_last_lr": lambda self: [0.1]})()
    w = loop.Worker(plan, 0, 1, "cpu", Workload, None, Engine(accum), scheduler, False, {}, Validator(),
                    Progress(), loop.TrainState(epoch_batches=epoch_batches), resumed=epoch_batches > 0)
    w.preemption = Preemption(preempt_at)
    return w, seen, saved, reported


def test_steps_reports_checkpoints_and_epochs(monkeypatch):
    w, seen, saved, reported = _worker(monkeypatch, ["train.max_steps=10", "train.log_every=3",
                                                     "train.checkpoint_every=4", "train.preemption_check_every=100"], 6)
    loop.run_steps(w)
    loop.finish(w)
    assert w.state.step == 10 and w.state.epoch == 1 and w.state.epoch_batches == 4
    assert seen == list(range(6)) + list(range(4))
    assert saved == [4, 8, 10]                      # the last step's checkpoint is not taken twice
    assert reported == [3, 6, 9]                    # log-only steps report without a checkpoint
    # the window since the last report (step 9): the one batch of step 10, i = 3
    assert w.last_metrics["step"] == 10 and w.last_metrics["loss"] == pytest.approx(3.0)


def test_gradient_accumulation_counts_optimizer_steps(monkeypatch):
    w, seen, saved, _ = _worker(monkeypatch, ["train.max_steps=3", "train.log_every=1", "train.checkpoint_every=2",
                                              "train.preemption_check_every=100"], 10, accum=2)
    loop.run_steps(w)
    assert w.state.step == 3 and len(seen) == 6 and saved == [2, 3]
    assert w.state.samples == 3 * 2 * w.batch_size


def test_resume_skips_the_epochs_batches_already_trained(monkeypatch):
    w, seen, _, _ = _worker(monkeypatch, ["train.max_steps=3", "train.checkpoint_every=100",
                                          "train.preemption_check_every=100"], 5, epoch_batches=2)
    loop.run_steps(w)
    assert seen == [2, 3, 4] and w.state.epoch_batches == 5


def test_a_preemption_signal_takes_one_checkpoint(monkeypatch):
    w, _, saved, _ = _worker(monkeypatch, ["train.max_steps=6", "train.checkpoint_every=100", "train.log_every=100",
                                           "train.preemption_check_every=2"], 10, preempt_at=2)
    loop.run_steps(w)
    assert w.preemption.asked == [True, True] and saved == [4, 6]   # asked at 2 and 4; signalled at 4; 6 is the last


def test_an_empty_dataset_is_an_error(monkeypatch):
    w, _, _, _ = _worker(monkeypatch, ["train.max_steps=3"], 0)
    with pytest.raises(RuntimeError, match="yielded no batch"):
        loop.run_steps(w)
