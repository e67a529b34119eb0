"""The workload contract (workloads/base.py): every hook declared once with its default, checked
when the workload is loaded; an error names a missing or misspelt hook; the orchestrator calls
hooks and never probes a module for them."""
from __future__ import annotations

import ast
import types
from pathlib import Path

import pytest
from pydantic import BaseModel

from workloads import NAMES
from workloads.base import Workload, WorkloadError, load_workload

REPO = Path(__file__).resolve().parents[2]
TEST_WORKLOADS = ("tests.train.toy_workload", "tests.reliability.slow_toy", "tests.reliability.trace_clips",
                  "tests.tracking.leaky_workload")


def _module(**attrs) -> types.ModuleType:
    class Config(BaseModel):
        pass

    m = types.ModuleType("mypkg.my_workload")
    base = {"TASK": "toy", "COLUMNS": ("frames", "label"), "Config": Config,
            "build_model": lambda model_cfg, task_cfg, **_: None, "loss": lambda model, batch, task_cfg: {}}
    Config.__module__ = m.__name__
    for k, v in {**base, **attrs}.items():
        if v is not None:
            setattr(m, k, v)
    return m


@pytest.mark.parametrize("name", [*NAMES, *TEST_WORKLOADS])
def test_every_workload_of_the_project_follows_the_contract(name):
    w = load_workload(name)
    assert w.name == name and w.COLUMNS and issubclass(w.Config, BaseModel) and w.evaluation is not None


def test_each_hook_is_declared_once_with_its_default():
    hooks = {f.name: f for f in Workload.hooks()}
    assert set(hooks) == {"TASK", "COLUMNS", "Config", "build_model", "loss", "evaluate", "predict", "metrics_from",
                          "EVAL_KIND", "retrieval_options", "batch_constants", "USES_MODEL_CONFIG"}
    w = Workload.from_module("mine", _module())
    assert (w.evaluate, w.predict, w.metrics_from, w.EVAL_KIND, w.retrieval_options, w.batch_constants) == (None,) * 6
    assert w.USES_MODEL_CONFIG is True and w.evaluation is None
    assert load_workload("tests.train.toy_workload").USES_MODEL_CONFIG is False
    assert load_workload("pretrain").evaluation == "retrieval" and load_workload("glue").evaluation == "records"
    assert load_workload("tests.train.toy_workload").evaluation == "rows"


@pytest.mark.parametrize("hook", ["TASK", "COLUMNS", "Config", "build_model", "loss"])
def test_a_missing_required_hook_is_named(hook):
    with pytest.raises(WorkloadError, match=rf"workload 'mine' \(module mypkg.my_workload\) has no {hook}, a required "
                                            "hook"):
        Workload.from_module("mine", _module(**{hook: None}))


@pytest.mark.parametrize("attr,hook", [("batch_constant", "batch_constants"), ("Columns", "COLUMNS"),
                                       ("evaluat", "evaluate"), ("uses_model_config", "USES_MODEL_CONFIG"),
                                       ("metric_from", "metrics_from"), ("retrieval_option", "retrieval_options")])
def test_a_misspelt_hook_is_named_with_the_hook_it_resembles(attr, hook):
    with pytest.raises(WorkloadError, match=rf"defines {attr}, which looks like the hook {hook} misspelt"):
        Workload.from_module("mine", _module(**{attr: lambda *a: {}}))


def test_hooks_of_the_wrong_kind_and_pairs_that_belong_together():
    with pytest.raises(WorkloadError, match="COLUMNS = .*among frames"):
        Workload.from_module("mine", _module(COLUMNS=("frames", "pixels")))
    with pytest.raises(WorkloadError, match="EVAL_KIND = 'ranking'"):
        Workload.from_module("mine", _module(EVAL_KIND="ranking"))
    with pytest.raises(WorkloadError, match="USES_MODEL_CONFIG = 'no'"):
        Workload.from_module("mine", _module(USES_MODEL_CONFIG="no"))
    with pytest.raises(WorkloadError, match="defines predict but not metrics_from"):
        Workload.from_module("mine", _module(predict=lambda *a, **k: []))
    with pytest.raises(WorkloadError, match='EVAL_KIND = "retrieval" needs the retrieval_options hook'):
        Workload.from_module("mine", _module(EVAL_KIND="retrieval"))


def test_a_run_config_naming_a_workload_that_breaks_the_contract_is_a_config_error(tmp_path, monkeypatch):
    from orchestrator.config import ConfigError, load_config

    (tmp_path / "contractpkg").mkdir()
    (tmp_path / "contractpkg" / "__init__.py").write_text("")
    (tmp_path / "contractpkg" / "misspelt.py").write_text(
        "from pydantic import BaseModel\n\nTASK = 'toy'\nCOLUMNS = ('frames', 'label')\n\n\n"
        "class Config(BaseModel):\n    pass\n\n\ndef build_model(model_cfg, task_cfg):\n    return None\n\n\n"
        "def loss(model, batch, task_cfg):\n    return {}\n\n\ndef batch_constant(tokenizer, task_cfg):\n    return {}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="workload = 'contractpkg.misspelt' .*batch_constant, which looks like the hook "
                                          "batch_constants misspelt"):
        load_config(None, ["workload=contractpkg.misspelt"])


def test_the_orchestrator_never_probes_a_workload_for_a_hook():
    probes = []
    for path in sorted((REPO / "orchestrator").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr"):
                target = ast.unparse(node.args[0]) if node.args else ""
                if "workload" in target or target == "wl":
                    probes.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert probes == []
