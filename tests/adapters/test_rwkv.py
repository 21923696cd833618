"""RWKV: no embedding entry, and a stream halved every rescale_every blocks in eval mode."""

from __future__ import annotations

import pytest
import torch
import transformers

from introspect import Inspector, MissingPartError
from introspect.testing import assert_classes_conformant, assert_conformant, build_tiny


def rwkv_config(layers: int = 3, rescale_every: int = 1) -> transformers.RwkvConfig:
    return transformers.RwkvConfig(
        num_hidden_layers=layers,
        hidden_size=32,
        attention_hidden_size=32,
        intermediate_size=64,
        vocab_size=96,
        context_length=32,
        rescale_every=rescale_every,
    )


def rwkv_inputs() -> dict[str, torch.Tensor]:
    # RWKV has no attention mask (it warns when given one).
    return {"input_ids": torch.tensor([[5, 17, 42, 9, 77, 3], [8, 1, 90, 23, 4, 60]])}


# (layers, rescale_every): halve after every block, after some blocks including the last, and
# after some blocks but not the last. Never halving is the generic tiny config (2 blocks,
# rescale_every=6), proven by tests/test_conformance_all.py.
SCHEDULES = [(3, 1), (2, 2), (3, 2)]


@pytest.mark.parametrize(("layers", "every"), SCHEDULES)
def test_conformant(layers: int, every: int) -> None:
    assert_classes_conformant(
        rwkv_config(layers, every),
        [transformers.RwkvForCausalLM, transformers.RwkvModel],
        inputs=rwkv_inputs(),
        expect_adapter="rwkv",
    )


def test_conformant_in_train_mode_where_nothing_is_rescaled() -> None:
    model = build_tiny(transformers.RwkvForCausalLM, rwkv_config(3, 1)).train()
    assert_conformant(model, rwkv_inputs())
    assert model.rwkv.layers_are_rescaled is False


def test_hidden_states_are_the_halved_stream_read_at_the_next_input() -> None:
    model = build_tiny(transformers.RwkvForCausalLM, rwkv_config(3, 1))
    insp = Inspector(model)
    locs = ["block[0]", "block[1]", "block[2]", "final_norm"]
    with torch.no_grad(), insp.capture(*locs) as cap:
        out = model(**rwkv_inputs(), output_hidden_states=True)
    hidden = out.hidden_states
    assert len(hidden) == 4
    assert [str(insp.hidden_state_locator(i)) for i in range(4)] == [
        "block[1].input",
        "block[2].input",
        "final_norm.input",
        "final_norm",
    ]
    for i in range(3):
        # HF halves the stream after each block (rescale_every=1), outside any module.
        assert torch.allclose(hidden[i], cap[f"block[{i}]"].output / 2)
        assert not torch.allclose(hidden[i], cap[f"block[{i}]"].output)
    assert torch.equal(hidden[1], cap["block[2]"].input)
    assert torch.equal(hidden[2], cap["final_norm"].input)
    last = cap["block[-1]"].output
    assert torch.allclose(insp.finish(last), hidden[-1], atol=1e-6)
    assert torch.allclose(insp.logits(last), out.logits, atol=1e-5)


def test_block_zero_applies_pre_ln_and_other_blocks_say_why_not() -> None:
    model = build_tiny(transformers.RwkvModel, rwkv_config())
    insp = Inspector(model)
    assert insp.module("block[0].pre_ln") is model.blocks[0].pre_ln
    assert insp.module("block[1].attn") is model.blocks[1].attention
    assert insp.module("block[1].mlp") is model.blocks[1].feed_forward
    with pytest.raises(MissingPartError, match="only block 0 has pre_ln"):
        insp.module("block[1].pre_ln")
