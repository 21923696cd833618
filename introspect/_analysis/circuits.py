"""Weight-based head circuits: each head's OV and QK matrices, low-rank, and composition scores.

A head reads the residual stream three times and writes it once (Elhage et al. 2021, "A
Mathematical Framework for Transformer Circuits"). With row vectors (``x @ W``, the
TransformerLens convention) and ``d`` the stream width:

- ``W_OV = W_V @ W_O`` (``[d, d]``): what the head writes to the stream for a value input
  ``x`` when it attends to that one position: ``x @ W_OV``;
- ``W_QK = W_Q @ W_K.T`` (``[d, d]``): the bilinear form of its attention scores:
  ``x_q @ W_QK @ x_k`` is ``q · k`` for a query input ``x_q`` and a key input ``x_k``, as the
  model's attention function receives ``q`` and ``k``, before it multiplies by its scaling
  (``1/√head_dim`` on most models; OPT scales ``q`` before the function, so there the factor is
  inside ``W_QK`` and the function's scaling is 1), adds the mask, a position bias (ALiBi, T5)
  or soft-caps.

Both have rank at most ``head_dim``, so each is a :class:`FactoredMatrix`: the two thin factors,
multiplied only when asked. **Biases are ignored** (``b_Q``, ``b_K``, ``b_V``, ``b_O``): the
matrices are the linear parts. With grouped- or multi-query attention, query head ``h`` reads
key/value head ``h // (heads // kv_heads)``.

Rotary models (Llama, GPT-NeoX, ...): the rotation of ``q`` and ``k`` depends on the position,
so no single matrix gives the scores. ``W_QK`` here is the form *before* the rotation, which is
the score between a query and a key at the same position (relative position 0); every call
that returns it on such a model warns (:class:`RotaryWarning`).

Where the weights come from: not from module names. The adapter's head layout (``HeadSpec``)
says where each head's ``q``, ``k`` and ``v`` reach the attention function and where ``o``
is, whatever the projections look like (GPT-2's fused ``Conv1D``, GPT-NeoX's interleaved
``query_key_value``, separate projections, grouped key/value heads). ``W_Q``, ``W_K`` and
``W_V`` are read there, off the map from the attention module's input: one forward feeds the
attention module ``±c·e_i`` for every basis vector ``e_i`` of the stream (a batch of
one-token sequences, so position 0: no rotation), and ``(f(c·e_i) - f(-c·e_i)) / 2c`` is row
``i`` of each map, the biases cancelling. A second forward proves the reading: for random
inputs, ``q``, ``k`` and ``v`` must equal ``x @ W`` (else the map is not linear: a norm on
``q``/``k`` as in Qwen3 or OLMo-2, or latent compression as in DeepSeek's MLA; such heads are
refused), and what reaches ``o`` from each head must be its value vector (else a gate,
attention sinks or a norm sits between them, and ``OV`` is refused). ``W_O`` is ``o``'s own
weight, head by head. The reading is cached per block while the block's parameters are
unchanged (an optimiser step or a new module invalidates it); the matrices carry no gradient.

``fold_norm=True`` (the default, as TransformerLens's ``fold_ln=True``): the norm whose output
the attention reads (the adapter's ``attn_norm``, proven to be that norm on every reading) has
its elementwise gain folded into the reading side: ``W_Q``, ``W_K`` and ``W_V`` become
``diag(g) @ W``, with ``g`` the LayerNorm/RMSNorm ``weight``, Gemma's ``1 + weight``, or 1 for a
norm without one. Where that norm centres (a LayerNorm), each column of those matrices is
centred too (its mean over the stream removed), as TransformerLens's ``fold_ln`` does: the
normalised input has zero mean, so nothing the head computes changes. The input space is then
the stream after the norm's normalisation, before its gain; the norm's bias is ignored with
the others. The gain's convention is not assumed: the module must reproduce its own output as
``g * normalise(x) + bias`` with ``g`` one of those, or folding is refused (pass
``fold_norm=False``). Where the attention reads the block's input directly (post-norm BERT,
OPT with ``do_layer_norm_before=False``) there is nothing to fold. ``W_O`` is never changed
(TransformerLens's separate ``center_writing_weights``, on by default for LayerNorm models,
centres it; this does not). ``fold_norm=False``: the input space is what the attention module
receives.

The blocks are those of the main stack (``block[i]``: the decoder's on BART and T5)
and the heads those of its self-attention part ``attn`` (cross-attention is not offered).

Composition scores (:func:`composition_scores`) are TransformerLens's
``all_composition_scores``: for an earlier head ``(a, h)`` and a later one ``(b, g)``,
``‖W_OV[a,h] @ M[b,g]‖_F / (‖W_OV[a,h]‖_F ‖M[b,g]‖_F)`` with ``M = W_QK`` (Q-composition),
``W_QK.T`` (K-composition) or ``W_OV`` (V-composition), computed from the factors. As in
TransformerLens the score is 0 unless ``a < b``.

Example:
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from introspect import Inspector
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
    >>> ov = head_ov(Inspector(model.eval()), 1, 2)
    >>> ov.shape, ov.inner_dim, ov.rank
    (torch.Size([32, 32]), 8, 8)
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from dataclasses import dataclass
from threading import RLock
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import torch
from torch import nn

from introspect._errors import AttentionToolError, LocatorError, MissingPartError
from introspect._hooks.heads import HeadTap, _weight_per_head
from introspect._hooks.session import input_device, onloaded
from introspect._proof import example_inputs

if TYPE_CHECKING:
    from introspect._model.view import Analysable

__all__ = [
    "KINDS",
    "FactoredMatrix",
    "RotaryWarning",
    "composition_scores",
    "head_ov",
    "head_qk",
]

KINDS = ("Q", "K", "V")
"""The composition kinds: the later head's query, key or value reads the earlier head's output."""

_CHECKS = 4
"""Random inputs each reading is proven on."""


# -- the factored matrix ----------------------------------------------------------------------


class FactoredMatrix:
    """A matrix kept as two factors, ``A [m, r] @ B [r, n]``, without forming the product.

    ``AB`` forms it when asked. The SVD, singular values, norm and rank come from the factors:
    a QR decomposition of each (``A = Qa Ra``, ``B.T = Qb Rb``) leaves the small core
    ``Ra @ Rb.T`` (at most ``r x r``), whose SVD is the matrix's, so nothing ``m x n`` is ever
    built. ``@`` with a tensor or another factored matrix stays factored (a vector gives a
    vector); ``.T`` swaps the factors. Factors in 16-bit floats are computed in float32.

    Example:
        >>> A, B = torch.randn(6, 2), torch.randn(2, 5)
        >>> m = FactoredMatrix(A, B)
        >>> m.shape, m.inner_dim, m.rank
        (torch.Size([6, 5]), 2, 2)
        >>> torch.allclose(m.norm(), torch.linalg.matrix_norm(A @ B))
        True
        >>> torch.allclose((m @ torch.ones(5)), A @ B @ torch.ones(5))
        True
    """

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        if not isinstance(A, torch.Tensor) or not isinstance(B, torch.Tensor):
            raise TypeError(
                "FactoredMatrix takes two tensors, A [m, r] and B [r, n], got "
                f"{type(A).__name__} and {type(B).__name__}"
            )
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != B.shape[0]:
            raise ValueError(
                f"FactoredMatrix takes A [m, r] and B [r, n] with the same r, got A "
                f"{list(A.shape)} and B {list(B.shape)}"
            )
        if not A.is_floating_point() or not B.is_floating_point():
            raise ValueError(
                f"FactoredMatrix takes real floating-point factors, got {A.dtype} and {B.dtype}"
            )
        if A.device != B.device:
            raise ValueError(f"the factors are on different devices: {A.device} and {B.device}")
        dtype = torch.promote_types(A.dtype, B.dtype)
        self._A = A.to(dtype)
        self._B = B.to(dtype)

    @property
    def A(self) -> torch.Tensor:
        """The left factor ``[m, r]``."""
        return self._A

    @property
    def B(self) -> torch.Tensor:
        """The right factor ``[r, n]``."""
        return self._B

    @property
    def shape(self) -> torch.Size:
        """``[m, n]``, the shape of ``A @ B``."""
        return torch.Size([self._A.shape[0], self._B.shape[1]])

    @property
    def inner_dim(self) -> int:
        """``r``: the factors' shared dimension, a bound on the rank."""
        return int(self._A.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        """The factors' dtype."""
        return self._A.dtype

    @property
    def device(self) -> torch.device:
        """The factors' device."""
        return self._A.device

    @property
    def AB(self) -> torch.Tensor:
        """The product ``A @ B`` ``[m, n]``, formed now (it can be large)."""
        return self._A @ self._B

    @property
    def BA(self) -> torch.Tensor:
        """``B @ A`` ``[r, r]`` (square matrices only): it has ``AB``'s non-zero eigenvalues."""
        self._square("BA")
        return self._B @ self._A

    @property
    def T(self) -> FactoredMatrix:
        """The transpose, ``B.T @ A.T``, still factored."""
        return FactoredMatrix(self._B.T, self._A.T)

    def _square(self, what: str) -> None:
        m, n = self.shape
        if m != n:
            raise ValueError(f"{what} needs a square matrix, this one is {m} x {n}")

    def _work(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors in a dtype the decompositions support (float32 for 16-bit ones)."""
        dtype = torch.promote_types(self.dtype, torch.float32)
        return self._A.to(dtype), self._B.to(dtype)

    def _core(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Qa, core, Qb)`` with ``A @ B == Qa @ core @ Qb.T`` and orthonormal ``Qa``, ``Qb``."""
        A, B = self._work()
        qa, ra = torch.linalg.qr(A)
        qb, rb = torch.linalg.qr(B.T)
        return qa, ra @ rb.T, qb

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U [m, k], S [k], V [n, k])`` with ``A @ B == U @ diag(S) @ V.T``, ``S`` descending.

        ``k = min(m, r, n)``; computed from the factors (see the class).

        Example:
            >>> m = FactoredMatrix(torch.randn(5, 2), torch.randn(2, 4))
            >>> U, S, V = m.svd()
            >>> torch.allclose(U @ torch.diag(S) @ V.T, m.AB, atol=1e-5)
            True
        """
        qa, core, qb = self._core()
        uc, s, vch = torch.linalg.svd(core, full_matrices=False)
        return qa @ uc, s, qb @ vch.T

    def singular_values(self) -> torch.Tensor:
        """The singular values ``[k]``, largest first (those of the small core).

        Example:
            >>> m = FactoredMatrix(torch.eye(3)[:, :2] * 2, torch.eye(3)[:2])
            >>> m.singular_values()
            tensor([2., 2.])
        """
        values: torch.Tensor = torch.linalg.svdvals(self._core()[1])
        return values

    def norm(self) -> torch.Tensor:
        """The Frobenius norm (of the core: the orthonormal factors keep it).

        Example:
            >>> round(float(FactoredMatrix(torch.ones(4, 1), torch.ones(1, 4)).norm()), 4)
            4.0
        """
        norm: torch.Tensor = torch.linalg.matrix_norm(self._core()[1])
        return norm

    @property
    def rank(self) -> int:
        """The numerical rank: singular values above ``max(S) * max(m, n) * eps`` (the
        tolerance of ``torch.linalg.matrix_rank``)."""
        s = self.singular_values()
        if s.numel() == 0:
            return 0
        tol = s.max() * max(self.shape) * torch.finfo(s.dtype).eps
        return int((s > tol).sum())

    def eigenvalues(self) -> torch.Tensor:
        """The eigenvalues of a square ``A @ B`` that can be non-zero, complex ``[min(m, r)]``.

        They are those of ``B @ A`` (``[r, r]``): ``ABv = λv`` gives ``BA(Bv) = λ(Bv)``; the
        other ``m - r`` eigenvalues of ``A @ B`` are zero.

        Example:
            >>> m = FactoredMatrix(torch.eye(4)[:, :2], torch.diag(torch.tensor([2.0, 3.0, 0, 0]))[:2])
            >>> sorted(m.eigenvalues().real.tolist())
            [2.0, 3.0]
        """
        self._square("eigenvalues()")
        A, B = self._work()
        small = B @ A if self.inner_dim <= self.shape[0] else A @ B
        values: torch.Tensor = torch.linalg.eigvals(small)
        return values

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, FactoredMatrix):
            if self.shape[1] != other.shape[0]:
                raise ValueError(f"cannot multiply {self!r} by {other!r}: inner sizes differ")
            middle = self._B @ other._A
            if other.inner_dim <= self.inner_dim:
                return FactoredMatrix(self._A @ middle, other._B)
            return FactoredMatrix(self._A, middle @ other._B)
        if not isinstance(other, torch.Tensor):
            return NotImplemented
        n = self.shape[1]
        if other.dim() == 1 and other.shape[0] == n:
            return self._A @ (self._B @ other)
        if other.dim() == 2 and other.shape[0] == n:
            if n < self.inner_dim:
                return FactoredMatrix(self.AB, other)
            return FactoredMatrix(self._A, self._B @ other)
        raise ValueError(
            f"cannot multiply {self!r} by a tensor {list(other.shape)}: it takes a vector [{n}] "
            f"or a matrix [{n}, p] (for a batch of row vectors use (x @ m.A) @ m.B)"
        )

    def __rmatmul__(self, other: Any) -> Any:
        if not isinstance(other, torch.Tensor):
            return NotImplemented
        m = self.shape[0]
        if other.dim() == 1 and other.shape[0] == m:
            return (other @ self._A) @ self._B
        if other.dim() == 2 and other.shape[1] == m:
            if m < self.inner_dim:
                return FactoredMatrix(other, self.AB)
            return FactoredMatrix(other @ self._A, self._B)
        raise ValueError(
            f"cannot multiply a tensor {list(other.shape)} by {self!r}: it takes a vector [{m}] "
            f"or a matrix [p, {m}] (for a batch of row vectors use (x @ m.A) @ m.B)"
        )

    def __mul__(self, scalar: Any) -> FactoredMatrix:
        if isinstance(scalar, torch.Tensor) and scalar.numel() == 1:
            scalar = scalar.reshape(())
        elif not isinstance(scalar, numbers.Real) or isinstance(scalar, bool):
            return NotImplemented
        return FactoredMatrix(self._A * scalar, self._B)

    __rmul__ = __mul__

    def __neg__(self) -> FactoredMatrix:
        return FactoredMatrix(-self._A, self._B)

    def __repr__(self) -> str:
        m, n = self.shape
        return f"FactoredMatrix({m} x {n}, inner_dim={self.inner_dim}, dtype={self.dtype})"


class RotaryWarning(UserWarning):
    """A QK matrix of a model that rotates ``q`` and ``k`` by position (rotary embeddings): the
    matrix is the bilinear form before the rotation, the score at relative position 0 only.
    Silence it with ``warnings.simplefilter("ignore", RotaryWarning)`` once that is understood.
    """


# -- reading the weights ------------------------------------------------------------------------


@dataclass
class _Block:
    """One block's head weights as read, and what the proofs found.

    ``wq`` ``[heads, d, head_dim]``, ``wk`` ``[kv_heads, d, head_dim]``, ``wv`` ``[kv_heads, d,
    v_dim]``, ``wo`` ``[heads, v_dim, d_out]``, all on the attention module's input (no fold).
    """

    label: str
    heads: int
    kv_heads: int
    wq: torch.Tensor
    wk: torch.Tensor
    wv: torch.Tensor
    wo: torch.Tensor | None
    qk_refused: str | None
    ov_refused: str | None
    rotary: bool
    gain: torch.Tensor | None
    center: bool
    fold_refused: str | None

    def group(self, head: int) -> int:
        """The key/value head query head ``head`` reads."""
        return head // (self.heads // self.kv_heads)

    def reading(self, w: torch.Tensor, fold: bool) -> torch.Tensor:
        """A reading matrix ``[..., d, width]`` with the norm folded in where asked."""
        if not fold:
            return w
        if self.fold_refused is not None:
            raise AttentionToolError(self.fold_refused)
        if self.gain is not None:
            w = w * self.gain[:, None]
        if self.center:
            w = w - w.mean(dim=-2, keepdim=True)
        return w

    def ov(self, head: int, fold: bool) -> FactoredMatrix:
        if self.ov_refused is not None:
            raise AttentionToolError(self.ov_refused)
        assert self.wo is not None
        return FactoredMatrix(self.reading(self.wv[self.group(head)], fold), self.wo[head])

    def qk(self, head: int, fold: bool) -> FactoredMatrix:
        if self.qk_refused is not None:
            raise AttentionToolError(self.qk_refused)
        wq = self.reading(self.wq[head], fold)
        wk = self.reading(self.wk[self.group(head)], fold)
        return FactoredMatrix(wq, wk.T)


_LOCK = RLock()
_CACHE: WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], _Block]] = WeakKeyDictionary()
"""block module -> (fingerprint of its attention and norm parameters, what was read)."""


@dataclass
class _Site:
    """One block to read: its index, modules and head tap."""

    index: int
    label: str
    block: nn.Module
    attn: nn.Module
    norm: nn.Module | None
    tap: HeadTap

    def fingerprint(self) -> tuple[Any, ...]:
        modules = [self.attn] + ([self.norm] if self.norm is not None else [])
        params = [
            (id(p), _version(p), p.data_ptr(), p.dtype, p.device, tuple(p.shape))
            for module in modules
            for p in module.parameters()
        ]
        return (id(self.attn), id(self.norm), tuple(params))


def _version(p: torch.Tensor) -> int | None:
    """The tensor's in-place change counter (inference tensors have none: they cannot change)."""
    try:
        return int(p._version)
    except RuntimeError:
        return None


def _block_index(insp: Analysable, block: Any) -> int:
    if isinstance(block, bool) or not isinstance(block, numbers.Integral):
        raise LocatorError(
            f"block must be a block index (an int such as 0 or -1), got "
            f"{type(block).__name__}: {block!r:.40}"
        )
    n = insp.num_blocks
    if not -n <= int(block) < n:
        raise LocatorError(
            f"block {block} is out of range for {insp.adapter.name} ({n} blocks: use {-n}..{n - 1})"
        )
    return int(block) % n


def _site(insp: Analysable, index: int, *, ov: bool) -> _Site:
    """Everything about block ``index`` checked before any forward (``ov``: OV is needed)."""
    resolver = insp.view.resolver
    loc = insp.locator(f"block[{index}].attn")
    tap = resolver.head_tap(loc)
    label = str(loc)
    reason = tap.why_not("q")
    if reason is not None:
        raise MissingPartError(
            f"{label}: the heads' q, k and v cannot be read on adapter {insp.adapter.name!r} "
            f"({reason}), so their weight matrices cannot be either"
        )
    if ov and tap.spec.o_norm is not None:
        raise AttentionToolError(
            f"{label}: the heads' output passes through the norm {tap.spec.o_norm!r} before "
            f"the output projection, so no matrix maps a head's values to what it writes (OV)"
        )
    norm: nn.Module | None = None
    with contextlib.suppress(LocatorError):
        norm = insp.module(f"block[{index}].attn_norm")
    return _Site(index, label, insp.module(f"block[{index}]"), tap.attn, norm, tap)


def _sites(insp: Analysable, blocks: list[int], *, ov: bool) -> list[_Site]:
    if insp.model.training:
        raise AttentionToolError(
            "reading head matrices runs the model, which is in training mode (dropout would "
            "change what it computes): call model.eval() first"
        )
    return [_site(insp, b, ov=ov) for b in blocks]


def _read(insp: Analysable, sites: list[_Site]) -> list[_Block]:
    """The weights of each site's block: cached while its parameters are unchanged."""
    found: dict[int, _Block] = {}
    with _LOCK:
        for site in sites:
            entry = _CACHE.get(site.block)
            if entry is not None and entry[0] == site.fingerprint():
                found[site.index] = entry[1]
    todo = [site for site in sites if site.index not in found]
    if todo:
        with torch.no_grad():
            read = _read_now(insp, todo)
        with _LOCK:
            for site, weights in zip(todo, read, strict=True):
                _CACHE[site.block] = (site.fingerprint(), weights)
                found[site.index] = weights
    return [found[site.index] for site in sites]


def _inputs(insp: Analysable, batch: int, seq: int) -> dict[str, torch.Tensor]:
    model = insp.model
    config = getattr(model, "config", None)
    inputs = example_inputs(config, batch=batch, seq=seq, model=model)
    device = input_device(model)
    return {k: v.to(device) for k, v in inputs.items()}


def _close(
    found: torch.Tensor, expected: torch.Tensor, tol: float, of: torch.Tensor | None = None
) -> bool:
    """Whether ``found`` equals ``expected`` up to ``tol`` of the largest value (float64) of
    either, or of ``of``: the values the model computed, whose rounding bounds the error."""
    scale = max(float(expected.abs().max()), float(found.abs().max()), 1e-30)
    if of is not None:
        scale = max(scale, float(of.abs().max()))
    return (
        bool(torch.isfinite(found).all()) and float((found - expected).abs().max()) <= tol * scale
    )


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2


def _read_now(insp: Analysable, sites: list[_Site]) -> list[_Block]:
    """Three short forwards for all ``sites`` at once (see the module docstring)."""
    model = insp.model
    # 1. What each attention reads: its norm's output, or the block's input.
    names = []
    for site in sites:
        names += [f"block[{site.index}]", f"block[{site.index}].attn"]
        if site.norm is not None:
            names.append(f"block[{site.index}].attn_norm")
    with insp.capture(*names, stop=True) as cap:
        model(**_inputs(insp, 1, 3))
    reads: dict[int, str] = {}
    for site in sites:
        seen = cap[f"block[{site.index}].attn"].input
        block_in = cap[f"block[{site.index}]"].input
        norm_out = cap[f"block[{site.index}].attn_norm"].output if site.norm is not None else None
        if isinstance(norm_out, torch.Tensor) and _same(seen, norm_out):
            reads[site.index] = "norm"
        elif _same(seen, block_in):
            reads[site.index] = "stream"
        else:
            reads[site.index] = "other"
    first = cap[f"block[{sites[0].index}].attn"].input
    if not isinstance(first, torch.Tensor) or not first.is_floating_point():
        raise AttentionToolError(
            f"{sites[0].label} receives no floating-point hidden states, so its heads' matrices "
            "cannot be read from it"
        )
    width, dtype, device = first.shape[-1], first.dtype, first.device
    work = torch.promote_types(dtype, torch.float32)
    tol = _tolerance(dtype)

    # 2. The maps: ±c·e_i for every basis vector, one token each (position 0).
    c = {torch.bfloat16: 2.0**8, torch.float16: 2.0**4}.get(dtype, 1.0)
    eye = torch.eye(width, dtype=torch.float64, device=device) * c
    probes = torch.cat([eye, -eye])[:, None, :].to(dtype)
    sites_qkv = [f"block[{s.index}].attn.{v}" for s in sites for v in ("q", "k", "v")]
    with contextlib.ExitStack() as stack:
        for site in sites:
            stack.enter_context(insp.patch(f"block[{site.index}].attn.input", probes))
        cap = stack.enter_context(insp.capture(*sites_qkv, stop=True))
        model(**_inputs(insp, 2 * width, 1))
    maps: dict[tuple[int, str], torch.Tensor] = {}
    for site in sites:
        for v in ("q", "k", "v"):
            seen = cap[f"block[{site.index}].attn.{v}"].output[:, 0].double()  # [2d, heads, dim]
            maps[site.index, v] = ((seen[:width] - seen[width:]) / (2 * c)).transpose(0, 1)

    # 3. The proofs: random inputs at positions 0 and 1 (the same vector at both).
    generator = torch.Generator().manual_seed(0)
    r = torch.randn(_CHECKS, width, generator=generator, dtype=torch.float64).to(device)
    checks = torch.cat([r, -r])[:, None, :].expand(-1, 2, -1).to(dtype).contiguous()
    with contextlib.ExitStack() as stack:
        for site in sites:
            stack.enter_context(insp.patch(f"block[{site.index}].attn.input", checks))
        cap = stack.enter_context(
            insp.capture(*sites_qkv, *[f"block[{s.index}].attn.z" for s in sites], stop=True)
        )
        model(**_inputs(insp, 2 * _CHECKS, 2))
    rd = checks[:_CHECKS, 0].double()
    out: list[_Block] = []
    for site in sites:
        tap = site.tap
        got = {
            v: cap[f"block[{site.index}].attn.{v}"].output.double() for v in ("q", "k", "v", "z")
        }
        linear = {
            v: _close(
                (got[v][:_CHECKS, 0] - got[v][_CHECKS:, 0]) / 2,
                torch.einsum("nd,hde->nhe", rd, maps[site.index, v]),
                tol,
                of=got[v][:, 0],  # a large bias rounds the values it is added to
            )
            for v in ("q", "k", "v")
        }
        rotary = not (
            _close(got["q"][:, 1], got["q"][:, 0], tol)
            and _close(got["k"][:, 1], got["k"][:, 0], tol)
        )
        qk_refused = None
        bad = [v for v in ("q", "k") if not linear[v]]
        if bad:
            qk_refused = (
                f"{site.label}: {' and '.join(bad)} {'is' if len(bad) == 1 else 'are'} not a "
                "linear function of the attention's input (a norm on q/k, as in Qwen3 or "
                "OLMo-2, latent compression, or clipping), so no matrix gives the heads' "
                "scores (QK)"
            )
        ov_refused, wo = _ov_check(site, got, linear["v"], tol)
        gain, center, fold_refused = _fold(site, reads[site.index], width, device, dtype, tol)
        out.append(
            _Block(
                label=site.label,
                heads=tap.heads,
                kv_heads=tap.kv_heads,
                wq=maps[site.index, "q"].to(work),
                wk=maps[site.index, "k"].to(work),
                wv=maps[site.index, "v"].to(work),
                wo=wo.to(work) if wo is not None else None,
                qk_refused=qk_refused,
                ov_refused=ov_refused,
                rotary=rotary,
                gain=gain.to(work) if gain is not None else None,
                center=center,
                fold_refused=fold_refused,
            )
        )
    return out


def _same(a: Any, b: Any) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        return False
    return a is b or bool(torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6))


def _ov_check(
    site: _Site, got: dict[str, torch.Tensor], v_linear: bool, tol: float
) -> tuple[str | None, torch.Tensor | None]:
    """Why OV is refused (``None``: it is not) and ``W_O`` ``[heads, v_dim, d_out]``."""
    tap = site.tap
    if not v_linear:
        return (
            f"{site.label}: v is not a linear function of the attention's input, so no matrix "
            "gives what the heads write (OV)"
        ), None
    z, v = got["z"], got["v"]
    if z.shape[-1] != v.shape[-1] or z.shape[-2] != tap.heads:
        return (
            f"{site.label}: the output projection's input holds {z.shape[-2]} heads of width "
            f"{z.shape[-1]}, not one value vector per head ({tap.heads} of width "
            f"{v.shape[-1]}), so no matrix gives what the heads write (OV)"
        ), None
    expected = v.repeat_interleave(tap.heads // tap.kv_heads, dim=-2)
    if not _close(z, expected, tol):
        return (
            f"{site.label}: what reaches the output projection from a head attending to one "
            "value is not that value (a gate, attention sinks or a norm between the attention "
            "and the projection), so no matrix gives what the heads write (OV)"
        ), None
    o = tap.projection
    with onloaded(o, f"{site.label}.o weights"):
        try:
            per_head = _weight_per_head(o, tap.heads)().detach()  # [out, heads, v_dim]
        except MissingPartError as exc:
            return f"{site.label}: {exc}", None
        wo = per_head.permute(1, 2, 0).double()  # [heads, v_dim, out]
    if wo.shape[1] != v.shape[-1]:
        return (
            f"{site.label}: the output projection's weight splits into heads of width "
            f"{wo.shape[1]}, but the value vectors have width {v.shape[-1]}"
        ), None
    return None, wo


def _fold(
    site: _Site, reads: str, width: int, device: torch.device, dtype: torch.dtype, tol: float
) -> tuple[torch.Tensor | None, bool, str | None]:
    """``(gain, center, refusal)`` of the norm the attention reads (see the module docstring)."""
    if reads == "stream":
        return None, False, None
    if reads == "other":
        named = "its attn_norm's output nor " if site.norm is not None else ""
        return (
            None,
            False,
            f"{site.label} reads neither {named}its block's input, so the norm to fold is not "
            "known: pass fold_norm=False (the matrices then act on what the attention receives)",
        )
    norm = site.norm
    assert norm is not None
    generator = torch.Generator().manual_seed(1)
    # Wide inputs make the norm's epsilon negligible, so it need not be known.
    x64 = torch.randn(_CHECKS, width, generator=generator, dtype=torch.float64) * 10 + 3
    x = x64.to(device=device, dtype=dtype)
    with onloaded(norm, f"{site.label} norm"):
        y = norm(x)
        weight = getattr(norm, "weight", None)
        bias = getattr(norm, "bias", None)
        gains: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        if isinstance(weight, torch.Tensor) and weight.shape == (width,):
            w = weight.detach().to(device)
            gains += [(w, w.double()), (1 + w.double(), 1 + w.double())]
        gains.append((None, torch.ones(width, dtype=torch.float64, device=device)))
        biases: list[torch.Tensor | None] = [None]
        if isinstance(bias, torch.Tensor) and bias.shape == (width,):
            biases.insert(0, bias.detach().to(device).double())
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return (
            None,
            False,
            f"{site.label}: its attn_norm does not return a tensor shaped as its input",
        )
    xd, yd = x.double(), y.double()
    for center in (True, False):
        xc = xd - xd.mean(-1, keepdim=True) if center else xd
        normal = xc / xc.pow(2).mean(-1, keepdim=True).sqrt()
        for gain, g in gains:
            for b in biases:
                guess = normal * g + (b if b is not None else 0)
                if _close(yd, guess, tol):
                    return gain, center, None
    return (
        None,
        False,
        f"{site.label}: its attn_norm ({type(norm).__name__}) is not a LayerNorm or RMSNorm whose "
        "gain is its weight, 1 + weight or 1, so its convention is not known and it cannot be "
        "folded: pass fold_norm=False",
    )


# -- what the Inspector offers ------------------------------------------------------------------


def _head_index(head: Any, heads: int, label: str) -> int:
    if isinstance(head, bool) or not isinstance(head, numbers.Integral):
        raise AttentionToolError(
            f"head must be a head index (an int), got {type(head).__name__}: {head!r:.40}"
        )
    if not -heads <= int(head) < heads:
        raise AttentionToolError(
            f"head {head} is out of range for {label}, which has {heads} heads (use "
            f"{-heads}..{heads - 1})"
        )
    return int(head) % heads


def _check_fold(fold_norm: Any) -> bool:
    if not isinstance(fold_norm, bool):
        raise AttentionToolError(f"fold_norm must be True or False, got {fold_norm!r:.40}")
    return fold_norm


def _warn_rotary(labels: list[str], stacklevel: int) -> None:
    if labels:
        where = labels[0] if len(labels) == 1 else f"{labels[0]} (and {len(labels) - 1} more)"
        warnings.warn(
            f"{where} rotates q and k by position (rotary embeddings): W_QK is the bilinear "
            "form before the rotation, the score between a query and a key at the same "
            "position (relative position 0), not the score at other offsets",
            RotaryWarning,
            stacklevel=stacklevel + 1,
        )


def head_ov(insp: Analysable, block: int, head: int, *, fold_norm: bool = True) -> FactoredMatrix:
    """``W_OV = W_V @ W_O`` of one head, ``[d_model, d_model]`` (see the module docstring).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from introspect import Inspector
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
        >>> head_ov(Inspector(model.eval()), -1, 0).A.shape
        torch.Size([32, 8])
    """
    index = _block_index(insp, block)
    fold = _check_fold(fold_norm)
    site = _sites(insp, [index], ov=True)[0]
    h = _head_index(head, site.tap.heads, site.label)
    return _read(insp, [site])[0].ov(h, fold)


def head_qk(
    insp: Analysable, block: int, head: int, *, fold_norm: bool = True, stacklevel: int = 2
) -> FactoredMatrix:
    """``W_QK = W_Q @ W_K.T`` of one head, ``[d_model, d_model]``; warns on rotary models
    (:class:`RotaryWarning`; ``stacklevel`` points it at the caller's caller).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from introspect import Inspector
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
        >>> head_qk(Inspector(model.eval()), 0, 1).B.shape
        torch.Size([8, 32])
    """
    index = _block_index(insp, block)
    fold = _check_fold(fold_norm)
    site = _sites(insp, [index], ov=False)[0]
    h = _head_index(head, site.tap.heads, site.label)
    weights = _read(insp, [site])[0]
    matrix = weights.qk(h, fold)
    _warn_rotary([weights.label] if weights.rotary else [], stacklevel)
    return matrix


def composition_scores(
    insp: Analysable, kind: str, *, fold_norm: bool = True, stacklevel: int = 2
) -> torch.Tensor:
    """Composition scores between every pair of heads, ``[blocks, heads, blocks, heads]``.

    ``scores[a, h, b, g]`` is how much the later head ``(b, g)``'s query (``kind="Q"``), key
    (``"K"``) or value (``"V"``) reads what the earlier head ``(a, h)`` writes:
    ``‖W_OV[a,h] @ M‖_F / (‖W_OV[a,h]‖_F ‖M‖_F)`` with ``M`` = ``W_QK[b,g]``, ``W_QK[b,g].T``
    or ``W_OV[b,g]`` (TransformerLens's ``all_composition_scores``); 0 unless ``a < b``.
    Every block needs heads, of one count (a hybrid's blocks without attention are refused
    with the reason).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from introspect import Inspector
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
        >>> scores = composition_scores(Inspector(model.eval()), "V")
        >>> scores.shape, float(scores[1].abs().sum()), bool((scores[0, :, 1] > 0).all())
        (torch.Size([2, 4, 2, 4]), 0.0, True)
    """
    if not isinstance(kind, str) or kind.upper() not in KINDS:
        raise AttentionToolError(
            f"kind must be one of 'Q', 'K', 'V' (which input of the later head composes), got "
            f"{kind!r:.40}"
        )
    kind = kind.upper()
    fold = _check_fold(fold_norm)
    n = insp.num_blocks
    sites = _sites(insp, list(range(n)), ov=True)
    counts = {(s.tap.heads, s.tap.kv_heads) for s in sites}
    if len(counts) != 1:
        raise AttentionToolError(
            f"composition scores need the same head count in every block; "
            f"{insp.adapter.name} has {sorted(counts)}"
        )
    weights = _read(insp, sites)
    heads = weights[0].heads
    left = [w.ov(h, fold) for w in weights for h in range(heads)]
    if kind == "V":
        right = left
    else:
        qk = [w.qk(h, fold) for w in weights for h in range(heads)]
        right = qk if kind == "Q" else [m.T for m in qk]
    # ‖A1 B1 A2 B2‖_F = ‖R1 B1 A2 R2ᵀ‖_F with A1 = Q1 R1 and B2ᵀ = Q2 R2 (orthonormal Q).
    lead = torch.stack([torch.linalg.qr(m.A)[1] @ m.B for m in left])  # [N, k, d]
    tail = torch.stack([m.A @ torch.linalg.qr(m.B.T)[1].T for m in right])  # [N, d, k]
    left_norms = torch.linalg.matrix_norm(lead)
    right_norms = torch.linalg.matrix_norm(tail)
    scores = torch.zeros(n * heads, n * heads, dtype=lead.dtype, device=lead.device)
    for b in range(1, n):
        later = slice(b * heads, (b + 1) * heads)
        for start in range(0, b * heads, _chunk(lead, tail, heads)):
            stop = min(start + _chunk(lead, tail, heads), b * heads)
            product = torch.einsum("nid,hdj->nhij", lead[start:stop], tail[later])
            scores[start:stop, later] = torch.linalg.matrix_norm(product)
    scores = scores / left_norms[:, None] / right_norms[None, :]
    mask = torch.arange(n, device=scores.device)
    later_mask = (mask[:, None] < mask[None, :]).repeat_interleave(heads, 0)
    scores = torch.where(later_mask.repeat_interleave(heads, 1), scores, torch.zeros_like(scores))
    if kind != "V":
        _warn_rotary([w.label for w in weights if w.rotary], stacklevel)
    return scores.view(n, heads, n, heads)


def _chunk(lead: torch.Tensor, tail: torch.Tensor, heads: int) -> int:
    """Earlier heads per product, keeping each product near 2**26 numbers."""
    per = heads * lead.shape[1] * tail.shape[2]
    return max(1, (1 << 26) // max(per, 1))
