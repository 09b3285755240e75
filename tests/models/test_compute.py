"""install() error paths: engine errors propagate, a source that skips an expert is caught, dense models
are refused."""

from __future__ import annotations

import pytest
import torch
import transformers
from tests.tiny_models import build_tiny_model

from zipmoe.errors import ChecksumError, UnsupportedModelError
from zipmoe.models.compute import install
from zipmoe.models.sources import InMemoryExpertSource


class _Failing(InMemoryExpertSource):
    def experts(self, layer, needed, tokens=None):
        yield from list(super().experts(layer, needed))[:-1]
        raise ChecksumError(f"layer {layer} expert {needed[-1]}: chunk checksum mismatch")


class _Skipping(InMemoryExpertSource):
    def experts(self, layer, needed, tokens=None):
        yield from list(super().experts(layer, needed))[1:]


@pytest.mark.parametrize("reference", ["eager", "grouped_mm"])
def test_source_errors_surface_from_forward(reference):
    model = build_tiny_model("qwen3_moe")
    model.set_experts_implementation(reference)
    ids = torch.tensor([[5, 6, 7]])
    install(model, _Failing.from_model(model))
    with pytest.raises(ChecksumError, match="checksum"):
        model(input_ids=ids)
    install(model, _Skipping(InMemoryExpertSource.from_model(build_tiny_model("qwen3_moe")).weights))
    assert model._zipmoe_reference == reference
    with pytest.raises(RuntimeError, match="did not serve"):
        model(input_ids=ids)


def test_dense_model_is_refused():
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="no fused experts"):
        install(model, InMemoryExpertSource({}))
