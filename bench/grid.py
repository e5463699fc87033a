"""Run many training commands side by side (one GPU shared by several processes, or CPU cores) and
bundle their logs and metrics into one archive.

    python bench/grid.py JOBS.txt --out_dir out/grid --jobs 16 --deadline 540
    python bench/grid.py bench/jobs/finetune_levers.txt --jobs 22     # README's fine-tuning tables (one GPU)

JOBS.txt: one job a line, `NAME  SCRIPT ARGS...` (blank lines and # comments skipped); each job runs
as `python SCRIPT ARGS --out_dir OUT_DIR/NAME` with one CPU thread, its output in OUT_DIR/NAME.log.
At --deadline seconds the jobs still running are stopped (their evals so far are kept). At the end
OUT_DIR/grid.tar.gz holds every log and metrics.jsonl (no checkpoints) and a summary line per job.
On one H100, 22 of the shapes fine-tunes (3,000 steps each) ran side by side in ~5-7 minutes; the GPU
was the bottleneck (100% busy with tiny kernels from 22 processes), so their wall clocks say nothing
about one run's speed.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time

p = argparse.ArgumentParser()
p.add_argument("jobs_file")
p.add_argument("--out_dir", default="out/grid")
p.add_argument("--jobs", type=int, default=8, help="processes at a time")
p.add_argument("--deadline", type=float, default=0, help="seconds; 0 = none")
p.add_argument("--archive", default=None, help="default: OUT_DIR/grid.tar.gz")
args = p.parse_args()

jobs = []
for line in open(args.jobs_file):
    line = line.split("#", 1)[0].strip()
    if line:
        name, *cmd = shlex.split(line)
        jobs.append((name, cmd))
os.makedirs(args.out_dir, exist_ok=True)
env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
t0, queue, running, done = time.time(), list(jobs), {}, {}
while queue or running:
    while queue and len(running) < args.jobs and not (args.deadline and time.time() - t0 > args.deadline):
        name, cmd = queue.pop(0)
        log = open(os.path.join(args.out_dir, name + ".log"), "w")
        full = [sys.executable, *cmd, "--out_dir", os.path.join(args.out_dir, name)]
        log.write(" ".join(full) + "\n"); log.flush()
        running[name] = (subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT, env=env), time.time(), log)
    if args.deadline and time.time() - t0 > args.deadline:
        for name, (proc, start, log) in running.items():
            proc.kill()
            done[name] = {"rc": "killed at deadline", "wall_s": round(time.time() - start, 1)}
        running, queue = {}, []
        break
    for name, (proc, start, log) in list(running.items()):
        if proc.poll() is not None:
            log.close()
            done[name] = {"rc": proc.returncode, "wall_s": round(time.time() - start, 1)}
            print(f"[{time.time() - t0:6.0f}s] {name}: rc {proc.returncode}, {done[name]['wall_s']} s", flush=True)
            del running[name]
    time.sleep(1)
for name, _ in jobs:
    done.setdefault(name, {"rc": "not started"})
with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
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
