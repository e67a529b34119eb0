"""benchmarks/retrieval_eval.py runs on tiny sizes, counts the pairs it claims, ends with JSON."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "retrieval_eval.py"


def _load():
    spec = importlib.util.spec_from_file_location("retrieval_eval_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_smoke(capsys):
    summary = _load().main(["--sizes", "12,24", "--k-test", "4", "--dim", "8", "--hidden", "8", "--repeats", "1"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(summary))
    for row in summary["rows"]:
        n = row["n"]
        assert row["pairs"] == 2 * n * 4 and row["exhaustive_pairs"] == n * n
    assert summary["n_growth"] == 2.0


def test_benchmark_rejects_bad_sizes():
    with pytest.raises(SystemExit):
        _load().main(["--sizes", "10,x"])
