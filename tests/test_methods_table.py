"""bench/tools/methods_table.py: the table is the mean ± std of its runs, the runs are the scripts' own
commands (fine-tunes from the scratch checkpoint of their seed), and a finished table is not rerun."""

import importlib.util
import json
import os
import statistics
import subprocess
import sys

import pytest
from PIL import Image

import eval as ev
from model import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location(
    "methods_table", os.path.join(ROOT, "bench", "tools", "methods_table.py")
)
mt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mt)


def fake(method, seed, relation, wall):
    """a run's result whose every column has its own value (column i: 0.1 i + 0.02 seed; the relation as given),
    so a cell under the wrong column, or from the wrong seed, shows"""
    metrics = {k: 0.1 * i + 0.02 * seed for i, (k, _) in enumerate(mt.COLUMNS)} | {"probe/relation": relation}
    return {
        "method": method,
        "seed": seed,
        "wall_s": wall,
        "machine": {"device": "cpu", "cores": 2, "torch": "x"},
        "metrics": {"test": metrics, "world1": metrics | {"probe/relation": relation - 0.1}},
    }


def cells(text, method):
    """the table row of a method -> {column label: cell}"""
    head = [c.strip() for c in text.splitlines()[0].strip("|").split("|")]
    label = dict((m[0], m[1]) for m in mt.METHODS)[method]
    row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return dict(zip(head, (c.strip() for c in row.strip("|").split("|"))))


def test_table_rows_are_mean_and_std_over_seeds_by_hand():
    text = mt.table(
        [fake("scratch", 0, 0.5, 60), fake("dpo", 0, 0.9, 600), fake("dpo", 1, 0.7, 660)], quick=False
    )
    dpo, scratch = cells(text, "dpo"), cells(text, "scratch")
    # by hand: seeds 0 and 1 differ by 0.02 in every column, so mean 0.1 i + 0.01 and stdev 0.02 / sqrt(2) = 0.014
    assert {label: dpo[label] for _, label in mt.COLUMNS} == {
        "i2t R@1": "0.010 ± 0.014",
        "t2i R@1": "0.110 ± 0.014",
        "relation": "0.800 ± 0.141",
        "attribute swap": "0.310 ± 0.014",
        "statements/acc": "0.410 ± 0.014",
        "relation text cos": "0.510 ± 0.014",
    }
    # the other world: 0.8 and 0.6
    assert dpo["seeds"] == "0, 1" and dpo["relation, other worlds"] == "0.700 ± 0.141"
    assert dpo["wall clock"] == "10:30 ± 0:42"  # 630 s ± 42.4 s
    assert scratch["seeds"] == "0" and scratch["relation"] == "0.500" and scratch["attribute swap"] == "0.300"


def test_finetunes_start_from_their_seeds_scratch_checkpoint(tmp_path):
    runs = {name: (argv, needs) for name, _, _, argv, needs in mt.commands([0, 1], False, str(tmp_path))}
    assert set(runs) == {f"{m[0]}_s{s}" for m in mt.METHODS for s in (0, 1)}
    for name, (argv, needs) in runs.items():
        seed = name[-1]
        assert argv[argv.index("--seed") + 1] == seed and argv[-1] == "--resume"
        if name.startswith(("hardneg", "dpo")):
            assert needs == f"scratch_s{seed}" and argv[argv.index("--init") + 1] == str(
                tmp_path / f"scratch_s{seed}" / "ckpt.pt"
            )
        else:
            assert needs is None and "--init" not in argv


def test_readme_shows_the_published_table_of_the_published_results():
    readme, start, end = mt.readme_table()
    published = open(os.path.join(mt.PUBLISHED, "table.md")).read()
    assert readme[start:end] == published, (
        "README's table is not bench/results/table.md: run bench/tools/methods_table.py --publish"
    )
    results = json.load(open(os.path.join(mt.PUBLISHED, "results.json")))
    assert sorted(r["name"] for r in results) == sorted(f"{m[0]}_s{s}" for m in mt.METHODS for s in (0, 1, 2))
    # every cell recomputed here from results.json, the naive way
    for method, *_ in mt.METHODS:
        runs = sorted((r for r in results if r["method"] == method), key=lambda r: r["seed"])
        row = cells(published, method)
        assert row["seeds"] == ", ".join(str(r["seed"]) for r in runs)
        for key, label in mt.COLUMNS:
            values = [r["metrics"]["test"][key] for r in runs]
            assert row[label] == f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}", (
                method,
                label,
            )
        other = [r["metrics"][w]["probe/relation"] for r in runs for w in ("world1", "world2")]
        assert (
            row["relation, other worlds"] == f"{statistics.mean(other):.3f} ± {statistics.stdev(other):.3f}"
        )
    # the plot README shows is a picture
    with Image.open(os.path.join(mt.PUBLISHED, "probes_vs_step.png")) as im:
        assert "bench/results/probes_vs_step.png" in readme and im.size[0] > 300


def test_publish_replaces_only_the_text_between_the_markers(tmp_path, monkeypatch):
    monkeypatch.setattr(mt, "PUBLISHED", str(tmp_path / "results"))
    (tmp_path / "run").mkdir()
    for name, text in [("table.md", "| new |\n"), ("results.json", "[]"), ("a.png", "png")]:
        (tmp_path / "run" / name).write_text(text)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n{mt.MARKERS[0]}\n| old |\n| old |\n{mt.MARKERS[1]}\nafter\n")
    mt.publish(str(tmp_path / "run"), "| new |\n", ["a.png"], path=str(readme))
    assert readme.read_text() == f"# title\n{mt.MARKERS[0]}\n| new |\n{mt.MARKERS[1]}\nafter\n"
    text, start, end = mt.readme_table(str(readme))
    assert text[start:end] == "| new |\n" and (tmp_path / "results" / "a.png").read_text() == "png"


@pytest.mark.slow
def test_the_table_end_to_end_and_resumed(tmp_path):
    out = tmp_path / "t"
    cmd = [
        sys.executable,
        "bench/tools/methods_table.py",
        "--quick",
        "--methods",
        "scratch",
        "dpo",
        "--out_dir",
        str(out),
        "--eval_n",
        "40",
        "--extra",
        "--max_steps 4 --batch_size 8 --eval_every 0 --eval_n 40 --log_every 2 --ckpt_every 0",
    ]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    results = json.load(open(out / "results.json"))
    assert [r["name"] for r in results] == ["scratch_s0", "dpo_s0"]
    dpo = results[1]
    assert f"--init {out / 'scratch_s0' / 'ckpt.pt'}" in dpo["command"] and dpo["steps"] == 4
    assert (
        set(dpo["metrics"]) == {"test", "world1", "world2"}
        and dpo["metrics"]["test"] != dpo["metrics"]["world1"]
    )
    # the run's metrics are the checkpoint's own, evaluated here in process on the same worlds
    model, _, tokenizer = load_model(str(out / "dpo_s0" / "ckpt.pt"))
    for world, seed in (("test", None), ("world2", 2)):
        want = ev.eval_shapes(model, tokenizer, model.image_size, "cpu", n=40, seed=seed)
        assert {k: dpo["metrics"][world][k] for k in want} == pytest.approx(want, abs=1e-6), world
    table = open(out / "table.md").read()
    for key, label in mt.COLUMNS:  # one seed: each cell is its run's value, under its own column
        assert cells(table, "dpo")[label] == f"{dpo['metrics']['test'][key]:.3f}", label
    stamp = os.path.getmtime(out / "dpo_s0" / "result.json")
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "2 of 2 runs already finished" in again.stdout
    assert (
        os.path.getmtime(out / "dpo_s0" / "result.json") == stamp and open(out / "table.md").read() == table
    )
