"""
Memory estimate of clip_dpo.py for a large open_clip model on one GPU (default: ViT-H-14, seed 000's
setting), from the exact parameter count and the activation bytes our towers save for backward.

    python bench/timing/dpo_memory.py                          # ViT-H-14, VSR groups (1 image + 2 captions)
    python bench/timing/dpo_memory.py --model ViT-L-14 --text_tokens 16

Parameters are counted on the meta device (no weights needed). Activations: one DPO training
forward (policy with grad + reference under no_grad, bf16 autocast, as clip_dpo.py runs on CUDA)
of copies of the model with 1 or 2 blocks per tower at full width, on CPU; every tensor saved for
backward is counted once (by storage), for 1 and 2 groups: the difference is the per-group
activation, split into each tower's bytes per block and the rest, then scaled to the full depth. With --grad_checkpointing a block keeps only its
input (the fp32 residual stream, tokens x width x 4 bytes) and recomputes the rest, one block at a
time, in the backward pass. The static part: fp32 weights + fp32 gradients + AdamW's two fp32
moments (16 bytes / parameter), the autocast bf16 copies of the weight matrices saved for backward
(2 bytes), and the reference (bf16 matrices, fp32 rest). Not counted: the CUDA context (~0.5 GB),
allocator fragmentation, the data loader.
"""

import argparse
import os
import sys

import open_clip
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import clip_dpo  # noqa: E402
from model import CLIP  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--model", default="ViT-H-14")
p.add_argument(
    "--text_tokens",
    type=int,
    default=16,
    help="SOT..EOT of the batch's longest caption (VSR captions: ~10-14)",
)
p.add_argument("--texts_per_group", type=int, default=2, help="VSR i2t: the caption and its contrast")
p.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256])
args = p.parse_args()
GB = 1e9

cfg = open_clip.get_model_config(args.model)
with torch.device("meta"):
    full = CLIP(**cfg)
n_params = sum(p.numel() for p in full.parameters())
n_matrix = sum(p.numel() for n, p in full.named_parameters() if p.ndim >= 2 and "embedding" not in n)
layers = {"visual": cfg["vision_cfg"]["layers"], "text": cfg["text_cfg"]["layers"]}
static = {
    "weights + grads + AdamW (fp32)": 16 * n_params,
    "autocast bf16 weight copies": 2 * n_matrix,
    "reference (bf16 matrices)": 2 * n_matrix + 4 * (n_params - n_matrix),
}

# per-group activations, measured on shallow copies at full width: (vision, text) layers = (1, 1),
# (2, 1), (1, 2) give each tower's bytes per layer and the depth-independent rest
S, L = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
dpo_args = clip_dpo.get_args(["--loss", "dpo", "--imc_weight", "0"])


def saved_bytes(n_groups, v_layers, t_layers):
    torch.manual_seed(0)
    policy = CLIP(
        **{
            **cfg,
            "vision_cfg": {**cfg["vision_cfg"], "layers": v_layers},
            "text_cfg": {**cfg["text_cfg"], "layers": t_layers},
        }
    )
    policy.logit_scale.requires_grad_(False)
    reference = clip_dpo.make_reference(policy, "bfloat16")
    images = torch.randn(n_groups, 3, S, S)
    texts = torch.zeros(n_groups * args.texts_per_group, L, dtype=torch.long)
    texts[:, 0], texts[:, 1 : args.text_tokens - 1], texts[:, args.text_tokens - 1] = 49406, 320, 49407
    K = args.texts_per_group
    prefs = {
        "query": torch.arange(n_groups),
        "cand": n_groups + torch.arange(n_groups * K).view(n_groups, K),
        "rank": torch.arange(K).repeat(n_groups, 1),
        "pairs": torch.tensor([[m, 0, k] for m in range(n_groups) for k in range(1, K)]),
        "pos": torch.tensor([[m, K * m] for m in range(n_groups)]),
    }
    storages = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):
        clip_dpo.step_loss(
            policy, (images, texts, prefs), dpo_args, argparse.Namespace(reference=reference, step=0)
        )
    return sum(storages.values())


def per_group(v_layers, t_layers):  # bytes that grow with the batch, per group
    return saved_bytes(2, v_layers, t_layers) - saved_bytes(1, v_layers, t_layers)


base = per_group(1, 1)
per_v, per_t = per_group(2, 1) - base, per_group(1, 2) - base
rest = base - per_v - per_t  # patch embedding, ln_pre / ln_post, projections, loss
per_group_full = rest + per_v * layers["visual"] + per_t * layers["text"]
v_tok, t_tok = (S // cfg["vision_cfg"]["patch_size"]) ** 2 + 1, args.text_tokens * args.texts_per_group
v_w, t_w = cfg["vision_cfg"]["width"], cfg["text_cfg"]["width"]
# one fp32 input per block
per_group_ckpt = rest + 4 * (v_tok * v_w * layers["visual"] + t_tok * t_w * layers["text"])
one_block = max(per_v, per_t)  # the block being recomputed, per group

print(
    f"{args.model}: {n_params / 1e6:.1f}M parameters ({n_matrix / 1e6:.1f}M in weight matrices); "
    f"a group = 1 image ({v_tok} tokens) + {args.texts_per_group} captions ({args.text_tokens} tokens)"
)
print(
    f"measured on 1-2 layer copies: saved for backward per group, {per_v / 1e6:.1f} MB per vision layer, "
    f"{per_t / 1e6:.2f} MB per text layer, {rest / 1e6:.1f} MB outside the blocks -> {per_group_full / 1e6:.0f} MB per group\n"
)
for k, v in static.items():
    print(f"  {k:<32} {v / GB:6.1f} GB")
print(f"  {'static total':<32} {sum(static.values()) / GB:6.1f} GB\n")
print(
    "| groups per GPU | activations | total | with --grad_checkpointing: activations | total |\n|---|---|---|---|---|"
)
for b in args.batches:
    act, act_ckpt = b * per_group_full, b * (per_group_ckpt + one_block)
    print(
        f"| {b} | {act / GB:.1f} GB | {(sum(static.values()) + act) / GB:.1f} GB | {act_ckpt / GB:.1f} GB | "
        f"{(sum(static.values()) + act_ckpt) / GB:.1f} GB |"
    )
