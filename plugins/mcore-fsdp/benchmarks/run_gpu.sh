#!/usr/bin/env bash
# On one GPU (world size 1): the plugin's GPU tests, then the benchmark; everything under $OUT.
# From the repository root, after installing the packages:  bash plugins/mcore-fsdp/benchmarks/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mcore-fsdp-out}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version())"; date -u; } > "$OUT/env.txt" 2>&1
python3 -m pytest -q -m gpu tests/test_gpu.py > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests rc=$?" >> "$OUT/gpu_tests.txt"
B="python3 -m torch.distributed.run --nproc-per-node 1 benchmarks/bench_fsdp.py --out $OUT/results.jsonl"
{
  echo "## bench-0.9b, seq 4096, reshard_after_forward=True"
  $B --model bench-0.9b --seq 4096 --batch 1 --impls none,mcore,torch,ddp --repeats 3 --steps 12 --warmup 3
  echo "## bench-0.9b, seq 4096, reshard_after_forward=False"
  $B --model bench-0.9b --seq 4096 --batch 1 --impls none,mcore,torch --no-reshard --repeats 2 --steps 12 --warmup 3
  echo "## llama3-8b shape, 4 of 32 layers, seq 4096"
  $B --model llama3-8b --layers 4 --seq 4096 --batch 1 --impls none,mcore,torch --repeats 2 --steps 8 --warmup 3
} > "$OUT/bench.txt" 2>&1
echo "bench rc=$?" >> "$OUT/bench.txt"
tail -5 "$OUT/gpu_tests.txt"
grep -v '^{' "$OUT/bench.txt" | grep -v Warning | tail -40
