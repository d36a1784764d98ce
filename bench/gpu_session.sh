#!/usr/bin/env bash
# Every GPU figure issue 3 asks for, in one command that fits one device call (10 min limit), for the first
# session that is lent an H100/H200. Run from the repository root on the GPU machine:
#
#   bash bench/gpu_session.sh            # all parts; logs + tables under $OUT (the device tool) or bench/gpu_out
#   bash bench/gpu_session.sh 1 3        # only parts 1 and 3 (each compiles: a part takes a few minutes, and one
#                                        # device call may run 10 minutes at most)
#
# The device image has python3 with torch (cu13) and triton but no torchao: carry it as a wheel for the FP8 rows
# (here: `echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps --only-binary=:all: --python-version
# 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl torchao==0.18.0`,
# then `carry: [".whl"]`); this script installs .whl/*.whl into /tmp/site when the folder is there. flash-attn and
# FA3 (flash_attn_interface) have no wheels for that torch: their rows report "unavailable" and the others run.
# Copy the resulting tables into bench/RESULTS.md with this command line.
set -uo pipefail
OUT=${OUT:-bench/gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
PARTS=" ${*:-1 2 3 4} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }
bench() {  # name, env assignments..., -- bench args...
  local name=$1; shift
  log "$name"
  env "$@" 2>&1 | tee "$OUT/$name.log" | grep -E '^\| [0-9]|failed|one line' | tee -a "$OUT/summary.txt"
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY - <<'PY' | tee -a "$OUT/gpu.txt"
import torch
from nanochat.attention import available_backends
print("torch", torch.__version__, torch.cuda.get_device_name(), "attention backends:", available_backends("cuda"))
try:
    import torchao; print("torchao", torchao.__version__)
except ImportError:
    print("torchao: not installed (FP8 rows will fail)")
PY
B="$PY bench/train_throughput.py --device-type cuda --dtypes bfloat16 --steps 10 --warmup 3"
# 1. MFU at d12/d20 (the reference: ~41% at d12, ~59% at d24 on 8xH100), compiled model + optimizer, auto backend
want 1 && bench d12_d20_compile NANOCHAT_ATTENTION=auto $B --depths 12,20 --device-batch-size 32 --max-seq-len 2048 --compile --compile-optimizer
# 2. the same per attention backend that loads here (sliding windows through flex vs sdpa's dense mask)
want 2 && for att in flex sdpa fa3 flash_attn; do
  bench "d12_${att}" NANOCHAT_ATTENTION=$att $B --depths 12 --device-batch-size 32 --max-seq-len 2048 --compile --compile-optimizer
done
# 3. FP8 (torchao) tensorwise / rowwise against bf16 at d20
want 3 && for r in tensorwise rowwise; do
  bench "d20_fp8_${r}" NANOCHAT_ATTENTION=auto $B --depths 20 --device-batch-size 32 --max-seq-len 2048 --compile --compile-optimizer --fp8 $r
done
# 4. eager vs compiled, and the chunked loss vs inductor's plain-loss fusion, at d12
want 4 && bench d12_eager NANOCHAT_ATTENTION=auto $B --depths 12 --device-batch-size 32 --max-seq-len 2048
want 4 && bench d12_eager_fused_loss NANOCHAT_ATTENTION=auto NANOCHAT_FUSED_LOSS=1 $B --depths 12 --device-batch-size 32 --max-seq-len 2048
log done
