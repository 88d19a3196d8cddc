#!/usr/bin/env bash
# One prepared run on a lent GPU machine (16 CPU cores + one H100/H200), ~9.5 minutes:
#   - core 0 + GPU: the solver benchmark on CUDA, eager and compile=True, with warm-up;
#   - cores 1-15: MuJoCo RL runs (rat-npg and sb3-contrib TRPO, 1M steps, 3 seeds), one
#     process per run, stopped at the deadline (their progress.csv is kept either way).
# Wheels for gymnasium/mujoco/sb3 travel in .whl (see the device tool's README).
# Usage there: bash benchmarks/gpu/device_run.sh "$OUT"
# RL only on all 16 cores: SOLVERS=0 RL_CORES=16 RL_SECONDS=480 bash benchmarks/gpu/device_run.sh "$OUT"
set -u
OUT=${1:-/tmp/out}
mkdir -p "$OUT"
START=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1 MUJOCO_GL=disable
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
lscpu | grep -i "model name" >> "$OUT/gpu.txt"
python3 -c "import torch, gymnasium, mujoco, sb3_contrib; print(torch.__version__, gymnasium.__version__, mujoco.__version__, sb3_contrib.__version__)" >> "$OUT/gpu.txt" 2>&1

RL_SECONDS=${RL_SECONDS:-500}
mkdir -p /tmp/rl
core=1
for algo in sb3-trpo rat-npg; do
  for env in Hopper-v5 Walker2d-v5 HalfCheetah-v5; do
    for seed in 0 1 2; do
      c=$(( core % ${RL_CORES:-15} + 16 - ${RL_CORES:-15} )); core=$(( core + 1 ))
      name=$env-$algo-s$seed
      nice -n 5 taskset -c $c timeout "$RL_SECONDS" python3 benchmarks/rl/run.py \
        --envs $env --algos $algo --seeds $seed --steps 1000000 \
        --results /tmp/rl/$name > /tmp/rl/$name.log 2>&1 &
    done
  done
done

[ "${SOLVERS:-1}" = 1 ] && taskset -c 0 timeout 470 python3 benchmarks/solvers/run.py --device cuda --compile --warmup \
  --repeats 3 --problems mlp cnn large_mlp transformer --results /tmp/solvers \
  > "$OUT/solvers.log" 2>&1
echo "solver benchmark exit $? after $(( $(date +%s) - START )) s" >> "$OUT/solvers.log"

wait
echo "RL done after $(( $(date +%s) - START )) s" >> "$OUT/solvers.log"
tar czf "$OUT/solvers.tgz" -C /tmp solvers
# runs stopped at the deadline are under rl/<name>/partial/ (run.py --adopt that folder)
tar czf "$OUT/rl.tgz" -C /tmp --exclude='*.pt' --exclude='*.pkl' rl 2>/dev/null
ls -la "$OUT"
