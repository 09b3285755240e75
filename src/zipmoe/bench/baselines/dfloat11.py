"""DFloat11, the one system the suite names but cannot drive: it always reports why.

bench stage. DFloat11 (PyPI `dfloat11` 0.5.0) serves models whose losslessly compressed weights fit on the
GPU, the everything-fits case. It loads only checkpoints made by its own `compress_model`, and that cannot
make one of ours (measured in the fifteenth session, BENCHMARKS.md):
- it Huffman-codes the exponents in a Python loop, element by element: 1.66 M elements/s on the dev machine,
  about 45 CPU-minutes for the 6-layer Qwen1.5-MoE shape (4.4 G weights), beyond a 10-minute device call;
- it takes weights from `.weight` attributes of the modules its pattern names, and transformers 5 keeps a
  layer's experts as fused 3-D parameters (`gate_up_proj`, `down_proj`) with no such attribute.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from zipmoe.bench.baselines.base import HFSystem


@dataclass
class DFloat11System(HFSystem):
    name: str = "dfloat11"
    label: str = "DFloat11 (compressed, on GPU)"

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("dfloat11") is None:
            return "not available: package 'dfloat11' is not installed"
        return ("not available: 'dfloat11' is installed, but its compress_model cannot make a DFloat11 copy of "
                "this checkpoint (a per-element Python coder, ~45 CPU-minutes for 6 layers; it expects per-module "
                ".weight tensors, not transformers 5's fused experts)")
