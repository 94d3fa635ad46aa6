#!/usr/bin/env bash
# One pass of jaxllm's GPU checks, for a machine where JAX (with CUDA) and torch are installed and no
# package registry is reachable. Run from the project root: OUT=/some/dir bash scripts/gpu_pass.sh
# Optional: .gpu/wheels/*.whl (matplotlib, safetensors, tokenizers) are unpacked for the tests and plots;
# .peers/peer_gpu.py + peer_model.py (from the shared peers) give the PyTorch side of the comparison.
# Cheap, decisive checks first; every step has a timeout; results/ is tarred into $OUT after each step,
# so a pass cut short still leaves what it measured. BUDGET (seconds, default 480) stops optional steps.
set -u
OUT=${OUT:-/tmp/jaxllm-gpu}; R=/tmp/jaxllm-results; mkdir -p "$OUT" $R/analyze
export PYTHONUNBUFFERED=1 JAXLLM_CACHE_DIR=$R/cache PYTHONPATH=$PWD
START=$(date +%s); BUDGET=${BUDGET:-480}
left() { echo $((BUDGET - $(date +%s) + START)); }
save() { tar -czf "$OUT/results.tar.gz" -C $R . 2>/dev/null; }
step() { save; echo "=== $(date +%T) (+$(($(date +%s) - START)) s) $*"; }

if ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  mkdir -p /tmp/extra && for w in .gpu/wheels/*.whl; do python3 -m zipfile -e "$w" /tmp/extra; done
  export PYTHONPATH=$PWD:/tmp/extra
fi
step versions
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $R/nvidia-smi.txt
python3 -c "import jax,flax,optax,chex;print(jax.__version__,flax.__version__,optax.__version__,chex.__version__,jax.devices())" | tee $R/versions.txt

step calibrate
timeout 90 python3 -m jaxllm calibrate --refresh --json > $R/calibration.json; echo "rc=$?"; cat $R/calibration.json
step torch peaks
timeout 60 python3 scripts/torch_peaks.py > $R/torch_peaks.json; echo "rc=$?"; cat $R/torch_peaks.json
if [ -f .peers/peer_gpu.py ]; then
  step torch peer; timeout 120 python3 .peers/peer_gpu.py > $R/torch_peer.jsonl 2> $R/torch_peer.err; echo "rc=$?"; cat $R/torch_peer.jsonl
fi
# The suite first among the long steps (about 100 s with 12 workers on an H200): few GPU MB per worker.
step pytest
timeout 200 python3 -m pytest -q -m "not slow" -p no:cacheprovider -n 12 -rfE --tb=short > $R/pytest.txt 2>&1
echo "rc=$?"; grep -E "^(FAILED|ERROR)" $R/pytest.txt | head -40; tail -2 $R/pytest.txt
step "train: rolled and unrolled layers"
timeout -s ABRT 120 python3 -X faulthandler scripts/gpu_train_variants.py > $R/train_variants.jsonl 2> $R/train_variants.err
echo "rc=$?"; cat $R/train_variants.jsonl; tail -c 300 $R/train_variants.err

an() {  # name, then analyze arguments; records wall seconds beside the JSON
  local n=$1; shift; step "analyze $n"; local t0; t0=$(date +%s.%N)
  timeout -s ABRT 90 python3 -X faulthandler -m jaxllm analyze "$@" --json > $R/analyze/$n.json 2> $R/analyze/$n.err
  echo "rc=$? wall=$(python3 -c "import time; print(round(time.time() - $t0, 1))")" | tee $R/analyze/$n.wall; tail -c 300 $R/analyze/$n.err
}
BF="--override dtype=bfloat16"; BFW="$BF --override param_dtype=bfloat16"
an train_m_bf16 --preset gpt2-medium $BF --phase train --batch 8 --seq 1024 --measure
an dec_l1b_b1 --preset llama3.2-1b $BFW --phase decode --batch 1 --seq 1024 --measure
an prefill_m_bf16 --preset gpt2-medium $BF --phase prefill --batch 1 --seq 1024 --measure
for b in 1 8 32 128; do an dec_m_b$b --preset gpt2-medium $BF --phase decode --batch $b --seq 1024 --measure; done
an train_g_f32 --preset gpt2 --phase train --batch 8 --seq 1024
step "generate speed"
timeout 90 python3 scripts/generate_speed.py > $R/generate_speed.jsonl 2>$R/generate_speed.err; echo "rc=$?"; cat $R/generate_speed.jsonl

for e in roofline decode_batch; do
  [ "$(left)" -gt 60 ] || break
  step "experiment $e"; timeout $(( $(left) - 10 )) python3 experiments/$e.py --out $R/results/$e > $R/$e.log 2>&1
  echo "rc=$?"; tail -3 $R/$e.log
done
step done
