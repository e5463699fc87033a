"""bench/tools/export_shapes.py: the shapes world written in Flickr8k's and VSR's layouts round-trips
through the real readers, the image loader, and the scripts' real-data path."""

import json
import os
import random
import sys

import numpy as np
import pytest
from helpers import ROOT, VSR_RATES, eval_lines, run, run_here, vsr_rates

import clip_dpo
import data
import shapes

sys.path.insert(0, os.path.join(ROOT, "bench", "tools"))
import export_shapes  # noqa: E402


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    export_shapes.main(
        ["--out", str(out), "--flickr8k", "300", "--vsr", "200", "--image_size", "48", "--seed", "3"]
    )
    return out


def test_flickr8k_export_reads_back_scene_for_scene(export):
    splits = data.read_flickr8k(str(export / "flickr8k"))
    # 1000 / 8091 of 300 each
    assert {k: len(v) for k, v in splits.items()} == {"train": 226, "val": 37, "test": 37}
    by_name = {os.path.basename(path): caps for items in splits.values() for path, caps in items}
    for i in (0, 40, 299):
        rng = shapes.scene_rng("export-flickr8k", 3, i)
        scene = shapes.sample_scene(rng)
        assert by_name[f"{i:010d}_shapes.jpg"] == export_shapes.five_captions(scene, rng)
        pixels = data.load_image(str(export / "flickr8k" / "Images" / f"{i:010d}_shapes.jpg"), 48)
        assert np.abs(pixels.astype(float) - shapes.render(scene, 48)).mean() < 6  # jpeg, quality 95


def test_vsr_export_reads_back_with_true_and_false_rows(export):
    vsr = data.read_vsr(str(export / "vsr"))
    assert {k: len(v) for k, v in vsr.items()} == {"train": 140, "dev": 20, "test": 40}
    for split, rows in vsr.items():
        # a true statement and its false converse per scene
        assert sum(r.label for r in rows) * 2 == len(rows)
        assert all(
            os.path.dirname(r.image).endswith("train2017" if split == "train" else "val2017") for r in rows
        )
    row = random.Random(0).choice(vsr["test"])
    i = int(os.path.basename(row.image)[:-4])
    scene = shapes.sample_scene(shapes.scene_rng("export-vsr", 3, i))
    assert (row.caption, row.label) in shapes.statements(scene)
    assert (
        data.contrast_caption(row.caption, row.relation)
        == [t for t, _ in shapes.statements(scene) if t != row.caption][0]
    )


@pytest.mark.slow
def test_the_scripts_run_on_the_export(export, tmp_path):
    """the real-data path on the export: each script's final test eval is what eval.py scores on the export
    for the checkpoint it wrote, and the groups are VSR's rows as vsr_groups makes them"""
    r = run(
        [
            "clip_scratch.py",
            "--data",
            "flickr8k",
            "--data_root",
            str(export / "flickr8k"),
            "--image_size",
            "32",
            "--batch_size",
            "64",
            "--max_steps",
            "2",
            "--cache_images",
            "--workers",
            "0",
            "--log_every",
            "1",
            "--out_dir",
            str(tmp_path / "scratch"),
        ]
    )
    assert r.returncode == 0, r.stderr
    assert os.path.exists(tmp_path / "scratch" / "cache_flickr8k_train_32.u8")
    scratch = eval_lines(r.stdout)[-1]
    r = run(
        [
            "clip_dpo.py",
            "--data",
            "vsr",
            "--data_root",
            str(export / "vsr"),
            "--init",
            str(tmp_path / "scratch" / "ckpt.pt"),
            "--epochs",
            "1",
            "--batch_size",
            "32",
            "--workers",
            "0",
            "--log_every",
            "1",
            "--out_dir",
            str(tmp_path / "dpo"),
        ]
    )
    assert r.returncode == 0, r.stderr
    groups = int(r.stdout.split(" train rows -> ")[1].split(" preference groups")[0])
    assert groups == len(clip_dpo.vsr_groups(data.read_vsr(str(export / "vsr"))["train"])[0])
    assert (
        f"| 1 epochs of {groups:,} items = {groups // 32} steps ({groups // 32} an epoch) of global batch 32 (1 x 32) |"
        in r.stdout
    )
    dpo = eval_lines(r.stdout)[-1]
    assert set(vsr_rates(dpo)) == set(VSR_RATES)
    for ckpt, bench, printed in (
        (tmp_path / "scratch" / "ckpt.pt", "flickr8k", scratch),
        (tmp_path / "dpo" / "ckpt.pt", "vsr", dpo),
    ):
        e = run_here(
            [
                "eval.py",
                "--model",
                str(ckpt),
                "--bench",
                bench,
                "--data_root",
                str(export / bench),
                "--json",
                str(tmp_path / "m.json"),
            ]
        )
        assert e.returncode == 0, e.stderr
        scored = json.load(open(tmp_path / "m.json"))
        # printed to 3 decimals
        assert {k: round(scored[k], 3) for k in printed} == pytest.approx(printed, abs=1.5e-3), bench
