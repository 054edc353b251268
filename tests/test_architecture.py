"""The dependency graph of the project's own modules, read with `ast` (no import runs): no cycle, and every import
of a project module at the top of its module, so the graph a reader sees is the graph that runs, except the few
marked `# lazy: <reason>` that keep diffusers and transformers out of row resolution; and that resolution's modules
indeed import neither (each of Ray's CPU tasks imports them anew: ~8 s of CPU per worker on 2 cores)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("pipelines", "operators", "jobs")


def project_modules() -> dict[str, str]:
    """Dotted module name -> file path, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found[".".join(rel)] = os.path.join(folder, name)
    return found


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


LAZY = "# lazy: "


def imports(module: str, path: str, modules: dict[str, str]):
    """(imported project module, line, at module top level or marked `# lazy: <reason>`) for every import statement of
    `path`."""
    text = open(path, encoding="utf-8").read()
    lines = text.splitlines()
    tree = ast.parse(text, path)
    is_package = path.endswith("__init__.py")
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, is_package, node)
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` names a.b.c; a name inside a module names it
                target = target.rpartition(".")[0]
            if target and target != module:
                yield target, node.lineno, id(node) in top or LAZY in lines[node.end_lineno - 1]


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: {t for t, _, _ in imports(m, p, modules)} for m, p in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_project_modules():
    found = cycles(graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_project_imports_sit_at_the_top_of_their_module():
    modules = project_modules()
    inner = sorted({f"{os.path.relpath(p, ROOT)}:{line} imports {t}"
             for m, p in modules.items() for t, line, at_top in imports(m, p, modules) if not at_top})
    assert not inner, "imports of project modules inside functions or branches:\n" + "\n".join(inner)


def test_row_resolution_imports_neither_diffusers_nor_transformers():
    """The modules whose functions run in Ray Data's tasks (`operators.resolve.resolve_rows`, `operators.kinds.of_kind`,
    `operators.worker.lost_rows`) and the actors' modules load no model library on import: an actor loads it when
    it starts; a read or resolve task never does."""
    code = ("import sys, operators.resolve, operators.kinds, operators.worker, operators.actors; "
            "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]


def arrow_reads_off_the_calling_thread(source: str, path: str) -> list[str]:
    """Parquet reads that may leave an Arrow pool thread holding a Python buffer at exit (operators/storage.py
    `arrow_threads`): a scan of a pyarrow dataset (the project names them `dataset`; a Table's `to_batches` is no scan)
    without `use_threads`, or a Parquet file read outside `storage.read_parquet`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        name = node.func.attr
        if name in ("to_table", "to_batches") and isinstance(node.func.value, ast.Name) \
                and node.func.value.id == "dataset" and not any(k.arg == "use_threads" for k in node.keywords):
            found.append(f"{path}:{node.lineno} {name} without use_threads")
        if name in ("ParquetFile", "read_table") and not path.endswith(os.path.join("operators", "storage.py")):
            found.append(f"{path}:{node.lineno} {name} outside storage.read_parquet")
    return found


def test_the_arrow_read_rule_finds_a_planted_read():
    planted = "dataset.to_table(columns=['id'])\nwith fs.open(p) as f:\n    pq.read_table(f)\n"
    assert len(arrow_reads_off_the_calling_thread(planted, "jobs/x.py")) == 2
    assert not arrow_reads_off_the_calling_thread("dataset.to_table(use_threads=False)\n", "jobs/x.py")


def test_no_parquet_read_can_abort_the_exit():
    """A CLI that finished its work must not exit 134 (apache/arrow#34314: seen as `jobs.export` aborting after
    its refusal, 7 of 60 runs on a loaded 2-core machine before the rule, 0 of 100 after)."""
    found = []
    for path in project_modules().values():
        with open(path, encoding="utf-8") as f:
            found += arrow_reads_off_the_calling_thread(f.read(), os.path.relpath(path, ROOT))
    assert not found, found
