"""Page-locked (pinned) host buffers for the copies between host and device that every step makes, allocated once.

``Tensor.pin_memory()`` and ``torch.empty(..., pin_memory=True)`` draw from PyTorch's caching host allocator, which
calls ``cudaHostAlloc`` whenever no cached block of the size class is free. That call is slow and can hold the host
while the driver pins pages: vLLM removed per-step ``pin_memory()`` for stalls of up to 12 ms
(vllm-project/vllm#37006). W6's step records (docs/benchmarks.md, tenth session) show such stalls while its batch
grows through new sizes: steps of twice the usual time, each followed by one of almost none. A step's inputs change
size every step, so they go through rings of buffers allocated at start-up instead.
"""
import numpy as np
import torch

from engine.logger import get_logger

logger = get_logger(__name__)


class UploadRing:
    """Host-to-device copies through ``slots`` pinned buffers of ``nbytes`` each, used in turn. A buffer is written
    again only once the copy that last read it has run (its event; with more slots than a few steps' uploads it
    always has by then)."""

    def __init__(self, device: torch.device, slots: int, nbytes: int):
        self.device = device
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
        self.copied = [torch.cuda.Event() for _ in range(slots)]  # (waiting on one never recorded returns at once)
        self.next = 0

    def upload(self, flat: np.ndarray) -> torch.Tensor:
        """``flat`` (one dimension) on the device; the copy is queued, not waited for."""
        i = self.next
        self.next = (i + 1) % len(self.buffers)
        self.copied[i].synchronize()
        if flat.nbytes > self.buffers[i].numel():
            logger.debug("Upload of %d bytes exceeds its pinned buffer of %d; growing it", flat.nbytes,
                         self.buffers[i].numel())
            self.buffers[i] = torch.empty(2 * flat.nbytes, dtype=torch.uint8, pin_memory=True)
        source = torch.from_numpy(flat)
        staged = self.buffers[i][:flat.nbytes].view(source.dtype)
        staged.copy_(source)
        out = staged.to(self.device, non_blocking=True)
        self.copied[i].record()
        return out


class DownloadRing:
    """Device-to-host copies into ``slots`` pinned buffers of ``nbytes`` each, used in turn. A buffer is written
    again ``slots`` copies later; the caller reads each copy (after its step's event) before then, which holds when
    ``slots`` exceeds the copies of the steps in flight."""

    def __init__(self, slots: int, nbytes: int):
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(slots)]
        self.next = 0

    def download(self, x: torch.Tensor) -> torch.Tensor:
        """A pinned host tensor that ``x`` (contiguous) is being copied into; complete once the stream reaches
        the copy."""
        i = self.next
        self.next = (i + 1) % len(self.buffers)
        nbytes = x.numel() * x.element_size()
        if nbytes > self.buffers[i].numel():
            self.buffers[i] = torch.empty(2 * nbytes, dtype=torch.uint8, pin_memory=True)
        host = self.buffers[i][:nbytes].view(x.dtype).view(x.shape)
        return host.copy_(x, non_blocking=True)
