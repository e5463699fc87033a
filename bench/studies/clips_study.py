"""
The CLIPS study on the shapes world (issue 3): every row trains clip_scratch.py from scratch with
the same budget (steps x batch, i.e. the same images seen), 3 seeds each, then reports the final
shapes-bench metrics as mean +- std.

    python bench/studies/clips_study.py                         # ~2 h on 2 CPU cores (2 runs at a time)
    python bench/studies/clips_study.py --rows block16 block64 --seeds 0 --json out/clips_study_partial/k.json  # K ablation
    python bench/studies/clips_study.py --caption_style full --out_dir out/clips_study  # full web captions
    python bench/studies/clips_study.py --steps 100 --seeds 0   # a quick look

Rows: plain CLIP on the web captions; the full synthetic caption (tokenizer-truncated at the
77-token context); each token reduction at K = 32; sub-caption + the captioner (weight 2.0).
`--rows` picks others by folder name, e.g. block masking at K = 16 and 64 (the paper's K
ablation, for the block strategy only). All
synthetic rows use the dual-caption loss (web + synthetic), so the rows differ only in what the
text encoder sees of the synthetic caption (and, in the last row, the captioner). Every run uses
--context_length 77, so that the 59-66-token descriptions fit whole in the "full" row, and the
same web captions: terse, partial ones by default (shapes.partial_caption), as CLIPS assumes.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROWS = {  # row -> (run folder, flags)
    "plain (web captions)": ("plain", ["--caption_mask", "none"]),
    "full synthetic (truncated at 77)": ("full", ["--caption_mask", "truncate", "--mask_len", "77"]),
    "truncate K=32": ("truncate", ["--caption_mask", "truncate"]),
    "random K=32": ("random", ["--caption_mask", "random"]),
    "block K=32": ("block", ["--caption_mask", "block"]),
    "subcaption K=32": ("subcaption", ["--caption_mask", "subcaption"]),
    "subcaption + captioner": ("captioner", ["--caption_mask", "subcaption", "--captioner_weight", "2"]),
    "block K=16": ("block16", ["--caption_mask", "block", "--mask_len", "16"]),
    "block K=64": ("block64", ["--caption_mask", "block", "--mask_len", "64"]),
}
METRICS = [
    "retrieval/i2t_r1",
    "retrieval/t2i_r1",
    "retrieval/i2t_r5",
    "retrieval/rsum",
    "probe/relation",
    "probe/attribute_swap",
    "probe/colour_replace",
    "probe/shape_replace",
    "probe/word_order",
    "diag/relation_text_cos",
]


def final_eval(metrics, steps):
    """the run's final shapes eval, or None if it has not finished: clip_scratch.py writes a "test"
    line at step 0 and at its last step, "val" lines only in between (runs of older versions wrote
    their final shapes eval as "val": also found, so their study folders resume)"""
    if not os.path.exists(metrics):
        return None
    with open(metrics) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if r.get("split") in ("test", "val") and r.get("step") == steps]
    return rows[-1] if rows else None


def run(row, seed, args):
    out = os.path.join(args.out_dir, f"{ROWS[row][0]}_s{seed}")
    metrics = os.path.join(out, "metrics.jsonl")
    if final_eval(metrics, args.steps) is None:  # finished runs are reused, so the study can be resumed
        cmd = [
            sys.executable,
            "clip_scratch.py",
            "--context_length",
            "77",
            "--max_steps",
            str(args.steps),
            "--warmup_steps",
            str(args.warmup),
            "--eval_every",
            "0",
            "--ckpt_every",
            "0",
            "--log_every",
            "100",
            "--seed",
            str(seed),
            "--out_dir",
            out,
            "--caption_style",
            args.caption_style,
            *ROWS[row][1],
        ]
        t = time.time()
        r = subprocess.run(
            cmd,
            cwd=ROOT,
            env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)),
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise SystemExit(f"{row} seed {seed} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        print(f"{row:34s} seed {seed}: {time.time() - t:.0f}s", flush=True)
    final = final_eval(metrics, args.steps)
    if final is None:
        raise SystemExit(f"{row} seed {seed}: no final test eval at step {args.steps} in {metrics}")
    return final


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--parallel", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument(
        "--rows",
        nargs="+",
        default=[f for f, _ in ROWS.values()][:7],
        help="run folders: " + " ".join(f for f, _ in ROWS.values()),
    )
    p.add_argument(
        "--caption_style",
        default="partial",
        choices=("full", "partial"),
        help="the shapes web captions of every row (clip_scratch.py --caption_style)",
    )
    p.add_argument("--out_dir", default="out/clips_study_partial")
    p.add_argument("--json", default=None, help="default: out_dir/study.json")
    args = p.parse_args()
    rows = [row for row, (folder, _) in ROWS.items() if folder in args.rows]
    jobs = [(row, seed) for seed in args.seeds for row in rows]  # one seed of every row first
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda job: (job, run(*job, args)), jobs))
    every = [k for k in results[0][1] if k.startswith(("retrieval/", "probe/", "diag/"))]
    with open(args.json or os.path.join(args.out_dir, "study.json"), "w") as f:  # every metric of every run
        json.dump(
            {
                "steps": args.steps,
                "seeds": args.seeds,
                "caption_style": args.caption_style,
                "rows": {
                    row: {k: [m[k] for (r, _), m in results if r == row] for k in every} for row in rows
                },
            },
            f,
            indent=1,
        )
    table = {row: {k: [m[k] for (r, _), m in results if r == row] for k in METRICS} for row in rows}
    short = [k.split("/")[1] for k in METRICS]
    print(f"\n{args.steps} steps x 128, {args.caption_style} web captions, seeds {args.seeds}: mean +- std")
    print("| row | " + " | ".join(short) + " |\n|---|" + "---|" * len(short))
    for row, cols in table.items():
        cells = [
            f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}"
            if "rsum" not in k
            else f"{statistics.mean(v):.1f} ± {statistics.stdev(v) if len(v) > 1 else 0:.1f}"
            for k, v in cols.items()
        ]
        print(f"| {row} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
