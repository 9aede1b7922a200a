"""What a failed trial was: out of accelerator memory (a resource problem, retried) or an exception.

In the core, without Ray, so the GPU check (``benchmarks/gpu_faults.py``, which runs where Ray is
not installed) classifies a real CUDA out-of-memory error exactly as a study does.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class TrialOutOfMemory(RuntimeError):
    """The accelerator ran out of memory: a resource problem (too many trials on one GPU, too large a
    batch), not a bad configuration. Ray retries the trial from its last checkpoint."""


@contextmanager
def oom_is_a_resource_problem(gpu: float, batch_size: int) -> Iterator[None]:
    """Report CUDA out-of-memory as what it is (a GPU share or batch too large), not as a bad config."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as e:
        first = str(e).splitlines()[0] if str(e) else "CUDA out of memory"
        raise TrialOutOfMemory(
            f"out of GPU memory (resources.gpu={gpu} per trial, train.batch_size={batch_size}): {first}. Retried "
            "from the last checkpoint; if it keeps failing, give each trial a larger GPU share or a smaller batch") from e


def error_kind(text: str) -> str:
    """``out of memory`` (a resource problem, retried) vs ``exception`` (look at the traceback);
    ``""`` when there is no error text."""
    if not text:
        return ""
    return "out of memory" if ("TrialOutOfMemory" in text or "OutOfMemoryError" in text) else "exception"
