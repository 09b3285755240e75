"""Per-expert nn.Linear layouts (SwitchTransformers): the adapter's plan, and the served loop bit-exact to
plain transformers, with a source that yields copies of the experts in a shuffled order."""

from __future__ import annotations

import pytest
import torch
import transformers
from tests.tiny_models import TINY_SEQ2SEQ_CONFIGS, build_tiny_checkpoint, read_checkpoint

from zipmoe.errors import UnsupportedModelError
from zipmoe.models import UNGATED, expert_tensor_plan, get_adapter
from zipmoe.models import per_expert as pe
from zipmoe.models.build import build_model_without_experts
from zipmoe.models.sources import InMemoryExpertSource
from zipmoe.types import ExpertKey

MODEL_TYPES = sorted(TINY_SEQ2SEQ_CONFIGS)
_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]
DEVICES = ["cpu", pytest.param("cuda", marks=_GPU)]


@pytest.fixture(scope="module", params=MODEL_TYPES)
def checkpoint(request, tmp_path_factory):
    return build_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param), seed=1)


def _inputs(batch: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 150, (batch, 9), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(1, batch):  # padding of different lengths
        mask[row, : 2 * row] = 0
        ids[row, : 2 * row] = 0
    return ids, mask, torch.randint(3, 150, (batch, 5), generator=gen)


def _pair(path, device="cpu", seed=3):
    ref = transformers.AutoModelForSeq2SeqLM.from_pretrained(path).to(device).eval()
    tensors, config = read_checkpoint(path)
    plan = expert_tensor_plan(list(tensors), config)
    model = build_model_without_experts(path, {k: tensors[k] for k in plan.dense}, device=device)
    source = InMemoryExpertSource.from_model(ref, seed=seed)
    pe.install(model, source, get_adapter(config["model_type"]))
    return ref, model, source


@pytest.mark.parametrize("blocks", [(4, 4, 4, 4), (4, 2, 2, 1), (6, 3, 3, 1), (4, 4, 1, 2), (2, 6, 0, 3)], ids=str)
def test_the_adapter_names_the_containers_transformers_builds(blocks):
    """The sparse-block rule is the adapter's copy of SwitchTransformersStack's; store layer ids count the
    encoder's blocks first, then the decoder's."""
    enc, dec, sparse_enc, sparse_dec = blocks
    config = transformers.SwitchTransformersConfig(**{
        **TINY_SEQ2SEQ_CONFIGS["switch_transformers"], "num_layers": enc, "num_decoder_layers": dec,
        "num_sparse_encoder_layers": sparse_enc, "num_sparse_decoder_layers": sparse_dec})
    with torch.device("meta"):
        model = transformers.AutoModelForSeq2SeqLM.from_config(config)
    built = sorted(((0, int(n.split(".")[2])) if n.startswith("encoder") else (enc, int(n.split(".")[2])), n)
                   for n, m in model.named_modules() if type(m).__name__ == "SwitchTransformersExperts")
    assert get_adapter("switch_transformers").containers(config.to_dict()) == [(o + b, n) for (o, b), n in built]


def test_the_layout_of_a_raw_config_is_the_one_transformers_builds(checkpoint):
    """The converter sees config.json as a dict, the loader a config object: both must give the layout
    transformers builds, which derives missing sparse steps from num_sparse_*_layers and lets explicit
    steps override them."""
    _, config = read_checkpoint(checkpoint)
    adapter = get_adapter("switch_transformers")
    for odd in ({}, {"encoder_sparse_step": 4, "decoder_sparse_step": 1}):
        raw = {k: v for k, v in config.items() if not k.endswith("_sparse_step")} | odd
        with torch.device("meta"):
            model = transformers.AutoModelForSeq2SeqLM.from_config(
                transformers.AutoConfig.for_model(**raw))
        built = {n for n, m in model.named_modules() if type(m).__name__ == "SwitchTransformersExperts"}
        assert {name for _, name in adapter.containers(raw)} == built
        assert adapter.containers(raw) == adapter.containers(model.config.to_dict())


def test_expert_weights_the_config_does_not_place_are_refused(checkpoint):
    from zipmoe.errors import ConversionError

    tensors, config = read_checkpoint(checkpoint)
    with pytest.raises(ConversionError, match="look like routed experts"):
        expert_tensor_plan(list(tensors), {**config, "encoder_sparse_step": 4})  # block 3's experts left over


def test_plan_takes_every_expert_weight_and_nothing_else(checkpoint):
    tensors, config = read_checkpoint(checkpoint)
    plan = expert_tensor_plan(list(tensors), config)
    adapter = get_adapter(config["model_type"])
    layers = adapter.moe_layers(config)
    assert plan.moe_layers == layers == [1, 3, 5]  # encoder blocks 1, 3; decoder block 1 after 4 encoder blocks
    assert sorted(plan.experts) == [ExpertKey(layer, e) for layer in layers for e in range(config["num_experts"])]
    for srcs in plan.experts.values():
        assert tuple(s.proj for s in srcs) == UNGATED
        up, down = (tensors[s.tensor] for s in srcs)
        assert up.shape == (config["d_ff"], config["d_model"]) and down.shape == up.T.shape
    assert not plan.expert_tensors & set(plan.dense)
    assert plan.expert_tensors | set(plan.dense) == set(tensors)
    assert any(".router." in n for n in plan.dense)


@pytest.mark.parametrize("device", DEVICES)
def test_logits_and_greedy_tokens_equal(checkpoint, device):
    ref, model, source = _pair(checkpoint, device)
    names = {n.name for n in get_adapter(model.config.model_type).expert_names(model.config.to_dict())}
    params = dict(model.named_parameters())
    assert names <= set(params) and all(params[n].is_meta for n in names)
    with torch.no_grad():
        for batch in (1, 4):
            ids, mask, dec = (t.to(device) for t in _inputs(batch))
            want = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            assert torch.equal(got, want), f"batch {batch}: max diff {(got - want).abs().max()}"
        ids, mask, _ = (t.to(device) for t in _inputs(4, seed=1))
        kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True,
                  return_dict_in_generate=True)
        got, want = model.generate(ids, **kw), ref.generate(ids, **kw)
        assert torch.equal(got.sequences, want.sequences)
        assert all(torch.equal(g, w) for g, w in zip(got.logits, want.logits, strict=True))
    layers = {layer for layer, _ in source.calls}
    assert layers == {1, 3, 5} and all(list(needed) == sorted(set(needed)) for _, needed in source.calls)


def test_the_router_drops_tokens_over_capacity_in_these_inputs(checkpoint):
    """The tiny config's expert capacity (3 per sequence) is small enough that the router masks tokens out:
    the equality above covers tokens that get no expert."""
    ref = transformers.AutoModelForSeq2SeqLM.from_pretrained(checkpoint).eval()
    masks = []
    hook = ref.encoder.block[1].layer[1].mlp.experts.register_forward_pre_hook(lambda m, a: masks.append(a[1]))
    ids, mask, dec = _inputs(4)
    with torch.no_grad():
        ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
    hook.remove()
    routed = masks[0].sum(dim=-1).flatten()
    assert (routed == 0).any() and (routed == 1).any()


def test_a_wrong_expert_changes_the_logits(checkpoint):
    """The comparison can fail: serving expert 1's weights for expert 0 must show in the logits."""
    ref, model, source = _pair(checkpoint)
    for layer, (first, last) in source.weights.items():
        source.weights[layer] = (first[[1, 0, *range(2, len(first))]], last)
    ids, mask, dec = _inputs(4)
    with torch.no_grad():
        assert not torch.equal(model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                               ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)


def test_other_implementations_are_refused(checkpoint):
    _, model, source = _pair(checkpoint)
    with pytest.raises(UnsupportedModelError, match="its own loop"):
        pe.install(model, source, get_adapter("switch_transformers"), "grouped_mm")


def test_installing_again_keeps_one_served_class_and_exact_logits(checkpoint):
    ref, model, source = _pair(checkpoint)
    adapter = get_adapter("switch_transformers")
    pe.install(model, source, adapter)
    for _, _, container in pe.containers(model, adapter):
        assert [c.__name__ for c in type(container).__mro__].count("ZipMoESwitchTransformersExperts") == 1
    ids, mask, dec = _inputs(4)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                           ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)


def test_forwards_on_two_threads_stay_exact(checkpoint):
    """The served loop writes nothing into the expert modules, so one model may run on several threads
    (the server does): a parameter swap per call would let one thread compute with another's weights."""
    import threading

    ref, model, _ = _pair(checkpoint)
    inputs = [_inputs(2, seed=k) for k in range(2)]
    with torch.no_grad():
        want = [ref(input_ids=i, attention_mask=m, decoder_input_ids=d).logits for i, m, d in inputs]
    wrong = []

    def work(k):
        for _ in range(25):
            i, m, d = inputs[k]
            with torch.no_grad():
                wrong.append(not torch.equal(model(input_ids=i, attention_mask=m, decoder_input_ids=d).logits, want[k]))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wrong) == 50 and not any(wrong)
    assert all(p.is_meta for n, p in model.named_parameters() if ".experts.expert_" in n)


def test_the_served_model_can_be_dropped_without_the_garbage_collector(checkpoint):
    """The container's class is swapped (no bound method on the instance), so no cycle keeps it alive."""
    import gc
    import weakref

    _, model, _ = _pair(checkpoint)
    ref = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert ref() is None
    finally:
        gc.enable()

