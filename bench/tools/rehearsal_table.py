"""docs/vsr.md's rehearsal table, made from the committed files of bench/results/rehearsal/ (one
folder a run: vsr.json and flickr8k.json are eval.py's JSON on the final checkpoint, vsr.json with
bench/tools/rehearsal_collect.py's accuracy per axis; metrics.jsonl the run's evals; walls.json the
wall clocks), so no figure of it is typed by hand.

    python bench/tools/rehearsal_table.py            # print the table
    python bench/tools/rehearsal_table.py --publish  # and write it into docs/vsr.md between its markers
"""

import argparse
import json
import os
import statistics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "bench", "results", "rehearsal")
PAGE = os.path.join(ROOT, "docs", "vsr.md")
MARKERS = ("<!-- rehearsal-table:start -->", "<!-- rehearsal-table:end -->")
ROWS = [  # (label, runs); every run in bench/studies/jobs/rehearsal.txt under its name
    ("start: `clip_scratch.py --data flickr8k` on the Flickr8k export", ["start_s0"]),
    (
        "the recipe (`REAL`'s terms, lr 4e-4): `--vsr_flips hv`, the kick for the first third",
        ["rec_s0", "rec_s1", "rec_s2"],
    ),
    (
        "the recipe without the preference term (`--pref_weight 0`)",
        ["rec_nopref_s0", "rec_nopref_s1", "rec_nopref_s2"],
    ),
    ("the recipe without the preference term, CLIP's term at weight 1 (`--alpha 1`)", ["rec_alpha1_s0"]),
    ("the recipe without the kick (`--imc_weight 0`)", ["rec_nokick_s0", "rec_nokick_s1", "rec_nokick_s2"]),
    ("the recipe without the twins (`--vsr_flips none`)", ["rec_noflips_s0"]),
    ("the recipe, kick weight 1", ["rec_kick1_s0"]),
    ("the recipe + `--l2sp 0.01`", ["rec_l2sp0.01_s0"]),
    (
        "the recipe, a third of the groups Flickr8k pairs (`--replay_share 0.33`), same steps",
        ["rec_replay0.33_s0"],
    ),
    ("the recipe, half the groups Flickr8k pairs (`--replay_share 0.5`), same steps", ["rec_replay0.5_s0"]),
    ("the recipe, a third Flickr8k pairs, 1.5x the steps (3,858)", ["rec_replay0.33_long_s0"]),
    ("the recipe, half Flickr8k pairs, 2x the steps (5,144)", ["rec_replay0.5_long_s0"]),
    (
        "the recipe, half Flickr8k pairs, 2x the steps, each pair's captions in turn (one an epoch)",
        ["rec_replay0.5_rot_s0", "rec_replay0.5_rot_s1", "rec_replay0.5_rot_s2"],
    ),
    ("the same + `--distill_weight 0.2`", ["rec_replay0.5_rot_distill0.2_s0"]),
    ("batch 64, 10 epochs, kick 268 steps, `--vsr_flips h`", ["p_fliph_e10_s0"]),
    ("the same, `--vsr_flips hv`", ["p_fliphv_e10_s0"]),
]
COLUMNS = [
    ("vsr", "vsr/acc", "test vsr/acc"),
    ("vsr", "vsr_axis/left/right", "left-right"),
    ("vsr", "vsr_axis/above/below", "above-below"),
    ("flickr8k", "retrieval/i2t_r1", "Flickr8k i2t R@1"),
    ("flickr8k", "retrieval/t2i_r1", "t2i R@1"),
]


def cell(values, fmt):
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def dev_max(run):
    """the best dev vsr/acc of a run's evals (None for the start, which has no dev split)"""
    lines = [json.loads(line) for line in open(os.path.join(RESULTS, run, "metrics.jsonl"))]
    dev = [r["vsr/acc"] for r in lines if r.get("split") == "val" and "vsr/acc" in r]
    return max(dev) if dev else None


def table():
    walls = json.load(open(os.path.join(RESULTS, "walls.json")))["wall_s"]
    head = ["run", "seeds", *(label for *_, label in COLUMNS), "best dev vsr/acc", "wall clock"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, runs in ROWS:
        files = {
            r: {k: json.load(open(os.path.join(RESULTS, r, f"{k}.json"))) for k in ("vsr", "flickr8k")}
            for r in runs
        }
        cells = [cell([files[r][f][key] for r in runs], ".3f") for f, key, _ in COLUMNS]
        dev = [d for d in map(dev_max, runs) if d is not None]
        wall = [walls[r] for r in runs]
        clock = " ± ".join(
            f"{int(s // 60)}:{int(s % 60):02d}"
            for s in ([statistics.mean(wall), statistics.stdev(wall)] if len(wall) > 1 else wall)
        )
        seeds = ", ".join(r.rsplit("_s", 1)[1] for r in runs)
        lines.append(
            f"| {label} | {seeds} | "
            + " | ".join(cells)
            + f" | {cell(dev, '.3f') if dev else '-'} | {clock} |"
        )
    stopped = ", ".join(f"`{r}` ({w})" for r, w in walls.items() if isinstance(w, str))
    return "\n".join(lines) + f"\n\nStopped by hand once their dev curve showed no rise: {stopped}.\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--publish", action="store_true", help="write the table into docs/vsr.md between its markers"
    )
    args = p.parse_args(argv)
    text = table()
    print(text)
    if args.publish:
        page = open(PAGE).read()
        start, end = page.index(MARKERS[0]) + len(MARKERS[0]) + 1, page.index(MARKERS[1])
        with open(PAGE + ".tmp", "w") as f:
            f.write(page[:start] + text + page[end:])
        os.replace(PAGE + ".tmp", PAGE)


if __name__ == "__main__":
    main()
