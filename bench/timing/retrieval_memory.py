"""
Peak memory of eval.retrieval_metrics on a large split (default: COCO val2014 without the Karpathy
JSON, 40,504 images x 202,520 captions, five per image), against what the whole similarity matrix
would take (the former retrieval_metrics: the fp32 matrix, its masked copy and bool masks of its size).

    python bench/timing/retrieval_memory.py                        # 40k x 200k, dim 32: minutes on a 2-core CPU
    python bench/timing/retrieval_memory.py --images 5000 --dim 512 --block 4096

The features are random unit vectors (the ranks' values do not matter here, only the memory). The
embedding dim is 32 by default, not CLIP's 512-1024, so that the 40k x 200k scores take a minute on
a laptop CPU: the dim changes the matmul's time, not the memory of the [block, block] tiles. The
peak is the process's maximum resident set (resource.ru_maxrss) after the features are made,
minus the one before: what the ranks added.
"""

import argparse
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import eval as ev  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--images", type=int, default=40504)
p.add_argument("--captions", type=int, default=5, help="per image")
p.add_argument(
    "--dim", type=int, default=32, help="embedding dim (CLIP's: 512-1024; only the time depends on it)"
)
p.add_argument("--block", type=int, default=2048, help="retrieval_metrics' tile side")
args = p.parse_args()
GB = 1e9

n_img, n_txt = args.images, args.images * args.captions
g = torch.Generator().manual_seed(0)
img = F.normalize(torch.randn(n_img, args.dim, generator=g), dim=-1)
txt = F.normalize(torch.randn(n_txt, args.dim, generator=g), dim=-1)
owner = torch.arange(n_txt) // args.captions
# kilobytes on Linux
peak_rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before, t = peak_rss(), time.time()
metrics = ev.retrieval_metrics(img, txt, owner, block=args.block)
added, seconds = peak_rss() - before, time.time() - t
cells = n_img * n_txt
print(
    f"{n_img:,} images x {n_txt:,} captions, dim {args.dim} (random features; CLIP's dim only changes the time), "
    f"{torch.get_num_threads()} threads, tiles of {args.block} x {args.block}"
)
print(
    f"blocked retrieval_metrics: {seconds:.0f} s, peak memory added {added / GB:.3f} GB "
    f"(features {(n_img + n_txt) * args.dim * 4 / GB:.3f} GB, made before; one tile's scores {args.block**2 * 4 / GB:.3f} GB)"
)
print(
    f"the whole matrix instead: {cells * 4 / GB:.1f} GB of fp32 scores, plus its masked copy ({cells * 4 / GB:.1f} GB) "
    f"and bool masks of {cells / GB:.1f} GB each (the former code's peak: ~{cells * 11 / GB:.0f} GB)"
)
print("  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
