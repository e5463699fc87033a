"""After a rehearsal run (bench/studies/jobs/rehearsal.txt): the final checkpoint's eval JSONs and its
metrics.jsonl into bench/results/rehearsal/NAME/ (small files only, no checkpoint):
  flickr8k.json  eval.py --bench flickr8k on the export's Flickr8k (retrieval R@1 vs the start)
  vsr.json       eval.py --bench vsr on the export's VSR (test vsr/acc), plus vsr/acc per axis
                 (left/right rows, above/below rows): --vsr_flips h gives twins to the first only

    python bench/tools/rehearsal_collect.py --run /work/rehearsal-runs/NAME --export X
"""

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import data  # noqa: E402
import eval as ev  # noqa: E402
from model import load_model  # noqa: E402

AXES = {"left/right": ("left of", "right of"), "above/below": ("above", "below")}


def per_axis(ckpt, root):
    """vsr/acc (the contrast protocol, eval.vsr_contrast) on the test rows of each axis"""
    model, preprocess, tokenizer = load_model(ckpt)
    rows = data.read_vsr(root)["test"]
    paths = sorted({r.image for r in rows})
    where = {p: i for i, p in enumerate(paths)}
    img = ev.encode_pil(model, preprocess, paths, "cpu")
    out = {}
    for axis, relations in AXES.items():
        rs = [r for r in rows if r.relation in relations]
        m = ev.vsr_contrast(
            img[[where[r.image] for r in rs]],
            ev.encode_texts(model, tokenizer, [r.caption for r in rs], "cpu"),
            ev.encode_texts(
                model, tokenizer, [data.contrast_caption(r.caption, r.relation) for r in rs], "cpu"
            ),
            [r.label for r in rs],
        )
        out[f"vsr_axis/{axis}"], out[f"vsr_axis/{axis}_n"] = m["acc"], len(rs)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="the run's out_dir (ckpt.pt, metrics.jsonl)")
    p.add_argument("--export", required=True, help="bench/tools/export_shapes.py's --out (flickr8k/, vsr/)")
    p.add_argument("--results", default=None, help="default bench/results/rehearsal/<the run's folder name>")
    args = p.parse_args(argv)
    results = args.results or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "results",
        "rehearsal",
        os.path.basename(args.run.rstrip("/")),
    )
    os.makedirs(results, exist_ok=True)
    ckpt = os.path.join(args.run, "ckpt.pt")
    ev.main(
        [
            "--model",
            ckpt,
            "--bench",
            "flickr8k",
            "--data_root",
            os.path.join(args.export, "flickr8k"),
            "--json",
            os.path.join(results, "flickr8k.json"),
        ]
    )
    vsr = os.path.join(results, "vsr.json")
    ev.main(
        ["--model", ckpt, "--bench", "vsr", "--data_root", os.path.join(args.export, "vsr"), "--json", vsr]
    )
    m = json.load(open(vsr)) | per_axis(ckpt, os.path.join(args.export, "vsr"))
    with open(vsr, "w") as f:
        json.dump(m, f, indent=1)
    if os.path.exists(os.path.join(args.run, "metrics.jsonl")):
        shutil.copy(os.path.join(args.run, "metrics.jsonl"), os.path.join(results, "metrics.jsonl"))
    print(json.dumps({k: m[k] for k in ("vsr/acc", *(k for k in m if k.startswith("vsr_axis/")))}))


if __name__ == "__main__":
    main()
