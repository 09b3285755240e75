"""generate() decodes a grouped_mm model with batched_mm on a GPU (transformers'
_optimize_model_for_decode); a zipmoe model must follow the same switch, per thread. The kernels only
differ on a GPU (covered by the gpu-marked equivalence tests); here the switch's condition is forced
so its bookkeeping runs on CPU tensors."""

from __future__ import annotations

import threading

import pytest
import torch
import transformers
from tests.models.test_equivalence import _dense_state_dict
from tests.tiny_models import build_tiny_checkpoint

from zipmoe.models import compute
from zipmoe.models.build import build_model_without_experts
from zipmoe.models.compute import batched_mm_like_forward, grouped_mm_like_forward, install
from zipmoe.models.sources import InMemoryExpertSource

pytestmark = pytest.mark.skipif(
    not hasattr(transformers.GenerationMixin, "_optimize_model_for_decode"),
    reason="this transformers version has no decode-phase kernel switch")


class _Spy(InMemoryExpertSource):
    """Records which implementation each layer call ran under."""

    def experts(self, layer, needed, tokens=None):
        self.modes.append(self.owner in getattr(compute._DECODING, "models", ()))
        return super().experts(layer, needed)


@pytest.fixture
def model_and_source(tmp_path):
    path = build_tiny_checkpoint("qwen2_moe", tmp_path, seed=1)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, experts_implementation="grouped_mm")
    model = build_model_without_experts(path, _dense_state_dict(path), experts_implementation="grouped_mm")
    source = _Spy({layer: (m.gate_up_proj.detach().clone(), m.down_proj.detach().clone())
                   for layer, _, m in compute.experts_modules(ref)})
    source.modes = []
    install(model, source)
    source.owner = id(model)
    return model, source


def test_decode_steps_run_batched_mm_on_a_gpu_and_grouped_mm_for_the_prefill(model_and_source, monkeypatch):
    model, source = model_and_source
    module = compute.experts_modules(model)[0][2]
    assert module._zipmoe_forward == (grouped_mm_like_forward, batched_mm_like_forward)
    monkeypatch.setattr(compute, "_switches_for_decode", lambda model: True)  # as on a GPU
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    layers = len(compute.experts_modules(model))
    assert source.modes[:layers] == [False] * layers, "the prefill must run grouped_mm"
    assert source.modes[layers:] and all(source.modes[layers:]), "decode steps must run batched_mm"
    assert not getattr(compute._DECODING, "models", ()), "the switch must be undone after generate()"


def test_the_switch_stays_off_on_the_cpu_and_is_per_thread_and_per_model(model_and_source, tmp_path, monkeypatch):
    model, source = model_and_source
    with model._optimize_model_for_decode():
        assert not getattr(compute._DECODING, "models", ())  # CPU: transformers keeps grouped_mm, so do we
    monkeypatch.setattr(compute, "_switches_for_decode", lambda model: True)  # as on a GPU
    seen = []
    with torch.no_grad(), model._optimize_model_for_decode():
        thread = threading.Thread(target=lambda: seen.append(bool(getattr(compute._DECODING, "models", ()))))
        thread.start()
        thread.join()
        # another zipmoe model run inside this model's decode step (a draft model, say) keeps its own phase
        path = build_tiny_checkpoint("qwen2_moe", tmp_path / "other", seed=2)
        other = build_model_without_experts(path, _dense_state_dict(path), experts_implementation="grouped_mm")
        ref = transformers.AutoModelForCausalLM.from_pretrained(path, experts_implementation="grouped_mm")
        spy = _Spy({layer: (m.gate_up_proj.detach().clone(), m.down_proj.detach().clone())
                    for layer, _, m in compute.experts_modules(ref)})
        spy.modes = []
        install(other, spy)
        spy.owner = id(other)
        other(input_ids=torch.tensor([[5, 6, 7]]))
        model(input_ids=torch.tensor([[5]]))
    assert seen == [False]
    assert spy.modes and not any(spy.modes), "the other model's prefill ran the decode kernels"
    assert source.modes[-1] is True


def test_a_source_written_before_the_tokens_hint_still_serves(tmp_path):
    from tests.models.test_equivalence import _pair

    class TwoArgs(InMemoryExpertSource):
        def experts(self, layer, needed):  # the interface's first form
            return super().experts(layer, needed)

    path = build_tiny_checkpoint("qwen2_moe", tmp_path, seed=1)
    ref, model, source = _pair(path, "grouped_mm")
    old = TwoArgs(source.weights)
    compute.replace_source(model, old)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert old.calls
