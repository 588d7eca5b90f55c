"""The README's two set-up commands are the ones CI runs and the ones that exist."""

import pathlib
import re

REPO = pathlib.Path(__file__).parent.parent


def test_ci_runs_the_readme_test_command():
  readme = (REPO / 'README.md').read_text()
  ci = (REPO / '.ci' / 'run').read_text()
  command = next(line for line in ci.splitlines() if line.startswith('python3 -m venv'))
  assert f'    {command}\n' in readme


def test_readme_main_command_names_real_files():
  readme = (REPO / 'README.md').read_text()
  for config in set(re.findall(r'--config=(configs/\w+\.py)', readme)):
    assert (REPO / config).exists(), config
  for tool in set(re.findall(r'python (tools/\w+\.py)', readme)):
    assert (REPO / tool).exists(), tool
