"""FSDP2 + expert parallelism on 2 and 4 gloo processes vs the single-process MoE layer (outputs and
gradients), including skewed routing (ranks that receive no rows), a rank without tokens, capacity dropping
and re-routing, the pipelined (chunked, async) exchange, HSDP / DDP as degenerate meshes, and
single-process state loaded into the sharded layout."""

from moekit.distributed.launch import run_local
from tests.distributed.workers import Case, checkpoint_suite, layer_suite

CASES = [
    Case("top2 dropless"),
    Case("switch top1 + shared expert", top_k=1, router="switch", shared=True),
    Case("skewed: all tokens to the last experts", skew=True),
    Case("skewed + capacity re-route", skew=True, capacity_factor=1.0, overflow="reroute"),
    Case("capacity drop", capacity_factor=0.6),
    Case("rank without tokens", empty_rank=1),
    Case("pipelined 3 chunks + capacity", chunks=3, capacity_factor=0.8),
    Case("pipelined, skewed, empty rank", chunks=2, skew=True, empty_rank=0),
    Case("float32 grouped_mm", float64=False, num_experts=8),
    Case("expert choice (tokens with 0 or several experts)", router="expert_choice"),
    Case("dynamic top-p", router="top_p", top_k=3, router_extra=(("top_p", 0.6),)),
    Case("DeepSeek sigmoid, group-limited", router="deepseek", num_experts=8, top_k=2,
         router_extra=(("score_func", "sigmoid"), ("n_groups", 4), ("topk_groups", 2))),
    Case("heterogeneous expert sizes", hidden_sizes=(16, 24, 32, 8)),
    Case("hierarchical: 2 groups, each MoELayer sharded", num_experts=8, hierarchical_groups=2),
    Case("Soft MoE stays replicated (data parallel only)", router="soft", top_k=1, float64=False),
]


def test_ep2_layer_matches_single_process():
    run_local(layer_suite, 2, [(2, c) for c in CASES], timeout=600)


def test_ep4_and_ep2_dp2_layer_matches_single_process():
    ep4 = [(4, c) for c in CASES[2:4] + CASES[5:8]] + [(4, Case("ep4 E=8", num_experts=8))]
    ep2_fsdp2 = [(2, CASES[1]), (2, CASES[5])]
    # HSDP (2 replicas of ep=2) and plain data parallelism (DDP: 4 replicas, dp_shard = 1) as degenerate meshes
    replicated = [(2, CASES[0], 2), (1, CASES[5], 4)]
    runs = ep4 + ep2_fsdp2 + replicated
    run_local(layer_suite, 4, runs, timeout=600)


def test_checkpoints_and_errors():
    run_local(checkpoint_suite, 4, [2, 4], True, timeout=600)
