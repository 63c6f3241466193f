"""dselect_jax: DSelect-k sparse gates and multi-task mixtures of experts.

import dselect_jax
gate = dselect_jax.DSelectKGate(num_experts=8, k=2)
weights, aux = gate.apply(gate.init(jax.random.key(0)))  # (8,), dict
"""

from dselect_jax.experts import MLPExpert
from dselect_jax.experts import MultiMNISTExpert
from dselect_jax.gates import GATES
from dselect_jax.gates import DSelectKGate
from dselect_jax.gates import SoftmaxGate
from dselect_jax.gates import TopKGate
from dselect_jax.gates import make_gate
from dselect_jax.gates import params_from_tf
from dselect_jax.models import FeatureEmbedding
from dselect_jax.models import MLPTower
from dselect_jax.models import MultiTaskMoE
from dselect_jax.models import RecommenderMoE

__version__ = '0.1.0'
