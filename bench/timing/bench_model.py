"""
Train-step time of minclip's CLIP vs open_clip.CLIP built from the identical config: forward +
backward + AdamW, timed interleaved (A, B, A, B, ...) in one process so machine noise hits both.

    python bench/timing/bench_model.py                       # the CPU default (tiny, shapes captions)
    python bench/timing/bench_model.py --size small --image_size 224 --batch_size 32 --device cuda

Prints a markdown table; the ratio is minclip time / open_clip time (lower is better).
"""

import argparse
import os
import statistics
import sys
import time

import open_clip
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from clip_scratch import clip_loss  # noqa: E402
from model import CLIP, model_config  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--size", default="tiny")
p.add_argument("--image_size", type=int, default=64)
p.add_argument("--context_length", type=int, default=77)
p.add_argument("--batch_size", type=int, default=128)
p.add_argument("--steps", type=int, default=20, help="timed steps per model (after 3 warmup steps)")
p.add_argument("--device", default="cpu")
p.add_argument("--caption", default="a small red circle left of a large blue square on a striped background")
args = p.parse_args()

torch.manual_seed(0)
cfg = model_config(args.size, args.image_size, args.context_length)
models = {"minclip": CLIP(**cfg), "open_clip": open_clip.CLIP(**cfg)}
models["open_clip"].load_state_dict(models["minclip"].state_dict())
device = torch.device(args.device)
images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
tokens = open_clip.tokenizer.SimpleTokenizer(context_length=args.context_length)(
    [args.caption] * args.batch_size
).to(device)
opts = {}
for name, m in models.items():
    m.to(device).train()
    opts[name] = torch.optim.AdamW(m.parameters(), lr=1e-5)


def step(name):
    m, opt = models[name], opts[name]
    v, t = m.encode_image(images, normalize=True), m.encode_text(tokens, normalize=True)
    loss, _ = clip_loss(v, t, m.logit_scale.exp())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


times = {name: [] for name in models}
for i in range(args.steps + 3):
    for name in models:
        t0 = time.perf_counter()
        step(name)
        if i >= 3:
            times[name].append(time.perf_counter() - t0)

ms = {name: statistics.median(ts) * 1000 for name, ts in times.items()}
n_tok = int(tokens[0].argmax()) + 1
print(
    f"config: {args.size}, image {args.image_size}, context {args.context_length} (caption {n_tok} tokens), "
    f"batch {args.batch_size}, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
    f"median of {args.steps} interleaved steps\n"
)
print("| model | ms/step | img/s |\n|---|---|---|")
for name in models:
    print(f"| {name} | {ms[name]:.1f} | {args.batch_size / ms[name] * 1000:.0f} |")
print(f"\nratio minclip / open_clip: {ms['minclip'] / ms['open_clip']:.3f}")
