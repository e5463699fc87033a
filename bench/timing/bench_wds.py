"""
Reading webdataset shards: wds.read_shard (a plain tarfile reader, what --data wds uses) against the
webdataset package's own pipeline, on the same shards in img2dataset's layout, one process. Two
passes each: the samples as bytes (the reader alone), and decoded to the training tensor at 224 px
(the same data.load_image + to_tensor both ways, so the difference is the reader). The fastest of
--repeats (the two readers timed in turn) is reported, as a markdown table. Needs `pip install webdataset`.

    python bench/timing/bench_wds.py                      # 8 shards x 1000 samples of ~500x375 JPEGs
    python bench/timing/bench_wds.py --shards 4 --per_shard 2000
"""

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import data  # noqa: E402
import wds  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--shards", type=int, default=8)
parser.add_argument("--per_shard", type=int, default=1000)
parser.add_argument("--decoded", type=int, default=1000, help="samples decoded per timed decode pass")
parser.add_argument("--repeats", type=int, default=3)
args = parser.parse_args()
try:
    import webdataset
except ImportError:
    raise SystemExit("error: this comparison needs the webdataset package: pip install webdataset") from None


def photo(rng):
    # photo-like (smooth noise upsampled, plus grain), so the jpegs are about real size
    small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    im = np.asarray(Image.fromarray(small).resize((500, 375), Image.BICUBIC), dtype=np.int16)
    im = np.clip(im + rng.integers(-8, 8, im.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, "jpeg", quality=90)
    return buf.getvalue()


def best(*fns):
    """samples/s of each fn, the fastest of --repeats, the fns timed in turn (a shared machine's load
    falls on both)"""
    times = [[] for _ in fns]
    for _ in range(args.repeats):
        for fn, t in zip(fns, times):
            start = time.perf_counter()
            n = fn()
            t.append(time.perf_counter() - start)
    return [n / min(t) for t in times]


with tempfile.TemporaryDirectory() as tmp:
    rng, jpegs = np.random.default_rng(0), []
    jpegs = [photo(rng) for _ in range(64)]
    for s in range(args.shards):
        samples = []
        for i in range(args.per_shard):
            key = f"{s:05d}{i:04d}"
            meta = {
                "url": f"http://x/{key}.jpg",
                "caption": f"a photo {key}",
                "key": key,
                "status": "success",
            }
            samples.append((key, {"jpg": jpegs[i % 64], "txt": f"a photo {key}", "json": json.dumps(meta)}))
        wds.write_shard(os.path.join(tmp, f"{s:05d}.tar"), samples)
    paths = [os.path.join(tmp, f"{s:05d}.tar") for s in range(args.shards)]
    mb = sum(os.path.getsize(p) for p in paths) / 1e6
    theirs = lambda ps: webdataset.WebDataset(ps, shardshuffle=False, empty_check=False)  # noqa: E731
    tensor = lambda jpg: data.to_tensor(data.load_image(io.BytesIO(jpg), 224))  # noqa: E731
    n_dec = max(1, args.decoded // args.per_shard)
    rows = {
        "bytes": best(
            lambda: sum(1 for p in paths for _ in wds.read_shard(p)), lambda: sum(1 for _ in theirs(paths))
        ),
        "decoded, 224 px": best(
            lambda: sum(
                1 for p in paths[:n_dec] for _, f in wds.read_shard(p) if tensor(f["jpg"]) is not None
            ),
            lambda: sum(1 for s in theirs(paths[:n_dec]) if tensor(s["jpg"]) is not None),
        ),
    }
    print(
        f"{args.shards} shards x {args.per_shard} samples, {mb:.0f} MB; samples/s, best of {args.repeats}\n"
    )
    print("| samples as | wds.read_shard | webdataset | ratio |\n|---|---|---|---|")
    for what, (ours, pkg) in rows.items():
        print(f"| {what} | {ours:.0f} | {pkg:.0f} | {ours / pkg:.2f} |")
