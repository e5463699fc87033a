"""
Where the time of one default clip_scratch.py step goes, on this machine: each part of the step
timed on its own (median of --steps repeats, after warmup), then the AdamW variants and the eval.

    python bench/timing/profile_step.py                   # the default run's settings: tiny model, batch 128, shapes
    python bench/timing/profile_step.py --threads 1

Prints a markdown table (ms per step, share of the step).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import clip_scratch  # noqa: E402
import data  # noqa: E402
import eval as ev  # noqa: E402
import shapes  # noqa: E402
from model import CLIP, model_config, param_groups  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=20)
p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
args, rest = p.parse_known_args()
if args.threads:
    torch.set_num_threads(args.threads)
cfg_args = clip_scratch.get_args(rest)  # the default run's settings (or whatever flags follow)
torch.manual_seed(0)
model = CLIP(**model_config(cfg_args.model_size, cfg_args.image_size, cfg_args.context_length))
dataset = shapes.ShapesDataset(cfg_args.image_size, 0, cfg_args.swap_noise, cfg_args.caption_style)
B = cfg_args.batch_size


def timed(fn, n=args.steps, warmup=3):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1000


step = iter(range(10**9))
samples = [dataset[k] for k in range(B)]
rows = {}
rows["render + caption 128 scenes (dataset[key])"] = timed(
    lambda: [dataset[next(step) * B + j] for j in range(B)]
)
rows["collate + tokenize (make_batch)"] = timed(lambda: clip_scratch.make_batch(samples, cfg_args))
batch, _ = clip_scratch.make_batch(samples, cfg_args)  # ((images, texts), {"unreadable images": 0})


def fwd():
    # clip_scratch's step_loss leaves its state unused
    return clip_scratch.step_loss(model, batch, cfg_args, None)[0]


rows["forward + loss"] = timed(fwd)


def fwd_bwd():
    model.zero_grad(set_to_none=True)
    fwd().backward()


rows["forward + loss + backward"] = timed(fwd_bwd)
fwd_bwd()
for name, kw in (
    ("AdamW step (foreach)", dict(foreach=True)),
    ("AdamW step (fused)", dict(fused=True)),
    ("AdamW step (for-loop)", dict(foreach=False)),
):
    opt = torch.optim.AdamW(param_groups(model, 0.1, 0.1), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, **kw)
    rows[name] = timed(opt.step)
t0 = time.perf_counter()
ev.eval_shapes(
    model, data.get_tokenizer(cfg_args.context_length), cfg_args.image_size, "cpu", n=cfg_args.eval_n
)
eval_ms = (time.perf_counter() - t0) * 1000

step_ms = (
    rows["render + caption 128 scenes (dataset[key])"]
    + rows["collate + tokenize (make_batch)"]
    + rows["forward + loss + backward"]
    + rows["AdamW step (fused)"]
)
print(
    f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {B}, model {cfg_args.model_size}, image {cfg_args.image_size}, "
    f"context {cfg_args.context_length}; median of {args.steps}\n"
)
print("| part | ms | share of a fused-AdamW step |\n|---|---|---|")
for name, ms in rows.items():
    share = (
        f"{ms / step_ms * 100:.0f}%"
        if name != "forward + loss" and "foreach" not in name and "for-loop" not in name
        else ""
    )
    print(f"| {name} | {ms:.1f} | {share} |")
print(f"| **one step, main thread, fused AdamW** | **{step_ms:.1f}** | 100% |")
print(
    f"| one eval (eval_shapes, {cfg_args.eval_n} test scenes) | {eval_ms:.0f} | = {eval_ms / step_ms:.0f} steps |"
)
