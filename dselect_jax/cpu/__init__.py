"""CPU fast paths: direct and Toeplitz convolutions, C++ BatchNorm-ReLU-pool."""

from dselect_jax.cpu.layers import BatchNormReLUPool
from dselect_jax.cpu.layers import DirectConv
from dselect_jax.cpu.layers import ToeplitzConv
from dselect_jax.cpu.layers import toeplitz_conv
