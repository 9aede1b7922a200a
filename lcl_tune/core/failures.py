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


# How a failed allocation reads, whichever layer reports it: PyTorch's caching allocator raises
# torch.cuda.OutOfMemoryError, but on a GPU shared with other processes cuBLAS, cuDNN or the CUDA
# runtime itself may be the first to fail, with a plain RuntimeError.
OOM_MARKERS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "OutOfMemoryError",
               "TrialOutOfMemory")


def is_oom(error: BaseException | str) -> bool:
    """Whether ``error`` (an exception or its text) says the accelerator ran out of memory."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return any(marker.lower() in text.lower() for marker in OOM_MARKERS)


@contextmanager
def oom_is_a_resource_problem(gpu: float, batch_size: int) -> Iterator[None]:
    """Report running out of GPU memory as what it is (a GPU share or batch too large), not as a
    bad config."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, TrialOutOfMemory) or not is_oom(e):
            raise
        first = str(e).splitlines()[0] if str(e) else "CUDA out of memory"
        raise TrialOutOfMemory(
            f"out of GPU memory (resources.gpu={gpu} per trial, train.batch_size={batch_size}): {first}. Retried "
            "from the last checkpoint; if it keeps failing, give each trial a larger GPU share or a smaller batch") from e


def error_kind(text: str) -> str:
    """``out of memory`` (a resource problem, retried) vs ``exception`` (look at the traceback);
    ``""`` when there is no error text."""
    if not text:
        return ""
    return "out of memory" if is_oom(text) else "exception"
