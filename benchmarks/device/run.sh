#!/usr/bin/env bash
# The GPU machine's driver: install this checkout, then run the named targets, each under what is left of
# TOTAL seconds (a target not started in time is skipped and says so); each target's output in $OUT/<target>.txt
# and its last lines on stdout. From the repository root, on the device (see ../shared/device/README.md):
#   bash benchmarks/device/run.sh kp14 kp_moe b_fp8        (TOTAL=540 TAIL=40 OUT=... optional)
# Targets: t_<pkg> (a package's GPU tests), b_* (benchmarks), kp_* (profiles), sweepg, lc (loss curves).
set -uo pipefail
if ! command -v nvidia-smi > /dev/null; then
  echo "run.sh: no nvidia-smi here: this is the GPU machine's driver (it installs packages into its Python)" >&2
  exit 2
fi
START=$(date +%s)
TOTAL=${TOTAL:-540}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -f .device/install-on-device.sh ]; then
  bash .device/install-on-device.sh > "$OUT/install.txt" 2>&1 || { cat "$OUT/install.txt"; exit 1; }
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u
} > "$OUT/env.txt" 2>&1
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
PY=python3
D=benchmarks/device

t_t_core() { $PY -m pytest -q -m gpu packages/mcore-core 2>&1 | tail -5; }
t_t_models() { $PY -m pytest -q -m gpu plugins/mcore-models 2>&1 | tail -5; }
t_t_moe() { $PY -m pytest -q -m gpu plugins/mcore-moe 2>&1 | tail -5; }
t_t_inf() { $PY -m pytest -q -m gpu plugins/mcore-inference 2>&1 | tail -5; }
t_t_prec() { $PY -m pytest -q -m gpu plugins/mcore-precision 2>&1 | tail -5; }
t_prec_fp8() {  # the per-tensor FP8 path on the card: its kernels, the linear, the native GEMMs
  $PY -m pytest -q -m gpu plugins/mcore-precision/tests/test_fp8.py plugins/mcore-precision/tests/test_schemes.py \
    plugins/mcore-precision/tests/test_kernels_gpu.py -k "${PREC_K:-not nothing}" 2>&1 | tail -5
}
t_ssm_gdn() {  # the GDN kernels' GPU tests (the default forward, its backward), then the hybrid models' decode
  $PY -m pytest -q -m gpu plugins/mcore-ssm/tests/test_gdn_triton.py plugins/mcore-ssm/tests/test_gdn_triton_bwd.py 2>&1 | tail -3
  $PY -m pytest -q -m gpu integration_tests/test_hybrid_static_decode.py 2>&1 | tail -3
}
t_t_ssm() { $PY -m pytest -q -m gpu plugins/mcore-ssm 2>&1 | tail -5; }
t_bare() { $PY plugins/mcore-models/benchmarks/bench.py --sections step_ours_compiled --out /tmp/bare; }
t_b14() { $PY packages/mcore-core/benchmarks/bench_train.py --out /tmp/b14 --suite issue14 --variant default= --repeats "${ROUNDS:-2}" --steps 50; }
t_kp14() {  # the default bench-0.9b step under torch.profiler: top ops and the GPU's idle gaps (KP14_SET: more flags)
  $PY -m mcore train --model.preset=bench-0.9b --train.seq_len=4096 --train.global_batch_size=2 \
    --precision.recipe=bf16 --data.max_tokens=5000000 --train.out_dir=/tmp/kp14 --train.steps=24 --log.every=1 \
    --log.profile_from=20 --log.profile_steps=3 ${KP14_SET:-} > /tmp/kp14.log 2>&1
  tail -3 /tmp/kp14.log
  cp /tmp/kp14/profile/rank0/top_ops.txt "$OUT/kp14_top_ops.txt"
  head -45 /tmp/kp14/profile/rank0/top_ops.txt | cut -c1-180
  $PY $D/profile_gaps.py /tmp/kp14/profile/rank0/trace.json 3
}
t_kp_moe() { $PY $D/profile_moe.py; }
t_kp_gdn() { $PY $D/profile_gdn.py; }
t_kp_eng() { $PY $D/profile_engine.py; }
t_kp_fp8() { $PY $D/profile_fp8_linear.py ${KP_FP8_DIMS:-8192 2048 2048 8192 4096 14336}; }  # the FP8 linear: host vs device, kernels, casts
t_kp_graph() { $PY $D/profile_decode_graph.py; }
t_skinny() { $PY $D/sweep_skinny_gemm.py; }  # decode-shape GEMMs: cuBLAS vs a Triton skinny GEMM, GB/s vs copy
t_splits() { $PY $D/sweep_decode_splits.py; }  # the paged decode kernel: min keys a split, keys a step, warps
t_sweepg() { $PY $D/sweep_gather_sum.py; }
t_b_moe() { $PY plugins/mcore-moe/benchmarks/bench_moe.py --skip-loop --repeats 5; }
t_gdnv2() {  # the v2 GDN forward (the default): its GPU tests, then timed against v1 and fla
  $PY -m pytest -q -m gpu plugins/mcore-ssm/tests/test_gdn_triton_state_v2.py 2>&1 | tail -3
  $PY plugins/mcore-ssm/benchmarks/bench_gdn.py --only triton_v1 triton_v2 fla --repeats 5
}
t_gdnbwd() {  # the GDN backward: the default (forward rerun by v2) and the opt-in kernels' GPU tests, then timed
  $PY -m pytest -q -m gpu plugins/mcore-ssm/tests/test_gdn_triton_bwd_opt_in.py plugins/mcore-ssm/tests/test_gdn_triton_bwd.py 2>&1 | tail -3
  $PY plugins/mcore-ssm/benchmarks/bench_gdn.py --only triton triton_v1 triton_state_bwd_v2 triton_pairs_t_saved triton_bwd_opt_in --repeats "${ROUNDS:-3}"
}
t_ssmfused() {  # the fused conv / gated norm kernels' GPU tests (mcore-ssm), then the default GDN tests still pass
  $PY -m pytest -q -p no:cacheprovider -m gpu plugins/mcore-ssm/tests/test_conv_triton.py plugins/mcore-ssm/tests/test_norm_triton.py \
    plugins/mcore-ssm/tests/test_ssm_fused_blocks.py 2>&1 | tail -3
}
t_hyb4k() {  # issue 22: the hybrid step at 4096 against the dense one, and the hybrid with 2026-12-07's GDN changes off
  $PY packages/mcore-core/benchmarks/bench_train.py --out /tmp/bhyb --repeats "${ROUNDS:-1}" --steps "${HYB_STEPS:-20}" \
    --common "--precision.recipe=bf16 --model.max_position_embeddings=16384 --data.max_tokens=5000000 --train.seq_len=4096 --train.global_batch_size=4" \
    --variant "dense-4k=--model.preset=bench-0.9b" --variant "hybrid-4k=--model.preset=hybrid-bench" \
    --variant "hybrid-4k-before=--model.preset=hybrid-bench" \
    --env "hybrid-4k-before:MCORE_SSM_FUSED=0,MCORE_SSM_GDN_BWD_SCRATCH=fp32,MCORE_SSM_GDN_STATE_BWD=v1" 2>&1 | tail -12
}
t_hyb16k() {  # issue 22: the hybrid step at 16384 against the dense one (1 row), eager and with compiled blocks
  $PY packages/mcore-core/benchmarks/bench_train.py --out /tmp/bhyb16 --repeats "${ROUNDS:-1}" --steps "${HYB_STEPS:-15}" \
    --common "--precision.recipe=bf16 --model.max_position_embeddings=16384 --data.max_tokens=5000000 --train.seq_len=16384 --train.global_batch_size=1" \
    --variant "dense-16k=--model.preset=bench-0.9b" --variant "hybrid-16k=--model.preset=hybrid-bench" \
    --variant "hybrid-16k-compiled=--model.preset=hybrid-bench --train.compile=blocks" 2>&1 | tail -8
}
t_gdnblock() {  # issue 22: the whole GDN block (hybrid-bench's mixer) against its pieces, with a profile; then 16k
  (cd plugins/mcore-ssm/benchmarks && $PY bench_gdn_block.py --repeats "${ROUNDS:-5}" --out "$OUT/gdnblock.jsonl" \
    && $PY bench_gdn_block.py --batch 1 --seq 16384 --repeats 3 --no-profile --out "$OUT/gdnblock16k.jsonl")
}
t_gdnopt() {  # the GDN backward opt-ins: each GPU test in its own process (a fault poisons only its own), then timed
  command -v compute-sanitizer > /dev/null && echo "compute-sanitizer: $(command -v compute-sanitizer)"
  for f in test_gdn_triton_bwd_scratch.py test_gdn_triton_walk_order.py; do  # (bwd_opt_in passed on an H100)
    while IFS= read -r id; do  # node ids hold spaces and quotes: one whole line each
      CUDA_LAUNCH_BLOCKING=1 $PY -m pytest -q -p no:cacheprovider -m gpu "$id" > /tmp/one.log 2>&1
      echo "rc=$? ${id#*::} $(grep -o -m1 'illegal[^.]*\|[0-9]* passed\|[0-9]* failed' /tmp/one.log | head -1)"
    done < <($PY -m pytest -q -p no:cacheprovider -m gpu --collect-only "plugins/mcore-ssm/tests/$f" 2>/dev/null | grep '::')
  done
  for c in triton_bwd_before triton_bwd_scratch_inputs triton_state_bwd_v2 triton triton_walk_blocks_now; do  # one process each
    (cd plugins/mcore-ssm/benchmarks && $PY bench_gdn.py --only "$c" --repeats "${ROUNDS:-3}" 2>&1 | grep -v config | tail -2)
  done
}
t_gdninv() {  # the GDN chunk inverse on 16x16 blocks (opt-in): its GPU tests, then timed against the doubling
  $PY -m pytest -q -p no:cacheprovider -m gpu plugins/mcore-ssm/tests/test_gdn_triton_inverse16.py 2>&1 | tail -3
  (cd plugins/mcore-ssm/benchmarks && $PY bench_gdn.py --only triton triton_inverse_blocks16 triton_pairs_t_saved \
    triton_inverse_blocks16_pairs_t_saved --repeats "${ROUNDS:-3}")
}
t_b_gdn() { $PY plugins/mcore-ssm/benchmarks/bench_gdn.py --repeats 5; }
t_b_fp8() { $PY plugins/mcore-precision/benchmarks/bench_fp8.py --repeats 5; }
t_moe_pack() {  # packed gate/up in training: GPU tests (moe, optim), then the layer packed vs concatenated per call
  $PY -m pytest -q -m gpu plugins/mcore-moe/tests/test_packed_training.py plugins/mcore-moe/tests/test_packed_experts.py 2>&1 | tail -2
  $PY -m pytest -q -m gpu plugins/mcore-optim/tests/test_packed_params.py 2>&1 | tail -2
  $PY plugins/mcore-moe/benchmarks/bench_moe.py --skip-loop --repeats 5 --only mcore_moe mcore_moe_unpacked grouped_mm_plain dense_ceiling
}
t_b_fp8step() {  # issue 19: bench-0.9b steps, bf16 vs fp8-current vs fp8-blockwise, eager and compiled
  $PY packages/mcore-core/benchmarks/bench_train.py --suite fp8 --out /tmp/bfp8 --repeats "${ROUNDS:-2}"
  # which runs fell back from a native GEMM (CheckedNative warns once per operand kind) or recompiled
  grep -H -i "emulated\|recompile\|graph break" /tmp/bfp8/r*/*/train.log \
    | sed 's|^/tmp/bfp8/r[0-9]*/\([^/]*\)/train.log:|\1: |' | cut -c1-200 | sort | uniq -c | head -20
}
t_b_moestep() {  # issue 18: the moe-bench training step (4 of its 16 layers), plain, chunked experts, compiled blocks
  $PY packages/mcore-core/benchmarks/bench_train.py --suite moe --out /tmp/bmoe --repeats "${ROUNDS:-2}"
}
t_adamw_vec() {  # the AdamW kernel's vectorized launch: GPU tests, kernel vs scalar loads vs a copy, then the step A/B
  $PY -m pytest -q -m gpu plugins/mcore-optim/tests/test_adamw_triton.py 2>&1 | tail -3
  $PY plugins/mcore-optim/benchmarks/bench_adamw_vectorized.py --repeats 5
  $PY packages/mcore-core/benchmarks/bench_train.py --suite issue14 --out /tmp/bvec --repeats "${ROUNDS:-2}" \
    --variant default= --variant vectorized= --env vectorized:MCORE_OPTIM_ADAMW_VECTORIZED=1
}
t_b_cstep() {  # issues 14/19: the eager bf16 step against the compiled bf16, fp8-current and torchao float8 steps, then the compiled bare model
  $PY packages/mcore-core/benchmarks/bench_train.py --suite fp8 --out /tmp/bcstep --repeats "${ROUNDS:-3}" \
    --variant "bf16=--precision.recipe=bf16" --variant "bf16-compiled=--precision.recipe=bf16 --train.compile=blocks" \
    --variant "fp8-current-compiled=--precision.recipe=fp8-current --train.compile=blocks" \
    --variant "torchao-float8-compiled=--precision.recipe=torchao-float8 --train.compile=blocks"
  $PY plugins/mcore-models/benchmarks/bench.py --sections step_ours_compiled --out /tmp/bare
}
t_b_fp8c() {  # the compiled FP8 linear (host out of the step) beside eager and bf16, then its GPU test
  $PY -m pytest -q -m gpu plugins/mcore-precision/tests/test_fp8.py -k compiled 2>&1 | tail -3
  $PY plugins/mcore-precision/benchmarks/bench_fp8.py --repeats 5 --compile --torchao
}
t_b_host() {
  $PY plugins/mcore-inference/benchmarks/bench_host.py --preset bench-0.9b --batch 1 32
  $PY plugins/mcore-inference/benchmarks/bench_host.py --preset bench-0.9b --batch 1 32 --eager
}
t_b_ovl() {  # overlapped decode and the fused decode kernels: GPU tests, then the decode benchmark (HF on bench-0.9b)
  $PY -m pytest -q -m gpu plugins/mcore-inference/tests/test_overlap_decode.py plugins/mcore-inference/tests/test_triton_store.py \
    plugins/mcore-inference/tests/test_triton_decode.py 2>&1 | tail -3
  $PY -m pytest -q -m gpu plugins/mcore-models/tests/test_add_rmsnorm.py 2>&1 | tail -3
  $PY plugins/mcore-inference/benchmarks/bench_decode.py --presets bench-0.9b llama3-8b --batches 1 32 --repeats 3
}
t_hyb() {  # hybrid models' static decode: the GPU tests (graphs vs eager static), then decode speed
  $PY -m pytest -q -m gpu integration_tests/test_hybrid_static_decode.py 2>&1 | tail -3
  $PY plugins/mcore-inference/benchmarks/bench_hybrid_decode.py --batches 1 32 --repeats 3
}
t_b_moedec() { $PY plugins/mcore-inference/benchmarks/bench_moe_decode.py --batches 1 32 --repeats 3; }
t_b_dec() { $PY plugins/mcore-inference/benchmarks/bench_decode.py --presets bench-0.9b --batches 1 32 --repeats 3 --hf-presets; }
t_b_serv() {
  $PY plugins/mcore-inference/benchmarks/bench_serving.py --sections server --repeats 3 --server-requests 64 \
    --server-output 128 --kv-gib 8
}
t_b_wl() {  # issue 20: 256 long-tailed requests (engine vs HF generate in fixed batches), then the prefix-cache section
  $PY plugins/mcore-inference/benchmarks/bench_serving.py --sections workload prefix --repeats 3 --kv-gib 16
}
t_b_servo() {  # the server section with overlapped decode in the engines
  for mode in ${SERVO_MODES:-process thread}; do  # process: what mcore serve runs; thread: the engine under the server's lock
    $PY plugins/mcore-inference/benchmarks/bench_serving.py --sections server --repeats 3 --server-requests 64 \
      --server-output 128 --kv-gib 8 --overlap-decode --server-mode "$mode"
  done
}
t_mtp() {  # issue 21: train gpt-125m with one MTP depth (mtp_recipe.md) for MTP_TRAIN seconds (SIGTERM: a checkpoint), then bench_speculative
  timeout -s TERM -k 90 "${MTP_TRAIN:-300}" $PY -m mcore train --model.preset=gpt-125m --model.vocab_size=512 \
    --model.mtp_num_layers=1 --model.mtp_loss_weight=0.3 --precision.recipe=bf16 --train.steps=3000 \
    --train.seq_len=512 --train.global_batch_size=32 --train.warmup_steps=100 --optimizer.lr=1e-3 \
    --data.source=stdlib --data.tokenizer=byte --data.workers=8 --log.every=250 --train.out_dir=/tmp/mtp > /tmp/mtp.log 2>&1
  echo "train rc=$?"; grep -v '^{' /tmp/mtp.log | tail -4; tail -1 /tmp/mtp/metrics.jsonl | cut -c1-300
  $PY plugins/mcore-inference/benchmarks/bench_speculative.py --checkpoint /tmp/mtp --out "$OUT/spec.jsonl" --repeats 3
}
t_lc() {  # loss curves (issue 19): LC_RECIPES, LC_BUDGET seconds, LC_SET (e.g. train.compile=blocks); result.json + metrics.jsonl of each run to $OUT/lc
  $PY plugins/mcore-precision/benchmarks/loss_curves.py --out /tmp/lc --recipes "${LC_RECIPES:-bf16,fp8-current}" \
    --long-steps 1000 --short-steps 300 --budget "${LC_BUDGET:-$(( LEFT - 40 ))}" \
    --timeout "${LC_BUDGET:-$(( LEFT - 40 ))}" \
    --checkpoint-every 100000 ${LC_SET:+--set $LC_SET}
  mkdir -p "$OUT/lc"
  cp /tmp/lc/summary.* /tmp/lc/*.png "$OUT/lc/" 2>/dev/null
  for d in /tmp/lc/*/; do
    n=$(basename "$d")
    [ -f "$d/result.json" ] && mkdir -p "$OUT/lc/$n" && cp "$d/result.json" "$d/metrics.jsonl" "$OUT/lc/$n/"
  done
  tail -8 /tmp/lc/summary.md 2>/dev/null
}

for t in "$@"; do
  if ! declare -F "t_$t" > /dev/null; then echo "unknown target $t"; continue; fi
  if [ "$(left)" -lt 20 ]; then echo "SKIP $t (time)"; continue; fi
  echo "=== $t ($(left) s left)"
  s=$(date +%s)
  export LEFT=$(( $(left) - 10 ))  # what a target may take (t_lc sizes its budget from it)
  timeout "$LEFT" bash -c "$(declare -f "t_$t"); $(declare -p PY D OUT); t_$t" > "$OUT/$t.txt" 2>&1
  echo "rc=$? $(( $(date +%s) - s )) s" >> "$OUT/$t.txt"
  grep -v '^{' "$OUT/$t.txt" | grep -v -i warning | tail -"${TAIL:-25}"
done
echo "done in $(( $(date +%s) - START )) s"
