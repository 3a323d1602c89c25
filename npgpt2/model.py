"""GPT-2's forward pass, top to bottom.

Read ``GPT2._forward`` first: embed the tokens, then ``n_layer`` blocks of (layer norm -> attention
-> add, layer norm -> MLP -> add), then the final layer norm and the unembedding. Everything that
is not maths (checking the input, tokenizing, positions, masks, which path to take) happens on
its first line, in inputs.py. Every named activation passes through ``run(name, array)``: ``run``
is this call's run state (hooks.Run), which hands the array to the hook functions at that name,
returns it (or what a hook replaced it with) and keeps it when ``run_with_cache`` asked for it.
Every line that makes an array says its shape, in one vocabulary: ``[batch, pos, d_model]``,
``[batch, pos, head, d_head]``, ``[batch, head, query_pos, key_pos]``, ... The weights go by
TransformerLens's names (``W_E``, ``W_pos``, ``W_qkv``/``b_qkv`` for W_Q, W_K, W_V side by side,
``W_O``, ``b_O``, ``W_in``, ``b_in``, ``W_out``, ``b_out``, ``W_U``), in GPT-2's layout
(``x @ W + b``; see weights.py).

The whole of GPT-2 without hooks, caches or checks fits on one screen: ``npgpt2/reference.py``.
``npgpt2.step_through(model, "The cat sat")`` opens this file in the debugger; see docs/forward-pass.md.

Attention has two implementations that give the same numbers (to rounding):

* ``"eager"``: the textbook ``pattern = softmax(q k^T / sqrt(d_head) + mask)``, ``z = pattern v``,
  every intermediate bound to a name. Used whenever a hook function is set on the scores or the
  pattern, and always with ``model.attn_implementation = "eager"``.
* ``"blockwise"`` (the default otherwise): ``ops.causal_attention``, a block of queries at a time
  against only the keys it may see: about half the arithmetic and a block-sized working set (with
  the whole scores and pattern made too when the cache keeps them).

When nobody looks inside, fast.py runs the blocks instead. The products here (``fast.linear``) and
the blockwise attention (``fast.attention``) are cut into the pieces fast.py uses, so a call with a
cache or hooks gives the plain call's logits bit for bit (the eager path: within rounding, about
1e-6 of the logits in float32). ``fast.matmul`` is ``@`` with BLAS's thread count held fixed, so
that what other threads do cannot change the last bits (threads.py).
"""

from __future__ import annotations

import math

import numpy as np

from . import fast, ops
from . import generate as sampling  # the sampling loop (it calls the model; the model does not call back)
from .backward import Differentiable
from .config import GPT2Config
from .hooks import HookedModel, HookError, HookPoint, Run  # noqa: F401  (HookError, HookPoint: old import path)
from .inputs import Call, InputError, TokenInput
from .kv_cache import KeyValueCache
from .tokenizer import Tokenizer
from .accessors import ModuleAccessors, WeightViews  # WeightViews: views.py
from .weights import BlockWeights, GPT2Weights

ATTN_IMPLEMENTATIONS = ("blockwise", "eager")


class GPT2(HookedModel, Differentiable, TokenInput, WeightViews, ModuleAccessors):
    """GPT-2 in NumPy. Build one with ``npgpt2.from_pretrained(name)`` (loading.py).

    ``cfg`` holds the shape, ``weights`` the arrays (GPT-2's own layout), ``tokenizer`` the BPE.
    Hooks and caching come from ``HookedModel`` (hooks.py), gradients from ``Differentiable``
    (backward.py), token handling from ``TokenInput`` (inputs.py), TransformerLens's weight names
    (``W_Q``, ``W_O``, ...) from ``WeightViews``, ``model.blocks[l].attn.W_Q``, ``OV`` from ``ModuleAccessors``.
    """

    def __init__(self, cfg: GPT2Config, weights: GPT2Weights, tokenizer: Tokenizer | None = None,
                 name: str | None = None, attn_implementation: str = "blockwise"):
        self.cfg = cfg
        self.weights = weights
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer()
        self.name = name or "gpt2"
        self.attn_implementation = attn_implementation
        self.fast_path = True  # run the blocks with fast.py when nobody looks inside
        self.source: str | None = None  # where the files came from (set by the loader)
        self.files = None  # their local paths (hub.CheckpointFiles, set by the loader)
        self.processing = {"fold_ln": False, "center_writing_weights": False,
                           "center_unembed": False, "fold_value_biases": False, "refactor_factored_attn_matrices": False}
        self._init_hooks()

    @property
    def attn_implementation(self) -> str:
        """"blockwise" (fast; the default) or "eager" (the textbook path, every name bound)."""
        return self._attn_implementation

    @attn_implementation.setter
    def attn_implementation(self, value: str) -> None:
        if value not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation={value!r}: expected one of {', '.join(ATTN_IMPLEMENTATIONS)}")
        self._attn_implementation = value

    @property
    def config(self) -> GPT2Config:
        return self.cfg

    @property
    def dtype(self) -> np.dtype:
        return self.weights.W_E.dtype

    def __repr__(self):
        c = self.cfg
        return (f"GPT2({self.name!r}: n_layer={c.n_layer}, n_head={c.n_head}, d_model={c.d_model}, "
                f"d_vocab={c.d_vocab}, n_ctx={c.n_ctx}, dtype={self.dtype})")

    # ------------------------------------------------------------------------------------------
    # The forward pass
    # ------------------------------------------------------------------------------------------
    def forward(self, input, return_type: str | None = "logits", *, attention_mask=None,
                past_kv: KeyValueCache | None = None, start_at_layer: int | None = None,
                stop_at_layer: int | None = None, tokens=None, prepend_bos: bool | None = None,
                padding_side: str | None = None, loss_per_token: bool = False):
        """Run GPT-2.

        input: text, a list of texts (padded, see ``to_tokens``), or token ids [batch, pos]
            (or [pos]). With ``start_at_layer=l`` it is instead the residual stream entering block l,
            [batch, pos, d_model], and ``tokens`` supplies the ids for the loss.
        return_type: "logits" -> [batch, pos, d_vocab]; "loss" -> scalar; "both" -> (logits, loss);
            None -> nothing (run for the hooks' sake).
        loss_per_token: the loss of each prediction instead of their mean, [batch, pos - 1]
            (TransformerLens's keyword), NaN where the target or the token before it is padding.
        attention_mask: [batch, pos] 1 for real tokens, 0 for padding. Taken from the tokenizer when
            ``input`` is a list of texts. Padding keys get no attention, positions count from each
            row's first real token, and the loss skips padding: a left-padded prompt's real
            positions give what the prompt gives alone.
        prepend_bos, padding_side: for text input, as in ``to_tokens`` (None: the model's default,
            ``cfg.default_prepend_bos``; right padding).
        past_kv: a ``KeyValueCache`` holding earlier positions; the new positions are appended to it.
            Every layer must run (no start/stop_at_layer).
        start_at_layer / stop_at_layer: run blocks [start, stop) only. With ``stop_at_layer`` the
            residual stream leaving the last block run is returned, [batch, pos, d_model].
        """
        return self._forward(self._new_run(), input, return_type, attention_mask, past_kv, start_at_layer, stop_at_layer, tokens, prepend_bos, padding_side, loss_per_token)

    __call__ = forward

    def _forward(self, run: Run, input, return_type="logits", attention_mask=None, past_kv=None,
                 start_at_layer=None, stop_at_layer=None, tokens=None, prepend_bos=None, padding_side=None,
                 loss_per_token=False):
        """``forward``, with this call's run state ``run`` (hooks.Run: the hooks it fires, what it keeps).

        Everything that is not maths happens on the first line (``_prepare_call``, inputs.py): the
        input checked and made token ids, their positions, the masks, the choice of paths."""
        # one line, the last that is not maths: tokens, positions, masks, the layers to run (an inputs.Call)
        call = self._prepare_call(run, input, attention_mask, past_kv, start_at_layer, stop_at_layer, tokens, prepend_bos, padding_side)
        x = self._embed(run, call.tokens, call.positions) if call.resid is None else call.resid  # [batch, pos, d_model]
        if call.fast:  # nobody looks inside: fast.py computes the same numbers on every core
            x = fast.blocks(self, x, call.start, call.stop, run, past_kv)  # [batch, pos, d_model]
        else:
            for l in range(call.start, call.stop):
                x = self._block(run, l, self.weights.blocks[l], x, call)  # [batch, pos, d_model]
        if past_kv is not None:  # every layer has appended this call's keys and values
            past_kv.advance(x.shape[1])
        if stop_at_layer is not None:  # the residual stream leaving the last block run
            return x

        logits = fast.unembed(self, x, run) if call.fast else self._unembed(run, x)  # [batch, pos, d_vocab]
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        if call.tokens is None:
            raise InputError("the loss needs token ids: pass tokens=... together with start_at_layer")
        loss = self._loss_from_logits(logits, call.tokens, call.attention_mask, per_token=loss_per_token)  # a float, or [batch, pos - 1]
        if return_type == "loss":
            return loss
        if return_type == "both":
            return logits, loss
        raise ValueError(f"return_type={return_type!r}: expected 'logits', 'loss', 'both' or None")

    def _embed(self, run: Run, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Token embedding plus position embedding.  tokens, positions [batch, pos] -> [batch, pos, d_model]"""
        return run("hook_embed", self.weights.W_E[tokens]) + run("hook_pos_embed", self.weights.W_pos[positions])

    def _block(self, run: Run, l: int, w: BlockWeights, x: np.ndarray, call: Call) -> np.ndarray:
        """Block ``l`` (weights ``w``): attention, then the MLP, each reading a layer norm of the
        residual stream and adding its output to it.  [batch, pos, d_model] -> [batch, pos, d_model]"""
        resid_pre = run(f"blocks.{l}.hook_resid_pre", x)  # [batch, pos, d_model]
        attn_in = self._layer_norm(run, f"blocks.{l}.ln1.", resid_pre, w.ln1_w, w.ln1_b)  # [batch, pos, d_model]
        attn_out = run(f"blocks.{l}.hook_attn_out", self._attention(run, l, w, attn_in, call))  # [batch, pos, d_model]
        resid_mid = run(f"blocks.{l}.hook_resid_mid", resid_pre + attn_out)  # [batch, pos, d_model]
        mlp_in = self._layer_norm(run, f"blocks.{l}.ln2.", resid_mid, w.ln2_w, w.ln2_b)  # [batch, pos, d_model]
        mlp_out = run(f"blocks.{l}.hook_mlp_out", self._mlp(run, l, w, mlp_in))  # [batch, pos, d_model]
        return run(f"blocks.{l}.hook_resid_post", resid_mid + mlp_out)  # [batch, pos, d_model]

    def _layer_norm(self, run: Run, name: str, x: np.ndarray, w: np.ndarray | None, b: np.ndarray | None) -> np.ndarray:
        """Layer norm, its scale and normalized value exposed at ``name`` + hook_scale, hook_normalized.
        ``w``, ``b``: the gain and bias (None once folded into the next matmul).  [batch, pos, d_model] -> same"""
        centred = ops.center(x)  # [batch, pos, d_model]: x minus its mean
        scale = run(name + "hook_scale", ops.ln_scale(centred, self.cfg.layer_norm_epsilon))  # [batch, pos, 1]: sqrt(var + eps)
        normalized = run(name + "hook_normalized", centred / scale)  # [batch, pos, d_model]
        return ops.affine(normalized, w, b)  # [batch, pos, d_model]: normalized * w + b

    def _attention(self, run: Run, l: int, w: BlockWeights, x: np.ndarray, call: Call) -> np.ndarray:
        """Causal multi-head self-attention of block ``l``.  [batch, pos, d_model] -> [batch, pos, d_model]

        Each head scores its queries against its keys, q . k / sqrt(d_head), -inf for a key a query
        may not see (later, or padding); the softmax of a query's scores weighs the values it sums
        into z; W_O maps the heads' z, side by side, back into the residual stream."""
        qkv = fast.linear(x, w.W_qkv, w.b_qkv).reshape(*x.shape[:2], 3, self.cfg.n_head, self.cfg.d_head)  # [batch, pos, 3, head, d_head]
        q = run(f"blocks.{l}.attn.hook_q", qkv[:, :, 0])  # [batch, pos, head, d_head]
        k = run(f"blocks.{l}.attn.hook_k", qkv[:, :, 1])  # [batch, pos, head, d_head]
        v = run(f"blocks.{l}.attn.hook_v", qkv[:, :, 2])  # [batch, pos, head, d_head]
        if call.past_kv is not None:  # the earlier positions' keys and values come first
            k, v = call.past_kv.extend(l, k, v)  # [batch, key_pos, head, d_head]
        if l in call.eager:  # the textbook way, every step named (a hook, or attn_implementation="eager")
            # [batch, head, query_pos, key_pos]: query . key / sqrt(d_head), -inf where a query may not look
            scores = run(f"blocks.{l}.attn.hook_attn_scores", fast.matmul(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1)) / math.sqrt(self.cfg.d_head) + call.mask)
            pattern = run(f"blocks.{l}.attn.hook_pattern", ops.softmax(scores))  # [batch, head, query_pos, key_pos]
            z = fast.matmul(pattern, v.transpose(0, 2, 1, 3))  # [batch, head, query_pos, d_head]: each query's mix of values
        else:  # the same numbers, a block of queries at a time
            z = self._attention_by_blocks(run, l, q, k, v, call)  # [batch, head, query_pos, d_head]
        z = run(f"blocks.{l}.attn.hook_z", z.transpose(0, 2, 1, 3))  # [batch, pos, head, d_head]

        if run.wants(f"blocks.{l}.attn.hook_result"):
            # Each head's write into the residual stream, z[h] @ W_O[h]. Their sum plus b_O is the
            # attention output, so a hook that edits one head's result edits the output.
            batch, pos, n_head, d_head = z.shape
            W_O = w.W_O.reshape(n_head, d_head, -1)  # [head, d_head, d_model]
            z_rows = z.transpose(2, 0, 1, 3).reshape(n_head, batch * pos, d_head)  # [head, rows, d_head]: one product per head
            result = fast.matmul(z_rows, W_O).reshape(n_head, batch, pos, -1).transpose(1, 2, 0, 3)  # [batch, pos, head, d_model]
            result = run(f"blocks.{l}.attn.hook_result", result)  # [batch, pos, head, d_model]
            return result.sum(axis=2) + w.b_O  # [batch, pos, d_model]
        return fast.linear(z.reshape(*z.shape[:2], -1), w.W_O, w.b_O)  # [batch, pos, d_model]: concat(z) @ W_O + b_O

    def _attention_by_blocks(self, run: Run, l: int, q, k, v, call: Call) -> np.ndarray:
        """``_attention``'s scores, pattern and z, a block of queries at a time against only the keys
        they may see (``ops.causal_attention``, its heads shared out as fast.py shares them:
        ``fast.attention``): the same numbers, about half the arithmetic and a block-sized working
        set. The scores and pattern are made whole only when someone keeps them.
        q [batch, pos, head, d_head]; k, v [batch, key_pos, head, d_head] -> z [batch, head, query_pos, d_head]"""
        q = q.transpose(0, 2, 1, 3) / math.sqrt(self.cfg.d_head)  # [batch, head, query_pos, d_head]
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [batch, head, key_pos, d_head]
        names = f"blocks.{l}.attn.hook_attn_scores", f"blocks.{l}.attn.hook_pattern"
        if not run.wants(*names):
            return fast.attention(q, k, v, padding=call.padding)
        scores, pattern, z = fast.attention(q, k, v, padding=call.padding, kept=True)  # kept, not changed
        run(names[0], scores)  # [batch, head, query_pos, key_pos]
        run(names[1], pattern)  # [batch, head, query_pos, key_pos]
        return z

    def _mlp(self, run: Run, l: int, w: BlockWeights, x: np.ndarray) -> np.ndarray:
        """The feed-forward layer of block ``l``.  [batch, pos, d_model] -> [batch, pos, d_model]"""
        pre = run(f"blocks.{l}.mlp.hook_pre", fast.linear(x, w.W_in, w.b_in))  # [batch, pos, d_mlp]
        post = run(f"blocks.{l}.mlp.hook_post", fast.gelu_new(pre))  # [batch, pos, d_mlp]
        return fast.linear(post, w.W_out, w.b_out)  # [batch, pos, d_model]

    def _unembed(self, run: Run, resid: np.ndarray) -> np.ndarray:
        """Final layer norm, then the unembedding.  [batch, pos, d_model] -> [batch, pos, d_vocab]"""
        normalized = self._layer_norm(run, "ln_final.", resid, self.weights.ln_final_w, self.weights.ln_final_b)  # [batch, pos, d_model]
        return fast.linear(normalized, self.weights.W_U, self.weights.b_U, by="columns")  # [batch, pos, d_vocab]

    # ``model.unembed(resid)`` (final layer norm, then the unembedding) is in accessors.py, where
    # ``model.unembed`` also shows ``W_U`` and ``b_U`` as TransformerLens's module does.

    # ------------------------------------------------------------------------------------------
    # Loss
    # ------------------------------------------------------------------------------------------
    def loss(self, input, per_token: bool = False, attention_mask=None, prepend_bos: bool | None = None,
             padding_side: str | None = None):
        """Mean next-token cross-entropy (nats). ``per_token=True`` -> [batch, pos - 1], with NaN
        where the target or the position predicting it is padding (so ``np.nanmean`` gives the mean)."""
        tokens, mask = self._prepare(input, attention_mask, prepend_bos=prepend_bos, padding_side=padding_side)  # [batch, pos]
        logits = self.forward(tokens, attention_mask=mask)  # [batch, pos, d_vocab]
        return self._loss_from_logits(logits, tokens, mask, per_token)

    @staticmethod
    def _loss_from_logits(logits, tokens, mask, per_token: bool):
        if tokens.shape[1] < 2:
            raise InputError("the loss needs at least 2 tokens (one to predict from, one to predict)")
        nll = ops.cross_entropy(logits[:, :-1], tokens[:, 1:])  # [batch, pos - 1]
        if mask is not None:
            mask = np.asarray(mask)
            real = (mask[:, 1:] > 0) & (mask[:, :-1] > 0)  # [batch, pos - 1]: predictions of a real token from one
            if not per_token and not real.any():  # every prediction masked: a mean of nothing
                raise InputError("the loss has no target to average over: attention_mask leaves no two "
                                 "consecutive real tokens in any row")
            nll = np.where(real, nll, np.nan)  # [batch, pos - 1], NaN at padding
        if per_token:
            return nll
        return float(np.nanmean(nll))

    # ------------------------------------------------------------------------------------------
    # Generation (see generate.py)
    # ------------------------------------------------------------------------------------------
    def generate(self, input, max_new_tokens: int = 20, **kwargs):
        """Continue a prompt; see ``npgpt2.generate.generate``."""
        return sampling.generate(self, input, max_new_tokens=max_new_tokens, **kwargs)

    def generate_stream(self, input, max_new_tokens: int = 20, **kwargs):
        """Yield new tokens as they are produced; see ``npgpt2.generate.generate_stream``."""
        return sampling.generate_stream(self, input, max_new_tokens=max_new_tokens, **kwargs)

    # ------------------------------------------------------------------------------------------
    # Weights
    # ------------------------------------------------------------------------------------------
    def process_weights(self, fold_ln: bool = False, center_writing_weights: bool = False,
                        center_unembed: bool = False, fold_value_biases: bool = False,
                        refactor_factored_attn_matrices: bool = False) -> "GPT2":
        """Rewrite the weights, keeping the log-probabilities (see ``npgpt2.processing``).
        Returns the model. ``self.processing`` records what has been applied."""
        from .processing import process_weights

        asked = dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                     center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                     refactor_factored_attn_matrices=refactor_factored_attn_matrices)
        again = [k for k, v in asked.items() if v and self.processing.get(k)]
        if again:
            raise ValueError(f"already applied to this model: {', '.join(again)}")
        self.weights = process_weights(self.weights, self.cfg, **asked)
        self.processing = {k: self.processing.get(k, False) or v for k, v in asked.items()}
        return self

    def accumulated_bias(self, layer: int, mlp_input: bool = False,
                         include_mlp_biases: bool = True) -> np.ndarray:
        """Sum of the output biases written into the residual stream before ``layer``: each b_O,
        and each b_out with ``include_mlp_biases``; ``mlp_input`` adds layer ``layer``'s b_O.
        [d_model]"""
        total = np.zeros(self.cfg.d_model, self.dtype)
        for w in self.weights.blocks[:layer]:
            total = total + w.b_O + (w.b_out if include_mlp_biases else 0)
        if mlp_input:
            total = total + self.weights.blocks[layer].b_O
        return total

    def save_pretrained(self, folder) -> str:
        """Write config.json, model.safetensors (float32, the hub's layout), vocab.json and merges.txt
        into ``folder``, atomically; transformers' ``from_pretrained(folder)`` loads it. See save.py."""
        from .save import save_pretrained

        return save_pretrained(self, folder)

    def n_params(self) -> int:
        """Number of parameters (a tied unembedding counted once)."""
        return self.weights.n_params()

    def _repr_html_(self) -> str:
        """Jupyter's view: sizes, dtype, processing and where the files are (see display.py)."""
        from .display import model_html

        return model_html(self)
