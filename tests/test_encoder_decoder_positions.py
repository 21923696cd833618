"""Encoder-decoder models: each stack reads its own mask, cache and positions.

Regression tests: a decoder edit or capture with ``positions="last"`` read the encoder's
attention mask; during ``generate`` (which calls the encoder directly) encoder positions fell
on padding; an encoder edit at an absolute position was skipped when the model's call carried
the decoder's KV cache; an edit of T5's shared embedding (transformers 4.x) hit both stacks.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from transformers import BartForConditionalGeneration, T5ForConditionalGeneration

from introspect import Inspector
from introspect.testing import build_tiny, tiny_config

IDS = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 1, 1]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
DECODER = torch.tensor([[2, 3, 4], [2, 3, 4]])
DECODER_MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
VECTOR = torch.full((64,), 3.0)


def _model(name: str) -> nn.Module:
    cls = {"t5": T5ForConditionalGeneration, "bart": BartForConditionalGeneration}[name]
    return build_tiny(cls, tiny_config(name))


def _steered_positions(before: torch.Tensor, after: torch.Tensor) -> list[list[int]]:
    changed = (after - before).abs().amax(-1) > 1e-4
    return [row.nonzero().flatten().tolist() for row in changed]


@pytest.fixture(params=["t5", "bart"])
def model(request: pytest.FixtureRequest) -> nn.Module:
    return _model(str(request.param))


def test_decoder_last_reads_the_decoders_mask(model: nn.Module) -> None:
    insp = Inspector(model)
    inputs: dict[str, Any] = dict(input_ids=IDS, attention_mask=MASK, decoder_input_ids=DECODER)
    with torch.no_grad():
        with insp.capture("decoder.block[0]") as plain:
            model(**inputs, decoder_attention_mask=DECODER_MASK)
        with (
            insp.steer("decoder.block[0]", VECTOR, positions="last"),
            insp.capture("decoder.block[0]") as cap,
        ):
            model(**inputs, decoder_attention_mask=DECODER_MASK)
        with insp.capture("decoder.block[0]", positions="last") as last:
            model(**inputs, decoder_attention_mask=DECODER_MASK)
        with insp.capture("decoder.block[0]") as plain_unmasked:
            model(**inputs)
        with insp.capture("decoder.block[0]", positions="last") as unmasked:
            model(**inputs)
    before, after = plain["decoder.block[0]"].output, cap["decoder.block[0]"].output
    assert _steered_positions(before, after) == [[2], [1]]
    assert torch.equal(last["decoder.block[0]"].output[:, 0], before[[0, 1], [2, 1]])
    # Without a decoder mask every decoder token is real: the last one is the last position.
    everything = plain_unmasked["decoder.block[0]"].output
    assert torch.equal(unmasked["decoder.block[0]"].output[:, 0], everything[:, 2])


def test_encoder_last_during_generate_reads_the_encoders_mask(model: nn.Module) -> None:
    insp = Inspector(model)
    with torch.no_grad():
        with insp.capture("encoder.block[0]") as plain:
            model.generate(
                input_ids=IDS, attention_mask=MASK, decoder_start_token_id=2, max_new_tokens=2
            )
        with insp.capture("encoder.block[0]", positions="last") as last:
            model.generate(
                input_ids=IDS, attention_mask=MASK, decoder_start_token_id=2, max_new_tokens=2
            )
        with (
            insp.steer("encoder.block[0]", VECTOR, positions="last"),
            insp.capture("encoder.block[0]") as cap,
        ):
            model.generate(
                input_ids=IDS, attention_mask=MASK, decoder_start_token_id=2, max_new_tokens=2
            )
    before = plain["encoder.block[0]"].output
    assert torch.equal(last["encoder.block[0]"].output[:, 0], before[[0, 1], [4, 2]])
    assert _steered_positions(before, cap["encoder.block[0]"].output) == [[4], [2]]


def test_encoder_positions_ignore_the_decoders_cache(model: nn.Module) -> None:
    insp = Inspector(model)
    ids = IDS[:1]
    with torch.no_grad():
        cache = model(input_ids=ids, decoder_input_ids=DECODER[:1], use_cache=True)[
            "past_key_values"
        ]
        with insp.capture("encoder.block[0]") as plain:
            model(input_ids=ids, decoder_input_ids=torch.tensor([[5]]), past_key_values=cache)
        cache = model(input_ids=ids, decoder_input_ids=DECODER[:1], use_cache=True)[
            "past_key_values"
        ]
        with (
            insp.steer("encoder.block[0]", VECTOR, positions=[1]),
            insp.capture("encoder.block[0]") as cap,
        ):
            model(input_ids=ids, decoder_input_ids=torch.tensor([[5]]), past_key_values=cache)
    assert _steered_positions(plain["encoder.block[0]"].output, cap["encoder.block[0]"].output) == [
        [1]
    ]


def test_an_edit_of_a_shared_embedding_stays_in_its_stack() -> None:
    model = _model("t5")
    insp = Inspector(model)
    shared = insp.module("decoder.embed") is insp.module("encoder.embed")
    inputs = dict(input_ids=IDS[:1], decoder_input_ids=DECODER[:1])
    with torch.no_grad():
        with insp.capture("encoder.block[0]", "decoder.block[0]") as plain:
            model(**inputs)
        with (
            insp.steer("decoder.embed", VECTOR),
            insp.capture("encoder.block[0]", "decoder.block[0]") as cap,
        ):
            model(**inputs)
        with insp.steer("encoder.embed", VECTOR, positions=[4]):
            model(**inputs)  # position 4 exists in the encoder only: no error from the decoder
    # The encoder is untouched by a decoder edit, whether or not the module is shared.
    assert torch.equal(plain["encoder.block[0]"].output, cap["encoder.block[0]"].output)
    assert not torch.allclose(plain["decoder.block[0]"].output, cap["decoder.block[0]"].output)
    assert isinstance(shared, bool)
