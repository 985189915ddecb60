"""Whole training steps replayed as CUDA graphs: forward, backward, clipping and AdamW in one launch.

At small batches the GPU finishes a step faster than Python can issue its ~1,000 kernels (benchmarks/NOTES.md,
entries 6-11), so the step is recorded once per batch shape and replayed: a replay is one launch, whatever the
step holds. ``torch.compile(mode="reduce-overhead")`` graphs the model alone and leaves the optimizer, the
clipping and the guards on the host; this graphs everything the step does.

What a captured step needs, and how it gets it:

* fixed addresses: each batch is copied into the graph's own input tensors, and outputs are copied out at once;
* a learning-rate schedule that reaches the replays: the lr becomes a device tensor that the scheduler fills
  (``use_tensor_lr``), and AdamW runs ``capturable`` (its step count on the device too);
* no host sync inside the step (capture fails loudly if there is one) and no Python value that changes between
  batches of one shape: counts that the step reads (``n_pairs``) are part of the graph's key, counts that only
  the host reads (``n_targets``) are not.

A new shape is first run once without an optimiser step (compilation, lazy initialisation, cuBLAS workspaces), then
captured and replayed, so capturing changes nothing in the training: every update comes from the same kernels
on the same batch as an eager step. All graphs share one memory pool. On a CPU the step simply runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from minialign.base.devices import to_device
from minialign.training.optim import InBackwardAdamW

ForwardBackward = Callable[[list[dict], torch.Tensor], dict[str, torch.Tensor]]  # (batches, loss scale) -> sums
Update = Callable[[], torch.Tensor]  # clip and step the optimizer; returns the gradient norm
HOST_ONLY = frozenset({"n_targets", "n_tokens"})  # batch entries the step never reads: not part of a graph's key


def use_tensor_lr(optimizer: torch.optim.Optimizer, device: torch.device, capturable: bool = True) -> None:
    """Make every group's lr a device tensor (filled in place by the scheduler) and the optimizer capturable.

    Run after loading a checkpoint: ``load_state_dict`` puts the saved float lr back.
    """
    for group in optimizer.param_groups:
        lr = group["lr"]
        group["lr"] = lr if torch.is_tensor(lr) else torch.tensor(float(lr), dtype=torch.float32, device=device)
        group["capturable"] = capturable


def plain_lr(state: dict) -> dict:
    """An optimizer ``state_dict`` with float lrs and ``capturable`` off, so checkpoints look alike with or without graphs."""
    for group in state["param_groups"]:
        if torch.is_tensor(group.get("lr")):
            group["lr"] = float(group["lr"])
        if "capturable" in group:
            group["capturable"] = False
    return state


class GraphedStep:
    """``step(batches, scale) -> (sums, grad_norm)`` that replays one CUDA graph per batch shape.

    ``batches`` are host batches: a replay copies them straight into the graph's own input tensors (through pinned
    memory), an eager step moves them to the device as usual. ``forward_backward`` accumulates the gradient of the
    summed loss times ``scale`` and returns summed metrics; ``update`` clips, steps the optimizer and returns the
    gradient norm. Gradients are set to None before each step: inside a capture, backward then allocates them from
    the graph's pool, where every replay rewrites them.
    """

    def __init__(self, forward_backward: ForwardBackward, update: Update, optimizer: torch.optim.Optimizer,
                 device: torch.device, *, enabled: bool = True, warm_up: bool = True):
        self.forward_backward, self.update, self.optimizer = forward_backward, update, optimizer
        self.warm_up = warm_up  # every new shape (compiled code); else only the first capture
        self.device = device
        self.enabled = enabled and device.type == "cuda"
        if self.enabled and isinstance(optimizer, InBackwardAdamW):  # the config refuses it; bench.measure does not read it
            raise ValueError("CUDA graphs cannot record an optimizer stepped inside backward: its hooks free each "
                             "gradient as it is made")
        self.graphs: dict[tuple, _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.enabled else None
        self.stream = torch.cuda.Stream(device) if self.enabled else None
        if self.enabled:
            use_tensor_lr(optimizer, device)

    def __call__(self, batches: list[dict], scale: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if not self.enabled or len(batches) != 1:
            return self._eager([to_device(b, self.device) for b in batches], scale)
        key = graph_key(batches[0])
        captured = self.graphs.get(key)
        if captured is None:
            if not self.optimizer.state:  # the very first step creates AdamW's moments: run it eagerly
                return self._eager([to_device(batches[0], self.device)], scale)
            captured = self.graphs[key] = self._capture(batches[0])
        return captured.replay(batches[0], scale)

    def prepare(self, batch: dict) -> None:
        """Capture ``batch``'s shape now (it is not trained on), so the first step of that shape is a replay."""
        key = graph_key(batch)
        if self.enabled and key not in self.graphs and self.optimizer.state:
            self.graphs[key] = self._capture(batch)

    def _eager(self, batches: list[dict], scale: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)  # after a replay, the gradients are the graph's
        sums = self.forward_backward(batches, scale)
        grad_norm = self.update()
        self.optimizer.zero_grad(set_to_none=True)
        return sums, grad_norm

    def _capture(self, batch: dict) -> _Captured:
        inputs = to_device(batch, self.device)  # the graph's own input tensors
        scale = torch.ones((), device=self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if self.warm_up or not self.graphs:
            with torch.cuda.stream(self.stream):
                # Warm-up without an update: compiles this shape and initialises whatever is lazy (cuBLAS workspaces,
                # kernel caches), outside the capture. Eager code needs it once only: later shapes run the same kernels.
                self.optimizer.zero_grad(set_to_none=True)
                self.forward_backward([inputs], scale)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        # No gradient may exist when the capture starts: after another graph's replay, p.grad is that graph's buffer,
        # and a backward recorded on top of it would add this step's gradient to whatever that buffer last held, at
        # every replay (a stale running sum, not the step's gradient). Set to None, backward records fresh writes.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            sums = self.forward_backward([inputs], scale)
            grad_norm = self.update()
            names = sorted(sums)
            outputs = torch.stack([sums[k].float() for k in names] + [grad_norm.float()])
        return _Captured(graph, inputs, scale, names, outputs)


class _Captured:
    """One recorded step: its input tensors, its loss scale and its packed outputs (metric sums, then grad norm)."""

    def __init__(self, graph, inputs: dict, scale: torch.Tensor, names: list[str], outputs: torch.Tensor):
        self.graph, self.inputs, self.scale, self.names, self.outputs = graph, inputs, scale, names, outputs

    def replay(self, batch: dict, scale: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        for k, v in batch.items():
            if torch.is_tensor(v):
                self.inputs[k].copy_(v.pin_memory(), non_blocking=True)
        self.scale.fill_(scale)
        self.graph.replay()
        out = self.outputs.clone()  # the next replay overwrites the graph's own outputs
        return dict(zip(self.names, out[:-1])), out[-1]


def graph_key(batch: dict) -> tuple:
    """What fixes a captured step: every tensor's shape and dtype, and every Python value the step may read."""
    return tuple(sorted(
        (k, (tuple(v.shape), v.dtype) if torch.is_tensor(v) else v)
        for k, v in batch.items() if k not in HOST_ONLY
    ))
