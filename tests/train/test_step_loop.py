"""The worker's step loop (``TrainLoop.run`` + ``finish``) on fakes: no Ray cluster, no DeepSpeed.
What it checks: optimizer steps under gradient accumulation, when metrics are reported, when
checkpoints are taken (schedule, preemption, the last step once), epochs, and the resume skip.
The loop is composed of its components, so the fakes are handed in: nothing is patched."""
from types import SimpleNamespace

import pytest
import torch

from orchestrator.config import load_config
from orchestrator.runtime.model_setup import WorkerModel
from orchestrator.train.schedule import StepSchedule
from orchestrator.train.streams import DataStreams
from orchestrator.trainer import loop
from orchestrator.trainer.plan import WorkerPlan


class Engine:
    def __init__(self, accum):
        self.global_steps, self.micro, self.accum, self.module = 0, 0, accum, None
        self.lr_scheduler = type("S", (), {"get_last_lr": lambda self: [0.1]})()

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


class Counts:  # the run's bad-clip counts: none
    def epoch_report(self):
        return {}

    def check_run_end(self):
        pass


class Checkpointer:
    def __init__(self, preemption):
        self.saved, self.saved_step, self.preemption = [], -1, preemption
        self.prepared = []  # saves taken before each prepare()
        self.copy_wait_s = 0.0  # as the real one: the optimizer's waits for deferred host copies, in total

    def preempted(self):
        return self.preemption.should_checkpoint()

    def save(self, step, client_state, metrics, durable=False):
        self.saved.append(step)
        self.saved_step = step
        self.copy_wait_s += 0.25  # the next update waits a quarter second for this save's copies

    def prepare(self):
        self.prepared.append(len(self.saved))
        return 0.0

    def poll(self):  # each save is committed at the step boundary after it
        if len(self.saved) > getattr(self, "committed", 0):
            self.committed = len(self.saved)
            return SimpleNamespace(started=0.0)
        return None

    def drain(self):
        return None

    def export(self, export_uri, step):
        pass


class Metrics:
    def __init__(self):
        self.reported, self.logged = [], []

    def log(self, metrics, step):
        self.logged.append((step, metrics))

    def report(self, metrics):
        self.reported.append(metrics["step"])


class Preemption:
    def __init__(self, at):
        self.at, self.asked = at, []

    def should_checkpoint(self):
        self.asked.append(True)
        return len(self.asked) == self.at


def _worker(overrides, batches_per_epoch, accum=1, epoch_batches=0, preempt_at=None):
    run = load_config(None, ["workload=pretrain", f"train.grad_accum_steps={accum}", *overrides])
    plan = WorkerPlan(run=run, run_name="r", run_dir="/nowhere", model_config=None)
    seen = []

    class Workload:
        @staticmethod
        def loss(module, batch, task_cfg):
            seen.append(batch["i"])
            return {"loss": torch.tensor(float(batch["i"]))}

    def passes(epoch, step):
        return iter([{"i": i} for i in range(batches_per_epoch)])

    streams = DataStreams(passes, Progress(), Counts(), resume_batches=epoch_batches,
                          batch_size=run.train.batch_size_per_worker)
    checkpointer, metrics = Checkpointer(Preemption(preempt_at)), Metrics()
    step = loop.TrainStep(Engine(accum), WorkerModel(Workload, None, None, None, {}))
    w = loop.TrainLoop(plan, step, StepSchedule.from_config(run.train), streams, checkpointer, metrics,
                       state=loop.TrainState(epoch_batches=epoch_batches))
    return w, seen, checkpointer.saved, metrics.reported


def test_steps_reports_checkpoints_and_epochs():
    w, seen, saved, reported = _worker(["train.max_steps=10", "train.log_every=3",
                                                     "train.checkpoint_every=4", "train.preemption_check_every=100"], 6)
    w.run()
    w.finish()
    assert w.state.step == 10 and w.state.epoch == 1 and w.state.epoch_batches == 4
    assert seen == list(range(6)) + list(range(4))
    assert saved == [4, 8, 10]                      # the last step's checkpoint is not taken twice
    assert w.checkpointer.prepared == [0]           # once, at the first step, before any save
    waits = [(step, m["checkpoint_copy_wait_s"]) for step, m in w.metrics.logged if "checkpoint_copy_wait_s" in m]
    assert waits == [(5, 0.25), (9, 0.25)]          # each commit logs its own save's wait, not the total
    assert reported == [3, 6, 9]                    # log-only steps report without a checkpoint
    # the window since the last report (step 9): the one batch of step 10, i = 3
    assert w.last_metrics["step"] == 10 and w.last_metrics["loss"] == pytest.approx(3.0)


def test_gradient_accumulation_counts_optimizer_steps():
    w, seen, saved, _ = _worker(["train.max_steps=3", "train.log_every=1", "train.checkpoint_every=2",
                                              "train.preemption_check_every=100"], 10, accum=2)
    w.run()
    assert w.state.step == 3 and len(seen) == 6 and saved == [2, 3]
    assert w.state.samples == 3 * 2 * w.batch_size


def test_resume_skips_the_epochs_batches_already_trained():
    w, seen, _, _ = _worker(["train.max_steps=3", "train.checkpoint_every=100",
                                          "train.preemption_check_every=100"], 5, epoch_batches=2)
    w.run()
    assert seen == [2, 3, 4] and w.state.epoch_batches == 5


def test_a_preemption_signal_takes_one_checkpoint():
    w, _, saved, _ = _worker(["train.max_steps=6", "train.checkpoint_every=100", "train.log_every=100",
                                           "train.preemption_check_every=2"], 10, preempt_at=2)
    w.run()
    assert w.checkpointer.preemption.asked == [True, True] and saved == [4, 6]   # asked at 2 and 4; signalled at 4; 6 is the last


def test_an_empty_dataset_is_an_error():
    w, _, _, _ = _worker(["train.max_steps=3"], 0)
    with pytest.raises(RuntimeError, match="yielded no batch"):
        w.run()
