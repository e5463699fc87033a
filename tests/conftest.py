"""The suite's fixtures. The shared helpers are tests/helpers.py (a module the test files import)."""

import os

import pytest
from helpers import ROOT


def _tree(folder):
    """{path: (size, mtime)} of every file under folder ({} if there is none)"""
    return {
        os.path.join(d, f): (os.stat(os.path.join(d, f)).st_size, os.stat(os.path.join(d, f)).st_mtime_ns)
        for d, _, files in os.walk(folder)
        for f in files
    }


@pytest.fixture(autouse=True)
def repository_out_untouched():
    """No test reads or writes the repository's out/, where a user's own runs live (README's main job
    writes out/clip_scratch/ckpt.pt): every test gives its runs an --out_dir under tmp_path. A test
    that writes there fails here, by name."""
    before = _tree(os.path.join(ROOT, "out"))
    yield
    after = _tree(os.path.join(ROOT, "out"))
    changed = sorted(set(before.items()) ^ set(after.items()))
    assert not changed, (
        f"this test changed the repository's out/: {', '.join(sorted({p for p, _ in changed})[:3])}"
    )
