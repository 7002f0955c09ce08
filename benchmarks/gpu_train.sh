#!/usr/bin/env bash
# The GPU proof of `python -m training`, run on the lent device after the staging kit (../shared/gpu/README.md)
# has unpacked its wheels into /tmp/site and the base GGUF to /tmp/base/base.gguf:
#   bash benchmarks/gpu_train.sh            (writes its logs and adapters_gpu.tgz into $OUT)
# One case timed alone with each backend (Unsloth, plain HF), the other bundled cases with Unsloth in parallel,
# then the GPU-marked tests. The adapters come back to be played by the CPU game.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
out=$OUT; mkdir -p /tmp/gpu
first=lighthouse-logbook
for backend in unsloth hf; do
  python3 -m training $first --backend $backend --output /tmp/gpu/$backend/$first > "$out/train_$backend.log" 2>&1
  echo "$backend: exit $?"; tail -2 "$out/train_$backend.log"
done
for path in scenarios/*.json; do
  case_id=$(basename "$path" .json)
  [ "$case_id" = schema ] || [ "$case_id" = $first ] && continue
  python3 -m training "$case_id" --backend unsloth --output /tmp/gpu/unsloth/"$case_id" > /tmp/gpu/"$case_id".log 2>&1 &
done
wait
ls /tmp/gpu/unsloth
python3 -m pytest -m gpu tests/test_training.py -q -p no:cacheprovider > "$out/pytest_gpu.log" 2>&1; tail -3 "$out/pytest_gpu.log"
tar czf "$out/adapters_gpu.tgz" -C /tmp/gpu unsloth hf $(cd /tmp/gpu && ls *.log)
