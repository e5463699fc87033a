"""The scripts as a user with real data runs them: one flag vocabulary, one-line refusals before any
model is built, a real start for real data, out_dir never silently reused, loss lines in
metrics.jsonl, --epochs turned into steps."""
import json
import math
import os
import time

import pytest

import clip_dpo
import clip_hardneg
import model
from conftest import FIX, run, statement_rates, tiny_ckpt, vsr_rates
from model import CLIP, init_geometry, load_clip, model_config

SCRIPTS = ("clip_scratch.py", "clip_hardneg.py", "clip_dpo.py")


@pytest.mark.slow
@pytest.mark.parametrize("script, argv, message", [
    ("clip_dpo.py", ["--data", "vsr", "--data_root", "x"], "error: --data vsr needs --init: a pretrained CLIP, e.g. --init ViT-B-32:openai"),
    ("clip_hardneg.py", ["--data", "coco", "--data_root", "x"], "error: --data coco needs --init"),
    ("clip_dpo.py", ["--data", "imagenet"], "error: argument --data: invalid choice: 'imagenet' (choose from 'shapes', 'vsr'"),
    ("clip_scratch.py", ["--data", "imagenet"], "error: argument --data: invalid choice: 'imagenet'"),
    ("clip_hardneg.py", ["--threshold", "fixed"], "error: unrecognized arguments: --threshold fixed"),
    ("eval.py", ["--model", "x", "--bench", "nope"], "error: argument --bench: invalid choice: 'nope'"),
    ("clip_scratch.py", ["--epochs", "3"], "error: --epochs: the shapes world is an endless stream; give --max_steps"),
])
def test_bad_flags_are_one_line_before_anything_runs(script, argv, message):
    r = run([script, *argv])
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(message) and r.stderr.count("\n") == 1 and f"(python {script} --help)" in r.stderr, r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("script", [*SCRIPTS, "eval.py"])
def test_help_shows_the_defaults(script):
    r = run([script, "--help"])
    assert r.returncode == 0 and "(default: " in r.stdout
    assert ("--eval_n" in r.stdout) and ("--overwrite" in r.stdout or script == "eval.py")


def test_a_name_without_its_pretrained_tag_is_refused_with_the_tags():
    with pytest.raises(SystemExit) as e:
        load_clip("ViT-B-32")
    assert e.value.code.startswith("error: --init ViT-B-32: no PRETRAINED tag, so its weights would be random: give "
                                   "NAME:PRETRAINED, one of ViT-B-32:openai, ")


def test_offline_weights_fail_at_once_in_one_line(monkeypatch):
    import socket

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)

    def no_network(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(socket, "create_connection", no_network)
    t = time.time()
    with pytest.raises(SystemExit) as e:
        load_clip("ViT-B-32:openai")
    assert time.time() - t < 5 and "\n" not in e.value.code
    assert e.value.code.startswith("error: --init ViT-B-32:openai: its weights are not in the local cache (")
    assert "cannot be reached (offline?)" in e.value.code


def test_the_data_is_checked_before_any_model_is_built(tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("a model was built before the data was checked")
    monkeypatch.setattr(clip_dpo, "load_clip", no_model)
    monkeypatch.setattr(clip_hardneg, "load_clip", no_model)
    assert init_geometry("ViT-B-32:openai") == (224, 77)  # from open_clip's config: nothing downloaded
    with pytest.raises(SystemExit, match=r"^error: --data_root .*nowhere: no such directory"):
        clip_dpo.main(["--data", "vsr", "--data_root", str(tmp_path / "nowhere"), "--init", "ViT-B-32:openai",
                       "--out_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match=r"^error: .*nowhere"):
        clip_hardneg.main(["--data", "coco", "--data_root", str(tmp_path / "nowhere"), "--init", "ViT-B-32:openai",
                           "--out_dir", str(tmp_path / "o")])


def test_init_geometry_reads_each_kind_of_spec(tmp_path):
    path = tiny_ckpt(tmp_path / "c.pt", 48, 24)
    assert init_geometry(path) == (48, 24)
    model.export_open_clip(CLIP(**model_config("tiny", 40, 20)), model_config("tiny", 40, 20), str(tmp_path / "hub"))
    assert init_geometry(f"local-dir:{tmp_path / 'hub'}") == (40, 20)
    assert init_geometry(str(tmp_path / "missing.pt")) is None and init_geometry("NoSuchModel:x") is None


@pytest.mark.slow
def test_out_dir_is_never_silently_reused(tmp_path):
    out = str(tmp_path / "out")
    base = ["clip_scratch.py", "--max_steps", "2", "--batch_size", "8", "--image_size", "32", "--eval_n", "20",
            "--log_every", "1", "--out_dir", out]
    assert run(base).returncode == 0
    first = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [(r["step"], r["split"]) for r in first] == [(0, "test"), (1, "train"), (2, "train"), (2, "test")]
    assert all(math.isfinite(r["loss"]) and "acc" in r and "lr" in r for r in first if r["split"] == "train")
    r = run(base)
    assert r.returncode == 1 and r.stderr.strip() == (f"error: {out}/ckpt.pt exists: --resume continues it, --overwrite "
                                                      "starts over (or pick another --out_dir)")
    assert run([*base, "--overwrite", "--max_steps", "3"]).returncode == 0
    again = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [(r["step"], r["split"]) for r in again] == [(0, "test"), (1, "train"), (2, "train"), (3, "train"), (3, "test")]
    r = run([*base, "--resume", "--max_steps", "4"])
    assert r.returncode == 0 and "resumed from" in r.stdout and "| eta 0:00:00" in r.stdout
    resumed = [(r["step"], r["split"]) for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))]
    assert resumed == [(0, "test"), (1, "train"), (2, "train"), (3, "train"), (3, "test"), (4, "train"), (4, "test")]


@pytest.mark.slow
def test_wandb_is_asked_for_by_name_only_when_wanted(tmp_path):
    import importlib.util
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    r = run(["clip_scratch.py", "--max_steps", "1", "--batch_size", "8", "--image_size", "32", "--eval_n", "20",
             "--wandb", "minclip", "--out_dir", str(tmp_path / "o")])
    assert r.returncode == 1 and r.stderr.strip() == "error: --wandb needs the wandb package: pip install wandb"


@pytest.mark.slow
def test_real_data_runs_epochs_and_says_how_many_steps(tmp_path):
    init = tiny_ckpt(tmp_path / "init.pt")
    r = run(["clip_hardneg.py", "--data", "coco", "--data_root", os.path.join(FIX, "coco"), "--init", init, "--epochs", "2",
             "--batch_size", "2", "--eval_n", "20", "--workers", "0", "--log_every", "1", "--out_dir", str(tmp_path / "o")])
    assert r.returncode == 0, r.stderr
    n = int(r.stdout.split(" epochs of ")[1].split(" items")[0])
    steps = math.ceil(2 * n / 2)
    assert f"| {steps} steps = 2 epochs of {n} items |" in r.stdout and f"step {steps}/{steps} |" in r.stdout
    args = clip_hardneg.get_args(["--data", "coco", "--data_root", "x", "--init", init])
    assert (args.epochs, args.batch_size, args.max_steps, args.lr) == (5, 256, None, 1e-5)  # NegCLIP's setting
    args = clip_dpo.get_args(["--init", init])
    assert (args.epochs, args.batch_size, args.max_steps) == (None, 26, 3000)  # the shapes world: steps


@pytest.mark.slow
def test_eval_n_is_one_flag_everywhere(tmp_path):
    path = tiny_ckpt(tmp_path / "c.pt")
    for flag in ("--eval_n", "--n"):  # eval.py keeps its old spelling as an alias
        r = run(["eval.py", "--model", path, flag, "30", "--json", str(tmp_path / "m.json")])
        assert r.returncode == 0, r.stderr
        m = json.load(open(tmp_path / "m.json"))
        assert set(statement_rates(m)) == {"statements/acc", "statements/macro_f1"} and not vsr_rates(m) and abs(m["retrieval/t2i_r10"] * 30 - round(m["retrieval/t2i_r10"] * 30)) < 1e-6  # 30 scenes
