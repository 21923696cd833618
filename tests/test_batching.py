"""Padded batches: each example's captures equal the example run alone, for either padding
side, and edits at "last token" hit each example's last real token."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from introspect import (
    CaptureError,
    Inspector,
    encode_batch,
    last_token_positions,
    pad_batch,
    position_ids_from_mask,
    real_token_positions,
)
from introspect._batching import _PADDING_OFFSET_POSITIONS

# Tolerance: a padded batch runs the same maths on differently shaped matrices, so results may
# differ from the lone run in the last float32 bits.
ATOL = 1e-5

PROMPTS = [[5, 17, 42, 9, 77, 3, 12], [8, 1, 99, 23], [31, 7, 64, 2, 50]]
LOCATORS = ["block[0].input", "block[0]", "block[1].attn", "block[1].mlp", "block[2]", "final_norm"]


def test_padding_helpers() -> None:
    left = pad_batch([[1, 2, 3], [4]], padding_side="left", pad_token_id=9)
    right = pad_batch([[1, 2, 3], [4]], padding_side="right", pad_token_id=9)
    assert left["input_ids"].tolist() == [[1, 2, 3], [9, 9, 4]]
    assert right["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]]
    assert left["position_ids"][1, 2].item() == 0 and right["position_ids"][1, 0].item() == 0
    assert last_token_positions(left["attention_mask"]).tolist() == [2, 2]
    assert last_token_positions(right["attention_mask"]).tolist() == [2, 0]
    assert [p.tolist() for p in real_token_positions(left["attention_mask"])] == [[0, 1, 2], [2]]
    assert position_ids_from_mask(torch.tensor([[0, 1, 1, 1]])).tolist() == [[1, 0, 1, 2]]

    class Tokenizer:
        pad_token_id = None
        eos_token_id = 7

        def __call__(self, text: str, return_tensors: str) -> dict[str, torch.Tensor]:
            return {"input_ids": torch.tensor([[len(word) for word in text.split()]])}

    batch = encode_batch(["a bb ccc", "dddd"], Tokenizer(), padding_side="left")
    assert batch["input_ids"].tolist() == [[1, 2, 3], [7, 7, 4]]
    with pytest.raises(CaptureError, match="tokenizer"):
        encode_batch(["text"])
    with pytest.raises(CaptureError, match="padding_side"):
        pad_batch([[1]], padding_side="middle")  # type: ignore[arg-type]


def _alone(insp: Inspector, prompt: list[int]) -> dict[str, torch.Tensor]:
    model = insp.model
    with torch.no_grad(), insp.capture(*LOCATORS) as cap:
        logits = model(input_ids=torch.tensor([prompt])).logits
    values = {loc: _side(cap, loc)[0] for loc in LOCATORS}
    values["logits"] = logits[0]
    return values


def _side(cap: object, loc: str) -> torch.Tensor:
    rec = cap[loc]  # type: ignore[index]
    return rec.input if loc.endswith(".input") else rec.output  # type: ignore[no-any-return]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_each_example_in_a_padded_batch_equals_it_alone(lm: nn.Module, padding_side: str) -> None:
    insp = Inspector(lm)
    with torch.no_grad(), insp.capture(*LOCATORS) as cap:
        out = insp.run_batch(PROMPTS, padding_side=padding_side)  # type: ignore[arg-type]
    mask = cap.attention_mask
    assert mask is not None and mask.sum(1).tolist() == [len(p) for p in PROMPTS]
    assert torch.equal(cap["block[0]"].attention_mask, mask)
    where = real_token_positions(mask)
    for i, prompt in enumerate(PROMPTS):
        alone = _alone(insp, prompt)
        for loc in LOCATORS:
            real = cap.real_tokens(loc)[i]
            assert real.shape == (len(prompt), 64)
            assert torch.allclose(real, alone[loc], atol=ATOL), f"example {i}, {loc}"
            assert torch.allclose(cap.last_token(loc)[i], alone[loc][-1], atol=ATOL)
        assert torch.allclose(out.logits[i, where[i]], alone["logits"], atol=ATOL * 10)


def test_left_padding_without_position_ids_would_shift_positions(
    lm: nn.Module, family: str
) -> None:
    if family != "gpt2":
        pytest.skip("rotary attention scores do not change when every position shifts alike")
    insp = Inspector(lm)
    batch = insp.encode_batch(PROMPTS, padding_side="left")
    alone = _alone(insp, PROMPTS[1])
    with torch.no_grad(), insp.capture("block[2]") as cap:
        lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    shifted = cap.real_tokens("block[2]")[1]
    assert not torch.allclose(shifted, alone["block[2]"], atol=1e-3)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("how", ["last", "tensor"])
def test_edits_at_the_last_token_hit_each_example(
    lm: nn.Module, padding_side: str, how: str
) -> None:
    insp = Inspector(lm)
    vector = torch.randn(64, generator=torch.Generator().manual_seed(5))
    batch = insp.encode_batch(PROMPTS, padding_side=padding_side)  # type: ignore[arg-type]
    positions = "last" if how == "last" else last_token_positions(batch["attention_mask"])
    with (
        torch.no_grad(),
        insp.steer("block[1]", vector, scale=3.0, positions=positions),
        insp.capture("block[1]", "block[2]") as cap,
    ):
        out = lm(**batch)
    last = last_token_positions(batch["attention_mask"])
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad(), insp.steer("block[1]", vector, scale=3.0, positions=[-1]):
            alone = _alone(insp, prompt)
        assert torch.allclose(cap.real_tokens("block[2]")[i], alone["block[2]"], atol=ATOL)
        assert torch.allclose(out.logits[i, last[i]], alone["logits"][-1], atol=ATOL * 10)
        # Exactly one position of each example moved: its last real token.
        rec = cap["block[1]"]
        moved = (rec.output[i] - rec.output_before_edit[i]).abs().sum(-1).nonzero().flatten()
        assert moved.tolist() == [last[i].item()]


def test_capture_positions_last_keeps_each_last_real_token(lm: nn.Module) -> None:
    insp = Inspector(lm)
    with torch.no_grad():
        with insp.capture("block[1]") as full:
            insp.run_batch(PROMPTS, padding_side="right")
        with insp.capture("block[1]", positions="last") as last:
            insp.run_batch(PROMPTS, padding_side="right")
    kept = last["block[1]"].output
    assert kept.shape == (3, 1, 64)
    assert torch.allclose(kept[:, 0], full.last_token("block[1]"))
    with pytest.raises(CaptureError, match="positions"):
        last.real_tokens("block[1]")


def test_left_padded_generation_captures_each_example_as_alone(lm: nn.Module) -> None:
    insp = Inspector(lm)
    batch = insp.encode_batch(PROMPTS[:2], padding_side="left")
    del batch["position_ids"]  # generate derives them from the mask itself
    with torch.no_grad(), insp.capture("block[2]", positions="last") as cap:
        sequences = lm.generate(**batch, max_new_tokens=3, do_sample=False)  # type: ignore[operator]
    for i, prompt in enumerate(PROMPTS[:2]):
        with torch.no_grad(), insp.capture("block[2]", positions="last") as alone:
            lone = lm.generate(  # type: ignore[operator]
                input_ids=torch.tensor([prompt]), max_new_tokens=3, do_sample=False
            )
        assert torch.equal(sequences[i, -3:], lone[0, -3:])
        assert torch.allclose(cap.concat("block[2]")[i], alone.concat("block[2]")[0], atol=ATOL)


def test_max_positions_only_where_a_longer_sequence_fails() -> None:
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTJConfig,
        LlamaConfig,
        MambaConfig,
        MptConfig,
        RwkvConfig,
        T5Config,
    )

    from introspect._batching import context_length, max_positions

    # Looked up in a table of that many rows: learned (GPT-2), a rotary table computed once
    # (GPT-J), an ALiBi bias built to that length (MPT).
    assert max_positions(GPT2Config(n_positions=512)) == 512
    assert max_positions(GPTJConfig(n_positions=300)) == 300
    assert max_positions(MptConfig(max_seq_len=256)) == 256
    # Computed rotations (Llama), no positions (RWKV, Mamba), relative buckets (T5).
    assert max_positions(LlamaConfig(max_position_embeddings=128)) is None
    assert context_length(LlamaConfig(max_position_embeddings=128)) == 128
    assert max_positions(RwkvConfig(context_length=64)) is None
    assert context_length(RwkvConfig(context_length=64)) == 64
    assert max_positions(MambaConfig()) is context_length(MambaConfig()) is None
    assert max_positions(T5Config()) is None
    # A model is read through its config; a plain module states nothing.
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=16))
    assert max_positions(gpt2) == 16
    assert max_positions(nn.Linear(2, 2)) is None


@pytest.mark.parametrize("model_type", sorted(_PADDING_OFFSET_POSITIONS))
def test_padding_offset_positions_run_to_their_maximum_and_no_further(model_type: str) -> None:
    """RoBERTa's kin number positions from pad_token_id + 1: each runs max_positions tokens,
    and one more fails in Hugging Face's own forward."""
    from transformers import AutoConfig, AutoModel

    from introspect._batching import max_positions

    config = AutoConfig.for_model(
        model_type,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=50,
        max_position_embeddings=16,
        pad_token_id=1,
    )
    model = AutoModel.from_config(config).eval()
    limit = max_positions(config)
    assert limit == 14
    with torch.no_grad():
        model(torch.full((1, limit), 5))
        with pytest.raises((IndexError, RuntimeError)):
            model(torch.full((1, limit + 1), 5))
