"""The package layering holds: no import cycle between hpc_rlhf's packages, and each
package imports only the ones below it (function-level imports included), so one PPO step
reads trainer -> models -> ops and trainer -> inference -> models -> ops without going
back up."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "hpc_rlhf"

# each package may import the packages listed after it (and itself)
LAYERS = [
    "cli",
    "trainer",
    "inference",
    "data",
    "rewards",
    "models",
    "algorithms",
    "ops",
    "parallel",
    "utils",
    "config",
]
ALLOWED_EXTRA = {("config", "inference.config")}  # the engine's config section, nested


def _package(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return rel.parts[0] if rel.parts[0] != "__init__" else ""


def _imports(path: pathlib.Path) -> set[str]:
    """Every ``hpc_rlhf.<...>`` module imported anywhere in the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out.update(n.removeprefix("hpc_rlhf.") for n in names if n.startswith("hpc_rlhf."))
    return out


def package_edges() -> set[tuple[str, str]]:
    """(importing package, imported package) over the whole source tree."""
    edges = set()
    for path in ROOT.rglob("*.py"):
        src = _package(path)
        for module in _imports(path):
            dst = module.split(".")[0]
            if src and dst in LAYERS and dst != src:
                if (src, module) in ALLOWED_EXTRA or (
                    src,
                    ".".join(module.split(".")[:2]),
                ) in ALLOWED_EXTRA:
                    continue
                edges.add((src, dst))
    return edges


def test_packages_import_only_downwards():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = sorted((a, b) for a, b in package_edges() if rank[b] < rank[a])
    assert not upward, f"imports going up the layers {LAYERS}: {upward}"


def test_no_import_cycle_between_packages():
    edges = package_edges()
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(p for p in graph if reaches(p, p, {p}))
    assert not cycles, f"packages on an import cycle: {cycles}"
