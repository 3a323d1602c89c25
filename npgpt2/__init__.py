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


def __getattr__(name):
    # The SAE module brings pandas with it: import it when it is first asked for, so that
    # `import npgpt2` stays light.
    if name in ("SAE", "SAEError"):
        from . import sae

        return getattr(sae, name)
    raise AttributeError(f"module 'npgpt2' has no attribute {name!r}")

__all__ = [
    "ALIASES", "AccessDeniedError", "ActivationCache", "DownloadError", "ConfigError", "FactoredMatrix", "GPT2", "GPT2Config", "HookError", "HookPoint",
    "InputError", "KeyValueCache", "ModelNotFoundError", "OfflineError", "SAE", "SAEError", "Tokenizer",
    "WeightsError",
    "from_pretrained", "get_act_name", "get_num_threads", "set_num_threads", "step_through", "utils",
]
