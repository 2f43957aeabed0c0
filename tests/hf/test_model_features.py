"""Model features the paged path must keep: logit soft-capping and attention-sink logits (computed
by the model's own eager attention on the paged keys), forward hooks on decoder layers (no in-place
reuse of a buffer a hook may keep), and save_pretrained with paged weights (dense files)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import transformers

from pagedtensor import enable_paging
from pagedtensor.hf import paging_state
from pagedtensor.tensor import PagedTensor
from tests.hf.tiny_models import TINY, prompts, tiny_budget, tiny_pair


def _scaled_pair(config_class, model_class, extra: dict, scale):
    config = config_class(**{**TINY, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    reference = model_class(config).eval()
    with torch.no_grad():
        scale(reference)
    paged = model_class(copy.deepcopy(config)).eval()
    paged.load_state_dict(reference.state_dict())
    return reference, paged


def _scale_queries(model):  # large scores, so a cap of 1.0 changes the result
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.mul_(40)


def _spread_sinks(model):  # sink logits large enough to matter
    for layer in model.model.layers:
        layer.self_attn.sinks.normal_(0, 3.0)


@pytest.mark.parametrize(
    "config_class,model_class,extra,scale",
    [
        pytest.param(transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
                     dict(head_dim=16, sliding_window=4096, query_pre_attn_scalar=16, attn_logit_softcapping=1.0,
                          final_logit_softcapping=None), _scale_queries, id="gemma2-softcap"),
        pytest.param(transformers.GptOssConfig, transformers.GptOssForCausalLM,
                     dict(head_dim=16, sliding_window=4096, num_local_experts=4, num_experts_per_tok=2), _spread_sinks,
                     id="gpt_oss-sinks"),
    ],
)  # fmt: skip
def test_soft_capping_and_sink_logits_match_the_unpaged_model(nvme_dir, config_class, model_class, extra, scale):
    reference, paged = _scaled_pair(config_class, model_class, extra, scale)
    enable_paging(paged, tiny_budget(nvme_dir))
    ids, mask = prompts(1, length=40)
    settings = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, return_dict_in_generate=True, output_logits=True)
    expected, got = reference.generate(ids, **settings), paged.generate(ids, **settings)
    assert torch.equal(got.sequences, expected.sequences)
    for want, have in zip(expected.logits, got.logits):
        torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)


def test_forward_hooks_on_decoder_layers_see_their_own_outputs(nvme_dir):
    reference, paged = tiny_pair("llama")
    enable_paging(paged, tiny_budget(nvme_dir), prefill_chunk_size=16)
    ids, mask = prompts(1, length=40)

    def prefill_outputs(model):
        seen: list[torch.Tensor] = []
        hooks = [layer.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
                 for layer in model.model.layers]  # fmt: skip
        try:
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
        finally:
            for hook in hooks:
                hook.remove()
        return tokens, seen[: len(model.model.layers)]

    expected_tokens, expected = prefill_outputs(reference)
    tokens, got = prefill_outputs(paged)
    assert torch.equal(tokens, expected_tokens)
    assert len({t.data_ptr() for t in got}) == len(got), "two layers' recorded outputs are one reused buffer"
    for want, have in zip(expected, got):
        torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("page_weights", [False, True])
def test_a_hook_registered_before_enable_paging_sees_its_own_outputs(page_weights, nvme_dir):
    """Hooks already on the model when paging is enabled are the user's too (they were counted as
    enable_paging's own, and the kept layer output was overwritten by the next prefill chunk)."""
    reference, paged = tiny_pair("llama")
    ids, mask = prompts(1, length=40)
    seen: dict[str, list[torch.Tensor]] = {"reference": [], "paged": []}
    handles = [model.model.layers[0].register_forward_hook(lambda m, a, out, kept=seen[name]: kept.append(out[0] if isinstance(out, tuple) else out))
               for name, model in (("reference", reference), ("paged", paged))]  # fmt: skip
    enable_paging(paged, tiny_budget(nvme_dir, vram_pages=24, host_pages=16), prefill_chunk_size=16, page_weights=page_weights)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert torch.equal(paged.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False), expected)
    torch.testing.assert_close(seen["paged"][0], seen["reference"][0], atol=1e-4, rtol=1e-4)
    handles[1].remove()  # enable_paging's own hooks (the weights' prefetch) leave the reuse on
    assert not paging_state(paged).user_hooks()


def test_hooks_on_the_embeddings_and_inside_decoder_layers_see_their_own_tensors(nvme_dir):
    """A chunked prefill writes each chunk's output over its layer's input: a hook that keeps the
    embeddings' output or a layer submodule's input (a chunk of that buffer) saw it overwritten."""
    reference, paged = tiny_pair("llama")
    enable_paging(paged, tiny_budget(nvme_dir), prefill_chunk_size=16)
    ids, mask = prompts(1, length=40)

    def prefill_tensors(model):
        seen: list[torch.Tensor] = []
        hooks = [model.model.embed_tokens.register_forward_hook(lambda m, a, out: seen.append(out)),
                 model.model.layers[1].input_layernorm.register_forward_pre_hook(lambda m, a: seen.append(a[0]))]  # fmt: skip
        try:
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
        finally:
            for hook in hooks:
                hook.remove()
        return tokens, seen

    expected_tokens, expected = prefill_tensors(reference)
    tokens, got = prefill_tensors(paged)
    assert torch.equal(tokens, expected_tokens)
    embedded = got[0]
    assert torch.equal(embedded, reference.model.embed_tokens.weight[ids]), "the embeddings' output was overwritten"
    chunks = torch.cat([t for t in got[1:] if t.shape[1] > 1], dim=1)  # the prefill's chunks, in order
    torch.testing.assert_close(chunks, next(t for t in expected[1:] if t.shape[1] > 1), atol=1e-4, rtol=1e-4)


def test_save_pretrained_with_paged_weights_writes_dense_files(nvme_dir, tmp_path):
    reference, paged = tiny_pair("llama")
    enable_paging(paged, tiny_budget(nvme_dir, vram_pages=24, host_pages=16), page_weights=True)
    assert isinstance(paged.model.layers[0].self_attn.q_proj.weight, PagedTensor)
    paged.save_pretrained(tmp_path / "saved")
    paged.save_pretrained(tmp_path / "given", state_dict=paged.state_dict())  # a state dict passed in, paged
    for folder in ("saved", "given"):
        reloaded = type(reference).from_pretrained(tmp_path / folder).eval()
        for name, tensor in reference.state_dict().items():
            assert torch.equal(reloaded.state_dict()[name], tensor), f"{folder}: {name}"


def test_without_paged_weights_save_pretrained_stays_transformers_own(nvme_dir, tmp_path):
    """With ``page_weights=False`` no weight is paged, and ``save_pretrained`` stays transformers'
    own: a temporary copy of the decoder saves in one expression (the dense save, holding its
    module weakly, raised ReferenceError there), and a module without ``save_pretrained`` (a
    wrapper around a PreTrainedModel) is paged and generates as unpaged (it raised AttributeError)."""
    from safetensors.torch import load_file

    reference, paged = tiny_pair("llama")
    enable_paging(paged, tiny_budget(nvme_dir))
    assert "save_pretrained" not in vars(paged)
    copy.deepcopy(paged.model).save_pretrained(tmp_path / "copy")
    expected = reference.model.state_dict()
    got = load_file(tmp_path / "copy" / "model.safetensors")
    assert got.keys() == expected.keys() and all(torch.equal(got[name], expected[name]) for name in expected)

    class Wrapper(torch.nn.Module):  # generate and config, no save_pretrained
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

        def generate(self, *args, **kwargs):
            return self.inner.generate(*args, **kwargs)

    reference, inner = tiny_pair("llama")
    wrapper = Wrapper(inner)
    enable_paging(wrapper, tiny_budget(nvme_dir))
    ids, mask = prompts(1)
    assert torch.equal(wrapper.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False),
                       reference.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False))


def test_save_pretrained_with_paged_weights_takes_a_state_dict_by_position(nvme_dir, tmp_path):
    """``save_pretrained(path, True, state_dict)``, transformers' order: the wrapper took ``state_dict``
    by keyword only and passed its own beside the positional one ("got multiple values for argument
    'state_dict'"). The state dict given, by position or by name, paged or dense, is what is saved."""
    reference, paged = tiny_pair("llama")
    enable_paging(paged, tiny_budget(nvme_dir, vram_pages=24, host_pages=16), page_weights=True)
    doubled = {name: tensor * 2 for name, tensor in reference.state_dict().items()}
    paged.save_pretrained(tmp_path / "doubled", True, doubled)
    paged.save_pretrained(tmp_path / "paged", True, paged.state_dict(), max_shard_size="50GB")
    for folder, expected in (("doubled", doubled), ("paged", reference.state_dict())):
        reloaded = type(reference).from_pretrained(tmp_path / folder).eval()
        for name, tensor in expected.items():
            assert torch.equal(reloaded.state_dict()[name], tensor), f"{folder}: {name}"
    with pytest.raises(TypeError, match="multiple values for argument 'state_dict'"):  # as transformers' own
        paged.save_pretrained(tmp_path / "twice", True, doubled, state_dict=doubled)


def test_a_pretrained_model_inside_a_model_with_paged_weights_saves_dense_files(nvme_dir, tmp_path):
    """``model.get_decoder().save_pretrained(path)`` (``model.model``'s, a PreTrainedModel too) raised
    from ``PagedTensor.data_ptr``: only the top model's save_pretrained wrote dense copies. The
    decoder's writes the unpaged decoder's tensors; so do a deep copy's (its own weights) and a
    decoder saved with torch.save and loaded (one dropped before its save_pretrained runs is named)."""
    from safetensors.torch import load_file

    reference, paged = tiny_pair("llama")
    enable_paging(paged, tiny_budget(nvme_dir, vram_pages=24, host_pages=16), page_weights=True)
    reference.get_decoder().save_pretrained(tmp_path / "plain")
    expected = load_file(tmp_path / "plain" / "model.safetensors")
    paged.get_decoder().save_pretrained(tmp_path / "decoder")
    copied = copy.deepcopy(paged.model)
    with torch.no_grad():
        copied.layers[0].mlp.down_proj.weight.mul_(2)
    copied.save_pretrained(tmp_path / "copy")
    saved = io.BytesIO()
    torch.save(paged.model, saved)
    saved.seek(0)
    with pytest.raises(ReferenceError, match="save_pretrained: the module it saves is gone"):  # held weakly, and dropped first
        torch.load(saved, weights_only=False).save_pretrained(tmp_path / "gone")
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    loaded.save_pretrained(tmp_path / "loaded")
    doubled = {**expected, "layers.0.mlp.down_proj.weight": expected["layers.0.mlp.down_proj.weight"] * 2}
    for folder, tensors in (("decoder", expected), ("copy", doubled), ("loaded", expected)):
        got = load_file(tmp_path / folder / "model.safetensors")
        assert got.keys() == tensors.keys(), folder
        for name, tensor in tensors.items():
            assert torch.equal(got[name], tensor), f"{folder}: {name}"


def test_cache_reset_takes_a_new_batch_and_selection_takes_a_boolean_mask(nvme_dir):
    from transformers import DynamicCache

    from pagedtensor.hf import PagedKVCache
    from pagedtensor.hf.model import paging_state

    reference, paged = tiny_pair("llama")
    enable_paging(paged, tiny_budget(nvme_dir))
    ids, mask = prompts(3)
    settings = dict(max_new_tokens=3, do_sample=False)
    paged_cache = PagedKVCache(paged.config, pager=paging_state(paged).pager)
    paged.generate(ids, attention_mask=mask, past_key_values=paged_cache, **settings)
    paged_cache.reset()  # then a batch of 1: the same tokens as a fresh cache gives
    expected = reference.generate(ids[:1], past_key_values=DynamicCache(config=reference.config), **settings)
    assert torch.equal(paged.generate(ids[:1], past_key_values=paged_cache, **settings), expected)
    paged_cache.reset()
    paged.generate(ids, attention_mask=mask, past_key_values=paged_cache, **settings)
    paged_cache.batch_select_indices(torch.tensor([True, False, True]))
    assert paged_cache.layers[0].cache.batch_size_ == 2
    with pytest.raises(ValueError, match="a boolean mask of 4 for a batch of 2"):
        paged_cache.batch_select_indices(torch.tensor([True, False, True, True]))


def test_a_left_padded_prefill_through_the_decoder_alone_records_its_padding(nvme_dir):
    """enable_paging read the padding of a forward in a hook on the model only: a left-padded prefill
    through its decoder (``model.model(...)``) stored the pads as tokens, and under ``"pagedllm"``
    attention (which reads the pages, not the mask) every later step attended to them (logits 0.13 off)."""
    from transformers import DynamicCache

    reference, model = tiny_pair("llama")
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation="pagedllm")
    ids, mask = prompts(3, length=24)
    paged, dense = paging_state(model).new_cache(model), DynamicCache(config=reference.config)
    keyword = paging_state(model).cache_keyword
    step, step_mask = torch.tensor([[5], [7], [9]]), torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
    with torch.no_grad():
        expected = reference.model(input_ids=ids, attention_mask=mask, **{keyword: dense}).last_hidden_state
        got = model.model(input_ids=ids, attention_mask=mask, **{keyword: paged}).last_hidden_state
        torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)
        assert [seq.length for seq in paged.layers[0].seqs] == mask.sum(1).tolist()
        expected = reference(input_ids=step, attention_mask=step_mask, **{keyword: dense}).logits
        got = model(input_ids=step, attention_mask=step_mask, **{keyword: paged}).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    paged.close()


@pytest.mark.parametrize("attn", ["pagedllm", "sdpa"])
def test_a_cache_that_does_not_know_the_window_still_gets_it_applied(nvme_dir, attn):
    """A PagedKVCache made without the model's own config (``num_layers=``, or a copy of the config
    before enable_paging set the attention) takes the dense path; under ``"pagedllm"`` the mask of
    that path was causal without the layer's sliding window: wrong tokens once the window was outgrown."""
    from pagedtensor import PagedKVCache

    reference, model = tiny_pair("mistral", sliding_window=6)
    config_before = copy.deepcopy(model.config)
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation=attn)
    ids, _ = prompts(1, length=20)
    settings = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    expected = reference.generate(ids, **settings)
    pager = paging_state(model).pager
    for cache in (PagedKVCache(num_layers=model.config.num_hidden_layers, pager=pager), PagedKVCache(config_before, pager=pager)):
        got = model.generate(ids, **settings, **{paging_state(model).cache_keyword: cache})
        assert torch.equal(got.sequences, expected.sequences)
        for a, b in zip(got.logits, expected.logits):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        cache.close()


def test_a_generate_in_training_mode_prefills_whole_so_dropout_draws_as_unpaged(nvme_dir):
    """A model left in ``train()`` (a sample generated inside a training loop) with attention dropout,
    under the "pagedllm" attention, a prompt longer than ``prefill_chunk_size``: each chunk drew its
    own dropout mask, other random numbers than the unpaged model's one draw, and other tokens came.
    A layer in training mode now runs its input whole."""
    reference, model = tiny_pair("llama", attention_dropout=0.3)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=8, host_pages=64), attn_implementation="auto", prefill_chunk_size=4)
    assert model.config._attn_implementation == "pagedllm"
    reference.train()
    model.train()
    ids, mask = prompts(1, length=20)
    options = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    torch.manual_seed(0)
    expected = reference.generate(ids, **options)
    torch.manual_seed(0)
    got = model.generate(ids, **options)
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits, strict=True))
