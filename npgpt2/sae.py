"""Sparse autoencoders on GPT-2's activations, in NumPy: load published ones, splice them into the
forward pass, read their latents, and train new ones with hand-written gradients.

    f  = ReLU((x - b_dec) @ W_enc + b_enc)      latents        [..., d_sae]
    x^ = f @ W_dec + b_dec                       reconstruction [..., d_in]

``SAE.from_pretrained("gpt2-small-res-jb", "blocks.8.hook_resid_pre")`` mirrors SAELens's call and
reads SAELens's format (a folder per hook point with ``cfg.json`` and ``sae_weights.safetensors``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import ops

# SAELens releases this loader knows: release -> hub repo, the model they were trained on, and the
# weight processing that model had (TransformerLens's from_pretrained defaults). Of those, only
# center_writing_weights changes the residual stream these SAEs read.
RELEASES = {
    "gpt2-small-res-jb": {
        "repo_id": "jbloom/GPT2-Small-SAEs-Reformatted",
        "model": "gpt2",
        "sae_ids": [f"blocks.{l}.hook_resid_pre" for l in range(12)] + ["blocks.11.hook_resid_post"],
        "processing": {"center_writing_weights": True},
        "defaults": {"prepend_bos": True},  # trained on TransformerLens's tokens, which start with BOS
    },
}


class SAEError(ValueError):
    """An SAE that cannot be loaded or does not fit the model or the activations given to it."""


@dataclass
class SAE:
    """A sparse autoencoder. W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].

    hook_name: where in the model its input is read (e.g. ``blocks.8.hook_resid_pre``).
    cfg: everything else known about it (the ``cfg.json`` of a published SAE).
    """

    W_enc: np.ndarray
    b_enc: np.ndarray
    W_dec: np.ndarray
    b_dec: np.ndarray
    hook_name: str | None = None
    cfg: dict = field(default_factory=dict)

    def __post_init__(self):
        d_in, d_sae = self.W_enc.shape
        expected = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise SAEError(f"SAE {name} has shape {list(getattr(self, name).shape)}; expected "
                               f"{list(shape)} for W_enc {list(self.W_enc.shape)}")

    def __repr__(self):
        return f"SAE({self.hook_name or 'no hook'}: d_in={self.d_in}, d_sae={self.d_sae}, dtype={self.W_enc.dtype})"

    def _repr_html_(self) -> str:
        from .display import sae_html

        return sae_html(self)

    @property
    def d_in(self) -> int:
        """The width of the activation it reads."""
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        """The number of latents."""
        return self.W_enc.shape[1]

    # ------------------------------------------------------------------------------- the maps
    def _check_input(self, x):
        x = np.asarray(x)
        if x.shape[-1] != self.d_in:
            raise SAEError(f"activations of width {x.shape[-1]} given to an SAE with d_in={self.d_in}"
                           + (f" (it reads {self.hook_name})" if self.hook_name else ""))
        return x

    def encode_pre(self, x: np.ndarray) -> np.ndarray:
        """Latent pre-activations (x - b_dec) @ W_enc + b_enc.  [..., d_in] -> [..., d_sae]"""
        x = self._check_input(x)
        return ops.linear(x - self.b_dec, self.W_enc, self.b_enc)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """Latents f = ReLU(encode_pre(x)).  [..., d_in] -> [..., d_sae]"""
        return np.maximum(self.encode_pre(x), 0)

    def decode(self, f: np.ndarray) -> np.ndarray:
        """f @ W_dec + b_dec.  [..., d_sae] -> [..., d_in]"""
        return ops.linear(np.asarray(f), self.W_dec, self.b_dec)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The reconstruction decode(encode(x)).  [..., d_in] -> [..., d_in]"""
        return self.decode(self.encode(x))

    def metrics(self, x: np.ndarray) -> dict:
        """Reconstruction quality and sparsity on activations x [..., d_in]:
        mse (mean over rows of the summed squared error), fraction of variance explained,
        L0 (mean number of active latents per row), dead latents (never active on x)."""
        x = self._check_input(x).reshape(-1, self.d_in).astype(np.float64)
        f = self.encode(x)
        err = self.decode(f) - x
        total = ((x - x.mean(0)) ** 2).sum()
        return {"mse": float((err ** 2).sum(-1).mean()), "fve": float(1 - (err ** 2).sum() / total),
                "l0": float((f > 0).sum(-1).mean()), "dead_latents": int(((f > 0).sum(0) == 0).sum()),
                "n": len(x)}

    # ------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, release: str, sae_id: str, revision: str | None = None,
                        cache_dir: str | None = None, local_files_only: bool = False,
                        dtype: str = "float32") -> "SAE":
        """Load a published SAE in SAELens's format.

        release: a known release (``gpt2-small-res-jb``), a hub repo id, or a local folder; sae_id:
        the folder inside it (for the known releases, the hook point, e.g. ``blocks.8.hook_resid_pre``).
        The files are ``{sae_id}/cfg.json`` and ``{sae_id}/sae_weights.safetensors``.

        ``sae.cfg["model_processing"]`` says how the model must be loaded for the SAE's input to
        match its training (for gpt2-small-res-jb: ``center_writing_weights=True``, as
        TransformerLens loads gpt2 by default); ``run_with_sae`` checks it.
        """
        info = RELEASES.get(release)
        if info is not None and sae_id not in info["sae_ids"]:
            raise SAEError(f"{release} has no SAE {sae_id!r}; it has {', '.join(info['sae_ids'])}")
        if os.path.isdir(release):
            folder = os.path.join(release, sae_id)
            cfg_path, weights_path = (os.path.join(folder, n) for n in ("cfg.json", "sae_weights.safetensors"))
            for p in (cfg_path, weights_path):
                if not os.path.isfile(p):
                    raise SAEError(f"{p} does not exist")
        else:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

            repo_id = info["repo_id"] if info else release
            try:
                cfg_path, weights_path = (hf_hub_download(repo_id, f"{sae_id}/{n}", revision=revision,
                                                          cache_dir=cache_dir, local_files_only=local_files_only)
                                          for n in ("cfg.json", "sae_weights.safetensors"))
            except LocalEntryNotFoundError:
                raise SAEError(f"SAE {sae_id} of {release} ({repo_id}) is not in the local Hugging Face cache "
                               "and downloads are off; fetch it once while online") from None
            except (EntryNotFoundError, RepositoryNotFoundError) as e:
                raise SAEError(f"no SAE {sae_id!r} in {repo_id}: {e}") from None
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        from .weights import to_compute_dtype, read_safetensors

        tensors = read_safetensors(weights_path)
        missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in tensors]
        if missing:
            raise SAEError(f"{weights_path} lacks {', '.join(missing)} (found {', '.join(sorted(tensors))})")
        arrays = {k: to_compute_dtype(k, tensors[k], np.dtype(dtype)) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
        for key in ("d_in", "d_sae"):
            if key in cfg and cfg[key] != {"d_in": arrays["W_enc"].shape[0], "d_sae": arrays["W_enc"].shape[1]}[key]:
                raise SAEError(f"cfg.json says {key}={cfg[key]} but W_enc has shape {list(arrays['W_enc'].shape)}")
        cfg = dict(cfg)
        cfg.setdefault("model_processing", (info or {}).get("processing", {}))
        for key, value in (info or {}).get("defaults", {}).items():
            cfg.setdefault(key, value)
        cfg.setdefault("release", release)
        hook = cfg.get("hook_name") or cfg.get("hook_point") or (sae_id if "hook_" in sae_id else None)
        return cls(**arrays, hook_name=hook, cfg=cfg)

    def save(self, folder: str) -> str:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` (SAELens's layout) into ``folder``."""
        from safetensors.numpy import save_file

        os.makedirs(folder, exist_ok=True)
        save_file({k: np.ascontiguousarray(getattr(self, k)) for k in ("W_enc", "b_enc", "W_dec", "b_dec")},
                  os.path.join(folder, "sae_weights.safetensors"))
        with open(os.path.join(folder, "cfg.json"), "w", encoding="utf-8") as f:
            json.dump({"d_in": self.d_in, "d_sae": self.d_sae, "hook_point": self.hook_name,
                       **{k: v for k, v in self.cfg.items() if k not in ("d_in", "d_sae")}}, f, indent=2)
        return folder


# ------------------------------------------------------------------------------ with a model
def _check_fits(model, sae: SAE):
    if sae.hook_name is None or sae.hook_name not in model.hook_names():
        raise SAEError(f"the SAE reads {sae.hook_name!r}, which is not a hook point of this model")
    needed = sae.cfg.get("model_processing", {})
    missing = [k for k, v in needed.items() if v and not model.processing.get(k)]
    if missing:
        opts = ", ".join(f"{k}=True" for k in missing)
        raise SAEError(f"this SAE was trained on activations of a model loaded with {opts}; load the model "
                       f"with npgpt2.from_pretrained(..., {opts}) or call model.process_weights({opts})")


def _sae_tokens(model, sae: SAE, input):
    """Text is tokenized with the BOS the SAE was trained with; token ids pass as they are."""
    return model.tokens_and_mask(input, prepend_bos=bool(sae.cfg.get("prepend_bos", False)))[0]


def run_with_sae(model, sae: SAE, input, return_type="logits"):
    """The forward pass with the SAE's reconstruction in place of the activation it reads.
    Text is tokenized with the BOS the SAE was trained with (``cfg["prepend_bos"]``)."""
    _check_fits(model, sae)
    tokens = _sae_tokens(model, sae, input)
    return model.run_with_hooks(tokens, fwd_hooks=[(sae.hook_name, lambda act, hook: sae(act))],
                                return_type=return_type)


def ce_loss_recovered(model, sae: SAE, input) -> pd.DataFrame:
    """The usual splice test: next-token loss of the clean model, with the SAE's reconstruction
    spliced in, and with the activation zero-ablated; ``ce_loss_recovered`` =
    (zero-ablated - spliced) / (zero-ablated - clean): 1 means the reconstruction loses nothing."""
    _check_fits(model, sae)
    tokens = _sae_tokens(model, sae, input)
    clean = model.loss(tokens)
    spliced = run_with_sae(model, sae, tokens, return_type="loss")
    zero = model.run_with_hooks(tokens, fwd_hooks=[(sae.hook_name, lambda act, hook: act * 0)],
                                return_type="loss")
    return pd.DataFrame([{"hook": sae.hook_name, "clean_loss": clean, "sae_loss": spliced,
                          "zero_ablation_loss": zero,
                          "ce_loss_recovered": (zero - spliced) / (zero - clean) if zero != clean else np.nan}])


def _activations(model, sae: SAE, tokens) -> np.ndarray:
    _, cache = model.run_with_cache(tokens, names_filter=sae.hook_name)
    return cache[sae.hook_name]


def active_latents(model, sae: SAE, prompt, k: int = 5) -> pd.DataFrame:
    """The ``k`` most active latents at each position of one prompt: position, token, rank, latent,
    activation (active latents only)."""
    _check_fits(model, sae)
    tokens = _sae_tokens(model, sae, prompt)[:1]
    f = sae.encode(_activations(model, sae, tokens))[0]  # [pos, d_sae]
    rows = []
    for p, t in enumerate(tokens[0]):
        for r, latent in enumerate(np.argsort(-f[p])[:k]):
            if f[p, latent] > 0:
                rows.append({"position": p, "token": model.tokenizer.token_str(t), "rank": r,
                             "latent": int(latent), "activation": float(f[p, latent])})
    return pd.DataFrame(rows, columns=["position", "token", "rank", "latent", "activation"])


def top_activating(model, sae: SAE, texts, latent: int, k: int = 10, context: int = 6,
                   batch_size: int = 8) -> pd.DataFrame:
    """Where latent ``latent`` fires most over a corpus: the ``k`` strongest (text, position)
    pairs, with the token and ``context`` tokens either side. Texts are read in batches."""
    _check_fits(model, sae)
    if not 0 <= latent < sae.d_sae:
        raise SAEError(f"latent {latent} is out of range 0..{sae.d_sae - 1}")
    best: list[tuple] = []
    texts = list(texts)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        tokens, mask = model.to_tokens(chunk, prepend_bos=bool(sae.cfg.get("prepend_bos", False)), return_mask=True)
        tokens = tokens[:, : model.cfg.n_ctx]
        acts = _activations(model, sae, tokens)
        f = np.maximum(ops.linear(acts - sae.b_dec, sae.W_enc[:, latent : latent + 1], sae.b_enc[latent : latent + 1]), 0)[..., 0]
        f = np.where(mask[:, : tokens.shape[1]] > 0, f, -np.inf)
        for b, p in zip(*np.unravel_index(np.argsort(-f, axis=None)[:k], f.shape)):
            if f[b, p] > 0:
                best.append((float(f[b, p]), start + b, p, tokens[b][mask[b] > 0]))  # without padding
    best.sort(key=lambda r: -r[0])
    rows = []
    for act, text_index, p, row in best[:k]:
        left = "".join(model.tokenizer.token_str(t) for t in row[max(0, p - context) : p])
        right = "".join(model.tokenizer.token_str(t) for t in row[p + 1 : p + 1 + context])
        rows.append({"activation": act, "text": text_index, "position": int(p),
                     "token": model.tokenizer.token_str(row[p]), "context": f"{left}[[{model.tokenizer.token_str(row[p])}]]{right}"})
    return pd.DataFrame(rows, columns=["activation", "text", "position", "token", "context"])


def latent_logit_effect(model, sae: SAE, latent: int, k: int = 10) -> pd.DataFrame:
    """A latent's direct effect on the logits: W_dec[latent] @ W_U, its ``k`` most promoted and most
    suppressed tokens. (Direct path only: the final layer norm's scale is ignored, its gain applied.)"""
    if not 0 <= latent < sae.d_sae:
        raise SAEError(f"latent {latent} is out of range 0..{sae.d_sae - 1}")
    direction = sae.W_dec[latent]
    if model.weights.ln_final_w is not None:
        direction = direction * model.weights.ln_final_w
    effect = direction @ model.W_U
    order = np.argsort(-effect)
    rows = [{"direction": "promoted", "rank": r, "token": model.tokenizer.token_str(t), "logit_effect": float(effect[t])}
            for r, t in enumerate(order[:k])]
    rows += [{"direction": "suppressed", "rank": r, "token": model.tokenizer.token_str(t), "logit_effect": float(effect[t])}
             for r, t in enumerate(order[::-1][:k])]
    return pd.DataFrame(rows)
