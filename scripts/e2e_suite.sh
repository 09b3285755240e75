# Issue 6's whole suite on the device, one shape per workdir, in calls that resume (each under 10 min):
#   . scripts/device.sh && ZIPMOE_COMMIT=<sha> bash scripts/e2e_suite.sh qwen      # again until it says done
#   . scripts/device.sh && ZIPMOE_COMMIT=<sha> bash scripts/e2e_suite.sh deepseek
# Make the calls back to back: the machine keeps runs/ only while it stays warm (released after ~30 s idle).
# Accelerate reads every expert per token (~4 s on the device), so it is measured on a sample (--sample).
# DEADLINE (s, default 520) ends a call early when less device time is left; WARM=attention replays the
# workload on a one-layer clone instead of the first system (bench e2e --warm-process; not yet compared on the
# device against the default replay, which took 118 s of each call on the Qwen shape).
# SYSTEMS overrides the compared systems (e.g. add zipmoe-fused to A/B load(late_merge=False), the CUDA default being on).
# Measured on the Qwen shape at 4c1bc7a: three calls, 532 + 447 + 87 s (BENCHMARKS.md, eighth session).
set -euo pipefail
case "${1:-}" in
  qwen) shape=qwen1.5-moe-a2.7b ;;
  deepseek) shape=deepseek-v2-lite ;;
  *) echo "usage: bash scripts/e2e_suite.sh qwen|deepseek" >&2; exit 2 ;;
esac
out=${OUT:-runs/e2e-$1-out}
mkdir -p "$out"
zipmoe bench e2e --workdir "runs/e2e-$1" --shape "$shape" --layers 6 \
  --systems "${SYSTEMS:-zipmoe,uncompressed,transformers,accelerate}" --budgets 0.25 --batches 1 16 \
  --prompts 8 --new-tokens 64 --sample accelerate=2x8 --deadline "${DEADLINE:-520}" --warm-process "${WARM:-1}" \
  --json "$out/e2e-$1.json" --report
cp "runs/e2e-$1/report/"*.md "runs/e2e-$1/report/"*.png "$out/" 2>/dev/null || true
