"""A training run's decoder layers replayed as CUDA graphs: torch.cuda.make_graphed_callables, captured at the first
training step.

A step of a small base waits on the host launching its kernels (~8,000 for the embedded base), not on the GPU. Each
decoder layer's forward and backward are captured once, for the first step's batch shape, and every later step of that
shape replays them: one launch a layer each way. The trainer pads every batch to one length (`fixed_length`) so that
every full step has that shape; any other call of a layer (evaluation, generation, a short last batch, an unexpected
argument) runs it as it is. Nothing is traced or compiled, so the capture costs the same on a fresh machine as on one
that trained before (torch.compile's CUDA graphs needed 10-30 s of compiling first, docs/training.md).
"""

from __future__ import annotations

import functools
import logging
import time

log = logging.getLogger("training")

# Arguments a Llama-family decoder layer is handed in training and does not compute with (the attention reads the
# rotary embeddings, not the positions); any other one that is set (not None or False: no cache, no attentions
# returned) sends the call to the layer's own forward.
UNUSED = {"position_ids", "cache_position", "num_items_in_batch"}
PAD_MULTIPLE = 64  # the fixed length is rounded up to this: the matmul kernels' tiles


def fixed_length(lengths, multiple: int = PAD_MULTIPLE) -> int:
    """The one length every batch is padded to: the longest chat's, rounded up to `multiple`."""
    return -(-max(lengths) // multiple) * multiple


def sdpa_attention(layer) -> bool:
    """Whether the layer attends with sdpa, whose masks are booleans (True where a token may attend): a causal one then
    stands in exactly for no mask at all. Another attention's mask (eager's is added to the scores) is left alone."""
    config = getattr(getattr(layer, "self_attn", None), "config", None)
    return getattr(config, "_attn_implementation", None) == "sdpa"


def layer_call(layer, forward):
    """The layer as make_graphed_callables takes it: positional tensors in, the layer's parameters its own."""
    import torch

    class LayerCall(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer  # registers its parameters as this module's: the graph's inputs and gradients

        def forward(self, hidden, mask, cos, sin):
            return forward(hidden, attention_mask=mask, position_embeddings=(cos, sin))

    return LayerCall()


class GraphedLayers:
    """Installs itself as each layer's forward; `release()` gives the layers their own back and frees the graphs.

    `make_graphed` is torch.cuda.make_graphed_callables; tests hand in a stand-in to run the same path on the CPU.
    """

    def __init__(self, layers, make_graphed=None):
        import torch

        self.layers = list(layers)
        self.own = [layer.forward for layer in self.layers]
        self.wrapped = ["forward" in vars(layer) for layer in self.layers]  # e.g. by accelerate's hooks: kept
        self.make_graphed = make_graphed or torch.cuda.make_graphed_callables
        self.calls = self.shape = None
        self.needs_grad: list[bool] = []
        self.hooks = []
        self.masks = {}
        self.bool_masks = sdpa_attention(self.layers[0])
        self.replays = 0
        for i, layer in enumerate(self.layers):
            layer.forward = functools.partial(self.forward, i)

    def forward(self, i, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
        import torch

        unset = all(name in UNUSED or value is None or value is False for name, value in kwargs.items())
        training = unset and torch.is_grad_enabled() and self.layers[i].training
        if training and attention_mask is None and self.bool_masks and hidden_states.dim() == 3:
            # a batch that needs no padding (every chat cut at max_length) gets the causal mask the padded ones have
            attention_mask = self.causal(*hidden_states.shape[:2], hidden_states.device)
        shape = self.shape_of(hidden_states, attention_mask, position_embeddings)
        if shape is not None and training:
            if self.calls is None and i == 0:
                self.capture(hidden_states, attention_mask, *position_embeddings)
            if shape == self.shape and hidden_states.requires_grad == self.needs_grad[i]:
                self.replays += i == 0
                return self.calls[i](hidden_states, attention_mask, *position_embeddings)
        return self.own[i](hidden_states, attention_mask=attention_mask, position_embeddings=position_embeddings,
                           **kwargs)

    def causal(self, batch: int, length: int, device):
        import torch

        key = (batch, length, device)
        if key not in self.masks:
            # whole, not expanded: a graph captured with it copies each batch's mask into it
            self.masks[key] = torch.ones(batch, 1, length, length, dtype=torch.bool, device=device).tril()
        return self.masks[key]

    @staticmethod
    def shape_of(hidden, mask, position_embeddings):
        import torch

        if not (isinstance(mask, torch.Tensor) and isinstance(position_embeddings, tuple)
                and len(position_embeddings) == 2):
            return None  # another attention's arguments: not what was captured
        return tuple((tuple(t.shape), t.dtype, t.device) for t in (hidden, mask, *position_embeddings))

    def capture(self, hidden, mask, cos, sin) -> None:
        import torch

        started = time.perf_counter()
        calls, samples, upstream = [], [], hidden.requires_grad
        for layer, own in zip(self.layers, self.own):
            # a layer's input needs a gradient once any layer before it has a trainable parameter
            samples.append((hidden.detach().clone().requires_grad_(upstream), mask, cos, sin))
            self.needs_grad.append(upstream)
            upstream = upstream or any(p.requires_grad for p in layer.parameters())
            calls.append(layer_call(layer, own))
        self.calls = self.make_graphed(tuple(calls), tuple(samples))
        self.shape = self.shape_of(hidden, mask, (cos, sin))
        # A graph hands back each gradient in its own static buffer, which autograd would take as the parameter's
        # .grad and the next replay overwrite: a copy keeps a gradient accumulated over several batches whole.
        self.hooks = [p.register_hook(torch.clone) for layer in self.layers for p in layer.parameters()
                      if p.requires_grad]
        log.info("decoder layers captured as CUDA graphs for batches of %s tokens in %.1f s",
                 " x ".join(map(str, hidden.shape[:2])), time.perf_counter() - started)

    def release(self) -> None:
        for layer, own, wrapped in zip(self.layers, self.own, self.wrapped):
            if wrapped:
                layer.forward = own
            else:
                del layer.forward  # the class's own forward again
        for hook in self.hooks:
            hook.remove()
        self.calls = self.hooks = self.masks = None


def graphed_layers(layers):
    """GraphedLayers over `layers` as a trainer callback: installed now, released when training ends."""
    from transformers import TrainerCallback  # here, not at the top: Unsloth must be imported before transformers

    graphs = GraphedLayers(layers)

    class Release(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            log.info("decoder layers replayed as CUDA graphs in %d of %d steps' batches", graphs.replays,
                     state.global_step * args.gradient_accumulation_steps)
            graphs.release()

    return Release()
