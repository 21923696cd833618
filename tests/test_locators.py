from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from introspect import Locator, LocatorError
from introspect._locators import parse


@pytest.mark.parametrize(
    ("text", "part", "index", "sub", "stack", "side"),
    [
        ("embed", "embed", None, None, None, "output"),
        ("block[3]", "block", 3, None, None, "output"),
        ("block[-1].attn", "block", -1, "attn", None, "output"),
        ("block[0].input", "block", 0, None, None, "input"),
        ("block[2].mlp.output", "block", 2, "mlp", None, "output"),
        ("final_norm", "final_norm", None, None, None, "output"),
        ("lm_head", "lm_head", None, None, None, "output"),
        ("decoder.block[1]", "block", 1, None, "decoder", "output"),
        ("encoder.final_norm", "final_norm", None, None, "encoder", "output"),
        (" block[ -2 ] ", "block", -2, None, None, "output"),
    ],
)
def test_parse(
    text: str, part: str, index: int | None, sub: str | None, stack: str | None, side: str
) -> None:
    loc = parse(text)
    assert (loc.part, loc.index, loc.sub, loc.stack, loc.side) == (part, index, sub, stack, side)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("block[1:3]", [1, 2]),
        ("block[:]", [0, 1, 2, 3]),
        ("block[::2]", [0, 2]),
        ("block[-2:]", [2, 3]),
        ("block[5:]", []),
    ],
)
def test_slices_expand_with_python_semantics(text: str, expected: list[int]) -> None:
    assert [loc.index for loc in parse(text).expand(4)] == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "cannot parse"),
        ("block", "needs an index"),
        ("block[x]", "use an integer such as"),
        ("block[1:y]", "not an integer"),
        ("block[1:2:0]", "step cannot be zero"),
        ("block[1]]", "cannot parse"),
        ("block[1:2:3:4]", "cannot parse block selector"),
        ("3block", "cannot parse"),
    ],
)
def test_bad_locators_say_what_is_valid(text: str, fragment: str) -> None:
    with pytest.raises(LocatorError, match=fragment):
        parse(text)


def test_non_string_is_rejected() -> None:
    with pytest.raises(LocatorError, match="must be a string"):
        Locator.parse(3)  # type: ignore[arg-type]


def test_out_of_range_names_range_and_block_count() -> None:
    with pytest.raises(LocatorError, match=r"12 blocks: use -12\.\.11"):
        parse("block[12]").resolve_index(12, "gpt2")
    assert parse("block[-12]").resolve_index(12).index == 0


@given(
    st.integers(-50, 50),
    st.sampled_from([None, "attn", "mlp"]),
    st.sampled_from([None, "encoder", "decoder"]),
    st.sampled_from(["input", "output"]),
)
def test_round_trip(index: int, sub: str | None, stack: str | None, side: str) -> None:
    text = (f"{stack}." if stack else "") + f"block[{index}]" + (f".{sub}" if sub else "")
    text += ".input" if side == "input" else ""
    loc = parse(text)
    assert str(loc) == text
    assert parse(str(loc)) == loc


@given(
    st.one_of(st.none(), st.integers(-6, 6)),
    st.one_of(st.none(), st.integers(-6, 6)),
    st.one_of(st.none(), st.integers(-3, 3).filter(lambda s: s != 0)),
)
def test_slice_matches_python(start: int | None, stop: int | None, step: int | None) -> None:
    def show(v: int | None) -> str:
        return "" if v is None else str(v)

    text = f"block[{show(start)}:{show(stop)}" + (f":{step}" if step is not None else "") + "]"
    assert [loc.index for loc in parse(text).expand(6)] == list(range(6))[start:stop:step]
    assert parse(str(parse(text))) == parse(text)
