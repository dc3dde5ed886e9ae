"""The README's commands stay in sync with CI and with the configs that exist."""

import os
import re

from tests.conftest import REPO


def _read(*path):
  with open(os.path.join(REPO, *path)) as f:
    return f.read()


def test_ci_runs_the_readme_test_command():
  readme = _read('README.md')
  ci = _read('.ci', 'run')
  test_command = 'python -m pytest -q -n auto tests'
  assert test_command in readme
  assert re.search(r'^' + re.escape(test_command) + r'$', ci, re.MULTILINE)
  assert 'pip install -q -r requirements.txt' in ci and 'pip install -r requirements.txt' in readme


def test_readme_config_files_exist():
  readme = _read('README.md')
  configs = set(re.findall(r'--config=(configs/\w+\.py)', readme))
  assert configs >= {'configs/sweep.py', 'configs/pretrain.py', 'configs/finetune.py',
                     'configs/baseline.py', 'configs/predict.py', 'configs/audit.py'}
  for path in configs:
    assert os.path.exists(os.path.join(REPO, path)), path
