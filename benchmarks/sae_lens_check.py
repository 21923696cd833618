"""Cross-check against the real ``sae-lens``: its own ``SAE`` class on our folders.

sae-lens pins ``transformers<5``, so it lives in its own environment; this script runs in
ours, writes SAELens folders (seeded fixtures in every architecture and normalisation, and
folders written by ``SparseAutoencoder.save``) with our ``encode``/``sae(x)`` outputs, then runs
itself under ``--sae-python`` to load each folder with ``sae_lens.SAE.load_from_disk`` and
compare::

    python3 -m venv /tmp/sae-venv
    /tmp/sae-venv/bin/pip install torch==2.13.0 sae-lens==6.5.0 "pyarrow<17"
    python benchmarks/sae_lens_check.py --sae-python /tmp/sae-venv/bin/python

(``pyarrow<17``: sae-lens's dependencies pin numpy 1.x, which newer pyarrow wheels refuse.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def write(folder: Path) -> list[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from _support.sae_formats import (
        SAELENS_CASES,
        write_gemma_scope,
        write_saelens,
        write_sparsify,
    )
    from safetensors.torch import save_file

    from introspect import SparseAutoencoder, load_sae

    names = []
    for arch, apply_b_dec, normalize in SAELENS_CASES:
        name = f"{arch}-{int(apply_b_dec)}-{normalize}"
        write_saelens(
            folder / name,
            architecture=arch,
            apply_b_dec_to_input=apply_b_dec,
            normalize_activations=normalize,
        )
        names.append(name)
    # Folders our own save() writes: converted formats and a freshly built TopK SAE.
    load_sae(write_gemma_scope(folder / "src-gemma")[0]).save(folder / "saved-gemma-scope")
    load_sae(write_sparsify(folder / "src-sparsify", hookpoint="h.1")[0]).save(
        folder / "saved-sparsify"
    )
    sae = SparseAutoencoder(64, 128, architecture="topk", k=8)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.2)
    sae.save(folder / "saved-topk")
    names += ["saved-gemma-scope", "saved-sparsify", "saved-topk"]
    x = torch.randn(4, 7, 64, generator=torch.Generator().manual_seed(0)) * 2
    outputs = {"x": x}
    for name in names:
        ours = load_sae(folder / name)
        with torch.no_grad():
            outputs[f"{name}.features"] = ours.encode(x).contiguous()
            outputs[f"{name}.out"] = ours(x).contiguous()
    save_file(outputs, str(folder / "ours.safetensors"))
    return names


def compare(folder: Path, names: list[str]) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    import sae_lens
    from sae_lens import SAE
    from safetensors.torch import load_file

    ours = load_file(str(folder / "ours.safetensors"))
    x = ours["x"]
    worst = 0.0
    for name in names:
        theirs = SAE.load_from_disk(str(folder / name))
        with torch.no_grad():
            features = theirs.encode(x)
            out = theirs(x)
        df = (features - ours[f"{name}.features"]).abs().max().item()
        do = (out - ours[f"{name}.out"]).abs().max().item()
        worst = max(worst, df, do)
        print(f"{name:40s} features max|diff| {df:.2e}   reconstruction max|diff| {do:.2e}")
    print(f"sae-lens {sae_lens.__version__}: worst difference {worst:.2e}")
    return 0 if worst < 1e-5 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sae-python", help="a python with sae-lens installed")
    parser.add_argument("--compare", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compare:
        folder = Path(args.compare)
        return compare(folder, json.loads((folder / "names.json").read_text()))
    folder = Path(tempfile.mkdtemp(prefix="sae-lens-check-"))
    names = write(folder)
    (folder / "names.json").write_text(json.dumps(names))
    python = args.sae_python or sys.executable
    return subprocess.call([python, __file__, "--compare", str(folder)])


if __name__ == "__main__":
    raise SystemExit(main())
