"""Scaling a step (issue 31): --accum_steps (GradCache as training.MicroBatches) gives the loss and the
gradients of one pass over the whole batch, in 1 process and in 2 gloo processes; --grad_clip
clips by the global norm, after the float16 GradScaler's unscale; --grad_checkpointing leaves the
gradients as they were. Each script's own hooks build the model, the batch and the loss."""

import json

import pytest
import torch
from helpers import TINY, gloo_processes, run, tiny_ckpt

import clip_dpo
import clip_hardneg
import clip_scratch
import training
from model import Transformer

CPU = torch.device("cpu")
# (script, flags, dataset keys per step, rows per key): each method's losses, every term switched on
METHODS = {
    "clip": (clip_scratch, [], 8, 1),
    "clips+captioner": (
        clip_scratch,
        ["--caption_mask", "subcaption", "--captioner_weight", "2", "--captioner_len", "12"],
        8,
        1,
    ),
    "negclip": (clip_hardneg, ["--loss", "negclip"], 4, 2),
    "ceclip": (clip_hardneg, ["--loss", "ceclip", "--cmr_weight", "0.2", "--imc_weight", "0.3"], 4, 2),
    "hnc": (
        clip_hardneg,
        ["--loss", "hnc", "--hn_weight", "2", "--hn_warmup_steps", "0", "--kl_weight", "1", "--l2sp", "0.1"],
        4,
        2,
    ),
    "dpo": (clip_dpo, ["--imc_weight", "0.3", "--l2sp", "0.1"], 4, 1),
}


def step(method, init, keys, k=1, wrap=None, flags=()):
    """one step_loss + backward of the method on the dataset items `keys`, with --accum_steps k:
    a fresh tiny model (the fine-tunes from init, moved off their frozen copy so that KL, L2-SP and
    DPO see a difference), the script's make_data / make_batch / step_loss, the module wrapped by
    training.MicroBatches when k > 1 and then by wrap (DDP) -> (loss, {parameter name: gradient})"""
    script, method_flags, _, rows = METHODS[method]
    argv = ["--batch_size", str(rows * len(keys)), "--accum_steps", str(k), *method_flags, *flags]
    argv += ["--image_size", "32"] if script is clip_scratch else ["--init", init]
    args = script.get_args(argv)
    torch.manual_seed(0)
    clip, trained, _, _, state = script.make_model(args, CPU)
    if script is not clip_scratch:
        with torch.no_grad():
            for p in clip.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    dataset, _, _ = script.make_data(args, 0, 1)
    batch, _ = script.make_batch([dataset[key] for key in keys], args)
    module = training.MicroBatches(trained, k) if k > 1 else trained
    module = wrap(module) if wrap else module
    loss, _ = script.step_loss(module, batch, args, state)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in trained.named_parameters() if p.grad is not None}


def assert_same_step(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    return tiny_ckpt(tmp_path_factory.mktemp("init") / "init.pt")


@pytest.mark.parametrize("method", METHODS)
def test_accumulated_step_equals_the_whole_batch(method, init):
    """K = 2 and 4 micro-batches give the loss and every parameter's gradient of K = 1 (the negatives
    of each micro-batch are the whole batch's); with one micro-batch's features cut off from the
    gradient, or a micro-batch's own negatives only, this fails"""
    keys = range(METHODS[method][2])
    whole = step(method, init, keys)
    for k in (2, 4):
        assert_same_step(step(method, init, keys, k), whole)


def _ddp_worker(rank, method, init, k, out):
    n = METHODS[method][2]
    keys = range(rank * n // 2, (rank + 1) * n // 2)  # rank r holds the r-th half of the global batch
    result = step(method, init, keys, k, wrap=torch.nn.parallel.DistributedDataParallel)
    torch.save(result, f"{out}.{rank}")


@pytest.mark.slow
# DDP around the micro-batches does not depend on the loss (every loss's micro-batches are the test above):
# CLIP's pairs, CE-CLIP's scenes with their twins, and DPO's groups of unequal sizes across ranks
@pytest.mark.parametrize("method", ["clip", "ceclip", "dpo"])
def test_two_gloo_processes_with_micro_batches_equal_one_process(tmp_path, method, init):
    """2 gloo processes, each its half of the batch as K = 1, 2, 4 micro-batches inside one DDP forward: the
    mean of the ranks' losses and DDP's averaged gradients equal one process's K = 1 step on the
    whole batch"""
    loss, grads = step(method, init, range(METHODS[method][2]))
    for k in (1, 2) if method == "dpo" else (1, 2, 4):  # DPO's 2 groups a rank: K = 4 does not divide them
        gloo_processes(tmp_path, _ddp_worker, method, init, k, str(tmp_path / f"k{k}"))
        ranks = [torch.load(tmp_path / f"k{k}.{r}", weights_only=True) for r in range(2)]
        for name in grads:
            torch.testing.assert_close(ranks[0][1][name], ranks[1][1][name], msg=name)
        assert_same_step(((ranks[0][0] + ranks[1][0]) / 2, ranks[0][1]), (loss, grads))


@pytest.mark.parametrize("script", [clip_scratch, clip_hardneg, clip_dpo], ids=lambda s: s.__name__)
def test_a_batch_not_divisible_by_the_micro_batches_is_one_clear_error(script, capsys):
    with pytest.raises(SystemExit) as e:
        script.get_args(["--batch_size", "6", "--accum_steps", "4"])
    assert e.value.code == 2
    assert "--accum_steps 4: must divide --batch_size 6" in capsys.readouterr().err
    for bad in (["--accum_steps", "0"], ["--grad_clip", "-1"]):
        with pytest.raises(SystemExit):
            script.get_args(bad)


def test_micro_batches_are_row_wise_and_pass_scalars_and_none_through():
    """the split and the join: inputs of different lengths are split alike, a 0-dim output is the first
    part's, None stays None; fewer rows than K run as fewer parts; no grad: one pass"""
    calls = []

    def module(x, y, scale):
        calls.append((len(x), len(y)))
        return x * scale, None, y.sum() * 0 + scale

    wrapped = training.MicroBatches(module, 4)
    x, y = torch.randn(8, 3, requires_grad=True), torch.randn(12, 2)
    a, none, s = wrapped(x, y, torch.tensor(2.0))
    assert calls == [(2, 3)] * 4 and none is None and s.ndim == 0
    torch.testing.assert_close(a, 2 * x)
    calls.clear()
    wrapped(x[:3], y, torch.tensor(2.0))
    assert calls == [(1, 4)] * 3
    calls.clear()
    with torch.no_grad():
        wrapped(x, y, torch.tensor(2.0))
    assert calls == [(8, 12)]


# -----------------------------------------------------------------------------
# --grad_clip


@pytest.mark.parametrize("fp16", [False, True])
def test_grad_clip_update_equals_the_update_by_hand(fp16):
    """SGD after clip_grads == p - lr * g * min(1, max_norm / ||g||) with ||g|| the global norm of the
    unscaled gradients, computed here by hand; the logged grad_norm is ||g||. fp16: the GradScaler's
    scaled loss, unscaled once before clipping (scaler.step does not unscale again)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x = torch.randn(16, 5)
    start = [p.detach().clone() for p in model.parameters()]
    model(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    for max_norm in (0.1 * norm.item(), 10 * norm.item()):
        factor = min(1.0, max_norm / norm.item())
        for p, s in zip(model.parameters(), start):
            p.data.copy_(s)
            p.grad = None
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=fp16)
        scaler.scale(model(x).square().sum()).backward()
        stats = training.clip_grads(optimizer, scaler, max_norm)
        scaler.step(optimizer)
        torch.testing.assert_close(stats["grad_norm"], norm)
        for p, s, g in zip(model.parameters(), start, grads):
            torch.testing.assert_close(p.detach(), s - 0.5 * factor * g, rtol=1e-5, atol=1e-7)
    assert training.clip_grads(optimizer, scaler, 0.0) == {}


# -----------------------------------------------------------------------------
# --grad_checkpointing


@pytest.mark.parametrize("method", ["clips+captioner", "ceclip", "dpo"])
def test_grad_checkpointing_leaves_the_gradients_equal(method, init):
    """the flag reaches every Transformer of the trained module (the captioner's too), and the loss and
    gradients are those without it; with --accum_steps 2 on top (nested checkpoints) as well"""
    keys = range(METHODS[method][2])
    plain = step(method, init, keys)
    script = METHODS[method][0]
    argv = ["--grad_checkpointing", *METHODS[method][1]]
    argv += ["--image_size", "32"] if script is clip_scratch else ["--init", init]
    module = script.make_model(script.get_args(argv), CPU).module
    towers = [m for m in module.modules() if isinstance(m, Transformer)]
    assert len(towers) >= 2 and all(t.grad_checkpointing for t in towers)
    assert_same_step(step(method, init, keys, flags=["--grad_checkpointing"]), plain)
    assert_same_step(step(method, init, keys, 2, flags=["--grad_checkpointing"]), plain)


# -----------------------------------------------------------------------------
# the CLI


@pytest.mark.slow
def test_cli_prints_the_micro_batch_and_logs_the_grad_norm(tmp_path):
    r = run(
        [
            "clip_scratch.py",
            *TINY,
            "--max_steps",
            "2",
            "--accum_steps",
            "4",
            "--grad_clip",
            "1.0",
            "--grad_checkpointing",
            "--out_dir",
            str(tmp_path),
        ]
    )
    assert r.returncode == 0, r.stderr
    assert (
        "of global batch 8 (1 x 8)" in r.stdout
        and "micro-batch 2 (--batch_size / --accum_steps 4)" in r.stdout
    )
    train = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train = [x for x in train if x["split"] == "train"]
    assert len(train) == 2 and all(x["grad_norm"] > 0 for x in train)
    assert all("grad_norm" in line for line in r.stdout.splitlines() if line.startswith("step "))
