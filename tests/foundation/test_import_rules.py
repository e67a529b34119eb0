"""The import rules of model/, workloads/ and orchestrator/: one-way layers, no cycles, and the
project's own modules imported at the top of each file; at module scale and at folder scale.

Every ``import`` statement of every module is read with ``ast`` (module level, inside ``if`` /
``try`` blocks and inside functions alike) and checked against :data:`LAYERS`: a module may import
modules of its own layer or of a lower one, never of a higher one.  At folder scale the files and
folders of each package are its rooms (a package's ``__init__`` is its face, not a room): a module
may import another room only when every module in that room lies in its own layer or a lower one,
and the rooms of a package import each other without a circle.  So a folder shows its layers: one
that held a higher layer's module could not be imported from below.  The last tests prove the
checker fails when an upward import, a function-local project import, a cycle, an upward arrow
between folders or a circle of folders is injected.
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


def layer_of(module: str, layers: list | None = None) -> int | None:
    best, best_len = None, -1
    for i, (_, entries) in enumerate(layers or LAYERS):
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


def check(sources: dict[str, str], layers: list | None = None) -> list[str]:
    """Every violation of the rules, one line each (empty: the rules hold)."""
    layers = layers or LAYERS
    modules = {_name(k) for k in sources}
    problems = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for key, source in sources.items():
        name = _name(key)
        mine = layer_of(name, layers)
        if mine is None:
            problems.append(f"{name}: in no layer (add it to LAYERS)")
            continue
        for target, line, local in imports_of(key, source, modules):
            if local:
                problems.append(f"{name}:{line}: imports {target} inside a function (import it at the top)")
            theirs = layer_of(target, layers)
            if theirs is not None and theirs > mine:
                problems.append(f"{name}:{line}: imports {target} upward ({layers[mine][0].split(':')[0]} -> "
                                f"{layers[theirs][0].split(':')[0]})")
            if not local and target in modules and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    problems.extend(f"import cycle: {' -> '.join(c)}" for c in _cycles(graph))
    problems.extend(check_folders(sources, layers))
    return problems


def _rooms(a: str, b: str) -> tuple[str, str] | None:
    """The rooms of ``a`` and ``b`` at the scale of the package they share: its children (a file or
    a folder) that hold them; None when one is the other's package (a package's face is no room)."""
    pa, pb = a.split("."), b.split(".")
    n = 0
    while n < min(len(pa), len(pb)) and pa[n] == pb[n]:
        n += 1
    if n == len(pa) or n == len(pb):
        return None
    return ".".join(pa[: n + 1]), ".".join(pb[: n + 1])


def check_folders(sources: dict[str, str], layers: list | None = None) -> list[str]:
    """Folder scale: no module imports a room (file or folder) that holds a module of a higher layer
    than its own, and the rooms of each package import each other without a circle."""
    layers = layers or LAYERS
    modules = {_name(k) for k in sources}
    highest: dict[str, int] = {}  # room -> the highest layer among the modules it holds
    for m in modules:
        parts = m.split(".")
        for n in range(1, len(parts) + 1):
            room = ".".join(parts[:n])
            highest[room] = max(highest.get(room, -1), layer_of(m, layers) or 0)
    problems, graph = [], {}
    for key, source in sources.items():
        name = _name(key)
        for target, line, local in imports_of(key, source, modules):
            rooms = _rooms(name, target)
            if rooms is None or local:
                continue
            mine, theirs = layer_of(name, layers), highest.get(rooms[1])
            if mine is not None and theirs is not None and theirs > mine:
                problems.append(f"{name}:{line}: imports {target} upward at folder scale ({rooms[0]} -> {rooms[1]}, "
                                f"which holds {layers[theirs][0].split(':')[0]}, above "
                                f"{layers[mine][0].split(':')[0]})")
            graph.setdefault(rooms[0], set()).add(rooms[1])
            graph.setdefault(rooms[1], set())
    problems.extend(f"folder circle: {' -> '.join(c)}" for c in _cycles(graph))
    return list(dict.fromkeys(problems))  # ``from a import x, y`` names one arrow


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


def test_the_checker_fails_on_an_upward_arrow_and_a_circle_at_folder_scale():
    sources = module_sources()
    assert check(sources) == [] and check_folders(sources) == []

    # storage.py (base) importing the redactor (base) passes module scale, but tracking/ also holds
    # components: the arrow storage.py -> tracking/ points up, and tracking/ -> storage.py closes a circle
    base_to_folder = dict(sources)
    base_to_folder["orchestrator.storage"] += "\nfrom orchestrator.tracking.redact import redact\n"
    assert not [p for p in check(base_to_folder) if "upward (" in p or p.startswith("import cycle")]
    problems = check_folders(base_to_folder)
    assert any(p.startswith("orchestrator.storage:") and "upward at folder scale (orchestrator.storage -> "
               "orchestrator.tracking, which holds components, above base)" in p for p in problems)
    assert any(p.startswith("folder circle:") and "orchestrator.storage" in p and "orchestrator.tracking" in p
               for p in problems)

    # the old shape: train/ held the components, the loop and the driver; config.py imported its config
    three_layers = [(name, entries + (("orchestrator.train.driver",) if name.startswith("training") else ()))
                    for name, entries in LAYERS]
    old = dict(sources)
    old["orchestrator.train.driver"] = "from orchestrator.config import RunSpec\n"
    assert not [p for p in check(old, three_layers) if "upward (" in p or p.startswith("import cycle")]
    assert any(p.startswith("orchestrator.config:") and "upward at folder scale (orchestrator.config -> "
               "orchestrator.train, which holds training, above composer)" in p for p in check(old, three_layers))

    # a circle of sibling folders of one layer, with no module cycle behind it
    circle = dict(sources)
    circle["orchestrator.tracking.config"] += "\nfrom orchestrator.data.ids import stable_id\n"
    circle["orchestrator.data.catalog"] += "\nfrom orchestrator.tracking.config import TrackingConfig\n"
    assert not [p for p in check(circle) if p.startswith("import cycle")]
    assert any(p.startswith("folder circle:") and "orchestrator.data" in p and "orchestrator.tracking" in p
               for p in check(circle))
