#!/usr/bin/env bash
# Code and XLA-option variants of the GPU phases, one process each (scripts/gpu_profile.py), beside
# the PyTorch peer. Round 13's second H200 pass named train_shipped's options train_cublas_nocb and
# train_cublas_graphs's train_cublas. Run from the project root:
#   OUT=/some/dir bash scripts/gpu_variants.sh
# The PyTorch peer runs where .peers/ holds ../shared/peers/{peer_gpu.py,peer_model.py} (git-ignored:
# carry it to the device). The pass writes one results.tar.gz: a device that returns a limited count
# of files returns it whole.
# Every step has a timeout; $OUT/results.tar.gz is rewritten after each step, so a pass cut short
# still returns what it measured. BUDGET (s, default 480) skips steps that would not finish.
set -u
OUT=${OUT:-/tmp/jaxllm-gpu}; R=/tmp/jaxllm-variants; mkdir -p "$OUT" $R
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_CACHE_DIR=$R/cache
START=$(date +%s); BUDGET=${BUDGET:-480}
left() { echo $((BUDGET - $(date +%s) + START)); }
step() { tar -czf "$OUT/results.tar.gz" -C $R --exclude cache . 2>/dev/null; echo "=== $(date +%T) (+$(($(date +%s) - START)) s) $*"; }
v() {  # label, then gpu_profile.py arguments after the label
  local label=$1; shift
  [ "$(left)" -gt 35 ] || { echo "skip $label"; return; }
  step "$label"
  timeout -s ABRT 70 python3 -X faulthandler scripts/gpu_profile.py "$label" "$@" \
    --trace "$R/trace_$label.txt" >> $R/variants.jsonl 2> "$R/$label.err"
  echo "rc=$?"; tail -1 $R/variants.jsonl; tail -c 300 "$R/$label.err" | grep -iv warn
}
step versions
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $R/nvidia-smi.txt
python3 -c "import sys,jax,flax,optax,chex;print(sys.version.split()[0],jax.__version__,flax.__version__,optax.__version__,chex.__version__,jax.devices())" | tee $R/versions.txt
step calibrate
timeout 60 python3 -m jaxllm calibrate --refresh --json > $R/calibration.json; echo "rc=$?"
TRAIN="train gpt2-medium 8 1024"; DEC="decode llama3.2-1b 1 1024"
# The decisive rows first: the step as shipped and the variant most likely to ship.
v train_shipped $TRAIN
v dec_f32 $DEC --generate --hlo $R/hlo_dec_f32.txt
v dec_two_rows $DEC --generate --two-rows --hlo $R/hlo_dec_two_rows.txt
# Round 13's shipped step ran gate and up as GEMMs at 1.6 TB/s each: the same two-row step with cuBLAS
# taking every product instead of Triton (XLA_FLAGS reaches the child; gpu_profile.py records it).
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false v dec_two_rows_cublas $DEC --generate --two-rows
if [ "$(left)" -gt 150 ]; then  # the fast suite: about 90 s with 12 workers on an H200
  step pytest
  timeout 150 python3 -m pytest -q -m "not slow" -p no:cacheprovider -p no:benchmark -n 12 -rfE \
    --tb=short > $R/pytest.txt 2>&1
  echo "rc=$?"; grep -E "^(FAILED|ERROR)" $R/pytest.txt | head -20; tail -1 $R/pytest.txt
fi
if [ -f .peers/peer_gpu.py ] && [ "$(left)" -gt 100 ]; then
  step torch peer
  timeout 90 python3 .peers/peer_gpu.py > $R/torch_peer.jsonl 2> $R/torch_peer.err; echo "rc=$?"; cat $R/torch_peer.jsonl
fi
v dec_m_b1 decode gpt2-medium 1 1024 --generate
v dec_m_b1_two_rows decode gpt2-medium 1 1024 --generate --two-rows
v train_xla $TRAIN --options '{}'
v dec_out_in $DEC --generate --out-in --hlo $R/hlo_dec_out_in.txt
v dec_m_b128 decode gpt2-medium 128 1024 --generate
v dec_m_b128_out_in decode gpt2-medium 128 1024 --generate --out-in
v train_cublas_graphs $TRAIN --options '{"xla_gpu_enable_triton_gemm": false}'
step diagnostics
timeout 60 python3 scripts/gpu_cost_check.py $R/hlo_rolled_train.txt.gz > $R/cost_check.jsonl 2>&1; cat $R/cost_check.jsonl
step done
