"""The report: one self-contained page with the lens, every block's attention, the head scores
and the direct logit attribution of one prompt (``introspect report``).

Example:
    >>> from introspect import Inspector
    >>> from introspect.zoo import load_model
    >>> model, tok = load_model("toy-gpt2", progress=False)
    >>> page = build_report(Inspector(model), "Hi there", tokenizer=tok, targets=[" the"])
    >>> page.count('data-kind="'), "logit lens: toy-gpt2 on" in page
    (4, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from introspect._analysis.attention import attention_patterns, head_scores
from introspect._analysis.attribution import direct_logit_attribution
from introspect._analysis.lens import logit_lens, main_blocks
from introspect._errors import CaptureError
from introspect._html import (
    PAGE_BUDGET,
    View,
    attention_view,
    attribution_view,
    check_page_budget,
    head_scores_view,
    lens_view,
    report_header,
    report_page,
)
from introspect._text import encode_prompt, token_strings

if TYPE_CHECKING:
    from introspect._inspector import Inspector

__all__ = ["build_report"]


def build_report(
    insp: Inspector,
    prompt: str,
    *,
    tokenizer: Any,
    targets: Sequence[int | str] = (),
    blocks: int | str | Sequence[int | str] | None = None,
    score: str = "induction",
    model_name: str | None = None,
    command: str | None = None,
    budget: int = PAGE_BUDGET,
) -> str:
    """The report page of ``prompt``: the lens (following ``targets``), the attention of every
    head of ``blocks`` (default: all), their ``score`` head scores and the direct logit
    attribution per head of each target (of the model's top prediction without targets).

    A page over ``budget`` bytes is refused before the model runs, saying how many blocks fit;
    a model whose logits do not decompose gets the page without the attribution, and the
    header says why.
    """
    rows = [loc.index for loc in main_blocks(insp, blocks, "the report reads blocks")]
    chosen = [int(i) for i in rows if i is not None]
    n = int(encode_prompt(tokenizer, prompt, insp.model)["input_ids"].shape[-1])
    check_page_budget(len(chosen), insp.num_heads, n, budget=budget)
    lens = logit_lens(insp, prompt, tokenizer=tokenizer, targets=list(targets), blocks=chosen)
    patterns = [attention_patterns(insp, prompt, b, tokenizer=tokenizer) for b in chosen]
    scores = head_scores(insp, score, blocks=chosen, tokenizer=tokenizer)
    sections: list[View] = [lens_view(lens), attention_view(patterns), head_scores_view(scores)]
    followed = lens.targets or [int(lens.top_ids[-1, -1, 0])]
    refused = None
    for token in followed:
        try:
            dla = direct_logit_attribution(insp, prompt, token, tokenizer=tokenizer, per_head=True)
        except CaptureError as exc:
            refused = str(exc).splitlines()[0]
            break
        text = token_strings(tokenizer, [token])[0]
        sections.append(attribution_view(dla, token_text=text))
    name = model_name or type(insp.model).__name__
    more = {"prompt": prompt}
    if lens.targets:
        more["targets"] = ", ".join(repr(t) for t in token_strings(tokenizer, lens.targets))
    if refused is not None:
        more["direct logit attribution"] = f"not shown: {refused}"
    header = report_header(model=name, adapter=insp.adapter.name, command=command, **more)
    return report_page(sections, header, title=f"introspect report: {name} on {prompt!r}")
