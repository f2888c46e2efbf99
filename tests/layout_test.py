"""The folder tree is the architecture: binaries at the package top, one subpackage per part,
each importing only the parts below it (docs/ARCHITECTURE.md), no import cycles, and the gin
configs at the checkout's top level. Checked by parsing every module's imports (ast)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "simfluence_jax"
# The parts, bottom first: a module of part i may import parts 0..i only.
ORDER = ["traces", "training", "yardstick", "simulators", "prior_methods", "evaluation",
         "experiments", "cli"]


def _modules():
  for path in sorted(PKG.rglob("*.py")):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    yield ".".join(parts), path


def _imports(name, path):
  """Absolute names of the simfluence_jax modules `path` imports (anywhere in the file)."""
  tree = ast.parse(path.read_text(encoding="utf-8"))
  known = dict(_modules())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.startswith("simfluence_jax"))
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
        and node.module.startswith("simfluence_jax"):
      for a in node.names:
        full = f"{node.module}.{a.name}"
        out.add(full if full in known else node.module)
  out.discard(name)
  return out


def _part(module):
  bits = module.split(".")
  return bits[1] if len(bits) > 2 or (len(bits) == 2 and bits[1] in ORDER) else None


def test_top_level_holds_only_binaries():
  for path in sorted(PKG.glob("*.py")):
    if path.name in ("__init__.py", "__main__.py"):
      continue
    tree = ast.parse(path.read_text(encoding="utf-8"))
    mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"]
    assert mains, f"{path.relative_to(ROOT)} is at the package top but has no main(): " \
                  "library modules belong in a subpackage"


def test_every_subpackage_is_a_known_part():
  subpackages = sorted(p.name for p in PKG.iterdir()
                       if p.is_dir() and (p / "__init__.py").exists())
  assert subpackages == sorted(ORDER)


def test_parts_import_only_downward_and_binaries_import_no_binary():
  binaries = {f"simfluence_jax.{p.stem}" for p in PKG.glob("*.py") if p.stem != "__init__"}
  bad = []
  for name, path in _modules():
    part = _part(name)
    for dep in _imports(name, path):
      dep_part = _part(dep)
      if dep in binaries:
        bad.append(f"{name} imports the binary {dep}")
      elif part is not None and dep_part is not None \
          and ORDER.index(dep_part) > ORDER.index(part):
        bad.append(f"{name} ({part}) imports upward: {dep} ({dep_part})")
      elif part is not None and dep_part is None and dep != "simfluence_jax":
        bad.append(f"{name} imports the package top: {dep}")
  assert not bad, "\n".join(bad)


def test_no_import_cycles():
  graph = {name: _imports(name, path) for name, path in _modules()}
  state = {}

  def visit(node, stack):
    state[node] = 1
    for dep in graph.get(node, ()):
      if dep not in graph:
        continue
      if state.get(dep) == 1:
        raise AssertionError("import cycle: " + " -> ".join(stack + [node, dep]))
      if dep not in state:
        visit(dep, stack + [node])
    state[node] = 2

  for node in graph:
    if node not in state:
      visit(node, [])
  assert len(state) == len(graph)


def test_gin_configs_at_top_level_and_found_by_the_binaries():
  from simfluence_jax.cli import gin_setup  # pylint: disable=g-import-not-at-top
  experiments = sorted(p.name for p in (ROOT / "gin_configs" / "experiments").glob("*.gin"))
  assert "quickstart.gin" in experiments and len(experiments) >= 6
  assert gin_setup.GIN_CONFIGS_DIR == ROOT / "gin_configs"
  assert not (PKG / "gin_configs").exists()


@pytest.mark.parametrize("name", ["fit", "evaluate", "train"])
def test_layout_check_itself_catches_an_upward_import(tmp_path, name):
  # The checker above must be able to fail: a simulators module importing evaluation.
  fake = tmp_path / "m.py"
  fake.write_text(f"from simfluence_jax.evaluation import reports\nfrom simfluence_jax import {name}\n")
  deps = _imports("simfluence_jax.simulators.m", fake)
  assert "simfluence_jax.evaluation.reports" in deps
  assert ORDER.index(_part("simfluence_jax.evaluation.reports")) > ORDER.index("simulators")
  assert f"simfluence_jax.{name}" in deps
