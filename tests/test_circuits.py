"""Weight-based head circuits: ``insp.ov``, ``insp.qk``, ``insp.composition_scores`` and
``FactoredMatrix``.

Every matrix is checked against the Hugging Face modules themselves, step by step as each
modeling file computes (a fused ``Conv1D`` split in thirds on GPT-2, ``query_key_value``
interleaved per head on GPT-NeoX and BLOOM, separate projections with grouped key/value heads
on Llama, one key/value head and a ``1 + weight`` norm on Gemma, ``q`` scaled before the
attention function on OPT), with every bias of the attention module set to zero; and, where no
rotation intervenes, against the attention weights eager attention returns.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)

import introspect
from introspect import (
    AttentionToolError,
    FactoredMatrix,
    Inspector,
    LocatorError,
    MissingPartError,
    RotaryWarning,
)
from introspect.testing import build_tiny, tiny_config

Tensor = torch.Tensor


# -- the families, and each one's own steps -------------------------------------------------------


def _split_heads(y: Tensor, heads: int) -> Tensor:
    return y.view(y.shape[0], heads, -1)


def _gpt2_qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = attn.c_attn(x).split(attn.embed_dim, dim=-1)  # Conv1D: x @ W, W [d, 3d]
    return tuple(_split_heads(t, attn.num_heads) for t in (q, k, v))  # type: ignore[return-value]


def _neox_qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    heads = attn.config.num_attention_heads
    fused = attn.query_key_value(x).view(x.shape[0], heads, -1)  # [q_h k_h v_h] per head
    q, k, v = fused.chunk(3, dim=-1)
    return q, k, v


def _bloom_qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    fused = attn.query_key_value(x).view(x.shape[0], attn.num_heads, 3, attn.head_dim)
    return fused[:, :, 0], fused[:, :, 1], fused[:, :, 2]


def _separate_qkv(attn: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dim = attn.head_dim
    q = attn.q_proj(x)
    if hasattr(attn, "scaling") and type(attn).__name__.startswith("OPT"):
        q = q * attn.scaling  # OPT scales q right after q_proj, before the attention function
    return tuple(  # type: ignore[return-value]
        t.view(x.shape[0], -1, dim) for t in (q, attn.k_proj(x), attn.v_proj(x))
    )


@dataclass
class Family:
    build: Callable[[], nn.Module]
    attn: Callable[[nn.Module, int], nn.Module]
    norm: Callable[[nn.Module, int], nn.Module]
    qkv: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor, Tensor]]
    o: str
    rotary: bool
    center: bool  # a LayerNorm before attention (else an RMSNorm)


FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        lambda: build_tiny(
            GPT2LMHeadModel,
            GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=64, n_positions=32),
        ),
        lambda m, b: m.transformer.h[b].attn,
        lambda m, b: m.transformer.h[b].ln_1,
        _gpt2_qkv,
        "c_proj",
        rotary=False,
        center=True,
    ),
    "gpt_neox": Family(
        lambda: build_tiny(
            GPTNeoXForCausalLM,
            GPTNeoXConfig(
                hidden_size=32,
                num_attention_heads=4,
                num_hidden_layers=3,
                intermediate_size=64,
                vocab_size=64,
                max_position_embeddings=32,
                rotary_pct=0.5,
            ),
        ),
        lambda m, b: m.gpt_neox.layers[b].attention,
        lambda m, b: m.gpt_neox.layers[b].input_layernorm,
        _neox_qkv,
        "dense",
        rotary=True,
        center=True,
    ),
    "llama": Family(
        lambda: build_tiny(
            LlamaForCausalLM,
            LlamaConfig(
                num_hidden_layers=3,
                hidden_size=64,
                intermediate_size=128,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=64,
                max_position_embeddings=32,
            ),
        ),
        lambda m, b: m.model.layers[b].self_attn,
        lambda m, b: m.model.layers[b].input_layernorm,
        _separate_qkv,
        "o_proj",
        rotary=True,
        center=False,
    ),
    "gemma": Family(
        lambda: build_tiny(
            GemmaForCausalLM,
            GemmaConfig(
                num_hidden_layers=2,
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_key_value_heads=1,
                head_dim=8,
                vocab_size=64,
                max_position_embeddings=32,
            ),
        ),
        lambda m, b: m.model.layers[b].self_attn,
        lambda m, b: m.model.layers[b].input_layernorm,
        _separate_qkv,
        "o_proj",
        rotary=True,
        center=False,
    ),
    "opt": Family(
        lambda: build_tiny(
            OPTForCausalLM,
            OPTConfig(
                hidden_size=32,
                num_attention_heads=4,
                ffn_dim=64,
                num_hidden_layers=2,
                vocab_size=64,
                max_position_embeddings=32,
                word_embed_proj_dim=32,
            ),
        ),
        lambda m, b: m.model.decoder.layers[b].self_attn,
        lambda m, b: m.model.decoder.layers[b].self_attn_layer_norm,
        _separate_qkv,
        "out_proj",
        rotary=False,
        center=True,
    ),
    "bloom": Family(
        lambda: build_tiny(
            BloomForCausalLM, BloomConfig(hidden_size=32, n_head=4, n_layer=2, vocab_size=64)
        ),
        lambda m, b: m.transformer.h[b].self_attention,
        lambda m, b: m.transformer.h[b].input_layernorm,
        _bloom_qkv,
        "dense",
        rotary=False,
        center=True,
    ),
}


class _Models:
    """Each family's model and Inspector, built on first use."""

    def __init__(self) -> None:
        self._built: dict[str, tuple[nn.Module, Inspector]] = {}

    def __getitem__(self, name: str) -> tuple[nn.Module, Inspector]:
        if name not in self._built:
            model = FAMILIES[name].build()
            self._built[name] = (model, Inspector(model))
        return self._built[name]


@pytest.fixture(scope="module")
def built() -> _Models:
    return _Models()


def _unbiased(attn: nn.Module) -> nn.Module:
    """A copy of ``attn`` with every bias set to zero (the matrices ignore biases)."""
    found = copy.deepcopy(attn)
    with torch.no_grad():
        for name, param in found.named_parameters():
            if name.endswith("bias"):
                param.zero_()
    return found


def _head_write(fam: Family, attn: nn.Module, x: Tensor, head: int) -> Tensor:
    """What head ``head`` writes through ``o`` (bias off) for value input ``x`` [n, d]: its
    value vector alone in ``o``'s input, the other heads' slices zero."""
    q, _, v = fam.qkv(attn, x)
    heads = q.shape[1]
    z = torch.zeros(x.shape[0], heads, v.shape[-1])
    z[:, head] = v[:, head // (heads // v.shape[1])]
    return getattr(attn, fam.o)(z.flatten(1))  # type: ignore[no-any-return]


def _score(fam: Family, attn: nn.Module, xq: Tensor, xk: Tensor, head: int) -> Tensor:
    """``q · k`` of head ``head`` for query inputs ``xq`` and key inputs ``xk`` (biases off)."""
    q = fam.qkv(attn, xq)[0]
    k = fam.qkv(attn, xk)[1]
    return (q[:, head] * k[:, head // (q.shape[1] // k.shape[1])]).sum(-1)


def _normalise(norm: nn.Module, x: Tensor, center: bool) -> Tensor:
    eps = next(
        float(getattr(norm, n))
        for n in ("eps", "variance_epsilon", "layer_norm_eps")
        if hasattr(norm, n)
    )
    xc = x - x.mean(-1, keepdim=True) if center else x
    return xc / torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + eps)


def _blocks_heads(insp: Inspector) -> list[tuple[int, int]]:
    """Every block, its first and last head (the last reads the last key/value head)."""
    return [(b, h) for b in range(insp.num_blocks) for h in (0, insp.num_heads - 1)]


def _warns_if_rotary(fam: Family) -> Any:
    # Elsewhere no warning: the suite turns any warning into an error.
    return pytest.warns(RotaryWarning) if fam.rotary else contextlib.nullcontext()


# -- OV and QK against each modeling file's own steps ---------------------------------------------


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_ov_is_what_the_head_writes(name: str, built: Any) -> None:
    fam = FAMILIES[name]
    model, insp = built[name]
    x = torch.randn(
        5, model.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(0)
    )
    for block, head in _blocks_heads(insp):
        attn = _unbiased(fam.attn(model, block))
        ov = insp.ov(block, head, fold_norm=False)
        assert ov.inner_dim == insp.head_dim
        with torch.no_grad():
            expected = _head_write(fam, attn, x, head)
        assert torch.allclose(x @ ov.AB, expected, atol=1e-5), (name, block, head)
        assert torch.allclose((x @ ov.A) @ ov.B, expected, atol=1e-5)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_qk_is_the_score_before_scaling(name: str, built: Any) -> None:
    fam = FAMILIES[name]
    model, insp = built[name]
    width = model.config.get_text_config().hidden_size
    xq, xk = torch.randn(2, 6, width, generator=torch.Generator().manual_seed(1))
    for block, head in _blocks_heads(insp):
        attn = _unbiased(fam.attn(model, block))
        with _warns_if_rotary(fam):
            qk = insp.qk(block, head, fold_norm=False)
        with torch.no_grad():
            expected = _score(fam, attn, xq, xk, head)
        found = ((xq @ qk.AB) * xk).sum(-1)
        assert torch.allclose(found, expected, atol=1e-5), (name, block, head)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fold_norm_folds_the_norm_the_attention_reads(name: str, built: Any) -> None:
    """With the norm folded the matrices read the stream normalised before its gain: for a
    stream vector ``x``, ``normalise(x) @ W_OV`` is what the head writes for the value
    ``attn_norm(x) - bias`` (Gemma's gain is ``1 + weight``: its own module says so here)."""
    fam = FAMILIES[name]
    model, insp = built[name]
    width = model.config.get_text_config().hidden_size
    x = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(2)) * 3 + 1
    block, head = insp.num_blocks - 1, 1
    norm = fam.norm(model, block)
    with torch.no_grad():
        u = norm(x) - (norm.bias if getattr(norm, "bias", None) is not None else 0)
    n = _normalise(norm, x, fam.center)
    attn = _unbiased(fam.attn(model, block))
    ov = insp.ov(block, head)
    with _warns_if_rotary(fam):
        qk = insp.qk(block, head)
    with torch.no_grad():
        write = _head_write(fam, attn, u[0], head)
        score = _score(fam, attn, u[0], u[1], head)
    assert torch.allclose(n[0] @ ov.AB, write, atol=1e-4)
    assert torch.allclose(((n[0] @ qk.AB) * n[1]).sum(-1), score, atol=1e-4)
    # A LayerNorm's output has zero mean, so each reading column is centred as well.
    assert torch.allclose(ov.A.mean(0), torch.zeros(ov.inner_dim), atol=1e-6) is fam.center
    raw = insp.ov(block, head, fold_norm=False)
    assert not torch.allclose(raw.A, ov.A)
    assert torch.equal(raw.B, ov.B)  # W_O is never changed


@pytest.mark.parametrize("name", ["gpt2", "opt"])
def test_qk_against_eager_attention_weights(name: str, built: Any) -> None:
    """Without rotation: the attention weights Hugging Face returns for a query attending to
    two keys are the softmax of ``x_q @ W_QK @ x_k`` times the attention's scaling (1 on OPT,
    which scales q first: its factor is inside W_QK)."""
    fam = FAMILIES[name]
    model, _ = built[name]
    plain = copy.deepcopy(model)
    for block in range(plain.config.num_hidden_layers):
        with torch.no_grad():
            for pname, param in fam.attn(plain, block).named_parameters():
                if pname.endswith("bias"):
                    param.zero_()
    insp = Inspector(plain)
    width = plain.config.hidden_size
    xk, xq = torch.randn(2, width, generator=torch.Generator().manual_seed(3))
    block = insp.num_blocks - 1
    with (
        insp.patch(f"block[{block}].attn.input", torch.stack([xk, xq])[None]),
        insp.capture(f"block[{block}].attn.pattern", stop=True) as cap,
    ):
        plain(input_ids=torch.tensor([[5, 6]]))
    pattern = cap[f"block[{block}].attn.pattern"].output[0, :, 1]  # query 1 over keys 0, 1
    scale = 1 / math.sqrt(insp.head_dim) if name == "gpt2" else 1.0
    for head in range(insp.num_heads):
        qk = insp.qk(block, head, fold_norm=False).AB
        logits = torch.stack([xq @ qk @ xk, xq @ qk @ xq]) * scale
        assert torch.allclose(pattern[head], torch.softmax(logits, -1), atol=1e-5), head


def test_rotary_models_warn_and_say_what_qk_means(built: Any) -> None:
    _, insp = built["llama"]
    with pytest.warns(
        RotaryWarning, match=r"block\[1\]\.attn rotates q and k .*\(relative position 0\)"
    ) as caught:
        insp.qk(1, 0)
    assert caught[0].filename == __file__  # it points at the caller's line
    with pytest.warns(RotaryWarning):
        insp.composition_scores("K")
    _, gpt2 = built["gpt2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpt2.qk(0, 0)
        gpt2.composition_scores("Q")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # V-composition has no QK
        insp.composition_scores("V")


def test_grouped_heads_share_their_key_value_head(built: Any) -> None:
    _, insp = built["llama"]  # 4 query heads, 2 key/value heads
    a, b, c = (insp.ov(0, h, fold_norm=False) for h in (0, 1, 2))
    assert torch.equal(a.A, b.A) and not torch.equal(b.A, c.A)
    assert not torch.equal(a.B, b.B)
    _, gemma = built["gemma"]  # one key/value head
    with pytest.warns(RotaryWarning):
        ks = [gemma.qk(0, h).B for h in range(gemma.num_heads)]
    assert all(torch.equal(ks[0], k) for k in ks)


# -- composition scores -----------------------------------------------------------------------------


def _dense_scores(insp: Inspector, kind: str) -> Tensor:
    n, heads = insp.num_blocks, insp.num_heads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RotaryWarning)
        ov = [[insp.ov(b, h).AB.double() for h in range(heads)] for b in range(n)]
        qk = [[insp.qk(b, h).AB.double() for h in range(heads)] for b in range(n)]
    right = {"Q": qk, "K": [[m.T for m in row] for row in qk], "V": ov}[kind]
    out = torch.zeros(n, heads, n, heads, dtype=torch.float64)
    for a in range(n):
        for h in range(heads):
            for b in range(a + 1, n):
                for g in range(heads):
                    left, later = ov[a][h], right[b][g]
                    out[a, h, b, g] = torch.linalg.matrix_norm(left @ later) / (
                        torch.linalg.matrix_norm(left) * torch.linalg.matrix_norm(later)
                    )
    return out


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["Q", "K", "V"])
def test_composition_scores_against_dense(name: str, kind: str, built: Any) -> None:
    _, insp = built[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RotaryWarning)
        scores = insp.composition_scores(kind)
        lower = insp.composition_scores(kind.lower())
    n, heads = insp.num_blocks, insp.num_heads
    assert scores.shape == (n, heads, n, heads)
    assert torch.equal(scores, lower)
    expected = _dense_scores(insp, kind)
    assert torch.allclose(scores.double(), expected, atol=1e-5)
    later = torch.arange(n)[:, None] < torch.arange(n)[None, :]
    assert (scores.permute(0, 2, 1, 3)[~later] == 0).all()  # TransformerLens's mask: a < b only
    assert (scores.permute(0, 2, 1, 3)[later] > 0).all()
    assert (scores <= 1 + 1e-6).all()


def test_composition_scores_follow_fold_norm(built: Any) -> None:
    _, insp = built["gpt2"]
    folded, raw = insp.composition_scores("V"), insp.composition_scores("V", fold_norm=False)
    assert not torch.allclose(folded, raw)


# -- FactoredMatrix ---------------------------------------------------------------------------------


def _factors(m: int, r: int, n: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(m, r, generator=g, dtype=torch.float64),
        torch.randn(r, n, generator=g, dtype=torch.float64),
    )


sizes = st.integers(min_value=1, max_value=7)
seeds = st.integers(min_value=0, max_value=2**16)


@settings(max_examples=40, deadline=None)
@given(m=sizes, r=sizes, n=sizes, seed=seeds)
def test_factored_matrix_against_dense(m: int, r: int, n: int, seed: int) -> None:
    A, B = _factors(m, r, n, seed)
    fm, dense = FactoredMatrix(A, B), A @ B
    assert fm.shape == dense.shape and fm.inner_dim == r
    assert torch.equal(fm.AB, dense)
    U, S, V = fm.svd()
    k = min(m, r, n)
    assert U.shape == (m, k) and S.shape == (k,) and V.shape == (n, k)
    assert torch.allclose(U @ torch.diag(S) @ V.T, dense, atol=1e-10)
    assert torch.allclose(U.T @ U, torch.eye(k, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(V.T @ V, torch.eye(k, dtype=torch.float64), atol=1e-10)
    dense_s = torch.linalg.svdvals(dense)
    assert torch.allclose(fm.singular_values(), dense_s[:k], atol=1e-10)
    assert torch.allclose(
        dense_s[k:], torch.zeros(len(dense_s) - k, dtype=torch.float64), atol=1e-10
    )
    assert torch.allclose(fm.norm(), torch.linalg.matrix_norm(dense))
    assert fm.rank == int(torch.linalg.matrix_rank(dense))
    assert torch.allclose(fm.T.AB, dense.T)
    assert torch.allclose((fm * 2.5).AB, 2.5 * dense) and torch.allclose((-fm).AB, -dense)
    vec_n, vec_m = torch.ones(n, dtype=torch.float64), torch.arange(m, dtype=torch.float64)
    assert torch.allclose(fm @ vec_n, dense @ vec_n)
    assert torch.allclose(vec_m @ fm, vec_m @ dense)
    right = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    left = torch.randn(2, m, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert isinstance(fm @ right, FactoredMatrix) and torch.allclose((fm @ right).AB, dense @ right)
    assert isinstance(left @ fm, FactoredMatrix) and torch.allclose((left @ fm).AB, left @ dense)
    C, D = _factors(n, 2, m, seed + 1)
    other = FactoredMatrix(C, D)
    product = fm @ other
    assert isinstance(product, FactoredMatrix) and product.inner_dim == min(r, 2)
    assert torch.allclose(product.AB, dense @ (C @ D), atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(m=sizes, r=sizes, seed=seeds)
def test_factored_matrix_eigenvalues(m: int, r: int, seed: int) -> None:
    A, B = _factors(m, r, m, seed)
    fm = FactoredMatrix(A, B)
    ours = fm.eigenvalues()
    dense = torch.linalg.eigvals(A @ B)
    assert ours.shape == (min(m, r),)
    # Each of ours is one of the product's; the product's others are zero.
    unmatched = list(dense)
    for value in ours:
        i = min(range(len(unmatched)), key=lambda j: abs(unmatched[j] - value))
        assert abs(unmatched.pop(i) - value) < 1e-6 * max(1.0, abs(value))
    assert all(abs(v) < 1e-6 for v in unmatched)


def test_factored_matrix_refuses_bad_shapes() -> None:
    fm = FactoredMatrix(torch.ones(3, 2), torch.ones(2, 4))
    for call, match in [
        (lambda: FactoredMatrix(torch.ones(3, 2), torch.ones(3, 4)), "same r"),
        (lambda: FactoredMatrix(torch.ones(3), torch.ones(3, 4)), "same r"),
        (lambda: FactoredMatrix([[1.0]], torch.ones(1, 1)), "two tensors"),
        (lambda: FactoredMatrix(torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1)), "floating"),
        (lambda: fm @ torch.ones(3), r"vector \[4\]"),
        (lambda: torch.ones(4) @ fm, r"vector \[3\]"),
        (lambda: fm @ torch.ones(2, 4, 5), r"\(x @ m.A\) @ m.B"),
        (lambda: fm @ FactoredMatrix(torch.ones(3, 1), torch.ones(1, 2)), "inner sizes"),
        (lambda: fm.eigenvalues(), "square"),
        (lambda: fm.BA, "square"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match) as info:
            call()
        assert "\n" not in str(info.value)
    with pytest.raises(TypeError):
        fm * "2"  # type: ignore[operator]


def test_factored_matrix_half_precision_decomposes_in_float32() -> None:
    A, B = (t.to(torch.bfloat16) for t in _factors(6, 3, 5, 0))
    fm = FactoredMatrix(A, B)
    assert fm.dtype == torch.bfloat16 and fm.singular_values().dtype == torch.float32
    assert torch.allclose(fm.norm(), torch.linalg.matrix_norm((A @ B).float()), rtol=1e-2)


def test_public_names() -> None:
    for name in ("FactoredMatrix", "RotaryWarning"):
        assert name in introspect.__all__ and getattr(introspect, name).__name__ == name


# -- refusals: one line, before any forward ---------------------------------------------------------


class _Forwards:
    def __init__(self, model: nn.Module) -> None:
        self.count = 0
        self._handle = model.register_forward_pre_hook(self._seen)

    def _seen(self, *_: Any) -> None:
        self.count += 1

    def __enter__(self) -> _Forwards:
        return self

    def __exit__(self, *_: Any) -> None:
        self._handle.remove()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda i: i.ov(3, 0),
            LocatorError,
            r"block 3 is out of range for gpt2 \(3 blocks: use -3\.\.2\)",
        ),
        (lambda i: i.qk(-4, 0), LocatorError, "out of range"),
        (lambda i: i.ov("1", 0), LocatorError, "block must be a block index"),
        (lambda i: i.ov(True, 0), LocatorError, "block must be a block index"),
        (
            lambda i: i.ov(0, 4),
            AttentionToolError,
            r"head 4 is out of range for block\[0\]\.attn, which has 4 heads \(use -4\.\.3\)",
        ),
        (lambda i: i.qk(0, 1.0), AttentionToolError, "head must be a head index"),
        (
            lambda i: i.ov(0, 0, fold_norm="yes"),
            AttentionToolError,
            "fold_norm must be True or False",
        ),
        (
            lambda i: i.composition_scores("O"),
            AttentionToolError,
            "kind must be one of 'Q', 'K', 'V'",
        ),
        (lambda i: i.composition_scores(None), AttentionToolError, "kind must be one of"),
    ],
)
def test_bad_input_is_refused_before_any_forward(
    call: Callable[[Inspector], Any], error: type[Exception], match: str, built: Any
) -> None:
    model, insp = built["gpt2"]
    with _Forwards(model) as seen, pytest.raises(error, match=match) as info:
        call(insp)
    assert "\n" not in str(info.value) and seen.count == 0


def test_a_model_without_a_head_layout_is_refused() -> None:
    from transformers import MambaForCausalLM

    model = build_tiny(MambaForCausalLM, tiny_config("mamba"))
    insp = Inspector(model)
    for call in (
        lambda: insp.ov(0, 0),
        lambda: insp.qk(0, 0),
        lambda: insp.composition_scores("V"),
    ):
        with (
            _Forwards(model) as seen,
            pytest.raises(MissingPartError, match="has no attention heads") as info,
        ):
            call()
        assert "\n" not in str(info.value) and seen.count == 0


def test_training_mode_is_refused(built: Any) -> None:
    model = FAMILIES["gpt2"].build().train()
    with _Forwards(model) as seen, pytest.raises(AttentionToolError, match=r"model\.eval\(\)"):
        Inspector(model).ov(0, 0)
    assert seen.count == 0


def test_qk_of_normed_queries_is_refused_and_ov_still_read() -> None:
    """Qwen3 normalises q and k per head after the projections: the scores are not bilinear in
    the input, which the reading proves and says; the values are, so OV is read."""
    from transformers import AutoModelForCausalLM

    model = build_tiny(AutoModelForCausalLM.from_config, tiny_config("qwen3"))
    insp = Inspector(model)
    with pytest.raises(AttentionToolError, match="q and k are not a linear function") as info:
        insp.qk(0, 0)
    assert "\n" not in str(info.value)
    with pytest.raises(AttentionToolError, match="not a linear function"):
        insp.composition_scores("Q")
    attn = _unbiased(model.model.layers[0].self_attn)
    x = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    fam = Family(
        lambda: model, lambda m, b: attn, lambda m, b: attn, _separate_qkv, "o_proj", True, False
    )
    with torch.no_grad():
        expected = _head_write(fam, attn, x, 3)
    assert torch.allclose(x @ insp.ov(0, 3, fold_norm=False).AB, expected, atol=1e-5)


# -- the reading is cached while the weights stay, and read again when they change --------------------


def test_cached_until_the_weights_change() -> None:
    model = FAMILIES["gpt2"].build()
    insp = Inspector(model)
    first = insp.ov(1, 2, fold_norm=False)
    with _Forwards(model) as seen:
        again = insp.ov(1, 2, fold_norm=False)
        insp.qk(1, 0)
    assert seen.count == 0 and torch.equal(first.AB, again.AB)
    attn = model.transformer.h[1].attn
    with torch.no_grad():
        attn.c_proj.weight.mul_(2)  # W_O, read from o's weight
    assert torch.allclose(insp.ov(1, 2, fold_norm=False).AB, 2 * first.AB)
    with torch.no_grad():
        attn.c_attn.weight.mul_(3)  # W_V, read through the forward
    assert torch.allclose(insp.ov(1, 2, fold_norm=False).AB, 6 * first.AB, atol=1e-5)
    model.transformer.h[1].ln_1 = nn.LayerNorm(32)  # a new norm: gain 1
    folded = insp.ov(1, 2)
    assert torch.allclose(
        folded.A,
        insp.ov(1, 2, fold_norm=False).A - insp.ov(1, 2, fold_norm=False).A.mean(0),
        atol=1e-6,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_reads_past_large_biases(dtype: torch.dtype) -> None:
    """In 16-bit floats a bias of 20 rounds ``x @ W + b`` to 1/8: the reading probes at a
    larger scale so the weights survive it, and proves itself against that rounding."""
    from transformers import AutoModelForCausalLM

    model = build_tiny(AutoModelForCausalLM.from_config, tiny_config("qwen2"))  # q/k/v biases
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.bias.fill_(20.0)
            layer.self_attn.v_proj.bias.fill_(-15.0)
    half = model.to(dtype)
    exact = Inspector(copy.deepcopy(half).float())
    insp = Inspector(half)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RotaryWarning)
        for what in ("ov", "qk"):
            expected = getattr(exact, what)(1, 2).AB
            found = getattr(insp, what)(1, 2).AB
            assert found.dtype == torch.float32
            assert (found - expected).abs().max() <= 1e-2 * expected.abs().max(), what
