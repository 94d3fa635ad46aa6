#!/usr/bin/env bash
# Round 20's second H200 pass: the landed code (one row as two on a GPU; cuBLAS epilogues and
# workspaces in the cost model) under the suite's affected files and the decode rows.
set -u
R=/tmp/p2; mkdir -p $R; export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAXLLM_CACHE_DIR=$R/cache
START=$(date +%s)
step() { tar -czf "$OUT/results.tar.gz" -C $R --exclude cache . 2>/dev/null; echo "=== +$(($(date +%s) - START)) s $*"; }
step pytest
timeout 110 python3 -m pytest -q -m "not slow" -p no:cacheprovider -p no:benchmark -n 12 -rfE --tb=short \
  tests/test_cost.py tests/test_train.py tests/test_analyze_cli.py tests/test_products.py tests/test_model.py tests/test_serve.py \
  tests/test_generate_cli.py tests/test_engine.py tests/test_analytic.py > $R/pytest.txt 2>&1
echo "rc=$?"; grep -E "^(FAILED|ERROR)" $R/pytest.txt | head -20; tail -1 $R/pytest.txt
for a in "dec_l1b_b1 decode llama3.2-1b 1 1024" "dec_m_b1 decode gpt2-medium 1 1024" "dec_m_b8 decode gpt2-medium 8 1024"; do
  set -- $a; step $1
  timeout -s ABRT 60 python3 -X faulthandler scripts/gpu_profile.py "$@" --generate --trace $R/trace_$1.txt >> $R/variants.jsonl 2> $R/$1.err
  echo "rc=$?"; tail -1 $R/variants.jsonl; tail -c 300 $R/$1.err | grep -iv warn
done
step cost_check
timeout 45 python3 scripts/gpu_cost_check.py > $R/cost_check.jsonl 2>&1; echo "rc=$?"; tail -2 $R/cost_check.jsonl | cut -c1-400
step done
