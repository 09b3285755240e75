"""How much can planning gain over the default all-C pools? The planner's own answer, for batch 1 and B.

Issue 4 asks planning + four pools for >= 1.15x the best single pool. Per byte of budget an F, C, S or E
entry saves about one byte of disk read per hit, so under an I/O-bound cost model the layouts differ only
in the decode they save: the planner's gain over all-C is large only when decode is the bottleneck.
This prints the planner's plan and its expected layer makespan next to all-C's, under the same cost
model, at several decode rates (x1 = the device's measured rate). Pure numerics, any machine, < 10 s.

    python scripts/planning_headroom.py [--disk-gbps 2.1] [--decode-gbps 0.675] [--batch 16]
"""

import argparse

from zipmoe.planner import RankSnapshot, plan
from zipmoe.planner.capacity import layout_cost
from zipmoe.planner.makespan import ExpertGeometry
from zipmoe.planner.profile_io import profile_curves
from zipmoe.planner.stats import batch_curves
from zipmoe.scheduler.tasks import CostModel


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--disk-gbps", type=float, default=2.1, help="O_DIRECT read rate (device: 1.5-2.4)")
    p.add_argument("--decode-gbps", type=float, default=0.675,
                   help="weights one worker decodes per s, 1e9 (device: 8 workers decode 10.8 GB/s of BF16)")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--budget", type=float, default=0.25, help="share of the BF16 expert bytes for the pools")
    a = p.parse_args()
    layers, experts, top_k, numel = 6, 60, 4, 3 * 2048 * 1408  # the benchmarks' Qwen1.5-MoE shape, 6 layers
    geom = ExpertGeometry.of(numel, numel, int(0.324 * numel), k=8)  # stored/BF16 = 0.662 as measured
    budget = int(a.budget * layers * experts * 2 * numel)
    prior = profile_curves("qwen1.5-moe-a2.7b", layers, experts, top_k=top_k)
    n_c = min(experts, budget // layers // geom.entry_bytes[1])
    print(f"{a.budget:.0%} of expert bytes; all-C = {n_c} C entries per layer; disk {a.disk_gbps} GB/s, "
          f"{a.workers} workers")
    print("batch  decode rate  plan (F/C/S/E, all layers)      plan ms/step  all-C ms/step  all-C / plan")
    for batch in (1, a.batch):
        curves = batch_curves(prior, batch)
        snap = RankSnapshot(tuple(range(layers)), curves, (64.0,) * layers)
        per_call = top_k if batch == 1 else None
        for scale in (1.0, 0.3, 0.1):
            costs = CostModel(a.disk_gbps * 1e9, 1e-4, a.decode_gbps * 1e9 * scale, 6e9, 2e-4)
            best = plan(snap, geom, costs, a.workers, budget, per_call=per_call)
            all_c = layout_cost(snap, geom, costs, a.workers, (0, n_c, 0, 0), per_call=per_call)
            caps = "/".join(str(v) for v in best.capacities.values())
            print(f"{batch:>5}  x{scale:<10} {caps:<32} {best.predicted_s * 1e3:>12.1f} {all_c * 1e3:>14.1f}"
                  f" {all_c / best.predicted_s:>13.3f}")


if __name__ == "__main__":
    main()
