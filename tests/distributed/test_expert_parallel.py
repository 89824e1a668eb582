"""Expert parallelism on 2 and 4 gloo processes vs the single-process MoE layer (outputs and gradients),
including skewed routing (ranks that receive no rows), a rank without tokens, capacity dropping and
re-routing, the pipelined (chunked, async) exchange, and sharded <-> single-process checkpoints."""

import torch

from moekit.distributed.launch import run_local
from tests.distributed.workers import (
    Case,
    checkpoint_suite,
    layer_suite,
    tiny_lm,
    train_curve,
    train_ep,
    trainer_ep,
    trainer_setup,
)

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
    run_local(layer_suite, 2, [(2, c) for c in CASES])


def test_ep4_and_ep2_dp2_layer_matches_single_process():
    ep4 = [(4, c) for c in CASES[2:4] + CASES[5:8]] + [(4, Case("ep4 E=8", num_experts=8))]
    ep2_dp2 = [(2, CASES[1]), (2, CASES[5])]
    runs = ep4 + ep2_dp2
    run_local(layer_suite, 4, runs)


def test_checkpoints_and_errors():
    run_local(checkpoint_suite, 4, [2, 4], True)


def test_ep2_training_matches_single_process(tmp_path):
    """20 AdamW steps of a tiny MoETransformer: EP=2 (each rank half of every batch, gradient reduction,
    global grad-norm clipping) vs one process on the full batches; the loss curves and final weights agree."""
    out = str(tmp_path / "ep.pt")
    run_local(train_ep, 2, 2, out)
    got = torch.load(out)
    single = tiny_lm()
    opt = torch.optim.AdamW(single.parameters(), lr=3e-3, weight_decay=0.1)
    want = train_curve(model=single, opt=opt)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want), rtol=1e-5, atol=1e-5)
    assert want[-1] < want[0] - 0.3  # it trains
    for key, w in single.state_dict().items():
        torch.testing.assert_close(got["state_dict"][key], w, rtol=1e-4, atol=1e-5, msg=key)
    # the gathered optimizer state equals the single-process one (Adam moments) and loads into it
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            torch.testing.assert_close(got["optimizer"]["state"][i][k], v, rtol=1e-4, atol=1e-6,
                                       msg=f"{i}.{k}")
    opt.load_state_dict(got["optimizer"])


def test_trainer_with_expert_parallel_matches_single_process(tmp_path):
    """moekit.train.train(parallel=...) on 2 ranks (grad accumulation, clipping, eval, checkpoints, DeepSeek
    bias balancing from global loads) logs the single-process run's losses; its checkpoint loads into a
    single process; a single-process checkpoint resumes under EP and continues the single-process curve."""
    import shutil

    from moekit.train.checkpoint import load_model
    from moekit.train.hooks import RouterBiasUpdate
    from moekit.train.trainer import train

    model, cfg, data = trainer_setup()
    single = train(model, data, data, cfg, out_dir=tmp_path / "single", hooks=[RouterBiasUpdate()])
    shutil.copytree(tmp_path / "single", tmp_path / "resume")
    (tmp_path / "resume" / "latest").write_text("ckpt-000003")
    run_local(trainer_ep, 2, str(tmp_path / "ep"), str(tmp_path / "resume"), str(tmp_path / "out.pt"))
    got = torch.load(tmp_path / "out.pt", weights_only=False)

    def series(records, key, after=0):
        return torch.tensor([r[key] for r in records if key in r and r["step"] > after])

    for key in ("loss", "grad_norm", "val_loss"):
        torch.testing.assert_close(series(got["fresh"], key), series(single, key), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(series(got["resumed"], key), series(single, key, after=3), rtol=1e-5,
                                   atol=1e-5)
    ep_model = load_model(tmp_path / "ep")  # the gathered single-process layout
    assert model.layers[0].ffn.router.bias.abs().sum() > 0  # the bias balancing was active
    for k, w in model.state_dict().items():
        torch.testing.assert_close(ep_model.state_dict()[k], w, rtol=1e-4, atol=1e-5, msg=k)
