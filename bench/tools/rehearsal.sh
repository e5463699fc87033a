#!/usr/bin/env bash
# Issue 28's rehearsal of a real-data clip_dpo.py --data vsr default, from a clean clone (2 CPU cores; every run
# one thread, niced): the shapes world exported in Flickr8k's and VSR's layouts at their real sizes (8 s), the
# relation-blind start trained on the Flickr8k export (12 min), the VSR fine-tunes of bench/studies/jobs/rehearsal.txt
# two at a time (12-15 min each), then each run's final eval JSONs and metrics.jsonl into bench/results/rehearsal/
# (bench/tools/rehearsal_collect.py: eval.py --bench flickr8k and --bench vsr on the final checkpoint, vsr/acc per axis).
#   bash bench/tools/rehearsal.sh            # all of it;  JOBS=2 OUT=out/rehearsal X=data/rehearsal_export to move things
#   JOBS_FILE=my_jobs.txt START_FLAGS="--max_steps 2" RESULTS=/tmp/r bash bench/tools/rehearsal.sh  # a smoke run
set -euo pipefail
cd "$(dirname "$0")/../.."
X=${X:-data/rehearsal_export} OUT=${OUT:-out/rehearsal} JOBS=${JOBS:-2} PY=${PY:-python}
JOBS_FILE=${JOBS_FILE:-bench/studies/jobs/rehearsal.txt} START_FLAGS=${START_FLAGS:-} RESULTS=${RESULTS:-bench/results/rehearsal}
export OMP_NUM_THREADS=1
[ -f "$X/vsr/splits/random/test.jsonl" ] || $PY bench/tools/export_shapes.py --out "$X" --image_size 64
# shellcheck disable=SC2086  # START_FLAGS: several flags
[ -f "$OUT/start_s0/ckpt.pt" ] || nice -n 19 $PY clip_scratch.py --data flickr8k --data_root "$X/flickr8k" --image_size 64 \
    --cache_images --seed 0 --out_dir "$OUT/start_s0" $START_FLAGS
mkdir -p "$OUT"
sed "s#\$X#$X#g; s#\$OUT#$OUT#g" "$JOBS_FILE" > "$OUT/jobs.txt"
nice -n 19 $PY bench/studies/grid.py "$OUT/jobs.txt" --out_dir "$OUT" --jobs "$JOBS" --table
for run in start_s0 $(grep -v '^\s*#' "$OUT/jobs.txt" | awk 'NF {print $1}'); do
    if [ -f "$OUT/$run/ckpt.pt" ]; then  # (a run stopped by hand has none)
        nice -n 19 $PY bench/tools/rehearsal_collect.py --run "$OUT/$run" --export "$X" --results "$RESULTS/$run"
    fi
done
