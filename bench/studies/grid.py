"""Run many training commands side by side (one GPU shared by several processes, or CPU cores) and
bundle their logs and metrics into one archive.

    python bench/studies/grid.py JOBS.txt --out_dir out/grid --jobs 16 --deadline 540
    python bench/studies/grid.py bench/studies/jobs/finetune_levers.txt --jobs 22     # bench/LOG.md's 2026-11-25 fine-tuning tables (one GPU)
    python bench/studies/grid.py bench/studies/jobs/dpo_table.txt --jobs 2 --out_dir out/dpo_table --table  # 2 CPU cores

JOBS.txt: one job a line, `NAME  SCRIPT ARGS...` (blank lines and # comments skipped); each job runs
as `python SCRIPT ARGS --out_dir OUT_DIR/NAME` with one CPU thread, its output in OUT_DIR/NAME.log.
At --deadline seconds the jobs still running are stopped (their evals so far are kept). A job whose
OUT_DIR/NAME/metrics.jsonl already holds its final test eval (split "test" at the job's --max_steps:
the training scripts also write a "test" line at step 0, and "val" lines in between) is not run
again, so a stopped grid resumes. At the end OUT_DIR/grid.tar.gz holds every log and metrics.jsonl
(no checkpoints) and a summary line per job; --table also prints the final test metrics as a
markdown table, mean ± std over the jobs whose names differ only in a trailing _s<seed> (and writes
OUT_DIR/table.json).
On one H100, 22 of the shapes fine-tunes (3,000 steps each) ran side by side in ~5-7 minutes; the GPU
was the bottleneck (100% busy with tiny kernels from 22 processes), so their wall clocks say nothing
about one run's speed.
"""

import argparse
import ast
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tarfile
import time

COLUMNS = [
    "retrieval/i2t_r1",
    "retrieval/t2i_r1",
    "retrieval/rsum",
    "probe/relation",
    "probe/attribute_swap",
    "probe/colour_replace",
    "probe/shape_replace",
    "probe/word_order",
    "diag/relation_text_cos",
    "statements/acc",
    "statements/macro_f1",
]


def max_steps(cmd):
    """the job's --max_steps: from its arguments, else the default in its script's argparse (read
    from the source, nothing imported); None if neither says"""
    script, *argv = cmd
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--max_steps", type=int)
    given = p.parse_known_args(argv)[0].max_steps
    if given is not None or not os.path.isfile(script):
        return given
    for node in ast.walk(ast.parse(open(script).read())):
        if (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "add_argument"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value == "--max_steps"
        ):
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            return ast.literal_eval(default) if default is not None else None
    return None


def final_test(out_dir, name, cmd):
    """the job's final test-split eval, or None: the last "test" line at the job's last step,
    max_steps(cmd) (the training scripts also write one at step 0, before training; with the last
    step unknown, any "test" line after step 0)"""
    path = os.path.join(out_dir, name, "metrics.jsonl")
    rows = [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []
    last = max_steps(cmd)
    rows = [
        r
        for r in rows
        if r.get("split", "test") == "test"
        and (r.get("step") == last if last is not None else r.get("step", 1) > 0)
    ]
    return rows[-1] if rows else None


def table(out_dir, jobs, wall):
    """rows grouped by name without its _s<seed> -> (markdown lines, {row: {metric: [values]}})"""
    groups = {}
    for name, cmd in jobs:
        m = final_test(out_dir, name, cmd)
        if m is not None:
            groups.setdefault(re.sub(r"_s\d+$", "", name), []).append((m, wall.get(name)))
    cols = COLUMNS + ["wall_s"]
    lines = [
        "| row | seeds | " + " | ".join(re.sub(r"^(retrieval|probe|diag)/", "", c) for c in cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    values = {}
    for row, runs in groups.items():
        values[row] = {c: [m.get(c) if c != "wall_s" else w for m, w in runs] for c in cols}
        cells = []
        for c, v in values[row].items():
            v = [x for x in v if x is not None]
            fmt = ".1f" if c in ("retrieval/rsum", "wall_s") else ".3f"
            cells.append(
                ""
                if not v
                else f"{v[0]:{fmt}}"
                if len(v) == 1
                else f"{statistics.mean(v):{fmt}} ± {statistics.stdev(v):{fmt}}"
            )
        lines.append(f"| {row} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines, values


p = argparse.ArgumentParser()
p.add_argument("jobs_file")
p.add_argument("--out_dir", default="out/grid")
p.add_argument("--jobs", type=int, default=8, help="processes at a time")
p.add_argument("--deadline", type=float, default=0, help="seconds; 0 = none")
p.add_argument("--archive", default=None, help="default: OUT_DIR/grid.tar.gz")
p.add_argument("--table", action="store_true", help="print the final test metrics, mean ± std over seeds")
args = p.parse_args()

jobs = []
for line in open(args.jobs_file):
    line = line.split("#", 1)[0].strip()
    if line:
        name, *cmd = shlex.split(line)
        jobs.append((name, cmd))
os.makedirs(args.out_dir, exist_ok=True)
env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
summary_path = os.path.join(args.out_dir, "summary.json")
done = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
t0, queue, running = time.time(), [(n, c) for n, c in jobs if final_test(args.out_dir, n, c) is None], {}
print(f"{len(jobs) - len(queue)} of {len(jobs)} jobs already finished", flush=True)
while queue or running:
    while queue and len(running) < args.jobs and not (args.deadline and time.time() - t0 > args.deadline):
        name, cmd = queue.pop(0)
        log = open(os.path.join(args.out_dir, name + ".log"), "w")
        full = [sys.executable, *cmd, "--out_dir", os.path.join(args.out_dir, name)]
        log.write(" ".join(full) + "\n")
        log.flush()
        running[name] = (
            subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT, env=env),
            time.time(),
            log,
        )
    if args.deadline and time.time() - t0 > args.deadline:
        for name, (proc, start, _log) in running.items():
            proc.kill()
            done[name] = {"rc": "killed at deadline", "wall_s": round(time.time() - start, 1)}
        running, queue = {}, []
        break
    for name, (proc, start, log) in list(running.items()):
        if proc.poll() is not None:
            log.close()
            done[name] = {"rc": proc.returncode, "wall_s": round(time.time() - start, 1)}
            print(
                f"[{time.time() - t0:6.0f}s] {name}: rc {proc.returncode}, {done[name]['wall_s']} s",
                flush=True,
            )
            del running[name]
    time.sleep(1)
for name, cmd in jobs:
    done.setdefault(
        name, {"rc": "not started" if final_test(args.out_dir, name, cmd) is None else "finished before"}
    )
with open(summary_path, "w") as f:
    json.dump(done, f, indent=1)
archive = args.archive or os.path.join(args.out_dir, "grid.tar.gz")
with tarfile.open(archive, "w:gz") as tar:
    tar.add(os.path.join(args.out_dir, "summary.json"), "summary.json")
    for name, _ in jobs:
        for rel in (name + ".log", os.path.join(name, "metrics.jsonl")):
            path = os.path.join(args.out_dir, rel)
            if os.path.exists(path):
                tar.add(path, rel)
print(f"{len(jobs)} jobs in {time.time() - t0:.0f}s -> {archive}")
if args.table:
    lines, values = table(
        args.out_dir, jobs, {n: d.get("wall_s") for n, d in done.items() if d.get("rc") == 0}
    )
    print("\n".join(lines))
    with open(os.path.join(args.out_dir, "table.json"), "w") as f:
        json.dump(values, f, indent=1)
