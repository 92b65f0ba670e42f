"""The import rules of the rooms (README, "Imports"), checked on the source: every import
statement, at the top of a file or inside a function, read with `ast`.

  experiments/*.py           drivers: import stages/, evaluation/, configs/ (and registry), never
                             another driver
  experiments/stages/        the library drivers stand on: never a driver, never a config file
  experiments/evaluation/    the harness: never a driver, never a config file
  lm/, rl/, data/            never experiments/; data/ never lm/ or rl/; lm/ never rl/
and no two modules import each other, directly or through others (no cycles)."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Not drivers: the launcher, its table, and the launch-recipe writer (a command-line tool).
LAUNCHER = {'experiments.run', 'experiments.registry', 'experiments.launch', 'experiments.__init__'}


def module_name(path: pathlib.Path) -> str:
  return '.'.join(path.relative_to(ROOT).with_suffix('').parts)


def modules() -> dict[str, pathlib.Path]:
  out = {}
  for top in ('lm', 'rl', 'data', 'experiments'):
    for p in (ROOT / top).rglob('*.py'):
      out[module_name(p)] = p
  return out


def imports_of(path: pathlib.Path, known: set[str]) -> set[str]:
  """Project modules `path` imports (`from pkg import mod` resolves to pkg.mod when that is a
  module)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names if a.name.split('.')[0] in ('lm', 'rl', 'data', 'experiments'))
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module.split('.')[0] not in ('lm', 'rl', 'data', 'experiments'):
        continue
      for a in node.names:
        full = f'{node.module}.{a.name}'
        out.add(full if full in known else node.module)
  return {m for m in out if m in known or m.endswith('__init__')}


def is_driver(name: str) -> bool:
  parts = name.split('.')
  return len(parts) == 2 and parts[0] == 'experiments' and name not in LAUNCHER


@pytest.fixture(scope='module')
def graph():
  mods = modules()
  known = set(mods)
  return {name: imports_of(path, known) for name, path in mods.items()}


def test_no_driver_imports_a_driver(graph):
  bad = [(a, b) for a, deps in graph.items() if is_driver(a) for b in deps if is_driver(b)]
  assert not bad, f'drivers importing drivers: {bad}'


def test_library_rooms_import_no_driver_and_no_config(graph):
  bad = [(a, b) for a, deps in graph.items()
         if a.startswith(('experiments.stages', 'experiments.evaluation'))
         for b in deps if is_driver(b) or b.startswith('experiments.configs')]
  assert not bad, f'library modules importing drivers or config files: {bad}'


@pytest.mark.parametrize('room,forbidden', [('lm', ('experiments', 'rl', 'data')),
                                            ('rl', ('experiments', 'data')),
                                            ('data', ('experiments', 'lm', 'rl'))])
def test_lower_rooms_never_import_upwards(graph, room, forbidden):
  bad = [(a, b) for a, deps in graph.items() if a.split('.')[0] == room
         for b in deps if b.split('.')[0] in forbidden]
  assert not bad, f'{room}/ importing {forbidden}: {bad}'


def test_no_import_cycles(graph):
  """Depth-first search over the project import graph; any back edge is a cycle."""
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = 'open'
    stack.append(m)
    for d in sorted(graph.get(m, ())):
      if state.get(d) == 'open':
        cycles.append(stack[stack.index(d):] + [d])
      elif d not in state:
        visit(d)
    stack.pop()
    state[m] = 'done'
  for m in sorted(graph):
    if m not in state:
      visit(m)
  assert not cycles, f'import cycles: {cycles}'


def test_the_rules_catch_a_violation(tmp_path):
  """The checker itself: a driver importing a driver is seen (so a green run means something)."""
  p = tmp_path / 'x.py'
  p.write_text('def f():\n  from experiments import pretrain\n  from experiments.stages import stage\n')
  deps = imports_of(p, {'experiments.pretrain', 'experiments.stages.stage'})
  assert deps == {'experiments.pretrain', 'experiments.stages.stage'}
  assert is_driver('experiments.pretrain') and not is_driver('experiments.stages.stage')
