"""Every generated block of README.md and docs/*.md remade from the committed files under bench/results/,
in one command; nothing runs. Each block lies between `<!-- NAME:start -->` and `<!-- NAME:end -->`
and is made by the function BLOCKS names for it (tests/test_publish.py checks every block of the
pages against its files, and that no page holds a block BLOCKS does not know).

    python bench/tools/publish.py            # rewrite every block
    python bench/tools/publish.py --check    # exit 1, naming the stale blocks, if a page differs
"""

import argparse
import importlib.util
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(path):
    """a bench script as a module (bench/ is not a package)"""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mt = load("bench/tools/methods_table.py")
rehearsal = load("bench/tools/rehearsal_table.py")
gpu = load("bench/gpu.py")


def methods_table():
    return mt.table(json.load(open(os.path.join(mt.PUBLISHED, "results.json"))), quick=False)


def controls(make):
    folder = os.path.join(mt.PUBLISHED, "controls")
    return lambda: make(mt.load_controls(folder)) if os.path.isdir(folder) else None


# (page, block name, its text from the committed files; None: the page keeps what it has)
BLOCKS = [
    ("README.md", "methods-table", methods_table),  # bench/results/results.json
    ("README.md", "dpo-controls-summary", controls(mt.controls_summary)),  # bench/results/controls/
    ("README.md", "scale-table", gpu.readme_block),  # bench/results/{gpu,cpu_scaling}.json
    ("docs/clip_dpo.md", "dpo-controls", controls(mt.controls_table)),  # bench/results/controls/
    ("docs/vsr.md", "rehearsal-table", rehearsal.table),  # bench/results/rehearsal/
]


def block(text, name):
    """-> (start, end): the block's text is text[start:end], between its markers"""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    return text.index(start) + len(start) + 1, text.index(end)


def names(text):
    """every block name a page's markers open"""
    return re.findall(r"<!-- ([\w-]+):start -->", text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    args = p.parse_args(argv)
    stale = []
    for page, name, make in BLOCKS:
        path = os.path.join(ROOT, page)
        text = open(path).read()
        start, end = block(text, name)
        new = make()
        if new is None or text[start:end] == new:
            continue
        stale.append(f"{page}: {name}")
        if not args.check:
            with open(path + ".tmp", "w") as f:
                f.write(text[:start] + new + text[end:])
            os.replace(path + ".tmp", path)
    if args.check and stale:
        sys.exit("stale (python bench/tools/publish.py): " + ", ".join(stale))
    print(("stale: " if args.check else "rewritten: ") + (", ".join(stale) or "none"))


if __name__ == "__main__":
    main()
