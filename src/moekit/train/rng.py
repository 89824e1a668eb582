"""Every random number generator a training step draws from (torch CPU, each device's, Python, NumPy), as
JSON-ready values, and what a resumed rank restores.

Each rank keeps its own streams (dropout and router noise differ per rank once a rank has drawn a different
number of values), so each rank saves and restores its own. A resumed rank r restores the state saved by
rank r; a rank the checkpoint has no state for (resumed at a larger world size) is seeded from
(step, rank), so a run resumed at the same layout twice draws the same numbers both times.
"""

from __future__ import annotations

import base64
import logging
import random
from collections.abc import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


# Per-device generators (CUDA, XPU, ...): device support registers kind -> (get_all, set_all) here, where
# get_all() returns one ByteTensor state per device; rng_state saves them under "devices"[kind].
DEVICE_RNG: dict[str, tuple[Callable[[], list[torch.Tensor]], Callable[[list[torch.Tensor]], None]]] = {}
if torch.cuda.is_available():  # dropout and router noise on a GPU draw from its generator
    DEVICE_RNG["cuda"] = (torch.cuda.get_rng_state_all, torch.cuda.set_rng_state_all)


def rng_state() -> dict:
    """This process's generators, as JSON-ready values."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": _b64(torch.get_rng_state()), "python": [version, list(mt), gauss],
            "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "devices": {kind: [_b64(t) for t in get()] for kind, (get, _) in DEVICE_RNG.items()}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    for kind, states in state.get("devices", {}).items():
        if kind in DEVICE_RNG:  # saved on a device this process does not use: nothing to restore
            DEVICE_RNG[kind][1]([_unb64(s) for s in states])


def reseed(step: int, rank: int) -> None:
    """Seed every generator from (step, rank): torch.manual_seed seeds the CPU and every device generator."""
    seed = step * 1_000_003 + rank
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def resume_rng(saved: dict | None, step: int, rank: int, saved_ranks: int, ranks: int) -> None:
    """Rank ``rank`` of ``ranks`` resumes a checkpoint of step ``step`` saved by ``saved_ranks`` ranks: it
    continues its saved streams (``saved``: saved rank ``rank``'s ``rng_state()``) or, if there is none,
    starts streams seeded from (step, rank). Rank 0 logs what a change of world size does."""
    note = resharding_note(saved_ranks, ranks)
    if note and rank == 0:
        log.warning(note)
    if saved is not None:
        set_rng_state(saved)
    else:
        reseed(step, rank)


def resharding_note(saved_ranks: int, ranks: int) -> str | None:
    """The log line saying what a resume at another world size does to the RNG streams (None: same size)."""
    if saved_ranks == ranks:
        return None
    if ranks < saved_ranks:
        dropped = f"saved rank {ranks}" if saved_ranks == ranks + 1 else f"saved ranks {ranks}-{saved_ranks - 1}"
        return (f"resuming {saved_ranks} ranks' checkpoint at {ranks}: rank r continues saved rank r's RNG "
                f"streams; the streams of {dropped} are not used")
    fresh = f"rank {saved_ranks}" if ranks == saved_ranks + 1 else f"ranks {saved_ranks}-{ranks - 1}"
    return (f"resuming {saved_ranks} ranks' checkpoint at {ranks}: rank r continues saved rank r's RNG streams; "
            f"{fresh} start new streams seeded from (step, rank)")
