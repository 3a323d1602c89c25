"""Step through GPT-2's forward pass in the Python debugger, the maths and nothing else.

    >>> npgpt2.step_through(model, "The cat sat", break_at="attention")
    > /.../npgpt2/model.py(...)_attention()
    -> qkv = ops.linear(x, w.W_qkv, w.b_qkv).reshape(...)  # [batch, pos, 3, head, d_head]
    (Pdb) n            # run a line; `s` steps into a call, `r` runs to the return, `c` to the next break
    (Pdb) p q.shape    # print a value

Without ``break_at`` the debugger stops at the first line of ``GPT2.forward``. It never stops in the
machinery: hook dispatch (hooks.py), input checks and tokenizing (inputs.py, tokenizer.py), the
key/value cache, the small pure functions of ops.py (linear, softmax, ...: one step each, as
NumPy's are), fast.py, NumPy, tiktoken, the standard library, nor in a property. Attention runs the
eager path, so ``scores``, ``pattern`` and ``z`` are there to print.

A breakpoint is named, not numbered, so it holds wherever the learner stands and whatever the line
numbers of model.py are: ``break_at="attention"`` (or ``embed``, ``block``, ``layer_norm``, ``mlp``,
``unembed``) stops at the first line of that part, in every layer; ``"3 attention"`` only in layer 3.
``breakpoint_for`` gives the file (absolute) and line of one, for a debugger of your own.
"""

from __future__ import annotations

import ast
import bdb
import inspect
import pdb
import textwrap

from .inputs import is_text

# module-name patterns pdb never stops in (see pdb.Pdb's ``skip``)
MACHINERY = ("npgpt2.hooks", "npgpt2.inputs", "npgpt2.tokenizer", "npgpt2.kv_cache", "npgpt2.config",
             "npgpt2.cache", "npgpt2.ops", "npgpt2.fast", "npgpt2.threads", "npgpt2.memory", "numpy", "numpy.*", "tiktoken",
             "tiktoken.*", "concurrent.*", "threading", "contextlib", "contextvars", "functools", "re", "difflib",
             "warnings", "typing")

# the parts of the forward pass a breakpoint can name -> (the method of GPT2, what holds in it in layer L)
PARTS = {
    "embed": ("_embed", None),
    "block": ("_block", "l == {layer}"),
    "layer_norm": ("_layer_norm", "name.startswith('blocks.{layer}.')"),
    "attention": ("_attention", "l == {layer}"),
    "mlp": ("_mlp", "l == {layer}"),
    "unembed": ("_unembed", None),
}


class BreakError(ValueError):
    """A breakpoint name that names no part of the forward pass."""


def breakpoint_for(name: str, n_layer: int | None = None) -> tuple[str, int, str | None]:
    """A part of the forward pass -> (absolute path of model.py, the line of its first statement,
    the condition for one layer or None).

    name: "attention", "mlp", "layer_norm", "block", "embed", "unembed", or a layer and a part,
    "3 attention" (not for embed and unembed, which have no layer). n_layer: the model's, to check
    the layer against."""
    from .model import GPT2

    words = str(name).split()
    layer = None
    if len(words) == 2 and words[0].lstrip("-").isdigit():
        layer, words = int(words[0]), words[1:]
    part = words[0] if len(words) == 1 else None
    if part not in PARTS:
        raise BreakError(f"break at {name!r}: expected one of {', '.join(PARTS)}, or a layer and one of "
                         f"{', '.join(p for p, (_, cond) in PARTS.items() if cond)} (e.g. '3 attention')")
    method, condition = PARTS[part]
    if layer is not None and condition is None:
        raise BreakError(f"break at {name!r}: {part} is not in a layer; use {part!r} alone")
    if layer is not None and n_layer is not None and not 0 <= layer < n_layer:
        raise BreakError(f"break at {name!r}: layer {layer} is out of range for a model of {n_layer} layers "
                         f"(0 to {n_layer - 1})")
    function = getattr(GPT2, method)
    return inspect.getsourcefile(function), _first_statement(function), \
        None if layer is None else condition.format(layer=layer)


def _first_statement(function) -> int:
    """The line of a function's first statement after its docstring (where pdb stops on entering it)."""
    lines, first = inspect.getsourcelines(function)
    body = ast.parse(textwrap.dedent("".join(lines))).body[0].body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1:
        body = body[1:]  # the docstring
    return first + body[0].lineno - 1


class Walk(pdb.Pdb):
    """pdb that does not stop in the machinery (``MACHINERY``) nor inside a property of the model
    (``model.dtype``, ``model.attn_implementation``, ``model.W_Q``, ...)."""

    def __init__(self, model, **kwargs):
        super().__init__(skip=MACHINERY, **kwargs)
        self.quiet = {f.__code__ for cls in type(model).__mro__ for value in vars(cls).values()
                      if isinstance(value, property) for f in (value.fget, value.fset) if f is not None}

    def stop_here(self, frame):
        return frame.f_code not in self.quiet and super().stop_here(frame)


def step_through(model, input="The cat sat", *, break_at=None, stdin=None, stdout=None, **forward_kwargs):
    """Run ``model(input)`` under pdb, stopped at the first line of the forward pass, or at the
    first breakpoint of ``break_at``.

    input: anything ``model.forward`` takes (text, token ids). The model runs with
        ``attn_implementation="eager"`` for this call, so that every attention intermediate is bound.
    break_at: a part of the forward pass (see ``breakpoint_for``: "attention", "3 mlp", ...), or a
        list of them; the walk starts at the first one reached.
    stdin, stdout: the debugger's streams (default: the terminal); pass ``io.StringIO`` objects to
        script a session.
    Returns what the forward pass returns (the logits), or None when the debugger was quit (``q``).
    """
    names = [] if break_at is None else [break_at] if isinstance(break_at, str) else list(break_at)
    places = [breakpoint_for(name, model.cfg.n_layer) for name in names]  # bad names fail here, before pdb starts
    if is_text(input):  # have the tokenizer built (and the text checked) before pdb starts
        model.to_tokens(input)
    debugger = Walk(model, stdin=stdin, stdout=stdout)
    if stdin is not None:
        debugger.use_rawinput = False
    for file, line, condition in places:
        error = debugger.set_break(file, line, cond=condition)
        if error:
            raise BreakError(f"break at {file}:{line}: {error}")
    if places:
        debugger.rcLines.append("continue")  # on to the first breakpoint
    saved = model.attn_implementation
    model.attn_implementation = "eager"
    try:
        return debugger.runcall(model.forward, input, **forward_kwargs)
    finally:
        model.attn_implementation = saved
        debugger.clear_all_breaks()
        if not any(bdb.Breakpoint.bpbynumber[1:]):  # none left anywhere: the next walk counts from 1
            bdb.Breakpoint.next, bdb.Breakpoint.bpbynumber = 1, [None]
