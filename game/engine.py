"""Generation for every player at once on one torch model: one base, every case's LoRA stacked beside it.

The torch path of `game.suspect` (a GPU; a CPU without llama.cpp). One worker thread owns the model. Requests from
all players queue up, are prefilled together, then decoded together: one token per step for every active player,
each row of the batch at its own position, with its own case's adapter and its own stop (the model, every case's
LoRA stacked beside one base: game.stacked_lora). The KV of each case's system prompt (and of each conversation so
far) is kept and copied into a new request's row instead of being computed again.

On CUDA each decode step (and each question's prefill) is replayed as a CUDA graph, one per (batch, length, mode)
bucket, of a torch.compile'd layer, and each step is launched before the previous step's tokens are handed out: each
row's next token and position stay on the GPU, where the step writes them. On a CPU it all runs eagerly, one step
after the other. Each falls back to plain eager torch where it fails.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from pathlib import Path

import torch

from game.serving import IDLE_POLL_S, PrefixCache, Request, start_worker
from game.stacked_lora import StackedModel, read_lora

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LENGTH_BUCKET = 256  # the decode step attends over a multiple of this, not over the whole cache
PREFILL_BUCKET = 16  # a prefill runs a multiple of this many tokens per row (the padding's KV is never attended)
PREFILL_GRAPH_TOKENS = 64  # prefills up to this many tokens a row (a question; not a system prompt) replay graphs,
PREFILL_GRAPH_BUCKET = 32  # padded to a multiple of this: with the batch buckets, a few dozen graphs serve them all


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _bucket(n: int, buckets) -> int:
    return next(b for b in buckets if b >= n)


class BatchedEngine:
    """A worker thread generating for every queued request, batched. Thread-safe."""

    draft_tokens = 0  # no guessing (game.drafts): the GPU's spare work goes to other players' rows

    def __init__(self, hf_model, eos: set[int], max_batch: int = 1, max_len: int = 2048, compile: bool | None = None,
                 cuda_graphs: bool | None = None, kv_cache_mb: int | None = None, merge: bool | None = None,
                 overlap: bool | None = None):
        """On a GPU a step is a few hundred tiny kernels, and their launches are what it costs
        (benchmarks/decode_step.py): so by default on CUDA, each decode step and each short prefill is replayed as a
        CUDA graph (no launch from Python), the layer is compiled (torch.compile fuses its elementwise work: ~40%
        fewer kernels), merge keeps a copy of the base with one adapter merged in, for steps that serve that adapter
        alone (no LoRA kernels at all; it costs one more copy of the projection weights), and overlap launches each
        step before handing out the previous step's tokens, so that the GPU does not wait for Python between steps
        (a finished answer costs one step computed in vain). On a CPU, where the arithmetic is the cost, none of
        them pays: plain eager torch."""
        on_cuda = next(hf_model.parameters()).device.type == "cuda"
        self.model = StackedModel(hf_model, max_batch, max_len, merge=on_cuda if merge is None else merge)
        self.eos = eos
        self.device = self.model.device
        self.compile = on_cuda if compile is None else compile
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        self.overlap = on_cuda if overlap is None else overlap
        self.buckets = [b for b in BATCH_BUCKETS if b < max_batch] + [max_batch]
        self._decode, self._prefill = self.model.decode, self.model.prefill
        if self.compile:  # one compiled layer serves every layer (their weights are its arguments), batch and length
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            layer = torch.compile(self.model.layer, dynamic=True)
            self._decode = functools.partial(self.model.decode, layer=layer)
            self._prefill = functools.partial(self.model.prefill, layer=layer)
        self._graphs: dict[tuple, dict] = {}  # ("decode" | "prefill", shapes..., mode, sampling) -> captured step
        self._pool = None
        # where a step's tokens land for the worker to read, two in turn: one being written while the other is read
        self._landing = [torch.zeros(max_batch, dtype=torch.long, pin_memory=on_cuda) for _ in range(2)]
        self._pending: tuple | None = None  # a launched step whose tokens are not handed out yet (overlap)
        self._queue: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._lock = threading.Lock()  # the worker's step vs. load_adapter
        self._rows: list[Request | None] = [None] * max_batch
        self._state: dict[Request, dict] = {}
        if kv_cache_mb is None:
            kv_cache_mb = 4096 if self.device.type == "cuda" else 256
        self._cache = PrefixCache(kv_cache_mb << 20)
        self._waiting: list[Request] = []
        start_worker(self, "suspect-engine")

    @property
    def max_len(self) -> int:
        return self.model.max_len

    def load_adapter(self, name: str, folder: Path) -> None:
        weights = read_lora(folder, self.model.n_layers, self.model.shapes)
        with self._lock:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # a launched step may still read the stacks being replaced
            self.model.set_adapter(name, weights)
            self._graphs.clear()  # they read the old stacks
            self._cache.drop(name)

    def submit(self, request: Request) -> Request:
        if len(request.prompt) + request.max_new_tokens > self.max_len:
            raise ValueError(f"prompt of {len(request.prompt)} tokens is too long for a {self.max_len}-token cache")
        if request.adapter is not None and request.adapter not in self.model.slots:
            raise KeyError(f"no adapter named {request.adapter}")
        self._queue.put(request)
        return request

    def cancel_all(self) -> None:
        """Stop every answer it holds (the interpreter is exiting)."""
        for r in [r for r in list(self._rows) if r is not None] + list(self._waiting):
            r.cancelled.set()

    # --- the worker -----------------------------------------------------------------------------------------------

    def work(self) -> None:
        """Admit what is queued, launch one decode step and hand out the previous one's tokens (or this one's, without
        overlap); when idle, wait a moment for work."""
        active = any(r is not None for r in self._rows)
        try:
            busy = active or self._waiting or self._pending
            self._waiting.append(self._queue.get_nowait() if busy else self._queue.get(timeout=IDLE_POLL_S))
            while True:
                self._waiting.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        if self._waiting or active or self._pending:
            try:
                with self._lock, torch.inference_mode():
                    self._admit()
                    launched = self._launch() if any(r is not None for r in self._rows) else None
                    if self.overlap:
                        launched, self._pending = self._pending, launched
                    if launched is not None:
                        self._hand_out(*launched)
            except Exception as exc:  # fail every request in flight rather than hang the players
                log.exception("generation failed")
                for r in [r for r in self._rows if r is not None] + self._waiting:
                    r.tokens.put(exc)
                self._rows = [None] * len(self._rows)
                self._waiting, self._state, self._pending = [], {}, None

    def _finish(self, request: Request, row: int | None) -> None:
        request.tokens.put(None)
        state = self._state.pop(request, None)
        if row is not None:
            self._rows[row] = None
            if state is not None and not request.background:  # the conversation so far, for its next question
                self._keep(row, request.adapter, (request.prompt + state["tokens"])[:-1])  # the last was never fed

    def _keep(self, row: int, adapter: str | None, tokens: list[int], pin: bool = False) -> None:
        n, model = len(tokens), self.model
        kv = model.keys[:, row, :, :n].clone(), model.values[:, row, :, :n].clone()
        self._cache.put(adapter, tokens, kv, kv[0].nbytes + kv[1].nbytes, pin)

    def _admit(self) -> None:
        """Prefill waiting requests into free rows (all in one batch), and emit their first tokens."""
        for r in [r for r in self._waiting if r.cancelled.is_set()]:
            self._waiting.remove(r)
            self._finish(r, None)
        free = [i for i, r in enumerate(self._rows) if r is None]
        admitted = list(zip(free, self._waiting))
        if not admitted:
            return
        self._waiting = self._waiting[len(admitted):]
        model = self.model
        requests = [r for _, r in admitted]
        starts = []
        for row, r in admitted:
            key, start = self._cache.longest(r.adapter, r.prompt)
            start = min(start, len(r.prompt) - 1)  # at least one token to run, for its logits
            if key is not None and start > 0:
                keys, values = self._cache.get(key)
                model.keys[:, row, :, :start] = keys[:, :, :start]
                model.values[:, row, :, :start] = values[:, :, :start]
            r.cached_tokens = start
            starts.append(start)
        batch, longest = self._prefill_shape(len(admitted), max(len(r.prompt) - s for r, s in zip(requests, starts)))
        tokens = torch.zeros(batch, longest, dtype=torch.long)
        rows = torch.full((batch,), model.scratch)
        for j, ((row, r), s) in enumerate(zip(admitted, starts)):
            tokens[j, :len(r.prompt) - s] = torch.tensor(r.prompt[s:])
            rows[j] = row
        pos0 = torch.tensor(starts + [0] * (batch - len(admitted)))
        last = torch.tensor([len(r.prompt) - s - 1 for r, s in zip(requests, starts)] + [0] * (batch - len(admitted)))
        placed = self._to_device(rows[:len(admitted)])
        model.penalty[placed] = self._to_device(torch.tensor([r.repetition_penalty for r in requests]))
        model.slot[placed] = self._to_device(torch.tensor([model.slots.get(r.adapter, 0) for r in requests]))
        model.sample[placed] = self._to_device(torch.tensor([r.do_sample for r in requests]))
        model.seen[placed] = False
        model.seen[self._to_device(torch.tensor([row for row, r in admitted for _ in r.prompt])),
                   self._to_device(torch.tensor([t for r in requests for t in r.prompt]))] = True
        mode, sampling = self._mode(requests), any(r.do_sample for r in requests)
        kv_len = min(round_up(max(len(r.prompt) for r in requests), LENGTH_BUCKET), model.max_len)
        chosen = self._prefill_step(*map(self._to_device, (tokens, pos0, rows, last)), kv_len, mode, sampling)
        for (row, r), s in zip(admitted, starts):
            if 0 < r.prefix_len < len(r.prompt) and s < r.prefix_len:
                self._keep(row, r.adapter, r.prompt[:r.prefix_len], pin=True)
        for (row, r), token in zip(admitted, chosen[:len(admitted)].tolist()):
            self._rows[row] = r
            self._state[r] = {"pos": len(r.prompt), "tokens": []}
            self._emit(row, r, token)

    def _to_device(self, cpu: torch.Tensor) -> torch.Tensor:
        """A copy on the model's device that does not wait for the steps already launched (a plain copy would)."""
        if self.device.type != "cuda":
            return cpu
        return cpu.pin_memory().to(self.device, non_blocking=True)

    def _mode(self, requests: list[Request | None]) -> str:
        """How a step of these requests applies adapters (a mode of StackedModel.weights)."""
        model = self.model
        adapters = {r.adapter for r in requests if r is not None}
        if not model.rank or adapters == {None}:
            return "base"
        if model.merge and len(adapters) == 1:
            (name,) = adapters
            if model.merged != name:
                model.merge_into(name)
            return "merged"
        return "stacked"

    def _emit(self, row: int, r: Request, token: int) -> None:
        tokens = self._state[r]["tokens"]
        tokens.append(token)
        if r.first_token is None:
            r.first_token = time.perf_counter()
        r.tokens.put(token)
        if token in self.eos or len(tokens) >= r.max_new_tokens or r.cancelled.is_set():
            self._finish(r, row)

    def _launch(self) -> tuple[list, torch.Tensor, torch.cuda.Event | None]:
        """Launch one decode step of every active row. Returns what _hand_out needs once it is done: the rows'
        requests, where their tokens land, and (on CUDA) the event that says they have landed."""
        top = max(i for i, r in enumerate(self._rows) if r is not None) + 1
        batch = _bucket(top, self.buckets)
        rows = self._rows[:batch] + [None] * (batch - len(self._rows[:batch]))
        active = [r for r in rows if r is not None]
        longest = max(self._state[r]["pos"] for r in active) + 1
        kv_len = min(round_up(longest, LENGTH_BUCKET), self.model.max_len)
        chosen = self._decode_step(batch, kv_len, self._mode(active), any(r.do_sample for r in active))
        for r in active:
            self._state[r]["pos"] += 1
        self._landing.reverse()
        landing = self._landing[0][:batch]
        landing.copy_(chosen, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return rows, landing, event

    def _hand_out(self, rows: list, landing: torch.Tensor, event) -> None:
        """Give each row's request its token from a launched step; a request that finished meanwhile (its row maybe
        refilled since) drops its own."""
        if event is not None:
            event.synchronize()
        for row, (r, token) in enumerate(zip(rows, landing.tolist())):
            if r is not None and r in self._state:
                self._emit(row, r, token)

    # --- compilation and CUDA graphs, each falling back to plain eager torch if it fails here ---------------------

    def _decode_step(self, batch: int, kv_len: int, mode: str, sampling: bool) -> torch.Tensor:
        """StackedModel.decode as this engine runs it: a CUDA graph, else compiled or eager."""
        args = (batch, kv_len, mode, sampling)
        if self.cuda_graphs:
            return self._replay(("decode", *args), "_decode", {}, *args)
        return self._compiled_or_eager("_decode", *args)

    def _prefill_shape(self, rows: int, tokens_per_row: int) -> tuple[int, int]:
        """The padded shape a prefill of this many rows and new tokens runs at: a few lengths, so that its shapes have
        been seen before (by cuBLAS, by the compiled layer); for a CUDA graph, also a batch bucket (filler entries run
        in the scratch row) and coarser lengths, so that few graphs serve every question."""
        if self.cuda_graphs and tokens_per_row <= PREFILL_GRAPH_TOKENS:
            return _bucket(rows, self.buckets), round_up(tokens_per_row, PREFILL_GRAPH_BUCKET)
        return rows, round_up(tokens_per_row, PREFILL_BUCKET)

    def _prefill_step(self, tokens, pos0, rows, last, kv_len: int, mode: str, sampling: bool) -> torch.Tensor:
        """StackedModel.prefill as this engine runs it: a CUDA graph for a question's few tokens, else compiled or eager."""
        if self.cuda_graphs and tokens.shape[1] <= PREFILL_GRAPH_TOKENS:
            # attention reads the whole cache (masked past each row's end: a question's few rows make that cheap), so
            # that the conversations' lengths add no graphs
            args = (self.model.max_len, mode, sampling)
            return self._replay(("prefill", *tokens.shape, *args), "_prefill",
                                {"tokens": tokens, "pos0": pos0, "rows": rows, "last": last}, *args)
        return self._compiled_or_eager("_prefill", tokens, pos0, rows, last, kv_len, mode, sampling)

    def _compiled_or_eager(self, name: str, *args):
        """Run self._decode or self._prefill; where the compiled version fails, switch to the eager one for good."""
        fn, eager = getattr(self, name), self._eager(name)
        try:
            return fn(*args)
        except Exception:
            if fn == eager:
                raise
            log.exception("torch.compile failed: %s runs eagerly", name)
            setattr(self, name, eager)
            return eager(*args)

    def _eager(self, name: str):
        """The plain torch method behind self._decode or self._prefill."""
        return getattr(self.model, name.removeprefix("_"))

    def _replay(self, key: tuple, name: str, inputs: dict[str, torch.Tensor], *args):
        """Run self._decode or self._prefill (name) on device tensor inputs (copied into the graph's own) and args as
        the CUDA graph of this key, captured on first use."""
        graph = self._graphs.get(key)
        if graph is None:
            try:
                graph = self._graphs[key] = self._capture(name, inputs, args)
            except Exception:
                eager = self._eager(name)
                if getattr(self, name) != eager:  # the compiled step would not capture: the eager one may
                    log.exception("CUDA graph capture of the compiled %s failed: capturing the eager one", name)
                    setattr(self, name, eager)
                    return self._replay(key, name, inputs, *args)
                log.exception("CUDA graph capture failed: running without graphs")
                self.cuda_graphs = False
                return eager(*inputs.values(), *args)
        for input_name, value in inputs.items():
            graph["inputs"][input_name].copy_(value)
        graph["graph"].replay()
        return graph["output"]

    def _capture(self, name: str, inputs: dict[str, torch.Tensor], args: tuple) -> dict:
        """Record self._decode or self._prefill as a CUDA graph. The warm-up runs are the real step (these inputs,
        these rows): they write the KV the step itself writes, and the rows' state is put back after them, so that
        capturing mid-serving is safe."""
        model = self.model
        static = {key: value.clone() for key, value in inputs.items()}
        saved = [t.clone() for t in model.state()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._compiled_or_eager(name, *static.values(), *args)
        torch.cuda.current_stream().wait_stream(side)
        for t, before in zip(model.state(), saved):
            t.copy_(before)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            output = getattr(self, name)(*static.values(), *args)
        return {"graph": graph, "inputs": static, "output": output}
