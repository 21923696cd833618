"""Site names of the SAE formats, mapped onto locators: a table, read by one function.

Each row of :data:`SITE_NAMES` is a pattern over a format's site name, the locator it names
(``{0}`` is the block index the pattern captured), and what is known about it:

- ``residual``: the value lives in the residual stream's basis, so an SAE trained on
  TransformerLens's processed weights (``center_writing_weights``) read it with each token's
  mean removed;
- ``after_norm``: a locator that replaces ``locator`` on models that have it (Gemma-2/3's
  ``hook_mlp_out``/``hook_attn_out`` come after the sub-layer's post-norm);
- ``module_path``: the name is a module path (sparsify hookpoints, SAELens on Hugging Face
  models): the locator's module on the model must end with it, which is checked;
- ``splice``: ``False`` where the locator reads the value but an edit there cannot replace it
  (``hook_resid_mid`` is the input of the block's second norm: an edit of that input changes what
  the MLP reads, not the residual the block adds the MLP's output to);
- ``reason``: why there is no locator (``None`` rows) or why splicing is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SITE_NAMES", "Site", "SiteRule", "map_site", "tl_hook_name"]


@dataclass(frozen=True)
class SiteRule:
    """One row of the site table."""

    pattern: str
    locator: str | None
    residual: bool = False
    after_norm: str | None = None
    module_path: bool = False
    splice: bool = True
    reason: str | None = None
    heads: bool = False


_BLOCKS = r"(?:.+\.)?(?:layers|h|layer|blocks|block)\.(\d+)"

SITE_NAMES: tuple[SiteRule, ...] = (
    # TransformerLens hook names (SAELens, Llama Scope)
    SiteRule(r"hook_embed", "embed", residual=True),
    SiteRule(r"blocks\.(\d+)\.hook_resid_pre", "block[{0}].input", residual=True),
    SiteRule(
        r"blocks\.(\d+)\.hook_resid_mid",
        "block[{0}].mlp_norm.input",
        residual=True,
        splice=False,
        reason=(
            "hook_resid_mid is the input of the block's second norm: an edit there changes "
            "what the MLP reads but not the residual the block adds the MLP's output to, so a "
            "splice would not be SAELens's"
        ),
    ),
    SiteRule(r"blocks\.(\d+)\.hook_resid_post", "block[{0}]", residual=True),
    SiteRule(
        r"blocks\.(\d+)\.hook_mlp_out",
        "block[{0}].mlp",
        residual=True,
        after_norm="block[{0}].post_mlp_norm",
    ),
    SiteRule(
        r"blocks\.(\d+)\.hook_attn_out",
        "block[{0}].attn",
        residual=True,
        after_norm="block[{0}].post_attn_norm",
    ),
    SiteRule(r"blocks\.(\d+)\.attn\.hook_z", "block[{0}].attn.z", heads=True),
    SiteRule(r"blocks\.(\d+)\.attn\.hook_result", "block[{0}].attn.result", residual=True),
    SiteRule(r"blocks\.(\d+)\.mlp\.hook_post", "block[{0}].mlp.post"),
    SiteRule(
        r"blocks\.(\d+)\.attn\.hook_[qk]",
        None,
        reason=(
            "TransformerLens records q and k before rotary embeddings and introspect's "
            "block[i].attn.q/.k after them: pass at= to say where this SAE reads"
        ),
    ),
    SiteRule(
        r"hook_pos_embed|blocks\.(\d+)\.mlp\.hook_pre|.*hook_normalized|.*hook_scale",
        None,
        reason=(
            "no locator names this TransformerLens value (position embedding, MLP "
            "pre-activation, or a norm's output before its folded weights): pass at="
        ),
    ),
    # dictionary_learning submodule names
    SiteRule(r"(?:resid_post|resid)_layer_(\d+)", "block[{0}]"),
    SiteRule(r"mlp_out_layer_(\d+)", "block[{0}].mlp"),
    SiteRule(r"attn_out_layer_(\d+)", "block[{0}].attn"),
    SiteRule(r"embed", "embed"),
    # module paths (sparsify hookpoints, SAELens on Hugging Face models)
    SiteRule(_BLOCKS, "block[{0}]", module_path=True),
    SiteRule(_BLOCKS + r"\.(?:mlp|feed_forward|ffn)", "block[{0}].mlp", module_path=True),
    SiteRule(_BLOCKS + r"\.(?:self_attn|attn|attention)", "block[{0}].attn", module_path=True),
    SiteRule(r"(?:.+\.)?(?:embed_tokens|wte|embed_in|word_embeddings)", "embed", module_path=True),
)


@dataclass
class Site:
    """Where an SAE reads, as its format names it and as a locator.

    Example:
        >>> map_site("blocks.6.hook_resid_pre").locator
        'block[6].input'
    """

    hook_name: str | None = None
    locator: str | None = None
    head_index: int | None = None
    flatten_heads: bool = False
    residual: bool = False
    after_norm: str | None = None
    """A locator preferred where the model has it (the sub-layer's post-norm on Gemma-2/3)."""
    module_path: str | None = None
    """A module path the locator's module must end with on the model (sparsify hookpoints)."""
    splice: bool = True
    reason: str | None = None
    """Why ``locator`` is ``None``, or why splicing there is refused."""
    transcoder: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def map_site(
    hook_name: str | None,
    *,
    head_index: int | None = None,
    transcoder: bool = False,
) -> Site:
    """The site a format's name stands for, from :data:`SITE_NAMES` (first match wins).

    Example:
        >>> site = map_site("blocks.2.attn.hook_z", head_index=3)
        >>> site.locator, site.head_index, site.flatten_heads
        ('block[2].attn.z', 3, False)
        >>> map_site("layers.7").module_path, map_site("layers.7").locator
        ('layers.7', 'block[7]')
        >>> print(map_site("hook_pos_embed").locator)
        None
    """
    if not hook_name:
        return Site(reason="the format names no site: pass at= to say where this SAE reads")
    for rule in SITE_NAMES:
        match = re.fullmatch(rule.pattern, hook_name)
        if match is None:
            continue
        if rule.locator is None:
            return Site(hook_name=hook_name, reason=f"{hook_name}: {rule.reason}")
        groups = [g for g in match.groups() if g is not None]
        return Site(
            hook_name=hook_name,
            locator=rule.locator.format(*groups),
            head_index=head_index if rule.heads else None,
            flatten_heads=rule.heads and head_index is None,
            residual=rule.residual,
            after_norm=rule.after_norm.format(*groups) if rule.after_norm else None,
            module_path=hook_name if rule.module_path else None,
            splice=rule.splice,
            reason=None if rule.splice else rule.reason,
            transcoder=transcoder,
        )
    return Site(
        hook_name=hook_name,
        reason=f"{hook_name!r} matches no known site name: pass at= to say where this SAE reads",
    )


_REVERSE: tuple[tuple[str, str], ...] = (
    (r"embed", "hook_embed"),
    (r"block\[(\d+)\]\.input", "blocks.{0}.hook_resid_pre"),
    (r"block\[(\d+)\]", "blocks.{0}.hook_resid_post"),
    (r"block\[(\d+)\]\.mlp", "blocks.{0}.hook_mlp_out"),
    (r"block\[(\d+)\]\.attn", "blocks.{0}.hook_attn_out"),
    (r"block\[(\d+)\]\.attn\.z", "blocks.{0}.attn.hook_z"),
    (r"block\[(\d+)\]\.mlp\.post", "blocks.{0}.mlp.hook_post"),
)


def tl_hook_name(locator: str | None) -> str | None:
    """The TransformerLens hook name of a locator, where the table has one (for saving).

    Example:
        >>> tl_hook_name("block[3]"), tl_hook_name("final_norm")
        ('blocks.3.hook_resid_post', None)
    """
    if locator is None:
        return None
    for pattern, name in _REVERSE:
        match = re.fullmatch(pattern, locator)
        if match:
            return name.format(*match.groups())
    return None
