"""Regenerates dselect_jax/datasets/data/multi_mnist_sample.npz, the shipped sample.

  python scripts/make_sample_data.py --data_dir=../shared/data

The sample is the first 4,000 train, 1,000 validation and 1,000 test
composites of `multi_mnist`, `comet` recipe, seed 0 (so it is a strict subset
of the full data set), compressed.
"""

import hashlib

from absl import flags

from dselect_jax import cli
from dselect_jax.datasets import multimnist
from dselect_jax.datasets import stored

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'Raw MNIST files folder.')
SIZES = {'train': 4000, 'validation': 1000, 'test': 1000}


def main(argv):
  del argv
  splits = multimnist.build('multi_mnist', 'comet', 0, _DATA_DIR.value)
  arrays = {}
  for name, array in stored.splits_to_arrays(splits).items():
    arrays[name] = array[: SIZES[name.split('_')[0]]]
  stored.save_npz(stored.SAMPLE_FILE, arrays, compress=True)
  with open(stored.SAMPLE_FILE, 'rb') as f:
    print(stored.SAMPLE_FILE, hashlib.sha256(f.read()).hexdigest())
  for name, array in arrays.items():
    print(name, array.shape, array.dtype)


if __name__ == '__main__':
  cli.run(main)
