"""npgpt2: GPT-2 in NumPy, with every activation exposed under TransformerLens's names.

    import npgpt2
    model = npgpt2.from_pretrained("gpt2")
    logits, cache = model.run_with_cache("I am not sure what you are saying")
    cache["blocks.5.attn.hook_pattern"]      # [batch, head, query_pos, key_pos]
"""

from .cache import ActivationCache, get_act_name
from .config import ALIASES, ConfigError, GPT2Config
from . import hub  # noqa: F401  (npgpt2.hub.resolve: name -> files)
from . import metrics  # noqa: F401  (differentiable metrics for gradients)
from .hub import AccessDeniedError, DownloadError, ModelNotFoundError, OfflineError
from .debug import step_through
from .factored_matrix import FactoredMatrix
from .threads import get_num_threads, set_num_threads
from .loading import from_pretrained
from .hooks import HookError, HookPoint
from .inputs import InputError
from .kv_cache import KeyValueCache
from .model import GPT2
from .tokenizer import Tokenizer
from .weights import WeightsError
from . import utils  # noqa: F401  (TransformerLens's utils: get_act_name, test_prompt, ...)

__version__ = "0.1.0"


# subpackages and modules reached as npgpt2.<name> after a plain `import npgpt2` (npgpt2.zoo.induction(),
# npgpt2.analysis.patching, ...), imported when first asked for: several bring pandas with them,
# and `import npgpt2` stays light
_ON_FIRST_USE = ("analysis", "display", "harvest", "inspect", "parity", "plot", "prompts", "sae", "training", "zoo")


def __getattr__(name):
    if name in ("SAE", "SAEError"):
        from . import sae

        return getattr(sae, name)
    if name in _ON_FIRST_USE:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'npgpt2' has no attribute {name!r}")

__all__ = [
    "ALIASES", "AccessDeniedError", "ActivationCache", "DownloadError", "ConfigError", "FactoredMatrix", "GPT2", "GPT2Config", "HookError", "HookPoint",
    "InputError", "KeyValueCache", "ModelNotFoundError", "OfflineError", "SAE", "SAEError", "Tokenizer",
    "WeightsError",
    "from_pretrained", "get_act_name", "get_num_threads", "set_num_threads", "step_through", "utils",
]
