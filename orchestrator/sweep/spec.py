"""The sweep YAML: a base run config, a search space, the metric to optimise and how to run trials.

```yaml
name: retrieval-tiny-lr             # the sweep: MLflow parent run name, <storage>/sweeps/<name>
base: retrieval_tiny.yaml           # a run config, relative to this file
overrides: [train.max_steps=50]     # dotted overrides of the base, applied to every trial
search:                             # dotted RunConfig key -> exactly one of grid / choice / loguniform / uniform
  train.lr: {loguniform: [1.0e-5, 1.0e-3]}
  train.batch_size_per_worker: {grid: [32, 64, 128]}
metric: eval/t2v_r1                 # a dev metric of the workload's evaluation, after each trial's training
mode: max
num_samples: 1                      # repeats of the grid (random dimensions sampled each time)
max_concurrent_trials: null         # null = as many as the cluster's resources hold
scheduler: {type: asha, metric: loss, mode: min, grace_period: 10, reduction_factor: 2}
```

Every candidate value is validated against the run config schema (``load_config``) before Ray starts.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from orchestrator.config import (
    ConfigError,
    RunConfig,
    load_config,
    parse_override,
    read_yaml_mapping,
)
from orchestrator.storage import check_segment

EPOCHS = "epochs"  # the one searched key that is not a run config key (needs train_examples)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamSpace(_Section):
    """One searched key: exactly one of ``grid`` (every value, crossed with the other grids),
    ``choice`` (one value sampled per trial), ``loguniform`` / ``uniform`` ([low, high])."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "ParamSpace":
        given = [k for k in ("grid", "choice", "loguniform", "uniform") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, loguniform, uniform (got {given or 'none'})")
        for k in ("grid", "choice"):
            if getattr(self, k) is not None and not getattr(self, k):
                raise ValueError(f"{k} needs at least one value")
        for k in ("loguniform", "uniform"):
            lo_hi = getattr(self, k)
            if lo_hi is not None:
                lo, hi = lo_hi
                if not lo < hi:
                    raise ValueError(f"{k} [{lo}, {hi}]: low must be below high")
                if k == "loguniform" and lo <= 0:
                    raise ValueError(f"loguniform [{lo}, {hi}]: bounds must be positive")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("grid", "choice", "loguniform", "uniform") if getattr(self, k) is not None)

    def candidates(self) -> list[Any]:
        """Values that stand for the whole range when validating (every listed value, or the bounds)."""
        return list(getattr(self, self.kind))

    def to_tune(self):
        from ray import tune

        kind, v = self.kind, getattr(self, self.kind)
        return {"grid": tune.grid_search, "choice": tune.choice}[kind](list(v)) if kind in ("grid", "choice") \
            else {"loguniform": tune.loguniform, "uniform": tune.uniform}[kind](*v)

    def describe(self) -> str:
        return f"{self.kind}{json.dumps(list(getattr(self, self.kind)))}"


class SchedulerSpec(_Section):
    """Asynchronous successive halving: a trial whose intermediate ``metric`` at a rung is not in
    the best 1/reduction_factor of the trials seen there is stopped.  Intermediate results are the
    training reports (every ``train.log_every`` steps) and the validations (every
    ``eval.every_steps`` steps, on the trial's workers), so ``metric`` is a training metric
    (``loss`` by default; any key the loop reports: ``lr``, per-workload losses) or a dev metric
    ``eval/<name>`` (e.g. ``eval/accuracy``, ``eval/t2v_r1``; needs ``eval.every_steps`` > 0, and a
    rung is judged on the latest validation at or after it); ``time_attr`` is the optimizer ``step``."""

    type: Literal["asha"] = "asha"
    metric: str = "loss"
    mode: Literal["min", "max"] = "min"
    time_attr: Literal["step", "training_iteration"] = "step"
    grace_period: int = Field(1, ge=1, description="steps every trial runs before it can be stopped")
    reduction_factor: float = Field(2.0, gt=1)
    max_t: int | None = Field(None, ge=1, description="default: the base config's train.max_steps")


class SweepSpec(_Section):
    name: str = Field(..., description="the sweep's name: MLflow parent run, <storage>/sweeps/<name>")
    base: str = Field(..., description="run config YAML, relative to the sweep file")
    overrides: list[str] = Field(default_factory=list, description="dotted overrides applied to every trial")
    search: dict[str, ParamSpace]
    metric: str = Field(..., description="dev metric computed after each trial, e.g. eval/accuracy")
    mode: Literal["min", "max"]
    num_samples: int = Field(1, ge=1, description="repeats of the grid; random dimensions are sampled each time")
    max_concurrent_trials: int | None = Field(None, ge=1, description="null = what the cluster's resources hold")
    max_failures: int = Field(1, ge=0, description="retries of a failed trial")
    scheduler: SchedulerSpec | None = None
    storage: str | None = Field(None, description="default: the base run config's storage")
    init_from: str | None = Field(None, description="every trial starts from this checkpoint URI or mlflow:<run id>")
    eval_split: str = "val"
    trial_cpus: float = Field(1.0, ge=0, description="CPUs of each trial's driver (its evaluation runs there)")
    train_examples: int | None = Field(None, ge=1, description="training set size; lets the search space hold "
                                       "'epochs', turned into train.max_steps with each trial's batch size")

    @field_validator("name")
    @classmethod
    def _path_safe(cls, v: str) -> str:
        return check_segment(v, "a sweep name")

    @field_validator("search")
    @classmethod
    def _not_empty(cls, v: dict[str, ParamSpace]) -> dict[str, ParamSpace]:
        if not v:
            raise ValueError("the search space is empty: give at least one key, e.g. train.lr: {grid: [3e-5, 5e-5]}")
        return v

    @property
    def eval_metric(self) -> str:
        """The key in the workload's evaluation output (``eval/t2v_r1`` -> ``t2v_r1``)."""
        return self.metric.removeprefix("eval/")

    def num_trials(self) -> int:
        grid = math.prod(len(p.grid) for p in self.search.values() if p.grid is not None)
        return grid * self.num_samples

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def yaml_scalar(value: Any) -> str:
    """A value as the right-hand side of a ``key=value`` override that parses back to itself
    (PyYAML reads ``3e-05`` as a string; its own dump writes ``3.0e-05``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()


def assignment_overrides(assignment: dict[str, Any]) -> list[str]:
    return [f"{k}={yaml_scalar(v)}" for k, v in assignment.items()]


class LoadedSweep:
    """A validated sweep: the spec, its base config path and the overrides every trial gets."""

    def __init__(self, spec: SweepSpec, base_path: Path, run_overrides: list[str], source: str):
        self.spec, self.base_path, self.run_overrides, self.source = spec, base_path, run_overrides, source

    def run_config(self, assignment: dict[str, Any] | None = None, name: str | None = None) -> RunConfig:
        """The run config of one trial.  ``epochs`` (when searched) becomes ``train.max_steps``:
        ceil(epochs * train_examples / (batch_size_per_worker * num_workers * grad_accum_steps))."""
        assignment = dict(assignment or {})
        epochs = assignment.pop(EPOCHS, None)
        extra = assignment_overrides(assignment) + ([f"name={name}"] if name else [])
        cfg = load_config(self.base_path, self.run_overrides + extra)
        if epochs is None:
            return cfg
        t = cfg.train
        steps = math.ceil(float(epochs) * self.spec.train_examples
                          / (t.batch_size_per_worker * t.num_workers * t.grad_accum_steps))
        return load_config(self.base_path, self.run_overrides + extra + [f"train.max_steps={max(1, steps)}"])


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedSweep:
    """Read + validate a sweep YAML.  ``overrides``: ``key=value``; a key of the sweep spec
    (``num_samples=2``, ``storage=s3://b/p``, ``scheduler.grace_period=5``) sets it, any other key
    (``train.max_steps=10``) is a run-config override for every trial."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep", "sweep keys (name, base, search, metric, mode ...)")
    extra_run: list[str] = []
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] in SweepSpec.model_fields:
            cur = raw
            for p in parts[:-1]:
                cur = cur.setdefault(p, {})
            cur[parts[-1]] = value
        else:
            extra_run.append(text)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, x['loc']))} = {x.get('input')!r}: {x['msg']}" for x in e.errors()]
        raise ConfigError(f"invalid sweep {path}:\n" + "\n".join(lines)
                          + f"\n  accepted keys: {', '.join(SweepSpec.model_fields)}") from None
    base_path = (path.parent / spec.base).resolve()
    run_overrides = list(spec.overrides) + extra_run
    if spec.storage:
        run_overrides.append(f"storage={spec.storage}")
    loaded = LoadedSweep(spec, base_path, run_overrides, str(path))
    validate_search_space(loaded)
    return loaded


def validate_search_space(sweep: LoadedSweep) -> RunConfig:
    """Every candidate value of every searched key, and the first full combination, must make a
    valid run config; a mistake is reported here, before any trial starts.  Returns the base config."""
    try:
        base = sweep.run_config()
    except ConfigError as e:
        raise ConfigError(f"sweep {sweep.source}: the base config {sweep.base_path} does not load:\n{e}") from None
    known = set(_flat_keys(base.to_dict()))
    for key, space in sweep.spec.search.items():
        if key == EPOCHS:
            if sweep.spec.train_examples is None:
                raise ConfigError(f"sweep {sweep.source}: searching 'epochs' needs train_examples (the training "
                                  "set size) to turn epochs into train.max_steps; or search train.max_steps")
        elif key not in known and not _under_free_mapping(key):
            raise ConfigError(f"sweep {sweep.source}: searched key '{key}' is not a run config key "
                              f"(e.g. train.lr, train.batch_size_per_worker, data.num_frames, task.<option>)")
        for value in space.candidates():
            try:
                sweep.run_config({key: value})
            except ConfigError as e:
                raise ConfigError(f"sweep {sweep.source}: search value {key}={value!r} is invalid:\n{e}") from None
    first = {k: s.candidates()[0] for k, s in sweep.spec.search.items()}
    try:
        sweep.run_config(first)
    except ConfigError as e:
        raise ConfigError(f"sweep {sweep.source}: the combination {first} is invalid:\n{e}") from None
    sched = sweep.spec.scheduler
    if sched is not None and sched.metric.startswith("eval/") and base.eval.every_steps < 1:
        raise ConfigError(f"sweep {sweep.source}: scheduler.metric {sched.metric} is a dev metric, but the base "
                          "config validates only at the end of training (eval.every_steps=0): ASHA would have "
                          "nothing to cut on. Add an override eval.every_steps=<steps> (at most grace_period)")
    if sweep.spec.scheduler is not None and sweep.spec.scheduler.max_t is None:
        sweep.spec.scheduler.max_t = max(sweep.run_config(dict(zip(sweep.spec.search, combo))).train.max_steps
                                         for combo in itertools.product(*(s.candidates() for s in sweep.spec.search.values())))
    return base


def _flat_keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, dict):
            out.extend(_flat_keys(v, f"{prefix}{k}."))
    return out


def _under_free_mapping(key: str) -> bool:
    """task.* and model.overrides.* are open mappings validated by the workload / model config."""
    return key.startswith("task.") or key.startswith("model.overrides.")

