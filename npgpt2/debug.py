"""Step through GPT-2's forward pass in the Python debugger, the maths and nothing else.

    >>> npgpt2.step_through(model, "The cat sat")
    > npgpt2/model.py(...)forward()
    -> hook = self._new_run()  # the hooks this call fires (see hooks.py)
    (Pdb) s            # into _forward; then `n` runs a line, `s` goes into a call, `p scores.shape`
                       # prints a value; `until` leaves a loop; `c` runs to the end

The debugger starts at the first line of ``GPT2.forward`` and never stops inside the machinery:
hook dispatch (hooks.py), input checks and tokenising (inputs.py, tokenizer.py), the key/value cache,
NumPy, tiktoken or the standard library. Attention runs the eager path, so ``scores``, ``pattern``
and ``z_heads`` are there to print.
"""

from __future__ import annotations

import bdb
import pdb

# module-name patterns pdb never stops in (see pdb.Pdb's ``skip``)
MACHINERY = ("npgpt2.hooks", "npgpt2.inputs", "npgpt2.tokenizer", "npgpt2.kv_cache", "npgpt2.config",
             "npgpt2.cache", "numpy", "numpy.*", "tiktoken", "tiktoken.*", "concurrent.*", "threading",
             "contextlib", "contextvars", "functools", "re", "difflib", "warnings", "typing")


def step_through(model, input="The cat sat", *, stdin=None, stdout=None, **forward_kwargs):
    """Run ``model(input)`` under pdb, stopped at the first line of the forward pass.

    input: anything ``model.forward`` takes (text, token ids). The model runs with
        ``attn_implementation="eager"`` for this call, so that every attention intermediate is bound.
    stdin, stdout: the debugger's streams (default: the terminal); pass ``io.StringIO`` objects to
        script a session.
    Returns what the forward pass returns (the logits).
    """
    if isinstance(input, (str, list, tuple)):  # text: have the tokenizer built before pdb starts
        model.tokenizer.encoding
    debugger = pdb.Pdb(skip=MACHINERY, stdin=stdin, stdout=stdout)
    if stdin is not None:
        debugger.use_rawinput = False
    saved = model.attn_implementation
    model.attn_implementation = "eager"
    try:
        return debugger.runcall(model.forward, input, **forward_kwargs)
    finally:
        model.attn_implementation = saved
        debugger.clear_all_breaks()
        if not any(bdb.Breakpoint.bpbynumber[1:]):  # none left anywhere: the next walk counts from 1
            bdb.Breakpoint.next, bdb.Breakpoint.bpbynumber = 1, [None]
