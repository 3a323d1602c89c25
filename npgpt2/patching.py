"""Activation patching moved to ``npgpt2.analysis.patching``; this name is kept so that ``import npgpt2.patching`` goes on working
(it is the same module object)."""

import sys

from .analysis import patching as _module

sys.modules[__name__] = _module
