"""The contract between the train loop, the data plane and a workload.

Batch (a plain dict of tensors, produced by ``orchestrator.data``; absent keys are simply absent):

=================  ===========================  =================================================
key                dtype / shape                meaning
=================  ===========================  =================================================
``frames``         uint8 ``[B, T, H, W, 3]``    decoded frames (T = 1 for images); normalised on
                                                the worker with ``model.preprocess``
``text_ids``       int64 ``[B, L]``             the text: caption / title / question / sentence(s)
``text_mask``      int64 ``[B, L]``             1 for real tokens
``text_type_ids``  int64 ``[B, L]``             segment ids for sentence pairs (GLUE)
``answer_ids``     int64 ``[B, La]``            generation target (answer, caption)
``answer_mask``    int64 ``[B, La]``
``label``          int64 ``[B]``                class id (classification, GLUE)
``clip_index``     int64 ``[B]``                which clip a row shows (retrieval: several
                                                captions can share one clip)
``epoch_progress`` Python float                optimizer steps so far / ``train.steps_per_epoch``;
                                                set by the train loop on training batches when
                                                that is configured (absent otherwise)
=================  ===========================  =================================================

A workload is a module (``workloads/<name>.py``, or any importable module named by ``workload:``)
that defines the hooks of :class:`Workload`: each is declared there once, with its default when it
is optional.  :func:`load_workload` imports the module, checks it and returns a :class:`Workload`
holding every hook, so the orchestrator calls hooks and never probes a module for them.  The check
raises :class:`WorkloadError` naming a required hook that is missing, a hook of the wrong kind, or
a module attribute that looks like a misspelt hook (``batch_constant`` for ``batch_constants``).

The orchestrator only knows this interface, never the model's insides.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
from typing import Any, Callable

from pydantic import BaseModel

from workloads import get_workload

BATCH_KEYS = ("frames", "text_ids", "text_mask", "text_type_ids", "answer_ids", "answer_mask", "label", "clip_index")
EVAL_KINDS = ("retrieval",)  # EVAL_KIND values that choose a sharded evaluation of their own


class WorkloadError(TypeError):
    """A workload module that does not follow the contract (workloads/base.py); the message names
    the hook and how to fix it."""


def _str(v: Any) -> bool:
    return isinstance(v, str) and bool(v)


def _columns(v: Any) -> bool:
    return isinstance(v, (tuple, list)) and bool(v) and all(c in BATCH_KEYS for c in v)


def _schema(v: Any) -> bool:
    return isinstance(v, type) and issubclass(v, BaseModel)


def _function(v: Any) -> bool:
    return callable(v)


def _optional_function(v: Any) -> bool:
    return v is None or callable(v)


def _eval_kind(v: Any) -> bool:
    return v is None or v in EVAL_KINDS


def _flag(v: Any) -> bool:
    return isinstance(v, bool)


_REQUIRED = dataclasses.MISSING


def hook(what: str, check: Callable[[Any], bool], default: Any = _REQUIRED) -> Any:
    """One hook of the contract: what it is (``what``, shown in errors), how it is checked, and its
    default (none: the hook is required)."""
    return dataclasses.field(default=default, metadata={"what": what, "check": check})


@dataclasses.dataclass(frozen=True)
class Workload:
    """A checked workload module: every hook, the optional ones at their defaults."""

    name: str  # as the run config names it (``workload:``)
    TASK: str = hook("TASK: str, the model's task key (paper Table 2 module selection)", _str)
    COLUMNS: tuple[str, ...] = hook(f"COLUMNS: tuple of the batch keys it needs, among {', '.join(BATCH_KEYS)}",
                                    _columns)
    Config: type[BaseModel] = hook("class Config(pydantic.BaseModel): the schema of the run config's task: section",
                                   _schema)
    build_model: Callable = hook("def build_model(model_cfg, task_cfg, vision_pretrained=None, text_pretrained=None) "
                                 "-> torch.nn.Module", _function)
    loss: Callable = hook('def loss(model, batch, task_cfg) -> dict of named tensors, the total under "loss"',
                          _function)
    evaluate: Callable | None = hook(
        "def evaluate(model, batches, task_cfg, tokenizer=None) -> metrics, or (metrics, predictions); "
        "None: the workload has no evaluation (no validation during training)", _optional_function, None)
    predict: Callable | None = hook(
        "def predict(model, batches, task_cfg, tokenizer=None) -> list of records: with metrics_from, each "
        "worker predicts its shard and the records are gathered", _optional_function, None)
    metrics_from: Callable | None = hook(
        "def metrics_from(records, task_cfg, tokenizer=None) -> metrics, or (metrics, predictions): the "
        "metrics of predict's gathered records", _optional_function, None)
    EVAL_KIND: str | None = hook(f"EVAL_KIND: one of {', '.join(EVAL_KINDS)} (its own sharded evaluation), or None",
                                 _eval_kind, None)
    retrieval_options: Callable | None = hook(
        'def retrieval_options(task_cfg) -> {"k_test": int, "rerank": bool}: needed by EVAL_KIND = "retrieval"',
        _optional_function, None)
    batch_constants: Callable | None = hook(
        "def batch_constants(tokenizer, task_cfg) -> dict of tensors added to every batch on the worker, "
        "computed once (e.g. the tokenised instruction prompt)", _optional_function, None)
    USES_MODEL_CONFIG: bool = hook(
        "USES_MODEL_CONFIG: bool; False: build_model gets model_cfg=None (the workload builds a model of its "
        "own, without the run's model config or tokenizer)", _flag, True)

    @classmethod
    def hooks(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.name != "name"]

    @classmethod
    def from_module(cls, name: str, module: types.ModuleType) -> "Workload":
        """The hooks of ``module``, checked: a missing required hook, a hook of the wrong kind and an
        attribute that looks like a misspelt hook raise :class:`WorkloadError` naming them."""
        where = f"workload {name!r} (module {module.__name__})"
        hooks = cls.hooks()
        names = [f.name for f in hooks]
        _check_spelling(module, names, where)
        found = {}
        for f in hooks:
            if not hasattr(module, f.name):
                if f.default is _REQUIRED:
                    raise WorkloadError(f"{where} has no {f.name}, a required hook: define {f.metadata['what']} "
                                        "(see workloads/base.py)")
                continue
            value = getattr(module, f.name)
            if not f.metadata["check"](value):
                raise WorkloadError(f"{where}: {f.name} = {value!r} is not what the hook takes: "
                                    f"{f.metadata['what']}")
            found[f.name] = tuple(value) if f.name == "COLUMNS" else value
        spec = cls(name=name, **found)
        spec._check_pairs(where)
        return spec

    def _check_pairs(self, where: str) -> None:
        if (self.predict is None) != (self.metrics_from is None):
            have, lack = ("predict", "metrics_from") if self.predict is not None else ("metrics_from", "predict")
            raise WorkloadError(f"{where} defines {have} but not {lack}: the two come together (see workloads/base.py)")
        if self.EVAL_KIND == "retrieval" and self.retrieval_options is None:
            raise WorkloadError(f'{where}: EVAL_KIND = "retrieval" needs the retrieval_options hook: '
                                f"{type(self).__dataclass_fields__['retrieval_options'].metadata['what']}")

    @property
    def evaluation(self) -> str | None:
        """How the workload is evaluated on the workers: ``"retrieval"`` (EVAL_KIND: embeddings and
        re-scoring sharded), ``"records"`` (predict + metrics_from: each worker predicts its shard),
        ``"rows"`` (evaluate alone: the rows gathered on rank 0), or None (no evaluation)."""
        if self.EVAL_KIND is not None:
            return self.EVAL_KIND
        if self.predict is not None:
            return "records"
        return "rows" if self.evaluate is not None else None


def _check_spelling(module: types.ModuleType, hooks: list[str], where: str) -> None:
    """An attribute of the module whose name is close to a hook's, but not one, is taken for a
    misspelt hook: it would otherwise be ignored and the hook's default used in silence."""
    lowered = {h.lower(): h for h in hooks}
    for attr, value in vars(module).items():
        if attr.startswith("_") or attr in hooks or isinstance(value, types.ModuleType):
            continue
        if inspect.isclass(value) and value.__module__ != module.__name__:
            continue  # an imported class (BaseModel, Iterable ...) names no hook
        near = difflib.get_close_matches(attr.lower(), list(lowered), n=1, cutoff=0.8)
        if near:
            raise WorkloadError(f"{where} defines {attr}, which looks like the hook {lowered[near[0]]} misspelt; "
                                f"rename it to {lowered[near[0]]} (or give it a name that is not close to a hook's)")


def load_workload(name: str) -> Workload:
    """The checked workload ``name`` (``workloads.<name>`` or a dotted module path): KeyError if
    unknown, ImportError if its module does not import, :class:`WorkloadError` if it does not
    follow the contract."""
    return Workload.from_module(name, get_workload(name))

