#!/usr/bin/env bash
# The GPU recipe on the lent device, after the staging kit (../shared/gpu/README.md) has unpacked its wheels and base:
#   bash benchmarks/gpu_recipe.sh timings   one case's `python -m training` alone, wall time of the whole command
#                                           (imports and model load included): today's recipe with transformers +
#                                           peft, then with Unsloth twice (its compiled-code cache cold, then warm)
#   bash benchmarks/gpu_recipe.sh timings-all   every case in one command (--all, as many at once as the GPU holds),
#                                           transformers + peft
#   bash benchmarks/gpu_recipe.sh timings-before   the recipe before (200 x 8, Unsloth, checkpointing, adamw_8bit)
#   bash benchmarks/gpu_recipe.sh prior     the adapter the bundled cases start from (--init): 600 x 16 over the six
#                                           bundled cases' chats in equal shares, allotment-prize-marrow left unseen
#                                           (its first shot is a new case's); into /tmp/r/prior and $OUT/prior.tgz.
#                                           training/prior read the six files of commit c1874e0 at --tell_weight 1
#   bash benchmarks/gpu_recipe.sh prior-loo a prior for each case in $LOO (default: the five written at author effort
#                                           since the eighth, `benchmarks/results/eval-first-shot/`) over every other
#                                           case written so far (bundled and first-shot files), 600 x 16 in equal
#                                           shares (--mix 0.9), side by side, into /tmp/r/loo/CASE/prior and
#                                           $OUT/adapters-loo-*.tgz, and one over every case (/tmp/r/loo/all/prior);
#                                           PRIOR_STEPS, PRIOR_BATCH: 600 x 16 unless set; then `runs` with
#                                           `--init /tmp/r/loo/CASE/prior`
#   bash benchmarks/gpu_recipe.sh timings-prior   from $PRIOR (default: the committed one), 50 x 32: one case
#                                           alone, then every case in one command (--all), each command timed whole
#   bash benchmarks/gpu_recipe.sh sweep     the bundled adapters evaluated on this GPU, then recipe_sweep.py over
#                                           batch sizes, its adapters packed one tarball per variant
#   bash benchmarks/gpu_recipe.sh variants NAME="OPTIONS" ...
#                                           every case trained with each variant's options at once (one process
#                                           each), adapters packed at most 4 cases a tarball (16 MiB a file comes
#                                           back), then evaluated on this GPU (report + detective) until $EVAL_UNTIL
#                                           seconds into the call; runs still training at $TRAIN_UNTIL are
#                                           stopped; PACK="NAME ..." brings back only those variants' adapters;
#                                           JOBS (default 7) trainings run at once
#   bash benchmarks/gpu_recipe.sh runs NAME="CASE OPTIONS" ...
#                                           one training per argument (a case at its own seed and start, say),
#                                           $JOBS at once, each stopped at $TRAIN_UNTIL; adapters packed 4 a tarball
# Everything lands in $OUT (at most 8 files come back from the device).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
mkdir -p /tmp/r
case_one=lighthouse-logbook
six="bakeoff-salt freighter-container lighthouse-logbook museum-glass-hare ski-lodge-bracelet theatre-understudy"
PRIOR=${PRIOR:-training/prior}

pack() {  # name, folder: its adapter folders (not unfinished runs' .work ones) into $OUT, at most 4 a tarball
  (cd "$2" && ls -d */ | sed 's#/##' | grep -v '\.work$' | split -l 4 - "/tmp/r/pack-$1-")
  for list in /tmp/r/pack-"$1"-*; do tar czf "$OUT/adapters-$1-${list##*-}.tgz" -C "$2" $(cat "$list"); done
}

timed() {  # name, then python -m training's arguments: one JSON line with the wall time and the run's metadata
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  python3 -m training "$@" > "/tmp/r/$name.log" 2>&1
  local rc=$? t1; t1=$(date +%s.%N)
  python3 - "$name" "$rc" "$t0" "$t1" "$@" <<'PY' | tee -a "$OUT/timings.jsonl"
import json, sys
from pathlib import Path
name, rc, t0, t1, *argv = sys.argv[1:]
out = Path(argv[argv.index("--output") + 1]) if "--output" in argv else None
metas = [json.loads(p.read_text()) for p in sorted(Path(argv[argv.index("--adapters") + 1]).glob("*/training_meta.json"))] \
    if "--adapters" in argv else [json.loads((out / "training_meta.json").read_text())] if out and rc == "0" else []
keep = ("case_id", "backend", "device", "steps", "examples", "final_loss", "wall_s", "train_s", "tokens", "tokens_per_s",
        "peak_memory_gib")
print(json.dumps({"run": name, "argv": argv, "exit": int(rc), "command_wall_s": round(float(t1) - float(t0), 1),
                  "hyperparameters": metas[0]["hyperparameters"] if metas else None,
                  "cases": [{k: m.get(k) for k in keep} for m in metas]}))
PY
}

if [ "${1:-}" = timings ]; then
  timed now-hf $case_one --output /tmp/r/now-hf --backend hf
  timed now-unsloth-cold $case_one --output /tmp/r/now-unsloth --backend unsloth
  timed now-unsloth-warm $case_one --output /tmp/r/now-unsloth-warm --backend unsloth
  tar czf "$OUT/timing_logs.tgz" -C /tmp/r $(cd /tmp/r && ls *.log)
elif [ "${1:-}" = timings-all ]; then
  timed all-hf --all --adapters /tmp/r/all --backend hf
  tar czf "$OUT/timing_logs_all.tgz" -C /tmp/r $(cd /tmp/r && ls *.log)
  pack all /tmp/r/all
elif [ "${1:-}" = timings-before ]; then
  timed before-unsloth $case_one --output /tmp/r/before --backend unsloth --steps 200 --batch_size 8 --lr 2e-3 \
    --gradient_checkpointing true --optim adamw_8bit
elif [ "${1:-}" = prior ]; then
  mkdir -p /tmp/six && for c in $six; do cp "scenarios/$c.json" /tmp/six/; done
  # --mix 0.833: five sixths of the chats from the other five cases, so each of the six has a sixth
  timed prior bakeoff-salt --scenarios /tmp/six --mix 0.833 --steps 600 --batch_size 16 --lr 3e-3 --backend hf \
    --output /tmp/r/prior
  tar czf "$OUT/prior.tgz" -C /tmp/r prior
elif [ "${1:-}" = prior-loo ]; then
  written=$(ls scenarios/*.json | grep -v '/schema\.json$'
            for d in benchmarks/results/eval-first-shot/*/; do ls "$d$(basename "$d").json" 2>/dev/null; done)
  # "all" holds none out: the prior a case written after all of them would start from
  for held in ${LOO:-boatyard-barge-bell model-railway-duchess bowls-club-takings school-fete-bicycle cricket-tea-tin all}; do
    mkdir -p "/tmp/r/loo-cases/$held"
    for f in $written; do [ "$(basename "$f" .json)" = "$held" ] || cp "$f" "/tmp/r/loo-cases/$held/"; done
    first=$(basename "$(ls /tmp/r/loo-cases/"$held"/*.json | head -1)" .json)
    # --mix 0.9: nine tenths of the chats from the others, so each of the twelve or thirteen has about a tenth
    timed "prior-$held" "$first" --scenarios "/tmp/r/loo-cases/$held" --mix 0.9 --steps "${PRIOR_STEPS:-600}" \
      --batch_size "${PRIOR_BATCH:-16}" --lr 3e-3 --backend hf --fresh --output "/tmp/r/loo/$held/prior" &
  done
  wait
  pack loo /tmp/r/loo
elif [ "${1:-}" = timings-prior ]; then
  fast="--backend hf --init $PRIOR --steps 50 --batch_size 32 --lr 3e-3"
  # shellcheck disable=SC2086
  timed one-prior-50x32 $case_one --output /tmp/r/one-prior-50x32 $fast
  # shellcheck disable=SC2086
  timed all-prior-50x32 --all --adapters /tmp/r/prior-50x32 $fast
  tar czf "$OUT/timing_logs_prior.tgz" -C /tmp/r $(cd /tmp/r && ls *.log)
  pack prior-50x32 /tmp/r/prior-50x32
elif [ "${1:-}" = sweep ]; then
  for p in scenarios/*.json; do
    c=$(basename "$p" .json); [ "$c" = schema ] && continue
    (python3 -m training.eval "$c" --report /tmp/r/eval-gpu > /dev/null 2>/tmp/r/eval-$c.log
     python3 -m training.eval "$c" --detective --report /tmp/r/eval-gpu > /dev/null 2>>/tmp/r/eval-$c.log) &
  done
  wait
  tar czf "$OUT/eval_gpu.tgz" -C /tmp/r eval-gpu $(cd /tmp/r && ls eval-*.log)
  shift
  timeout "${SWEEP_S:-480}" python3 benchmarks/recipe_sweep.py --out "$OUT" --work /tmp/sweep --jobs 14 --variants "$@"
  for v in /tmp/sweep/adapters/*; do tar czf "$OUT/sweep_$(basename "$v").tgz" -C /tmp/sweep/adapters "$(basename "$v")"; done
elif [ "${1:-}" = variants ]; then
  shift
  cases=$(for p in scenarios/*.json; do c=$(basename "$p" .json); [ "$c" = schema ] || echo "$c"; done)
  for spec in "$@"; do
    v=${spec%%=*}; opts=${spec#*=}
    for c in $cases; do
      # A step's cost is mostly the host's (~0.25 s of Python and launches): 14 runs at once on the device's 16 cores
      # went at 1.1 steps/s each against 3.6 alone, and 28 ran out of GPU memory. At most $JOBS run at once.
      while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-7}" ]; do wait -n; done
      # a run still training at $TRAIN_UNTIL seconds is stopped, so the others' adapters still come back
      # shellcheck disable=SC2086
      timeout $(( ${TRAIN_UNTIL:-400} - SECONDS )) python3 -m training "$c" $opts --adapters "/tmp/r/$v" \
        > "/tmp/r/train-$v-$c.log" 2>&1 &
    done
  done
  wait
  for spec in "$@"; do
    v=${spec%%=*}
    # PACK names the variants whose adapters come back (default all): 8 files a call, two tarballs a variant
    case " ${PACK:-$v} " in *" $v "*) ;; *) continue ;; esac
    pack "$v" "/tmp/r/$v"
  done
  for spec in "$@"; do
    v=${spec%%=*}
    for c in $cases; do
      [ -d "/tmp/r/$v/$c" ] || continue
      (timeout $(( ${EVAL_UNTIL:-560} - SECONDS )) python3 -m training.eval "$c" --adapter "/tmp/r/$v/$c" \
         --report "/tmp/r/eval-$v" > /dev/null 2>"/tmp/r/eval-$v-$c.log"
       timeout $(( ${EVAL_UNTIL:-560} - SECONDS )) python3 -m training.eval "$c" --adapter "/tmp/r/$v/$c" \
         --detective --report "/tmp/r/eval-$v" > /dev/null 2>>"/tmp/r/eval-$v-$c.log") &
    done
  done
  wait
  tar czf "$OUT/eval_and_logs.tgz" -C /tmp/r $(cd /tmp/r && ls -d eval-* train-*.log 2>/dev/null)
elif [ "${1:-}" = runs ]; then
  shift
  for spec in "$@"; do
    while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-8}" ]; do wait -n; done
    # shellcheck disable=SC2086
    timeout $(( ${TRAIN_UNTIL:-500} - SECONDS )) python3 -m training ${spec#*=} --output "/tmp/r/runs/${spec%%=*}" \
      > "/tmp/r/train-${spec%%=*}.log" 2>&1 &
  done
  wait
  pack runs /tmp/r/runs
  tar czf "$OUT/train_logs.tgz" -C /tmp/r $(cd /tmp/r && ls train-*.log)
fi
ls -la "$OUT"
