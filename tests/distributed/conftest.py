import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The single-process references run beside spawned workers on 2 cores: with 2 intra-op threads each,
    OpenMP spin-waiting under oversubscription made a tiny training run 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
