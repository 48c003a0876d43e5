"""The package's shape: imports point one way, privates stay in their file.

Read from the source with ``ast`` (nothing is imported), so a cycle or a reach into
another file's private names fails here before it confuses a reader.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("dnr_jax", "experiments", "benchmarks")


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for package in PACKAGES:
    for path in sorted((ROOT / package).rglob("*.py")):
      parts = path.relative_to(ROOT).with_suffix("").parts
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = path
  return out


MODULES = _modules()


def _imports(name: str, path: pathlib.Path):
  """``(module imported, names taken from it, line)`` for every import statement.

  Imports inside functions count too: a cycle through a lazy import is still a
  cycle a reader has to untangle.
  """
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      for a in node.names:
        yield a.name, (), node.lineno
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      for a in node.names:
        sub = f"{base}.{a.name}"
        if sub in MODULES:        # ``from package import module``
          yield sub, (), node.lineno
        else:
          yield base, (a.name,), node.lineno


def _graph() -> dict[str, set[str]]:
  graph = {}
  for name, path in MODULES.items():
    graph[name] = {m for m, _, _ in _imports(name, path) if m in MODULES and m != name}
  return graph


def test_there_are_no_import_cycles():
  graph = _graph()
  state, stack, cycles = {}, [], []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        cycles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node)
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle(monkeypatch):
  # The check above must be able to fail: plant a cycle and see it reported.
  graph = _graph()
  graph["dnr_jax.batch"] = graph["dnr_jax.batch"] | {"dnr_jax.step"}
  monkeypatch.setattr(__import__(__name__), "_graph", lambda: graph)
  with pytest.raises(AssertionError, match="dnr_jax.batch -> dnr_jax.step"):
    test_there_are_no_import_cycles()


def _private_uses(name: str, path: pathlib.Path) -> list[str]:
  """``file:line name`` for each private name this file takes from another file."""
  tree = ast.parse(path.read_text(), str(path))
  imported_modules = {}
  bad = []
  for module, names, line in _imports(name, path):
    for n in names:
      if n.startswith("_") and not n.startswith("__"):
        bad.append(f"{path.relative_to(ROOT)}:{line} {module}.{n}")
  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      for a in node.names:
        full = (a.name if isinstance(node, ast.Import)
                else f"{node.module}.{a.name}")
        if full in MODULES:
          imported_modules[a.asname or a.name.split(".")[-1]] = full
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in imported_modules and node.attr.startswith("_")
        and not node.attr.startswith("__")):
      bad.append(f"{path.relative_to(ROOT)}:{node.lineno} "
                 f"{imported_modules[node.value.id]}.{node.attr}")
  return bad


def test_no_file_uses_another_files_private_names():
  bad = [b for name, path in MODULES.items() for b in _private_uses(name, path)]
  assert not bad, "private names used across files:\n" + "\n".join(bad)


# Modules over ~400 lines, each one idea that reads best whole (the reason is the
# docstring's first line).
LONG_MODULES = {
    "dnr_jax.config": "the typed configs, their presets and their validation",
    "dnr_jax.data.lists": "the list protocols and the time cuts they share",
    "dnr_jax.data.prepare": "the cached list data set: its config, key and builder",
    "benchmarks.step": "the step benchmark, every measurement of one compiled step",
}


def test_modules_stay_readable():
  long = {name: n for name, path in MODULES.items()
          if (n := len(path.read_text().splitlines())) > 420}
  assert set(long) <= set(LONG_MODULES), f"modules over 420 lines: {long}"
