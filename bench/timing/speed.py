"""
The default clip_scratch.py step under each speed lever, timed interleaved in one process (A, B,
C, A, B, C, ...) so that machine noise hits every row alike: render the batch's scenes, build the
batch, forward + backward, optimizer step, logit-scale clamp, as the training loop does.

    python bench/timing/speed.py                      # torch's default thread count
    python bench/timing/speed.py --threads 1 --steps 30

Rows: the previous default (fp32, foreach AdamW) and one lever at a time on top of today's
default. Rendering in a DataLoader worker and torch.compile are not interleavable here (a worker
runs beside every row; compile warms up for minutes): time them with the CLI's log line instead
(`python clip_scratch.py --max_steps 300 --workers 1`, `--compile`).
Prints a markdown table: median ms/step and the ratio to the previous default.
"""

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import clip_scratch  # noqa: E402
import shapes  # noqa: E402
from model import CLIP, model_config, param_groups
from training import autocast_ctx

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=20, help="timed steps per row (after 3 warmup steps)")
p.add_argument("--threads", type=int, default=None)
args, rest = p.parse_known_args()
if args.threads:
    torch.set_num_threads(args.threads)
run = clip_scratch.get_args(rest)
dataset = shapes.ShapesDataset(run.image_size, 0, run.swap_noise, run.caption_style)
cpu = torch.device("cpu")

ROWS = {  # name: (dtype, AdamW kwargs)
    "previous default: fp32, foreach AdamW": ("float32", dict(foreach=True)),
    "fp32, fused AdamW": ("float32", dict(fused=True)),
    "bf16 autocast, foreach AdamW": ("bfloat16", dict(foreach=True)),
    "bf16 autocast, fused AdamW": ("bfloat16", dict(fused=True)),
}
state = {}
for name, (dtype, kw) in ROWS.items():
    torch.manual_seed(0)
    model = CLIP(**model_config(run.model_size, run.image_size, run.context_length))
    opt = torch.optim.AdamW(
        param_groups(model, run.weight_decay, run.text_lr_mult), lr=run.lr, betas=(0.9, 0.98), eps=1e-6, **kw
    )
    state[name] = (model, opt, dtype)


def step(name, i):
    model, opt, dtype = state[name]
    batch, _ = clip_scratch.make_batch([dataset[i * run.batch_size + j] for j in range(run.batch_size)], run)
    with autocast_ctx(cpu, dtype):
        # clip_scratch's step_loss leaves its state unused
        loss, _ = clip_scratch.step_loss(model, batch, run, None)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))


times = {name: [] for name in ROWS}
for i in range(args.steps + 3):
    for name in ROWS:
        t0 = time.perf_counter()
        step(name, i)
        if i >= 3:
            times[name].append(time.perf_counter() - t0)
ms = {name: statistics.median(t) * 1000 for name, t in times.items()}
# the least disturbed step: robust to a busy machine
best = {name: min(t) * 1000 for name, t in times.items()}
base, base_best = ms[next(iter(ROWS))], best[next(iter(ROWS))]
print(
    f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {run.batch_size}, {run.model_size} model, "
    f"image {run.image_size}, median of {args.steps} interleaved steps (data on the main thread)\n"
)
print(
    "| row | ms/step (median) | vs previous default | ms/step (min) | vs previous default |\n|---|---|---|---|---|"
)
for name in ROWS:
    print(
        f"| {name} | {ms[name]:.0f} | {ms[name] / base:.2f}x | {best[name]:.0f} | {best[name] / base_best:.2f}x |"
    )
