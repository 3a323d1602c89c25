"""The optimiser moved to ``npgpt2.training.optim``; this name is kept so that ``import npgpt2.optim`` goes on working
(it is the same module object)."""

import sys

from .training import optim as _module

sys.modules[__name__] = _module
