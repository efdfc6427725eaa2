"""Activation offload: the inputs of checkpointed layers wait in host memory for the backward.

With activation checkpointing a layer keeps only its input between forward and backward, [T, H]
per layer: at 128K tokens that is 720 MiB per GPT-OSS layer in bf16, 17 GiB over 20B's 24 layers.
Offloaded, each input is copied to pinned host memory on a side stream as soon as the forward has
made it (the copy overlaps the next layers' compute), and comes back on that stream during the
backward: when layer i starts its backward it also starts fetching layer i-1's input, so the copy
overlaps layer i's recompute and backward. On CPU the "host copy" is a plain copy (the path runs,
nothing is saved).

The layer is recomputed from its input in the backward as torch's checkpoint does; the function
takes the layer's trainable parameters as inputs, so gradients reach them even when the layer
input itself needs none (the first layer under LoRA).
"""

from __future__ import annotations

import contextlib

import torch

_copy_streams: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _copy_streams:
        _copy_streams[device] = torch.cuda.Stream(device)
    return _copy_streams[device]


class _Stash:
    """One layer input: sent to the host at construction, brought back by `fetch` / `get`."""

    def __init__(self, x: torch.Tensor, prev: "_Stash | None"):
        self.device, self.prev = x.device, prev
        self._back = self._arrived = None
        if x.device.type == "cuda":
            stream = _copy_stream(x.device)
            stream.wait_stream(torch.cuda.current_stream(x.device))  # x is complete before it is copied
            self.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            with torch.cuda.stream(stream):
                self.host.copy_(x, non_blocking=True)
                self._sent = stream.record_event()
            x.record_stream(stream)  # x's memory is not reused before the copy has read it
        else:
            self.host = x.detach().clone()

    def fetch(self) -> None:
        """Start the copy back to the device (no-op when started already)."""
        if self._back is not None or self.host is None:
            return
        if self.device.type != "cuda":
            self._back = self.host
            return
        stream = _copy_stream(self.device)
        stream.wait_event(self._sent)
        with torch.cuda.stream(stream):
            self._back = self.host.to(self.device, non_blocking=True)
            self._arrived = stream.record_event()

    def get(self) -> torch.Tensor:
        self.fetch()
        x, self._back, self.host = self._back, None, None
        if self.device.type == "cuda":
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self._arrived)
            x.record_stream(current)
        return x


def _autocast_of(device: torch.device):
    kind = device.type
    if torch.is_autocast_enabled(kind):
        return torch.autocast(kind, dtype=torch.get_autocast_dtype(kind))
    return contextlib.nullcontext()


class _OffloadedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, stash, x, *params):
        ctx.fn, ctx.stash, ctx.params = fn, stash, params
        ctx.autocast = _autocast_of(x.device)
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, grad):
        x = ctx.stash.get()
        if ctx.stash.prev is not None:
            ctx.stash.prev.fetch()  # the layer below's input travels while this layer recomputes
        x = x.detach().requires_grad_(ctx.needs_input_grad[2])
        with torch.enable_grad(), ctx.autocast:
            y = ctx.fn(x)
        wanted = ([x] if x.requires_grad else []) + list(ctx.params)
        grads = list(torch.autograd.grad(y, wanted, grad, allow_unused=True))
        dx = grads.pop(0) if x.requires_grad else None
        return (None, None, dx, *grads)


class OffloadChain:
    """The offloaded layers of one forward, in order (each backward prefetches the one before)."""

    def __init__(self):
        self._last: _Stash | None = None

    def run(self, fn, x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        """fn(x) for a layer `module`, keeping x in host memory and recomputing fn in the backward."""
        self._last = stash = _Stash(x, self._last)
        params = [p for p in module.parameters() if p.requires_grad]
        return _OffloadedLayer.apply(fn, stash, x, *params)
