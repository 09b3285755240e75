# Issue 6's whole suite on the device, one workdir per shape, in calls that resume (each under 10 min):
#   . scripts/device.sh && ZIPMOE_COMMIT=<sha> bash scripts/e2e_suite.sh all     # again until it says done
# `all` runs the Qwen shape, then DeepSeek-V2-Lite in the time the call has left; `qwen` or `deepseek` runs one.
# Make the calls back to back: the machine keeps runs/ only while it stays warm (released after ~30 s idle).
# Accelerate reads every expert per token (~4 s on the device), so it is measured on a sample (--sample).
# DEADLINE (s, default 520) ends a call early when less device time is left. WARM (default attention) is
# bench e2e --warm-process: attention replays the workload on a one-layer clone (25 s per call on the device,
# ninth session), 1 on the first system (118 s per call, eighth session), 0 not at all.
# BATCHES (default "1 16") are the batch sizes measured; "1 4 16" adds batch 4. BATCHES=4 with
# SYSTEMS=zipmoe,uncompressed,transformers,llama.cpp took 341 + ~60 s in a workdir already built (seventeenth session).
# llama.cpp joins with SYSTEMS=...,llama.cpp and ZIPMOE_LLAMA_CPP=<dir> from
#   bash scripts/llama_cpp_build.sh .whl/llama.cpp-src.tar.gz build/llama.cpp   # CUDA sm_90: 247 s on the device
# (the tarball: the llama-cpp-python 0.3.36 sdist's vendor/llama.cpp without docs/, models/, tests/, media/,
# benches/: 11 MB; BENCHMARKS.md, fifteenth session), made here with
#   pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/dl && tar xzf /tmp/dl/llama_cpp_python-0.3.36.tar.gz -C /tmp/dl
#   tar czf .whl/llama.cpp-src.tar.gz -C /tmp/dl/llama_cpp_python-0.3.36/vendor --exclude=llama.cpp/{models,docs,media,benches,tests} llama.cpp
# The workdir then converts the checkpoint to a GGUF (42 s).
# DEVICE=cpu runs every system on the CPU (its own workdir, runs/e2e-<shape>-cpu; llama.cpp then gets -ngl 0 and
# no visible GPU; build it with LLAMA_CPU_ONLY=1). The default is cuda where there is one.
# SYSTEMS overrides the compared systems (e.g. add zipmoe-fused to A/B load(late_merge=False), the CUDA default
# being on). Measured at 9b2190d: DeepSeek-V2-Lite in two calls, 463 + 272 s (BENCHMARKS.md, ninth session);
# the Qwen shape at 4c1bc7a in three, 532 + 447 + 87 s (eighth session), at c01000d in three, ~450 + 331 + 73 s
# (tenth session; the first call also ran the GPU suite). At 10b6bc9 (eleventh) one call of 434 s did zipmoe and
# transformers at both batches and the rest at batch 1; BATCHES=16 SYSTEMS=zipmoe,uncompressed,accelerate took one
# call of 405 s on a fresh machine. Each call's start costs a ~30 s process warm-up.
set -euo pipefail
case "${1:-}" in
  qwen|deepseek) names=("$1") ;;
  all) names=(qwen deepseek) ;;
  *) echo "usage: bash scripts/e2e_suite.sh qwen|deepseek|all" >&2; exit 2 ;;
esac
deadline=${DEADLINE:-520}
start=$SECONDS
for name in "${names[@]}"; do
  case "$name" in qwen) shape=qwen1.5-moe-a2.7b ;; deepseek) shape=deepseek-v2-lite ;; esac
  left=$((deadline - (SECONDS - start)))
  if ((left < 120)); then  # too little to build a model and measure anything: the next call starts here
    echo "e2e_suite: ${left} s left of DEADLINE; run the same command again to go on with $name"
    exit 0
  fi
  work=runs/e2e-$name${DEVICE:+-$DEVICE}
  out=${OUT:-$work-out}
  mkdir -p "$out"
  systems=${SYSTEMS:-zipmoe,uncompressed,transformers,accelerate}
  sample=()
  [[ ",$systems," == *,accelerate,* ]] && sample=(--sample accelerate=2x8)  # --sample must name a compared system
  log=$(mktemp)
  zipmoe bench e2e --workdir "$work" --shape "$shape" --layers 6 ${DEVICE:+--device "$DEVICE"} \
    --systems "$systems" --budgets 0.25 --batches ${BATCHES:-1 16} \
    --prompts 8 --new-tokens 64 "${sample[@]}" --deadline "$left" --warm-process "${WARM:-attention}" \
    --json "$out/e2e-$name.json" --report 2>&1 | tee "$log"
  mkdir -p "$out/$name"
  cp "$work/report/"*.md "$work/report/"*.png "$out/$name/" 2>/dev/null || true
  if grep -q "deadline reached" "$log"; then
    rm -f "$log"
    exit 0  # the message above names what the next call resumes
  fi
  rm -f "$log"
done
echo "e2e_suite: done (${names[*]})"
