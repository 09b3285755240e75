"""expert_tensor_plan: Hub per-expert names, fused layouts, generic rule, and the error paths."""

from __future__ import annotations

import pytest
import torch
from tests.tiny_models import TINY_CONFIGS, build_tiny_checkpoint, build_tiny_model, read_checkpoint

from zipmoe.errors import ConversionError, UnsupportedModelError
from zipmoe.models import PROJ_ORDER, expert_tensor_plan, get_adapter
from zipmoe.types import ExpertKey


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def checkpoint(request, tmp_path_factory):
    path = build_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, *read_checkpoint(path)


def test_hub_layout_experts_match_the_fused_model_weights(checkpoint):
    model_type, tensors, config = checkpoint
    plan = expert_tensor_plan(list(tensors), config)
    model = build_tiny_model(model_type)
    sd = model.state_dict()
    n_layers, n_experts = config["num_hidden_layers"], get_adapter(model_type).num_experts(config)
    assert sorted(plan.experts) == [ExpertKey(l, e) for l in range(n_layers) for e in range(n_experts)]
    for key, srcs in plan.experts.items():
        assert tuple(s.proj for s in srcs) == PROJ_ORDER
        gate, up, down = (s.take(tensors[s.tensor]) for s in srcs)
        fused = sd[f"model.layers.{key.layer}.mlp.experts.gate_up_proj"][key.expert]
        assert torch.equal(torch.cat([gate.flatten(), up.flatten()]), fused.flatten())
        assert torch.equal(down, sd[f"model.layers.{key.layer}.mlp.experts.down_proj"][key.expert])
    assert not plan.expert_tensors & set(plan.dense)
    assert plan.expert_tensors | set(plan.dense) == set(tensors)
    assert all("shared_expert" not in name for name in plan.expert_tensors)


def test_fused_layout_gives_the_same_slices(checkpoint):
    model_type, tensors, config = checkpoint
    hub = expert_tensor_plan(list(tensors), config)
    sd = build_tiny_model(model_type).state_dict()  # transformers' in-memory (fused) names
    fused_plan = expert_tensor_plan(list(sd), config, shapes={k: tuple(v.shape) for k, v in sd.items()})
    assert sorted(fused_plan.experts) == sorted(hub.experts)
    for key, srcs in fused_plan.experts.items():
        for a, b in zip(srcs, hub.experts[key], strict=True):
            assert torch.equal(a.take(sd[a.tensor]), b.take(tensors[b.tensor]))


def test_generic_rule_finds_the_same_experts(checkpoint):
    _, tensors, config = checkpoint
    plan = expert_tensor_plan(list(tensors), config)
    generic = expert_tensor_plan(list(tensors), dict(config, model_type="my_new_moe"))
    assert generic.adapter == "generic"
    assert generic.experts == plan.experts and generic.dense == plan.dense


def test_missing_expert_is_a_conversion_error(checkpoint):
    _, tensors, config = checkpoint
    names = [n for n in tensors if ".experts.3." not in n or ".layers.1." not in n]
    with pytest.raises(ConversionError, match="layer 1"):
        expert_tensor_plan(names, config)


def test_dense_model_is_rejected():
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.gate_proj.weight", "lm_head.weight"]
    with pytest.raises(UnsupportedModelError, match="qwen2_moe"):
        expert_tensor_plan(names, {"model_type": "llama", "num_hidden_layers": 1})
    with pytest.raises(ConversionError, match="no routed experts"):
        expert_tensor_plan(names, {"model_type": "mixtral", "num_hidden_layers": 1, "num_local_experts": 2})


def test_unknown_type_without_generic_is_rejected():
    with pytest.raises(UnsupportedModelError, match="deepseek_v2"):
        get_adapter("llama", allow_generic=False)
