"""clip_scratch.py: the loss against a naive loop, the model against open_clip, and the CLI's
distributed, resume and failure paths run for real (tiny settings, CPU)."""

import os

import open_clip
import pytest
import torch
from helpers import (
    TINY,
    fixture_copy,
    killed_and_resumed,
    load_weights,
    one_and_two_processes,
    run,
    run_here,
    torchrun,
)

import data
from clip_scratch import clip_loss
from model import CLIP, model_config, param_groups


def naive_clip_loss(v, t, scale):
    n, loss = len(v), 0.0
    for i in range(n):
        row = torch.stack([scale * v[i] @ t[j] for j in range(n)])
        col = torch.stack([scale * t[i] @ v[j] for j in range(n)])
        loss = loss - torch.log_softmax(row, 0)[i] - torch.log_softmax(col, 0)[i]
    return loss / (2 * n)


def test_clip_loss_matches_naive_loop():
    torch.manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(7, 5, dtype=torch.float64), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(7, 5, dtype=torch.float64), dim=-1)
    loss, acc = clip_loss(v, t, torch.tensor(13.0, dtype=torch.float64))
    assert torch.allclose(loss.double(), naive_clip_loss(v.float(), t.float(), 13.0).double(), atol=1e-5)
    # perfectly aligned features with a large scale -> loss near 0, accuracy 1
    loss, acc = clip_loss(torch.eye(4), torch.eye(4), torch.tensor(100.0))
    assert loss.item() < 1e-6 and acc.item() == 1.0


def test_model_equals_open_clip_and_loads_strict():
    torch.manual_seed(0)
    cfg = model_config("tiny", 32, 32)
    ours = CLIP(**cfg).eval()
    theirs = open_clip.CLIP(**cfg).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    images = torch.randn(3, 3, 32, 32)
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=32)(
        ["a red circle left of a blue square", "x", ""]
    )
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(images), theirs.encode_image(images), atol=1e-5)
        assert torch.allclose(ours.encode_text(tokens), theirs.encode_text(tokens), atol=1e-5)


def test_param_groups_decay_and_text_lr():
    model = CLIP(**model_config("tiny", 32, 32))
    groups = param_groups(model, 0.1, text_lr_mult=0.5)
    by_name = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g["params"]:
            name = by_name[id(p)]
            assert g["weight_decay"] == (0.1 if p.ndim >= 2 else 0.0), name
            assert g["lr_mult"] == (1.0 if name.startswith("visual.") or name == "logit_scale" else 0.5), name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.slow
def test_torchrun_two_cpu_processes_equal_one_process_full_batch(tmp_path):
    """DDP property: 2 gloo ranks x batch 4 == 1 process x batch 8, through the real CLI
    (same data keys, gathered loss, averaged gradients)."""
    common = [
        "--max_steps",
        "3",
        "--image_size",
        "32",
        "--eval_every",
        "0",
        "--eval_n",
        "20",
        "--lr",
        "1e-3",
        "--warmup_steps",
        "1",
    ]
    _, one, two = one_and_two_processes(tmp_path, "clip_scratch.py", 8, common)
    a, b = one["model"], two["model"]
    start = CLIP(**model_config("tiny", 32, 32)).state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5), k
    assert any(not torch.equal(a[k], start[k]) for k in a if k in start)  # it trained


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    _, a, b = killed_and_resumed(
        tmp_path, ["clip_scratch.py", "--max_steps", "12", "--ckpt_every", "2", *TINY]
    )
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.slow
def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path):
    r = run(
        [
            "clip_scratch.py",
            "--max_steps",
            "20",
            "--ckpt_every",
            "1",
            "--lr",
            "1e8",
            "--warmup_steps",
            "1",
            "--out_dir",
            str(tmp_path),
            *TINY,
        ]
    )
    assert r.returncode != 0
    assert "not finite" in r.stdout + r.stderr
    ckpt = load_weights(tmp_path)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "imagenet"], "--data"),
        (["--data", "flickr8k", "--data_root", "/nonexistent/flickr"], "/nonexistent/flickr"),
        (["--data", "flickr8k"], "--data_root"),
        (["--model_size", "huge"], "--model_size"),
        (["--device", "cuda"], "--device cuda"),
    ],
)
def test_bad_flags_give_one_clear_error(argv, message, tmp_path):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    r = run_here(["clip_scratch.py", *argv, "--max_steps", "1", "--out_dir", str(tmp_path)])
    assert r.returncode != 0
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
def test_real_data_cli_with_cache_counts_a_corrupt_image(tmp_path):
    """flickr8k (Kaggle layout fixture) end to end through the real loaders, the memmap cache and
    the final retrieval eval on the test split; one corrupt training JPEG is a counted skip."""
    root = fixture_copy(tmp_path, "flickr8k_kaggle")
    train_image = data.read_flickr8k(str(root))["train"][0][0]
    with open(train_image, "wb") as f:
        f.write(b"not a jpeg")
    r = run(
        [
            "clip_scratch.py",
            "--data",
            "flickr8k",
            "--data_root",
            str(root),
            "--cache_images",
            "--workers",
            "1",
            "--batch_size",
            "4",
            "--max_steps",
            "3",
            "--log_every",
            "1",
            "--image_size",
            "32",
            "--eval_every",
            "0",
            "--out_dir",
            str(tmp_path / "out"),
        ]
    )
    assert r.returncode == 0, r.stderr
    assert "skipped 1 unreadable image" in r.stdout
    assert "eval test step 3" in r.stdout and "retrieval/t2i_r1" in r.stdout
    assert load_weights(tmp_path / "out")["step"] == 3


def flickr8k_copy(tmp_path):
    """a private copy of the kaggle-layout fixture (4 train, 1 val, 1 test image) and its splits"""
    root = str(fixture_copy(tmp_path, "flickr8k_kaggle"))
    return root, data.read_flickr8k(root)


@pytest.mark.parametrize("damage", ["test image", "caption byte"])
def test_bad_real_data_is_refused_before_the_first_step(tmp_path, damage):
    root, splits = flickr8k_copy(tmp_path)
    if damage == "test image":  # found today only by the final eval, after the whole run
        bad = splits["test"][0][0]
        with open(bad, "wb") as f:
            f.write(b"<html>404 Not Found</html>")
        message = f"error: --data flickr8k: the test split: 1 of 1 images do not open: {bad}; evaluation needs every one (replace or remove them)"
    else:
        bad = os.path.join(root, "captions.txt")
        raw = open(bad, "rb").read()
        with open(bad, "wb") as f:
            f.write(raw.replace(b"A girl, in", b"A girl,\xff in"))
        # line 3 is '1000268201_693b08cb0e.jpg,"A girl, in a dress, ...': 26 + 1 + 7 bytes before it
        message = f"error: {bad}:3: byte 0xff (byte 35 of the line) is not UTF-8: the file must be UTF-8 (re-save it as UTF-8)"
    r = run_here(
        [
            "clip_scratch.py",
            "--data",
            "flickr8k",
            "--data_root",
            root,
            "--workers",
            "0",
            "--batch_size",
            "2",
            "--max_steps",
            "2",
            "--image_size",
            "32",
            "--out_dir",
            str(tmp_path / "out"),
        ]
    )
    assert r.returncode == 1 and r.stderr.splitlines() == [message], r.stderr
    assert "step" not in r.stdout


@pytest.mark.slow
def test_resume_refuses_a_damaged_or_mismatched_checkpoint_in_one_line(tmp_path):
    first = run(["clip_scratch.py", "--max_steps", "2", "--out_dir", str(tmp_path), *TINY])
    assert first.returncode == 0, first.stderr
    ckpt = str(tmp_path / "ckpt.pt")
    # another --image_size builds another model: 64 px has 4 x 4 + 1 patch positions, 32 px 2 x 2 + 1
    r = run_here(
        [
            "clip_scratch.py",
            "--max_steps",
            "4",
            "--out_dir",
            str(tmp_path),
            "--resume",
            *TINY,
            "--image_size",
            "64",
        ]
    )
    assert r.returncode == 1 and r.stderr.splitlines() == [
        f"error: {ckpt}: its weights do not fit the model this run builds from its flags: 1 of another shape "
        "(e.g. visual.positional_embedding: [5, 128] in the file, [17, 128] in the model)"
    ], r.stderr
    raw = open(ckpt, "rb").read()
    with open(ckpt, "wb") as f:  # a checkpoint copied while it was being written
        f.write(raw[: 2**20])
    r = run_here(["clip_scratch.py", "--max_steps", "4", "--out_dir", str(tmp_path), "--resume", *TINY])
    assert r.returncode == 1 and r.stderr.splitlines() == [
        f"error: {ckpt}: cut short (1,048,576 bytes, the end of its zip archive is missing): copied while it was being written?"
    ], r.stderr


@pytest.mark.slow
def test_torchrun_unreadable_training_image_every_rank_cuts_to_the_smallest_batch(tmp_path):
    """2 gloo ranks x batch 2, one step; rank 1's first image is unreadable, so it holds 1 sample and
    rank 0 must cut its 2 to 1 (all_gather needs equal batches): the global batch is then (rank 0's
    first, rank 1's second), exactly what 1 process x batch 4 trains on when the two dropped images
    are unreadable."""
    common = [
        "clip_scratch.py",
        "--data",
        "flickr8k",
        "--workers",
        "0",
        "--max_steps",
        "1",
        "--image_size",
        "32",
        "--eval_every",
        "0",
        "--warmup_steps",
        "1",
        "--log_every",
        "1",
        "--lr",
        "1e-4",
    ]
    # lr 1e-4: adam's first step is ~lr * sign(grad), so the fp noise between the runs (~0.02 lr on
    # near-zero gradients) stays well under atol, and another sample in the batch (~lr) does not
    # the step's keys: item indices into the train split (epoch 0), the same permutation for both runs
    rank0, rank1 = (next(iter(data.StepBatches(4, 2, r, 2, 0, 0, 1))) for r in (0, 1))
    assert next(iter(data.StepBatches(4, 4, 0, 1, 0, 0, 1))) == rank0 + rank1

    def unreadable(root, items, keys):
        for k in keys:
            with open(items[k][0], "wb") as f:
                f.write(b"not a jpeg")

    root, splits = flickr8k_copy(tmp_path / "ddp")
    unreadable(root, splits["train"], [rank1[0]])
    ddp = torchrun(
        [*common, "--data_root", root, "--batch_size", "2", "--out_dir", str(tmp_path / "ddp_out")]
    )
    assert ddp.returncode == 0, ddp.stderr
    assert "step 1/1" in ddp.stdout and "eval test step 1" in ddp.stdout
    root, splits = flickr8k_copy(tmp_path / "one")
    unreadable(root, splits["train"], [rank1[0], rank0[1]])
    one = run([*common, "--data_root", root, "--batch_size", "4", "--out_dir", str(tmp_path / "one_out")])
    assert one.returncode == 0, one.stderr
    assert "skipped 2 unreadable images" in one.stdout
    a, b = load_weights(tmp_path / "ddp_out"), load_weights(tmp_path / "one_out")
    assert a["step"] == b["step"] == 1
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=2e-5), k
    start = CLIP(**a["model_cfg"]).state_dict()
    assert any(not torch.equal(a["model"][k], start[k]) for k in start if k != "logit_scale")  # it trained


def test_export_loads_in_open_clip_with_equal_embeddings(tmp_path):
    r = run(
        [
            "clip_scratch.py",
            "--max_steps",
            "2",
            "--export",
            str(tmp_path / "hub"),
            "--out_dir",
            str(tmp_path),
            *TINY,
        ]
    )
    assert r.returncode == 0, r.stderr
    ckpt = load_weights(tmp_path)
    ours = CLIP(**ckpt["model_cfg"]).eval()
    ours.load_state_dict(ckpt["model"])
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'hub'}")
    theirs.eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = open_clip.tokenizer.SimpleTokenizer(context_length=ours.context_length)(
        ["a small red circle", "a ring"]
    )
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(images), theirs.encode_image(images), atol=1e-5)
        assert torch.allclose(ours.encode_text(tokens), theirs.encode_text(tokens), atol=1e-5)


def test_the_loop_reads_the_device_only_on_log_and_checkpoint_steps(tmp_path, monkeypatch):
    """the real loop, in process: a run of 8 steps logging once makes as many Tensor.item() calls (host
    syncs on a GPU) as a run of 2 steps logging once: none per step. The non-finite-loss stop reads
    its device-side flag on the log and checkpoint steps (test_nan_loss_stops_... checks it stops)."""
    import clip_scratch

    reads, real = [0], torch.Tensor.item

    def item(self):
        reads[0] += 1
        return real(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    torch.set_num_threads(1)
    counts = []
    for steps in (2, 8):
        reads[0] = 0
        clip_scratch.main(
            [
                "--max_steps",
                str(steps),
                "--log_every",
                str(steps),
                "--ckpt_every",
                "0",
                "--out_dir",
                str(tmp_path / str(steps)),
                "--batch_size",
                "8",
                "--image_size",
                "32",
                "--eval_every",
                "0",
                "--eval_n",
                "40",
            ]
        )
        counts.append(reads[0])
    assert counts[0] == counts[1] > 0, counts
