"""Using an SAE on a model: where it reads, splicing it into the forward, evaluating it.

Everything here goes through the Inspector's public edits (``insp.edit(at, fn=...)``,
``insp.ablate``), typed as :class:`InspectorLike`, so a splice has the scoping, positions,
threads and generation rules of every edit, and nothing here depends on the facade.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from introspect._errors import IntrospectError, SAEError
from introspect._html import sae_evaluation_view, save_view
from introspect._locators import Locator
from introspect._sae._model import SparseAutoencoder

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["InspectorLike", "SAEEvaluation", "Splice", "evaluate_sae", "site_locator", "splice"]

FeaturesFn = Callable[[torch.Tensor], torch.Tensor]


class InspectorLike(Protocol):
    """The part of :class:`introspect.Inspector` SAEs use (and nothing else)."""

    model: nn.Module

    def locator(self, text: str | Locator) -> Locator: ...

    def path(self, locator: str | Locator) -> str: ...

    def head_count(self, locator: str | Locator) -> int: ...

    @property
    def head_dim(self) -> int: ...

    def edit(
        self,
        locator: str | Locator,
        fn: Callable[[torch.Tensor, Any], torch.Tensor],
        positions: Any = None,
        *,
        heads: Any = None,
    ) -> AbstractContextManager[Any]: ...

    def ablate(
        self,
        locator: str | Locator,
        mean_over: Any = None,
        positions: Any = None,
        *,
        heads: Any = None,
    ) -> AbstractContextManager[Any]: ...


# -- where an SAE reads ---------------------------------------------------------------------------


def _has(insp: InspectorLike, text: str) -> bool:
    try:
        insp.path(text)
    except IntrospectError:
        return False
    return True


def _hidden_size(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    getter = getattr(config, "get_text_config", None)
    if callable(getter):
        config = getter()
    value = getattr(config, "hidden_size", None)
    return value if isinstance(value, int) else None


def _expected_width(insp: InspectorLike, loc: Locator, sae: SparseAutoencoder) -> int | None:
    """The width the SAE will be handed at ``loc`` on this model (``None``: unknown here)."""
    sub = loc.sub or ""
    if sub.endswith(".z"):
        head_dim = insp.head_dim
        if sae.head_index is not None:
            return head_dim
        return insp.head_count(loc) * head_dim
    if sub.endswith(".post") or ("." in sub and not sub.endswith("_norm")):
        return None
    return _hidden_size(insp.model)


def site_locator(
    insp: InspectorLike,
    sae: SparseAutoencoder,
    at: str | Locator | None = None,
    *,
    splicing: bool = False,
) -> Locator:
    """The locator ``sae`` reads on this model (``at``, else its own site), checked.

    The SAE's site name picks the locator (Gemma-2/3's post-norms where the model has them);
    a sparsify hookpoint must be the module path of that locator; the SAE's ``d_in`` must be
    the site's width. Each failure is an :class:`~introspect.SAEError` before any forward.
    """
    site = sae.site
    if at is None:
        if site.locator is None:
            raise SAEError(
                f"this SAE's site is unknown ({site.reason or 'no site name'}): pass at="
            )
        if splicing and not site.splice:
            raise SAEError(f"cannot splice at {site.locator}: {site.reason}")
        text = site.after_norm if site.after_norm and _has(insp, site.after_norm) else site.locator
        try:
            loc = insp.locator(text)
            path = insp.path(loc)
        except IntrospectError as exc:
            first = str(exc).splitlines()[0]
            raise SAEError(
                f"the SAE's site {site.hook_name or text} is {text}, which this model lacks "
                f"({first}): pass at= to name where it reads"
            ) from None
        if site.module_path is not None and not (
            path == site.module_path or path.endswith("." + site.module_path)
        ):
            raise SAEError(
                f"the SAE's hookpoint {site.module_path!r} reads as {text}, whose module here is "
                f"{path!r}: this SAE was trained on another architecture's module; pass at="
            )
    else:
        loc = insp.locator(at)
        if loc.is_slice:
            raise SAEError(f"an SAE reads one site, not the slice {loc}")
    expected = _expected_width(insp, loc, sae)
    if expected is not None and expected != sae.d_in:
        raise SAEError(
            f"the SAE reads d_in={sae.d_in} values, but {loc} is {expected} wide on this model"
            f"{' per head' if sae.head_index is not None else ''}: it was trained on another "
            "model or site"
        )
    return loc


# -- splicing ----------------------------------------------------------------------------------


def _feature_edit(
    features_fn: FeaturesFn | None,
    features: Sequence[int] | int | None,
    ablate_features: Sequence[int] | None,
    steer_features: Mapping[int, float] | None,
    d_sae: int,
) -> FeaturesFn | None:
    def check(indices: Iterable[int], what: str) -> list[int]:
        out = [int(i) for i in indices]
        bad = [i for i in out if not -d_sae <= i < d_sae]
        if bad:
            raise SAEError(f"{what}: latent {bad[0]} is out of range (d_sae={d_sae})")
        return [i % d_sae for i in out]

    selected = None
    if features is not None:
        selected = check([features] if isinstance(features, int) else features, "features=")
        if features_fn is None:
            raise SAEError("features= selects the latents features_fn edits: pass features_fn")
    ablated = check(ablate_features or (), "ablate_features=")
    steered = dict(
        zip(
            check(steer_features or {}, "steer_features="),
            (steer_features or {}).values(),
            strict=True,
        )
    )
    if features_fn is None and not ablated and not steered:
        return None

    def edit(f: torch.Tensor) -> torch.Tensor:
        out = f
        if features_fn is not None:
            new = features_fn(f)
            if not isinstance(new, torch.Tensor) or new.shape != f.shape:
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise SAEError(
                    f"features_fn must return the features' shape {tuple(f.shape)}, got {got}"
                )
            if selected is not None:
                mask = torch.zeros(d_sae, dtype=torch.bool, device=f.device)
                mask[selected] = True
                new = torch.where(mask, new.to(f.dtype), f)
            out = new.to(f.dtype)
        if ablated or steered:
            keep = torch.ones(d_sae, dtype=f.dtype, device=f.device)
            add = torch.zeros(d_sae, dtype=f.dtype, device=f.device)
            keep[ablated] = 0
            for i, value in steered.items():
                add[i] = add[i] + float(value)
            out = out * keep + add
        return out

    return edit


class FeatureSite(nn.Module):
    """An identity the spliced SAE's features pass through, so captures and edits reach them.

    Not registered in the model: while a splice made by ``insp.splice`` is active, the locator
    ``<site>.sae.features`` resolves to it, and a capture records (an edit changes) the
    features ``[batch, seq, d_sae]`` as they go from the encoder to the decoder.

    Example:
        >>> FeatureSite(8)(torch.ones(1, 2, 8)).shape
        torch.Size([1, 2, 8])
    """

    def __init__(self, d_sae: int) -> None:
        super().__init__()
        self.d_sae = d_sae

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class Splice:
    """An SAE spliced into the forward at one site: a context manager (an intervention).

    While active, every call of the model replaces the value at :attr:`at` by the SAE's
    reconstruction; with ``error_term=True`` by ``x + (x̂_edited - x̂).detach()``-style
    arithmetic that returns ``x`` bit for bit when no feature is edited, while gradients
    reach the features (the error ``x - x̂`` detached, as SAELens does). After each call
    :attr:`features` holds that call's features ``[batch, seq, d_sae]`` (after edits, in the
    graph when gradients are on), :attr:`features_before_edit`, :attr:`sae_input` and
    :attr:`reconstruction` (the SAE's layout: ``[batch, seq, d_in]``).

    Build it with :func:`splice`.
    """

    def __init__(
        self,
        insp: InspectorLike,
        sae: SparseAutoencoder,
        at: Locator,
        *,
        error_term: bool,
        features_fn: FeaturesFn | None,
        positions: Any,
        sites: dict[str, nn.Module] | None = None,
    ) -> None:
        self.sae = sae
        self.at = at
        self.site = FeatureSite(sae.d_sae)
        """The features' site: ``<at>.sae.features`` while active (see :class:`FeatureSite`)."""
        self._sites = sites
        """The locator the SAE is spliced at."""
        self.error_term = error_term
        self.features_fn = features_fn
        self.features: torch.Tensor | None = None
        self.features_before_edit: torch.Tensor | None = None
        self.sae_input: torch.Tensor | None = None
        self.reconstruction: torch.Tensor | None = None
        self.calls = 0
        """How many model calls the SAE ran in (one per generated token under ``generate``)."""
        name = f"sae({sae.architecture}, d_sae={sae.d_sae}{', error_term' if error_term else ''})"
        self._fn.__func__.__name__ = name  # type: ignore[attr-defined]
        self._intervention = insp.edit(at, self._fn, positions)

    # -- the SAE's view of a value ------------------------------------------------------------

    def _to_sae(self, value: torch.Tensor) -> torch.Tensor:
        site = self.sae.site
        if site.head_index is not None:
            if value.dim() < 4:
                raise SAEError(
                    f"{self.at}: an SAE of head {site.head_index} needs [batch, seq, heads, d] "
                    f"values, got {tuple(value.shape)}"
                )
            return value[..., site.head_index, :]
        if site.flatten_heads and value.dim() >= 4:
            return value.flatten(-2)
        return value

    def _to_site(self, value: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        site = self.sae.site
        out = out.to(value.dtype)
        if site.head_index is not None:
            heads = list(value.unbind(-2))
            heads[site.head_index] = out
            return torch.stack(heads, dim=-2)
        return out.reshape(value.shape)

    def _fn(self, value: torch.Tensor, record: Any) -> torch.Tensor:
        sae = self.sae
        source = record.input if sae.is_transcoder else value
        x = self._to_sae(source)
        sae_in, undo = sae._process_in(x)
        clean = sae._activate(sae_in)
        features = clean if self.features_fn is None else self.features_fn(clean)
        # Through the site: a capture of <at>.sae.features records them, an edit changes them.
        features = self.site(features)
        recon = sae._process_out(sae.decode(features), undo)
        self.calls += 1
        self.sae_input, self.features_before_edit = x, clean
        self.features, self.reconstruction = features, recon
        if not self.error_term:
            return self._to_site(value, recon)
        if features is clean:
            if not torch.is_grad_enabled():
                return value  # the forward is the model's own, bit for bit
            delta = recon - recon.detach()
        else:
            clean_recon = sae._process_out(sae.decode(clean), undo)
            delta = recon - clean_recon.detach()
        if sae.site.head_index is not None or sae.site.flatten_heads:
            zero = torch.zeros_like(value)
            return value.detach() + (self._to_site(zero, delta) - zero)
        return value.detach() + delta.to(value.dtype)

    # -- context manager ------------------------------------------------------------------------

    def __enter__(self) -> Splice:
        key = str(self.at)
        if self._sites is not None:
            if key in self._sites:
                raise SAEError(
                    f"an SAE is already spliced at {key}: leave that splice first (one SAE per "
                    f"site at a time, so that {key}.sae.features names one set of features)"
                )
            self._sites[key] = self.site
        try:
            self._intervention.__enter__()
        except BaseException:
            if self._sites is not None:
                self._sites.pop(key, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._intervention.__exit__(exc_type, exc, tb)
        finally:
            if self._sites is not None and self._sites.get(str(self.at)) is self.site:
                del self._sites[str(self.at)]

    def __repr__(self) -> str:
        return f"Splice({self.at}, {self.sae.architecture}, error_term={self.error_term})"


def splice(
    insp: InspectorLike,
    sae: SparseAutoencoder,
    at: str | Locator | None = None,
    *,
    error_term: bool = False,
    features_fn: FeaturesFn | None = None,
    features: Sequence[int] | int | None = None,
    ablate_features: Sequence[int] | None = None,
    steer_features: Mapping[int, float] | None = None,
    positions: Any = None,
    sites: dict[str, nn.Module] | None = None,
) -> Splice:
    """Splice ``sae`` into the model at ``at`` (default: the SAE's own site) while active.

    Without ``error_term`` the value is replaced by the SAE's reconstruction; with it the
    forward is unchanged (bit for bit) unless features are edited, while gradients reach the
    features. Features are edited by ``features_fn(features) -> features`` (on the latents in
    ``features`` only, when given), ``ablate_features=[i, ...]`` (set to zero) and
    ``steer_features={i: value}`` (added). ``positions`` limits the splice to some tokens, as
    for every edit. The returned :class:`Splice` holds the last call's features.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from introspect import Inspector
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> insp, ids = Inspector(model.eval()), torch.tensor([[1, 2, 3]])
        >>> sae = SparseAutoencoder(32, 64, architecture="topk", k=8)
        >>> with torch.no_grad(), splice(insp, sae, "block[0]", error_term=True) as sp:
        ...     same = model(ids).logits
        >>> torch.equal(same, model(ids).logits), sp.features.shape
        (True, torch.Size([1, 3, 64]))
    """
    loc = site_locator(insp, sae, at, splicing=True)
    edit = _feature_edit(features_fn, features, ablate_features, steer_features, sae.d_sae)
    return Splice(
        insp, sae, loc, error_term=error_term, features_fn=edit, positions=positions, sites=sites
    )


# -- evaluation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SAEEvaluation:
    """How well an SAE stands in for its site on some inputs (see :func:`evaluate_sae`)."""

    at: str
    tokens: int
    """Real tokens the SAE read (``L0``, explained variance and dead latents count these)."""
    ce_clean: float
    ce_sae: float
    ce_ablate: float
    ce_score: float
    """``(CE_ablate - CE_sae) / (CE_ablate - CE_clean)``: 1 is the model's own loss, 0 zero
    ablation's."""
    kl_sae: float
    kl_ablate: float
    kl_score: float
    """``(KL_ablate - KL_sae) / KL_ablate`` (the clean KL is 0)."""
    l0: float
    """Mean number of non-zero features per token."""
    explained_variance: float
    """``1 - Σ‖x - x̂‖² / Σ‖x - x̄‖²`` over the tokens."""
    dead: int
    """Latents that never fired on these inputs."""
    d_sae: int

    @property
    def dead_fraction(self) -> float:
        return self.dead / self.d_sae

    def __str__(self) -> str:
        return (
            f"SAE at {self.at} on {self.tokens} tokens: CE score {self.ce_score:.3f} (CE clean "
            f"{self.ce_clean:.3f}, spliced {self.ce_sae:.3f}, zero-ablated {self.ce_ablate:.3f}); "
            f"KL score {self.kl_score:.3f}; L0 {self.l0:.1f}; explained variance "
            f"{self.explained_variance:.3f}; dead latents {self.dead}/{self.d_sae}"
        )

    def _repr_html_(self) -> str:
        return sae_evaluation_view(self).html()

    def to_html(self, path: str | os.PathLike[str] | None = None, *, force: bool = False) -> str:
        """The figures as a table of bars on one self-contained page, written atomically to
        ``path`` when given (an existing file only with ``force``); returns the page. To
        compare several SAEs on one page: ``sae_evaluation_view([a, b]).to_html(path)``.

        Example:
            >>> e = SAEEvaluation("block[1]", 40, 2.0, 2.2, 4.0, 0.9, 0.1, 1.0, 0.9, 12.0, 0.8,
            ...                   3, 64)
            >>> e.to_html().count('data-kind="sae-eval"')
            1
        """
        return save_view(sae_evaluation_view(self), path, force=force)


def _batches(inputs: Any) -> list[dict[str, torch.Tensor]]:
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids": inputs if inputs.dim() == 2 else inputs[None]}
    if isinstance(inputs, Mapping):
        inputs = [inputs]
    out = []
    for batch in inputs:
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise SAEError(
                "evaluate_sae takes token ids, a dict of model inputs with input_ids, or a list "
                f"of such dicts; got {type(batch).__name__}"
            )
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        out.append({**batch, "attention_mask": torch.ones_like(ids) if mask is None else mask})
    return out


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise SAEError("the model returned no logits: evaluate_sae needs a model with an LM head")
    return logits.float()


def evaluate_sae(
    insp: InspectorLike,
    sae: SparseAutoencoder,
    inputs: Any,
    *,
    at: str | Locator | None = None,
    skip_first: int = 0,
) -> SAEEvaluation:
    """CE and KL scores, L0, explained variance and dead latents of ``sae`` on ``inputs``.

    ``inputs``: token ids ``[batch, seq]``, a dict of model inputs (``input_ids`` and an
    optional ``attention_mask``), or a list of them. Each batch runs three times: with the
    SAE spliced with its error term (the model's own logits, and the SAE's features and
    reconstruction), spliced without it, and with the site zero-ablated. Losses are next-token
    cross-entropies over real tokens; KL is ``KL(clean ‖ edited)`` per token, averaged.

    ``skip_first=n`` leaves the first ``n`` positions of every sequence out: they are neither
    spliced nor ablated, and no metric counts them (nor the predictions made from them). The
    first token of many models is an attention sink whose activation is orders of magnitude
    larger than the others'; an SAE trained without it (``train_sae(skip_first=1)``) is
    measured on the tokens it was trained for. It needs unpadded or right-padded inputs (the
    first positions of a left-padded row are padding, not its first tokens).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from introspect import Inspector
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
        >>> insp = Inspector(model.eval())
        >>> sae = SparseAutoencoder(32, 64, architecture="topk", k=8)
        >>> result = evaluate_sae(insp, sae, torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]),
        ...                       at="block[0]")
        >>> result.tokens, result.l0 <= 8, 0 <= result.dead <= 64
        (8, True, True)
    """
    loc = site_locator(insp, sae, at, splicing=True)
    if isinstance(skip_first, bool) or not isinstance(skip_first, int) or skip_first < 0:
        raise SAEError(f"skip_first must be a whole number of positions >= 0, got {skip_first!r}")
    batches = _batches(inputs)
    if skip_first:
        for batch in batches:
            mask = batch["attention_mask"]
            if not bool(mask[:, :1].all()) and bool(mask.any()):
                raise SAEError(
                    "skip_first needs unpadded or right-padded inputs: a row of these inputs "
                    "starts with padding, so its first positions are not its first tokens"
                )
    kept = slice(skip_first, None) if skip_first else None
    heads = sae.head_index
    totals = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_ablate": 0.0, "kl_sae": 0.0, "kl_ablate": 0.0}
    predicted = 0
    tokens = 0
    l0 = 0.0
    fired = torch.zeros(sae.d_sae, dtype=torch.bool)
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64)
    sum_sq = 0.0
    resid_sq = 0.0
    model = insp.model
    with torch.no_grad():
        for batch in batches:
            if skip_first >= batch["input_ids"].shape[1]:
                continue  # no position left to measure in this batch
            with splice(insp, sae, loc, error_term=True, positions=kept) as sp:
                clean = _logits(model(**batch))
            assert sp.sae_input is not None and sp.features is not None
            assert sp.reconstruction is not None
            with splice(insp, sae, loc, positions=kept):
                spliced = _logits(model(**batch))
            with insp.ablate(loc, heads=heads, positions=kept):
                ablated = _logits(model(**batch))
            mask = batch["attention_mask"].bool().clone()
            mask[:, :skip_first] = False
            real = mask.to(sp.features.device)
            x = sp.sae_input[real].double()
            tokens += int(x.shape[0])
            feats = sp.features[real]
            l0 += float((feats != 0).sum())
            fired |= (feats != 0).any(0).cpu()
            sum_x += x.sum(0).cpu()
            sum_sq += float((x**2).sum())
            resid_sq += float(((x - sp.reconstruction[real].double()) ** 2).sum())
            ids = batch["input_ids"].to(clean.device)
            pairs = (mask[:, :-1] & batch["attention_mask"].bool()[:, 1:]).to(clean.device)
            targets = ids[:, 1:][pairs]
            log_clean = clean[:, :-1][pairs].log_softmax(-1)
            predicted += int(targets.numel())
            for name, logits in (("ce_clean", clean), ("ce_sae", spliced), ("ce_ablate", ablated)):
                logp = logits[:, :-1][pairs].log_softmax(-1)
                totals[name] += float(-logp.gather(-1, targets[:, None]).sum())
                if name != "ce_clean":
                    kl = (log_clean.exp() * (log_clean - logp)).sum(-1)
                    totals["kl" + name[2:]] += float(kl.sum())
    if tokens == 0 or predicted == 0:
        raise SAEError(
            "evaluate_sae needs inputs with at least two real tokens in a sequence"
            + (f" after the first {skip_first} (skip_first)" if skip_first else "")
        )
    ce = {name: value / predicted for name, value in totals.items()}
    total_var = sum_sq - float((sum_x**2).sum()) / tokens

    def ratio(num: float, den: float) -> float:
        return num / den if den != 0 else math.nan

    return SAEEvaluation(
        at=str(loc),
        tokens=tokens,
        ce_clean=ce["ce_clean"],
        ce_sae=ce["ce_sae"],
        ce_ablate=ce["ce_ablate"],
        ce_score=ratio(ce["ce_ablate"] - ce["ce_sae"], ce["ce_ablate"] - ce["ce_clean"]),
        kl_sae=ce["kl_sae"],
        kl_ablate=ce["kl_ablate"],
        kl_score=ratio(ce["kl_ablate"] - ce["kl_sae"], ce["kl_ablate"]),
        l0=l0 / tokens,
        explained_variance=1.0 - ratio(resid_sq, total_var),
        dead=int((~fired).sum()),
        d_sae=sae.d_sae,
    )
