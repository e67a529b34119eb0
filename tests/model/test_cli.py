import ast
import pathlib

from model.__main__ import main


def test_cli_prints_modules_and_total_last(capsys):
    assert main(["--preset", "base", "--task", "glue"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("total")
    names = {line.split()[0] for line in lines[1:]}
    assert {"text", "universal_layers", "classifier"} <= names and "vision" not in names
    total = int(lines[-1].split()[-1].replace(",", ""))
    assert 100e6 < total < 130e6  # BERT-base + universal cross parts + head


def test_cli_rejects_bad_override(capsys):
    assert main(["--preset", "tiny", "--set", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_no_cluster_imports_under_model():
    banned = {"ray", "deepspeed", "mlflow", "orchestrator", "workloads", "torch.distributed"}
    for path in pathlib.Path(__file__).resolve().parents[2].joinpath("model").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module or ""]
            else:
                continue
            for mod in mods:
                assert not any(mod == b or mod.startswith(b + ".") for b in banned), (path.name, mod)
