"""The methods table in one command: every method's default on the shapes world, from nothing, then
eval.py on every checkpoint; writes results.json, table.md and the plots.

    python bench/tools/methods_table.py                     # 3 seeds, every default in full
    python bench/tools/methods_table.py --quick             # 1 seed, short schedules: a lesson's worth (~10 min on 2 CPU cores)
    python bench/tools/methods_table.py --out_dir out/table --seeds 0 1 2 --jobs 2 --readme
    python bench/tools/methods_table.py --controls --readme  # DPO's default and controls, 3 starts x 3 seeds
    python bench/tools/methods_table.py --controls --publish --out_dir DIR  # the runs finished so far

Rows, each for every --seeds S: CLIP from scratch (`clip_scratch.py --seed S`), CLIPS (the same
script's synthetic-caption recipe), and each fine-tune of the scratch checkpoint of its seed
(`clip_hardneg.py`, `clip_dpo.py --init OUT/scratch_sS/ckpt.pt --seed S`). Every checkpoint is
evaluated on the shapes benchmark on the fixed test scenes and on two other world seeds
(`eval.py --seed`). --quick shortens every schedule (QUICK) and keeps one seed. A run whose
OUT_DIR/NAME/result.json exists is not run again, and a stopped run resumes from its last
checkpoint (`--resume`), so a stopped table continues where it was. --jobs runs that many at a
time, one CPU thread each (a fine-tune starts once its scratch checkpoint is done).

Writes OUT_DIR/results.json (one entry per run: method, script, seed, command, steps, wall_s,
threads, machine, and every metric eval.py prints, per world seed), OUT_DIR/table.md (mean ± std over the
seeds), OUT_DIR/probes_vs_step.png and OUT_DIR/probes.png (matplotlib, optional); --readme
publishes them: the table between README.md's methods-table markers, the files into bench/results/.
"""

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# eval.py --seed: None = the fixed test scenes (shapes.TEST_SEED), then two other worlds
WORLDS = (None, 1, 2)
CLIPS = ["--caption_mask", "subcaption", "--captioner_weight", "2", "--caption_style", "partial"]
METHODS = [  # (method, label, script, extra arguments, starts from the scratch checkpoint)
    ("scratch", "CLIP from scratch", "clip_scratch.py", [], False),
    ("clips", "CLIPS: synthetic captions, masked, + captioner", "clip_scratch.py", CLIPS, False),
    ("hardneg", "hard-negative fine-tune (CE-CLIP)", "clip_hardneg.py", [], True),
    ("dpo", "preference fine-tune (dpo_clip + kick)", "clip_dpo.py", [], True),
]
QUICK = {  # --quick: the same rows with short schedules (the fine-tunes' kick shortened with them)
    # CLIPS's captioner: ~3.6x a scratch step (1.05 s vs 0.29)
    "scratch": ["--max_steps", "600"],
    "clips": ["--max_steps", "250"],
    "hardneg": ["--max_steps", "1200"],
    "dpo": ["--max_steps", "1000", "--imc_steps", "350"],
}
MARKERS = ("<!-- methods-table:start -->", "<!-- methods-table:end -->")
# --controls: the DPO default and its one-term controls from every scratch start x every fine-tune seed
# (dpo-ROW_iSTART_sSEED; a row changes one thing of the default), published into docs/clip_dpo.md
CONTROLS = [  # (row, label, clip_dpo.py arguments), in the order the grid runs them
    ("default", "the default", []),
    ("nopref", "without the preference term (`--pref_weight 0`)", ["--pref_weight", "0"]),
    ("kickcaptions", "the kick on the caption sets only (`--imc_sets captions`)", ["--imc_sets", "captions"]),
    ("nokick", "without the kick (`--imc_weight 0`)", ["--imc_weight", "0"]),
    ("noclip", "without CLIP's term (`--clip_weight 0`)", ["--clip_weight", "0"]),
    ("nostatements", "without the statement sets (`--no-statements`)", ["--no-statements"]),
]
CONTROL_COLUMNS = [("statements/acc", "statements/acc"), ("probe/relation", "relation")]
CONTROL_OTHER = [("probe/attribute_swap", "attribute swap"), ("retrieval/i2t_r1", "i2t R@1")]
KICK_END = 1000  # clip_dpo.py's shapes --imc_steps: the kick's last step, an eval step of every run
GOAL = {"statements/acc": 0.88, "probe/relation": 0.90}  # issue 30's bar, every start on every seed
CONTROL_MARKERS = ("<!-- dpo-controls:start -->", "<!-- dpo-controls:end -->")
CONTROL_PAGE = os.path.join(ROOT, "docs", "clip_dpo.md")
SUMMARY_MARKERS = ("<!-- dpo-controls-summary:start -->", "<!-- dpo-controls-summary:end -->")
SUMMARY_PAGE = os.path.join(ROOT, "README.md")
# --readme copies table.md, results.json and the plots here (committed)
PUBLISHED = os.path.join(ROOT, "bench", "results")
COLUMNS = [
    ("retrieval/i2t_r1", "i2t R@1"),
    ("retrieval/t2i_r1", "t2i R@1"),
    ("probe/relation", "relation"),
    ("probe/attribute_swap", "attribute swap"),
    ("statements/acc", "statements/acc"),
    ("diag/relation_text_cos", "relation text cos"),
]


def control_commands(seeds, quick, out_dir):
    """--controls -> [(name, method, seed, argv, needs)]: the scratch starts, then every CONTROLS row from
    every start (scratch_sS) x every fine-tune seed F, named dpo-ROW_iS_sF"""
    runs = [r for r in commands(seeds, quick, out_dir) if r[1] == "scratch"]
    for row, _, extra in CONTROLS:
        for start in seeds:
            for seed in seeds:
                name, needs = f"dpo-{row}_i{start}_s{seed}", f"scratch_s{start}"
                argv = ["clip_dpo.py", *extra, *(QUICK["dpo"] if quick else []), "--seed", str(seed)]
                argv += [
                    "--out_dir",
                    os.path.join(out_dir, name),
                    "--init",
                    os.path.join(out_dir, needs, "ckpt.pt"),
                ]
                runs.append((name, f"dpo-{row}", seed, argv + ["--resume"], needs))
    return runs


def commands(seeds, quick, out_dir):
    """-> [(name, method, seed, argv, needs)]: every run of the table, fine-tunes after their scratch run"""
    runs = []
    for method, _, script, extra, finetune in METHODS:
        for seed in seeds:
            name = f"{method}_s{seed}"
            argv = [
                script,
                *extra,
                *(QUICK[method] if quick else []),
                "--seed",
                str(seed),
                "--out_dir",
                os.path.join(out_dir, name),
            ]
            needs = f"scratch_s{seed}" if finetune else None
            if finetune:
                argv += ["--init", os.path.join(out_dir, needs, "ckpt.pt")]
            runs.append((name, method, seed, argv + ["--resume"], needs))
    return runs


def machine():
    import torch

    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()})"
    )
    return {
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "device": device,
        "python": platform.python_version(),
    }


def evaluate(ckpt, out_dir, env, eval_n=1000):
    """eval.py on the shapes benchmark for every world of WORLDS -> {"test" | "world1" | ...: metrics}"""
    out = {}
    for world in WORLDS:
        key = "test" if world is None else f"world{world}"
        path = os.path.join(out_dir, f"eval_{key}.json")
        argv = [sys.executable, "eval.py", "--model", ckpt, "--json", path, "--eval_n", str(eval_n)] + (
            [] if world is None else ["--seed", str(world)]
        )
        subprocess.run(argv, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        out[key] = json.load(open(path))
    return out


def curve(run_dir):
    """the run's evals in order: [{step, split, metrics...}] from its metrics.jsonl"""
    path = os.path.join(run_dir, "metrics.jsonl")
    return (
        [r for r in map(json.loads, filter(str.strip, open(path))) if r.get("split", "train") != "train"]
        if os.path.exists(path)
        else []
    )


def mean_std(values, fmt=".3f"):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return (
        f"{values[0]:{fmt}}"
        if len(values) == 1
        else f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"
    )


def clock(seconds):
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


def table(results, quick):
    """results -> table.md's text: one row per method, mean ± std over its seeds, on the fixed test scenes"""
    lines = [
        "| method | command | seeds | "
        + " | ".join(label for _, label in COLUMNS)
        + " | relation, other worlds | wall clock |",
        "|---|---|---|" + "---|" * len(COLUMNS) + "---|---|",
    ]
    for method, label, script, extra, finetune in METHODS:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        cmd = " ".join(
            ["python", script, *extra, *(QUICK[method] if quick else [])]
            + (["--init SCRATCH"] if finetune else [])
        )
        cells = [mean_std([r["metrics"]["test"].get(k) for r in runs]) for k, _ in COLUMNS]
        worlds = mean_std(
            [r["metrics"][w]["probe/relation"] for r in runs for w in r["metrics"] if w != "test"]
        )
        wall = [r["wall_s"] for r in runs]
        wall = clock(statistics.mean(wall)) + (f" ± {clock(statistics.stdev(wall))}" if len(wall) > 1 else "")
        lines.append(
            f"| {label} | `{cmd}` | {', '.join(str(r['seed']) for r in runs)} | "
            + " | ".join(cells)
            + f" | {worlds} | {wall} |"
        )
    m = results[0]["machine"] if results else {}
    lines.append("")
    lines.append(
        f"Made by `python bench/tools/methods_table.py{' --quick' if quick else ''}` on {m.get('device')}, {m.get('cores')} cores, "
        f"torch {m.get('torch')}; fine-tunes start from the scratch checkpoint of their seed, wall clock per run "
        "(one thread each, --jobs at a time). Other worlds: `eval.py --seed 1` and `--seed 2`."
    )
    return "\n".join(lines) + "\n"


def spread(runs, key, by):
    """the standard deviation of the per-start (by="start") or per-seed means of `key` over the runs"""
    groups = {}
    for r in runs:
        groups.setdefault(r[by], []).append(r["metrics"]["test"][key])
    means = [statistics.mean(v) for v in groups.values()]
    return f"{statistics.stdev(means):.3f}" if len(means) > 1 else "-"


def reach(runs, goal=GOAL):
    """how many of the runs meet every bound of goal on the fixed test scenes"""
    return sum(all(r["metrics"]["test"][k] >= v for k, v in goal.items()) for r in runs)


def controls_table(results):
    """the --controls results -> docs/clip_dpo.md's text: per CONTROLS row, the mean ± std over every run,
    the spread over starts and over seeds apart, and how many runs reach GOAL"""
    head = ["row", "runs (starts x seeds)"]
    for _, label in CONTROL_COLUMNS:
        head += [label, "over starts", "over seeds"]
    names = dict(CONTROL_COLUMNS)
    head += [label for _, label in CONTROL_OTHER]
    head.append(" & ".join(f"{names[k].split('/')[0]} >= {v}" for k, v in GOAL.items()))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, label, _ in CONTROLS:
        runs = [r for r in results if r["method"] == f"dpo-{row}"]
        if not runs:
            continue
        cells = [label, f"{len(runs)} ({len({r['start'] for r in runs})} x {len({r['seed'] for r in runs})})"]
        for key, _ in CONTROL_COLUMNS:
            values = [r["metrics"]["test"][key] for r in runs]
            cells += [mean_std(values), spread(runs, key, "start"), spread(runs, key, "seed")]
        cells += [mean_std([r["metrics"]["test"][key] for r in runs]) for key, _ in CONTROL_OTHER]
        reached = reach(runs)
        lines.append("| " + " | ".join(cells + [f"{reached} of {len(runs)}"]) + " |")
    m = results[0]["machine"] if results else {}
    planned = len(CONTROLS) * 9
    partial = (
        f"**{len(results)} of the grid's {planned} runs are finished so far**: a row of fewer than 9 runs is "
        "partial, its spreads over the starts and seeds it has; "
        if len(results) < planned
        else ""
    )
    lines += [
        "",
        f"Made by `python bench/tools/methods_table.py --controls` on {m.get('device')}, "
        f"{m.get('cores')} cores; {partial}each row from the scratch checkpoints of seeds 0, 1, 2 (the "
        "Results table's) x fine-tune seeds 0, 1, 2; "
        "over starts / over seeds: the standard deviation of the three per-start / per-seed means. "
        "Every run's command, start, seed, machine, wall clock and eval curve: bench/results/controls/.",
    ]
    pairs = control_pairs(results)
    return "\n".join(lines + ([""] + pairs if pairs else [])) + "\n"


def control_pairs(results):
    """each control row against the default on the (start, seed) pairs both have -> one line each: the
    row's statements, relation and i2t R@1 instead of the default's, the statements' and the relation's
    change by start (the mean over that start's seeds of control - default, in points) and in how many
    pairs it is lower, and the bar"""
    default = {(r["start"], r["seed"]): r for r in results if r["method"] == "dpo-default"}

    def versus(runs, same, key):
        mine, theirs = ([r["metrics"]["test"][key] for r in rs] for rs in (runs, same))
        return f"{mean_std(mine)} instead of {mean_std(theirs)}"

    def by_start(runs, same, key):
        starts = sorted({r["start"] for r in runs})
        change = [
            statistics.mean(
                100 * (r["metrics"]["test"][key] - d["metrics"]["test"][key])
                for r, d in zip(runs, same)
                if r["start"] == i
            )
            for i in starts
        ]
        where = f"start{'s' if len(starts) > 1 else ''} {', '.join(map(str, starts))}"
        lower = sum(r["metrics"]["test"][key] < d["metrics"]["test"][key] for r, d in zip(runs, same))
        return (
            f"lower in {lower} of {len(runs)} pairs; "
            + ", ".join(f"{c:+.1f}" for c in change)
            + f" points from {where}"
        )

    lines = []
    for row, label, _ in CONTROLS[1:]:
        runs = [r for r in results if r["method"] == f"dpo-{row}" and (r["start"], r["seed"]) in default]
        if not runs:
            continue
        same = [default[r["start"], r["seed"]] for r in runs]
        with_ = label if label.startswith("without") else "with " + label
        statements, relation = (
            f"{versus(runs, same, key)} ({by_start(runs, same, key)})" for key, _ in CONTROL_COLUMNS
        )
        lines.append(
            f"- {with_[0].upper() + with_[1:]}, from the same starts and seeds ({len(runs)} of 9"
            f"{' so far' if len(runs) < 9 else ''}): the statements reach {statements}, the relation "
            f"{relation}, i2t R@1 {versus(runs, same, 'retrieval/i2t_r1')}; the bar in {reach(runs)} of "
            f"{len(runs)} runs instead of {reach(same)}."
        )
    return (
        ["Each row against the default from the same start with the same seed:", ""] + lines if lines else []
    )


def controls_summary(results):
    """the --controls results -> README's sentences (between SUMMARY_MARKERS): how often the default
    reaches GOAL, and the default against the control without the preference term on the same starts
    and seeds; a row not finished says how many of its 9 runs it has"""
    rows = {row: [r for r in results if r["method"] == f"dpo-{row}"] for row, *_ in CONTROLS}
    default, nopref = rows["default"], rows["nopref"]
    if not default:
        return "The controls grid has no finished run of the default yet.\n"

    def of(runs):
        return f"{len(runs)} of 9 runs" + (" so far" if len(runs) < 9 else "")

    def value(runs, key):
        return mean_std([r["metrics"]["test"][key] for r in runs])

    relation = {"probe/relation": GOAL["probe/relation"]}
    text = (
        f"From the Results table's three scratch checkpoints x fine-tune seeds 0, 1, 2 ({of(default)}), the "
        f"DPO default reaches statements/acc >= {GOAL['statements/acc']} and relation >= "
        f"{GOAL['probe/relation']} in {reach(default, GOAL)} of {len(default)} runs (relation >= "
        f"{GOAL['probe/relation']} by itself in {reach(default, relation)}); the statements end at "
        f"{value(default, 'statements/acc')}, spread {spread(default, 'statements/acc', 'start')} over the "
        f"starts and "
        f"{spread(default, 'statements/acc', 'seed')} over the seeds."
    )
    by_start = sorted({r["start"] for r in default})
    hits = {r["name"]: reach([r], GOAL) == 1 for r in default}
    counts = [sum(hits[r["name"]] for r in default if r["start"] == i) for i in by_start]
    totals = [sum(r["start"] == i for r in default) for i in by_start]
    text += (
        f" By start ({', '.join(map(str, by_start))}): "
        + ", ".join(f"{c} of {t}" for c, t in zip(counts, totals))
        + "."
    )
    at_kick = {
        r["name"]: next((e["probe/relation"] for e in r.get("curve", []) if e["step"] == KICK_END), None)
        for r in default
    }
    ranges = [
        [at_kick[r["name"]] for r in default if hits[r["name"]] == hit and at_kick[r["name"]] is not None]
        for hit in (True, False)
    ]
    if all(ranges):
        text += (
            f" At the kick's end (step {KICK_END:,}) the relation stood at {min(ranges[0]):.2f} to "
            f"{max(ranges[0]):.2f} in the runs that reach the bar and {min(ranges[1]):.2f} to "
            f"{max(ranges[1]):.2f} in those that miss it."
        )
    pairs = {(r["start"], r["seed"]) for r in default} & {(r["start"], r["seed"]) for r in nopref}
    if pairs:
        same = [[r for r in runs if (r["start"], r["seed"]) in pairs] for runs in (default, nopref)]
        text += (
            f" From the same starts and seeds ({len(pairs)} of 9{' so far' if len(pairs) < 9 else ''}), "
            f"without the preference term (`--pref_weight 0`) the statements reach "
            f"{value(same[1], 'statements/acc')} instead of {value(same[0], 'statements/acc')}, and the "
            f"relation {value(same[1], 'probe/relation')} instead of {value(same[0], 'probe/relation')}."
        )
    return text + "\n"


def plots(results, out_dir):
    """probes_vs_step.png (relation and attribute swap over each run's evals) and probes.png (the
    final probes per method, plain CLIP's chance line at 0.5); None if matplotlib is missing"""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, key in zip(axes, ("probe/relation", "probe/attribute_swap")):
        for i, (method, label, *_) in enumerate(METHODS):
            for j, r in enumerate(x for x in results if x["method"] == method):
                points = [(e["step"], e[key]) for e in r["curve"] if key in e]
                if points:
                    ax.plot(
                        *zip(*points), color=f"C{i}", alpha=0.8, label=label if j == 0 else None, marker="."
                    )
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set(
            title=key.split("/")[1].replace("_", " "),
            xlabel="training step (of each script)",
            ylim=(0.0, 1.02),
        )
    axes[0].set_ylabel("probe accuracy (each eval)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "probes_vs_step.png"), dpi=110)
    probes = [
        "probe/relation",
        "probe/attribute_swap",
        "probe/colour_replace",
        "probe/shape_replace",
        "probe/word_order",
        "statements/acc",
    ]
    fig, ax = plt.subplots(figsize=(10, 3.6))
    width = 0.8 / len(METHODS)
    for i, (method, label, *_) in enumerate(METHODS):
        runs = [r for r in results if r["method"] == method]
        if runs:
            means = [statistics.mean(r["metrics"]["test"][p] for r in runs) for p in probes]
            ax.bar([k + i * width for k in range(len(probes))], means, width, label=label, color=f"C{i}")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="chance")
    ax.set_xticks(
        [k + 0.4 - width / 2 for k in range(len(probes))],
        [p.replace("probe/", "").replace("_", " ") for p in probes],
    )
    ax.set(ylim=(0.0, 1.15), ylabel="accuracy (test scenes)")
    ax.legend(fontsize=7, ncol=5, loc="upper center")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "probes.png"), dpi=110)
    plt.close("all")
    return ["probes_vs_step.png", "probes.png"]


def readme_table(path=os.path.join(ROOT, "README.md"), markers=MARKERS):
    """-> (the page's text, start, end): the table is text[start:end], between the markers"""
    readme = open(path).read()
    return readme, readme.index(markers[0]) + len(markers[0]) + 1, readme.index(markers[1])


def write_between(path, markers, text):
    """text into the page at path between its markers, atomically"""
    page, start, end = readme_table(path, markers)
    with open(path + ".tmp", "w") as f:
        f.write(page[:start] + text + page[end:])
    os.replace(path + ".tmp", path)


def publish_controls(results, page=None, published=None, readme=None):
    """--controls --readme: every run's result (with its curve) into bench/results/controls/NAME.json,
    the table into docs/clip_dpo.md between the CONTROL_MARKERS, the summary into README.md between the
    SUMMARY_MARKERS"""
    folder = published or os.path.join(PUBLISHED, "controls")
    os.makedirs(folder, exist_ok=True)
    for r in results:
        # every run this tool made has had OMP_NUM_THREADS=1 (recorded in the result since 2026-12-07)
        r.setdefault("threads", 1)
        with open(os.path.join(folder, r["name"] + ".json"), "w") as f:
            json.dump(r, f, indent=1)
    write_between(page or CONTROL_PAGE, CONTROL_MARKERS, controls_table(load_controls(folder)))
    write_between(readme or SUMMARY_PAGE, SUMMARY_MARKERS, controls_summary(load_controls(folder)))


def load_controls(folder=None):
    """the committed --controls results: bench/results/controls/*.json, the fine-tunes only"""
    folder = folder or os.path.join(PUBLISHED, "controls")
    names = sorted(n for n in os.listdir(folder) if n.startswith("dpo-") and n.endswith(".json"))
    return [json.load(open(os.path.join(folder, n))) for n in names]


def publish(out_dir, text, files, path=os.path.join(ROOT, "README.md")):
    """the table into README.md between the MARKERS, table.md, results.json and the plots into PUBLISHED"""
    os.makedirs(PUBLISHED, exist_ok=True)
    for name in ["table.md", "results.json", *files]:
        shutil.copyfile(os.path.join(out_dir, name), os.path.join(PUBLISHED, name))
    write_between(path, MARKERS, text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="one seed (the first of --seeds) and the QUICK schedules"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--out_dir", default=None, help="default: out/methods_table (out/methods_table_quick with --quick)"
    )
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one CPU thread each")
    p.add_argument("--methods", nargs="+", default=[m[0] for m in METHODS], choices=[m[0] for m in METHODS])
    p.add_argument(
        "--readme",
        action="store_true",
        help="publish: the table into README.md, its files into bench/results/",
    )
    p.add_argument(
        "--extra", default="", help="arguments added to every training command (e.g. '--device cuda')"
    )
    p.add_argument("--eval_n", type=int, default=1000, help="test scenes per world")
    p.add_argument(
        "--publish",
        action="store_true",
        help="nothing runs: README's table and bench/results/table.md made "
        "anew from the committed bench/results/results.json; with --controls: the finished runs of "
        "--out_dir committed and docs/clip_dpo.md's table made from them, while the grid goes on",
    )
    p.add_argument(
        "--controls",
        action="store_true",
        help="the DPO default and its one-term controls (CONTROLS) from every "
        "scratch start x every fine-tune seed, instead of the methods; --readme publishes them into "
        "docs/clip_dpo.md",
    )
    args = p.parse_args(argv)
    if args.publish and args.controls:  # the runs of --out_dir finished so far, the grid still going
        if not args.out_dir:
            p.error("--controls --publish publishes the finished runs of a grid: give its --out_dir")
        names = [r[0] for r in control_commands(args.seeds, False, args.out_dir)]
        files = [os.path.join(args.out_dir, n, "result.json") for n in names]
        results = [json.load(open(f)) for f in files if os.path.exists(f)]
        if not any(r["method"].startswith("dpo-") for r in results):
            p.error(f"--controls --publish: no fine-tune of {args.out_dir} has finished")
        publish_controls(results)
        return print(
            f"{len(results)} of {len(names)} runs of {args.out_dir} -> "
            f"{os.path.relpath(os.path.join(PUBLISHED, 'controls'), ROOT)}/ and docs/clip_dpo.md"
        )
    if args.publish and os.path.isdir(os.path.join(PUBLISHED, "controls")):
        write_between(CONTROL_PAGE, CONTROL_MARKERS, controls_table(load_controls()))
        write_between(SUMMARY_PAGE, SUMMARY_MARKERS, controls_summary(load_controls()))
    if args.publish:
        text = table(json.load(open(os.path.join(PUBLISHED, "results.json"))), quick=False)
        with open(os.path.join(PUBLISHED, "table.md"), "w") as f:
            f.write(text)
        readme, start, end = readme_table()
        with open(os.path.join(ROOT, "README.md.tmp"), "w") as f:
            f.write(readme[:start] + text + readme[end:])
        os.replace(os.path.join(ROOT, "README.md.tmp"), os.path.join(ROOT, "README.md"))
        return print(
            f"README.md's table and {os.path.relpath(PUBLISHED, ROOT)}/table.md made from results.json"
        )
    if args.readme and (args.quick or args.methods != [m[0] for m in METHODS]):
        p.error("--readme publishes the whole table: drop --quick and --methods")
    if args.controls and args.methods != [m[0] for m in METHODS]:
        p.error("--controls runs the DPO rows of CONTROLS: drop --methods")
    seeds = args.seeds[:1] if args.quick else args.seeds
    out_dir = args.out_dir or ("out/methods_table_quick" if args.quick else "out/methods_table")
    os.makedirs(out_dir, exist_ok=True)
    out_dir = os.path.abspath(out_dir)
    runs = (
        control_commands(seeds, args.quick, out_dir)
        if args.controls
        else [r for r in commands(seeds, args.quick, out_dir) if r[1] in args.methods]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    info, t0, running, finished = machine(), time.time(), {}, {}
    for name, *_ in runs:
        if os.path.exists(os.path.join(out_dir, name, "result.json")):
            finished[name] = json.load(open(os.path.join(out_dir, name, "result.json")))
    print(f"{len(finished)} of {len(runs)} runs already finished -> {out_dir}", flush=True)
    queue = [r for r in runs if r[0] not in finished]
    while queue or running:
        for run in list(queue):
            name, method, seed, argv, needs = run
            if len(running) >= args.jobs or (
                needs and needs not in finished and any(needs == q[0] for q in runs)
            ):
                continue
            queue.remove(run)
            os.makedirs(os.path.join(out_dir, name), exist_ok=True)
            full = [sys.executable, *argv, *shlex.split(args.extra)]
            log = open(os.path.join(out_dir, name, "train.log"), "a")
            running[name] = (
                run,
                subprocess.Popen(full, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env),
                time.time(),
                full,
            )
        for name, (run, proc, start, full) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode != 0:
                sys.exit(
                    f"{name} failed (exit {proc.returncode}): see {os.path.join(out_dir, name, 'train.log')}"
                )
            wall = time.time() - start
            _, method, seed, argv, needs = run
            metrics = evaluate(
                os.path.join(out_dir, name, "ckpt.pt"), os.path.join(out_dir, name), env, args.eval_n
            )
            evals = curve(os.path.join(out_dir, name))
            result = {
                "name": name,
                "method": method,
                "script": argv[0],
                "seed": seed,
                "start": int(needs.rsplit("_s", 1)[1]) if needs else None,  # the scratch seed it starts from
                "command": shlex.join(["python", *full[1:]]),
                "steps": max((e["step"] for e in evals), default=None),
                "wall_s": round(wall, 1),
                "threads": int(env["OMP_NUM_THREADS"]),
                "machine": info,
                "metrics": metrics,
                "curve": evals,
            }
            with open(os.path.join(out_dir, name, "result.json.tmp"), "w") as f:
                json.dump(result, f, indent=1)
            os.replace(
                os.path.join(out_dir, name, "result.json.tmp"), os.path.join(out_dir, name, "result.json")
            )
            finished[name] = result
            done = [r for r in runs if r[0] in finished]
            walls = {m: [finished[r[0]]["wall_s"] for r in done if r[1] == m] for m in {r[1] for r in runs}}
            # for a method with no finished run yet
            typical = statistics.mean(finished[r[0]]["wall_s"] for r in done)
            left = sum(statistics.mean(walls[r[1]] or [typical]) for r in runs if r[0] not in finished) / max(
                1, args.jobs
            )
            test = metrics["test"]
            print(
                f"[{clock(time.time() - t0)}] {name}: {clock(wall)}, relation {test['probe/relation']:.3f}, attribute swap "
                f"{test['probe/attribute_swap']:.3f}, statements/acc {test['statements/acc']:.3f}, R@1 {test['retrieval/i2t_r1']:.3f} / "
                f"{test['retrieval/t2i_r1']:.3f} | {len(done)}/{len(runs)} done, ~{clock(left)} left",
                flush=True,
            )
        time.sleep(2)
    results = [finished[r[0]] for r in runs]
    if args.controls:
        text = controls_table([r for r in results if r["method"].startswith("dpo-")])
        with open(os.path.join(out_dir, "controls.md"), "w") as f:
            f.write(text)
        print(text)
        if args.readme:
            publish_controls([r for r in results if r["method"].startswith("dpo-")])
            print("docs/clip_dpo.md's controls table and bench/results/controls/ updated")
        return
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump([{k: v for k, v in r.items() if k != "curve"} for r in results], f, indent=1)
    text = table(results, args.quick)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(text)
    print(text)
    pictures = plots(results, out_dir)
    print(f"plots: {', '.join(pictures)}" if pictures else "plots skipped: pip install matplotlib")
    if args.readme:
        publish(out_dir, text, pictures or [])
        print(f"README.md's table and {os.path.relpath(PUBLISHED, ROOT)}/ updated")


if __name__ == "__main__":
    main()
