#!/usr/bin/env bash
# One run on a lent CUDA machine (H100/H200), within 5 minutes: the tests that
# have a CUDA path, then the engine sweep in bfloat16 on a random-init model of
# Llama-3.2-1B's shape (K = 1, 8, 32 jobs; mixed row lengths, 16 to 1024 tokens).
#
# That machine has torch, transformers, peft, safetensors, PyYAML and pytest,
# but no pydantic, and nothing can be installed there from a registry. Here,
# once: `make gpu-wheels` (fills .whl/, git-ignored). Then, through the device
# tool, with `.whl` carried:  bash benchmarks/gpu.sh
# Figures go to stdout and to $OUT (or gpu_out/) as gpu-tests.log and gpu-sweep.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
python=python3
site=/tmp/carpool-site
if ls .whl/*.whl >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl || exit 1
fi
# carpool itself: its packages are mapped by pyproject's package-dir, so install a copy.
"$python" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --target "$site" . || exit 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$python" - <<'PY'
import torch, transformers, peft, pydantic
print(f"{torch.cuda.get_device_name()} torch {torch.__version__} transformers "
      f"{transformers.__version__} peft {peft.__version__} pydantic {pydantic.__version__}")
PY

status=0
echo "== tests with a CUDA path"
timeout 100 "$python" -m pytest -q -p no:cacheprovider tests/workers/training/test_cuda.py 2>&1 \
    | tee "$out/gpu-tests.log" || status=1

echo "== engine sweep (bf16, Llama-3.2-1B shape, mixed lengths up to 1024)"
# 16k-token micro-batches: a 128k vocabulary's logits stay a few GiB.
timeout 180 "$python" benchmarks/engine_sweep.py --device cuda --jobs 1,8,32 --rows 2 \
    --lengths mixed --seq 1024 -- --steps 3 --trials 2 --micro-batch-tokens 16384 2>&1 \
    | tee "$out/gpu-sweep.log" || status=1
exit $status
