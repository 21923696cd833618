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

from introspect import (
    Attribution,
    Inspector,
    ViewError,
    attention_patterns,
    attention_view,
    attribution_view,
    head_scores,
    head_scores_view,
    lens_view,
    report_header,
    report_page,
    write_page,
)
from introspect._views import PAGE_BUDGET, SCALE, check_page_budget, page_bytes, visible
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


@pytest.fixture(scope="module")
def browser_runs(
    results: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
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
    shown = {
        "lens": {"row": r["lens"].rows[-1], "position": r["lens"].positions[-1]},
        "attention": {"block": 1, "head": "all", "query": 4, "key": 1},
        "heads": None,
        "dla": {"component": r["dla"].labels[1]},
    }
    pages["gallery"] = _with_script(report, SHOW, shown)
    for name, text in pages.items():
        (folder / f"{name}.html").write_text(text, encoding="utf-8")
    url = {name: (folder / f"{name}.html").as_uri() for name in pages}
    size = f"--window-size={GALLERY[0]},{GALLERY[1]}"
    jobs = {name: ["--dump-dom", url[name]] for name in ("driven", "notebook", "large")}
    jobs["gallery"] = [size, "--dump-dom", url["gallery"]]
    jobs["gallery-light"] = [size, f"--screenshot={folder / 'gallery-light.png'}", url["gallery"]]
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
        "dom": {name: parse(out[name]) for name in ("driven", "notebook", "large", "gallery")},
        "pages": pages,
        "large_views": large_views,
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
    lens = results["lens"]
    view = _view(dom, found["ids"]["lens"])
    cells = view.find("iv-cell")
    assert len(cells) == len(lens.rows) * len(lens.positions)
    for r, row in enumerate(lens.rows):
        for c, position in enumerate(lens.positions):
            (cell,) = view.find("iv-cell", data_row=row, data_position=position)
            top = lens.top_tokens[r][c]
            assert int(cell.attrs["data-token-id"]) == int(lens.top_ids[r, c, 0])
            assert cell.attrs["data-token"] == top[0]
            assert math.isclose(
                float(cell.attrs["data-prob"]), float(lens.top_probs[r, c, 0]), rel_tol=1e-3
            )
            assert cell.text() == visible(top[0], 8)
            assert cell.attrs["title"] == cell.attrs["aria-label"]
            assert all(f"'{visible(t)}'" in cell.attrs["title"] for t in top)
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
