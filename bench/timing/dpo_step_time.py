"""
Step time of a DPO step vs a plain CLIP step on the same batch: the same images and texts through
the towers (forward + backward + AdamW), the DPO step adding the frozen reference's no-grad forward
and the preference loss. Timed interleaved (CLIP, DPO, DPO + CLIP, CLIP, ...) in one process, so
machine noise hits all three.

    python bench/timing/dpo_step_time.py                                   # 16 full shapes groups (the default's ~65 images)
    python bench/timing/dpo_step_time.py --init out/clip_scratch/ckpt.pt --batch_size 32 --device cuda

Prints a markdown table and the ratios to the CLIP step (the target is <= 1.4x: the reference
pass is one forward, a third of a training step's compute).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import clip_dpo  # noqa: E402
import shapes  # noqa: E402
from model import CLIP, load_clip, model_config, param_groups  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument(
    "--init", default="out/clip_scratch/ckpt.pt", help="a random tiny model at 64 px if this file is missing"
)
p.add_argument("--batch_size", type=int, default=16, help="shapes groups (4 images, 8 texts each)")
p.add_argument("--steps", type=int, default=20, help="timed steps per kind (after 3 warmup rounds)")
p.add_argument("--device", default="cpu")
args = p.parse_args()

device = torch.device(args.device)
if os.path.isfile(args.init):
    model, _, _, _ = load_clip(args.init, device)
    source = args.init
else:
    model, source = CLIP(**model_config("tiny", 64, 32)).to(device), "random tiny (64 px)"
    model.image_size = 64
model.train().logit_scale.requires_grad_(False)
reference = clip_dpo.make_reference(model)
optimizer = torch.optim.AdamW(param_groups(model, 0.1, 0.1), lr=1e-6)
groups = [
    clip_dpo.shapes_group(shapes.sample_scene(shapes.scene_rng("dpo", 0, k)), model.image_size, True)
    for k in range(args.batch_size)
]
cfg = clip_dpo.get_args([])
cfg.context_length = model.context_length
(images, texts, prefs), _ = clip_dpo.make_batch(groups, cfg)
batch = (images.to(device), texts.to(device), {k: v.to(device) for k, v in prefs.items()})
# clip_dpo.step_loss's: the frozen reference, the step (the IMC term is off: --imc_weight 0)
state = argparse.Namespace(reference=reference, step=0)


def clip_step(model, batch, args, state):
    """the plain CLIP step on the same batch: every image and text through the towers, CLIP's loss on the true pairs"""
    images, texts, prefs = batch
    v, t, s = model(images, texts)
    return clip_dpo.clip_loss(v[prefs["pos"][:, 0]], t[prefs["pos"][:, 1]], s)[0], {}


kinds = {
    "clip": (clip_step, cfg),
    "dpo": (clip_dpo.step_loss, clip_dpo.get_args(["--loss", "dpo", "--imc_weight", "0"])),
    "dpo_clip": (clip_dpo.step_loss, clip_dpo.get_args(["--loss", "dpo_clip", "--imc_weight", "0"])),
}
times = {k: [] for k in kinds}
for i in range(args.steps + 3):
    for name, (fn, a) in kinds.items():
        t0 = time.perf_counter()
        loss, _ = fn(model, batch, a, state)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times[name].append(time.perf_counter() - t0)

ms = {k: statistics.median(v) * 1000 for k, v in times.items()}
print(
    f"model {source}, batch {args.batch_size} groups = {len(images)} images + {len(texts)} texts, {args.device}, "
    f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.steps} interleaved steps\n"
)
print("| step | ms/step | ratio to CLIP |\n|---|---|---|")
for k in kinds:
    print(f"| {k} | {ms[k]:.1f} | {ms[k] / ms['clip']:.2f} |")
