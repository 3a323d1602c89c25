"""FactoredMatrix: a product A @ B kept as its two factors (TransformerLens's class, in NumPy).

A head's OV circuit W_V W_O is d_model x d_model but has rank d_head; keeping it as
[d_model, d_head] @ [d_head, d_model] makes products, singular values and norms cost d_head-sized work.
Leading axes broadcast like NumPy's: ``model.OV`` is [layer, head, d_model, d_model] and
``model.OV[3, 5]`` is one head.

Names and semantics are TransformerLens's, including two of its conventions that differ from
NumPy's: ``svd()`` returns ``(U, S, V)`` with ``U @ diag(S) @ V.T == AB`` (V, not NumPy's Vh), and
``Vh`` is TransformerLens's old alias of ``V`` (it warns, as there).
"""

from __future__ import annotations

import warnings

import numpy as np

from .utils import get_corner


class FactoredMatrix:
    """A @ B without forming it. A: [..., ldim, mdim], B: [..., mdim, rdim].

    ``AB`` forms the product, ``BA`` the reverse one (square only); ``svd()``/``U``/``S``/``V``,
    ``eigenvalues`` and ``norm()`` come from mdim-sized work; ``T`` is the transpose; ``@`` composes
    with arrays (on either side: ``model.W_E @ OV @ model.W_U``) and other factored matrices; ``*``
    scales; indexing picks along the leading axes (``QK[3, 5]`` is layer 3, head 5), and an index
    reaching into the last two axes picks rows/columns as TransformerLens does.
    """

    # NumPy would otherwise treat a FactoredMatrix as an object array and never call __rmatmul__:
    # with this, `ndarray @ fm` and `ndarray * fm` hand over to this class.
    __array_ufunc__ = None

    def __init__(self, A, B):
        A, B = np.asarray(A), np.asarray(B)
        if A.ndim < 2 or B.ndim < 2:
            raise ValueError(f"factors must have at least 2 axes; got A {A.shape} and B {B.shape}")
        if A.shape[-1] != B.shape[-2]:
            raise ValueError(f"factors do not chain: A {A.shape} @ B {B.shape} "
                             "(A's last axis must equal B's second-to-last)")
        self.ldim, self.mdim, self.rdim = A.shape[-2], A.shape[-1], B.shape[-1]
        lead = np.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        self.A = np.broadcast_to(A, lead + A.shape[-2:]) if A.shape[:-2] != lead else A
        self.B = np.broadcast_to(B, lead + B.shape[-2:]) if B.shape[:-2] != lead else B
        self._svd = None

    # -- shape -----------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return self.A.shape[:-2] + (self.ldim, self.rdim)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def pair(self) -> tuple[np.ndarray, np.ndarray]:
        return self.A, self.B

    def unsqueeze(self, k: int) -> "FactoredMatrix":
        """A new leading axis of length 1 at ``k`` (counted as in ``np.expand_dims`` on the full shape)."""
        return FactoredMatrix(np.expand_dims(self.A, k), np.expand_dims(self.B, k))

    def __getitem__(self, idx) -> "FactoredMatrix":
        """Leading axes index both factors; one more index picks rows of A (kept as a length-1 axis
        for an int), two more also pick columns of B. TransformerLens's rule."""
        idx = idx if isinstance(idx, tuple) else (idx,)
        n_lead = self.ndim - 2
        length = len([i for i in idx if i is not None])
        if length <= n_lead:
            return FactoredMatrix(self.A[idx], self.B[idx])
        if length == n_lead + 1:
            idx = _int_to_slice(idx, -1)
            return FactoredMatrix(self.A[idx], self.B[idx[:-1]])
        if length == n_lead + 2:
            idx = _int_to_slice(_int_to_slice(idx, -1), -2)
            return FactoredMatrix(self.A[idx[:-1]], self.B[idx[:-2] + (slice(None), idx[-1])])
        raise IndexError(f"index {idx} is too long for a FactoredMatrix of shape {self.shape}")

    # -- products --------------------------------------------------------------------------------
    @property
    def AB(self) -> np.ndarray:
        """The product itself, [..., ldim, rdim]."""
        return self.A @ self.B

    @property
    def BA(self) -> np.ndarray:
        """The reverse product B @ A, [..., mdim, mdim]; only for square matrices (ldim == rdim)."""
        if self.ldim != self.rdim:
            raise ValueError(f"BA needs a square matrix (ldim == rdim); this one has shape {self.shape}")
        return self.B @ self.A

    @property
    def T(self) -> "FactoredMatrix":
        """The transpose, still factored: B^T A^T."""
        return FactoredMatrix(self.B.swapaxes(-1, -2), self.A.swapaxes(-1, -2))

    def __matmul__(self, other):
        if isinstance(other, FactoredMatrix):  # keep the narrow middle: A (B A') B'
            return (self @ other.A) @ other.B
        other = np.asarray(other)
        if other.ndim == 1:  # a vector: the result is a vector (per leading item)
            return (self.A @ (self.B @ other[:, None]))[..., 0]
        if other.shape[-2] != self.rdim:
            raise ValueError(f"cannot multiply a FactoredMatrix of shape {self.shape} by an array of "
                             f"shape {other.shape}: expected {self.rdim} rows")
        if self.rdim > self.mdim:
            return FactoredMatrix(self.A, self.B @ other)
        return FactoredMatrix(self.AB, other)

    def __rmatmul__(self, other):
        other = np.asarray(other)
        if other.ndim == 1:
            return ((other[None, :] @ self.A) @ self.B)[..., 0, :]
        if other.shape[-1] != self.ldim:
            raise ValueError(f"cannot multiply an array of shape {other.shape} by a FactoredMatrix of "
                             f"shape {self.shape}: expected {self.ldim} columns")
        if self.ldim > self.mdim:
            return FactoredMatrix(other @ self.A, self.B)
        return FactoredMatrix(other, self.AB)

    def __mul__(self, scalar) -> "FactoredMatrix":
        """Scale by a number (or an array broadcasting over the leading axes, as [..., 1, 1])."""
        scalar = np.asarray(scalar)
        if scalar.ndim:
            raise ValueError(f"a FactoredMatrix can only be multiplied by a scalar; got shape {scalar.shape} "
                             "(use fm.AB * x for an elementwise product)")
        return FactoredMatrix(self.A * scalar, self.B)

    __rmul__ = __mul__

    def __truediv__(self, scalar) -> "FactoredMatrix":
        return self * (1 / np.asarray(scalar))

    def __neg__(self) -> "FactoredMatrix":
        return self * -1

    # -- spectrum --------------------------------------------------------------------------------
    def svd(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """U [..., ldim, mdim], S [..., mdim], V [..., rdim, mdim] with U @ diag(S) @ V^T == AB
        (TransformerLens's convention: V, not NumPy's Vh). From mdim x mdim work; computed once."""
        if self._svd is None:
            Qa, Ra = np.linalg.qr(self.A)  # A = Qa Ra
            Qb, Rb = np.linalg.qr(self.B.swapaxes(-1, -2))  # B = Rb^T Qb^T
            u, s, vh = np.linalg.svd(Ra @ Rb.swapaxes(-1, -2))
            self._svd = (Qa @ u, s, Qb @ vh.swapaxes(-1, -2))
        return self._svd

    @property
    def U(self) -> np.ndarray:
        """[..., ldim, mdim] left singular vectors (columns)."""
        return self.svd()[0]

    @property
    def S(self) -> np.ndarray:
        """[..., mdim] singular values, largest first."""
        return self.svd()[1]

    @property
    def V(self) -> np.ndarray:
        """[..., rdim, mdim] right singular vectors (columns)."""
        return self.svd()[2]

    @property
    def Vh(self) -> np.ndarray:
        """TransformerLens's old name, kept with its meaning: it returns V [..., rdim, mdim], not
        V's transpose (a DeprecationWarning says so, as in TransformerLens)."""
        warnings.warn("FactoredMatrix.Vh returns V (right singular vectors as columns, [..., rdim, mdim]), "
                      "as in TransformerLens; use .V, or .V.swapaxes(-1, -2) for NumPy's Vh",
                      DeprecationWarning, stacklevel=2)
        return self.svd()[2]

    @property
    def eigenvalues(self) -> np.ndarray:
        """Eigenvalues of AB, from BA (they share the non-zero ones): complex [..., mdim]."""
        return np.linalg.eigvals(self.BA).astype(np.result_type(self.A.dtype, np.complex64))

    def norm(self) -> np.ndarray:
        """Frobenius norm of AB, [...]."""
        return np.sqrt((self.S ** 2).sum(-1))

    def make_even(self) -> "FactoredMatrix":
        """The same product as U sqrt(S) @ sqrt(S) V^T: both halves carry half of the spectrum."""
        root = np.sqrt(self.S)
        return FactoredMatrix(self.U * root[..., None, :], root[..., :, None] * self.V.swapaxes(-1, -2))

    def collapse_l(self) -> np.ndarray:
        """diag(S) @ V^T, [..., mdim, rdim]: the factorisation without its orthogonal left factor."""
        return self.S[..., :, None] * self.V.swapaxes(-1, -2)

    def collapse_r(self) -> np.ndarray:
        """U @ diag(S), [..., ldim, mdim]."""
        return self.U * self.S[..., None, :]

    def get_corner(self, k: int = 3) -> np.ndarray:
        """The top-left k x k corner of AB (of every leading item), formed from k rows and columns only."""
        return get_corner(self.A[..., :k, :] @ self.B[..., :, :k], k)

    def __repr__(self):
        return f"FactoredMatrix(shape={self.shape}, mdim={self.mdim})"

    def _repr_html_(self) -> str:
        from .display import factored_html

        return factored_html(self)


def _int_to_slice(idx: tuple, position: int) -> tuple:
    """(1, 2, 3), -1 -> (1, 2, slice(3, 4)): an int index that keeps its axis."""
    idx = list(idx)
    value = idx[position]
    if isinstance(value, (int, np.integer)):
        idx[position] = slice(value, value + 1 if value != -1 else None)
    return tuple(idx)
