"""Every relative link in README.md, docs/*.md and bench/LOG.md points at a file that exists, and a
link into a markdown file at one of its headings (GitHub's anchors), so moved pages cannot rot."""

import glob
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [
    "README.md",
    *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))),
    "bench/LOG.md",
]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE = re.compile(r"^```.*?^```|`[^`\n]*`", re.S | re.M)  # fenced blocks and inline code: no links there


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped (not - or _), spaces -> hyphens"""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    seen, out = {}, set()
    for line in FENCE.sub("", open(os.path.join(ROOT, path), encoding="utf-8").read()).splitlines():
        if re.match(r"#{1,6} ", line):
            base = slug(line.lstrip("#").replace("`", ""))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")  # GitHub numbers repeated headings
    return out


def test_slug_is_githubs():
    assert (
        slug("2026-11-25: DPO step time vs a CLIP step (1.26x)")
        == "2026-11-25-dpo-step-time-vs-a-clip-step-126x"
    )
    assert slug("Why --swap_noise 0.5 (shapes.py)") == "why---swap_noise-05-shapespy"
    assert slug("relation 0.931 ± 0.005") == "relation-0931--0005"
    assert "evalpy-any-clip-any-benchmark" in anchors("README.md")  # code in a heading keeps its text


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    text = CODE.sub("", open(os.path.join(ROOT, page), encoding="utf-8").read())
    targets = LINK.findall(text)
    assert targets or page.startswith("docs/"), f"{page}: no links found (the pattern is wrong?)"
    for target in targets:
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        assert os.path.exists(os.path.join(ROOT, file)), f"{page}: ({target}): {file} does not exist"
        if anchor and file.endswith(".md"):
            assert anchor in anchors(file), f"{page}: ({target}): {file} has no heading with that anchor"


def test_readme_types_no_measured_figure_by_hand():
    """README's measurements come from committed results, between markers (bench/tools/methods_table.py
    --publish writes them, test_methods_table checks them): outside those blocks and code, no decimal
    figure and no wall clock (settings such as 1,750 steps are fine; a version pin is not a figure)"""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    text = re.sub(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", "", text, flags=re.S)
    text = CODE.sub("", re.sub(r"==[\d.]+", "", text))
    assert re.findall(r"(?<![\w./#-])\d*\.\d{2,}\b|\b\d+:\d\d\b", text) == []


def test_the_rehearsal_table_is_its_committed_results():
    """docs/vsr.md's rehearsal table is bench/tools/rehearsal_table.py's, from bench/results/rehearsal/"""
    import importlib.util

    path = os.path.join(ROOT, "bench", "tools", "rehearsal_table.py")
    spec = importlib.util.spec_from_file_location("rehearsal_table", path)
    rt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    page = open(rt.PAGE, encoding="utf-8").read()
    block = page[page.index(rt.MARKERS[0]) + len(rt.MARKERS[0]) + 1 : page.index(rt.MARKERS[1])]
    assert block == rt.table(), (
        "docs/vsr.md's table is not its results: python bench/tools/rehearsal_table.py --publish"
    )
    # the recipe's row, by hand from its three vsr.json files
    acc = [
        json.load(open(os.path.join(rt.RESULTS, r, "vsr.json")))["vsr/acc"]
        for r in ("rec_s0", "rec_s1", "rec_s2")
    ]
    row = next(line for line in block.splitlines() if line.startswith("| the recipe (")).split(" | ")
    assert row[2] == f"{sum(acc) / 3:.3f} ± {(sum((a - sum(acc) / 3) ** 2 for a in acc) / 2) ** 0.5:.3f}"
