"""The design's rules, checked mechanically on the source (README "Design"): imports point down
with no cycle, no library module imports an entry point, only the wiring imports more than three
jaxllm modules, no file is over 500 lines, and only jaxllm/rundir.py spells a workdir file name."""

import ast
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).parent.parent
PACKAGE = REPO / 'jaxllm'
ENTRY_POINTS = {'jaxllm.main', 'jaxllm.evaluate', 'jaxllm.sample.__main__', 'jaxllm.tune'}
WIRING = {'jaxllm.train', 'jaxllm.trainer', 'jaxllm.aot', 'jaxllm.compress'}  # the loop, its compiled
# step, the planner, the compression recipe
MAX_LINES = 500


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in PACKAGE.rglob('*.py')}


def _jaxllm_imports(path: pathlib.Path, known: set[str]) -> set[str]:
  """jaxllm modules `path` imports (`from jaxllm import x` counts x when x is a module)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name in known}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('jaxllm'):
      for a in node.names:
        sub = f'{node.module}.{a.name}'
        out.add(sub if sub in known else node.module)
  return out - {'jaxllm'}


@pytest.fixture(scope='module')
def graph() -> dict[str, set[str]]:
  modules = _modules()
  return {name: _jaxllm_imports(path, set(modules)) - {name} for name, path in modules.items()}


def test_no_import_cycle(graph):
  state = {}

  def visit(name, stack):
    if state.get(name) == 'done':
      return
    assert state.get(name) != 'active', f'import cycle: {" -> ".join(stack + [name])}'
    state[name] = 'active'
    for dep in sorted(graph.get(name, ())):
      visit(dep, stack + [name])
    state[name] = 'done'

  for name in sorted(graph):
    visit(name, [])


def test_no_library_module_imports_an_entry_point(graph):
  for name, deps in graph.items():
    if name not in ENTRY_POINTS:
      assert not deps & ENTRY_POINTS, f'{name} imports the entry point(s) {deps & ENTRY_POINTS}'


def _package(name: str) -> str:
  return name if name.count('.') < 2 else name.rsplit('.', 1)[0]


# jaxllm/files.py is the filesystem (local paths and gs:// URLs, files written whole): a module
# uses it as it would `os` or `etils.epath`, so it does not count as a jaxllm dependency.
FILESYSTEM = 'jaxllm.files'


def test_only_the_wiring_imports_more_than_three_jaxllm_modules(graph):
  """A subpackage (jaxllm/convert/, jaxllm/sample/) is one concern: imports of its own modules
  do not count against it; nor does the filesystem module."""
  crowded = {name: sorted(outside) for name, deps in graph.items()
             if len(outside := {d for d in deps if _package(d) != _package(name)
                                and d not in (_package(name), FILESYSTEM)}) > 3
             and name not in WIRING}
  assert not crowded, crowded


def test_no_file_over_500_lines():
  files = list(PACKAGE.rglob('*.py')) + list((REPO / 'tools').glob('*.py'))
  long = {str(p.relative_to(REPO)): n for p in files
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long, long


def test_workdir_file_names_are_spelled_only_in_rundir():
  from jaxllm import rundir
  names = [rundir.CONFIG_JSON, rundir.CONFIG_PY, rundir.CHECKPOINTS, rundir.TOKENIZER,
           rundir.TENSORBOARD, rundir.GOODPUT]
  # jaxllm/convert/ names an HF model folder's own config.json and tokenizer.model (HF's
  # layout, not a workdir's); its workdir paths come from rundir like everyone's.
  files = [p for p in list(PACKAGE.rglob('*.py')) + list((REPO / 'tools').glob('*.py'))
           if p.name != 'rundir.py' and p.parent != PACKAGE / 'convert']
  for name in names:
    # As a path piece in code: a quoted literal, alone or ending a path ('/tokenizer.model').
    literal = re.compile(rf'''(['"])(?:[^'"\s]*/)?{re.escape(name)}\1''')
    hits = [f'{p.relative_to(REPO)}:{i}' for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if literal.search(line.split('#')[0])]
    assert not hits, f'{name!r} spelled outside jaxllm/rundir.py: {hits}'
