"""Tensor-parallel paged generation on 2 CPU processes (gloo) equals the one-process run.

Each rank pages only its own KV head (the tiny Llama has 2) under its own budget of a few pages, so
pages go to host and disk on both ranks. Weights are sharded two ways: by transformers'
``tp_plan="auto"`` (DTensors, from a saved checkpoint) and by :func:`shard_by_heads`. Greedy tokens
must equal the one-process unpaged and paged runs, for batch 1 and a left-padded batch of 3, with
SDPA on the pages and with the ``"pagedllm"`` attention; logits agree to fp32 rounding (the
row-parallel all-reduce sums in another order).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from pagedtensor.hf import enable_paging, paging_state
from pagedtensor.hf.distributed import (
    check_tensor_parallel_heads,
    enable_tensor_parallel_paging,
    rank_memory_config,
    shard_by_heads,
)
from tests.hf.tiny_models import OTHER_LAYOUTS, TINY, prompts, tiny_budget, tiny_pair

WORLD_SIZE = 2
NEW_TOKENS = 8  # as in tests/hf/tp_worker.py
WORKER_TIMEOUT_S = 120
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with the gloo backend is not available"
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    return next((name for name in ("lo", "lo0") if name in names), None)


def _launch(sharding: str, tmp_path, checkpoint: str | None = None, family: str = "llama") -> list[dict]:
    """Run ``tp_worker.py`` as ranks 0 and 1 on loopback (``shard_by_heads`` sharding the tiny model
    of ``family``); return each rank's JSON."""
    out, nvme = tmp_path / "out", tmp_path / "nvme"
    out.mkdir()
    nvme.mkdir()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(WORLD_SIZE),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT)
    interface = _loopback_interface()
    if interface is not None:
        env["GLOO_SOCKET_IFNAME"] = interface
    command = [sys.executable, os.path.join(REPO_ROOT, "tests", "hf", "tp_worker.py"), "--sharding", sharding,
               "--nvme", str(nvme), "--out", str(out), "--family", family] + (["--checkpoint", checkpoint] if checkpoint else [])
    logs = [open(tmp_path / f"rank{rank}.log", "w+") for rank in range(WORLD_SIZE)]
    workers = [
        subprocess.Popen(command, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        for rank, log in enumerate(logs)
    ]
    try:
        codes = [worker.wait(timeout=WORKER_TIMEOUT_S) for worker in workers]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    tails = []
    for rank, log in enumerate(logs):
        log.seek(0)
        tails.append(f"--- rank {rank}:\n" + "".join(log.readlines()[-25:]))
        log.close()
    assert codes == [0] * WORLD_SIZE, f"workers exited with {codes}\n" + "\n".join(tails)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def _generate(model, batch: int):
    ids, mask = prompts(batch)
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                          return_dict_in_generate=True)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process runs (unpaged, and paged with SDPA on a few pages) and the checkpoint the ranks load."""
    reference, paged = tiny_pair("llama", attn="sdpa")
    checkpoint = tmp_path_factory.mktemp("tiny-llama")
    reference.save_pretrained(str(checkpoint))
    enable_paging(paged, tiny_budget(str(tmp_path_factory.mktemp("nvme"))), attn_implementation="sdpa", prefill_chunk_size=16)
    runs = {}
    for batch in (1, 3):
        runs[batch] = {"unpaged": _generate(reference, batch), "paged": _generate(paged, batch)}
        assert torch.equal(runs[batch]["unpaged"].sequences, runs[batch]["paged"].sequences)
    return {"checkpoint": str(checkpoint), "runs": runs}


@pytest.mark.parametrize("sharding", ["tp_plan", "shard_by_heads"])
def test_two_ranks_equal_one_process(sharding, one_process, tmp_path):
    ranks = _launch(sharding, tmp_path, one_process["checkpoint"] if sharding == "tp_plan" else None)
    for result in ranks:
        assert result["world_size"] == WORLD_SIZE
        assert "computes 2 KV heads, expected num_key_value_heads 2 / world size 2 = 1" in result.get("unsharded_error", ""), result.get("unsharded_error")
        mismatch = result.get("mismatch_error", "")  # raised on every rank, naming each rank's options
        assert "every rank must pass the same" in mismatch and "prefill_chunk_size=16" in mismatch and "prefill_chunk_size=32" in mismatch, mismatch
        assert sorted(result["runs"]) == ["pagedllm-1", "pagedllm-3", "sdpa-1", "sdpa-3"]
        assert result["tokenizer_kept"] is (True if sharding == "tp_plan" else None)  # from_pretrained(tokenizer=, tp_plan=)
        for key, run in result["runs"].items():
            batch = int(key.split("-")[1])
            expected = one_process["runs"][batch]
            where = f"rank {result['rank']}, {sharding}, {key}"
            assert run["sequences"] == expected["unpaged"].sequences.tolist(), where
            assert run["sequences"] == expected["paged"].sequences.tolist(), where
            assert len(run["logits"]) == len(expected["unpaged"].logits), where
            for step, (got, want) in enumerate(zip(run["logits"], expected["unpaged"].logits)):
                torch.testing.assert_close(torch.tensor(got), want, atol=1e-4, rtol=1e-4, msg=lambda m: f"{where}, step {step}: {m}")
            assert run["kv_heads"] == [TINY["num_key_value_heads"] // WORLD_SIZE] * 2, where  # the rank pages its own KV heads only
            stats = run["stats"]
            assert stats["bytes_d2h"] > 0 and stats["bytes_to_disk"] > 0, (where, stats)
            assert stats["bytes_from_disk"] > 0 and stats["bytes_h2d"] > 0, (where, stats)
    for key, run in ranks[0]["runs"].items():
        assert run["sequences"] == ranks[1]["runs"][key]["sequences"], key


@pytest.mark.skipif("gemma4" not in OTHER_LAYOUTS, reason="transformers before Gemma 4")
def test_two_ranks_shard_layers_of_other_head_sizes(tmp_path):
    """Gemma 4 sharded by shard_by_heads on 2 ranks: its full-attention layer has another head size
    (32, the sliding one's 16) and no v_proj (its values are its keys). Each rank splits each layer
    by its own heads (shard_by_heads read one head size from the config, and raised at the first
    full layer) and pages its own KV heads in each layer's geometry: the one-process unpaged tokens."""
    reference, _ = tiny_pair("gemma4")
    assert reference.model.layers[1].self_attn.v_proj is None
    expected = {batch: _generate(reference, batch) for batch in (1, 3)}
    ranks = _launch("shard_by_heads", tmp_path, family="gemma4")
    for result in ranks:
        assert sorted(result["runs"]) == ["pagedllm-1", "pagedllm-3", "sdpa-1", "sdpa-3"]
        for key, run in result["runs"].items():
            want = expected[int(key.split("-")[1])]
            where = f"rank {result['rank']}, gemma4, {key}"
            assert run["sequences"] == want.sequences.tolist(), where
            for step, (got, logits) in enumerate(zip(run["logits"], want.logits)):
                torch.testing.assert_close(torch.tensor(got), logits, atol=1e-4, rtol=1e-4, msg=lambda m: f"{where}, step {step}: {m}")
            assert (run["kv_heads"], run["head_dims"]) == ([1, 1], [16, 32]), where
            assert run["stats"]["bytes_d2h"] > 0, (where, run["stats"])


def test_world_size_must_divide_kv_heads():
    reference, _ = tiny_pair("llama")
    check_tensor_parallel_heads(reference.config, 2)
    with pytest.raises(ValueError, match=r"world size 4 .*num_key_value_heads 2"):
        check_tensor_parallel_heads(reference.config, 4)
    with pytest.raises(ValueError, match=r"world size 3 .*num_key_value_heads 2"):
        check_tensor_parallel_heads(reference.config, 3)
    with pytest.raises(ValueError, match="world_size"):
        check_tensor_parallel_heads(reference.config, 0)


def test_rank_budget_is_its_own(nvme_dir):
    budget = tiny_budget(nvme_dir)
    config = rank_memory_config(budget, torch.device("cpu"))
    assert (config.vram_limit, config.host_memory, config.device) == (budget.vram_limit, budget.host_memory, torch.device("cpu"))
    with pytest.raises(TypeError, match="memory_config"):
        rank_memory_config({"vram_limit": 1}, torch.device("cpu"))


@pytest.fixture
def one_rank_group():
    """A gloo group of one process on an in-memory store (no sockets)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_shard_by_heads_rejects_fused_projections(one_rank_group):
    _, phi3 = tiny_pair("phi3")
    with pytest.raises(TypeError, match="q_proj"):
        shard_by_heads(phi3)


def test_shard_by_heads_checks_every_layer_before_changing_any(one_rank_group):
    """A layer whose projection is not whole heads raises, naming the layer, and leaves every
    layer as it was (the earlier layers were split, and their all-reduce hooks added, before)."""
    _, model = tiny_pair("llama")
    attention = model.model.layers[1].self_attn
    attention.q_proj = torch.nn.Linear(TINY["hidden_size"], attention.q_proj.out_features + 1, bias=False)
    parameters = dict(model.named_parameters())
    with pytest.raises(ValueError, match=r"layer 1: q_proj has 65 outputs, not a multiple of world size 1 x head_dim 16"):
        shard_by_heads(model)
    assert dict(model.named_parameters()) == parameters  # the same Parameter objects
    assert not any(module._forward_hooks for module in model.modules())
    assert not hasattr(model, "_pagedllm_tensor_parallel")


@pytest.mark.skipif("gemma4" not in OTHER_LAYOUTS, reason="transformers before Gemma 4")
def test_one_rank_shards_layers_of_other_head_sizes(one_rank_group, nvme_dir):
    """Gemma 4 (full-attention layers of another head size, without v_proj) on one rank: sharded and
    paged, the unpaged tokens."""
    reference, model = tiny_pair("gemma4")
    shard_by_heads(model)
    enable_tensor_parallel_paging(model, tiny_budget(nvme_dir), attn_implementation="sdpa", prefill_chunk_size=16)
    assert torch.equal(_generate(model, 3).sequences, _generate(reference, 3).sequences)


def test_one_rank_is_plain_paging(one_rank_group, nvme_dir):
    """World size 1: sharding keeps every head, and paged output equals the unpaged model's."""
    reference, model = tiny_pair("qwen2")  # q/k/v biases: kept on the column-parallel side
    shard_by_heads(model)
    with pytest.raises(ValueError, match="already sharded"):
        shard_by_heads(model)
    enable_tensor_parallel_paging(model, tiny_budget(nvme_dir), attn_implementation="sdpa", prefill_chunk_size=16)
    expected, got = _generate(reference, 3), _generate(model, 3)
    assert torch.equal(got.sequences, expected.sequences)


def _tiny_model(config_class, model_class, attn: str = "sdpa", **extra):
    config = config_class(**{**TINY, **extra})
    config._attn_implementation = attn
    torch.manual_seed(0)
    return model_class(config).eval()


def test_shard_by_heads_refuses_norms_and_statistics_it_cannot_split(one_rank_group):
    """State beside the split projections that depends on the split was left whole: OLMo 2's q/k
    norms over every head's features and Cohere's per-head norm weights made the first forward fail
    with a bare shape error, StableLM's list of per-head norms (and Gemma 3n's activation sparsity,
    thresholds from the whole intermediate size's statistics) silently gave other tokens on 2 ranks.
    Each is refused naming it, the model as it was; norms over head_dim every head shares are fine."""
    import transformers

    cases = [
        (transformers.Olmo2Config, transformers.Olmo2ForCausalLM, {}, "q_norm.weight of shape \\(64,\\)"),
        (transformers.CohereConfig, transformers.CohereForCausalLM, {"use_qk_norm": True}, "q_norm.weight of shape \\(4, 16\\)"),
        (transformers.StableLmConfig, transformers.StableLmForCausalLM, {"qk_layernorm": True},
         "q_layernorm.norms, a list of 4 modules \\(one per head\\)"),
    ]  # fmt: skip
    if hasattr(transformers, "Gemma3nForCausalLM"):
        cases.append((transformers.Gemma3nTextConfig, transformers.Gemma3nForCausalLM,
                      {"num_kv_shared_layers": 0, "layer_types": ["sliding_attention", "full_attention"], "hidden_size_per_layer_input": 8,
                       "vocab_size_per_layer_input": TINY["vocab_size"], "activation_sparsity_pattern": [0.95, 0.0]},
                      "activation_sparsity=0.95"))  # fmt: skip
    if hasattr(transformers, "GraniteSWAForCausalLM"):  # one attention sink per query head: a bare broadcast error at the first forward
        cases.append((transformers.GraniteSWAConfig, transformers.GraniteSWAForCausalLM, {"sliding_window": 8, "attn": "eager"},
                      "sinks of shape \\(4,\\)"))  # fmt: skip
    for config_class, model_class, extra, named in cases:
        model = _tiny_model(config_class, model_class, **extra)
        parameters = dict(model.named_parameters())
        with pytest.raises(TypeError, match=f"layer 0: {named} in the (attention|MLP) depends on how its projections are split"):
            shard_by_heads(model)
        assert dict(model.named_parameters()) == parameters and not hasattr(model, "_pagedllm_tensor_parallel")
    for config_class, model_class, extra in ((transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
                                             (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, {}),
                                             (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,  # as many heads as head_dim
                                              {"num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 16})):  # fmt: skip
        shard_by_heads(_tiny_model(config_class, model_class, **extra))  # q/k norms over head_dim, shared by every head


def test_shard_by_heads_refuses_attention_that_mixes_heads(one_rank_group):
    """DiffLlama's differential attention pairs head i with head i + H/2: sharded, each rank paired
    its own heads, and 2 ranks silently gave other logits. Refused naming the class, the model as it was."""
    import transformers

    model = _tiny_model(transformers.DiffLlamaConfig, transformers.DiffLlamaForCausalLM)
    parameters = dict(model.named_parameters())
    with pytest.raises(TypeError, match="layer 0: DiffLlamaAttention mixes heads"):
        shard_by_heads(model)
    assert dict(model.named_parameters()) == parameters and not hasattr(model, "_pagedllm_tensor_parallel")


def test_shard_by_heads_refuses_a_model_sharded_or_paged_already(one_rank_group, nvme_dir):
    """A model whose weights are DTensors (transformers' tp_plan="auto") was split again, silently
    giving other logits; one whose weights were paged (enable_paging(page_weights=True)) got dense
    copies of them, paging dropped. Both refused, the model as it was."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    _, model = tiny_pair("llama")
    projection = model.model.layers[0].self_attn.q_proj
    projection.weight = torch.nn.Parameter(distribute_tensor(projection.weight.detach(), init_device_mesh("cpu", (1,)), [Shard(0)]))
    with pytest.raises(ValueError, match="already sharded .*q_proj.weight is a DTensor"):
        shard_by_heads(model)
    assert not any(module._forward_hooks for module in model.modules())

    _, model = tiny_pair("llama")
    enable_paging(model, tiny_budget(nvme_dir, vram_pages=16, host_pages=16), attn_implementation="sdpa", page_weights=True)
    parameters = dict(model.named_parameters())
    with pytest.raises(ValueError, match=r"paging is already enabled.*shard_by_heads first, then enable_tensor_parallel_paging\(.*page_weights=True\)"):
        shard_by_heads(model)
    assert dict(model.named_parameters()) == parameters and not hasattr(model, "_pagedllm_tensor_parallel")


def test_enable_tensor_parallel_paging_takes_a_pager(one_rank_group, nvme_dir):
    """``pager=`` alone (an enable_paging option) was refused as if a memory_config were given too."""
    from pagedtensor import Pager

    reference, model = tiny_pair("llama")
    pager = Pager(tiny_budget(nvme_dir))
    try:
        enable_tensor_parallel_paging(shard_by_heads(model), attn_implementation="sdpa", pager=pager)
        assert paging_state(model).pager is pager
        assert torch.equal(_generate(model, 1).sequences, _generate(reference, 1).sequences)
    finally:
        pager.close()


def test_refusals_name_what_they_refuse(one_rank_group):
    """A non-model raised a bare AttributeError (enable_paging's TypeError now), and GraniteMoe's
    layers (their MLP is ``block_sparse_moe``) were refused as "a Linear gate_proj in NoneType"."""
    import transformers

    for function in (shard_by_heads, enable_tensor_parallel_paging):
        with pytest.raises(TypeError, match="model: expected a transformers .*got Linear"):
            function(torch.nn.Linear(2, 2))
    model = _tiny_model(transformers.GraniteMoeConfig, transformers.GraniteMoeForCausalLM)
    with pytest.raises(TypeError, match="layer 0: GraniteMoeDecoderLayer has no mlp .*block_sparse_moe"):
        shard_by_heads(model)


def test_a_config_without_num_key_value_heads_is_paged_on_one_rank_and_refused_by_name_for_sharding(one_rank_group, nvme_dir):
    """GPT-NeoX (transformers ships its tp_plan) names no num_key_value_heads: both entry points
    raised a bare AttributeError reading it, where the head check counts the attention heads."""
    import copy

    import transformers

    config = transformers.GPTNeoXConfig(**{name: value for name, value in TINY.items() if name != "num_key_value_heads"})
    config._attn_implementation = "sdpa"
    assert getattr(config, "num_key_value_heads", None) is None
    torch.manual_seed(0)
    reference = transformers.GPTNeoXForCausalLM(config).eval()
    model = copy.deepcopy(reference)
    with pytest.raises(TypeError, match="GPTNeoXForCausalLM has no decoder layers with a self_attn"):
        shard_by_heads(model)
    enable_tensor_parallel_paging(model, tiny_budget(nvme_dir), attn_implementation="sdpa")
    expected, got = _generate(reference, 2), _generate(model, 2)
    assert torch.equal(got.sequences, expected.sequences)
