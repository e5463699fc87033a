"""bench/tools/publish.py: every generated block of the pages is its committed files' text, and no page
holds a block that nothing makes."""

import glob
import importlib.util
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("publish", os.path.join(ROOT, "bench", "tools", "publish.py"))
pub = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pub)
PAGES = [
    "README.md",
    *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))),
]


def test_every_block_of_every_page_is_made_from_its_files():
    known = {(page, name) for page, name, _ in pub.BLOCKS}
    found = {(page, name) for page in PAGES for name in pub.names(open(os.path.join(ROOT, page)).read())}
    assert found == known, (
        f"blocks no function makes: {found - known}; missing from their page: {known - found}"
    )
    for page, name, make in pub.BLOCKS:
        text, want = open(os.path.join(ROOT, page)).read(), make()
        start, end = pub.block(text, name)
        if want is not None:  # None: no files yet (the controls grid before its first run)
            assert text[start:end] == want, f"{page}'s {name} is stale: python bench/tools/publish.py"


def test_publish_rewrites_a_stale_block_and_check_names_it(tmp_path, monkeypatch, capsys):
    for page in PAGES:
        os.makedirs(tmp_path / os.path.dirname(page), exist_ok=True)
        shutil.copyfile(os.path.join(ROOT, page), tmp_path / page)
    monkeypatch.setattr(pub, "ROOT", str(tmp_path))
    readme = (tmp_path / "README.md").read_text()
    start, end = pub.block(readme, "methods-table")
    (tmp_path / "README.md").write_text(readme[:start] + "| typed by hand |\n" + readme[end:])
    with pytest.raises(SystemExit) as e:
        pub.main(["--check"])
    assert e.value.code == "stale (python bench/tools/publish.py): README.md: methods-table"
    assert "typed by hand" in (tmp_path / "README.md").read_text()  # --check changes nothing
    pub.main([])
    assert (tmp_path / "README.md").read_text() == readme and capsys.readouterr().out.endswith(
        "rewritten: README.md: methods-table\n"
    )
    pub.main(["--check"])
    assert capsys.readouterr().out == "stale: none\n"
