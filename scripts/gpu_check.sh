#!/usr/bin/env bash
# The whole GPU check in one call, on a lent CUDA machine, from the repository root; results and
# logs under $1 (the device tool's $OUT). Needs .gpu/ (`python scripts/gpu_check.py --prepare`
# here, then carry it). See scripts/gpu_check.py for what each part checks.
set -u
out=${1:?usage: bash scripts/gpu_check.sh OUT_FOLDER}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# the transformers release kvtuner pins, over whatever the machine has; nothing else is missing
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl \
    || { echo "gpu_check: no .gpu/wheels (run scripts/gpu_check.py --prepare, carry .gpu)"; exit 2; }
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$out/environment.txt"
start=$SECONDS
KVTUNER_TEST_DEVICE=cuda timeout 230 python3 -m pytest -q -p no:cacheprovider \
    tests/attention/test_decode.py 2>&1 | tee "$out/pytest.txt" | tail -25
tests=${PIPESTATUS[0]}
echo "tests: rc $tests in $((SECONDS - start)) s"
start=$SECONDS
timeout 320 python3 scripts/gpu_check.py --device cuda --out "$out/gpu_check.json" 2>&1 \
    | grep -v Warning | tee "$out/gpu_check.log"
check=${PIPESTATUS[0]}
echo "gpu_check.py: rc $check in $((SECONDS - start)) s"
[ "$tests" = 0 ] && [ "$check" = 0 ]
