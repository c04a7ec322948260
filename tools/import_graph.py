"""The dependency picture of `vmddpm`: layers, import circles, upward imports, module sizes.

    python tools/import_graph.py                 # this checkout
    python tools/import_graph.py --src DIR --base  # another checkout (e.g. `git archive b1fb54a`), laid
                                                   # out as before the stages/ redesign

Every `import` statement counts, also those inside functions (a lazy import is still a dependency).
Layers are those of docs/architecture.md (0 = foundation ... 6 = cli); an import from a lower layer
to a higher one is "upward", an import between two stages is "lateral". `lint-imports` enforces the
same rules; this script only measures, for the before/after account in docs/architecture.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# (module prefix, layer); the first match wins. The numbers are the layers of docs/architecture.md;
# pyproject.toml's import-linter contract orders the same modules more finely inside layers 0 and 4.
LAYERS = [
    ("vmddpm.__main__", 6),
    ("vmddpm.cli", 6),
    ("vmddpm.stages", 5),
    ("vmddpm.report", 4),
    ("vmddpm.readerstudy", 4),
    ("vmddpm.trainkit", 4),
    ("vmddpm.evalkit", 4),
    ("vmddpm.generation", 4),
    ("vmddpm.data", 4),
    ("vmddpm.tracking", 4),
    ("vmddpm.cpu_memory", 4),
    ("vmddpm.plotting", 4),
    ("vmddpm.checkpoint", 4),
    ("vmddpm.diffusion", 3),
    ("vmddpm.metrics", 3),
    ("vmddpm.adversarial", 3),
    ("vmddpm.runtime", 3),
    ("vmddpm.nn", 2),
    ("vmddpm.ops", 1),
    ("vmddpm.pipeline", 0),
    ("vmddpm.config", 0),
    ("vmddpm.contracts", 0),
    ("vmddpm.io", 0),
    ("vmddpm.errors", 0),
    ("vmddpm", 0),
]
# Before the redesign the stages were top-level modules (metrics.py, report.py, readerstudy.py among them).
BASE_STAGES = ("train", "gan", "sample", "metrics", "report", "readerstudy")


def layer(module: str, base: bool) -> int:
    if base and module.split(".")[1:2] and module.split(".")[1] in BASE_STAGES:
        return 5
    for prefix, n in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return n
    raise KeyError(module)


def is_stage(module: str, base: bool) -> bool:
    return layer(module, base) == 5


def cycles(nodes: set[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on, stack, out = set(), [], []
    counter = 0
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def measure(src: Path, base: bool) -> dict:
    import grimp

    sys.path.insert(0, str(src))
    graph = grimp.build_graph("vmddpm", cache_dir=None)
    nodes = set(graph.modules)
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in nodes}
    files = {m: _file(src, m) for m in nodes}
    lines = {m: len(f.read_text().splitlines()) for m, f in files.items() if f}
    upward = sorted(
        f"{a} -> {b}" for a in nodes for b in edges[a] if layer(a, base) < layer(b, base) and b != "vmddpm"
    )
    lateral = sorted(
        f"{a} -> {b}"
        for a in nodes
        for b in edges[a]
        if is_stage(a, base) and is_stage(b, base) and a.split(".")[:3] != b.split(".")[:3]
    )
    big = sorted(((n, m) for m, n in lines.items() if n > 400), reverse=True)
    return {
        "modules": len(nodes),
        "imports": sum(len(v) for v in edges.values()),
        "cycles": cycles(nodes, edges),
        "upward": upward,
        "lateral_between_stages": lateral,
        "largest": [f"{m} {n}" for n, m in sorted(((n, m) for m, n in lines.items()), reverse=True)[:6]],
        "modules_over_400_lines": len(big),
        "lines_total": sum(lines.values()),
    }


def _file(src: Path, module: str) -> Path | None:
    parts = module.split(".")
    for f in (src.joinpath(*parts).with_suffix(".py"), src.joinpath(*parts, "__init__.py")):
        if f.is_file():
            return f
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--base", action="store_true", help="the layout before the stages/ redesign")
    args = ap.parse_args()
    print(json.dumps(measure(args.src.resolve(), args.base), indent=2))


if __name__ == "__main__":
    main()
