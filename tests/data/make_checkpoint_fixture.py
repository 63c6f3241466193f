"""Writes tests/data/checkpoint_fixture/: a workdir's checkpoints as the code
of one commit writes them, for tests/test_checkpoint_format.py.

  python tests/data/make_checkpoint_fixture.py

Every array of the tiny config's train state (SGD with momentum) is filled
with a constant, array i of the flattened state with ``STEP_OFFSET[step] +
i``, so the test recomputes what each restored array must hold from the
state's structure alone; the constants also make the files small. Periodic
checkpoints at steps 1 and 2, the best at step 1 with selection_score 0.25.
"""

import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dselect_jax import checkpointing  # noqa: E402
from dselect_jax import factory  # noqa: E402
from tests import helpers  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), 'checkpoint_fixture')
STEP_OFFSET = {1: 0.0, 2: 1000.0}
BEST = (1, 0.25)


def config():
  return helpers.tiny_config(**{'optimizer.name': 'sgd'})


def filled(abstract, step):
  leaves, tree = jax.tree.flatten(abstract)
  return jax.tree.unflatten(
    tree,
    [
      np.full(x.shape, STEP_OFFSET[step] + i, x.dtype)
      for i, x in enumerate(leaves)
    ],
  )


def main():
  shutil.rmtree(OUT, ignore_errors=True)
  c = config()
  model = helpers.create_model(c)
  abstract = helpers.abstract_state(c, model, factory.create_optimizer(c, 1))
  ckpts = checkpointing.Checkpoints(OUT, max_to_keep=2)
  for step in STEP_OFFSET:
    ckpts.save(step, filled(abstract, step))
  ckpts.save_best(BEST[0], filled(abstract, BEST[0]), BEST[1])
  ckpts.wait()
  with open(os.path.join(OUT, 'config.json'), 'w') as f:
    f.write(c.to_json_best_effort(indent=2) + '\n')


if __name__ == '__main__':
  main()
