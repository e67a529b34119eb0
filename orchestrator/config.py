"""One configuration system for every run: typed sections, YAML files, dotted CLI overrides.

Order of precedence: schema defaults < YAML file (and the files it ``inherit``s) < ``key=value``
overrides from the command line.  The result is validated once, before any cluster resource is
used; a bad key or value raises :class:`ConfigError` naming the key, the value, where it came
from and what would be accepted.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from orchestrator import storage
from orchestrator.data.config import DataConfig
from orchestrator.errors import ConfigError
from orchestrator.mappings import deep_merge, dotted_keys, set_dotted
from orchestrator.names import check_segment
from orchestrator.tracking.config import TrackingConfig
from orchestrator.tracking.redact import redact
from orchestrator.train.config import TrainConfig
from workloads.base import WorkloadError, load_workload

WORKLOADS = ("pretrain", "retrieval", "videoqa", "captioning", "classification", "glue")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    """Which mPLUG-2 to build and where its starting weights come from."""

    preset: Literal["tiny", "base", "large"] = "tiny"
    # Hugging Face checkpoints (a local directory or a hub name); None = random init.
    vision_pretrained: str | None = None
    text_pretrained: str | None = None
    # Field-level overrides of model.config.MPlugConfig (e.g. {"num_fusion_layers": 2}).
    overrides: dict[str, Any] = Field(default_factory=dict)
    activation_checkpointing: bool = False


class EvalConfig(Section):
    batch_size: int = Field(16, ge=1)
    every_steps: int = Field(0, ge=0, description="0 = only at the end of training")
    max_samples: int | None = Field(None, ge=1)


class RunSpec(Section):
    """One run's whole configuration (defaults < YAML < overrides), composed of the components'
    configs.  Named apart from ``ray.train.RunConfig``, which the driver also builds."""

    workload: str = Field("pretrain", description=f"one of {', '.join(WORKLOADS)}, or a dotted module path")
    name: str | None = Field(None, description="run name; rerunning a name resumes it")
    experiment: str | None = Field(None, description="MLflow experiment; default: the workload family")
    storage: str = Field("./demo_output/store", description="URI under which checkpoints are written")
    seed: int = 0
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    # Workload-specific options, validated by the workload's own schema (workloads.<name>.Config).
    task: dict[str, Any] = Field(default_factory=dict)

    @field_validator("workload")
    @classmethod
    def _known_workload(cls, v: str) -> str:
        if v in WORKLOADS or ("." in v and all(p.isidentifier() for p in v.split("."))):
            return v
        raise ValueError(f"unknown workload; accepted: {', '.join(WORKLOADS)}, or a dotted module path "
                         "to your own workload module (e.g. mypkg.my_workload)")

    @field_validator("name", "experiment")
    @classmethod
    def _path_safe(cls, v: str | None, info) -> str | None:
        """Both name a folder: ``<storage>/<experiment>/<name>/`` (``name=..`` or ``experiment=../x``
        would leave the storage root)."""
        if v is None:
            return v

        return check_segment(v, "a run name" if info.field_name == "name" else "an experiment name")

    @model_validator(mode="after")
    def _groups_fill_batches(self) -> "RunSpec":
        if self.data.group_pattern and self.train.batch_size_per_worker % self.data.group_size:
            raise ValueError(f"data.group_size={self.data.group_size} must divide train.batch_size_per_worker="
                             f"{self.train.batch_size_per_worker}: each batch holds whole groups (data.group_pattern)")
        return self

    def experiment_name(self) -> str:
        return self.experiment or f"mplug2-{self.workload}"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """The resolved config as YAML for people and logs (the ``config`` verb, ``--print-config``, a
        sweep's ``best.yaml``): secret-named keys and secret-shaped values (URI passwords, tokens)
        masked by the redactor, like everything else that leaves a process."""
        return yaml.safe_dump(redact(self.to_dict()), sort_keys=False, allow_unicode=True)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def read_yaml_mapping(path: Path, what: str, expected: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping, or a ConfigError naming the file and the problem."""
    if not path.is_file():
        raise ConfigError(f"{what} file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of {expected}, got {type(data).__name__}")
    return data


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file; ``inherit: other.yaml`` (relative to the file) is merged underneath."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'inherit' cycle through {' -> '.join(map(str, seen))}")
    data = read_yaml_mapping(path, "config", "sections")
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip() or "\0" in parent:
        raise ConfigError(f"{path}: 'inherit' must name one YAML file (a relative or absolute path), got {parent!r}")
    base = _read_yaml(path.parent / parent, seen + (path,))
    return deep_merge(base, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=5e-5`` -> (["train", "lr"], 5e-05).  Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value (e.g. train.lr=5e-5)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key segment in {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def _known_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names accepted at ``loc`` (for 'did you mean' hints)."""
    cls: Any = model
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = field.annotation
    return list(getattr(cls, "model_fields", {}).keys())


def _format_errors(err: ValidationError, sources: dict[str, str]) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc)
        src = sources.get(key) or next(
            (s for k, s in sources.items() if key.startswith(k + ".")), sources.get("", "defaults")
        )
        if not loc:  # a check across sections (a model validator): its message names the keys
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        elif e["type"] == "extra_forbidden":
            known = _known_keys(RunSpec, loc)
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            accepted = f"; did you mean '{hint[0]}'?" if hint else ""
            lines.append(f"  unknown key '{key}' (from {src}){accepted} accepted here: {', '.join(known)}")
        else:
            lines.append(f"  {key} = {e.get('input')!r} (from {src}): {e['msg']}")
    return "invalid configuration:\n" + "\n".join(lines)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunSpec:
    """Defaults < YAML < overrides, validated.  Raises ConfigError with a fixable message."""
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {"": "defaults"}
    if path is not None:
        raw = _read_yaml(Path(path))
        for k in dotted_keys(raw, opaque=("task",)):
            sources[k] = str(path)
    for text in overrides:
        parts, value = parse_override(text)
        set_dotted(raw, parts, value)
        sources[".".join(parts)] = f"command line '{text}'"
    try:
        cfg = RunSpec.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, sources)) from None
    _validate_task_section(cfg, sources)
    return cfg


def check_inputs(cfg: RunSpec) -> None:
    """What a run reads must exist before anything starts: ``data.root`` (a local folder, or an
    ``s3://`` prefix holding at least one object).  A ConfigError naming the setting otherwise."""
    root = cfg.data.root
    fix = (f"set data.root to the folder or s3:// prefix of your dataset (python -m orchestrator synth --out "
           f"{root} writes the synthetic one there)")
    if storage.is_s3(root):
        try:
            found = next(iter(storage.list_files(root)), None)
        except Exception as e:  # NoSuchBucket, AccessDenied ...: said with the setting
            raise ConfigError(f"data.root = {root!r}: cannot be listed ({type(e).__name__}: {str(e)[:200]}); "
                              f"{fix}") from None
        if found is None:
            raise ConfigError(f"data.root = {root!r}: nothing under this prefix; {fix}")
        return
    if not os.path.isdir(storage.local_path(root)):
        raise ConfigError(f"data.root = {root!r}: no such folder; {fix}")


def _validate_task_section(cfg: RunSpec, sources: dict[str, str] | None = None) -> None:
    """The workload is loaded and checked against its contract (workloads/base.py), and its
    ``Config`` validates the ``task`` mapping.  A workload module that cannot be imported (a typo in
    a dotted path, its own missing dependency) or that does not follow the contract is a
    ConfigError naming ``workload``, not an import traceback."""
    where = (sources or {}).get("workload", "the config")
    try:
        workload = load_workload(cfg.workload)
    except KeyError:
        return
    except WorkloadError as e:
        raise ConfigError(f"workload = {cfg.workload!r} (from {where}): {e}") from None
    except ImportError as e:
        missing = getattr(e, "name", None)
        if missing and (cfg.workload == missing or cfg.workload.startswith(missing + ".")):
            near = difflib.get_close_matches(cfg.workload, [*WORKLOADS, *(f"workloads.{w}" for w in WORKLOADS)], n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ConfigError(f"workload = {cfg.workload!r} (from {where}): no module named {missing!r}{hint}; "
                              f"accepted: {', '.join(WORKLOADS)}, or the dotted path of an importable module "
                              "following workloads/base.py") from None
        raise ConfigError(f"workload = {cfg.workload!r} (from {where}): its module failed to import "
                          f"({type(e).__name__}: {e}); install what it needs or fix the module") from None
    try:
        workload.Config.model_validate(cfg.task)
    except ValidationError as e:
        lines = [
            f"  task.{'.'.join(map(str, x['loc']))} = {x.get('input')!r}: {x['msg']}" for x in e.errors()
        ]
        raise ConfigError(f"invalid 'task' section for workload '{cfg.workload}':\n" + "\n".join(lines)) from None
