import torch

from moekit.analysis.report import inspect_model
from moekit.config import ModelConfig, MoEConfig, RouterConfig
from moekit.models.decoder import MoETransformer
from moekit.train.data import Corpus, TokenStream
from moekit.train.tokenizer import train_bpe


def test_inspect_renders_every_plot_and_a_report(tmp_path):
    torch.manual_seed(0)
    tok = train_bpe(["def f(x):\n    return x + 1\n" * 50, "class A:\n    pass\n" * 50], 300)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=3, n_heads=4, max_seq_len=64,
                      moe_layers="every_other",
                      moe=MoEConfig(d_model=32, num_experts=4, expert_hidden=32, router=RouterConfig(top_k=2)))
    model = MoETransformer(cfg)
    stream = TokenStream(torch.randint(0, tok.vocab_size, (2000,)))
    corpus = Corpus(tok, stream, stream, [], [], "random tokens")
    report = inspect_model(model, corpus, tmp_path, batches=2, batch_size=2, seq_len=16)
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    n_moe = 1  # layers 1 only ("every_other" of 3 layers)
    assert pngs == sorted(["load_heatmap.png", "capacity_sweep.png"] + [f"load_layer{i}.png" for i in range(n_moe)]
                          + [f"coactivation_layer{i}.png" for i in range(n_moe)])
    assert all((tmp_path / p).stat().st_size > 1000 for p in pngs)
    text = report.read_text()
    assert "layers.1.ffn.router" in text and "| layer 0 |" in text and "- expert 3:" in text
