"""Small helpers on nested mappings (configs as dicts): merge, flatten to dotted keys, set by a
dotted path.  The lowest layer of the orchestrator: imports nothing of the project."""
from __future__ import annotations

from typing import Any, Iterable


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``, merging nested mappings key by key (a new dict; inputs unchanged)."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {"a.b.c": value} (leaves only; an empty mapping is a leaf)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def dotted_keys(d: dict[str, Any], prefix: str = "", opaque: Iterable[str] = ()) -> list[str]:
    """Every key path of a nested mapping, inner nodes included (``a``, ``a.b``, ``a.b.c``); the
    mappings under a key named in ``opaque`` are not descended into."""
    opaque = tuple(opaque)
    keys = []
    for k, v in d.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, dict) and k not in opaque:
            keys.extend(dotted_keys(v, full + ".", opaque))
    return keys


def set_dotted(d: dict[str, Any], parts: list[str], value: Any) -> None:
    """``d[parts[0]][parts[1]]... = value``, creating (or replacing non-mapping) inner nodes."""
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value
