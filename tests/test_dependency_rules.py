"""The dependency rules of ARCHITECTURE.md, read from the source (ast), so a violation fails here and not only in a
reviewer's grep:
- `kernels` and `peft_format` import nothing of ours; `peft_format` imports neither JAX nor torch;
- `genome_jax` imports neither `evaluators` nor `scripts` (nor vLLM);
- `evaluators` imports neither `jax`/`flax` nor `genome_jax`/`scripts`;
- a function-level import is only for a heavy optional dependency (or for our own module that imports one at its
  top), with a comment on its line (or on another line of its run of imports) saying why; any other function-level
  import of our own packages would hide a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("genome_jax", "evaluators", "kernels", "peft_format", "scripts")
HEAVY = ("torch", "transformers", "peft", "vllm", "ray", "matplotlib", "gguf", "safetensors.torch",
         "jax.experimental.pallas")
FORBIDDEN = {
    "kernels": OURS,
    "peft_format": OURS + ("jax", "flax", "torch", "vllm"),
    "genome_jax": ("evaluators", "scripts", "vllm"),
    "evaluators": ("jax", "jaxlib", "flax", "optax", "orbax", "genome_jax", "scripts", "kernels"),
    "scripts": (),
}


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(tree: ast.AST):
    """(node, module name, function-level?) for every import in the file."""
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                out.extend((child, a.name, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):  # `from a.b import c` counts as a.b.c (c may be a module)
                assert child.level == 0, "relative imports are not used here"
                out.extend((child, f"{child.module}.{a.name}", in_function) for a in child.names)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return out


def _under(module: str, roots) -> bool:
    return any(module == r or module.startswith(r + ".") for r in roots)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_what_the_architecture_allows(package):
    bad = []
    for path in _modules(package):
        for node, module, _ in _imports(ast.parse(path.read_text())):
            if _under(module, FORBIDDEN[package]) and not _under(module, (package,)):  # itself is fine
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module}")
    assert not bad, "\n".join(bad)


def _documented(lines: list[str], node: ast.stmt) -> bool:
    """A comment on the import's lines or on a neighbouring import line of the same run."""
    lo, hi = node.lineno - 1, node.end_lineno - 1
    while lo > 0 and lines[lo - 1].strip().startswith(("import ", "from ")):
        lo -= 1
    while hi + 1 < len(lines) and lines[hi + 1].strip().startswith(("import ", "from ")):
        hi += 1
    return any("#" in lines[i] for i in range(lo, hi + 1))


def _loads_heavy(module: str, heavy: tuple[str, ...]) -> bool:
    """Our own module that imports a heavy dependency at its top level: importing it late is importing that
    dependency late (e.g. the worker's torch-only weight swap, the JAX scorer for `genome eval --backend jax`)."""
    if not _under(module, OURS):
        return False
    path = _module_file(module) or _module_file(module.rsplit(".", 1)[0])
    if path is None:
        return False
    return any(_under(m, heavy) and not late for _, m, late in _imports(ast.parse(path.read_text())))


def test_function_level_imports_are_heavy_optional_and_say_why():
    bad = []
    for package in FORBIDDEN:
        for path in _modules(package):
            rel = str(path.relative_to(ROOT))
            text = path.read_text()
            lines = text.splitlines()
            heavy = HEAVY + (("jax",) if package == "scripts" else ())
            for node, module, in_function in _imports(ast.parse(text)):
                if not in_function:
                    continue
                if not _under(module, heavy) and not _loads_heavy(module, heavy):
                    bad.append(f"{rel}:{node.lineno} imports {module} inside a function")
                elif not _documented(lines, node):
                    bad.append(f"{rel}:{node.lineno} imports {module} inside a function without a comment why")
    assert not bad, "\n".join(bad)


def test_the_checks_can_fail(tmp_path):
    """The walker sees imports inside functions and methods, and a comment elsewhere does not count."""
    src = "import os\n\n\nclass C:\n    def f(self):\n        from genome_jax import population\n\n\n" \
          "def g():  # a comment\n    import torch\n"
    found = [(m, f) for _, m, f in _imports(ast.parse(src))]
    assert found == [("os", False), ("genome_jax.population", True), ("torch", True)]
    lines = src.splitlines()
    torch_node = [n for n, m, _ in _imports(ast.parse(src)) if m == "torch"][0]
    assert not _documented(lines, torch_node)


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def _import_graph() -> dict[str, set[str]]:
    """{module file: module files it imports}, every import of ours (module- or function-level) resolved to the file
    it loads: `from a.b import c` is a.b.c when that is a module, else a.b."""
    graph: dict[str, set[str]] = {}
    for package in FORBIDDEN:
        for path in _modules(package):
            deps = graph.setdefault(str(path.relative_to(ROOT)), set())
            for _, module, _ in _imports(ast.parse(path.read_text())):
                if not _under(module, OURS):
                    continue
                target = _module_file(module) or _module_file(module.rsplit(".", 1)[0])
                if target is not None and target != path:
                    deps.add(str(target.relative_to(ROOT)))
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_no_import_cycles_between_our_modules():
    """The issue-13 cycles (operators merge <-> delta_space; tasks base <-> builtin <-> loading) stay gone; a package
    __init__ that re-exports its submodules is the only module another may reach back to."""
    graph = _import_graph()
    real = [c for c in _cycles(graph) if not any(p.endswith("__init__.py") for p in c)]
    assert not real, "\n".join(" -> ".join(c) for c in real)
    assert not _cycles({"a": {"b"}, "b": {"c"}, "c": set()})
    assert _cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
