"""The sweep YAML: validation before anything starts, overrides, Tune search space."""
from pathlib import Path

import pytest
import yaml

from orchestrator.config import ConfigError, load_config
from orchestrator.sweep.spec import load_sweep, yaml_scalar
from orchestrator.sweep.trial import trial_index, trial_run_name

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "workloads" / "configs"


def _ok(write_sweep, **kw):
    spec = {"search": {"train.lr": {"loguniform": [1e-5, 1e-3]}, "train.batch_size_per_worker": {"grid": [4, 8]}},
            "metric": "eval/t2v_r1", "mode": "max"}
    spec.update(kw)
    return write_sweep(spec.pop("name", "s"), **spec)


def test_valid_sweep_loads_and_counts_grid(write_sweep):
    sw = load_sweep(_ok(write_sweep, num_samples=3), ["train.max_steps=7", "num_samples=2"])
    assert sw.spec.num_samples == 2 and sw.spec.num_trials() == 4
    assert "train.max_steps=7" in sw.run_overrides          # a run key goes to every trial
    cfg = sw.run_config({"train.lr": 3e-05, "train.batch_size_per_worker": 8}, name="s-t000")
    assert cfg.train.lr == 3e-05 and cfg.train.max_steps == 7 and cfg.name == "s-t000"
    assert sw.spec.eval_metric == "t2v_r1"


@pytest.mark.parametrize("value", [3e-05, 1e-4, 0.5, 7, True, "mrpc", [1, 2]])
def test_override_values_round_trip(value):
    from orchestrator.config import parse_override

    assert parse_override(f"k={yaml_scalar(value)}")[1] == value


@pytest.mark.parametrize("search, needle", [
    ({"train.lrr": {"grid": [1e-4]}}, "train.lrr"),                        # unknown key
    ({"train.lr": {"grid": [-1.0]}}, "train.lr=-1.0"),                     # invalid value
    ({"train.batch_size_per_worker": {"grid": [0, 8]}}, "batch_size_per_worker=0"),
    ({"train.lr": {"loguniform": [0.0, 1e-3]}}, "bounds must be positive"),
    ({"train.lr": {"grid": [1e-4], "choice": [1e-4]}}, "exactly one"),
    ({"task.nope": {"grid": [1]}}, "task"),                                 # the workload schema rejects it
    ({}, "search space is empty"),
])
def test_bad_search_space_fails_before_ray(write_sweep, search, needle):
    with pytest.raises(ConfigError) as e:
        load_sweep(write_sweep("bad", search=search, metric="eval/t2v_r1", mode="max"))
    assert needle in str(e.value)


def test_unknown_sweep_key_and_bad_name(write_sweep):
    with pytest.raises(ConfigError, match="accepted keys"):
        load_sweep(_ok(write_sweep, trials=3))
    with pytest.raises(ConfigError, match="storage paths"):
        load_sweep(_ok(write_sweep, name="a/b"))


def test_trial_names_are_deterministic():
    assert trial_index("3f2a1_00003") == 3
    assert trial_run_name("glue-sst2", "ab12c_00012") == "glue-sst2-t012"
    with pytest.raises(ValueError):
        trial_index("weird")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("sweep_*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_validate(path):
    sw = load_sweep(path)
    assert sw.spec.num_trials() >= 1
    base = load_config(sw.base_path, sw.run_overrides)
    assert base.workload in ("glue", "retrieval")
    assert yaml.safe_load(path.read_text())["metric"].startswith("eval/")


def test_epochs_become_max_steps(write_sweep):
    sw = load_sweep(write_sweep("ep", search={"epochs": {"grid": [5, 10]}, "train.batch_size_per_worker": {"grid": [4, 8]}},
                                metric="eval/t2v_r1", mode="max", train_examples=100, overrides=["train.num_workers=2"]))
    assert sw.spec.num_trials() == 4
    assert sw.run_config({"epochs": 5, "train.batch_size_per_worker": 4}).train.max_steps == 63   # ceil(500 / 8)
    assert sw.run_config({"epochs": 10, "train.batch_size_per_worker": 8}).train.max_steps == 63
    with pytest.raises(ConfigError, match="train_examples"):
        load_sweep(write_sweep("ep2", search={"epochs": {"grid": [5]}}, metric="eval/t2v_r1", mode="max"))


def test_asha_on_a_dev_metric_needs_validation_during_training(write_sweep):
    sched = {"type": "asha", "metric": "eval/t2v_r1", "mode": "max", "grace_period": 2}
    with pytest.raises(ConfigError, match="eval.every_steps"):
        load_sweep(_ok(write_sweep, scheduler=sched))
    sw = load_sweep(_ok(write_sweep, scheduler=sched, overrides=["eval.every_steps=2"]))
    assert sw.spec.scheduler.metric == "eval/t2v_r1" and sw.run_config().eval.every_steps == 2


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("sweep_glue_*.yaml")) + sorted(CONFIGS.glob("sweep_retrieval_*.yaml")))
def test_shipped_glue_and_retrieval_sweeps_cut_on_a_dev_metric(path):
    sw = load_sweep(path)
    assert sw.spec.scheduler is not None and sw.spec.scheduler.metric.startswith("eval/"), path.name
    assert sw.run_config().eval.every_steps >= 1


def test_trial_dev_score_is_the_end_of_training_validation():
    from orchestrator.sweep.trial import dev_metrics

    assert dev_metrics({"loss": 0.3, "eval/accuracy": 75.0, "eval/items": 8, "step": 4}) == {"accuracy": 75.0,
                                                                                             "items": 8.0}
