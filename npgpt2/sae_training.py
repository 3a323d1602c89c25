"""Sparse-autoencoder training moved to ``npgpt2.training.sae``; this name is kept so that ``import npgpt2.sae_training`` goes on working
(it is the same module object)."""

import sys

from .training import sae as _module

sys.modules[__name__] = _module
