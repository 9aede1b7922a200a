"""Random streams per purpose, so two arms with the same seed differ only in their factor.

torch's dropout has no ``generator=`` argument: it draws from the process-wide generator (CPU, or
the CUDA device's). Left alone, anything one arm draws and another does not (building a weighting
encoder, running its dropout) shifts every later dropout mask of the main encoder, and "paired
seeds" stop sharing their noise. :class:`RngStreams` keeps one generator state per purpose,
derived from the trial seed with :class:`numpy.random.SeedSequence`, and swaps it in around the
code that draws from it::

    rng = RngStreams(seed=3, device=torch.device("cpu"))
    with rng.use("dropout"):
        logits, cls = model(ids, mask)   # the main encoder's masks: the same in a CE and an LCL arm

The batch order is its own stream already (:func:`lcl_tune.core.data.batch_indices`, a function
of ``(seed, epoch)``). The states are plain byte tensors, so a checkpoint holds them and
``torch.load(weights_only=True)`` reads them back.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

from lcl_tune.util import log

STREAMS = ("init", "weighting_init", "dropout", "weighting_dropout")
"""``init``: the main model's initialisation (its head, or a random-init encoder); ``weighting_init``:
the weighting network's; ``dropout``: the main model's forward passes; ``weighting_dropout``: the
weighting network's forward passes."""


def stream_seeds(seed: int) -> dict[str, int]:
    """One 63-bit seed per stream, independent of each other and of every other trial seed."""
    children = np.random.SeedSequence(int(seed)).spawn(len(STREAMS))
    return {name: int(c.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)) for name, c in zip(STREAMS, children)}


class RngStreams:
    """The generator states of :data:`STREAMS` for one trial on ``device``.

    On CUDA each stream holds the CPU state and the trial device's state (dropout on the GPU
    draws from the latter); on CPU only the CPU state.
    """

    def __init__(self, seed: int, device: torch.device):
        self.device = device
        self.states: dict[str, dict[str, torch.Tensor | None]] = {
            name: self._fresh(s) for name, s in stream_seeds(seed).items()}

    def _fresh(self, seed: int) -> dict[str, torch.Tensor | None]:
        cuda = None
        if self.device.type == "cuda":
            cuda = torch.Generator(device=self.device).manual_seed(seed).get_state()
        return {"cpu": torch.Generator().manual_seed(seed).get_state(), "cuda": cuda}

    @contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Draw from stream ``name`` inside the block; the process-wide state is put back after."""
        st = self.states[name]
        outer_cpu = torch.get_rng_state()
        torch.set_rng_state(st["cpu"])
        outer_cuda = None
        if st["cuda"] is not None:
            outer_cuda = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(st["cuda"], self.device)
        try:
            yield
        finally:
            st["cpu"] = torch.get_rng_state()
            torch.set_rng_state(outer_cpu)
            if outer_cuda is not None:
                st["cuda"] = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_cuda, self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"device": self.device.type, "streams": {n: dict(s) for n, s in self.states.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore every stream. States are moved to the CPU first (set_rng_state accepts nothing
        else), so a checkpoint loaded with any ``map_location`` restores. A CUDA state restores only
        on a CUDA trial; a checkpoint from the other kind of device keeps the fresh stream for it,
        with a warning: the weights and the optimiser continue exactly, the dropout noise does not."""
        saved = state.get("streams")
        if not saved:
            log.warning("checkpoint has no per-purpose random streams (an older version): continuing "
                        "with fresh ones, so dropout will not match an uninterrupted run")
            return
        foreign = False
        for name, st in saved.items():
            if name not in self.states:
                continue
            self.states[name]["cpu"] = _byte_tensor(st["cpu"])
            if self.device.type == "cuda" and st.get("cuda") is not None:
                self.states[name]["cuda"] = _byte_tensor(st["cuda"])
            elif (self.device.type == "cuda") != (st.get("cuda") is not None):
                foreign = True
        if foreign:
            log.warning(f"checkpoint written on {state.get('device', '?')} restored on {self.device.type}: "
                        "the GPU dropout streams start afresh (weights and optimiser continue exactly)")


def _byte_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.uint8).contiguous()
