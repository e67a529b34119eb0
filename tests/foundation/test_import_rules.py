"""The import rules of model/, workloads/ and orchestrator/: one-way layers, no cycles, and the
project's own modules imported at the top of each file.

Every ``import`` statement of every module is read with ``ast`` (module level, inside ``if`` /
``try`` blocks and inside functions alike) and checked against :data:`LAYERS`: a module may import
modules of its own layer or of a lower one, never of a higher one.  The last test proves the
checker fails when an upward import, a function-local project import or a cycle is injected.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("model", "workloads", "orchestrator")

# Lowest first.  A module belongs to the layer of the longest entry it equals or lies under;
# an entry starting with "=" matches that module only (the orchestrator package's __init__).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("model: single-device PyTorch modules", ("model",)),
    ("workloads: loss and metrics per task, on the model; the checked workload contract", ("workloads",)),
    ("base: helpers every orchestrator layer may use", (
        "=orchestrator", "orchestrator.mappings", "orchestrator.names", "orchestrator.storage", "orchestrator.console",
        "orchestrator.ray_env", "orchestrator.tracking.redact", "orchestrator.errors")),
    ("components: the data plane, MLflow tracking, the training components; each with its typed config", (
        "orchestrator.data", "orchestrator.tracking", "orchestrator.train")),
    ("composer: the run config (RunSpec) made of the components' configs", ("orchestrator.config",)),
    ("runtime: what every Ray Train run shares (model setup, the TorchTrainer builder)", ("orchestrator.runtime",)),
    ("evaluation: of a checkpoint and of the model in training, on the workers", ("orchestrator.evaluation",)),
    ("training: the driver, the worker plan and the loop composing the components", ("orchestrator.trainer",)),
    ("sweeps: Ray Tune over training runs", ("orchestrator.sweep",)),
    ("devtools: synthetic data, tiny HF assets, fault injection (never imported by a run)", (
        "orchestrator.devtools",)),
    ("entry points: the CLI and its verbs", ("orchestrator.commands", "orchestrator.cli", "orchestrator.__main__")),
]


def module_sources(repo: Path = REPO) -> dict[str, str]:
    """{dotted module name: source} of every .py file under the project's packages."""
    out = {}
    for root in ROOTS:
        for path in sorted((repo / root).rglob("*.py")):
            parts = list(path.relative_to(repo).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_pkg else parts)
            out[name + (".__init__" if is_pkg else "")] = path.read_text(encoding="utf-8")
    return out


def _name(key: str) -> str:
    return key.removesuffix(".__init__")


def layer_of(module: str) -> int | None:
    best, best_len = None, -1
    for i, (_, entries) in enumerate(LAYERS):
        for e in entries:
            exact = e.startswith("=")
            e = e.lstrip("=")
            hit = module == e or (not exact and module.startswith(e + "."))
            if hit and len(e) > best_len:
                best, best_len = i, len(e)
    return best


def imports_of(key: str, source: str, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import statement."""
    name = _name(key)
    package = name if key.endswith(".__init__") else name.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(up + ([child.module] if child.module else []))
                # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name``, mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
            else:
                visit(child, local)
                continue
            for t in targets:
                if t.split(".")[0] in ROOTS:
                    found.append((t, child.lineno, in_function))
    visit(ast.parse(source), False)
    return found


def check(sources: dict[str, str]) -> list[str]:
    """Every violation of the rules, one line each (empty: the rules hold)."""
    modules = {_name(k) for k in sources}
    problems = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for key, source in sources.items():
        name = _name(key)
        mine = layer_of(name)
        if mine is None:
            problems.append(f"{name}: in no layer (add it to LAYERS)")
            continue
        for target, line, local in imports_of(key, source, modules):
            if local:
                problems.append(f"{name}:{line}: imports {target} inside a function (import it at the top)")
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                problems.append(f"{name}:{line}: imports {target} upward ({LAYERS[mine][0].split(':')[0]} -> "
                                f"{LAYERS[theirs][0].split(':')[0]})")
            if not local and target in modules and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    problems.extend(f"import cycle: {' -> '.join(c)}" for c in _cycles(graph))
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of the module-level import graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp) + [sorted(comp)[0]])

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def test_the_project_keeps_its_import_rules():
    sources = module_sources()
    assert len(sources) > 80  # the walk found the packages
    assert check(sources) == []


def test_every_layer_entry_names_existing_modules():
    modules = {_name(k) for k in module_sources()}
    for _, entries in LAYERS:
        for e in entries:
            e = e.lstrip("=")
            assert e in modules or any(m.startswith(e + ".") for m in modules), f"LAYERS names {e}, which is gone"


def test_the_checker_fails_on_an_upward_import_a_local_import_and_a_cycle():
    sources = module_sources()
    assert check(sources) == []
    pipeline = "orchestrator.data.pipeline"

    upward = dict(sources)
    upward[pipeline] += "\nfrom orchestrator.trainer.driver import run_training\n"
    assert any(p.startswith(f"{pipeline}:") and "upward" in p and "orchestrator.trainer.driver" in p
               for p in check(upward))

    relative_up = dict(sources)
    relative_up["model.layers"] += "\nfrom orchestrator import storage\n"
    assert any("model.layers" in p and "upward" in p for p in check(relative_up))

    local = dict(sources)
    local[pipeline] += "\n\ndef late():\n    from orchestrator.data import quality\n    return quality\n"
    assert any(p.startswith(f"{pipeline}:") and "inside a function" in p for p in check(local))

    cycle = dict(sources)
    cycle["orchestrator.data.formats"] += "\nfrom orchestrator.data import config\n"
    assert any(p.startswith("import cycle:") and "orchestrator.data.formats" in p for p in check(cycle))

    stray = dict(sources)
    stray["orchestrator.newthing"] = "X = 1\n"
    assert "orchestrator.newthing: in no layer (add it to LAYERS)" in check(stray)
