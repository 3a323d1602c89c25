"""Per-feature statistics over a corpus that merge exactly: any split of the corpus, merged in any
order, gives the same bits.

For each of F features (neurons of a hook point, or SAE latents), over every token seen:

* ``n_tokens``; ``fire_count`` (activation > ``threshold``); ``max``, ``min``;
* ``sum`` and ``sum_firing`` in fixed point (integers of 2**-20): integer addition is associative,
  float addition is not, so the mean does not depend on how the corpus was split;
* a histogram with fixed bins, a quarter octave wide: 0 for |x| < 2**-10, then
  +-[2**(j/4), 2**((j+1)/4)) up to 2**12 (the last bins open-ended); counts are integers;
* the top ``k`` (value, context, position), ordered by value descending, then context, then position
  (ties broken by where they are, never by arrival order);
* a reservoir of ``m`` examples per octave band of firing values [2**b, 2**(b+1)): of the tokens in
  the band, those with the smallest 32-bit hash of (feature column, context, position), ties broken
  by context and position. A bottom-m sample by a
  fixed hash is a uniform sample that any split reproduces, and the bottom-m of a union of bands is
  the union's own sample, so the dashboard's coarser quantile bands sample exactly too.

Arrays: ``top_*`` [k, F]; ``res_*`` [F, n_bands, m]; ``hist`` [F, n_bins].
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

SCALE = 2.0 ** 20  # fixed point of the sums: |sum| must stay below 2**63 / 2**20, about 8.8e12
HIST_LO, HIST_HI, PER_OCTAVE = -10, 12, 4  # the histogram covers |x| in [2**-10, 2**12)
N_SIDE = (HIST_HI - HIST_LO) * PER_OCTAVE  # bins on each side of zero
N_BINS = 2 * N_SIDE + 1
N_BANDS = HIST_HI - HIST_LO  # octave bands of the reservoir
EMPTY_CTX = np.iinfo(np.int64).max  # an empty top-k / reservoir slot
EMPTY_POS = np.iinfo(np.int32).max
EMPTY_HASH = np.iinfo(np.uint32).max
SPARSE_BELOW = 0.1  # a batch with fewer non-zero activations than this fraction is counted sparsely


class StatsError(ValueError):
    """Statistics that cannot be merged (other features, k, shards counted twice)."""


def histogram_bins() -> pd.DataFrame:
    """The fixed bins: bin, lo, hi. Bins are by |x|: lo <= x < hi for x > 0, lo < x <= hi for x < 0
    (mirrored), the zero bin is |x| < 2**-10."""
    edges = 2.0 ** (HIST_LO + np.arange(N_SIDE + 1) / PER_OCTAVE)  # [N_SIDE + 1]
    lo = np.concatenate([-edges[1:][::-1], [-edges[0]], edges[:-1]])
    hi = np.concatenate([-edges[:-1][::-1], [edges[0]], edges[1:]])
    lo[0], hi[-1] = -np.inf, np.inf  # the outermost bins take everything beyond
    return pd.DataFrame({"bin": np.arange(N_BINS), "lo": lo, "hi": hi})


def band_range(band: int) -> tuple[float, float]:
    """Octave band b -> [2**(b + HIST_LO), 2**(b + HIST_LO + 1)) (the first and last open-ended)."""
    lo = 0.0 if band == 0 else 2.0 ** (band + HIST_LO)
    hi = np.inf if band == N_BANDS - 1 else 2.0 ** (band + HIST_LO + 1)
    return lo, hi


# mantissa bits of float32 m (1 + m / 2**23) at or above 2**(1/4), 2**(1/2), 2**(3/4)
_QUARTERS = [np.int32(math.ceil((2.0 ** (k / PER_OCTAVE) - 1) * 2**23)) for k in range(1, PER_OCTAVE)]


def _quarter_octaves(a: np.ndarray) -> np.ndarray:
    """j such that 2**(HIST_LO + j/4) <= |a| < 2**(HIST_LO + (j+1)/4), clipped to [-1, N_SIDE];
    read exactly off float32's exponent and mantissa bits.  [...] -> [...] int32"""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.int32) & np.int32(0x7FFFFFFF)
    mantissa = bits & np.int32(0x7FFFFF)
    q = ((bits >> 23) - np.int32(127 + HIST_LO)) * np.int32(PER_OCTAVE)
    for t in _QUARTERS:
        q += mantissa >= t
    return np.clip(q, -1, N_SIDE, out=q)


def bin_index(x: np.ndarray, q: np.ndarray | None = None) -> np.ndarray:
    """Histogram bin of each value (``q``: its ``_quarter_octaves``, if known).  [...] -> [...] in [0, N_BINS)"""
    b = np.minimum(_quarter_octaves(x) if q is None else q, N_SIDE - 1)
    b += 1  # 0 for the zero bin, j + 1 for quarter octave j
    np.negative(b, out=b, where=x <= 0)
    b += N_SIDE
    return b


def band_index(x: np.ndarray, q: np.ndarray | None = None) -> np.ndarray:
    """Octave band of each (firing) value.  [...] -> [...] in [0, N_BANDS)"""
    q = _quarter_octaves(x) if q is None else q
    return np.clip(q >> 2 if PER_OCTAVE == 4 else q // PER_OCTAVE, 0, N_BANDS - 1)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser (wrapping arithmetic), in place."""
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def _row_hash(context, position) -> np.ndarray:
    key = (np.asarray(context, dtype=np.uint64) << np.uint64(20)) ^ np.asarray(position, dtype=np.uint64)
    return (_splitmix64(key) >> np.uint64(32)).astype(np.uint32)


def _feature_hash(feature) -> np.ndarray:
    return (_splitmix64(np.asarray(feature, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)).astype(np.uint32)


def example_hash(feature, context, position) -> np.ndarray:
    """The reservoir's fixed pseudo-random key of (feature column, context, position):
    fmix32(hi32(splitmix64(context << 20 ^ position)) ^ hi32(splitmix64(feature + golden))).  -> uint32"""
    return _fmix32(_row_hash(context, position) ^ _feature_hash(feature))


@dataclass
class FeatureStats:
    """Mergeable statistics of ``n_features`` features; build with ``FeatureStats.empty``."""

    top_k: int
    per_band: int
    threshold: float
    n_tokens: int
    shards: tuple  # sorted shard indices counted in here
    fire_count: np.ndarray  # [F] int64
    sum: np.ndarray  # [F] int64, fixed point
    sum_firing: np.ndarray  # [F] int64, fixed point
    max: np.ndarray  # [F] float32 (-inf before any token)
    min: np.ndarray  # [F] float32
    hist: np.ndarray  # [F, N_BINS] int64
    top_value: np.ndarray  # [k, F] float32, -inf when empty
    top_context: np.ndarray  # [k, F] int64
    top_position: np.ndarray  # [k, F] int32
    res_hash: np.ndarray  # [F, N_BANDS, m] uint32
    res_value: np.ndarray  # [F, N_BANDS, m] float32
    res_context: np.ndarray  # [F, N_BANDS, m] int64
    res_position: np.ndarray  # [F, N_BANDS, m] int32

    ARRAYS = ("fire_count", "sum", "sum_firing", "max", "min", "hist", "top_value", "top_context",
              "top_position", "res_hash", "res_value", "res_context", "res_position")

    @classmethod
    def empty(cls, n_features: int, top_k: int = 20, per_band: int = 5, threshold: float = 0.0) -> "FeatureStats":
        if top_k < 1 or per_band < 1:
            raise StatsError(f"top_k={top_k}, per_band={per_band}: expected at least 1 each")
        if not 0 <= threshold < np.inf:  # NaN fails too
            raise StatsError(f"threshold={threshold}: expected a finite number >= 0 (a feature fires above it)")
        F, k, m = n_features, top_k, per_band
        return cls(top_k, per_band, float(threshold), 0, (), np.zeros(F, np.int64), np.zeros(F, np.int64),
                   np.zeros(F, np.int64), np.full(F, -np.inf, np.float32), np.full(F, np.inf, np.float32),
                   np.zeros((F, N_BINS), np.int64), np.full((k, F), -np.inf, np.float32),
                   np.full((k, F), EMPTY_CTX, np.int64), np.full((k, F), EMPTY_POS, np.int32),
                   np.full((F, N_BANDS, m), EMPTY_HASH, np.uint32), np.zeros((F, N_BANDS, m), np.float32),
                   np.full((F, N_BANDS, m), EMPTY_CTX, np.int64), np.full((F, N_BANDS, m), EMPTY_POS, np.int32))

    @property
    def n_features(self) -> int:
        return len(self.fire_count)

    # ------------------------------------------------------------------------------- update
    def add(self, acts: np.ndarray, first_context: int, first_position: int = 0) -> None:
        """Count activations of consecutive contexts, in place.

        acts: [n_contexts, n_pos, F] for contexts first_context.. at positions first_position..
        Mostly-zero activations (SAE latents) are counted from their non-zero entries only.
        """
        n_ctx, n_pos, F = acts.shape
        if F != self.n_features:
            raise StatsError(f"activations of {F} features given to statistics of {self.n_features}")
        x = np.ascontiguousarray(acts, dtype=np.float32).reshape(n_ctx * n_pos, F)  # [N, F]
        rows = np.arange(len(x))
        ctx_of = first_context + rows // n_pos  # [N]
        pos_of = (first_position + rows % n_pos).astype(np.int32)  # [N]
        self.n_tokens += len(x)
        nonzero = x != 0
        if np.count_nonzero(nonzero) < SPARSE_BELOW * x.size:
            r, c = np.nonzero(nonzero)
            self._add_sparse(len(x), r, c, x[r, c], ctx_of, pos_of)
            return
        firing = x > np.float32(self.threshold)  # [N, F]
        q = _quarter_octaves(x)  # [N, F] int32

        self.fire_count += np.count_nonzero(firing, axis=0)
        fixed = np.rint(x * np.float32(SCALE)).astype(np.int64)  # exact: a power-of-two scale
        self.sum += fixed.sum(0)
        self.sum_firing += np.where(firing, fixed, 0).sum(0)
        np.maximum(self.max, x.max(0), out=self.max)
        np.minimum(self.min, x.min(0), out=self.min)
        flat = bin_index(x, q) + np.arange(F, dtype=np.int32) * N_BINS  # [N, F]
        self.hist += np.bincount(flat.ravel(), minlength=F * N_BINS).reshape(F, N_BINS)

        # top k: only firing tokens at or above a feature's current k-th value can enter
        candidate = firing & (x >= self.top_value[-1])  # [N, F]
        if np.count_nonzero(candidate) > 2 * self.top_k * F:  # e.g. the first batch: select densely
            self._add_top(np.where(firing, x, -np.inf), ctx_of, pos_of)
        else:
            r, c = np.nonzero(candidate)
            self._add_top_sparse(c, x[r, c], ctx_of[r], pos_of[r])

        # reservoir: only tokens whose hash is at most their band's current m-th smallest can enter
        band = band_index(x, q)  # [N, F]
        band += np.arange(F, dtype=band.dtype) * N_BANDS  # -> group = feature * N_BANDS + band
        h = _fmix32(_row_hash(ctx_of, pos_of)[:, None] ^ _feature_hash(np.arange(F))[None, :])  # [N, F]
        keep = firing & (h <= self.res_hash[:, :, -1].ravel()[band])
        r, c = np.nonzero(keep)
        self._offer_examples(band[r, c], h[r, c], x[r, c], ctx_of[r], pos_of[r])

    def _add_sparse(self, N: int, r, c, v, ctx_of, pos_of) -> None:
        """``add`` from the non-zero entries (row r, feature c, value v) of N rows; the rest are 0."""
        F = self.n_features
        nnz = np.bincount(c, minlength=F)  # [F] non-zero entries per feature
        zeros = N - nnz  # [F]
        firing = v > np.float32(self.threshold)  # zeros never fire: threshold >= 0
        self.fire_count += np.bincount(c[firing], minlength=F)
        fixed = np.rint(v * np.float32(SCALE)).astype(np.int64)
        np.add.at(self.sum, c, fixed)
        np.add.at(self.sum_firing, c[firing], fixed[firing])
        np.maximum.at(self.max, c, v)
        np.minimum.at(self.min, c, v)
        has_zero = zeros > 0
        self.max[has_zero] = np.maximum(self.max[has_zero], np.float32(0))
        self.min[has_zero] = np.minimum(self.min[has_zero], np.float32(0))
        q = _quarter_octaves(v)
        self.hist += np.bincount(c * N_BINS + bin_index(v, q), minlength=F * N_BINS).reshape(F, N_BINS)
        self.hist[:, N_SIDE] += zeros  # the zero bin

        r, c, v, q = r[firing], c[firing], v[firing], q[firing]
        ctx, pos = ctx_of[r], pos_of[r]
        top = v >= self.top_value[-1][c]
        self._add_top_sparse(c[top], v[top], ctx[top], pos[top])
        group = band_index(v, q) + c * N_BANDS
        h = example_hash(c, ctx, pos)
        keep = h <= self.res_hash[:, :, -1].ravel()[group]
        self._offer_examples(group[keep], h[keep], v[keep], ctx[keep], pos[keep])

    def _offer_examples(self, group, h, value, context, position) -> None:
        """Entries that may enter the reservoir (1-D; group = feature * N_BANDS + band) -> merged in."""
        if not len(group):
            return
        n_group = np.bincount(group, minlength=self.n_features * N_BANDS)
        m = self.per_band
        if len(group) > 8 * m * np.count_nonzero(n_group):  # e.g. the first batch: most tokens could enter
            # a cut-off per group near 4 m / n of the hash range; a group where fewer than m passed it
            # keeps all its tokens. Those cut lose to m kept ones with smaller hashes: exact.
            cutoff = np.minimum(4.0 * m / np.maximum(n_group, 1) * 2.0**32, 2.0**32 - 1).astype(np.uint32)
            passed = h <= cutoff[group]
            short = np.bincount(group[passed], minlength=len(n_group)) < np.minimum(n_group, m)
            sel = passed | short[group]
            group, h, value, context, position = group[sel], h[sel], value[sel], context[sel], position[sel]
        self._add_examples(group, h, value, context, position)

    def _add_top(self, v: np.ndarray, ctx_of, pos_of) -> None:
        """The batch's k best rows per feature (exact at ties: lowest row first), merged in."""
        N, F = v.shape
        k = min(self.top_k, N)
        cols = np.arange(F)
        pick = np.argpartition(-v, k - 1, axis=0)[:k]  # [k, F], unordered, ties arbitrary
        kth = v[pick, cols].min(0)  # [F] the k-th largest value
        tied = np.isfinite(kth) & ((v >= kth).sum(0) > k)  # more rows than slots share the k-th value
        for c in np.nonzero(tied)[0]:  # rare: sort those columns stably (row order = (context, position))
            pick[:, c] = np.argsort(-v[:, c], kind="stable")[:k]
        self._merge_top(v[pick, cols], ctx_of[pick], pos_of[pick].astype(np.int32))

    def _add_top_sparse(self, col, value, context, position) -> None:
        """Candidate entries (1-D arrays) -> each feature's k best of them, merged in."""
        if not len(col):
            return
        k = self.top_k
        order = np.lexsort((position, context, -value, col))
        col, value, context, position = col[order], value[order], context[order], position[order]
        rank = _rank_in_runs(col)
        sel = rank < k
        cols = np.flatnonzero(np.bincount(col, minlength=self.n_features))
        slot = np.searchsorted(cols, col[sel])
        v = np.full((k, len(cols)), -np.inf, np.float32)
        c = np.full((k, len(cols)), EMPTY_CTX, np.int64)
        p = np.full((k, len(cols)), EMPTY_POS, np.int32)
        v[rank[sel], slot], c[rank[sel], slot], p[rank[sel], slot] = value[sel], context[sel], position[sel]
        self._merge_top(v, c, p, cols)

    def _merge_top(self, value, context, position, cols=None) -> None:
        """Merge candidates [k', F] (or [k', len(cols)] for those columns) into the top k."""
        sl = slice(None) if cols is None else cols
        value = np.concatenate([self.top_value[:, sl], value])
        context = np.concatenate([self.top_context[:, sl], context])
        position = np.concatenate([self.top_position[:, sl], position])
        order = np.lexsort((position, context, -value), axis=0)[: self.top_k]  # [k, F']
        ar = np.arange(value.shape[1])
        value, context, position = value[order, ar], context[order, ar], position[order, ar]
        empty = ~np.isfinite(value)
        if cols is None:
            self.top_value = value
            self.top_context = np.where(empty, EMPTY_CTX, context)
            self.top_position = np.where(empty, EMPTY_POS, position).astype(np.int32)
        else:
            self.top_value[:, cols] = value
            self.top_context[:, cols] = np.where(empty, EMPTY_CTX, context)
            self.top_position[:, cols] = np.where(empty, EMPTY_POS, position)

    def _add_examples(self, group, h, value, context, position) -> None:
        """Entries (1-D arrays; group = feature * N_BANDS + band) -> the reservoir keeps, per
        group, the m of smallest (hash, context, position)."""
        m = self.per_band
        touched = np.flatnonzero(np.bincount(group, minlength=self.n_features * N_BANDS))
        arrays = [a.reshape(-1, m) for a in (self.res_hash, self.res_value, self.res_context, self.res_position)]
        old = [a[touched].ravel() for a in arrays]
        g = np.concatenate([np.repeat(touched, m), group])
        hh = np.concatenate([old[0], h])
        vv = np.concatenate([old[1], value.astype(np.float32)])
        cc = np.concatenate([old[2], context])
        pp = np.concatenate([old[3], position.astype(np.int32)])
        key = (g.astype(np.uint64) << np.uint64(32)) | hh.astype(np.uint64)  # (group, hash) in one number
        order = np.argsort(key)
        if np.any(key[order][1:] == key[order][:-1]):  # a hash shared within a group: by (context, position)
            order = np.lexsort((pp, cc, hh, g))
        g, hh, vv, cc, pp = g[order], hh[order], vv[order], cc[order], pp[order]
        rank = _rank_in_runs(g)  # place within its group
        sel = rank < m
        slot = np.searchsorted(touched, g[sel]) * m + rank[sel]
        for a, new, fill in zip(arrays, (hh, vv, cc, pp), (EMPTY_HASH, 0, EMPTY_CTX, EMPTY_POS)):
            block = np.full((len(touched), m), fill, dtype=a.dtype)
            block.ravel()[slot] = new[sel]
            a[touched] = block

    # ------------------------------------------------------------------------------- merge
    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """The statistics of both (disjoint) parts of a corpus; neither is changed."""
        same = (self.n_features, self.top_k, self.per_band, self.threshold)
        theirs = (other.n_features, other.top_k, other.per_band, other.threshold)
        if same != theirs:
            raise StatsError(f"cannot merge statistics of (features, top_k, per_band, threshold)={theirs} "
                             f"into {same}")
        overlap = set(self.shards) & set(other.shards)
        if overlap:
            raise StatsError(f"shard {min(overlap)} is counted in both statistics")
        out = FeatureStats(self.top_k, self.per_band, self.threshold, self.n_tokens + other.n_tokens,
                           tuple(sorted(self.shards + other.shards)), self.fire_count + other.fire_count,
                           self.sum + other.sum, self.sum_firing + other.sum_firing,
                           np.maximum(self.max, other.max), np.minimum(self.min, other.min),
                           self.hist + other.hist, self.top_value.copy(), self.top_context.copy(),
                           self.top_position.copy(), *self._merged_reservoir(other))
        out._merge_top(other.top_value, other.top_context, other.top_position)
        return out

    def _merged_reservoir(self, other):
        keys = [np.concatenate([getattr(self, n), getattr(other, n)], axis=-1)
                for n in ("res_hash", "res_value", "res_context", "res_position")]
        order = np.lexsort((keys[3], keys[2], keys[0]), axis=-1)[..., : self.per_band]  # [F, B, m]
        return [np.take_along_axis(a, order, axis=-1) for a in keys]

    # ------------------------------------------------------------------------------- tables
    def features_table(self, feature_ids=None) -> pd.DataFrame:
        """One row per feature: feature, n_tokens, fire_count, density, mean, mean_firing, max, min."""
        ids = np.arange(self.n_features) if feature_ids is None else np.asarray(feature_ids)
        n = max(self.n_tokens, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_firing = np.where(self.fire_count > 0, self.sum_firing / SCALE / np.maximum(self.fire_count, 1), np.nan)
        return pd.DataFrame({"feature": ids, "n_tokens": self.n_tokens, "fire_count": self.fire_count,
                             "density": self.fire_count / n, "mean": self.sum / SCALE / n,
                             "mean_firing": mean_firing, "max": self.max, "min": self.min})

    def top_table(self, feature_ids=None) -> pd.DataFrame:
        """feature, rank, context, position, value: the top k of each feature (firing tokens only)."""
        ids = np.arange(self.n_features) if feature_ids is None else np.asarray(feature_ids)
        rank, col = np.nonzero(np.isfinite(self.top_value))
        order = np.lexsort((rank, col))
        rank, col = rank[order], col[order]
        return pd.DataFrame({"feature": ids[col], "rank": rank, "context": self.top_context[rank, col],
                             "position": self.top_position[rank, col], "value": self.top_value[rank, col]})

    def examples_table(self, feature_ids=None) -> pd.DataFrame:
        """feature, band, band_lo, band_hi, rank, context, position, value, hash: the reservoir."""
        ids = np.arange(self.n_features) if feature_ids is None else np.asarray(feature_ids)
        f, b, r = np.nonzero(self.res_hash != EMPTY_HASH)
        ranges = np.array([band_range(i) for i in range(N_BANDS)])
        return pd.DataFrame({"feature": ids[f], "band": b, "band_lo": ranges[b, 0], "band_hi": ranges[b, 1],
                             "rank": r, "context": self.res_context[f, b, r], "position": self.res_position[f, b, r],
                             "value": self.res_value[f, b, r], "hash": self.res_hash[f, b, r]})

    def histogram_table(self, feature_ids=None) -> pd.DataFrame:
        """feature, bin, lo, hi, count: the histogram's non-empty bins."""
        ids = np.arange(self.n_features) if feature_ids is None else np.asarray(feature_ids)
        bins = histogram_bins()
        f, b = np.nonzero(self.hist)
        return pd.DataFrame({"feature": ids[f], "bin": b, "lo": bins["lo"].to_numpy()[b],
                             "hi": bins["hi"].to_numpy()[b], "count": self.hist[f, b]})

    # ------------------------------------------------------------------------------- files
    def save(self, path: str) -> None:
        """To an ``.npz`` (plain arrays, no pickles), written whole or not at all."""
        import os

        meta = {"top_k": self.top_k, "per_band": self.per_band, "threshold": self.threshold,
                "n_tokens": self.n_tokens, "shards": list(self.shards)}
        tmp = path + ".tmp.npz"
        np.savez(tmp, meta=np.array(json.dumps(meta)), **{n: getattr(self, n) for n in self.ARRAYS})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "FeatureStats":
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {n: z[n] for n in cls.ARRAYS}
        return cls(meta["top_k"], meta["per_band"], meta["threshold"], meta["n_tokens"], tuple(meta["shards"]),
                   **arrays)


def _rank_in_runs(sorted_ids: np.ndarray) -> np.ndarray:
    """[3, 3, 5, 5, 5, 8] -> [0, 1, 0, 1, 2, 0]: each entry's place among equal neighbours."""
    n = len(sorted_ids)
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    return np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))


def merge_all(parts: list[FeatureStats]) -> FeatureStats:
    """Merge a list pairwise, as a balanced tree."""
    if not parts:
        raise StatsError("nothing to merge")
    while len(parts) > 1:
        parts = [parts[i].merge(parts[i + 1]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]
