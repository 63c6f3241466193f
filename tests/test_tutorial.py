"""docs/tutorial.ipynb runs top to bottom in a fresh kernel, as a reader
runs it, and its claims hold: each gate ends with exactly k non-zero
weights, on the experts the problem planted, and the sparse forward pass
equals the dense one."""

import json
import os

from conftest import REPO
from nbclient import NotebookClient
import nbformat

NOTEBOOK = os.path.join(REPO, 'docs', 'tutorial.ipynb')


def _outputs(notebook) -> str:
  texts = []
  for cell in notebook.cells:
    for output in cell.get('outputs', []):
      if output.get('output_type') == 'stream':
        texts.append(output['text'])
  return ''.join(texts)


def test_the_notebook_is_committed_without_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  for cell in notebook.cells:
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, cell.source[:80]


def test_the_tutorial_runs_and_its_gates_pick_the_planted_experts(tmp_path):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(
    notebook,
    timeout=300,
    kernel_name='python3',
    resources={'metadata': {'path': str(tmp_path)}},
  )
  client.execute()  # Raises, naming the cell, if any cell fails.
  text = _outputs(notebook)
  (line,) = [l for l in text.splitlines() if l.startswith('{"selected"')]
  result = json.loads(line)
  k = result['k']
  assert result['num_nonzero'] == [k] * len(result['planted'])
  assert result['selected'] == result['planted'] == [[1, 6], [3, 4]]
  assert 'experts computed per task: 2 of 8' in text
  # The plot cell drew a figure.
  assert any(
    output.get('output_type') == 'display_data'
    and 'image/png' in output.get('data', {})
    for cell in notebook.cells
    for output in cell.get('outputs', [])
  )
