"""Head detection moved to ``npgpt2.analysis.head_detector``; this name is kept so that ``import npgpt2.head_detector`` goes on working
(it is the same module object)."""

import sys

from .analysis import head_detector as _module

sys.modules[__name__] = _module
