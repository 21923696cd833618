"""The interactive views, drawn by a real browser (headless Chromium) and read back.

Every page is opened from ``file://``; the DOM the page's script built is dumped after it ran
(``--dump-dom``) and compared with the Python result objects themselves (never with a stored
copy). Hovering and clicking are driven by a small script appended to the page: it dispatches
the same mouse events a user's pointer does (and calls ``introspectViews.select``), records
what is highlighted after each step into ``#test-results``, and the page collects its own
errors (uncaught, and ``console.error``) into ``#introspect-errors``. Screenshots of each view
are written to ``docs/images/`` (``docs/views.md`` shows them) and must not be blank.

Without ``chromium`` on PATH the browser tests skip, saying so; where ``CI`` is set they fail.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import introspect
from introspect import (
    Attribution,
    Inspector,
    PatchingResult,
    SAEEvaluation,
    SAEFeatures,
    SparseAutoencoder,
    ViewError,
    attention_patterns,
    attention_view,
    attribution_view,
    check_page_budget,
    head_scores,
    head_scores_view,
    lens_view,
    logit_difference,
    patching_result,
    patching_view,
    report_header,
    report_page,
    sae_evaluation_view,
    sae_features_view,
    top_features,
    write_page,
)
from introspect._html import PAGE_BUDGET, SCALE, _number, byte_label, page_bytes, visible
from introspect.zoo import load_model

IMAGES = Path(__file__).resolve().parent.parent / "docs" / "images"
PROMPT = "The capital of France is"
BROWSER = next(
    (found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None
)
# Attention is stored as bytes (weight = byte / 255) and shown with four decimals.
WEIGHT_TOL = SCALE / 2 + 1e-4
TRICKY = [
    " Paris",
    "\n",
    "a\tb",
    "\u00a0x",
    "\u200bzero",
    "caf\u00e9",
    "\x00",
    " ",
    "\u2028",
    "🙂 x",
]
# Numbers the page prints with one to three decimals: exact ties (0.0625 is 1/16) that Python
# rounds to the even digit, values just either side of a rounding boundary, and the edges of
# the three-decimal range.
NUMBERS = [
    0.0625,
    0.1875,
    0.3125,
    0.625,
    0.125,
    0.375,
    0.25,
    0.05,
    1.005,
    2.675,
    0.12350000441,
    0.1234999,
    0.0005,
    0.001,
    0.0009995,
    0.00099999,
    1e-5,
    0.9995,
    0.99951,
    1.0,
    0.0,
    2.5,
    12.3455,
    999.9996,
]


def _near_boundaries() -> list[float]:
    """float32 probabilities on either side of where three decimals (or two significant
    digits) round up, as a lens holds them: four significant digits would round them twice."""
    edges = torch.tensor([0.1235, 0.4445, 0.9995, 0.0015, 0.000125, 0.00995, 0.0625])
    up = torch.nextafter(edges, torch.tensor(2.0))
    down = torch.nextafter(edges, torch.tensor(-2.0))
    return [float(v) for v in torch.cat([edges, up, down, up + 1e-7, down - 1e-7])]


NEAR = _near_boundaries()
# "I like" + the two halves of "🙂" (each a lone byte, decoded as U+FFFD) + " a", in GPT-2's BPE.
BYTE_IDS = [40, 588, 8582, 25081, 257]
BYTE_LABELS = ["I", " like", "<0xF0><0x9F>", "<0x99><0x82>", " a"]


def printed(value: float) -> str:
    """A number as the page's ``fmt`` must print it: Python's value correctly rounded, to three
    decimals, or to two significant digits in JavaScript's exponent form (``1.2e-5``)."""
    if value == 0 or 0.001 <= value < 1000:
        return f"{value:.3f}"
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent):+d}"


def _need_browser() -> str:
    if BROWSER is None:
        if os.environ.get("CI"):
            pytest.fail("CI runs the browser tests: install chromium (apt-get install chromium)")
        pytest.skip("the views are tested in a real browser: no chromium on PATH")
    return BROWSER


# -- reading a dumped DOM ---------------------------------------------------------------------


class Node:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Node | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node | str] = []

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def walk(self) -> Iterator[Node]:
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.walk()

    def find(self, cls: str = "", **attrs: Any) -> list[Node]:
        wanted = {k.replace("_", "-"): str(v) for k, v in attrs.items()}
        return [
            n
            for n in self.walk()
            if (not cls or cls in n.classes) and all(n.attrs.get(k) == v for k, v in wanted.items())
        ]

    def by_id(self, ident: str) -> Node:
        (found,) = [n for n in self.walk() if n.attrs.get("id") == ident]
        return found


class _Tree(HTMLParser):
    VOID = {"meta", "link", "br", "img", "input", "hr", "col", "area", "base", "wbr", "source"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {}, None)
        self.at = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs}, self.at)
        self.at.children.append(node)
        if tag not in self.VOID:
            self.at = node

    def handle_endtag(self, tag: str) -> None:
        node: Node | None = self.at
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.at = node.parent

    def handle_data(self, data: str) -> None:
        self.at.children.append(data)


def parse(dom: str) -> Node:
    tree = _Tree()
    tree.feed(dom)
    return tree.root


# -- the browser --------------------------------------------------------------------------------


def _command(browser: str, profile: Path, *args: str) -> list[str]:
    return [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *args,
    ]


def run_browser(browser: str, jobs: dict[str, list[str]], folder: Path) -> dict[str, str]:
    """Run each job (its arguments) as its own Chromium, all at once; return their stdout."""
    procs = {}
    for name, args in jobs.items():
        out = (folder / f"{name}.out").open("w", encoding="utf-8")
        procs[name] = (
            subprocess.Popen(
                _command(browser, folder / f"profile-{name}", *args),
                stdout=out,
                stderr=subprocess.DEVNULL,
            ),
            out,
        )
    results = {}
    for name, (proc, out) in procs.items():
        try:
            proc.wait(timeout=90)
        finally:
            out.close()
            if proc.poll() is None:
                proc.kill()
        results[name] = (folder / f"{name}.out").read_text(encoding="utf-8")
    return results


DRIVE = r"""
(function () {
  var R = {}, IV = window.introspectViews, S = SETTINGS;
  function q(sel) { return Array.prototype.slice.call(document.querySelectorAll(sel)); }
  function ev(e, type) { e.dispatchEvent(new MouseEvent(type, { bubbles: true })); }
  function coords(e) { return [+e.dataset.head, +e.dataset.query, +e.dataset.key]; }
  try {
    R.errorsBefore = window.introspectErrors.slice();
    var lens = IV.ids("lens")[0], att = IV.ids("attention")[0], heads = IV.ids("heads")[0],
      dla = IV.ids("dla")[0];
    R.ids = { lens: lens, att: att, heads: heads, dla: dla };
    R.visible = S.tricky.map(function (t) { return IV.visible(t); });
    R.fmt = S.numbers.map(function (v) { return IV.fmt(v); });
    R.stored = S.stored.map(function (v) { return [IV.fmt(v), IV.fixed(v, 2)]; });
    R.fixed = S.numbers.map(function (v) { return [IV.fixed(v, 1), IV.fixed(v, 2), IV.fixed(v, 3), IV.fixed(-v, 3)]; });
    // lens: the pointer over one cell selects it, its row and its column
    R.lensBefore = q("#" + lens + " .iv-cell.iv-sel").map(function (e) { return [e.dataset.row, +e.dataset.position]; });
    ev(q("#" + lens + " .iv-cell[data-row='" + S.lens.row + "'][data-position='" + S.lens.position + "']")[0], "mouseover");
    R.lensAfter = q("#" + lens + " .iv-cell.iv-sel").map(function (e) { return [e.dataset.row, +e.dataset.position]; });
    R.lensOn = q("#" + lens + " .iv-on").map(function (e) { return e.getAttribute("data-row") || +e.getAttribute("data-position"); });
    R.lensSide = q("#" + lens + " .iv-side li").map(function (e) { return +e.dataset.tokenId; });
    ev(q("#" + lens + " .iv-colhead[data-position='" + S.lens.column + "']")[0], "click");
    R.lensRanks = q("#" + lens + " td.iv-rank").map(function (e) { return [e.dataset.row, +e.dataset.position, +e.dataset.rank]; });
    // attention: every block, all heads, every cell
    R.attention = {};
    S.blocks.forEach(function (b) {
      IV.select(att, { block: b, head: "all" });
      R.attention[b] = q("#" + att + " .iv-a").map(function (e) {
        return [+e.dataset.block, +e.dataset.head, +e.dataset.query, +e.dataset.key,
          e.dataset.weight === "" ? null : +e.dataset.weight, e.title === e.getAttribute("aria-label") && e.title.length > 0];
      });
    });
    var A = S.att;
    IV.select(att, { block: A.block, head: "all" });
    ev(q("#" + att + " .iv-a[data-head='" + A.head + "'][data-query='" + A.query + "'][data-key='" + A.key + "']")[0], "mouseover");
    function lit() {
      return {
        row: q("#" + att + " .iv-a.iv-row").map(coords), col: q("#" + att + " .iv-a.iv-col").map(coords),
        sel: q("#" + att + " .iv-a.iv-sel").map(coords),
        strip: q("#" + att + " .iv-tok").map(function (e) { return [+e.dataset.head, +e.dataset.query, +e.dataset.key, e.dataset.weight === "" ? null : +e.dataset.weight]; }),
        state: IV.state(att)
      };
    }
    R.attCell = lit();
    IV.select(att, { head: A.head });
    ev(q("#" + att + " .iv-keyhead[data-key='" + A.key + "']")[0], "mouseover");
    R.attKey = lit();
    ev(q("#" + att + " .iv-queryhead[data-query='" + A.query + "']")[0], "mouseover");
    R.attQuery = lit();
    ev(q("#" + att + " .iv-tok[data-position='" + A.key + "']")[0], "mouseover");
    R.attStrip = lit();
    // head scores: a click selects the head and opens its pattern in the attention view
    R.scores = q("#" + heads + " .iv-score").map(function (e) {
      return [+e.dataset.block, +e.dataset.head, e.dataset.value === "" ? null : +e.dataset.value, e.classList.contains("iv-top"), e.title === e.getAttribute("aria-label")];
    });
    ev(q("#" + heads + " .iv-score[data-block='" + S.head.block + "'][data-head='" + S.head.head + "']")[0], "click");
    R.headClick = {
      sel: q("#" + heads + " .iv-score.iv-sel").map(function (e) { return [+e.dataset.block, +e.dataset.head]; }),
      state: IV.state(heads), attState: IV.state(att),
      attCells: q("#" + att + " .iv-a").map(function (e) { return [+e.dataset.block, +e.dataset.head]; })
    };
    // logit attribution: the largest bars first, all of them on request, a bar lit on hover
    function bars() { return q("#" + dla + " .iv-bar-row[data-component]").map(function (e) { return [e.dataset.component, +e.dataset.value, e.title === e.getAttribute("aria-label")]; }); }
    R.dlaFirst = bars();
    R.dlaRest = q("#" + dla + " .iv-rest").map(function (e) { return +e.dataset.value; });
    ev(q("#" + dla + " button[data-action='all']")[0], "click");
    R.dlaAll = bars();
    R.dlaTotal = +q("#" + dla + " .iv-total")[0].dataset.total;
    ev(q("#" + dla + " .iv-bar-row[data-component='" + S.component + "'] .iv-bar-label")[0], "mouseover");
    R.dlaSel = q("#" + dla + " .iv-bar-row.iv-sel").map(function (e) { return e.dataset.component; });
    ev(q("#" + dla + " button[data-action='sort']")[0], "click");
    R.dlaModelOrder = bars().map(function (b) { return b[0]; });
    // a view that cannot be drawn says so in the page, and the page's collector sees it
    var broken = document.createElement("div");
    broken.className = "iv-view"; broken.id = "iv-broken";
    broken.innerHTML = '<div class="iv-body"></div><div class="iv-error" hidden></div>' +
      '<script type="application/json" class="iv-data">{"kind":"lens"}<\/script>';
    document.body.appendChild(broken);
    IV.mount("iv-broken");
    R.broken = broken.querySelector(".iv-error").textContent;
    R.errorsAfter = window.introspectErrors.slice();
  } catch (err) {
    R.exception = String(err) + "\n" + (err.stack || "");
  }
  var out = document.createElement("pre");
  out.id = "test-results";
  out.textContent = JSON.stringify(R);
  document.body.appendChild(out);
})();
"""

# What the docs' screenshots show: each view after a pointer moved over it. The page records
# where each view lies, so that one screenshot of the page is cut into one picture per view.
SHOW = r"""
(function () {
  var IV = window.introspectViews, S = SETTINGS, rects = {};
  Object.keys(S).forEach(function (kind) {
    var id = IV.ids(kind)[0];
    if (S[kind]) IV.select(id, S[kind]);
    var r = document.getElementById(id).getBoundingClientRect();
    rects[kind] = [r.left, r.top + window.scrollY, r.right, r.bottom + window.scrollY];
  });
  var out = document.createElement("pre");
  out.id = "rects";
  out.hidden = true;
  out.textContent = JSON.stringify(rects);
  document.body.appendChild(out);
})();
"""
GALLERY = (1100, 2000)


def _with_script(page: str, script: str, settings: Any) -> str:
    code = script.replace("SETTINGS", json.dumps(settings))
    return page.replace("</body>", f"<script>{code}</script></body>")


# -- the results --------------------------------------------------------------------------------


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # Tiny models compute on one thread: on shared CPUs, more spend their time waiting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def results() -> Iterator[dict[str, Any]]:
    with _one_thread():
        model, tok = load_model("toy-gpt2", progress=False)
        insp = Inspector(model)
        lens = insp.logit_lens(PROMPT, tokenizer=tok, targets=[" Paris"])
        patterns = [
            attention_patterns(insp, PROMPT, b, tokenizer=tok) for b in range(insp.num_blocks)
        ]
        scores = head_scores(insp, "induction", seq_len=8, batch=2)
        dla = insp.direct_logit_attribution(PROMPT, " Paris", tokenizer=tok, per_head=True)
        yield {
            "insp": insp,
            "tok": tok,
            "lens": lens,
            "patterns": patterns,
            "scores": scores,
            "dla": dla,
        }


def _views(r: dict[str, Any]) -> list[Any]:
    return [
        lens_view(r["lens"]),
        attention_view(r["patterns"]),
        head_scores_view(r["scores"]),
        attribution_view(r["dla"], token_text=" Paris"),
    ]


def _settings(r: dict[str, Any]) -> dict[str, Any]:
    lens = r["lens"]
    top = r["scores"].top(1)[0]
    small = min(range(len(r["dla"].labels)), key=lambda i: abs(float(r["dla"].values[i])))
    return {
        "tricky": TRICKY,
        "numbers": NUMBERS,
        "stored": [_number(v) for v in NEAR],
        "lens": {"row": lens.rows[1], "position": lens.positions[2], "column": lens.positions[1]},
        "blocks": [p.block for p in r["patterns"]],
        "att": {"block": 2, "head": 1, "query": 3, "key": 1},
        "head": {"block": top[0], "head": top[1]},
        "component": r["dla"].labels[small],
    }


def _large() -> tuple[list[Any], dict[str, str]]:
    """The report of a 30-block x 9-head model on a 40-token prompt (random weights)."""
    with _one_thread():
        config = LlamaConfig(
            num_hidden_layers=30,
            hidden_size=72,
            intermediate_size=144,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=512,
            max_position_embeddings=64,
        )
        torch.manual_seed(0)
        insp = Inspector(LlamaForCausalLM(config).eval())
        ids = torch.randint(1, 512, (1, 40), generator=torch.Generator().manual_seed(0))
        views = [
            lens_view(insp.logit_lens(ids, targets=[7])),
            attention_view([attention_patterns(insp, ids, b) for b in range(30)]),
            head_scores_view(head_scores(insp, "induction", seq_len=10, batch=1)),
            attribution_view(insp.direct_logit_attribution(ids, 7, per_head=True)),
        ]
    header = report_header(model="random Llama (30 blocks, 9 heads)", adapter="llama")
    return views, header


# The views of patching tables and SAEs, on one page: the driver reads every cell, hovers, and
# ends in the state the docs' screenshots show, recording where each view lies.
DRIVE_MORE = r"""
(function () {
  var R = {}, IV = window.introspectViews, S = SETTINGS;
  function q(sel) { return Array.prototype.slice.call(document.querySelectorAll(sel)); }
  function ev(e, type) { e.dispatchEvent(new MouseEvent(type, { bubbles: true })); }
  function attrs(e) {
    var o = { title: e.getAttribute("title"), aria: e.getAttribute("aria-label"), text: e.textContent, cls: e.className };
    for (var i = 0; i < e.attributes.length; i++) {
      var a = e.attributes[i];
      if (a.name.indexOf("data-") === 0) o[a.name.slice(5)] = a.value;
    }
    return o;
  }
  try {
    R.errorsBefore = window.introspectErrors.slice();
    var ids = { patching: IV.ids("patching"), evaluation: IV.ids("sae-eval"), features: IV.ids("sae-features") };
    R.ids = ids;
    R.patching = ids.patching.map(function (id) {
      return {
        cells: q("#" + id + " .iv-patch").map(attrs), columns: q("#" + id + " .iv-colhead").map(attrs),
        rows: q("#" + id + " th.iv-rowhead").map(attrs), legend: q("#" + id + " .iv-legend [role=img]").map(attrs),
        captions: q("#" + id + " caption").map(function (e) { return e.textContent; }),
        panels: q("#" + id + " figure.iv-panel").map(attrs), before: IV.state(id)
      };
    });
    var P = S.patch, id0 = ids.patching[0];
    ev(q("#" + id0 + " .iv-patch[data-table='1'][data-locator='" + P.locator + "'][data-position='" + P.position + "']")[0], "mouseover");
    R.patchHover = {
      sel: q("#" + id0 + " .iv-patch.iv-sel").map(attrs), side: q("#" + id0 + " .iv-side [data-table]").map(attrs),
      difference: q("#" + id0 + " .iv-side [data-difference]").map(attrs), state: IV.state(id0)
    };
    var M = S.multi, id2 = ids.patching[2];
    ev(q("#" + id2 + " .iv-patch[data-head='" + M.head + "'][data-locator='" + M.locator + "'][data-position='" + M.position + "']")[0], "mouseover");
    R.multiHover = { sel: q("#" + id2 + " .iv-patch.iv-sel").map(attrs), state: IV.state(id2) };
    R.multiSelect = IV.select(id2, { locator: M.locator, head: M.other, position: M.position });
    R.multiSelected = q("#" + id2 + " .iv-patch.iv-sel").map(attrs);
    var id1 = ids.patching[1];
    ev(q("#" + id1 + " .iv-patch[data-head='" + M.head + "'][data-locator='" + M.locator + "']")[0], "mouseover");
    R.headsHover = { sel: q("#" + id1 + " .iv-patch.iv-sel").map(attrs), state: IV.state(id1) };
    var e = ids.evaluation[0];
    R.evaluation = { cells: q("#" + e + " .iv-metric").map(attrs), columns: q("#" + e + " .iv-colhead").map(attrs), legend: q("#" + e + " .iv-legend [role=img]").map(attrs) };
    ev(q("#" + e + " .iv-metric[data-row='1'][data-metric='dead']")[0], "mouseover");
    R.evaluationHover = { sel: q("#" + e + " .iv-metric.iv-sel").map(attrs), side: q("#" + e + " .iv-side [data-name]").map(attrs), on: q("#" + e + " th.iv-on").map(attrs), state: IV.state(e) };
    var f = ids.features[0], F = S.features;
    R.featuresBefore = { state: IV.state(f), strip: q("#" + f + " .iv-tok").map(attrs), legend: q("#" + f + " .iv-legend [role=img]").map(attrs) };
    ev(q("#" + f + " .iv-tok[data-position='" + F.position + "']")[0], "mouseover");
    R.featuresToken = { state: IV.state(f), side: q("#" + f + " .iv-features li").map(attrs) };
    ev(q("#" + f + " .iv-features li[data-feature='" + F.latent + "'] code")[0], "mouseover");
    R.featuresLatent = { state: IV.state(f), strip: q("#" + f + " .iv-tok").map(attrs) };
    R.errorsAfter = window.introspectErrors.slice();
    // The screenshots: every view in the state set here, and where each lies.
    IV.select(id0, { locator: P.locator, position: P.position });
    IV.select(e, { row: 0, metric: "ceScore" });
    R.rects = {};
    [["patching", id0], ["patching-heads", id2], ["sae-eval", e], ["sae-features", f]].forEach(function (pair) {
      var r = document.getElementById(pair[1]).getBoundingClientRect();
      R.rects[pair[0]] = [r.left, r.top + window.scrollY, r.right, r.bottom + window.scrollY];
    });
  } catch (err) {
    R.exception = String(err) + "\n" + (err.stack || "");
  }
  var out = document.createElement("pre");
  out.id = "test-results";
  out.hidden = true;
  out.textContent = JSON.stringify(R);
  document.body.appendChild(out);
})();
"""

CLEAN, CORRUPTED = "The capital of France is", "The capital of Italy is"


def _frame_sae(d_in: int, k: int, seed: int) -> SparseAutoencoder:
    """A TopK SAE whose 4 x d_in latents are two random orthonormal bases and their negatives:
    with every latent it would reconstruct exactly, so ``k`` sets how well it does."""
    generator = torch.Generator().manual_seed(seed)
    bases = [torch.linalg.qr(torch.randn(d_in, d_in, generator=generator))[0] for _ in range(2)]
    frame = torch.cat(bases, dim=1) / math.sqrt(2)  # frame @ frame.T is the identity
    sae = SparseAutoencoder(d_in, 4 * d_in, architecture="topk", k=k)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([frame, -frame], dim=1))
        sae.W_dec.copy_(sae.W_enc.T)
    return sae


@pytest.fixture(scope="module")
def more_results(results: dict[str, Any]) -> dict[str, Any]:
    """Patching tables (exact and estimated), two SAE evaluations and an SAE's features."""
    insp, tok = results["insp"], results["tok"]
    with _one_thread():
        clean, corrupted = (tok(text, return_tensors="pt") for text in (CLEAN, CORRUPTED))
        metric = logit_difference(tok.encode(" Paris")[0], tok.encode(" Rome")[0])
        tokens = [tok.decode([i]) for i in clean["input_ids"][0]]
        exact = insp.patching_sweep(clean, corrupted, metric)
        estimate = insp.attribution_patching(clean, corrupted, metric)
        heads = {"locators": "block[:].attn.z", "heads": "each"}
        by_head = insp.attribution_patching(clean, corrupted, metric, **heads)
        spots = [1, 3, 4]
        by_spot = insp.attribution_patching(clean, corrupted, metric, positions=spots, **heads)
        named = {
            "method": "AtP*",
            "metric": "logit(' Paris') - logit(' Rome')",
            "model": "toy-gpt2",
        }
        tables = [
            patching_result(insp, estimate, tokens=tokens, exact=exact, **named),
            patching_result(insp, by_head, tokens=tokens, **named, **heads),
            patching_result(insp, by_spot, tokens=tokens, positions=spots, **named, **heads),
        ]
        saes = [_frame_sae(64, k, seed) for seed, k in ((0, 64), (1, 16))]
        ids = clean["input_ids"]
        evaluations = [insp.evaluate_sae(sae, ids, at="block[1]") for sae in saes]
        with torch.no_grad(), insp.splice(saes[1], "block[1]") as spliced:
            insp.model(**clean)
        features = top_features(spliced, k=5, tokens=tokens)
    return {
        "tables": tables,
        "evaluations": evaluations,
        "features": features,
        "features_all": spliced.features,
    }


def _more_settings(m: dict[str, Any]) -> dict[str, Any]:
    first, multi = m["tables"][0], m["tables"][2]
    position = 3
    return {
        "patch": {"locator": first.locators[2], "position": first.positions[-1]},
        "multi": {
            "locator": multi.locators[1],
            "head": multi.heads[1],
            "other": multi.heads[2],
            "position": multi.positions[1],
        },
        "features": {"position": position, "latent": m["features"].of(position)[1][0]},
    }


@pytest.fixture(scope="module")
def browser_runs(
    results: dict[str, Any],
    more_results: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """Every page of this module through Chromium in one go (the processes run side by side)."""
    browser = _need_browser()
    folder = tmp_path_factory.mktemp("views")
    r = results
    views = _views(r)
    header = report_header(
        model="toy-gpt2", adapter=r["insp"].adapter.name, prompt=PROMPT, command="(test)"
    )
    report = report_page(views, header, title=f"introspect report: toy-gpt2, {PROMPT!r}")
    pages = {
        "report": report,
        "driven": _with_script(report, DRIVE, _settings(r)),
        # A notebook shows fragments one after another, each with its own style and script.
        "notebook": "<!doctype html><html><body>"
        + "".join(v.html() for v in (views[0], views[0], views[1]))
        + '<output id="introspect-errors"></output></body></html>',
    }
    large_views, large_header = _large()
    pages["large"] = report_page(large_views, large_header, title="30 blocks x 9 heads")
    with _one_thread():
        ids = torch.tensor([BYTE_IDS])
        byte_lens = r["insp"].logit_lens(ids, tokenizer=r["tok"])
        byte_patterns = attention_patterns(r["insp"], ids, 0, tokenizer=r["tok"])
    byte_views = [lens_view(byte_lens), attention_view(byte_patterns)]
    pages["bytes"] = report_page(byte_views, header, title="a lone byte")
    shown = {
        "lens": {"row": r["lens"].rows[-1], "position": r["lens"].positions[-1]},
        "attention": {"block": 1, "head": "all", "query": 4, "key": 1},
        "heads": None,
        "dla": {"component": r["dla"].labels[1]},
    }
    pages["gallery"] = _with_script(report, SHOW, shown)
    m = more_results
    more = [
        *(patching_view(t) for t in m["tables"]),
        sae_evaluation_view(m["evaluations"], names=["TopK, k=64", "TopK, k=16"]),
        sae_features_view(m["features"]),
    ]
    more_page = report_page(more, header, title="patching and SAEs: toy-gpt2")
    pages["more"] = _with_script(more_page, DRIVE_MORE, _more_settings(m))
    for name, text in pages.items():
        (folder / f"{name}.html").write_text(text, encoding="utf-8")
    url = {name: (folder / f"{name}.html").as_uri() for name in pages}
    size = f"--window-size={GALLERY[0]},{GALLERY[1]}"
    jobs = {name: ["--dump-dom", url[name]] for name in ("driven", "notebook", "large", "bytes")}
    # One Chromium both dumps a page's DOM and takes its screenshot, after its scripts ran.
    jobs["gallery"] = [
        size,
        "--dump-dom",
        f"--screenshot={folder / 'gallery-light.png'}",
        url["gallery"],
    ]
    jobs["more"] = [size, "--dump-dom", f"--screenshot={folder / 'more-light.png'}", url["more"]]
    jobs["more-dark"] = [
        size,
        "--force-dark-mode",
        f"--screenshot={folder / 'more-dark.png'}",
        url["more"],
    ]
    jobs["gallery-dark"] = [
        "--window-size=1100,900",
        "--force-dark-mode",
        f"--screenshot={folder / 'gallery-dark.png'}",
        url["report"],
    ]
    start = time.perf_counter()
    out = run_browser(browser, jobs, folder)
    print(f"chromium: {len(jobs)} pages in {time.perf_counter() - start:.1f} s")
    return {
        "folder": folder,
        "dom": {
            name: parse(out[name])
            for name in ("driven", "notebook", "large", "gallery", "more", "bytes")
        },
        "pages": pages,
        "large_views": large_views,
        "bytes": (byte_lens, byte_patterns),
    }


@pytest.fixture(scope="module")
def driven(browser_runs: dict[str, Any]) -> tuple[Node, dict[str, Any]]:
    dom = browser_runs["dom"]["driven"]
    found = json.loads(dom.by_id("test-results").text())
    assert "exception" not in found, found["exception"]
    return dom, found


def _view(dom: Node, ident: str) -> Node:
    node = dom.by_id(ident)
    assert node.attrs.get("data-ready") == "true", f"{ident} was not drawn"
    return node


# -- the tests ----------------------------------------------------------------------------------


def test_lens_grid_has_every_cell_with_the_results_values(
    results: dict[str, Any], driven: tuple[Node, dict[str, Any]]
) -> None:
    dom, found = driven
    lens, tok = results["lens"], results["tok"]
    view = _view(dom, found["ids"]["lens"])
    cells = view.find("iv-cell")
    assert len(cells) == len(lens.rows) * len(lens.positions)
    last = f"block[{lens.num_blocks - 1}]"
    paris = lens.token_id(" Paris")
    for r, row in enumerate(lens.rows):
        for c, position in enumerate(lens.positions):
            (cell,) = view.find("iv-cell", data_row=row, data_position=position)
            ids = [int(i) for i in lens.top_ids[r, c]]
            top = [byte_label(t, i, tok) for t, i in zip(lens.top_tokens[r][c], ids, strict=True)]
            assert int(cell.attrs["data-token-id"]) == ids[0]
            assert cell.attrs["data-token"] == top[0]
            assert math.isclose(
                float(cell.attrs["data-prob"]), float(lens.top_probs[r, c, 0]), rel_tol=1e-3
            )
            assert cell.text() == visible(top[0], 8)
            assert cell.attrs["title"] == cell.attrs["aria-label"]
            # Every probability printed is the Python value correctly rounded.
            probs = [float(p) for p in lens.top_probs[r, c]]
            ranked = "; ".join(
                f"{j + 1}. '{visible(t)}' {printed(p)}"
                for j, (t, p) in enumerate(zip(top, probs, strict=True))
            )
            token = byte_label(lens.tokens[position], lens.token_ids[position], tok)
            rank = lens.ranks_of(paris, position)[r] + 1
            followed = f"target '\u2423Paris' #{rank} {printed(lens.probs_of(paris, position)[r])}"
            assert cell.attrs["title"] == (
                f"{row}{' = output' if row == last else ''}, after '{visible(token, 16)}' "
                f"(position {position}): {ranked}; {followed}"
            )
            match = re.match(r"block\[(\d+)\]$", row)
            assert cell.attrs.get("data-block", "") == (match.group(1) if match else "")
    # Leading spaces are visible: every input token after the first starts with "␣".
    heads = [h.text() for h in view.find("iv-colhead")]
    assert heads == [visible(lens.tokens[p], 8) for p in lens.positions]
    assert all(h.startswith("\u2423") for h in heads[1:])
    # Hovering a cell moves the selection there (the model's own output is selected first).
    assert found["lensBefore"] == [[lens.rows[-1], lens.positions[-1]]]
    settings = _settings(results)["lens"]
    assert found["lensAfter"] == [[settings["row"], settings["position"]]]
    assert sorted(map(str, found["lensOn"])) == sorted([settings["row"], str(settings["position"])])
    r, c = lens.rows.index(settings["row"]), lens.column(settings["position"])
    assert found["lensSide"] == [int(i) for i in lens.top_ids[r, c]]
    # The target column follows the input token clicked: its rank in every row, from the logits.
    ranks = lens.ranks_of(" Paris", settings["column"])
    expected = sorted([row, settings["column"], ranks[i]] for i, row in enumerate(lens.rows))
    assert sorted(found["lensRanks"]) == expected
    paris = lens.token_id(" Paris")
    boxed = {
        (n.attrs["data-row"], int(n.attrs["data-position"]))
        for n in cells
        if "data-target-top" in n.attrs
    }
    assert boxed == {
        (row, p)
        for r, row in enumerate(lens.rows)
        for c, p in enumerate(lens.positions)
        if int(lens.top_ids[r, c, 0]) == paris
    }


def test_attention_has_every_head_query_and_key_of_every_block(
    results: dict[str, Any], driven: tuple[Node, dict[str, Any]]
) -> None:
    _, found = driven
    for patterns in results["patterns"]:
        cells = found["attention"][str(patterns.block)]
        n = len(patterns.tokens)
        assert len(cells) == len(patterns.heads) * n * n
        seen = set()
        for block, head, query, key, weight, labelled in cells:
            assert block == patterns.block and labelled
            seen.add((head, query, key))
            expected = float(patterns.of(head)[query, key])
            if key > query and patterns.causal:
                assert weight is None
            else:
                assert abs(weight - expected) <= WEIGHT_TOL, (block, head, query, key)
        assert seen == {(h, q, k) for h in patterns.heads for q in range(n) for k in range(n)}


def test_attention_hover_lights_rows_columns_and_the_token_strip(
    results: dict[str, Any], driven: tuple[Node, dict[str, Any]]
) -> None:
    _, found = driven
    a = _settings(results)["att"]
    patterns = results["patterns"][a["block"]]
    heads, n = patterns.heads, len(patterns.tokens)
    cell = found["attCell"]  # all heads: the pointer on one cell lights its row and column
    assert sorted(map(tuple, cell["row"])) == [(h, a["query"], k) for h in heads for k in range(n)]
    assert sorted(map(tuple, cell["col"])) == [(h, q, a["key"]) for h in heads for q in range(n)]
    assert sorted(map(tuple, cell["sel"])) == [(h, a["query"], a["key"]) for h in heads]
    weights = patterns.of(a["head"])[a["query"]]
    assert [s[2] for s in cell["strip"]] == list(range(n))
    for (_, _, key, weight), expected in zip(cell["strip"], weights.tolist(), strict=True):
        assert weight is None if key > a["query"] else abs(weight - expected) <= WEIGHT_TOL
    key = found["attKey"]  # one head: a key label lights its column, the strip shows it
    assert key["row"] == [] and sorted(map(tuple, key["col"])) == [
        (a["head"], q, a["key"]) for q in range(n)
    ]
    column = patterns.of(a["head"])[:, a["key"]].tolist()
    for (_, query, _, weight), expected in zip(key["strip"], column, strict=True):
        assert weight is None if a["key"] > query else abs(weight - expected) <= WEIGHT_TOL
    query = found["attQuery"]  # a query label lights its row
    assert query["col"] == [] and sorted(map(tuple, query["row"])) == [
        (a["head"], a["query"], k) for k in range(n)
    ]
    strip = found["attStrip"]  # a token of the strip becomes the query
    assert strip["state"]["query"] == a["key"]
    assert {tuple(c) for c in strip["row"]} == {(a["head"], a["key"], k) for k in range(n)}


def test_head_scores_grid_and_a_click_opens_the_pattern(
    results: dict[str, Any], driven: tuple[Node, dict[str, Any]]
) -> None:
    _, found = driven
    scores = results["scores"]
    cells = found["scores"]
    assert len(cells) == scores.values.numel()
    top = {(b, h) for b, h, _ in scores.top(5)}
    for block, head, value, outlined, labelled in cells:
        assert math.isclose(value, scores.value(block, head), rel_tol=1e-3, abs_tol=1e-6)
        assert outlined == ((block, head) in top) and labelled
    chosen = _settings(results)["head"]
    click = found["headClick"]
    assert click["sel"] == [[chosen["block"], chosen["head"]]]
    assert click["state"] == {**chosen, "linked": True}
    assert click["attState"]["block"] == chosen["block"]
    assert click["attState"]["head"] == chosen["head"]
    n = len(results["patterns"][0].tokens)
    assert click["attCells"] == [[chosen["block"], chosen["head"]]] * (n * n)


def test_attribution_bars_are_sorted_and_sum_to_the_logit(
    results: dict[str, Any], driven: tuple[Node, dict[str, Any]]
) -> None:
    _, found = driven
    dla = results["dla"]
    values = dict(zip(dla.labels, dla.values.tolist(), strict=True))
    first = found["dlaFirst"]
    assert len(first) == 20 and all(labelled for *_, labelled in first)
    sizes = [abs(v) for _, v, _ in first]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] == pytest.approx(max(abs(v) for v in values.values()), rel=1e-5)
    shown = sum(v for _, v, _ in first)
    assert found["dlaRest"] == [pytest.approx(sum(values.values()) - shown, abs=1e-4)]
    assert sorted(c for c, _, _ in found["dlaAll"]) == sorted(dla.labels)
    for component, value, _ in found["dlaAll"]:
        assert value == pytest.approx(values[component], abs=1e-5)
    assert found["dlaTotal"] == pytest.approx(dla.logit, abs=1e-3)
    assert found["dlaSel"] == [_settings(results)["component"]]
    assert found["dlaModelOrder"] == dla.labels


def test_tokens_are_shown_alike_in_python_and_in_the_page(
    driven: tuple[Node, dict[str, Any]],
) -> None:
    _, found = driven
    assert found["visible"] == [visible(t) for t in TRICKY]


def test_numbers_are_printed_as_python_rounds_them(driven: tuple[Node, dict[str, Any]]) -> None:
    # toFixed rounds an exact tie away from zero (0.0625 -> 0.063); Python, and so the page,
    # to the even digit (0.062).
    _, found = driven
    assert found["fmt"] == [printed(v) for v in NUMBERS]
    expected = [
        [f"{v:.1f}", f"{v:.2f}", f"{v:.3f}", f"{-v:.3f}" if v else "0.000"] for v in NUMBERS
    ]
    assert found["fixed"] == expected
    # A value as a view stores it prints as the value itself, correctly rounded.
    assert found["stored"] == [[printed(v), f"{v:.2f}"] for v in NEAR]
    # (Four significant digits, as the views stored them before, would misprint some.)
    assert any(printed(float(f"{v:.4g}")) != printed(v) for v in NEAR)


def test_a_lone_byte_shows_as_its_bytes_in_every_view(browser_runs: dict[str, Any]) -> None:
    dom = browser_runs["dom"]["bytes"]
    lens, patterns = browser_runs["bytes"]
    assert lens.tokens[2:4] == patterns.tokens[2:4] == ["\ufffd", "\ufffd\ufffd"]
    (grid,) = dom.find("iv-view", data_kind="lens", data_ready="true")
    assert [h.text() for h in grid.find("iv-colhead")] == [visible(t, 8) for t in BYTE_LABELS]
    for cell in grid.find("iv-cell", data_position=2):
        assert "after '<0xF0><0x9F>' (position 2)" in cell.attrs["title"]
    (attention,) = dom.find("iv-view", data_kind="attention", data_ready="true")
    assert [t.text() for t in attention.find("iv-tok")] == [visible(t, 12) for t in BYTE_LABELS]
    keys = attention.find("iv-a", data_head=0, data_query=4)
    assert "query 4 '\u2423a' \u2192 key 3 '<0x99><0x82>': " in keys[3].attrs["title"]
    # Nothing of either view (text, hover text, data) shows the missing glyph.
    for node in (grid, attention):
        assert "\ufffd" not in node.text()
        assert all("\ufffd" not in value for n in node.walk() for value in n.attrs.values())


def test_pages_report_no_errors_and_their_collector_works(
    driven: tuple[Node, dict[str, Any]], browser_runs: dict[str, Any]
) -> None:
    _, found = driven
    assert found["errorsBefore"] == []
    # The one error is the deliberately broken view of the test script, shown in its place.
    assert found["broken"].startswith("This view could not be drawn:")
    assert len(found["errorsAfter"]) == 1 and "iv-broken" in found["errorsAfter"][0]
    large = browser_runs["dom"]["large"]
    assert large.by_id("introspect-errors").attrs["data-count"] == "0"
    assert len(large.find("iv-view", data_ready="true")) == 4


def test_notebook_fragments_each_draw_with_their_own_ids(
    browser_runs: dict[str, Any], results: dict[str, Any]
) -> None:
    dom = browser_runs["dom"]["notebook"]
    views = [n for n in dom.walk() if "iv-view" in n.classes]
    ids = [v.attrs["id"] for v in views]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert all(v.attrs.get("data-ready") == "true" for v in views)
    lens = results["lens"]
    for view in views[:2]:
        assert len(view.find("iv-cell")) == len(lens.rows) * len(lens.positions)
    assert dom.by_id("introspect-errors").text() == ""


def test_the_large_report_stays_small(browser_runs: dict[str, Any]) -> None:
    page = browser_runs["pages"]["large"]
    size = len(page.encode("utf-8"))
    estimate = page_bytes(30, 9, 40)
    print(f"report of 30 blocks x 9 heads, 40 tokens: {size / 2**20:.2f} MB (estimate {estimate})")
    assert size < PAGE_BUDGET
    assert 0.5 < estimate / size < 2.0
    dom = browser_runs["dom"]["large"]
    (attention,) = dom.find("iv-view", data_kind="attention")
    assert len(attention.find("iv-a", data_block=0)) == 9 * 40 * 40


def _not_blank(name: str, image: Any) -> None:
    rgb = image.convert("RGB")
    colours = rgb.getcolors(maxcolors=1 << 22) or []
    background = rgb.getpixel((1, 1))
    differing = sum(n for n, colour in colours if colour != background)
    assert len(colours) > 20, f"{name} is nearly blank ({len(colours)} colours)"
    assert differing > 0.03 * rgb.width * rgb.height, f"{name} is nearly blank"


def _save(image: Any, name: str) -> None:
    """Put a screenshot in the docs, written whole, unless the one there looks the same.

    Rendering moves a few pixels from run to run (anti-aliasing): rewriting the file for those
    would change the repository on every run."""
    from PIL import Image, ImageChops

    IMAGES.mkdir(parents=True, exist_ok=True)
    target = IMAGES / f"{name}.png"
    if target.is_file():
        with Image.open(target) as old:
            if old.size == image.size:
                diff = ImageChops.difference(old.convert("RGB"), image.convert("RGB"))
                moved = diff.convert("L").point(lambda v: 255 if v else 0).histogram()[255]
                if moved < 0.002 * image.width * image.height:
                    return
    partial = target.with_name(f".{name}.png.partial")
    image.save(partial, format="PNG", optimize=True)
    partial.replace(target)


def test_screenshots_are_not_blank(browser_runs: dict[str, Any]) -> None:
    image_module = pytest.importorskip("PIL.Image")
    folder = browser_runs["folder"]
    rects = json.loads(browser_runs["dom"]["gallery"].by_id("rects").text())
    with image_module.open(folder / "gallery-light.png") as page:
        assert page.size == GALLERY
        _not_blank("the report", page)
        for kind, (left, top, right, bottom) in rects.items():
            assert bottom <= GALLERY[1], f"the {kind} view is below the screenshot"
            box = (max(0, int(left) - 4), max(0, int(top) - 4), int(right) + 4, int(bottom) + 4)
            view = page.crop(box)
            _not_blank(kind, view)
            _save(view, f"views-{kind}")
        _save(page.crop((0, 0, GALLERY[0], int(rects["lens"][3]) + 8)), "views-report")
    with image_module.open(folder / "gallery-dark.png") as dark:
        _not_blank("the dark report", dark)
        assert sum(dark.convert("RGB").getpixel((1, 1))) < 200, "the dark page is light"
        _save(
            dark.crop((0, 0, dark.width, min(dark.height, int(rects["lens"][3]) + 8))),
            "views-report-dark",
        )


def test_pages_make_no_request() -> None:
    dla = Attribution(["embed", "bias"], torch.tensor([1.0, 0.5]), 1.5, 7, -1, 0.0)
    page = attribution_view(dla).page()
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    without_csp = page.replace("http-equiv", "")
    assert not re.search(r"https?:|\bsrc\s*=|url\(|@import|<link", without_csp)
    assert not re.search(r"href\s*=\s*[\"'](?!#)", page)


def test_empty_results_are_one_line_errors(results: dict[str, Any]) -> None:
    lens, patterns, scores, dla = (results[k] for k in ("lens", "patterns", "scores", "dla"))
    empty = [
        lambda: lens_view(dataclasses.replace(lens, rows=[], positions=[])),
        lambda: attention_view([]),
        lambda: attention_view(
            dataclasses.replace(patterns[0], heads=[], pattern=torch.zeros(0, 5, 5))
        ),
        lambda: head_scores_view(dataclasses.replace(scores, values=torch.full((2, 2), math.nan))),
        lambda: attribution_view(dataclasses.replace(dla, labels=[], values=torch.zeros(0))),
        lambda: report_page([], {}),
    ]
    for make in empty:
        with pytest.raises(ViewError) as info:
            make()
        assert "\n" not in str(info.value)
    other = dataclasses.replace(patterns[1], tokens=["x"] * len(patterns[1].tokens))
    with pytest.raises(ViewError, match="another prompt"):
        attention_view([patterns[0], other])


def test_write_page_refuses_an_existing_file_unless_told(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    write_page(target, "<p>one</p>")
    with pytest.raises(ViewError, match="exists"):
        write_page(target, "<p>two</p>", overwrite=False)
    assert target.read_text() == "<p>one</p>"
    write_page(target, "<p>two</p>")
    assert target.read_text() == "<p>two</p>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    with pytest.raises(ViewError, match="does not exist"):
        write_page(tmp_path / "missing" / "page.html", "")


def test_a_prompt_too_long_for_the_page_says_how_many_blocks_fit() -> None:
    assert check_page_budget(30, 9, 40) == page_bytes(30, 9, 40)
    with pytest.raises(ViewError) as info:
        check_page_budget(30, 9, 300)
    message = str(info.value)
    fit = int(re.search(r"at most (\d+) blocks", message).group(1))
    assert page_bytes(fit, 9, 300) <= PAGE_BUDGET < page_bytes(fit + 1, 9, 300)
    assert "--blocks 0:" in message and "\n" not in message


def test_a_view_writes_its_page_and_a_fragment_brings_its_script(results: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lens.html"
        page = lens_view(results["lens"]).to_html(path)
        assert path.read_text(encoding="utf-8") == page
    fragment = attention_view(results["patterns"][0]).html()
    assert fragment.count("<script>") == 2 and "iv-data" in fragment


# -- patching tables and SAEs -------------------------------------------------------------------


@pytest.fixture(scope="module")
def driven_more(browser_runs: dict[str, Any]) -> dict[str, Any]:
    dom = browser_runs["dom"]["more"]
    found = json.loads(dom.by_id("test-results").text())
    assert "exception" not in found, found["exception"]
    return found


def _signed(text: str) -> list[float]:
    """The signed numbers of a label, as the page writes them (+0.123, and U+2212 for minus)."""
    return [float(n.replace("\u2212", "-")) for n in re.findall(r"[+\u2212]\d+\.\d+", text)]


def _close(shown: str | float, value: float) -> bool:
    return math.isclose(float(shown), value, rel_tol=1e-3, abs_tol=1e-6)


def test_patching_grids_have_every_cell_with_the_tables_values(
    more_results: dict[str, Any], driven_more: dict[str, Any]
) -> None:
    exact_beside, by_head, by_spot = more_results["tables"]
    drawn = driven_more["patching"]
    # Locators x positions, the estimate beside the exact table, every cell of both.
    first = drawn[0]
    assert first["captions"] == ["AtP*", "exact patching"]
    assert exact_beside.exact is not None
    tables = [exact_beside.values, exact_beside.exact]
    n_rows, n_cols = tables[0].shape
    assert len(first["cells"]) == 2 * n_rows * n_cols
    for cell in first["cells"]:
        t, r, c = int(cell["table"]), int(cell["row"]), int(cell["column"])
        value = float(tables[t][r, c])
        assert _close(cell["value"], value)
        assert cell["locator"] == exact_beside.locators[r] == f"block[{cell['block']}]"
        assert int(cell["position"]) == exact_beside.positions[c] and "head" not in cell
        assert cell["method"] == ["AtP*", "exact patching"][t]
        assert cell["title"] == cell["aria"]
        shown = _signed(cell["title"])  # both tables' values, whichever table the cell is in
        assert [round(v, 3) for v in shown] == pytest.approx(
            [float(tables[0][r, c]), float(tables[1][r, c])], abs=1.5e-3
        )
        assert f"position {exact_beside.positions[c]} " in cell["title"]
    tokens = exact_beside.tokens
    columns = [c["text"] for c in first["columns"][:n_cols]]
    assert columns == [f"{p} {visible(tokens[p], 8)}" for p in exact_beside.positions]
    scale = max(float(tables[0].abs().max()), float(tables[1].abs().max()))
    (ramp,) = first["legend"]
    assert "iv-diverging" in ramp["cls"]
    low, high = _signed(ramp["aria"])
    assert low == pytest.approx(-scale, abs=1e-3) and high == pytest.approx(scale, abs=1e-3)
    largest = int(exact_beside.values.abs().argmax())
    assert first["before"]["locator"] == exact_beside.locators[largest // n_cols]
    # Locators x heads: one grid, a column per head, every position patched at once.
    second = drawn[1]
    assert second["captions"] == ["AtP*"] and by_head.positions is None
    assert len(second["cells"]) == by_head.values.numel()
    for cell in second["cells"]:
        r, h = int(cell["row"]), int(cell["head"])
        assert _close(cell["value"], float(by_head.values[r, h])) and "position" not in cell
        assert cell["locator"] == by_head.locators[r] and cell["title"] == cell["aria"]
    assert [c["head"] for c in second["columns"]] == [str(h) for h in by_head.heads or []]
    # Locators x heads x positions: a grid per head (small multiples).
    third = drawn[2]
    assert [p["head"] for p in third["panels"]] == [str(h) for h in by_spot.heads or []]
    assert len(third["cells"]) == by_spot.values.numel()
    for cell in third["cells"]:
        r, c = int(cell["row"]), int(cell["column"])
        h = int(cell["head"])
        assert int(cell["position"]) == (by_spot.positions or [])[c]
        assert _close(cell["value"], float(by_spot.values[r, h, c]))
        assert int(cell["panel"]) == h and cell["title"].startswith(
            f"{by_spot.locators[r]} head {h}"
        )


def test_patching_hover_lights_the_cell_in_both_tables(
    more_results: dict[str, Any], driven_more: dict[str, Any]
) -> None:
    exact_beside, by_head, by_spot = more_results["tables"]
    settings = _more_settings(more_results)
    chosen = settings["patch"]
    r = exact_beside.locators.index(chosen["locator"])
    c = (exact_beside.positions or []).index(chosen["position"])
    assert exact_beside.exact is not None
    values = [float(exact_beside.values[r, c]), float(exact_beside.exact[r, c])]
    hover = driven_more["patchHover"]
    assert sorted((int(s["table"]), s["locator"], int(s["position"])) for s in hover["sel"]) == [
        (0, chosen["locator"], chosen["position"]),
        (1, chosen["locator"], chosen["position"]),
    ]
    assert [float(s["value"]) for s in hover["side"]] == pytest.approx(values, rel=1e-3)
    (difference,) = hover["difference"]
    assert float(difference["difference"]) == pytest.approx(values[0] - values[1], abs=1e-3)
    assert hover["state"]["locator"] == chosen["locator"]
    assert hover["state"]["position"] == chosen["position"] and hover["state"]["head"] is None
    multi = settings["multi"]
    r2 = by_spot.locators.index(multi["locator"])
    c2 = (by_spot.positions or []).index(multi["position"])
    (lit,) = driven_more["multiHover"]["sel"]
    assert (lit["locator"], int(lit["head"]), int(lit["position"])) == (
        multi["locator"],
        multi["head"],
        multi["position"],
    )
    state = driven_more["multiHover"]["state"]
    assert state["values"] == [
        pytest.approx(float(by_spot.values[r2, multi["head"], c2]), rel=1e-3)
    ]
    assert driven_more["multiSelect"]["head"] == multi["other"]
    assert [int(s["head"]) for s in driven_more["multiSelected"]] == [multi["other"]]
    heads = driven_more["headsHover"]
    assert [(s["locator"], int(s["head"])) for s in heads["sel"]] == [
        (multi["locator"], multi["head"])
    ]
    r3 = by_head.locators.index(multi["locator"])
    assert heads["state"]["values"] == [
        pytest.approx(float(by_head.values[r3, multi["head"]]), rel=1e-3)
    ]


def test_sae_evaluation_table_has_every_figure(
    more_results: dict[str, Any], driven_more: dict[str, Any]
) -> None:
    evaluations = more_results["evaluations"]
    drawn = driven_more["evaluation"]
    expected = {
        "ceScore": "ce_score",
        "klScore": "kl_score",
        "explainedVariance": "explained_variance",
        "l0": "l0",
        "dead": "dead",
    }
    assert [c["metric"] for c in drawn["columns"]] == list(expected)
    assert len(drawn["cells"]) == len(evaluations) * len(expected)
    for cell in drawn["cells"]:
        row = int(cell["row"])
        e = evaluations[row]
        value = float(getattr(e, expected[cell["metric"]]))
        assert _close(cell["value"], value), cell
        assert cell["block"] == "1" and cell["title"] == cell["aria"]
        assert cell["title"].startswith(f"TopK, k={(64, 16)[row]}: ")
        if cell["metric"] == "dead":
            assert cell["text"].startswith(f"{e.dead} / {e.d_sae} (")
        elif cell["metric"] != "l0":
            assert cell["text"] == f"{value:.3f}"
    assert len(drawn["legend"]) == 2
    hover = driven_more["evaluationHover"]
    assert [(s["row"], s["metric"]) for s in hover["sel"]] == [("1", "dead")]
    assert [h["row"] for h in hover["on"]] == ["1"]
    e = evaluations[1]
    side = {s["name"]: float(s["value"]) for s in hover["side"]}
    assert side == pytest.approx(
        {
            "CE clean": e.ce_clean,
            "CE spliced": e.ce_sae,
            "CE zero-ablated": e.ce_ablate,
            "KL spliced": e.kl_sae,
            "KL zero-ablated": e.kl_ablate,
        },
        rel=1e-3,
    )


def test_sae_features_show_each_tokens_top_latents(
    more_results: dict[str, Any], driven_more: dict[str, Any]
) -> None:
    features: SAEFeatures = more_results["features"]
    everything = more_results["features_all"][0]  # [seq, d_sae], as the splice recorded them
    settings = _more_settings(more_results)["features"]
    n = len(features.tokens)
    # By hand: the five largest activations of each token, those that fired.
    for p in range(n):
        top = everything[p].topk(5)
        expected = [(int(i), float(v)) for i, v in zip(top.indices, top.values, strict=True) if v]
        assert features.of(p) == [(i, pytest.approx(v)) for i, v in expected]
    before = driven_more["featuresBefore"]
    last = features.of(-1)[0][0]
    assert before["state"] == {"position": n - 1, "feature": last}
    assert [t["text"] for t in before["strip"]] == [visible(t, 12) for t in features.tokens]
    assert len(before["legend"]) == 1
    token = driven_more["featuresToken"]
    assert token["state"]["position"] == settings["position"]
    side = [(int(li["feature"]), float(li["value"])) for li in token["side"]]
    assert side == [(i, pytest.approx(v, rel=1e-3)) for i, v in features.of(settings["position"])]
    assert all(li["title"] == li["aria"] for li in token["side"])
    latent = driven_more["featuresLatent"]
    assert latent["state"] == {"position": settings["position"], "feature": settings["latent"]}
    strip = [float(t["value"]) for t in latent["strip"]]
    assert strip == pytest.approx(everything[:, settings["latent"]].tolist(), rel=1e-3, abs=1e-6)
    assert all(t["feature"] == str(settings["latent"]) for t in latent["strip"])


def test_patching_and_sae_pages_report_no_errors(driven_more: dict[str, Any]) -> None:
    assert driven_more["errorsBefore"] == [] and driven_more["errorsAfter"] == []
    assert {k: len(v) for k, v in driven_more["ids"].items()} == {
        "patching": 3,
        "evaluation": 1,
        "features": 1,
    }


def test_patching_and_sae_screenshots_are_not_blank(
    browser_runs: dict[str, Any], driven_more: dict[str, Any]
) -> None:
    image_module = pytest.importorskip("PIL.Image")
    folder = browser_runs["folder"]
    with image_module.open(folder / "more-light.png") as page:
        assert page.size == GALLERY
        for name, (left, top, right, bottom) in driven_more["rects"].items():
            assert bottom <= GALLERY[1], f"the {name} view is below the screenshot"
            box = (max(0, int(left) - 4), max(0, int(top) - 4), int(right) + 4, int(bottom) + 4)
            view = page.crop(box)
            _not_blank(name, view)
            _save(view, f"views-{name}")
    with image_module.open(folder / "more-dark.png") as dark:
        _not_blank("the dark page of patching and SAEs", dark)
        assert sum(dark.convert("RGB").getpixel((1, 1))) < 200, "the dark page is light"
        left, top, right, bottom = driven_more["rects"]["patching"]
        _not_blank(
            "the dark patching view", dark.crop((int(left), int(top), int(right), int(bottom)))
        )


def test_empty_patching_and_sae_results_are_one_line_errors(
    more_results: dict[str, Any],
) -> None:
    table = more_results["tables"][0]
    features = more_results["features"]
    empty = [
        lambda: patching_view(dataclasses.replace(table, locators=[], values=torch.zeros(0, 6))),
        lambda: patching_view(dataclasses.replace(table, positions=[], values=torch.zeros(4, 0))),
        lambda: patching_view(dataclasses.replace(table, exact=torch.zeros(2, 2))),
        lambda: sae_evaluation_view([]),
        lambda: sae_evaluation_view(more_results["evaluations"], names=["one"]),
        lambda: sae_features_view(top_features(torch.zeros(3, 8))),
        lambda: sae_features_view(dataclasses.replace(features, tokens=[])),
        lambda: PatchingResult(torch.zeros(0, 2), [], [0, 1]).to_html(),
    ]
    for make in empty:
        with pytest.raises(ViewError) as info:
            make()
        assert "\n" not in str(info.value)


def _every_result(results: dict[str, Any], more_results: dict[str, Any]) -> list[Any]:
    """One result of each kind that has a page, and a bare view."""
    return [
        results["lens"],
        results["patterns"][0],
        results["scores"],
        results["dla"],
        more_results["tables"][0],
        more_results["evaluations"][0],
        more_results["features"],
        attribution_view(results["dla"]),
    ]


def test_to_html_refuses_an_existing_file_unless_forced(
    results: dict[str, Any], more_results: dict[str, Any], tmp_path: Path
) -> None:
    every = _every_result(results, more_results)
    for n, result in enumerate(every):
        target = tmp_path / f"{n}.html"
        page = result.to_html(target)
        assert target.read_text(encoding="utf-8") == page
        assert page.count('data-kind="') == 1 and result._repr_html_().count("<script>") == 2
        target.write_text("mine", encoding="utf-8")
        with pytest.raises(ViewError, match="exists: give another path, or force=True") as info:
            result.to_html(target)
        assert "\n" not in str(info.value) and target.read_text(encoding="utf-8") == "mine"
        assert result.to_html(target, force=True) == target.read_text(encoding="utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{n}.html" for n in range(len(every))]


def test_overwrite_is_the_deprecated_name_of_force(
    results: dict[str, Any], more_results: dict[str, Any], tmp_path: Path
) -> None:
    # Only the results whose to_html took overwrite= before keep it, for one release.
    every = _every_result(results, more_results)
    older = [every[n] for n in (0, 1, 2, 3, 7)]
    for n, result in enumerate(older):
        target = tmp_path / f"{n}.html"
        target.write_text("mine", encoding="utf-8")
        with pytest.warns(DeprecationWarning, match=r"overwrite=True\) is deprecated: use force=T"):
            page = result.to_html(target, overwrite=True)
        assert target.read_text(encoding="utf-8") == page
        target.write_text("mine", encoding="utf-8")
        with (
            pytest.warns(DeprecationWarning, match="use force=False") as caught,
            pytest.raises(ViewError, match="exists"),
        ):
            result.to_html(target, overwrite=False)
        assert caught[0].filename == __file__  # the warning points at the caller's line
        with pytest.raises(ViewError, match=r"^force=True and overwrite=False disagree"):
            result.to_html(target, force=True, overwrite=False)
        assert target.read_text(encoding="utf-8") == "mine"
    for result in every[4:7]:
        with pytest.raises(TypeError, match="overwrite"):
            result.to_html(tmp_path / "new.html", overwrite=True)


def test_the_names_a_notebook_needs_are_public() -> None:
    from introspect import _html
    from introspect._analysis import atp as _atp
    from introspect._sae import _features

    for module, names in (
        (_atp, ["PatchingResult", "patching_result"]),
        (_features, ["SAEFeatures", "top_features"]),
        (
            _html,
            ["check_page_budget", "patching_view", "sae_evaluation_view", "sae_features_view"],
        ),
    ):
        for name in names:
            assert name in introspect.__all__ and getattr(introspect, name) is getattr(module, name)


def test_a_single_evaluation_and_its_payload(more_results: dict[str, Any]) -> None:
    e: SAEEvaluation = more_results["evaluations"][0]
    view = sae_evaluation_view(e, names=["mine"])
    (row,) = view.payload["rows"]
    assert row["name"] == "mine" and row["tokens"] == e.tokens and row["block"] == 1
    assert row["values"]["dead"] == e.dead and row["ce"][0] == pytest.approx(e.ce_clean, rel=1e-3)
    assert view.title == f"SAE evaluation: {e.at}"
    both = sae_evaluation_view(more_results["evaluations"]).payload["rows"]
    assert [r["name"] for r in both] == [f"{e.at} (d_sae {e.d_sae}) #{n}" for n in (1, 2)]
