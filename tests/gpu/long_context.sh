#!/bin/bash
# Issue 13's GPU work (the long-context tests, then the length bench), detached so that it outlives one remote
# command; poll with `status`:
#   LC_TESTS="tiny or nano3 or lc_mix" \
#   LC_BENCH="--lengths 4096,65536 --variants long,long_mbs4 --iters 8 --warmup 3;--lengths 131072 --variants recompute_moe --iters 8 --warmup 3" \
#     bash tests/gpu/long_context.sh start          then          bash tests/gpu/long_context.sh status (or wait 540)
# LC_TESTS is a pytest -k expression (empty: no tests) over LC_FILES (default tests/gpu/test_long_context_gpu.py); LC_MIX, `bench/lc_mix.py --backend megatron` arguments, runs
# part 4 first, from the smoke's pretrain (`dvc repro pretrain` in the data copy); LC_BENCH holds `bench/train_throughput.py --scale long`
# argument sets separated by ';' (empty: no bench). Needs ../shared/gpu's stack; causal-conv1d (the fused Mamba
# path) is built by `WITH_CAUSAL_CONV1D=1 bash .dev6/install.sh`, or unpacked from .dev7/ (carried with .dev6: 26 + 30 MB), which `stash` makes. LC_LANES=2 (a 4-GPU machine) runs part 4 and the tests on GPUs
# 0,1 and the bench on 2,3 at once; the bench runs in its own copy of the data (/root/lcbench).
# LC_LANES=shared runs part 4 and the tests side by side on the same GPU(s).
# It runs from a snapshot of the checkout (/root/snap): every remote command re-copies the checkout, and a poll
# that did so while torchrun started its ranks once took their modules away. The data copy is /root/lcdata
# (NANO3_GPU_SMOKE_DIR: `dvc repro blend`, made once and reused by later calls, with each model's short pretrain).
set -uo pipefail
export PYTHONPATH=/root/snap/src:/root/snap NANO3_SYSTEM_PYTHON=1 NANO3_GPU_SMOKE_DIR=/root/lcdata PYTHONUNBUFFERED=1
site_packages() { python3 -c 'import site; print(site.getsitepackages()[0])'; }  # where causal-conv1d is installed
case "${1:-}" in
  start)
    if ls .dev7/causal_conv1d.tgz.part* > /dev/null 2>&1 && ! python3 -c "import causal_conv1d" 2> /dev/null; then
      cat $(ls .dev7/causal_conv1d.tgz.part* | sort) | tar -C "$(site_packages)" -xzf - \
        && python3 -c "import torch, causal_conv1d_cuda" || { echo "error: .dev7's causal-conv1d did not import"; exit 1; }
    fi
    rm -rf /root/snap && PYTHONPATH=$(pwd):$(pwd)/src python3 -c \
      "from pathlib import Path; from tests.conftest import copy_repo; copy_repo(Path('/root/snap'))" || exit 1
    LC_TESTS=${LC_TESTS-"tiny or nano3 or lc_mix"} LC_FILES=${LC_FILES-} LC_BENCH=${LC_BENCH-} LC_MIX=${LC_MIX-} setsid nohup bash /root/snap/tests/gpu/long_context.sh run \
      > /root/lc.log 2>&1 < /dev/null &
    echo "started; log /root/lc.log" ;;
  run)
    cd /root/snap
    python3 -c "from pathlib import Path; from tests.gpu.conftest import blended_copy; blended_copy(Path('/root/lcdata'))" \
      || { echo "error: could not make the data copy /root/lcdata"; exit 1; }
    mix() {  # LC_MIX="--shares 0,0.5 ...": part 4 on Megatron from the smoke's own pretrain (params.yaml's budget,
      # a model that uses its context; the tests' short pretrains do not), in the data copy
      [ -n "${LC_MIX:-}" ] || return 0
      (cd /root/lcdata && dvc repro pretrain && rm -rf bench && cp -a /root/snap/bench . \
        && python3 bench/lc_mix.py --backend megatron $LC_MIX); echo "lc_mix exit $?"
    }
    tests() {
      [ -n "$LC_TESTS" ] || return 0
      python3 -m pytest -m gpu ${LC_FILES:-tests/gpu/test_long_context_gpu.py} -v -s -k "$LC_TESTS"; echo "tests exit $?"
    }
    bench() {  # each set writes /root/lcbench/bench/results/lc-<i>/lc_throughput.json
      # the data copy without its runs (part 4 may be training in it meanwhile)
      rm -rf /root/lcbench && mkdir /root/lcbench && tar -C /root/lcdata --exclude=./checkpoints --exclude=./dvclive \
        --exclude=./models --exclude=./reports --exclude=./bench -cf - . | tar -C /root/lcbench -xf - \
        && cp -a /root/snap/bench /root/lcbench/ || { echo "bench exit 1 (no copy of the data)"; return; }
      IFS=';' read -ra SETS <<< "$LC_BENCH"
      for i in "${!SETS[@]}"; do
        (cd /root/lcbench && python3 bench/train_throughput.py --scale long ${SETS[$i]} "$@" --out bench/results/lc-$i)
        echo "bench exit $? (${SETS[$i]})"
      done
    }
    if [ "${LC_LANES:-1}" = shared ]; then  # one GPU with room for both: part 4 and the tests at once (their
      # timings then share it), the tests in a data copy of their own, as both take DVC's lock in theirs
      (export NANO3_GPU_SMOKE_DIR=/root/lctests; tests) > /root/lc-tests.log 2>&1 &
      mix; wait; bench
    elif [ "${LC_LANES:-1}" = 2 ]; then  # 4 GPUs: part 4 and the tests on 0,1, the bench on 2,3 at the same time
      (export CUDA_VISIBLE_DEVICES=0,1; mix; tests) > /root/lc-tests.log 2>&1 &
      bench --gpus 2,3
      wait
    else
      mix; tests; bench
    fi
    echo "done at $(date +%T)" ;;
  status)
    if pgrep -f "long_context.sh run" > /dev/null; then echo "== running"; else echo "== finished"; fi
    grep -hE "PASSED|FAILED|ERROR|passed|failed|lc of|packed micro|tok/s/GPU|exit|done at|after lc" /root/lc.log /root/lc-tests.log 2> /dev/null | tail -20
    tail -2 /root/lc.log | cut -c1-300
    nvidia-smi --query-gpu=index,memory.used,utilization.gpu --format=csv,noheader
    for p in $(pgrep -f "nano3[./]train[./]entry"); do  # where a rank's host memory is: its mappings by name
      grep -E "VmHWM|VmRSS" /proc/$p/status | tr -s ' \n' ' '; echo "(pid $p)"
      awk '/^[0-9a-f]+-[0-9a-f]+ /{n=($6==""?"[anon]":$6)} /^Rss:/{r[n]+=$2}
           END{for(n in r) if(r[n]>524288) printf "  %s %.1f GiB\n", n, r[n]/1048576}' /proc/$p/smaps 2>/dev/null
    done ;;
  wait)  # `wait SECONDS`: one remote call that holds the machine until the run ends or SECONDS pass, then prints
    # `status` and copies what a run leaves (the logs, each bench set's JSON and logs' last lines) under $OUT/lc
    end=$(( $(date +%s) + ${2:-500} ))
    while [ "$(date +%s)" -lt "$end" ] && pgrep -f "long_context.sh run" > /dev/null; do sleep 10; done
    bash "$0" status
    if [ -n "${OUT:-}" ]; then
      mkdir -p "$OUT/lc" && cp /root/lc.log /root/lc-tests.log "$OUT/lc/" 2> /dev/null
      cp /root/lcdata/bench/results/lc_mix/lc_mix_megatron.{json,png} "$OUT/lc/" 2> /dev/null
      for f in /root/lcdata/bench/results/lc_mix/*/*.log; do [ -f "$f" ] && { echo "== $f"; tail -30 "$f"; }; done \
        > "$OUT/lc/lc_mix.logs.txt" 2> /dev/null
      for d in /root/lcbench/bench/results/lc-* /root/lcdata/bench/results/lc-*; do
        [ -f "$d/lc_throughput.json" ] || continue
        cp "$d/lc_throughput.json" "$OUT/lc/$(basename "$d").json"
        for f in "$d"/*.log; do tail -40 "$f"; done > "$OUT/lc/$(basename "$d").logs.txt"
      done
    fi ;;
  stash)  # causal-conv1d as built here (~400 s), back under $OUT/cc in parts that fit $OUT's 16 MiB per file; put
    # them in .dev7/ and carry it with .dev6 into the call that runs install.sh (no WITH_CAUSAL_CONV1D) and `start`
    cd "$(site_packages)" || exit 1
    mkdir -p "$OUT/cc" && tar -czf - causal_conv1d causal_conv1d-*.dist-info causal_conv1d_cuda*.so \
      | split -b 15m -d - "$OUT/cc/causal_conv1d.tgz.part" && ls -l "$OUT/cc" ;;
  *) echo "usage: [LC_TESTS=...] [LC_BENCH=...] $0 start | status | wait SECONDS | stash" >&2; exit 2 ;;
esac
