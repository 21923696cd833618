"""Training a TopK SAE from an ``introspect extract`` folder, with checkpoints and resume.

The recipe is the one of Gao et al. (2024) as sparsify implements it: TopK activation,
decoder rows kept at unit norm (the gradient's component along each row removed before the
step, the rows renormalised after it), the encoder initialised as the decoder's transpose,
``b_dec`` as the data's mean, the loss the fraction of variance unexplained, and the AuxK loss
(coefficient 1/32) that reconstructs the error with the ``k_aux`` largest *dead* latents, a
latent being dead once it has not fired for ``dead_after`` tokens.

Checkpoints are safetensors + JSON (never pickle) in ``OUT/checkpoint``: the weights, Adam's
moments, the step, the dead-latent counters. A rerun with the same settings resumes from the
last one and reproduces, bit for bit, the run that was not interrupted: batches come in a
seeded order per epoch and the batches already done in the epoch are skipped.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from introspect._errors import SAEError
from introspect._export import write_atomically
from introspect._progress import progress_enabled
from introspect._sae._formats import load_sae
from introspect._sae._model import SAELENS_CONFIG, InputProcessing, SparseAutoencoder
from introspect._sae._sites import Site, tl_hook_name
from introspect._scale.dataset import ActivationDataset

__all__ = ["train_sae"]

CHECKPOINT = "checkpoint"
_STATE = "state.json"
_TENSORS = "state.safetensors"
_AUX_COEFFICIENT = 1 / 32


def _settings(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def _save_checkpoint(
    folder: Path,
    sae: SparseAutoencoder,
    opt: torch.optim.Adam,
    state: dict[str, Any],
    since_fired: torch.Tensor,
) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"sae.{k}": v for k, v in sae.state_tensors().items()}
    names = dict(sae.named_parameters(recurse=False))
    for name, param in names.items():
        moments = opt.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in moments:
                tensors[f"adam.{name}.{key}"] = moments[key].detach().contiguous()
        if "step" in moments:
            tensors[f"adam.{name}.step"] = torch.as_tensor(moments["step"]).reshape(1).float()
    tensors["since_fired"] = since_fired.contiguous()
    text = json.dumps(state, indent=2) + "\n"

    def write_tensors(tmp: str) -> None:
        save_file(tensors, tmp)

    def write_state(tmp: str) -> None:
        Path(tmp).write_text(text, "utf-8")

    write_atomically([(folder / _TENSORS, write_tensors), (folder / _STATE, write_state)])


def _load_checkpoint(
    folder: Path, sae: SparseAutoencoder, opt: torch.optim.Adam
) -> tuple[dict[str, Any], torch.Tensor]:
    from safetensors.torch import load_file

    state = json.loads((folder / _STATE).read_text("utf-8"))
    tensors = load_file(str(folder / _TENSORS))
    sae.load_weights(
        {k[4:]: v for k, v in tensors.items() if k.startswith("sae.")}, str(folder / _TENSORS)
    )
    for name, param in sae.named_parameters(recurse=False):
        if f"adam.{name}.exp_avg" in tensors:
            opt.state[param] = {
                "step": tensors[f"adam.{name}.step"].reshape(()),
                "exp_avg": tensors[f"adam.{name}.exp_avg"].clone(),
                "exp_avg_sq": tensors[f"adam.{name}.exp_avg_sq"].clone(),
            }
    return state, tensors["since_fired"].clone()


def _rows(batch: dict[str, torch.Tensor], key: str, skip_first: int = 0) -> torch.Tensor:
    x = batch[key]
    if skip_first:
        x = x[batch["pos"] >= skip_first]
    return (x.flatten(1) if x.dim() > 2 else x).float()


def train_sae(
    dataset_dir: str | os.PathLike[str],
    *,
    at: str,
    out: str | os.PathLike[str],
    k: int,
    d_sae: int | None = None,
    expansion: int | None = None,
    steps: int | None = None,
    epochs: int = 1,
    lr: float | None = None,
    batch_size: int = 1024,
    seed: int = 0,
    k_aux: int | None = None,
    dead_after: int | None = None,
    checkpoint_every: int = 500,
    resume: bool = True,
    progress: bool = False,
    stop_after: int | None = None,
    skip_first: int = 0,
) -> SparseAutoencoder:
    """Train a TopK SAE on the activations of ``at`` in the extraction folder ``dataset_dir``.

    ``d_sae`` (or ``expansion`` times the site's width) latents, ``k`` active per token; ``steps``
    optimiser steps of ``batch_size`` tokens (default: ``epochs`` passes over the data). The
    SAE is saved to ``out`` in SAELens's layout (its locator is ``at``) and returned; its
    ``metadata["training"]`` holds the losses, throughput (tokens per second, from disk) and the
    share of time spent reading. Checkpoints go to ``out/checkpoint`` every
    ``checkpoint_every`` steps; a rerun with the same settings resumes from the last one
    (``resume=False`` starts over). ``stop_after`` ends the run after that many steps of this
    call, as an interruption would (for tests and time limits).

    ``skip_first=n`` trains on the tokens at positions ``n`` and later of each document only.
    The first token of many models is an attention sink whose activation is orders of
    magnitude larger than the rest (as on SmolLM2); it then dominates the reconstruction loss
    and the decoder's bias. A batch keeps its ``batch_size`` rows before the filter, so it is
    slightly smaller after it. Evaluate such an SAE with ``evaluate_sae(..., skip_first=n)``;
    ``metadata["training"]["settings"]`` records it.

    Example:
        >>> import tempfile
        >>> from introspect._scale.dataset import _demo_dataset
        >>> sae = train_sae(_demo_dataset(), at="block[1]", out=tempfile.mkdtemp(), k=2,
        ...                 d_sae=8, batch_size=2, steps=3)
        >>> sae.locator, sae.d_sae, sae.metadata["training"]["steps"]
        ('block[1]', 8, 3)
    """
    ds = ActivationDataset(dataset_dir)
    column = ds[at]
    key = column.key
    d_in = math.prod(column.shape[1:])
    if d_sae is None:
        if expansion is None:
            raise SAEError("train_sae needs d_sae= or expansion=")
        d_sae = expansion * d_in
    if not 0 < k <= d_sae:
        raise SAEError(f"k must be in 1..d_sae ({d_sae}), got {k}")
    if isinstance(skip_first, bool) or not isinstance(skip_first, int) or skip_first < 0:
        raise SAEError(f"skip_first must be a whole number of positions >= 0, got {skip_first!r}")
    if batch_size < 1 or epochs < 1 or checkpoint_every < 1:
        raise SAEError("batch_size, epochs and checkpoint_every must be at least 1")
    rows = len(ds)
    per_epoch = rows // batch_size
    if per_epoch == 0:
        raise SAEError(f"{dataset_dir} has {rows} rows, fewer than one batch of {batch_size}")
    total = steps if steps is not None else epochs * per_epoch
    lr = lr if lr is not None else 2e-4 / math.sqrt(d_sae / 2**14)
    k_aux = k_aux if k_aux is not None else min(d_in // 2, d_sae)
    dead_after = dead_after if dead_after is not None else min(10_000_000, rows)
    folder = Path(out).expanduser()
    settings = _settings(
        dataset=str(Path(dataset_dir).resolve()),
        at=key,
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        steps=total,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        k_aux=k_aux,
        dead_after=dead_after,
        **({"skip_first": skip_first} if skip_first else {}),
    )
    if resume and (folder / SAELENS_CONFIG).is_file():
        done = load_sae(folder)
        if done.metadata.get("training", {}).get("settings") == settings:
            return done
    site = Site(
        hook_name=tl_hook_name(key) or key, locator=key, flatten_heads=len(column.shape) > 2
    )
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(
        d_in,
        d_sae,
        architecture="topk",
        k=k,
        processing=InputProcessing(apply_b_dec_to_input=True),
        format="saelens",
        site=site,
        metadata={
            "model_name": ds.manifest.get("model"),
            "model_class_name": ds.manifest.get("model_class"),
        },
    )
    with torch.no_grad():
        w = torch.randn(d_sae, d_in, generator=generator)
        sae.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sample = _rows(next(ds.batches(min(rows, 4 * batch_size), locators=[key])), key, skip_first)
        if not len(sample):
            raise SAEError(
                f"{dataset_dir}: no token of the first {min(rows, 4 * batch_size)} rows is at "
                f"position {skip_first} or later (skip_first={skip_first})"
            )
        sae.b_dec.copy_(sample.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr, eps=6.25e-10)
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    state: dict[str, Any] = {"settings": settings, "step": 0, "losses": []}
    checkpoints = folder / CHECKPOINT
    if resume and (checkpoints / _STATE).is_file():
        stored = json.loads((checkpoints / _STATE).read_text("utf-8"))
        if stored.get("settings") != settings:
            raise SAEError(
                f"{checkpoints} holds a run with other settings: rerun with the same "
                "arguments to resume it, or pass resume=False to start over"
            )
        state, since_fired = _load_checkpoint(checkpoints, sae, opt)
    show = progress_enabled(progress)
    start_step = int(state["step"])
    read_s = compute_s = 0.0
    tokens = 0
    step = start_step
    ran = 0
    loss = fvu = aux = math.nan
    while step < total and (stop_after is None or ran < stop_after):
        epoch, skip = divmod(step, per_epoch)
        batches = ds.batches(
            batch_size, locators=[key], shuffle=True, seed=seed + epoch, drop_last=True
        )
        for _ in range(skip):
            next(batches)  # the batches of this epoch a resumed run already did
        t_read = time.perf_counter()
        for batch in batches:
            x = _rows(batch, key, skip_first)
            t_compute = time.perf_counter()
            read_s += t_compute - t_read
            if len(x) >= 2:
                loss, fvu, aux, fired = _step(sae, opt, x, since_fired, k_aux, dead_after)
                since_fired += x.shape[0]
                since_fired[fired] = 0
            # else: skip_first left (almost) nothing of this batch; it still counts as a step,
            # so that a resumed run skips the same batches
            step += 1
            ran += 1
            tokens += x.shape[0]
            compute_s += time.perf_counter() - t_compute
            state["losses"].append([step, round(fvu, 6), round(aux, 6)])
            state["step"] = step
            if step % checkpoint_every == 0 or step == total:
                _save_checkpoint(checkpoints, sae, opt, state, since_fired)
            if show and (step % 50 == 0 or step == total):
                dead = int((since_fired >= dead_after).sum())
                print(
                    f"train-sae: step {step}/{total} fvu {fvu:.4f} aux {aux:.4f} loss "
                    f"{loss:.4f} dead {dead}/{d_sae}",
                    file=sys.stderr,
                )
            t_read = time.perf_counter()
            if step >= total or (stop_after is not None and ran >= stop_after):
                break
    if step < total:
        _save_checkpoint(checkpoints, sae, opt, state, since_fired)
        sae.metadata["training"] = {"settings": settings, "steps": step, "finished": False}
        return sae
    seconds = read_s + compute_s
    sae.metadata["training"] = {
        "settings": settings,
        "steps": step,
        "finished": True,
        "final_fvu": state["losses"][-1][1] if state["losses"] else None,
        "dead": int((since_fired >= dead_after).sum()),
        "tokens_this_run": tokens,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "read_share": read_s / seconds if seconds > 0 else None,
    }
    sae.save(folder)
    return sae


def _step(
    sae: SparseAutoencoder,
    opt: torch.optim.Adam,
    x: torch.Tensor,
    since_fired: torch.Tensor,
    k_aux: int,
    dead_after: int,
) -> tuple[float, float, float, torch.Tensor]:
    sae_in = x - sae.b_dec
    assert sae.b_enc is not None and sae.k is not None
    pre = torch.relu(sae_in @ sae.W_enc + sae.b_enc)
    top = torch.topk(pre, sae.k, dim=-1)
    recon = torch.zeros_like(pre).scatter(-1, top.indices, top.values) @ sae.W_dec + sae.b_dec
    error = recon - x
    variance = (x - x.mean(0)).pow(2).sum()
    fvu = error.pow(2).sum() / variance
    dead = since_fired >= dead_after
    aux = torch.zeros(())
    n_dead = int(dead.sum())
    if n_dead:
        # AuxK: the largest dead latents reconstruct the error the live ones left.
        dead_pre = pre.masked_fill(~dead, float("-inf"))
        aux_top = torch.topk(dead_pre, min(k_aux, n_dead), dim=-1)
        values = aux_top.values.clamp_min(0)
        aux_recon = torch.zeros_like(pre).scatter(-1, aux_top.indices, values) @ sae.W_dec
        residual = x - recon.detach()
        aux = (aux_recon - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
        aux = torch.nan_to_num(aux, 0.0)
    loss = fvu + _AUX_COEFFICIENT * aux
    opt.zero_grad(set_to_none=True)
    torch.autograd.backward(loss)
    with torch.no_grad():
        grad = sae.W_dec.grad
        if grad is not None:
            # Only the component orthogonal to each unit row changes its direction.
            grad -= (grad * sae.W_dec).sum(-1, keepdim=True) * sae.W_dec
    opt.step()
    with torch.no_grad():
        sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
    fired = torch.unique(top.indices[top.values > 0])
    return float(loss.detach()), float(fvu.detach()), float(aux.detach()), fired
