"""CPU fast paths: Toeplitz convolutions and C++ BatchNorm-ReLU-pool kernels."""

from dselect_jax.cpu.layers import BatchNormReLUPool
from dselect_jax.cpu.layers import ToeplitzConv
from dselect_jax.cpu.layers import toeplitz_conv
