"""
Are the shapes world's probes learnable on the path the fine-tuning scripts take? A hard-negative
fine-tune of a scratch checkpoint: NegCLIP's loss (each image against the batch's captions plus
every row's relation-flipped and colour-swapped caption) on batches where each scene comes with a
twin (its mirror image, or its colours exchanged) whose caption is, word for word, that scene's
hard negative. The text tower learns at lr x --text_lr_mult (a fast text tower re-collapses).

    python bench/shapes_hardneg.py out/clip_scratch/ckpt.pt      # relation >= 0.9 by step ~3,500

A calibration check of the world, not a method script: clip_hardneg.py is the real thing.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import eval as ev  # noqa: E402
from model import CLIP, lr_at, param_groups  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("ckpt")
p.add_argument("--steps", type=int, default=4500)
p.add_argument("--batch_size", type=int, default=64, help="scenes + twins per step")
p.add_argument("--lr", type=float, default=2e-4)
p.add_argument("--text_lr_mult", type=float, default=0.1)
p.add_argument("--imc", type=float, default=0.0, help="weight of CE-CLIP's intra-modal term (caption vs its own negatives)")
p.add_argument("--eval_every", type=int, default=250)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()

ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
model = CLIP(**ckpt["model_cfg"])
model.load_state_dict(ckpt["model"])
size, tokenizer = ckpt["model_cfg"]["vision_cfg"]["image_size"], data.get_tokenizer(model.context_length)
optimizer = torch.optim.AdamW(param_groups(model, 0.1, args.text_lr_mult), lr=args.lr, betas=(0.9, 0.98), eps=1e-6)


def batch(step):
    # half the batch: fresh scenes; the other half: a twin of each (mirror for even, colour swap for odd)
    scenes = [data.sample_scene(data.scene_rng("hardneg", args.seed, step * args.batch_size + j)) for j in range(args.batch_size // 2)]
    scenes += [data.mirror(s) if j % 2 == 0 else data.swap_colours(s) for j, s in enumerate(scenes)]
    images = torch.stack([data.to_tensor(data.render(s, size)) for s in scenes])
    negatives = [data.relation_flip(s) for s in scenes] + [data.attribute_swap(s) for s in scenes]
    return images, tokenizer([s.caption() for s in scenes]), tokenizer(negatives)


def report(step, loss, t0):
    m = ev.eval_shapes(model, tokenizer, size, "cpu")
    print(f"| {step} | {loss:.3f} | {time.time() - t0:.0f} | " + " | ".join(f"{m[k]:.3f}" for k in KEYS) + " |", flush=True)


KEYS = ["retrieval/i2t_r1", "retrieval/t2i_r1", "probe/relation", "probe/attribute_swap", "diag/relation_text_cos"]
print("| step | loss | seconds | " + " | ".join(KEYS) + " |\n|" + "---|" * (len(KEYS) + 3))
t0 = time.time()
report(0, float("nan"), t0)
for step in range(args.steps):
    images, captions, negatives = batch(step)
    for g in optimizer.param_groups:
        g["lr"] = lr_at(step, args.lr, 50, args.steps) * g["lr_mult"]
    v = model.encode_image(images, normalize=True)
    t = model.encode_text(torch.cat([captions, negatives]), normalize=True)  # [B + 2B, D]
    s, labels = model.logit_scale.exp(), torch.arange(len(images))
    loss = 0.5 * (F.cross_entropy(s * v @ t.T, labels) + F.cross_entropy(s * t[:len(images)] @ v.T, labels))
    if args.imc:  # each caption must be closer to its image than to its own hard negatives
        B, tc, tn = len(images), t[:len(images)], t[len(images):].view(2, len(images), -1)
        logits = torch.cat([(s * v * tc).sum(-1, keepdim=True), s * torch.einsum("bd,kbd->bk", tc, tn)], dim=1)
        loss = loss + args.imc * F.cross_entropy(logits, torch.zeros(B, dtype=torch.long))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    if (step + 1) % args.eval_every == 0:
        report(step + 1, loss.item(), t0)
