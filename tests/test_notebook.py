"""tools/colab_smoke.ipynb runs top to bottom, headless, on the tiny config with a few steps."""

import importlib.util
import pathlib

import pytest

_WHY = 'the notebook test needs: pip install nbclient nbformat ipykernel matplotlib'
nbformat = pytest.importorskip('nbformat', reason=_WHY)
nbclient = pytest.importorskip('nbclient', reason=_WHY)
pytest.importorskip('ipykernel', reason='pip install ipykernel (the notebook kernel)')
pytest.importorskip('matplotlib', reason='pip install matplotlib (the loss plot)')

REPO = pathlib.Path(__file__).parent.parent
NOTEBOOK = REPO / 'tools' / 'colab_smoke.ipynb'


def test_notebook_executes_headless(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  index = next(i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', []))
  # Injected after the parameter cell, as papermill does: a short run in a temporary workdir.
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell(
      f'STEPS = 6\nVOCAB = 512\nSEQ_LEN = 64\nWORKDIR = {str(tmp_path / "run")!r}'))
  # The kernel inherits this process's environment: conftest's 8 fake CPU devices.
  nbclient.NotebookClient(nb, timeout=300, kernel_name='python3',
                          resources={'metadata': {'path': str(NOTEBOOK.parent)}}).execute()
  text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                   for o in c.get('outputs', []))
  images = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
            if 'image/png' in o.get('data', {})]
  assert 'eval_bits_per_byte' in text and 'ROMEO:' in text
  assert images, 'the loss curve was not drawn'
  assert (tmp_path / 'run' / 'loss.png').exists()
  assert 'config.json' in text, text[-2000:]  # the HF export listed its files
  if all(importlib.util.find_spec(m) for m in ('torch', 'transformers')):
    assert 'max |logit difference|' in text, text[-2000:]
  print(text)
