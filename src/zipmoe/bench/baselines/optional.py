"""Optional systems that run only where their packages are installed: llama.cpp and DFloat11.

bench stage. Neither is a dependency of zipmoe and neither is installed by the suite. When the
package is missing the system reports "not available" with the reason (the run JSON records it and
the report lists it); when it is present, the adapter that drives it is not written yet, which is
reported the same way rather than guessed at. llama.cpp could not take the calibrated routing
anyway (its router cannot be replaced from Python): its numbers would use the model's own routing.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from zipmoe.bench.baselines.base import HFSystem


@dataclass
class _Optional(HFSystem):
    package: str = ""  # importable module name
    pip_name: str = ""  # how to install it
    note: str = ""  # what the adapter would have to do

    def unavailable(self) -> str | None:
        if importlib.util.find_spec(self.package) is None:
            return f"not available: package '{self.pip_name}' is not installed"
        return f"not available: '{self.pip_name}' is installed but the suite has no adapter for it yet ({self.note})"


@dataclass
class LlamaCppSystem(_Optional):
    name: str = "llama.cpp"
    label: str = "llama.cpp (experts offloaded)"
    package: str = "llama_cpp"
    pip_name: str = "llama-cpp-python"
    note: str = "needs a BF16 GGUF of the checkpoint and --n-cpu-moe; routing would be the model's own"


@dataclass
class DFloat11System(_Optional):
    name: str = "dfloat11"
    label: str = "DFloat11 (compressed, on GPU)"
    package: str = "dfloat11"
    pip_name: str = "dfloat11"
    note: str = "needs a DFloat11-compressed copy of the checkpoint"
