"""System "accelerate": HF Accelerate disk offload under the same budget (the paper's baseline).

bench stage. from_pretrained(device_map="auto", max_memory={device: budget}, offload_folder=...):
Accelerate places whole decoder layers on the compute device until the budget is used and streams
the rest from disk each forward (safetensors/offload-folder memmaps, i.e. through the page cache —
the suite bounds the page cache with a cgroup, see isolation.py). Same routing hook as every other
system: the experts run transformers' own implementation. Sizes in bytes.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from zipmoe.bench.baselines.base import Budget, HFSystem, Setup


@dataclass
class AccelerateSystem(HFSystem):
    name: str = "accelerate"
    label: str = "HF Accelerate offload"
    page_cache: str = "see isolation"

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("accelerate") is None:
            return "package 'accelerate' is not installed (pip install accelerate==1.15.0)"
        return None

    def _offload_dir(self, setup: Setup) -> Path:
        return Path(setup.workdir) / "offload-accelerate"

    def _load(self, setup: Setup, budget: Budget) -> torch.nn.Module:
        offload = self._offload_dir(setup)
        shutil.rmtree(offload, ignore_errors=True)  # Accelerate rewrites it at every load
        kwargs: dict = {"dtype": torch.bfloat16}
        if setup.experts_implementation:
            kwargs["experts_implementation"] = setup.experts_implementation
        if budget.nbytes is None:
            kwargs["device_map"] = {"": setup.device if setup.device != "cuda" else 0}
        else:
            cuda = setup.device.startswith("cuda")
            max_memory = {0: budget.nbytes, "cpu": 0} if cuda else {"cpu": budget.nbytes}
            kwargs.update(device_map="auto", max_memory=max_memory, offload_folder=str(offload))
        model = transformers.AutoModelForCausalLM.from_pretrained(setup.hf_dir, **kwargs)
        placement = Counter(str(v) for v in (getattr(model, "hf_device_map", None) or {"": setup.device}).values())
        self.info = {"device_map_modules": dict(placement), "accelerate_version": _version("accelerate")}
        return model

    def close(self) -> None:
        super().close()
        if self.setup is not None:  # the offloaded copy can be tens of GB: never leave it behind
            shutil.rmtree(self._offload_dir(self.setup), ignore_errors=True)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
