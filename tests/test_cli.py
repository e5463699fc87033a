"""The scripts as a user with real data runs them: one flag vocabulary, one-line refusals before any
model is built, a real start for real data, out_dir never silently reused, loss lines in
metrics.jsonl, --epochs turned into steps."""

import json
import math
import os
import re
import time

import pytest
from helpers import FIX, run, run_here, statement_rates, tiny_ckpt, vsr_rates

import clip_dpo
import clip_hardneg
import eval as ev
import model
import training
from model import CLIP, init_geometry, load_clip, load_model, model_config

SCRIPTS = ("clip_scratch.py", "clip_hardneg.py", "clip_dpo.py")


@pytest.mark.parametrize(
    "script, argv, message",
    [
        (
            "clip_dpo.py",
            ["--data", "vsr", "--data_root", "x"],
            "error: --data vsr needs --init: a pretrained CLIP, e.g. --init ViT-B-32:openai",
        ),
        ("clip_hardneg.py", ["--data", "coco", "--data_root", "x"], "error: --data coco needs --init"),
        (
            "clip_dpo.py",
            ["--data", "imagenet"],
            "error: argument --data: invalid choice: 'imagenet' (choose from 'shapes', 'vsr'",
        ),
        ("clip_scratch.py", ["--data", "imagenet"], "error: argument --data: invalid choice: 'imagenet'"),
        ("clip_hardneg.py", ["--threshold", "fixed"], "error: unrecognized arguments: --threshold fixed"),
        ("eval.py", ["--model", "x", "--bench", "nope"], "error: argument --bench: invalid choice: 'nope'"),
        (
            "clip_scratch.py",
            ["--epochs", "3"],
            "error: --epochs: the shapes world is an endless stream; give --max_steps",
        ),
    ],
)
def test_bad_flags_are_one_line_before_anything_runs(script, argv, message):
    r = run_here([script, *argv])
    assert r.returncode == 2 and r.stdout == ""
    assert (
        r.stderr.startswith(message) and r.stderr.count("\n") == 1 and f"(python {script} --help)" in r.stderr
    ), r.stderr


@pytest.mark.parametrize("script", [*SCRIPTS, "eval.py"])
def test_help_shows_the_defaults(script):
    r = run_here([script, "--help"])
    assert r.returncode == 0, r.stderr
    # argparse's block of options, one entry each
    options = r.stdout.split("\noptions:\n")[1].split("\n\n")[0]
    entries = [" ".join(e.split()) for e in re.split(r"\n(?=  -)", options)]  # wrapped lines joined
    assert len(entries) > 15 and ("--overwrite" in options or script == "eval.py")
    missing = [e.split()[0] for e in entries if "(default: " not in e and not e.lstrip().startswith("-h")]
    assert missing == [], f"{script} --help shows no default for {missing}"


def test_a_name_without_its_pretrained_tag_is_refused_with_the_tags():
    with pytest.raises(SystemExit) as e:
        load_clip("ViT-B-32")
    assert e.value.code.startswith(
        "error: --init ViT-B-32: no PRETRAINED tag, so its weights would be random: give "
        "NAME:PRETRAINED, one of ViT-B-32:openai, "
    )


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
    # OpenAI's weights are QuickGELU: as a file they load right only under the -quickgelu name (else every score changes)
    assert e.value.code.endswith("give a weights file as ViT-B-32-quickgelu:PATH")
    with pytest.raises(SystemExit) as e:
        load_clip("ViT-B-32:laion2b_s34b_b79k")  # trained with GELU: the plain name
    assert e.value.code.endswith("give a weights file as ViT-B-32:PATH")
    import open_clip

    assert model.file_arch(open_clip, "ViT-B-32-quickgelu", "metaclip_400m") == "ViT-B-32-quickgelu"


def test_the_data_is_checked_before_any_model_is_built(tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("a model was built before the data was checked")

    monkeypatch.setattr(clip_dpo, "load_clip", no_model)
    monkeypatch.setattr(clip_hardneg, "load_clip", no_model)
    assert init_geometry("ViT-B-32:openai") == (224, 77)  # from open_clip's config: nothing downloaded
    with pytest.raises(SystemExit, match=r"^error: --data_root .*nowhere: no such directory"):
        clip_dpo.main(
            [
                "--data",
                "vsr",
                "--data_root",
                str(tmp_path / "nowhere"),
                "--init",
                "ViT-B-32:openai",
                "--out_dir",
                str(tmp_path / "o"),
            ]
        )
    with pytest.raises(SystemExit, match=r"^error: .*nowhere"):
        clip_hardneg.main(
            [
                "--data",
                "coco",
                "--data_root",
                str(tmp_path / "nowhere"),
                "--init",
                "ViT-B-32:openai",
                "--out_dir",
                str(tmp_path / "o"),
            ]
        )


def test_init_geometry_reads_each_kind_of_spec(tmp_path):
    path = tiny_ckpt(tmp_path / "c.pt", 48, 24)
    assert init_geometry(path) == (48, 24)
    model.export_open_clip(
        CLIP(**model_config("tiny", 40, 20)), model_config("tiny", 40, 20), str(tmp_path / "hub")
    )
    assert init_geometry(f"local-dir:{tmp_path / 'hub'}") == (40, 20)
    assert init_geometry(str(tmp_path / "missing.pt")) is None and init_geometry("NoSuchModel:x") is None


@pytest.mark.slow
def test_out_dir_is_never_silently_reused(tmp_path):
    out = str(tmp_path / "out")
    base = [
        "clip_scratch.py",
        "--max_steps",
        "2",
        "--batch_size",
        "8",
        "--image_size",
        "32",
        "--eval_n",
        "20",
        "--log_every",
        "1",
        "--out_dir",
        out,
    ]
    assert run(base).returncode == 0
    first = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [(r["step"], r["split"]) for r in first] == [(0, "test"), (1, "train"), (2, "train"), (2, "test")]
    assert all(math.isfinite(r["loss"]) and "acc" in r and "lr" in r for r in first if r["split"] == "train")
    r = run_here(base)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: {out}/ckpt.pt exists: --resume continues it, --overwrite "
        "starts over (or pick another --out_dir)"
    )
    assert run([*base, "--overwrite", "--max_steps", "3"]).returncode == 0
    again = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [(r["step"], r["split"]) for r in again] == [
        (0, "test"),
        (1, "train"),
        (2, "train"),
        (3, "train"),
        (3, "test"),
    ]
    r = run([*base, "--resume", "--max_steps", "4"])
    assert r.returncode == 0 and "resumed from" in r.stdout and "| eta 0:00:00" in r.stdout
    resumed = [(r["step"], r["split"]) for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))]
    assert resumed == [
        (0, "test"),
        (1, "train"),
        (2, "train"),
        (3, "train"),
        (3, "test"),
        (4, "train"),
        (4, "test"),
    ]


@pytest.mark.slow
def test_wandb_is_asked_for_by_name_only_when_wanted(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    r = run(
        [
            "clip_scratch.py",
            "--max_steps",
            "1",
            "--batch_size",
            "8",
            "--image_size",
            "32",
            "--eval_n",
            "20",
            "--wandb",
            "minclip",
            "--out_dir",
            str(tmp_path / "o"),
        ]
    )
    assert (
        r.returncode == 1 and r.stderr.strip() == "error: --wandb needs the wandb package: pip install wandb"
    )


@pytest.mark.slow
def test_real_data_runs_epochs_and_says_how_many_steps(tmp_path):
    init = tiny_ckpt(tmp_path / "init.pt")
    r = run(
        [
            "clip_hardneg.py",
            "--data",
            "coco",
            "--data_root",
            os.path.join(FIX, "coco"),
            "--init",
            init,
            "--epochs",
            "2",
            "--batch_size",
            "2",
            "--eval_n",
            "20",
            "--workers",
            "0",
            "--log_every",
            "1",
            "--out_dir",
            str(tmp_path / "o"),
        ]
    )
    assert r.returncode == 0, r.stderr
    n = int(r.stdout.split(" epochs of ")[1].split(" items")[0])
    per_epoch, steps = n // 2, 2 * (n // 2)
    assert (
        f"| 2 epochs of {n} items = {steps} steps ({per_epoch} an epoch) of global batch 2 (1 x 2) | warmup 1 steps | "
        f"eval every {per_epoch} steps, checkpoint every {per_epoch} steps |"
    ) in r.stdout
    # a dev eval after epoch 1
    assert f"step {steps}/{steps} |" in r.stdout and f"eval val step {per_epoch} (" in r.stdout
    args = clip_hardneg.get_args(["--data", "coco", "--data_root", "x", "--init", init])
    # NegCLIP's setting
    assert (args.epochs, args.batch_size, args.max_steps, args.lr) == (5, 256, None, 1e-5)
    args = clip_dpo.get_args(["--init", init])
    assert (args.epochs, args.batch_size, args.max_steps) == (None, 26, 3000)  # the shapes world: steps


@pytest.mark.slow
def test_eval_n_is_one_flag_everywhere(tmp_path):
    path = tiny_ckpt(tmp_path / "c.pt")
    for flag in ("--eval_n", "--n"):  # eval.py keeps its old spelling as an alias
        r = run_here(["eval.py", "--model", path, flag, "30", "--json", str(tmp_path / "m.json")])
        assert r.returncode == 0, r.stderr
        m = json.load(open(tmp_path / "m.json"))
        assert set(statement_rates(m)) == {"statements/acc", "statements/macro_f1"} and not vsr_rates(m)
        # the metrics of exactly 30 scenes: eval_shapes on 30 in process gives every value, and 40 would not
        model, _, tokenizer = load_model(path)
        want = ev.eval_shapes(model, tokenizer, model.image_size, "cpu", n=30)
        assert {k: m[k] for k in want} == pytest.approx(want, abs=1e-6), flag
        assert {k: m[k] for k in want} != pytest.approx(
            ev.eval_shapes(model, tokenizer, model.image_size, "cpu", n=40), abs=1e-6
        )


def test_what_a_flag_can_fix_is_reported_before_an_existing_run(tmp_path, capsys):
    """a user with a trained run in out_dir who mistypes a flag is told about the flag, not the checkpoint"""
    import clip_scratch

    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"a trained run")
    init, o = tiny_ckpt(tmp_path / "init.pt"), ["--out_dir", str(out)]
    for main, argv, message in [
        (
            clip_scratch.main,
            ["--data", "flickr8k", "--data_root", str(tmp_path / "nowhere")],
            "nowhere: no such directory",
        ),
        (clip_scratch.main, ["--data", "flickr8k"], "--data flickr8k needs --data_root"),
        (clip_hardneg.main, ["--init", str(tmp_path / "missing.pt")], "missing.pt: no such checkpoint file"),
        (
            clip_dpo.main,
            ["--data", "vsr", "--data_root", str(tmp_path / "nowhere"), "--init", init],
            "nowhere: no such directory",
        ),
        (
            clip_dpo.main,
            [
                "--data",
                "vsr",
                "--data_root",
                os.path.join(FIX, "vsr"),
                "--init",
                init,
                "--workers",
                "0",
                "--batch_size",
                "1000",
            ],
            "< global batch 1000 (--batch_size)",
        ),
        (clip_dpo.main, ["--init", init, "--alpha", "2"], "--alpha 2.0: must be in [0, 1]"),
        # the flags are fine: now it is the run
        (clip_dpo.main, ["--init", init], "ckpt.pt exists: --resume continues it"),
    ]:
        with pytest.raises(SystemExit) as e:
            main([*argv, *o])
        said = str(e.value.code) + capsys.readouterr().err
        assert message in said and ("exists" in message or "exists" not in said), (argv, said)


@pytest.mark.parametrize("world", [1, 2, 8])
def test_the_schedule_is_in_epochs_whatever_the_world_size(world):
    """VSR's 7,033 training groups, 5 epochs of 64 groups a process: every world size trains 5 whole
    epochs (StepBatches' epoch: items // global batch steps), warms up over 5% of them and evaluates
    and checkpoints at the end of each epoch"""
    from argparse import Namespace

    args = Namespace(
        batch_items=64, epochs=5, max_steps=None, warmup_steps=None, eval_every=None, ckpt_every=None
    )
    plan = training.schedule(args, 7033, world)
    per_epoch = 7033 // (64 * world)  # 109, 54, 13
    assert args.max_steps == 5 * per_epoch and args.eval_every == args.ckpt_every == per_epoch
    assert args.warmup_steps == max(1, round(0.05 * args.max_steps)) < per_epoch
    evals = [s for s in range(1, args.max_steps) if s % args.eval_every == 0]
    assert evals == [per_epoch * e for e in (1, 2, 3, 4)]  # and the final one at the end
    assert plan.startswith(
        f"5 epochs of 7,033 items = {5 * per_epoch} steps ({per_epoch} an epoch) of global batch {64 * world} "
        f"({world} x 64) | warmup {args.warmup_steps} steps | eval every {per_epoch} steps"
    )
    # --max_steps overrides the epochs, and the line says what it makes; given flags stay as given
    args = Namespace(batch_items=64, epochs=5, max_steps=3, warmup_steps=None, eval_every=0, ckpt_every=None)
    assert training.schedule(args, 7033, world).startswith(
        f"{3 / per_epoch:.3g} epochs of 7,033 items = 3 steps"
    )
    assert (args.max_steps, args.eval_every, args.warmup_steps) == (3, 0, 1)
    # the shapes world, an endless stream: the flags as they are
    args = Namespace(
        batch_items=26, epochs=None, max_steps=3000, warmup_steps=50, eval_every=500, ckpt_every=250
    )
    assert training.schedule(args, None, world) == (
        f"3000 steps of global batch {26 * world} ({world} x 26) | warmup 50 steps | "
        "eval every 500 steps, checkpoint every 250 steps"
    )


@pytest.mark.slow
def test_under_torchrun_an_error_is_said_once_and_every_rank_exits_alike(tmp_path):
    from helpers import torchrun

    for argv, message in [
        (
            [
                "--data",
                "vsr",
                "--data_root",
                str(tmp_path / "nowhere"),
                "--init",
                tiny_ckpt(tmp_path / "i.pt"),
            ],
            f"error: --data_root {tmp_path / 'nowhere'}: no such directory",
        ),
        (["--alpha", "2"], "error: --alpha 2.0: must be in [0, 1]"),
    ]:
        r = torchrun(["clip_dpo.py", *argv, "--out_dir", str(tmp_path / "o")])
        # (torchrun adds its own ChildFailedError)
        assert r.returncode != 0 and r.stderr.count(message) == 1, r.stderr
        codes = [
            line.split(":")[1].split()[0]
            for line in r.stderr.splitlines()
            if line.strip().startswith("exitcode")
        ]
        # torchrun's summary: each rank's own exit, none SIGTERMed
        assert codes == [codes[0]] * 2 and codes[0] in ("1", "2"), r.stderr
