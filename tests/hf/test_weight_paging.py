"""``enable_paging(..., page_weights=True)``: decoder-layer weights and the KV cache share one pager.

Tiny random-weight models under a budget smaller than their layer weights alone: generation is
exact (same tokens, bitwise-equal logits under SDPA), weight pages leave the device between tokens
and come back (through host and disk), and the layer-ahead prefetch hook issues prefetches.
"""

from __future__ import annotations

import copy
import re
import threading

import pytest
import torch

from pagedtensor import DeviceTierFullError, OutOfPagesError, enable_paging
from pagedtensor.hf import paging_state
from pagedtensor.tensor import PagedTensor
from tests.hf.tiny_models import PAGE, prompts, tiny_budget, tiny_pair
from tests.support import run_in_threads

NEW_TOKENS = 6
VRAM_PAGES = 24  # the two layers' weights alone take 72 pages (Llama) / 73 (Qwen2, with biases)
HOST_PAGES = 16


def _generate(model, ids, mask, **kwargs):
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
        return_dict_in_generate=True, **kwargs,
    )


def _layer_bytes(model, at_least: int = 0) -> int:
    """Bytes of the decoder layers' parameters (those of ``at_least`` bytes: the ones paged at that page size)."""
    return sum(p.numel() * p.element_size() for p in model.model.layers.parameters() if p.numel() * p.element_size() >= at_least)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_paged_weights_are_exact_under_a_small_budget(family, nvme_dir):
    reference, model = tiny_pair(family, attn="sdpa")
    ids, mask = prompts(3)
    expected = _generate(reference, ids, mask)
    budget = tiny_budget(nvme_dir, vram_pages=VRAM_PAGES, host_pages=HOST_PAGES)
    assert budget.vram_limit + budget.host_memory < _layer_bytes(model)  # weights alone overflow device + host
    enable_paging(model, budget, attn_implementation="sdpa", prefill_chunk_size=16, page_weights=True)
    state = paging_state(model)
    pager = state.pager

    # Every decoder-layer parameter of a page or more is a PagedTensor parameter on the KV cache's
    # pager; the smaller ones (norms, biases here) and the rest of the model stay dense.
    small = []
    for layer in model.model.layers:
        for name, parameter in layer.named_parameters():
            if parameter.numel() * parameter.element_size() < pager.page_size:
                assert type(parameter) is torch.nn.Parameter and parameter.device == pager.device, name
                small.append(name)
                continue
            assert isinstance(parameter, torch.nn.Parameter) and isinstance(parameter, PagedTensor), name
            assert parameter.pager is pager and not parameter.requires_grad, name
    assert "input_layernorm.weight" in small and "self_attn.q_proj.weight" not in small, small
    assert not isinstance(model.model.embed_tokens.weight, PagedTensor)
    assert not isinstance(model.model.norm.weight, PagedTensor)
    assert not isinstance(model.lm_head.weight, PagedTensor)
    assert len(state.weight_allocations) == len(model.model.layers)
    if family == "qwen2":
        assert "self_attn.q_proj.bias" in small

    # The page table of layer 0's q_proj weight after each forward (between tokens).
    weight = model.model.layers[0].self_attn.q_proj.weight
    tiers: list[list[str]] = []
    hook = model.register_forward_hook(lambda *_: tiers.append([info.tier for info in pager.page_table(weight.allocation)]))
    try:
        got = _generate(model, ids, mask)
    finally:
        hook.remove()

    assert torch.equal(got.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
        assert torch.equal(a, b), f"logits differ at step {step}: {(a - b).abs().max()}"

    stats = pager.stats()
    assert stats["bytes_d2h"] > 0 and stats["bytes_to_disk"] > 0, stats
    assert stats["bytes_from_disk"] > 0 and stats["bytes_h2d"] > 0, stats
    # Every token reads all layer weights back to the device: far more than the KV cache ever holds.
    kv_bytes = 2 * len(model.model.layers) * 3 * ids.shape[1] * 2 * 16 * 4 * 2  # generous: 2x the KV of 3 x 40+ tokens
    assert stats["bytes_h2d"] > NEW_TOKENS * _layer_bytes(model) // 2 > kv_bytes, stats
    assert len(tiers) == NEW_TOKENS
    assert all(any(tier != "device" for tier in pages) for pages in tiers), tiers  # off the device between tokens
    assert any(tier in ("host", "disk") for pages in tiers for tier in pages), tiers
    # The tier holds less than one layer: none of the next layer fits beside the one about to run
    # (prefetched, it was evicted by that layer's faults before its own forward read it again).
    assert stats["prefetched_pages"] == 0, stats
    # the weights are intact in the pager
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p.materialize() if isinstance(p, PagedTensor) else p, q), name


def test_layer_ahead_prefetch_order(nvme_dir, monkeypatch):
    """Layer i's pre-hook prefetches layer i+1's weight allocations (those not all on the device, as
    one batch); the last layer's prefetches layer 0's."""
    reference, model = tiny_pair("llama", attn="sdpa", num_hidden_layers=3)
    ids, mask = prompts(1, length=20)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=48, host_pages=HOST_PAGES), attn_implementation="sdpa", page_weights=True)
    state = paging_state(model)
    pager = state.pager
    owner = {allocation.id: index for index, allocations in enumerate(state.weight_allocations) for allocation in allocations}
    events: list[tuple[str, int]] = []
    original = pager.prefetch_together

    def spy(allocations):
        assert allocations and all(any(page.device_slot is None for page in allocation.pages) for allocation in allocations)
        events.extend(("prefetch", owner[allocation.id]) for allocation in allocations)
        return original(allocations)

    monkeypatch.setattr(pager, "prefetch_together", spy)
    for index, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda module, args, index=index: events.append(("run", index)))
    got = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(got, expected)
    prefetched = [layer for kind, layer in events if kind == "prefetch"]
    assert prefetched, events
    pending: list[int] = []
    runs = 0
    for kind, layer in events:  # hooks registered later run later: layer i's prefetches come just before ("run", i)
        if kind == "prefetch":
            pending.append(layer)
        else:
            runs += 1
            assert all(target == (layer + 1) % 3 for target in pending), (layer, pending, events)
            pending = []
    assert runs == 3 * 3 and not pending  # 3 forwards (prefill + 2 decode steps) x 3 layers
    assert pager.stats()["prefetched_pages"] > 0


def test_the_prefetch_follows_weights_replaced_by_a_dtype_change(nvme_dir, monkeypatch):
    """``model.to(dtype)`` gives every paged weight a new allocation (the old ones are freed), advised
    ``"loop"`` as the old ones were: the layer-ahead hooks look the weights up again and keep
    prefetching the live ones."""
    reference, model = tiny_pair("llama", attn="sdpa")
    ids, mask = prompts(1, length=20)
    # 48 pages: a layer (36) and the first weights of the next, which the hook prefetches beside it
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=48, host_pages=HOST_PAGES), attn_implementation="sdpa", page_weights=True)
    state = paging_state(model)
    before = {allocation.id for allocations in state.weight_allocations for allocation in allocations}
    model.to(torch.float64).to(torch.float32)
    live = {allocation.id for allocations in state.weight_allocations for allocation in allocations}
    assert live and not live & before and len(state.weight_allocations) == len(model.model.layers)
    assert all(allocation.loop for allocations in state.weight_allocations for allocation in allocations)  # still advised
    prefetched: list = []
    original = state.pager.prefetch_together
    monkeypatch.setattr(state.pager, "prefetch_together", lambda allocations: prefetched.extend(allocations) or original(allocations))
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False), expected)
    assert prefetched and all(not allocation.freed and allocation.id in live for allocation in prefetched)


def test_a_deep_copy_or_a_saved_copy_of_a_paged_layer_runs_its_own_weights(nvme_dir):
    """``copy.deepcopy`` of a decoder layer (or of one of its linears) of a weight-paged model: the copy
    computes with its own weights, as a copy of the unpaged layer does, also once the model is gone
    (enable_paging's per-module forwards ran the original's weights, and failed once it was
    dropped). ``torch.save`` of a layer loads into a layer of the same outputs (it failed on the
    prefetch hook)."""
    import gc
    import io

    reference, model = tiny_pair("llama", attn="sdpa")
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=VRAM_PAGES, host_pages=HOST_PAGES), attn_implementation="sdpa",
                  page_weights=True)  # fmt: skip
    hidden = torch.randn(2, 5, reference.config.hidden_size, generator=torch.Generator().manual_seed(4))
    positions = torch.arange(5)[None].expand(2, 5)
    rotary = reference.model.rotary_emb(hidden, positions)

    def run(layer):
        with torch.no_grad():
            out = layer(hidden, position_embeddings=rotary, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out

    plain_copy, paged_copy = copy.deepcopy(reference.model.layers[0]), copy.deepcopy(model.model.layers[0])
    linear_copy = copy.deepcopy(model.model.layers[1].mlp.down_proj)
    with torch.no_grad():
        for layer in (plain_copy, paged_copy):
            layer.mlp.down_proj.weight.mul_(2)
        linear_copy.weight.zero_()
    torch.testing.assert_close(run(paged_copy), run(plain_copy), rtol=0, atol=1e-6)
    torch.testing.assert_close(run(model.model.layers[0]), run(reference.model.layers[0]), rtol=0, atol=1e-6)  # the original's own
    x = torch.randn(3, reference.config.intermediate_size)
    assert torch.equal(linear_copy(x), torch.zeros(3, reference.config.hidden_size))
    saved = io.BytesIO()
    torch.save(model.model.layers[1], saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    torch.testing.assert_close(run(loaded), run(reference.model.layers[1]), rtol=0, atol=1e-6)
    del model
    gc.collect()
    torch.testing.assert_close(run(paged_copy), run(plain_copy), rtol=0, atol=1e-6)
    assert torch.equal(linear_copy(x), torch.zeros(3, reference.config.hidden_size))


def test_page_weights_off_keeps_dense_parameters(nvme_dir):
    _, model = tiny_pair("llama")
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation="sdpa")
    assert not any(isinstance(p, PagedTensor) for p in model.parameters())
    assert paging_state(model).weight_allocations == []


def test_paged_weights_with_pagedllm_attention(nvme_dir):
    """The Triton kernels (interpreted on the CPU) read the KV pages; the weights are paged beside them."""
    reference, model = tiny_pair("llama", attn="sdpa")
    ids, mask = prompts(1, length=24)
    expected = _generate(reference, ids, mask)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=VRAM_PAGES, host_pages=HOST_PAGES), attn_implementation="pagedllm",
                  prefill_chunk_size=16, page_weights=True)
    got = _generate(model, ids, mask)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert paging_state(model).pager.stats()["bytes_from_disk"] > 0



def test_gpt_neo_whose_attention_names_its_layer_layer_id_pages_its_weights(nvme_dir):
    """GPT-Neo's attention names its layer ``layer_id``, not ``layer_idx``: page_weights=True refused it
    ("found no decoder layers"). Its layers' weights are paged now, with the unpaged tokens."""
    import transformers

    config = transformers.GPTNeoConfig(num_layers=2, hidden_size=64, num_heads=4, vocab_size=128, max_position_embeddings=256,
                                       attention_types=[[["global", "local"], 1]], window_size=8, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    reference = transformers.GPTNeoForCausalLM(config).eval()
    model = transformers.GPTNeoForCausalLM(copy.deepcopy(config)).eval()
    model.load_state_dict(reference.state_dict())
    ids, mask = prompts(3, length=20)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=24, host_pages=16), page_weights=True)
    assert sum(isinstance(p, PagedTensor) for p in model.transformer.h.parameters()) == 12  # norms stay dense
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), expected)


def test_phi3_fused_weights_at_the_edge_of_the_budget(nvme_dir):
    """Phi-3's fused gate_up_proj (16 pages) takes the whole device tier: every other page leaves."""
    reference, model = tiny_pair("phi3", attn="sdpa")
    ids, mask = prompts(3)
    expected = _generate(reference, ids, mask)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=16, host_pages=8), attn_implementation="sdpa", page_weights=True)
    got = _generate(model, ids, mask)
    assert torch.equal(got.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
        assert torch.equal(a, b), f"logits differ at step {step}: {(a - b).abs().max()}"


def test_page_weights_must_be_a_bool(nvme_dir):
    _, model = tiny_pair("llama")
    with pytest.raises(TypeError, match="page_weights: expected True or False, got 'yes'"):
        enable_paging(model, tiny_budget(nvme_dir), attn_implementation="sdpa", page_weights="yes")


def test_page_weights_names_a_parameter_it_cannot_page_before_replacing_any(nvme_dir):
    """A tensor subclass among the layer weights (a DTensor of tp_plan='auto', say) is named before
    any weight becomes paged."""
    from torch.testing._internal.two_tensor import TwoTensor

    _, model = tiny_pair("llama")
    weight = model.model.layers[1].mlp.up_proj.weight.detach()
    model.model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(TwoTensor(weight, weight.clone()), requires_grad=False)
    with pytest.raises(TypeError, match=r"layers\.1\.mlp\.up_proj\.weight is a TwoTensor"):
        enable_paging(model, tiny_budget(nvme_dir), attn_implementation="sdpa", page_weights=True)
    assert not any(isinstance(p, PagedTensor) for p in model.model.layers[0].parameters())


@pytest.mark.parametrize("advice", ["loop", "normal"])
def test_weights_that_do_not_fit_keep_the_same_layers_resident(advice, nvme_dir):
    """Eight layers under a device budget of about 60% of their weights. Advised ``"loop"`` (what
    ``page_weights=True`` does), the weights used last leave first, so the same layers stay on the
    device token after token and each token moves well under the whole weights (at most 75% of
    them, where 40% cannot fit); under recency, every layer is evicted just before its next use
    and each token moves them all again. The tokens are the unpaged ones either way."""
    reference, model = tiny_pair("llama", attn="sdpa", num_hidden_layers=8)
    ids, mask = prompts(1, length=16)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    weights = _layer_bytes(model, at_least=PAGE)  # the paged ones (the norms stay dense)
    budget = tiny_budget(nvme_dir, vram_pages=int(0.6 * weights) // PAGE, host_pages=2 * weights // PAGE)
    enable_paging(model, budget, attn_implementation="sdpa", page_weights=True)
    pager = paging_state(model).pager
    paged = [parameter for parameter in model.model.layers.parameters() if isinstance(parameter, PagedTensor)]
    assert sum(parameter.allocation.nbytes for parameter in paged) == weights
    for parameter in paged:
        assert parameter.allocation.loop
        pager.advise(parameter.allocation, advice)

    model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)  # the first pass fills the device
    before = pager.stats()["bytes_h2d"]
    got = model.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    moved_per_token = (pager.stats()["bytes_h2d"] - before) / 10

    assert torch.equal(got, expected)
    if advice == "loop":
        assert moved_per_token <= 0.75 * weights, (moved_per_token, weights)
    else:
        assert moved_per_token >= 0.95 * weights, (moved_per_token, weights)


def test_weights_get_their_host_copies_when_paged_so_no_decode_step_writes_one_back(nvme_dir, monkeypatch):
    """A weight never changes: ``page_weights=True`` gives the pages still on the device after the
    load their host copies at once (``Pager.write_back``), so evicting a weight while generating
    copies nothing back and takes no host slot (the host tier grew while loading, not in the middle
    of a decode step). Before, the weights left on the device by the load were written back one by
    one as later steps evicted them."""
    reference, model = tiny_pair("llama", attn="sdpa", num_hidden_layers=8)
    ids, mask = prompts(1, length=16)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    weights = _layer_bytes(model, at_least=PAGE)
    budget = tiny_budget(nvme_dir, vram_pages=int(0.6 * weights) // PAGE, host_pages=2 * weights // PAGE)
    enable_paging(model, budget, attn_implementation="sdpa", page_weights=True)
    pager = paging_state(model).pager
    paged = [parameter for parameter in model.model.layers.parameters() if isinstance(parameter, PagedTensor)]
    assert any(info.tier == "device" for parameter in paged for info in pager.page_table(parameter.allocation))
    device_only = [info for parameter in paged for info in pager.page_table(parameter.allocation) if info.tier == "device" and info.dirty]
    assert not device_only, device_only

    weight_ids = {parameter.allocation.id for parameter in paged}
    written_back: list[int] = []
    copy_device_to_host = pager._copy_device_to_host

    def recorded(pages, keep):
        written_back.extend(page.allocation_id for page in pages)
        return copy_device_to_host(pages, keep)

    monkeypatch.setattr(pager, "_copy_device_to_host", recorded)
    evictions = pager.stats()["evictions"]
    got = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)
    assert pager.stats()["evictions"] > evictions  # weights did leave the device
    assert not weight_ids.intersection(written_back)


def test_weights_written_back_leave_a_small_disk_tier_room_to_generate(nvme_dir):
    """Weights that fit device and host (0.6x each) with a disk tier of 0.4x: writing each weight
    back as it is paged fills the host tier with clean copies of weights still on the device (and
    spills older host-only weights to the disk). A fault from the then nearly full disk drops such a
    copy for its host slot instead of failing to spill a host-only page ('disk tier full', where
    c757c12, which wrote no weight back, generated the unpaged tokens)."""
    import dataclasses

    reference, model = tiny_pair("llama", attn="sdpa", num_hidden_layers=3)
    ids, mask = prompts(1, length=8)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    weights = _layer_bytes(model, at_least=PAGE)
    budget = dataclasses.replace(tiny_budget(nvme_dir, vram_pages=int(0.6 * weights) // PAGE, host_pages=int(0.6 * weights) // PAGE),
                                 disk_limit=int(0.4 * weights) // PAGE * PAGE)  # fmt: skip
    enable_paging(model, budget, attn_implementation="sdpa", page_weights=True)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert torch.equal(got, expected)


def _split_budget(nvme_dir: str, weights: int, device: float, host: float, disk: float):
    import dataclasses

    pages = weights // PAGE
    return dataclasses.replace(tiny_budget(nvme_dir, vram_pages=int(device * pages), host_pages=int(host * pages)),
                               disk_limit=int(disk * pages) * PAGE)  # fmt: skip


def test_weights_on_a_small_host_and_a_disk_load_with_one_copy_each_and_generate(nvme_dir):
    """A device tier of 0.3x the paged weights, a host tier of 0.1x and a disk tier of 0.8x: each
    page fits one tier. Loading crosses each weight page D2H at most once (write-backs no longer
    make room by dropping the host copies of weights still on the device, which the evictions
    then copied again: 184 copies for 108 pages), and generate returns the unpaged tokens (it
    failed with 'disk tier full': staging a disk page needed a host slot no page could give up)."""
    reference, model = tiny_pair("llama", attn="sdpa", num_hidden_layers=3)
    ids, mask = prompts(1, length=16)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    weights = _layer_bytes(model, at_least=PAGE)
    enable_paging(model, _split_budget(nvme_dir, weights, 0.3, 0.1, 0.8), attn_implementation="sdpa", page_weights=True)
    pager = paging_state(model).pager
    assert pager.stats()["bytes_d2h"] <= weights, (pager.stats()["bytes_d2h"], weights)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)


def test_tiers_too_small_for_the_weights_are_named_when_paging_is_enabled(nvme_dir):
    """Tiers that cannot hold the paged weights and one more copy of the largest (a weight being
    faulted in keeps its lower copy until its slots are filled) fail at ``enable_paging``, naming
    the sizes, rather than with 'disk tier full' in the middle of a generate; the model keeps its
    dense weights."""
    _, model = tiny_pair("llama", attn="sdpa", num_hidden_layers=3)
    weights = _layer_bytes(model, at_least=PAGE)
    dense = [parameter for parameter in model.model.layers.parameters()]
    message = (r"page_weights=True: the paged weights take 108 pages of 4.00 KiB .*, and a fault needs room for one more copy "
               r"of the largest weight \(8 pages\).*disk_limit=221184 bytes hold 96 pages.*raise one of them by 80.00 KiB")
    with pytest.raises(OutOfPagesError, match=message):
        enable_paging(model, _split_budget(nvme_dir, weights, 0.3, 0.1, 0.5), attn_implementation="sdpa", page_weights=True)
    assert all(now is before for now, before in zip(model.model.layers.parameters(), dense, strict=True))


def test_a_device_tier_smaller_than_a_weight_is_named_when_paging_is_enabled(nvme_dir):
    """A device tier smaller than one weight (an op faults in a weight's pages at once) fails at
    ``enable_paging``, naming the weight and ``vram_limit``, rather than at the first forward (it
    was accepted, and every generate then raised); the model keeps its dense weights. One page more
    is accepted."""
    _, model = tiny_pair("llama", attn="sdpa")
    largest = max(p.numel() * p.element_size() for p in model.model.layers.parameters()) // PAGE  # gate_proj: 8 pages
    dense = list(model.model.layers.parameters())
    message = (rf"page_weights=True: an op reads layers\.0\.mlp\.gate_proj\.weight's {largest} pages of 4\.00 KiB \(32\.00 KiB\) "
               rf"at once, but vram_limit={(largest - 1) * PAGE} bytes hold {largest - 1} pages; raise vram_limit above 32\.00 KiB")
    with pytest.raises(DeviceTierFullError, match=message):
        enable_paging(model, tiny_budget(nvme_dir, vram_pages=largest - 1, host_pages=HOST_PAGES), attn_implementation="sdpa", page_weights=True)
    assert all(now is before for now, before in zip(model.model.layers.parameters(), dense, strict=True))
    _, model = tiny_pair("llama", attn="sdpa")
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=largest, host_pages=HOST_PAGES), attn_implementation="sdpa", page_weights=True)
    assert isinstance(model.model.layers[0].mlp.gate_proj.weight, PagedTensor)


def _linear_reading_weight_and_bias(family: str):
    """``(reference, copy)`` whose layers hold a linear with a 64-page weight and a 1-page paged bias,
    read by one ``addmm``: Llama's ``gate_proj`` (``mlp_bias``), GPT-2's ``c_fc`` (a ``Conv1D``)."""
    import transformers

    from tests.hf.test_model_support import _pair

    if family == "llama":
        return tiny_pair("llama", attn="sdpa", intermediate_size=1024, mlp_bias=True), "layers.0.mlp.gate_proj"
    fields = dict(n_layer=2, n_embd=64, n_head=4, n_inner=1024, n_positions=256, vocab_size=128, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)  # fmt: skip
    return _pair(transformers.GPT2Config, transformers.GPT2LMHeadModel, "sdpa", **fields), "layers.0.mlp.c_fc"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_linear_reading_its_paged_weight_and_bias_at_once_is_counted_when_paging_is_enabled(nvme_dir, family):
    """A linear whose weight (64 pages) and bias (1 page) are both paged: its op (``addmm``, through
    ``F.linear`` or GPT-2's ``Conv1D``) reads the 65 pages at once. The check counted each parameter
    alone: a 64-page device tier was accepted, and every forward then raised DeviceTierFullError. It
    is refused at ``enable_paging``, naming the linear and the 65 pages, with the dense weights kept;
    65 pages run the unpaged logits."""
    (reference, model), linear = _linear_reading_weight_and_bias(family)
    ids, _ = prompts(1, length=16)
    with torch.no_grad():
        expected = reference(ids, use_cache=False).logits
    dense = list(model.parameters())
    message = (rf"page_weights=True: an op reads {re.escape(linear)}\.weight and \.bias's 65 pages of 4\.00 KiB \(260\.00 KiB\) "
               rf"at once, but vram_limit={64 * PAGE} bytes hold 64 pages; raise vram_limit above 260\.00 KiB")
    with pytest.raises(DeviceTierFullError, match=message):
        enable_paging(model, tiny_budget(nvme_dir, vram_pages=64, host_pages=512), attn_implementation="sdpa", page_weights=True)
    assert paging_state(model) is None and all(now is before for now, before in zip(model.parameters(), dense, strict=True))
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=65, host_pages=512), attn_implementation="sdpa", page_weights=True)
    assert isinstance(model.get_submodule(linear.replace("layers", "model.layers" if family == "llama" else "transformer.h")).bias, PagedTensor)
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, expected)


def test_threads_generating_at_once_under_a_budget_of_two_weights_wait_for_each_others_pins(nvme_dir):
    """Three threads generate with one paged model at once, under a device tier of twice the largest
    weight: an op whose weight finds the tier full of another thread's pins waits for them (it
    raised DeviceTierFullError), so every generate returns the unpaged tokens."""
    reference, model = tiny_pair("llama", attn="sdpa")
    largest = max(p.numel() * p.element_size() for p in model.model.layers.parameters()) // PAGE
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=2 * largest, host_pages=256), attn_implementation="sdpa", page_weights=True)
    ids, mask = prompts(2)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    barrier = threading.Barrier(3)

    def generate(_: int) -> None:
        barrier.wait(timeout=60)
        for _ in range(3):
            assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), expected)

    assert run_in_threads(generate, 3) == []


def test_each_weight_stays_one_view_of_adjacent_slots(nvme_dir, monkeypatch):
    """Eight layers under a one-slab device budget of 60% of their weights, decoding token after
    token: the layer-ahead prefetch brings a layer's weights as one batch into adjacent slots and a
    loop weight leaves whole, so nearly every op reads its weight as one view of the slab, with no
    gather into a temporary (before, about 70% of the ops gathered their weight from scattered
    slots, and each fault-in of a page was a copy of its own)."""
    import dataclasses

    import pagedtensor.dispatch as dispatch

    reference, model = tiny_pair("llama", attn="sdpa", num_hidden_layers=8)
    ids, mask = prompts(1, length=16)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    weights = _layer_bytes(model, at_least=PAGE)
    budget = tiny_budget(nvme_dir, vram_pages=int(0.6 * weights) // PAGE, host_pages=2 * weights // PAGE)
    enable_paging(model, dataclasses.replace(budget, slab_size=budget.vram_limit), attn_implementation="sdpa", page_weights=True)
    model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)  # the first pass fills the device
    windows = []
    real_init = dispatch._Window.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        windows.append(self.gathered)

    monkeypatch.setattr(dispatch._Window, "__init__", spy)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert torch.equal(got, expected)
    assert len(windows) >= 10 * 8 * 7 and sum(windows) <= len(windows) // 10, (sum(windows), len(windows))


def test_linear_layers_read_paged_weights_without_dispatch_and_gradients_stay_exact(nvme_dir, monkeypatch):
    """Each ``nn.Linear`` of a paged layer runs ``paged_linear``: with no grad to record, its weight
    is read from its pinned pages with no op reaching the dispatcher; with an input that requires
    grad, the general path, and the gradients are the unpaged model's, bit for bit, although the
    weights' slots are reused between forward and backward."""
    import pagedtensor.dispatch as dispatch

    reference, model = tiny_pair("llama", attn="sdpa")
    ids, mask = prompts(3)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=VRAM_PAGES, host_pages=HOST_PAGES), attn_implementation="sdpa",
                  page_weights=True)  # fmt: skip
    linears = [module for layer in model.model.layers for module in layer.modules() if type(module) is torch.nn.Linear]
    assert len(linears) == 7 * len(model.model.layers) and all("forward" in module.__dict__ for module in linears)

    dispatched = []
    real = dispatch.DISPATCHER.dispatch
    monkeypatch.setattr(dispatch.DISPATCHER, "dispatch", lambda func, *rest: dispatched.append(func) or real(func, *rest))
    with torch.no_grad():
        got = model(ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(got, reference(ids, attention_mask=mask, use_cache=False).logits)
    assert dispatched == []

    embeds = reference.model.embed_tokens(ids).detach()
    expected_input = embeds.clone().requires_grad_()
    reference(inputs_embeds=expected_input, attention_mask=mask, use_cache=False).logits.float().square().mean().backward()
    paged_input = embeds.clone().requires_grad_()
    model(inputs_embeds=paged_input, attention_mask=mask, use_cache=False).logits.float().square().mean().backward()
    assert torch.equal(paged_input.grad, expected_input.grad)
    assert dispatch.aten.mm.default in dispatched or dispatch.aten.addmm.default in dispatched


def test_keys_and_values_that_fit_stay_resident_beside_paged_weights(nvme_dir, monkeypatch):
    """Weights that do not fit, keys and values that do: the pager's policy makes room (the cache
    shares the pager with the weights' loop, ``makes_room=False``), so decoding moves weight pages
    only. (When the cache made room itself, it evicted the layer just computed's keys and values to
    keep a streaming window free, and streamed them back at that layer's next token.)"""
    import dataclasses

    from pagedtensor.pager import Pager

    reference, model = tiny_pair("llama", attn="sdpa", num_hidden_layers=8)
    ids, mask = prompts(1, length=80)  # 16 tokens a page: 6 pages a layer, 4 of them not pinned as sink or newest
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    weights = _layer_bytes(model, at_least=PAGE)
    budget = tiny_budget(nvme_dir, vram_pages=int(0.6 * weights) // PAGE, host_pages=2 * weights // PAGE)
    enable_paging(model, dataclasses.replace(budget, slab_size=budget.vram_limit), attn_implementation="sdpa", page_weights=True,
                  stream_group_bytes=2 * PAGE)  # fmt: skip
    kv_ids = set()
    copied = {"kv": 0, "weights": 0}
    real_copy = Pager._copy_host_to_device

    def tally(self, pages):
        for page in pages:
            copied["kv" if page.allocation_id in kv_ids else "weights"] += 1
        return real_copy(self, pages)

    monkeypatch.setattr(Pager, "_copy_host_to_device", tally)
    real_allocate = Pager.allocate

    def note_kv(self, nbytes, *, name=None):
        allocation = real_allocate(self, nbytes, name=name)
        if name is not None and name.startswith("kv."):
            kv_ids.add(allocation.id)
        return allocation

    monkeypatch.setattr(Pager, "allocate", note_kv)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert torch.equal(got, expected)
    assert kv_ids and copied["weights"] > 0 and copied["kv"] == 0, copied


def test_makes_room_must_be_a_bool():
    from pagedtensor.hf import PagedKVCache

    with pytest.raises(TypeError, match="makes_room"):
        PagedKVCache(num_layers=2, makes_room=1)


def _tiny_mixtral(experts_implementation: str):
    from transformers import MixtralConfig, MixtralForCausalLM

    from tests.hf.tiny_models import TINY

    config = MixtralConfig(**{**TINY, "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    reference = MixtralForCausalLM(config).eval()
    model = MixtralForCausalLM(copy.deepcopy(config)).eval()
    model.load_state_dict(reference.state_dict())
    for each in (reference, model):
        each.set_experts_implementation(experts_implementation)
    return reference, model


@pytest.mark.parametrize("experts_implementation", ["grouped_mm", "batched_mm", "eager"])
def test_experts_fault_in_only_where_tokens_are_routed(experts_implementation, nvme_dir, monkeypatch):
    """A tiny Mixtral (8 experts, top 2) whose experts take 1.5 MiB under a 192 KiB device tier:
    one layer's stack of experts does not fit, yet generation is exact, every implementation of
    transformers' experts reads only the routed experts, and the stacks are neither prefetched nor
    advised "loop" (the other weights are)."""
    reference, model = _tiny_mixtral(experts_implementation)
    ids, mask = prompts(1)
    expected = _generate(reference, ids, mask)
    stack_bytes = [p.numel() * p.element_size() for name, p in model.named_parameters() if ".experts." in name]
    budget = tiny_budget(nvme_dir, vram_pages=48, host_pages=HOST_PAGES)
    assert budget.vram_limit < min(stack_bytes) and len(stack_bytes) == 4  # gate_up and down, two layers
    enable_paging(model, budget, attn_implementation="sdpa", prefill_chunk_size=16, page_weights=True)
    state = paging_state(model)
    stacks = [getattr(layer.mlp.experts, name) for layer in model.model.layers for name in ("gate_up_proj", "down_proj")]
    assert all(isinstance(stack, PagedTensor) and not stack.allocation.loop for stack in stacks)
    others = [p for name, p in model.named_parameters() if isinstance(p, PagedTensor) and ".experts." not in name]
    assert others and all(p.allocation.loop for p in others)
    prefetched: list = []
    original = state.pager.prefetch_together
    monkeypatch.setattr(state.pager, "prefetch_together", lambda allocations: prefetched.extend(allocations) or original(allocations))

    got = _generate(model, ids, mask)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        assert torch.equal(a, b)
    assert prefetched and not {id(stack.allocation) for stack in stacks} & {id(allocation) for allocation in prefetched}
    # Faulting every expert of a layer at each of the 3 prefill chunks and 5 decode steps would move
    # 8 x 1.5 MiB (nothing of them fits between a layer's forwards); a decode step at batch 1 reads
    # 2 experts of 8 in each layer, and attention weights and keys and values move too.
    before = state.pager.stats()["bytes_h2d"]
    _generate(model, ids, mask)
    assert state.pager.stats()["bytes_h2d"] - before < 4 * sum(stack_bytes)  # 4.7 MB of 1.5 MiB stacks here


def test_an_expert_matrix_starting_mid_page_is_counted_when_paging_is_enabled(nvme_dir):
    """Experts of 30 intermediate features: a gate_up matrix is 15 KiB, 3.75 pages, so expert 1 spans
    pages 3 to 7, five pages. The check counted an expert by its bytes (four pages): a four-page
    device tier was accepted, and the eager experts' generate then raised DeviceTierFullError at
    its first read of such an expert. It is now refused at ``enable_paging``, and five pages generate
    the unpaged tokens."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from tests.hf.tiny_models import TINY

    config = MixtralConfig(**{**TINY, "intermediate_size": 30, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    reference = MixtralForCausalLM(config).eval()
    reference.set_experts_implementation("eager")
    ids, mask = prompts(1)
    expected = _generate(reference, ids, mask)
    for vram_pages in (4, 5):
        model = copy.deepcopy(reference)
        budget = tiny_budget(nvme_dir, vram_pages=vram_pages, host_pages=HOST_PAGES)
        if vram_pages == 4:
            with pytest.raises(DeviceTierFullError, match=r"layers\.0\.mlp\.experts\.gate_up_proj's 5 pages of 4\.00 KiB .* hold 4 pages"):
                enable_paging(model, budget, attn_implementation="sdpa", page_weights=True)
            continue
        enable_paging(model, budget, attn_implementation="sdpa", page_weights=True)
        got = _generate(model, ids, mask)
        assert torch.equal(got.sequences, expected.sequences)
        assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits, strict=True))


def test_a_dtype_change_converts_expert_stacks_larger_than_the_device_tier(nvme_dir):
    """``model.to(torch.bfloat16)`` after paging: each 512 KiB stack converts a piece at a time
    through a 192 KiB device tier (it raised OutOfPagesError and left the model half converted)."""
    reference, model = _tiny_mixtral("grouped_mm")
    ids, mask = prompts(1)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=48, host_pages=64), attn_implementation="sdpa",
                  prefill_chunk_size=16, page_weights=True)
    model.to(torch.bfloat16)
    reference.to(torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    stacks = [layer.mlp.experts.gate_up_proj for layer in model.model.layers]
    assert all(isinstance(stack, PagedTensor) and not stack.allocation.loop for stack in stacks)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False), expected)


_LEGACY = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
OTHER_ATTENTION_NAMES = {  # name: (config, model, fields, the attention it is tested with, the path of its decoder layers)
    # attn, and Conv1D linears (weights stored transposed)
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_embd=64, n_head=4, n_positions=256, **_LEGACY), "sdpa", "transformer.h"),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=256, **_LEGACY), "sdpa",
             "transformer.h"),  # fmt: skip
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=256, n_ctx=256, **_LEGACY),
                "eager", "transformer.h"),  # fmt: skip
    "mpt": ("MptConfig", "MptForCausalLM", dict(n_layers=2, d_model=64, n_heads=4, max_seq_len=256, **_LEGACY), "eager", "transformer.blocks"),
    # self_attention
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, new_decoder_architecture=True,
                                                         num_kv_heads=2, **_LEGACY), "sdpa", "transformer.h"),  # fmt: skip
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(n_layer=2, hidden_size=64, n_head=4, **_LEGACY), "eager", "transformer.h"),
    # attention
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                                                             max_position_embeddings=256, **_LEGACY), "sdpa", "gpt_neox.layers"),  # fmt: skip
}


@pytest.mark.parametrize("family", sorted(OTHER_ATTENTION_NAMES))
def test_paged_weights_of_layers_whose_attention_is_not_named_self_attn(family, nvme_dir, monkeypatch):
    """Layers naming their attention ``attn``, ``self_attention`` or ``attention`` were refused ("found
    no decoder layers"). Now every weight of a page or more in them is paged, the layer-ahead
    prefetch runs, each linear (GPT-2's ``Conv1D`` too) reads its weight from its pinned pages with
    no op reaching the dispatcher, and generation under a budget below the weights is exact."""
    import transformers

    import pagedtensor.dispatch as dispatch

    config_name, model_name, fields, attn, path = OTHER_ATTENTION_NAMES[family]
    config = getattr(transformers, config_name)(**fields)
    config._attn_implementation = attn
    torch.manual_seed(0)
    reference = getattr(transformers, model_name)(config).eval()
    model = copy.deepcopy(reference)
    layers = model.get_submodule(path)
    ids, mask = prompts(3, length=20)
    expected = _generate(reference, ids, mask)
    budget = tiny_budget(nvme_dir, vram_pages=VRAM_PAGES, host_pages=HOST_PAGES)
    paged_bytes = sum(p.numel() * p.element_size() for p in layers.parameters() if p.numel() * p.element_size() >= PAGE)
    assert budget.vram_limit < paged_bytes // 2  # the weights alone overflow the device tier
    enable_paging(model, budget, attn_implementation=attn, prefill_chunk_size=8, page_weights=True)
    state = paging_state(model)
    pager = state.pager
    assert state.paged_layers == list(layers)
    for name, parameter in layers.named_parameters():
        assert isinstance(parameter, PagedTensor) == (parameter.numel() * parameter.element_size() >= PAGE), name
    linear_types = (torch.nn.Linear, transformers.pytorch_utils.Conv1D, transformers.models.falcon.modeling_falcon.FalconLinear)
    matmuls = [module for module in layers.modules() if type(module) in linear_types]
    assert matmuls and all("forward" in module.__dict__ for module in matmuls)  # paged_linear / paged_conv1d

    dispatched = []
    real = dispatch.DISPATCHER.dispatch
    monkeypatch.setattr(dispatch.DISPATCHER, "dispatch", lambda func, *rest: dispatched.append(func) or real(func, *rest))
    got = _generate(model, ids, mask)
    assert dispatched == []
    assert torch.equal(got.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(got.logits, expected.logits)):
        assert torch.equal(a, b), f"logits differ at step {step}: {(a - b).abs().max()}"
    stats = pager.stats()
    # Less than one layer fits: nothing of the next is prefetched beside the one about to run.
    assert stats["faults"] > 0 and stats["prefetched_pages"] == 0, stats
    assert stats["bytes_h2d"] > NEW_TOKENS * paged_bytes // 2, stats  # the weights come back to the device token after token


def test_a_model_whose_decoder_layers_are_not_found_is_refused_naming_what_is_missing(nvme_dir):
    """Decoder layers are the blocks of an ``nn.ModuleList`` of ``config.num_hidden_layers`` blocks with
    an attention's ``layer_idx``: where there is none, the error names the model and what it lacks,
    and the model keeps its dense weights."""
    _, model = tiny_pair("llama")
    model.config.num_hidden_layers = 3  # as if its two layers were not all of them
    with pytest.raises(ValueError, match=r"no decoder layers in LlamaForCausalLM: no nn.ModuleList of config.num_hidden_layers=3 blocks"):
        enable_paging(model, tiny_budget(nvme_dir), page_weights=True)
    assert paging_state(model) is None
    assert all(type(parameter) is torch.nn.Parameter for parameter in model.parameters())


def test_a_model_on_another_device_than_the_pager_is_named_unless_its_weights_are_paged(nvme_dir):
    """Paging only the KV cache needs the model on the pager's device; the error says so and names
    page_weights=True, which pages the layers' weights from where they lie. A model whose weights
    hold no data (meta) cannot be paged from there: wrap's error, and the model as it was."""
    with torch.device("meta"):
        _, model = tiny_pair("llama")
    with pytest.raises(ValueError, match=r"the model is on meta but the pager's device tier is cpu: .* page_weights=True"):
        enable_paging(model, tiny_budget(nvme_dir, vram_pages=64), attn_implementation="sdpa")
    with pytest.raises(ValueError, match="a meta tensor has no data to page"):
        enable_paging(model, tiny_budget(nvme_dir, vram_pages=64), attn_implementation="sdpa", page_weights=True)
    assert paging_state(model) is None
    assert all(type(p) is torch.nn.Parameter and p.device.type == "meta" for p in model.parameters())


class RefusesToMove(torch.Tensor):
    """A tensor whose ``to`` raises: a move that fails on any device (as the device's memory may)."""

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "RefusesToMove":
        return torch.Tensor._make_subclass(cls, tensor)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206 - torch's protocol
        if func is torch.Tensor.to:
            raise RuntimeError("this buffer refuses to move")
        return super().__torch_function__(func, types, args, kwargs or {})


def move_dense_tensors_after_a_failed_move(model, pager, device: torch.device) -> dict:
    """``_move_dense_tensors`` of ``model`` (tied embeddings, on the CPU) to ``device``, one layer
    weight paged on ``pager`` and the final norm holding a gradient: first past a buffer that
    refuses to move, which must leave every tensor as it was, then without it. Returns the dense
    parameters and buffers as they were before, by name; checks what holds on any device."""
    from pagedtensor.hf.model import _move_dense_tensors

    assert model.lm_head.weight is model.model.embed_tokens.weight
    up = model.model.layers[0].mlp.up_proj
    up.weight = torch.nn.Parameter(PagedTensor.wrap(up.weight.detach(), pager), requires_grad=False)
    norm = model.model.norm.weight
    norm.grad = torch.ones_like(norm)
    before = {name: tensor for name, tensor in [*model.named_parameters(), *model.named_buffers()] if not isinstance(tensor, PagedTensor)}
    pointers = {name: tensor.data_ptr() for name, tensor in before.items()}
    model.lm_head.register_buffer("scale", RefusesToMove.of(torch.ones(2)))
    with pytest.raises(RuntimeError, match="refuses to move"):
        _move_dense_tensors(model, device, pager)
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(now[name] is tensor and tensor.device.type == "cpu" and tensor.data_ptr() == pointers[name] for name, tensor in before.items())
    assert norm.grad.device.type == "cpu" and type(model.lm_head.scale) is RefusesToMove
    del model.lm_head._buffers["scale"]
    _move_dense_tensors(model, device, pager)
    assert isinstance(up.weight, PagedTensor) and up.weight.device == pager.device
    assert all(p.device == device for p in model.parameters() if not isinstance(p, PagedTensor))
    assert all(b.device == device for b in model.buffers()) and model.model.norm.weight.grad.device == device
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert len(list(model.parameters())) == 1 + len([name for name in before if name in dict(model.named_parameters())])  # the tie is one parameter still
    return before


def test_what_stays_dense_moves_as_model_to_moves_it_and_goes_back_if_a_move_fails(nvme_dir):
    """``_move_dense_tensors`` (enable_paging's move of what stays dense once a CPU model's layer
    weights are paged): every parameter and buffer but the PagedTensors goes to the device, a tied
    parameter stays one parameter (the embedding and ``lm_head``), gradients move along; where one
    tensor cannot move, every one moved before goes back. Here to the meta device, the one other
    device a CPU machine has, where parameters are replaced (between the CPU and a GPU they take
    the moved data in place: the GPU test)."""
    from pagedtensor import Pager

    _, model = tiny_pair("llama", tie_word_embeddings=True)
    with Pager(tiny_budget(nvme_dir, vram_pages=64)) as pager:
        move_dense_tensors_after_a_failed_move(model, pager, torch.device("meta"))


def test_llama4_experts_read_their_stacks_whole_so_they_are_checked_prefetched_and_looped_so(nvme_dir):
    """Llama 4's text experts take no routing: one ``bmm`` reads every expert of a stack at once (a
    routed experts' module, which takes the routing, reads one expert at a time). enable_paging
    names a stack the device tier cannot hold, where the generate failed at its first layer with
    DeviceTierFullError; with a tier that holds it, the stacks are prefetched with their layer and
    advised ``"loop"`` as the layer's other weights, and the tokens and logits are the unpaged ones."""
    import transformers

    from tests.hf.test_model_support import _pair

    fields = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                  intermediate_size_mlp=128, num_local_experts=4, num_experts_per_tok=1, vocab_size=128, no_rope_layers=[1, 1],
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    reference, model = _pair(transformers.Llama4TextConfig, transformers.Llama4ForCausalLM, "sdpa", **fields)
    stack_pages = 4 * 64 * 256 * 4 // PAGE  # gate_up_proj: 4 experts of 64 x 256 fp32
    with pytest.raises(DeviceTierFullError, match=rf"layers\.0\.feed_forward\.experts\.gate_up_proj's {stack_pages} pages"):
        enable_paging(model, tiny_budget(nvme_dir, vram_pages=24, host_pages=16), attn_implementation="sdpa", page_weights=True)
    assert paging_state(model) is None
    ids, mask = prompts(3, length=20)
    expected = _generate(reference, ids, mask)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=stack_pages + 32, host_pages=64), attn_implementation="sdpa", page_weights=True)
    got = _generate(model, ids, mask)
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits))
    from pagedtensor.hf.model import _weight_allocations

    experts = model.model.layers[1].feed_forward.experts
    stacks = {experts.gate_up_proj.allocation, experts.down_proj.allocation}
    assert stacks <= set(_weight_allocations(model.model.layers[1], paging_state(model).pager, routed_experts=False))  # prefetched
    assert all(allocation.loop for allocation in stacks)


def test_a_parameter_that_layers_share_is_paged_once_and_stays_shared(nvme_dir):
    """``model.to()`` keeps a parameter several modules hold shared; paging turned each holder's into a
    PagedTensor of its own: twice the pages, one more parameter, and after ``requires_grad_`` an
    optimizer step that differed from the unpaged model's."""
    reference, model = tiny_pair("llama", attn="sdpa")
    for each in (reference, model):
        each.model.layers[1].mlp.up_proj.weight = each.model.layers[0].mlp.up_proj.weight
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=40, host_pages=40), attn_implementation="sdpa", page_weights=True)
    shared = model.model.layers[0].mlp.up_proj.weight
    assert isinstance(shared, PagedTensor) and model.model.layers[1].mlp.up_proj.weight is shared
    assert len(list(model.parameters())) == len(list(reference.parameters()))
    assert sum(1 for each in paging_state(model).weight_allocations[1] if each is shared.allocation) == 1
    ids, _ = prompts(1, length=16)
    for each in (reference, model):
        each.requires_grad_(True)
        step = torch.optim.SGD(each.parameters(), lr=0.1)
        each(ids, labels=ids).loss.backward()
        step.step()
    expected, got = reference.state_dict(), model.state_dict()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize("through", ["lm_head", "layer"])
def test_a_parameter_a_layer_shares_with_a_module_outside_the_layers_stays_shared(nvme_dir, through):
    """``lm_head`` tied to a layer's weight (``model.to()`` keeps them one parameter): paging replaced
    the layer's holder only, and ``lm_head`` kept the dense tensor: one more parameter, the weight
    twice, and an in-place update through one no longer reached the other. ``lm_head`` now holds the
    same PagedTensor, and after an update through either holder the logits are the unpaged model's."""
    reference, model = tiny_pair("llama", attn="sdpa")
    for each in (reference, model):
        each.lm_head.weight = each.model.layers[0].mlp.up_proj.weight
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=40, host_pages=40), attn_implementation="sdpa", page_weights=True)
    shared = model.model.layers[0].mlp.up_proj.weight
    assert isinstance(shared, PagedTensor) and model.lm_head.weight is shared
    assert len(list(model.parameters())) == len(list(reference.parameters()))
    ids, _ = prompts(1, length=16)
    with torch.no_grad():
        for each in (reference, model):
            (each.lm_head if through == "lm_head" else each.model.layers[0].mlp.up_proj).weight.mul_(0.5)
        assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("evicted", [False, True])
def test_torch_func_grad_through_a_weight_paged_model(nvme_dir, evicted):
    """``torch.func.grad`` of a loss over one weight through ``functional_call`` of a weight-paged
    model: the unpaged model's gradient (the linears' weights faulted in inside the transform were
    refused as mutations of captured tensors, or left the pager's views wrapped, breaking every later
    op); afterwards generate gives the unpaged tokens."""
    import torch.func as tf

    reference, model = tiny_pair("llama", attn="eager")
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=VRAM_PAGES, host_pages=HOST_PAGES), attn_implementation="eager",
                  page_weights=True)  # fmt: skip
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(5))
    name = "model.layers.1.mlp.down_proj.weight"

    def loss(module, weight):
        return tf.functional_call(module, {name: weight}, (ids,), {"use_cache": False}).logits.pow(2).mean()

    expected = tf.grad(lambda w: loss(reference, w))(reference.get_parameter(name).detach())
    if evicted:
        paging_state(model).pager.evict_all()
    got = tf.grad(lambda w: loss(model, w))(model.get_parameter(name).detach())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
    assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), reference.generate(ids, max_new_tokens=3, do_sample=False))


def test_weights_paged_on_another_pager_move_to_the_models_pager(nvme_dir, tmp_path):
    """A checkpoint torch.saved from a paged model's state dict (``pytorch_model.bin``) loads its layer
    weights as PagedTensors of the default pager, and ``page_weights=True`` left them there: the model's
    pager held none of them, so its budgets did not govern them and ``close()`` freed none. They are
    copied onto the model's pager bit for bit (the other pager's pages go with the dropped tensors), and
    generate gives the unpaged tokens."""
    import os
    import shutil

    from pagedtensor import get_default_pager
    from pagedtensor.hf import PagedModel

    reference, _ = tiny_pair("llama")
    reference.save_pretrained(tmp_path / "dense")
    budget = tiny_budget(nvme_dir, vram_pages=VRAM_PAGES, host_pages=HOST_PAGES)
    first = PagedModel.from_pretrained(str(tmp_path / "dense"), budget, load_tokenizer=False, paging={"page_weights": True})
    (tmp_path / "paged").mkdir()
    shutil.copy(tmp_path / "dense" / "config.json", tmp_path / "paged")
    torch.save(first.state_dict(), os.path.join(tmp_path, "paged", "pytorch_model.bin"))
    first.close()
    default_allocations = get_default_pager().stats()["allocations"]
    second = PagedModel.from_pretrained(str(tmp_path / "paged"), budget, load_tokenizer=False,
                                        paging={"attn_implementation": "sdpa", "page_weights": True})  # fmt: skip
    weights = [p for p in second.parameters() if isinstance(p, PagedTensor)]
    assert weights and all(p.pager is second.pager for p in weights)
    assert second.pager.stats()["allocations"] == len(weights)
    assert get_default_pager().stats()["allocations"] == default_allocations
    for name, value in reference.state_dict().items():
        assert torch.equal(second.state_dict()[name], value), name
    ids, mask = prompts(1, length=20)
    assert torch.equal(_generate(second, ids, mask).sequences, _generate(reference, ids, mask).sequences)
    second.close()


def _assert_same_weights_and_tokens(model, reference) -> None:
    """``model``'s state dict holds ``reference``'s values, and its greedy tokens are ``reference``'s."""
    for name, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    ids, mask = prompts(1, length=20)
    assert torch.equal(_generate(model, ids, mask).sequences, _generate(reference, ids, mask).sequences)


def test_a_paged_embedding_of_another_pager_moves_to_the_models_pager(nvme_dir):
    """Outside the decoder layers, a PagedTensor of another pager (the embedding, tied to
    ``lm_head``, paged by hand) stayed on that pager with ``page_weights=True``: outside the model's
    budgets and its ``close()``. It is copied onto the model's pager once, stays paged and tied, and
    generate gives the unpaged tokens."""
    from pagedtensor.pager import Pager

    reference, model = tiny_pair("llama", attn="sdpa")
    for each in (reference, model):
        each.lm_head.weight = each.model.embed_tokens.weight
    other = Pager(tiny_budget(nvme_dir, vram_pages=64, host_pages=64))
    embedding = torch.nn.Parameter(PagedTensor.wrap(model.model.embed_tokens.weight.detach(), other))
    model.model.embed_tokens.weight = model.lm_head.weight = embedding
    del embedding
    assert other.stats()["allocations"] == 1
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=40, host_pages=40), attn_implementation="sdpa", page_weights=True)
    pager = paging_state(model).pager
    moved = model.model.embed_tokens.weight
    assert isinstance(moved, PagedTensor) and moved.pager is pager and model.lm_head.weight is moved
    assert moved.requires_grad
    assert all(p.pager is pager for p in model.parameters() if isinstance(p, PagedTensor))
    assert other.stats()["allocations"] == 0
    _assert_same_weights_and_tokens(model, reference)
    other.close()


def test_a_shared_weight_of_another_pager_moves_once_and_stays_shared(nvme_dir):
    """A parameter two layers hold, paged by hand on another pager: one copy on the model's pager,
    held by both layers; the other pager's allocation is freed once the model lets go of it."""
    from pagedtensor.pager import Pager

    reference, model = tiny_pair("llama", attn="sdpa")
    other = Pager(tiny_budget(nvme_dir, vram_pages=64, host_pages=64))
    for each in (reference, model):
        each.model.layers[1].mlp.up_proj.weight = each.model.layers[0].mlp.up_proj.weight
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight = torch.nn.Parameter(PagedTensor.wrap(layer.self_attn.q_proj.weight.detach(), other), requires_grad=False)
    model.model.layers[0].mlp.up_proj.weight = model.model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(
        PagedTensor.wrap(model.model.layers[0].mlp.up_proj.weight.detach(), other), requires_grad=False)  # fmt: skip
    assert other.stats()["allocations"] == 3
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=40, host_pages=40), attn_implementation="sdpa", page_weights=True)
    pager = paging_state(model).pager
    shared = model.model.layers[0].mlp.up_proj.weight
    assert isinstance(shared, PagedTensor) and shared.pager is pager and model.model.layers[1].mlp.up_proj.weight is shared
    assert all(p.pager is pager for p in model.parameters() if isinstance(p, PagedTensor))
    assert other.stats()["allocations"] == 0
    _assert_same_weights_and_tokens(model, reference)
    other.close()


@pytest.mark.parametrize("layers_held", [0.3, 1.4, 1.9, 2.5])
def test_the_layer_ahead_prefetch_reads_each_weight_at_most_once_a_token(layers_held):
    """Decoding with a device tier that holds a fraction of the layers' weights (no disk tier): each
    token moves each paged weight host to device at most once, and the tokens are the unpaged ones.
    The next layer's prefetch took no account of the layer about to run: with fewer than two layers'
    room it evicted that layer's prefetched pages, read again by its forward (every weight twice a
    token at 1.4 layers, and below one layer each weight prefetched only to be evicted by the next)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pagedtensor import MemoryConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, vocab_size=256, num_attention_heads=4,
                         num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    layer_pages = _layer_bytes(model) // PAGE // config.num_hidden_layers
    enable_paging(model, MemoryConfig(page_size=PAGE, vram_limit=int(layers_held * layer_pages) * PAGE, host_memory=2048 * PAGE,
                                      device="cpu"), page_weights=True)  # fmt: skip
    pager = paging_state(model).pager
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if isinstance(p, PagedTensor))
    after_each_forward = []
    model.register_forward_hook(lambda *_: after_each_forward.append(pager.stats()["bytes_h2d"]))
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)
    per_token = [b - a for a, b in zip(after_each_forward[1:], after_each_forward[2:])]  # decode steps
    assert per_token and max(per_token) <= weight_bytes + 8 * PAGE, (per_token, weight_bytes)
