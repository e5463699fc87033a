"""
Data loading speed: one epoch of ImageTextDataset through a DataLoader, decoding JPEGs on the fly
vs reading the uint8 memmap cache (its one-off build time is reported separately). Builds a
synthetic Flickr8k Kaggle-layout folder of N random ~500x375 JPEGs in a temp dir, then prints a
markdown table.

    python bench/timing/bench_data.py                 # N=400, 2 workers, 224 px
    python bench/timing/bench_data.py --n 2000 --workers 8
"""

import argparse
import csv
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
)  # the repo root
from data import ImageTextDataset, build_image_cache, collate, read_flickr8k

parser = argparse.ArgumentParser()
parser.add_argument("--n", type=int, default=400, help="number of images")
parser.add_argument("--workers", type=int, default=2, help="dataloader workers (and cache build processes)")
parser.add_argument("--batch_size", type=int, default=64)
parser.add_argument("--image_size", type=int, default=224)
parser.add_argument("--repeats", type=int, default=2, help="epochs timed per mode; the fastest is reported")
args = parser.parse_args()


def make_flickr8k(root, n):
    # photo-like content (smooth low-res noise upsampled, plus grain) so the jpegs are about real size
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "Images"))
    with open(os.path.join(root, "captions.txt"), "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["image", "caption"])
        for i in range(n):
            name = f"{1000000000 + i}_{i:010x}.jpg"
            w, h = (500, 375) if i % 4 else (375, 500)  # some portrait images, like flickr
            low = Image.fromarray(rng.integers(0, 256, (h // 25, w // 25, 3), dtype=np.uint8)).resize(
                (w, h), Image.BICUBIC
            )
            pixels = np.clip(np.asarray(low, np.int16) + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(
                np.uint8
            )
            Image.fromarray(pixels).save(os.path.join(root, "Images", name), quality=90)
            rows.writerows([name, f"A photo number {i}, take {k} ."] for k in range(5))


def epoch_seconds(ds):
    best = float("inf")
    for _ in range(args.repeats):
        loader = torch.utils.data.DataLoader(
            ds, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate
        )
        t0 = time.perf_counter()
        # collate: (images, captions, synthetic, rngs, n_skipped)
        seen = sum(len(images) for images, *_ in loader)
        best = min(best, time.perf_counter() - t0)
        assert seen == len(ds)
    return best


with tempfile.TemporaryDirectory() as tmp:
    root, cache = os.path.join(tmp, "flickr8k"), os.path.join(tmp, "cache.u8")
    make_flickr8k(root, args.n)
    mb = (
        sum(
            os.path.getsize(os.path.join(root, "Images", p)) for p in os.listdir(os.path.join(root, "Images"))
        )
        / 2**20
    )
    items = sum(read_flickr8k(root).values(), [])
    plain = epoch_seconds(ImageTextDataset(items, args.image_size))
    t0 = time.perf_counter()
    build_image_cache(items, args.image_size, cache, workers=args.workers)
    build = time.perf_counter() - t0
    cached = epoch_seconds(ImageTextDataset(items, args.image_size, cache_path=cache))

print(
    f"{args.n} jpegs ({mb:.1f} MB), image_size {args.image_size}, batch {args.batch_size}, "
    f"{args.workers} workers, torch threads {torch.get_num_threads()}, best of {args.repeats} epochs"
)
print("| mode | build s | s/epoch | images/s |")
print("|---|---|---|---|")
print(f"| decode jpeg | - | {plain:.2f} | {args.n / plain:.0f} |")
print(f"| memmap cache | {build:.2f} | {cached:.2f} | {args.n / cached:.0f} |")
print(
    f"\ncache speedup per epoch: {plain / cached:.1f}x; the build pays for itself after "
    f"{build / max(plain - cached, 1e-9):.1f} epochs"
)
