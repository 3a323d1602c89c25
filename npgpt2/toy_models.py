"""Toy models of superposition moved to ``npgpt2.training.toy_models``; this name is kept so that ``import npgpt2.toy_models`` goes on working
(it is the same module object)."""

import sys

from .training import toy_models as _module

sys.modules[__name__] = _module
