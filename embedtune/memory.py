"""Peak memory of a span of work (an epoch, a probe step), and whether a training config fits the
GPU share a trial asks for.

Accelerator: torch's peak counters (`max_memory_reserved`: what the caching allocator really held
from the device; `max_memory_allocated`: what tensors used), reset at the start of each span.
Host: the kernel's resident-set high-water mark (VmHWM), reset through /proc/self/clear_refs (Linux
>= 4.0); where that is refused, the process's lifetime peak (getrusage) stands in.
"""

from __future__ import annotations

import logging
import resource
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)

MB = 2**20
GIB = 2**30
MARGIN = 0.10  # of the GPU share, kept free for the CUDA context, fragmentation and evaluation


def _vm_hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_vm_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets the peak RSS to the current RSS
        return True
    except OSError:
        return False


def _lifetime_peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class PeakMemory:
    """`reset()` at the start of a span, `read()` at its end: peak host RSS and, on CUDA, peak
    device memory of the span, in MiB, as the per-epoch metrics a trial reports."""

    def __init__(self, device: str) -> None:
        self.cuda = str(device).startswith("cuda")
        self.exact_rss = False

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self.exact_rss = _reset_vm_hwm()

    def peak_rss_bytes(self) -> int:
        hwm = _vm_hwm_bytes() if self.exact_rss else None
        return hwm if hwm is not None else _lifetime_peak_rss_bytes()

    def peak_gpu_bytes(self) -> int | None:
        """Peak bytes the caching allocator reserved on the device in the span (None off CUDA)."""
        if not self.cuda:
            return None
        import torch

        return int(torch.cuda.max_memory_reserved())

    def read(self) -> dict[str, float]:
        out = {"system/peak_rss_mb": self.peak_rss_bytes() / MB}
        if self.cuda:
            import torch

            out["system/peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / MB
            out["system/peak_gpu_reserved_mb"] = self.peak_gpu_bytes() / MB
        return out


# ---------------------------------------------------------------- does a config fit its GPU share


@dataclass(frozen=True)
class ProbeKey:
    """What a training step's memory depends on (one probe step each)."""

    model: str
    batch_size: int
    max_seq_length: int | None
    loss: str
    mini_batch_size: int
    gradient_checkpointing: bool
    hard_negatives: bool
    fp16: bool

    def describe(self) -> str:
        loss = (
            f"{self.loss} (mini_batch_size {self.mini_batch_size})"
            if self.loss.startswith("cached_")
            else self.loss
        )
        return (
            f"{self.model} at batch_size {self.batch_size}, max_seq_length {self.max_seq_length}, loss {loss}, "
            f"gradient_checkpointing {str(self.gradient_checkpointing).lower()}"
        )


def gpu_cap_fraction(gpu_share: float) -> float | None:
    """The fraction of its GPU a trial's process may allocate: its share, when it shares the device
    with other trials (0 < share < 1); None (no cap) for a whole GPU or more, or no GPU."""
    return gpu_share if 0 < gpu_share < 1 else None


def cap_gpu_memory(gpu_share: float) -> float | None:
    """Hold this process's CUDA caching allocator to its GPU share
    (`torch.cuda.set_per_process_memory_fraction`), so a trial that outgrows its share fails with
    an out-of-memory error of its own instead of starving the trials beside it on the device.
    Returns the fraction set, or None (no CUDA, or no sharing)."""
    fraction = gpu_cap_fraction(gpu_share)
    if fraction is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    # Ray gives the trial one visible device (CUDA_VISIBLE_DEVICES): device 0 is its GPU.
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    log.debug("GPU memory of this process capped at %.0f%% of the device (its share)", fraction * 100)
    return fraction


def gpu_budget_bytes(device_total_bytes: int, fraction: float, margin: float = MARGIN) -> int:
    """Bytes a trial asking for `fraction` of a device (whole devices: one each) may use."""
    return int(device_total_bytes * min(fraction, 1.0) * (1 - margin))


def fits(peak_bytes: int, device_total_bytes: int, fraction: float, margin: float = MARGIN) -> bool:
    return peak_bytes <= gpu_budget_bytes(device_total_bytes, fraction, margin)


def refusal(key: ProbeKey, peak_bytes: int, device_total_bytes: int, fraction: float, device_name: str = "GPU",
            margin: float = MARGIN, out_of_memory: bool = False) -> str | None:  # fmt: skip
    """None when the probed peak fits the trial's GPU share; else one line naming the spec keys
    that lower it. `out_of_memory`: the step did not fit the whole device (its peak is a lower bound)."""
    if not out_of_memory and fits(peak_bytes, device_total_bytes, fraction, margin):
        return None
    budget = gpu_budget_bytes(device_total_bytes, fraction, margin)
    cached = (
        f"train.mini_batch_size below {key.mini_batch_size}"
        if key.loss.startswith("cached_")
        else f"train.loss: cached_{'gist' if key.loss == 'gist' else 'mnrl'} with train.mini_batch_size: 16 or 32"
    )
    gc = "" if key.gradient_checkpointing else ", train.gradient_checkpointing: true"
    more = ", a larger resources.gpu" if fraction < 1 else ""
    return (
        f"memory probe: {key.describe()} "
        + (
            f"ran out of memory at {peak_bytes / GIB:.1f} GiB"
            if out_of_memory
            else f"peaked at {peak_bytes / GIB:.1f} GiB"
        )
        + f" on the {device_name}, more than "
        f"resources.gpu {fraction:g} x {device_total_bytes / GIB:.1f} GiB less {margin:.0%} = {budget / GIB:.1f} "
        f"GiB; change one of: {cached}{gc}, a smaller search.batch_size, a smaller train.max_seq_length{more}"
    )
