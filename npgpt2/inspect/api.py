"""What the inspector's page asks for, as plain functions of the model: JSON-ready dicts in,
JSON-ready dicts out. The server (server.py) only checks the request, runs these off its event
loop and writes their answers; a test or a notebook can call them directly.

Every request names a prompt and, optionally, a metric and a corrupted prompt:

    {"prompt": "...", "target": " Mary", "distractor": " John", "corrupted": "...",
     "prepend_bos": true}

The metric is read at the last position: logit[target] - logit[distractor] when both are given,
else log P(target), else log P(the model's top next token on the clean prompt). A bad field is an
``InspectError`` naming it (the server's 400). Nothing here reads a file or evaluates code named by
a request.

    Inspector.analyse(request)      tokens, next-token table, each token's loss, the metric
    Inspector.layer(request)        one depth of the forward: logit lens, residual norms, hook points
    Inspector.attention(request)    a layer's heads as thumbnails, one head's whole pattern
    Inspector.components(request)   heads, MLP layers (neurons, SAE latents) by direct and estimated
                                    total effect (attribution patching)
    Inspector.intervene(request)    the metric and next-token table with components ablated or patched
    Inspector.circuit(request)      EAP-IG edge scores (run as a job: progress, cancel)
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict

import numpy as np

from .. import metrics as metrics_module
from .. import ops
from ..analysis import ablation, attribution, edges
from ..analysis import patching
from ..hooks import HOOK_POINTS
from ..inputs import InputError

TOP_K = 10  # rows of the next-token table
LENS_TOP = 3  # logit-lens tokens per position
THUMB = 48  # the most positions a head's thumbnail pattern has
METHODS = ("zero", "mean", "patch")
_LATENT = re.compile(r"S(\d+)")  # an SAE latent: S<id>


class InspectError(ValueError):
    """A request that cannot be answered: ``status`` is its HTTP status (400 bad input)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Cancelled(Exception):
    """A job stopped because its client asked."""


# ---------------------------------------------------------------------------------- the request
def _field(body: dict, name: str, kind, default=None, required: bool = False):
    """body[name], checked to be of ``kind`` (a type or tuple of types); the default when absent."""
    if name not in body or body[name] is None:
        if required:
            raise InspectError(f"the request has no {name!r}: expected {_kind_name(kind)}")
        return default
    value = body[name]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise InspectError(f"{name}={value!r}: expected {_kind_name(kind)}, not a boolean")
    if not isinstance(value, kind):
        raise InspectError(f"{name}={value!r} is {_json_type(value)}: expected {_kind_name(kind)}")
    return value


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
             dict: "an object"}
    return " or ".join(dict.fromkeys(names.get(k, k.__name__) for k in kinds))


def _json_type(value) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


class Prompt:
    """A request's prompt, metric and corrupted prompt, checked and tokenized.

    tokens [1, pos]; corrupted [1, pos] or None; metric (``npgpt2.metrics``) and its description."""

    def __init__(self, model, body):
        if not isinstance(body, dict):
            raise InspectError(f"the request body is {_json_type(body)}: expected a JSON object")
        self.text = _field(body, "prompt", str, required=True)
        self.prepend_bos = _field(body, "prepend_bos", bool, default=True)
        if self.text == "":
            raise InspectError("the prompt is empty: type some text")
        self.tokens = _tokens(model, self.text, self.prepend_bos, "prompt")
        self.corrupted_text = _field(body, "corrupted", str, default="") or None
        self.corrupted = None
        if self.corrupted_text is not None:
            self.corrupted = _tokens(model, self.corrupted_text, self.prepend_bos, "corrupted prompt")
            if self.corrupted.shape != self.tokens.shape:
                raise InspectError(f"the corrupted prompt {self.corrupted_text!r} has {self.corrupted.shape[1]} tokens "
                                   f"and the prompt {self.tokens.shape[1]}: they must have the same number of tokens")
        target = _field(body, "target", str, default="") or None
        distractor = _field(body, "distractor", str, default="") or None
        self.target = None if target is None else _single_token(model, target, "target")
        self.distractor = None if distractor is None else _single_token(model, distractor, "distractor")
        if self.distractor is not None and self.target is None:
            raise InspectError(f"distractor={distractor!r} without a target: the metric is logit[target] - "
                               "logit[distractor]; give a target too")

    def choose_metric(self, model, logits: np.ndarray) -> None:
        """Set ``metric`` and ``metric_name`` (the top next token when no target was given)."""
        tok = model.tokenizer.token_str
        if self.target is None:
            self.target = int(logits[0, -1].argmax())
            self.metric = metrics_module.logprob(self.target)
            self.metric_name = f"log P({tok(self.target)!r}) (the top next token)"
        elif self.distractor is None:
            self.metric = metrics_module.logprob(self.target)
            self.metric_name = f"log P({tok(self.target)!r})"
        else:
            self.metric = metrics_module.logit_diff(self.target, self.distractor)
            self.metric_name = f"logit[{tok(self.target)!r}] - logit[{tok(self.distractor)!r}]"


def _tokens(model, text: str, prepend_bos: bool, what: str) -> np.ndarray:
    try:
        tokens = model.to_tokens(text, prepend_bos=prepend_bos)
    except InputError as e:
        raise InspectError(f"the {what}: {e}") from None
    if tokens.shape[1] > model.cfg.n_ctx:
        raise InspectError(f"the {what} is {tokens.shape[1]} tokens, longer than the model's context of "
                           f"n_ctx={model.cfg.n_ctx} tokens: shorten it")
    return tokens


def _single_token(model, text: str, what: str) -> int:
    try:
        return model.to_single_token(text)
    except InputError as e:
        raise InspectError(f"{what} {e}") from None


# ---------------------------------------------------------------------------------- the runs
class _Runs:
    """The clean runs of recent prompts (logits and every activation), shared by all clients: a
    page asks several questions of one prompt. Least recently used first out; thread-safe."""

    def __init__(self, model, size: int = 8):
        self.model, self.size, self._runs, self._lock = model, size, OrderedDict(), threading.Lock()

    def forget(self, tokens: np.ndarray) -> None:
        """Drop the run of ``tokens`` [1, pos], if kept."""
        with self._lock:
            self._runs.pop(tokens.tobytes(), None)

    def get(self, tokens: np.ndarray):
        """(logits [1, pos, d_vocab], ActivationCache) of ``tokens`` [1, pos]."""
        key = tokens.tobytes()
        with self._lock:
            if key in self._runs:
                self._runs.move_to_end(key)
                return self._runs[key]
        run = self.model.run_with_cache(tokens)  # outside the lock: other prompts go on meanwhile
        with self._lock:
            self._runs[key] = run
            while len(self._runs) > self.size:
                self._runs.popitem(last=False)
        return run


def _stats(a: np.ndarray) -> dict:
    """trace's summary of an activation: its shape and the mean, std, min, max of its finite values."""
    finite = a[np.isfinite(a)]
    return {"shape": list(a.shape), "mean": float(finite.mean()), "std": float(finite.std()),
            "min": float(finite.min()), "max": float(finite.max())}


def _top(values: np.ndarray, k: int) -> np.ndarray:
    """The indices of the k largest values along the last axis, largest first: [..., k]."""
    part = np.argpartition(-values, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(values, part, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1)


def _hook_doc(name: str) -> str:
    """What a hook point holds (``npgpt2.hooks.HOOK_POINTS``), with its shape."""
    general = re.sub(r"^blocks\.\d+\.", "blocks.{l}.", name)
    for spec in HOOK_POINTS:
        if spec.name == general:
            return f"{spec.shape}: {spec.doc}"
    return ""


def _round(a, digits: int = 4):
    return np.round(np.asarray(a, dtype=np.float64), digits).tolist()


class Inspector:
    """One model (and optionally an SAE) answering the page's questions. Safe to call from several
    threads at once: every call of the model keeps its own run state."""

    def __init__(self, model, sae=None):
        self.model, self.sae = model, sae
        self.runs = _Runs(model)
        if sae is not None:
            from ..sae import _check_fits

            _check_fits(model, sae)

    # ---------------------------------------------------------------------------- info
    def info(self) -> dict:
        """The model's name and shape, for the page's header and its checks."""
        c = self.model.cfg
        return {"model": self.model.name, "n_layer": c.n_layer, "n_head": c.n_head, "d_model": c.d_model,
                "d_mlp": c.d_mlp, "n_ctx": c.n_ctx, "d_vocab": c.d_vocab,
                "sae": None if self.sae is None else {"hook": self.sae.hook_name, "d_sae": self.sae.d_sae},
                "methods": list(METHODS)}

    def _prompt(self, body) -> tuple[Prompt, np.ndarray, object]:
        p = Prompt(self.model, body)
        logits, cache = self.runs.get(p.tokens)
        p.choose_metric(self.model, logits)
        return p, logits, cache

    def _next_tokens(self, logits: np.ndarray, before: np.ndarray | None = None) -> list[dict]:
        """The top tokens after the last position: token, id, probability, logit; with ``before``
        (the logits without the interventions) also each token's probability there."""
        last = logits[0, -1].astype(np.float64)
        logp = ops.log_softmax(last)
        old = None if before is None else np.exp(ops.log_softmax(before[0, -1].astype(np.float64)))
        rows = []
        for t in _top(last, TOP_K):
            row = {"token": self.model.tokenizer.token_str(t), "id": int(t), "prob": float(np.exp(logp[t])),
                   "logit": float(last[t])}
            if old is not None:
                row["prob_before"] = float(old[t])
            rows.append(row)
        return rows

    # ---------------------------------------------------------------------------- analyse
    def analyse(self, body) -> dict:
        """The prompt's tokens, the loss of each (its log-probability given the ones before), the
        next-token table, the metric on the clean (and corrupted) prompt."""
        p, logits, _ = self._prompt(body)
        tok = self.model.tokenizer.token_str
        ids = p.tokens[0]
        logp = ops.log_softmax(logits[0, :-1].astype(np.float64))  # [pos - 1, d_vocab]
        loss = [None] + (-logp[np.arange(len(ids) - 1), ids[1:]]).tolist()  # nats; the first has no prediction
        out = {"tokens": [tok(t) for t in ids], "ids": ids.tolist(), "loss": loss,
               "next_tokens": self._next_tokens(logits), "metric": p.metric(logits), "metric_name": p.metric_name,
               "target": tok(p.target), "corrupted_metric": None, "corrupted_tokens": None}
        if p.corrupted is not None:
            corrupted_logits, _ = self.runs.get(p.corrupted)
            out["corrupted_metric"] = p.metric(corrupted_logits)
            out["corrupted_tokens"] = [tok(t) for t in p.corrupted[0]]
        return out

    # ---------------------------------------------------------------------------- layer stepper
    def layer(self, body) -> dict:
        """Depth d (0: the embeddings, l + 1: after block l): for every position the logit lens's
        top tokens there and the residual stream's norm; and every hook point of the block that
        ends there (the embeddings' at 0, the final layer norm's at the last depth) with its shape
        and summary statistics."""
        p, logits, cache = self._prompt(body)
        n = self.model.cfg.n_layer
        depth = _field(body, "depth", int, default=n)
        if not 0 <= depth <= n:
            raise InspectError(f"depth={depth} is out of range: 0 (the embeddings) .. {n} (after the last block)")
        resid = cache["resid_pre", depth] if depth < n else cache["resid_post", n - 1]  # [1, pos, d_model]
        if depth == n:  # the lens after the last block is the model's own output
            lens_logits = logits
        else:  # the residual stream through the final layer norm (its own scale) and the unembedding
            normed = cache.apply_ln_to_stack(resid[None], None, recompute_ln=True)[0]
            lens_logits = ops.linear(normed, self.model.weights.W_U, self.model.weights.b_U)
        lens = ops.log_softmax(lens_logits[0].astype(np.float64))  # [pos, d_vocab]
        top = _top(lens, LENS_TOP)
        tok = self.model.tokenizer.token_str
        ids = p.tokens[0]
        positions = []
        for j in range(len(ids)):
            row = {"top": [{"token": tok(t), "prob": float(np.exp(lens[j, t]))} for t in top[j]],
                   "norm": float(np.linalg.norm(resid[0, j].astype(np.float64)))}
            if j + 1 < len(ids):
                row["next_prob"] = float(np.exp(lens[j, ids[j + 1]]))
            positions.append(row)
        if depth == 0:
            names = [h for h in self.model.hook_names() if h.startswith("hook_")] + ["blocks.0.hook_resid_pre"]
        else:
            names = [h for h in self.model.hook_names() if h.startswith(f"blocks.{depth - 1}.")
                     and not h.endswith("attn.hook_result")]
            if depth == n:
                names += [h for h in self.model.hook_names() if h.startswith("ln_final.")]
        label = "embeddings" if depth == 0 else f"after block {depth - 1}"
        return {"depth": depth, "label": label, "n_layer": n, "positions": positions,
                "hooks": [{"name": h, "doc": _hook_doc(h), **_stats(cache[h])} for h in names]}

    # ---------------------------------------------------------------------------- attention
    def attention(self, body) -> dict:
        """One layer's attention: ``thumbs``, every head's pattern at most THUMB x THUMB (the mean of
        each block of query and key positions when the prompt is longer) [head, q, k]; and
        ``pattern``, head ``head``'s whole pattern [query_pos, key_pos]; rounded to 4 decimals."""
        p, _, cache = self._prompt(body)
        layer = _field(body, "layer", int, default=0)
        head = _field(body, "head", int, default=0)
        if not 0 <= layer < self.model.cfg.n_layer:
            raise InspectError(f"layer={layer} is out of range 0..{self.model.cfg.n_layer - 1}")
        if not 0 <= head < self.model.cfg.n_head:
            raise InspectError(f"head={head} is out of range 0..{self.model.cfg.n_head - 1}")
        pattern = cache["pattern", layer][0]  # [head, q, k]
        n = pattern.shape[-1]
        bins = np.arange(n) * min(n, THUMB) // n  # each position's block
        starts, counts = np.flatnonzero(np.diff(bins, prepend=-1)), np.bincount(bins)
        summed = np.add.reduceat(np.add.reduceat(pattern.astype(np.float64), starts, axis=1), starts, axis=2)
        thumbs = summed / (counts[:, None] * counts[None, :])  # [head, block, block]
        return {"layer": layer, "head": head, "tokens": [self.model.tokenizer.token_str(t) for t in p.tokens[0]],
                "thumbs": _round(thumbs, 3), "pattern": _round(pattern[head])}

    # ---------------------------------------------------------------------------- interventions
    def _references(self, p: Prompt, cache, method: str, names) -> dict:
        """{hook name: the array an intervention puts in place of the activation} [1, pos, ...]:
        zeros; the clean activation's mean over the prompt's positions; the corrupted run's."""
        if method == "patch":
            if p.corrupted is None:
                raise InspectError("method 'patch' needs a corrupted prompt: give one (with as many tokens as the prompt)")
            _, corrupted = self.runs.get(p.corrupted)
            return {n: corrupted[n] for n in names}
        if method == "mean":
            return {n: np.broadcast_to(cache[n].mean(axis=1, keepdims=True), cache[n].shape) for n in names}
        return {n: np.zeros_like(cache[n]) for n in names}

    def _component(self, name) -> tuple[str, tuple]:
        """A component's name -> (hook point, index after [batch, pos]); SAE latents 'S<id>' index
        the SAE's latents (hook point: the SAE's)."""
        if not isinstance(name, str):
            raise InspectError(f"component {name!r} is {_json_type(name)}: expected a name such as 'L0H1'")
        m = _LATENT.fullmatch(name)
        if m:
            if self.sae is None:
                raise InspectError(f"component {name!r} is an SAE latent but no SAE was loaded (npgpt2 inspect --sae)")
            if not int(m.group(1)) < self.sae.d_sae:
                raise InspectError(f"component {name!r}: latent {m.group(1)} is out of range 0..{self.sae.d_sae - 1}")
            return self.sae.hook_name, ("latent", int(m.group(1)))
        try:
            return ablation.parse_component(self.model, name)
        except InputError as e:
            raise InspectError(str(e) + " (or S<latent> with an SAE)") from None

    def _hooks(self, p: Prompt, cache, items) -> list:
        """The forward hooks that make the interventions ``items`` [(component, method)]."""
        by_hook: dict[str, list] = {}
        for name, method in items:
            hook, index = self._component(name)
            by_hook.setdefault(hook, []).append((index, method))
        hooks = []
        for hook, changes in by_hook.items():
            plain = [(i, m) for i, m in changes if i[:1] != ("latent",)]
            refs = {m: self._references(p, cache, m, [hook])[hook] for _, m in plain}
            latents = [(i[1], m) for i, m in changes if i[:1] == ("latent",)]
            latent_refs = {}
            if latents:
                f_clean = self.sae.encode(cache[hook])  # [1, pos, d_sae]
                for _, m in latents:
                    if m == "patch":
                        latent_refs[m] = self.sae.encode(self._references(p, cache, m, [hook])[hook])
                    elif m == "mean":
                        latent_refs[m] = np.broadcast_to(f_clean.mean(axis=1, keepdims=True), f_clean.shape)
                    else:
                        latent_refs[m] = np.zeros_like(f_clean)

            def fn(act, point, plain=plain, refs=refs, latents=latents, latent_refs=latent_refs):
                act = act.copy()
                for index, method in plain:
                    where = (slice(None), slice(None)) + index
                    act[where] = refs[method][where]
                if latents:
                    f = self.sae.encode(act)  # the latents as this run has them
                    for latent, method in latents:
                        change = latent_refs[method][..., latent] - f[..., latent]  # [1, pos]
                        act = act + (change[..., None] * self.sae.W_dec[latent]).astype(act.dtype)
                return act

            hooks.append((hook, fn))
        return hooks

    def intervene(self, body) -> dict:
        """The prompt rerun with ``interventions`` [{"component": "L0H1", "method": "zero"|"mean"|"patch"}]:
        the metric before and after, its change, and the new next-token table.

        zero: the component's activation set to 0; mean: to its mean over the prompt's positions;
        patch: to its value in the corrupted prompt's run. A head is its z, an MLP layer its output,
        a neuron its post-GELU activation, an SAE latent its activation (the SAE's reconstruction
        error is kept: only that latent's decoder direction changes)."""
        p, logits, cache = self._prompt(body)
        items = _field(body, "interventions", list, default=[])
        parsed = []
        for k, item in enumerate(items):
            if not isinstance(item, dict):
                raise InspectError(f"interventions[{k}]={item!r} is {_json_type(item)}: expected an object "
                                   "{\"component\": \"L0H1\", \"method\": \"zero\"}")
            name = _field(item, "component", str, required=True)
            method = _field(item, "method", str, default="zero")
            if method not in METHODS:
                raise InspectError(f"interventions[{k}]: method={method!r}; expected one of {', '.join(METHODS)}")
            parsed.append((name, method))
        before = p.metric(logits)
        new_logits = self.model.run_with_hooks(p.tokens, fwd_hooks=self._hooks(p, cache, parsed)) if parsed else logits
        after = p.metric(new_logits)
        return {"metric_name": p.metric_name, "before": before, "after": after, "change": after - before,
                "next_tokens": self._next_tokens(new_logits, before=logits),
                "interventions": [{"component": c, "method": m} for c, m in parsed]}

    # ---------------------------------------------------------------------------- components
    def components(self, body) -> dict:
        """Heads and MLP layers (with ``neurons``: every MLP neuron; with an SAE: its latents), each
        with its direct effect and its estimated total effect.

        direct: the component's direct write, through the final layer norm (its scale frozen),
        onto logit[target] - logit[distractor] (``direct_logit_attribution``), or onto logit[target]
        when there is no distractor.
        total (attribution patching): the first-order estimate of the metric's change when the
        component's activation is replaced as ``method`` replaces it (patch: by the corrupted run's;
        else zero or mean): sum of (replacement - clean) * d metric / d activation, the gradient
        on the clean run."""
        p, _, cache = self._prompt(body)
        method = _field(body, "method", str, default="patch" if p.corrupted is not None else "zero")
        if method not in METHODS:
            raise InspectError(f"method={method!r}; expected one of {', '.join(METHODS)}")
        neurons = _field(body, "neurons", bool, default=False)
        n_layer, n_head = self.model.cfg.n_layer, self.model.cfg.n_head
        names = [f"blocks.{l}.{h}" for l in range(n_layer) for h in ("attn.hook_z", "hook_mlp_out")]
        if neurons:
            names += [f"blocks.{l}.mlp.hook_post" for l in range(n_layer)]
        if self.sae is not None:
            names.append(self.sae.hook_name)
        names = list(dict.fromkeys(names))
        _, grads = self.model.run_with_cache(p.tokens, names_filter=names, incl_bwd=True, metric=p.metric)
        refs = self._references(p, cache, method, names)
        total = {"z": patching._attribution(self.model, refs, grads, "z", ("layer", "head")),  # [layer, head]
                 "mlp_out": patching._attribution(self.model, refs, grads, "mlp_out", ("layer",))}  # [layer]
        direct = {}  # heads and MLP layers (an MLP's output with its b_out); each neuron (post x W_out)
        for by in ("head", "neuron") if neurons else ("head",):
            frame = attribution.direct_logit_attribution(self.model, cache, p.tokens, p.target, p.distractor, by=by)
            direct.update(zip(frame["component"], frame["attribution"]))
        rows = []
        for l in range(n_layer):
            for h in range(n_head):
                rows.append({"component": f"L{l}H{h}", "type": "head", "layer": l,
                             "direct": float(direct[f"L{l}H{h}"]), "total": float(total["z"][l, h])})
            mlp = f"{l}_mlp_out"
            rows.append({"component": f"mlp{l}", "type": "mlp", "layer": l,
                         "direct": float(direct[mlp]),
                         "total": float(total["mlp_out"][l])})
        if neurons:
            for l in range(n_layer):
                post = f"blocks.{l}.mlp.hook_post"  # the same estimate, each neuron's entries summed
                per_neuron = ((refs[post] - grads[post]) * grads[post + "_grad"]).sum(axis=(0, 1))  # [d_mlp]
                for i in range(self.model.cfg.d_mlp):
                    rows.append({"component": f"L{l}N{i}", "type": "neuron", "layer": l,
                                 "direct": float(direct[f"L{l}N{i}"]), "total": float(per_neuron[i])})
        if self.sae is not None:
            rows += self._latent_rows(p, cache, grads, method)
        return {"metric_name": p.metric_name, "method": method, "rows": rows,
                "direct_onto": (f"logit[{self.model.tokenizer.token_str(p.target)!r}]"
                                + ("" if p.distractor is None else
                                   f" - logit[{self.model.tokenizer.token_str(p.distractor)!r}]"))}

    def _latent_rows(self, p, cache, grads, method) -> list[dict]:
        """SAE latents' estimated total effects: (replacement - clean) latent activation times the
        gradient along its decoder direction, summed over positions."""
        hook = self.sae.hook_name
        f = self.sae.encode(cache[hook])  # [1, pos, d_sae]
        if method == "patch":
            ref = self.sae.encode(self._references(p, cache, "patch", [hook])[hook])
        elif method == "mean":
            ref = f.mean(axis=1, keepdims=True)
        else:
            ref = np.zeros_like(f)
        along = grads[hook + "_grad"] @ self.sae.W_dec.T  # [1, pos, d_sae]
        total = ((ref - f) * along).sum(axis=(0, 1))
        layer = int(hook.split(".")[1]) if hook.startswith("blocks.") else -1
        active = np.flatnonzero((f[0] > 0).any(axis=0) | (np.abs(total) > 0))
        return [{"component": f"S{i}", "type": "latent", "layer": layer, "direct": None, "total": float(total[i])}
                for i in active]

    # ---------------------------------------------------------------------------- circuit
    def check_circuit(self, body) -> tuple[Prompt, int, int]:
        """A circuit request checked (before any work): (prompt, ig_steps, top)."""
        p = Prompt(self.model, body)
        if p.corrupted is None:
            raise InspectError("the circuit needs a corrupted prompt (with as many tokens as the prompt): "
                               "EAP-IG scores edges by what changes between the two")
        steps = _field(body, "ig_steps", int, default=5)
        top = _field(body, "top", int, default=300)
        if not 1 <= steps <= 100:
            raise InspectError(f"ig_steps={steps}: expected 1..100")
        if top < 1:
            raise InspectError(f"top={top}: expected a positive number of edges")
        return p, steps, top

    def circuit(self, body, progress=None) -> dict:
        """EAP-IG scores of every edge between the corrupted and the clean prompt, the top ``top``
        (default 300) by |score|; the page thresholds them. ``progress(done, total)`` is called as
        the forward passes go, and may raise ``Cancelled`` to stop the work."""
        p, steps, top = self.check_circuit(body)
        p.choose_metric(self.model, self.runs.get(p.tokens)[0])
        hooks = []
        if progress is not None:
            n = self.model.cfg.n_layer
            runs = 2 + -(-steps // max(1, edges._IG_ROWS // p.tokens.size))  # clean, corrupted, the IG runs
            count = [0]

            def tick(act, point):
                count[0] += 1
                progress(min(count[0], runs * n), runs * n)

            hooks = [(f"blocks.{l}.hook_resid_pre", tick) for l in range(n)]
        with self.model.hooks(hooks):
            scores = edges.edge_attribution(self.model, p.tokens, p.corrupted, p.metric, method="eap-ig",
                                            ig_steps=steps)
        kept = scores.head(top)
        return {"metric_name": p.metric_name, "n_edges": len(scores), "n_layer": self.model.cfg.n_layer,
                "n_head": self.model.cfg.n_head,
                "edges": [{"upstream": r.upstream, "downstream": r.downstream, "input": r.input, "score": float(r.score)}
                          for r in kept.itertuples()]}
