"""bench/gpu.py, the prepared GPU benchmark, end to end on the CPU with its tiny config, so that the
command a lent GPU runs cannot rot: every row and column present, every number finite and positive."""

import json
import math
import os
import sys

import pytest
from helpers import ROOT, run

sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu  # noqa: E402

COLUMNS = ("ms_per_step", "images_per_s", "tflop_per_step", "mfu", "peak_memory_gib", "ratio_to_open_clip")


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_rows(rows, world):
    names = [r["row"] for r in rows if r["world"] == world]
    assert names == [label for label, _, _ in gpu.ROWS] + ["open_clip (tiny)"], names
    for r in rows:
        assert "error" not in r, r
        columns = COLUMNS if r["row"] in names[:-1] else ("ms_per_step", "images_per_s", "peak_memory_gib")
        assert all(positive(r[c]) for c in columns), r
    assert rows[-1]["ratio_to_open_clip"] == 1.0


@pytest.mark.slow
def test_tiny_benchmark_writes_every_row_and_column(tmp_path):
    out = tmp_path / "gpu.json"
    r = run(["bench/gpu.py", "--tiny", "--peak_flops", "1e12", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    result = json.load(open(out))
    check_rows(result["rows"], world=1)
    assert positive(result["eval"]["images_per_s"]) and positive(result["eval"]["texts_per_s"])
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| step | compile | GPUs | ms/step | images/s | MFU | peak memory")
    assert len(table) == 1 + len(gpu.ROWS) + 1 and "eval encode:" in r.stdout
    assert "torchrun" not in result  # one device: no scaling part


@pytest.mark.slow
def test_tiny_benchmark_under_torchrun_gives_the_scaling_efficiency(tmp_path):
    """--nproc 2 on the CPU: the torchrun part (2 gloo processes, DDP) that several GPUs run"""
    out = tmp_path / "gpu.json"
    r = run(["bench/gpu.py", "--tiny", "--peak_flops", "1e12", "--nproc", "2", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    ddp = json.load(open(out))["torchrun"]
    check_rows(ddp, world=2)
    assert all(positive(row["scaling_efficiency"]) for row in ddp)
    assert "scaling efficiency clip_scratch on 2 GPUs" in r.stdout


def test_base32_is_open_clips_vit_b_32():
    """the benchmark's minclip model is the architecture open_clip.create_model("ViT-B-32") builds"""
    import open_clip

    from model import model_config

    ours, theirs = model_config("base32", 224, 77), open_clip.get_model_config("ViT-B-32")
    assert ours["embed_dim"] == theirs["embed_dim"] and ours["text_cfg"] == theirs["text_cfg"]
    assert {k: ours["vision_cfg"][k] for k in theirs["vision_cfg"]} == theirs["vision_cfg"]
    assert ours["vision_cfg"]["head_width"] == 64  # open_clip's default: 12 heads at width 768


def test_readme_shows_the_committed_results_and_a_gpu_table_only_from_a_gpu(tmp_path):
    """README's block is readme_block() of bench/results/ (python bench/gpu.py --publish); the GPU table
    appears only from a GPU's gpu.json (a --tiny run's, on the CPU, is not a GPU figure); the CPU
    ratios are cpu_scaling.json's"""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start, end = readme.index(gpu.MARKERS[0]) + len(gpu.MARKERS[0]) + 1, readme.index(gpu.MARKERS[1])
    assert readme[start:end] == gpu.readme_block(), "README's block is stale: python bench/gpu.py --publish"
    cpu = {
        "what": "a test",
        "ms_per_step": {"1 process, K=1": 100.0, "2 gloo processes, K=1": 70.0, "1 process, K=4": 130.0},
        "two_processes_over_one": 0.7,
        "accum4_over_accum1_per_sample": 1.3,
        "memory_what": "m",
        "peak_rss_gib": {"K=1": 2.0, "K=4": 1.5},
    }
    json.dump(cpu, open(tmp_path / "cpu_scaling.json", "w"))
    json.dump({"device": "cpu", "rows": []}, open(tmp_path / "gpu.json", "w"))
    text = gpu.readme_block(str(tmp_path))
    assert text.startswith("On a GPU: not measured")
    assert "| 2 gloo processes, K=1 | 70 | 0.70 (step time) |" in text
    assert "| 1 process, K=4 | 130 | 1.30 (time per sample) |" in text and "K=4 1.50 GiB" in text
    row = {"row": "clip_scratch", "compile": False, "world": 1, "ms_per_step": 12.5, "images_per_s": 20480.0}
    row |= {"mfu": 0.41, "peak_memory_gib": 9.5, "ratio_to_open_clip": 0.97}
    g = {"device": "NVIDIA H100 80GB HBM3", "torch": "t", "model": "ViT-B-32", "batch_size": 256}
    json.dump(g | {"dtype": "bfloat16", "rows": [row]}, open(tmp_path / "gpu.json", "w"))
    text = gpu.readme_block(str(tmp_path))
    assert (
        text.startswith("On NVIDIA H100 80GB HBM3")
        and "| clip_scratch | off | 1 | 12.5 | 20480 | 41.0% | 9.50 | 0.97 |" in text
    )
