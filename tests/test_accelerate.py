"""Models dispatched with accelerate give what the undispatched model gives.

accelerate (``device_map=...`` at load, ``dispatch_model``, ``cpu_offload``, ``disk_offload``)
wraps each module's ``forward`` with its own hook, and an offloading hook keeps the module's
weights on the meta device outside its forward. Every test dispatches a tiny model on the CPU so
that those hooks are really active (some blocks offloaded to disk, or every weight offloaded)
and compares with a copy of the same model left alone.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _support.models import FAMILIES, hook_state
from torch import nn

pytest.importorskip("accelerate")

from accelerate import cpu_offload, disk_offload, dispatch_model, infer_auto_device_map
from accelerate.hooks import (
    remove_hook_from_module,
    remove_hook_from_submodules,
)

from introspect import Inspector, InterventionError
from introspect._errors import CaptureError
from introspect._hooks.capture import onloaded
from introspect.cli import main
from introspect.testing import build_tiny

IDS = torch.tensor([[5, 17, 42, 9, 77, 3], [8, 1, 99, 23, 4, 60]])
INPUTS = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}
ATOL = 1e-5

# Block 1, the final norm and (untied) the head offloaded to disk; the rest stays on the CPU.
DEVICE_MAPS = {
    "llama": {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "cpu",
        "model.norm": "disk",
        "lm_head": "disk",
    },
    "gpt2": {  # GPT-2 ties its head to wte: the two stay together
        "transformer.wte": "cpu",
        "transformer.wpe": "cpu",
        "transformer.drop": "cpu",
        "transformer.h.0": "cpu",
        "transformer.h.1": "disk",
        "transformer.h.2": "cpu",
        "transformer.ln_f": "disk",
        "lm_head": "cpu",
    },
}
BLOCK_CLASSES = {"llama": "LlamaDecoderLayer", "gpt2": "GPT2Block"}


def _plain(family: str) -> nn.Module:
    config_fn, head_cls, _ = FAMILIES[family]
    return build_tiny(head_cls, config_fn())


def _dispatch(family: str, how: str, folder: Path) -> nn.Module:
    model = _plain(family)
    skip = model._skip_keys_device_placement  # what from_pretrained passes (the KV cache)
    if how == "device_map":
        out = dispatch_model(
            model, DEVICE_MAPS[family], main_device="cpu", offload_dir=folder, skip_keys=skip
        )
    elif how == "preload":  # one hook per block that loads all of the block's weights
        out = dispatch_model(
            model,
            DEVICE_MAPS[family],
            main_device="cpu",
            offload_dir=folder,
            skip_keys=skip,
            preload_module_classes=[BLOCK_CLASSES[family]],
        )
    elif how == "cpu_offload":
        out = cpu_offload(model, execution_device="cpu")
    elif how == "disk_offload":
        out = disk_offload(model, offload_dir=folder, execution_device="cpu")
    else:  # infer_auto_device_map with too little memory: the rest goes to disk
        device_map = infer_auto_device_map(model, max_memory={"cpu": 150_000})
        assert "disk" in device_map.values() and "cpu" in device_map.values(), device_map
        out = dispatch_model(model, device_map, offload_dir=folder, skip_keys=skip)
    assert isinstance(out, nn.Module)
    return out.eval()


def _offloaded(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.is_meta}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, str], Any]]:
    cache: dict[tuple[str, str], Any] = {}

    def get(family: str, how: str) -> tuple[nn.Module, nn.Module]:
        if (family, how) not in cache:
            folder = tmp_path_factory.mktemp(f"{family}-{how}")
            cache[family, how] = (_plain(family), _dispatch(family, how, folder))
        return cache[family, how]  # type: ignore[no-any-return]

    yield get  # type: ignore[misc]


HOWS = ["device_map", "cpu_offload"]


@pytest.fixture(params=[(f, h) for f in sorted(FAMILIES) for h in HOWS], ids="-".join)
def pair(request: pytest.FixtureRequest, built: Any) -> tuple[nn.Module, nn.Module]:
    family, how = request.param
    plain, dispatched = built(family, how)
    # accelerate's hooks are active: each module of block 1 is hooked and its weights are
    # on the meta device outside the forward.
    block = Inspector(dispatched).module("block[1]")
    hooked = [m for m in block.modules() if "_hf_hook" in m.__dict__]
    assert hooked and all(p.is_meta for p in block.parameters())
    assert "_hf_hook" in dispatched.__dict__
    return plain, dispatched


def _close(a: Any, b: Any, what: str) -> None:
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), what
    assert not b.is_meta, f"{what}: the dispatched model's value is on the meta device"
    assert a.shape == b.shape, what
    assert torch.allclose(a, b.to(a.device), atol=ATOL), f"{what}: {(a - b).abs().max()}"


def _value(cap: Any, loc: str) -> torch.Tensor:
    rec = cap[loc]
    return rec.input if loc.endswith(".input") else rec.output  # type: ignore[no-any-return]


def _locators(insp: Inspector) -> list[str]:
    names = [str(loc) for loc in insp.locators()]
    names += ["block[0].input", "block[1].input", "block[1].attn.input", "final_norm.input"]
    names += [f"block[1].attn.{s}" for s in ("q", "k", "v", "pattern", "z", "result", "o")]
    return names


def _both(
    pair: tuple[nn.Module, nn.Module], run: Callable[[Inspector, nn.Module], Any]
) -> tuple[Any, Any]:
    plain, dispatched = pair
    with torch.no_grad():
        return run(Inspector(plain), plain), run(Inspector(dispatched), dispatched)


# -- captures ---------------------------------------------------------------------------------


def test_every_locator_captures_the_same(pair: tuple[nn.Module, nn.Module]) -> None:
    def run(insp: Inspector, model: nn.Module) -> dict[str, torch.Tensor]:
        names = _locators(insp)
        with insp.capture(*names) as cap:
            model(**INPUTS)
        return {name: _value(cap, name) for name in names}

    want, got = _both(pair, run)
    assert len(want) >= 15
    for name in want:
        _close(want[name], got[name], name)


STOPS = [
    "embed",
    "block[1]",
    "block[1].input",
    "block[1].mlp",
    "block[1].attn.z",
    "block[1].attn.result",
    "block[1].attn.pattern",
    "final_norm",
]


@pytest.mark.parametrize("loc", STOPS)
def test_early_stop_gives_the_same_and_offloads_again(
    pair: tuple[nn.Module, nn.Module], loc: str
) -> None:
    _, dispatched = pair
    before = _offloaded(dispatched)

    def run(insp: Inspector, model: nn.Module) -> torch.Tensor:
        with insp.capture(loc, stop=True) as cap:
            model(**INPUTS)
        assert cap.stopped
        return _value(cap, loc)

    want, got = _both(pair, run)
    _close(want, got, loc)
    assert _offloaded(dispatched) == before


def test_records_land_where_device_says(pair: tuple[nn.Module, nn.Module]) -> None:
    def run(insp: Inspector, model: nn.Module) -> list[torch.Tensor]:
        names = ["block[1]", "block[1].attn.result", "final_norm"]
        with insp.capture(*names, device="cpu", dtype=torch.float16, positions="last") as cap:
            model(**INPUTS)
        return [cap[name].output for name in names]

    want, got = _both(pair, run)
    for a, b in zip(want, got, strict=True):
        assert b.device == torch.device("cpu") and b.dtype == torch.float16
        assert torch.allclose(a.float(), b.float(), atol=1e-3)


# -- edits ------------------------------------------------------------------------------------

EditFactory = Callable[[Inspector, dict[str, Any]], Any]


def _edits() -> dict[str, EditFactory]:
    vector = torch.randn(64, generator=torch.Generator().manual_seed(1))
    return {
        "steer": lambda i, c: i.steer("block[1]", vector, scale=3.0),
        "steer input last": lambda i, c: i.steer("block[1].input", vector, positions="last"),
        "steer mlp positions": lambda i, c: i.steer("block[1].mlp", vector, positions=[1, 3]),
        "ablate zero": lambda i, c: i.ablate("block[1].attn"),
        "ablate mean": lambda i, c: i.ablate("block[1].mlp", mean_over=c["block[1].mlp"]),
        "patch record": lambda i, c: i.patch("block[1]", c["block[1]"], positions=[2]),
        "scale final norm": lambda i, c: i.scale("final_norm", 0.5),
        "edit fn": lambda i, c: i.edit("block[2]", lambda x, r: x.flip(-1)),
        "ablate z head": lambda i, c: i.ablate("block[1].attn.z", heads=[1]),
        "patch result head": lambda i, c: i.patch(
            "block[1].attn.result", c["block[1].attn.result"], heads=2
        ),
        "scale pattern head": lambda i, c: i.scale("block[1].attn.pattern", 0.0, heads=[0]),
        "steer q head": lambda i, c: i.steer("block[1].attn.q", torch.ones(16), heads=3),
    }


@pytest.mark.parametrize("kind", list(_edits()))
def test_every_edit_gives_the_same(pair: tuple[nn.Module, nn.Module], kind: str) -> None:
    factory = _edits()[kind]
    other = {"input_ids": IDS.flip(-1), "attention_mask": INPUTS["attention_mask"]}
    plain_forward = pair[1].__dict__.get("forward")

    def run(insp: Inspector, model: nn.Module) -> tuple[torch.Tensor, ...]:
        # Values from another run (for mean ablation and patches), from this very model.
        with insp.capture("block[1]", "block[1].mlp", "block[1].attn.result") as source:
            model(**other)
        with factory(insp, source), insp.capture("block[1]") as cap:
            out = model(**INPUTS, output_hidden_states=True)
        # Hugging Face's own hidden states show the edit too (accelerate's wrapper and ours).
        return out.logits, out.hidden_states[2], cap["block[1]"].output

    want, got = _both(pair, run)
    assert not torch.allclose(want[0], pair[0](**INPUTS).logits, atol=1e-4), "the edit did nothing"
    for a, b in zip(want, got, strict=True):
        _close(a, b, kind)
    assert pair[1].__dict__.get("forward") is plain_forward


# -- generation, hidden states, logits, lens, attribution ---------------------------------------


def test_generation_steps_and_concat(pair: tuple[nn.Module, nn.Module]) -> None:
    vector = torch.randn(64, generator=torch.Generator().manual_seed(2))
    names = ["block[1]", "block[-1].input", "block[1].attn.z"]

    def run(insp: Inspector, model: nn.Module) -> tuple[torch.Tensor, list[Any]]:
        with insp.steer("block[0]", vector, positions="last"), insp.capture(*names) as cap:
            ids = model.generate(
                input_ids=IDS[:1],
                attention_mask=INPUTS["attention_mask"][:1],
                max_new_tokens=3,
                do_sample=False,
                pad_token_id=0,
            )
        return ids, [(cap.steps(n), cap.concat(n)) for n in names]

    (want_ids, want), (got_ids, got) = _both(pair, run)
    assert torch.equal(want_ids, got_ids)
    for name, (want_steps, want_all), (got_steps, got_all) in zip(names, want, got, strict=True):
        assert len(want_steps) == len(got_steps) == 3
        for a, b in zip(want_steps, got_steps, strict=True):
            _close(a, b, name)
        _close(want_all, got_all, name)


def test_hidden_states_logits_lens_and_attribution(pair: tuple[nn.Module, nn.Module]) -> None:
    def run(insp: Inspector, model: nn.Module) -> list[torch.Tensor]:
        out: list[torch.Tensor] = list(insp.hidden_states(**INPUTS))
        out += list(insp.hidden_states(**INPUTS, indices=[0, 2, -1]))
        with insp.capture("block[-1]", "block[1]") as cap:
            model(**INPUTS)
        out += [insp.logits(cap["block[-1]"].output), insp.logits(cap["block[1]"].output)]
        lens = insp.logit_lens(IDS[:1], targets=[7])
        assert lens.logits is not None and lens.max_diff is not None and lens.max_diff < 1e-4
        out.append(lens.logits)
        for per_head in (False, True):
            dla = insp.direct_logit_attribution(IDS, 7, per_head=per_head)
            assert dla.max_diff < 1e-4
            out.append(dla.values)
        return out

    want, got = _both(pair, run)
    assert len(want) == len(got) == 4 + 3 + 2 + 1 + 2
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        _close(a, b, f"value {i}")


def test_run_batch_puts_inputs_where_values_are(pair: tuple[nn.Module, nn.Module]) -> None:
    # Every weight of a cpu_offload'ed model is on the meta device: inputs must not go there.
    def run(insp: Inspector, model: nn.Module) -> list[torch.Tensor]:
        with insp.capture("block[1]") as cap:
            insp.run_batch([[5, 17, 42], [8, 1]])
        return cap.real_tokens("block[1]")

    want, got = _both(pair, run)
    for a, b in zip(want, got, strict=True):
        _close(a, b, "run_batch")


# -- other ways of dispatching ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["disk_offload", "auto_device_map"])
def test_disk_offload_and_inferred_device_map(built: Any, how: str) -> None:
    pair = built("llama", how)
    assert _offloaded(pair[1])
    vector = torch.randn(64, generator=torch.Generator().manual_seed(3))

    def run(insp: Inspector, model: nn.Module) -> list[torch.Tensor]:
        with insp.capture("block[1]", "block[2].attn.result", "final_norm") as cap:
            model(**INPUTS)
        with insp.steer("block[1]", vector):
            steered = model(**INPUTS).logits
        with insp.capture("block[2].mlp", stop=True) as stop:
            model(**INPUTS)
        return [_value(cap, n) for n in cap] + [steered, stop["block[2].mlp"].output]

    want, got = _both(pair, run)
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        _close(a, b, f"{how} value {i}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stop_and_errors_inside_a_preloaded_block_offload_it_again(built: Any, family: str) -> None:
    # preload_module_classes: one hook loads the whole block at its start and offloads it at its
    # end; a stop (or an error) inside the block never reaches that end by itself.
    plain, dispatched = built(family, "preload")
    insp = Inspector(dispatched)
    block = insp.module("block[1]")
    assert "_hf_hook" in block.__dict__ and block.__dict__["_hf_hook"].place_submodules
    offloaded = _offloaded(dispatched)
    assert all(p.is_meta for p in block.parameters())
    for loc in ("block[1].mlp", "block[1].attn.q", "block[1].attn.result"):
        with torch.no_grad(), insp.capture(loc, stop=True) as cap:
            dispatched(**INPUTS)
        assert cap.stopped and _offloaded(dispatched) == offloaded, loc
    with (
        torch.no_grad(),
        pytest.raises(InterventionError, match="must return a tensor"),
        insp.edit("block[1].mlp", lambda x, r: x[..., :1]),
    ):
        dispatched(**INPUTS)
    assert _offloaded(dispatched) == offloaded
    with torch.no_grad():
        _close(plain(**INPUTS).logits, dispatched(**INPUTS).logits, "after the stops")


# -- accelerate's forward wrapper and ours --------------------------------------------------------


def _forwards(model: nn.Module) -> dict[str, tuple[Any, Any]]:
    return {
        name: (m.__dict__.get("forward"), m.__dict__.get("_old_forward"))
        for name, m in model.named_modules()
    }


def test_edits_and_captures_leave_accelerate_hooks_as_they_were(
    pair: tuple[nn.Module, nn.Module],
) -> None:
    _, dispatched = pair
    insp = Inspector(dispatched)
    hooks, forwards = hook_state(dispatched), _forwards(dispatched)
    vector = torch.randn(64)
    with torch.no_grad():
        for loc in ("block[1]", "block[1].attn", "final_norm", "lm_head", "block[1].attn.z"):
            with insp.scale(loc, 0.5), insp.steer("block[1].input", vector):
                dispatched(**INPUTS)
        with insp.capture("block[1].attn.result", "block[1].attn.pattern", stop=True):
            dispatched(**INPUTS)
    assert hook_state(dispatched) == hooks
    assert _forwards(dispatched) == forwards


def test_dispatch_while_an_edit_is_active(built: Any) -> None:
    # The other way round: accelerate wraps the edited forward (keeping ours in _old_forward).
    plain = _plain("llama")
    model = copy.deepcopy(plain)
    vector = torch.randn(64)
    with torch.no_grad(), Inspector(plain).steer("final_norm", vector):
        want = plain(**INPUTS).logits
    edit = Inspector(model).steer("final_norm", vector)
    with torch.no_grad():
        with edit:
            cpu_offload(model, execution_device="cpu")
            _close(want, model(**INPUTS).logits, "edit inside accelerate's wrapper")
            # A second edit of the same module joins the first, inside accelerate's wrapper.
            with (
                Inspector(model).scale("final_norm", 2.0),
                Inspector(model).capture("final_norm") as cap,
            ):
                model(**INPUTS)
            assert len(cap["final_norm"].edits) == 2
        _close(plain(**INPUTS).logits, model(**INPUTS).logits, "after the edit")
        norm = model.model.norm
        assert type(norm.__dict__["_old_forward"]).__name__ == "method"  # ours is gone
        remove_hook_from_submodules(model)
        remove_hook_from_module(model)
        assert type(norm.__dict__.get("forward")).__name__ == "method"
        _close(plain(**INPUTS).logits, model(**INPUTS).logits, "undispatched")


def test_undispatching_during_an_edit_is_an_error_not_a_silent_no_op() -> None:
    model = cpu_offload(_plain("llama"), execution_device="cpu")
    insp = Inspector(model)
    with torch.no_grad(), insp.steer("final_norm", torch.randn(64)):
        remove_hook_from_module(model.model.norm)  # puts back the forward it had wrapped
        with pytest.raises(InterventionError, match="forward was replaced while this edit"):
            model(**INPUTS)
    assert getattr(model.model.norm.__dict__.get("forward"), "edit_notes", None) is None


def test_weights_on_meta_without_a_hook_are_an_error() -> None:
    with torch.device("meta"):
        lin = nn.Linear(4, 4)
    with pytest.raises(CaptureError, match="meta device"), onloaded(lin, "reading"):
        pass
    model = cpu_offload(_plain("gpt2"), execution_device="cpu")
    head = model.lm_head
    assert head.weight.is_meta
    with onloaded(head):
        assert not head.weight.is_meta
    assert head.weight.is_meta


# -- the command ------------------------------------------------------------------------------


def test_cli_device_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    outs = []
    for extra in ([], ["--device-map", "auto"]):
        out = tmp_path / f"run{len(outs)}.safetensors"
        argv = ["capture", "toy-llama", "--prompt", "Hello there", "--at", "block[1]"]
        assert main([*argv, "-o", str(out), "--no-progress", "--json", *extra]) == 0
        assert json.loads(capsys.readouterr().out)["tensors"]
        outs.append(load_file(out))
    assert outs[0].keys() == outs[1].keys()
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), key
    code = main(["inspect", "toy-llama", "--device", "cpu", "--device-map", "auto"])
    assert code != 0
    assert "not both" in capsys.readouterr().err


def test_load_model_passes_device_map_to_from_pretrained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    from introspect.zoo import load_model

    _plain("llama").save_pretrained(tmp_path)
    seen: list[dict[str, Any]] = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    model, _ = load_model(str(tmp_path), device_map="auto", dtype="bfloat16", progress=False)
    assert seen[-1]["device_map"] == "auto" and seen[-1]["dtype"] == torch.bfloat16
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    with pytest.raises(Exception, match="unknown device_map"):
        load_model(str(tmp_path), device_map="everywhere", progress=False)
