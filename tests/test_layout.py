"""The package's layering (docs/design.md), read from the imports in its code."""

import ast
import os

from simclr_jax import run
from tests.conftest import REPO

PACKAGE = os.path.join(REPO, 'simclr_jax')
# Layers, bottom up: a module may import its own layer and those below, never above.
LAYERS = (
    ('simclr_jax.errors', 'simclr_jax.config_fields', 'simclr_jax.plots'),
    ('simclr_jax.parallel', 'simclr_jax.model'),
    ('simclr_jax.metrics',),
    ('simclr_jax.data',),
    ('simclr_jax.explain', 'simclr_jax.train'),
    ('simclr_jax.checks',),
    ('simclr_jax.study', 'simclr_jax.predict', 'simclr_jax.audit', 'simclr_jax.train.mode'),
    ('simclr_jax.run',),
)
MODES = sorted(set(run.MODES.values()))


def _modules():
  """{module name: the simclr_jax modules it imports}, from every .py file of the package."""
  graph = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if not name.endswith('.py'):
        continue
      path = os.path.join(folder, name)
      module = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
      module = module[:-len('.__init__')] if module.endswith('.__init__') else module
      imported = set()
      for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
            'simclr_jax'):
          imported |= {f'{node.module}.{alias.name}' for alias in node.names}
        elif isinstance(node, ast.Import):
          imported |= {a.name for a in node.names if a.name.startswith('simclr_jax')}
      graph[module] = imported
  # `from simclr_jax.data import arrays` names a module; `from x import CONSTANT` its module.
  return {m: {i if i in graph else i.rsplit('.', 1)[0] for i in imports} - {m}
          for m, imports in graph.items()}


def _layer(module):
  """The index of the most specific layer prefix of `module`."""
  best = None
  for index, prefixes in enumerate(LAYERS):
    for prefix in prefixes:
      if module == prefix or module.startswith(prefix + '.'):
        if best is None or len(prefix) > best[1]:
          best = (index, len(prefix))
  assert best is not None, f'{module} is in no layer of docs/design.md'
  return best[0]


def test_no_import_circles():
  graph = _modules()
  visiting, done = set(), set()

  def visit(module, path):
    if module in done:
      return
    assert module not in visiting, 'import circle: ' + ' -> '.join(path + [module])
    visiting.add(module)
    for imported in graph.get(module, ()):
      visit(imported, path + [module])
    visiting.discard(module)
    done.add(module)

  for module in graph:
    visit(module, [])


def test_lower_layers_never_import_higher_ones():
  wrong = [f'{module} imports {imported}'
           for module, imports in _modules().items() if module != 'simclr_jax'
           for imported in imports if imported != 'simclr_jax'
           if _layer(imported) > _layer(module)]
  assert not wrong, wrong


def test_modes_import_no_mode_and_checks_import_none():
  graph = _modules()
  for mode in MODES + ['simclr_jax.checks']:
    others = graph[mode] & (set(MODES) - {mode})
    assert not others, f'{mode} imports the mode(s) {others}'


def test_at_most_ten_modules_at_the_top_and_none_over_500_lines():
  top = [name for name in os.listdir(PACKAGE) if name.endswith('.py') and name != '__init__.py']
  assert len(top) <= 10, top
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        with open(os.path.join(folder, name)) as f:
          assert len(f.readlines()) <= 500, name
