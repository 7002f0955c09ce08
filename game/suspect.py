"""The model that answers: one base in memory for every game, each case's LoRA adapter loaded once beside it.

An answer is generated greedily over the tokenizer's chat template of `game.prompt.chat`, streamed as it grows, and
cleaned at the end: no role tokens, no text after the suspect's turn, no half sentence, no repeated sentence, and
never an answer this interrogation has already heard (a reminder instead), never none (an evasion instead):
`final_answer`.
Generation stops as soon as more text could no longer change the cleaned answer (three sentences are complete, or
the turn has ended on a whole sentence), which is the same answer sooner.

Two engines run it, chosen by `engine=` or $IR_ENGINE ("auto", the default: the first that fits):
- "llama.cpp" (CPU): the base's own GGUF through llama-cpp-python, each adapter converted once to a GGUF LoRA
  (game/llamacpp.py). About 5x the tokens/s of torch on a 2-core CPU. Needs llama-cpp-python (the `cpu-fast`
  extra, which `make` installs; it builds from source) and a GGUF base; without either the torch engine runs.
- "torch" (GPU, or CPU otherwise): game/engine.py, which batches concurrent players across their cases' adapters.
A model server elsewhere answers instead when $IR_ENGINE_URL names one (game/remote.py, with these functions).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from game.adapters import AdapterInfo
from game.base import Base
from game.config import ConfigError
from game.drafts import Drafts
from game.engine import BatchedEngine
from game.phrases import normalize, same_answer
from game.prompt import chat, system_prompt
from game.scenario import Case
from game.serving import Request, common_prefix
from game.session import Exchange

log = logging.getLogger(__name__)

# Where a model that runs past its turn starts writing the detective's lines or new turns.
_TURN_MARKERS = re.compile(r"<\|[^|]*\|>|</?s>|\n\s*(?:user|assistant|system|detective|q|a)\s*[:\n]", re.IGNORECASE)
_SENTENCE = re.compile(r"[^.!?…]*[.!?…]+[\"'”’)]*")
MAX_SENTENCES = 3
ENGINES = ("auto", "llama.cpp", "torch")


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 72  # three short sentences; bounds the wait at ~20 tokens/s on a 2-core CPU
    repetition_penalty: float = 1.1  # the 135M base loops on a phrase without it
    do_sample: bool = False  # the same question gets the same answer: players can re-check a story


def _sentences(text: str) -> tuple[list[str], int, int | None]:
    """Distinct sentences of normalised text in order, where the last match ends, and where the third one ended."""
    sentences: list[str] = []
    end, settled_at = 0, None
    for match in _SENTENCE.finditer(text):
        end = match.end()
        sentence = match.group().strip()
        if sentence and sentence not in sentences:
            sentences.append(sentence)
            if len(sentences) == MAX_SENTENCES:
                settled_at = end
    return sentences, end, settled_at


def clean_answer(text: str, finished: bool = True) -> str:
    """The part of raw model output that is the suspect's answer.

    `finished` is False when generation stopped at the token limit: then a trailing unfinished sentence goes.
    """
    text = " ".join(_TURN_MARKERS.split(text, maxsplit=1)[0].split())
    sentences, end, _ = _sentences(text)
    tail = text[end:].strip()
    if tail and finished:
        sentences.append(tail)
    if not sentences and tail:  # no sentence ended at all: keep the words rather than answer nothing
        return tail.rstrip(",;:-") + "…"
    return " ".join(sentences[:MAX_SENTENCES])


def answer_settled(raw: str) -> bool:
    """True when no further output can change clean_answer(raw + more), whatever `finished` turns out to be."""
    parts = _TURN_MARKERS.split(raw, maxsplit=1)
    text = " ".join(parts[0].split())
    sentences, end, settled_at = _sentences(text)
    if len(parts) > 1:  # the turn is over: only an unfinished tail would still depend on `finished`
        return settled_at is not None or not text[end:].strip()
    # A sentence match is final once text follows it; the answer keeps only the first three distinct ones.
    return settled_at is not None and settled_at < len(text)


def may_repeat(shown: str, transcript: Sequence[Exchange]) -> bool:
    """Whether an answer streaming out could still be one this interrogation has heard: it is held back until it
    cannot, so that a player never sees a repeat begin before `final_answer` replaces it."""
    start = normalize(shown)
    return any(normalize(e.answer).startswith(start) for e in transcript)


def final_answer(case: Case, transcript: Sequence[Exchange], answer: str) -> str:
    """The cleaned answer as the player gets it: the model's words, or a line of the case's in the suspect's manner,
    the first of them this interrogation has not heard yet. A reminder ("I've told you already") where the answer
    repeats one heard before; an evasion where the model said nothing at all (it ended its turn at once, or wrote only
    what is not the suspect's): an empty bubble is no answer a player can read."""
    earlier = [e.answer for e in transcript]
    if answer and not any(same_answer(answer, e) for e in earlier):
        return answer
    lines = case.repeat_lines if answer else case.evasion.answers
    fresh = [line for line in lines if not any(same_answer(line, e) for e in earlier)]
    return (fresh or lines)[0]


def visible_answer(raw: str, ended: bool) -> str:
    """What of an answer still streaming to show: whole words only (as transformers' TextIteratorStreamer does),
    cut at the end of the turn."""
    visible = raw if ended or raw.endswith("\n") else raw[:raw.rfind(" ") + 1]
    return " ".join(_TURN_MARKERS.split(visible, maxsplit=1)[0].split())


class Suspect:
    """Owns the model. Thread-safe: every session's questions go to one engine, which serves them together."""

    def __init__(self, base: Base, device: str | None = None, settings: GenerationSettings = GenerationSettings(),
                 engine: str | None = None, max_batch: int | None = None, **engine_options):
        """engine: one of ENGINES; default: $IR_ENGINE, else "auto".
        engine_options go to the torch engine (game.engine.BatchedEngine): compile, cuda_graphs, kv_cache_mb, merge,
        overlap."""
        engine = engine or os.environ.get("IR_ENGINE") or "auto"
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
        self.base = base
        self.settings = settings
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(base.path)
        self.adapters: dict[str, Path] = {}  # case id -> folder, for those loaded
        self._encode_lock = threading.Lock()  # a fast tokenizer must not encode in two threads at once
        self._prefixes: dict[str, tuple[str, list[int]]] = {}  # case id -> (system prompt, every prompt's start)
        self._drafts: dict[str, tuple[Case, Drafts]] = {}  # case id -> guesses from that case's material
        self._engine = self._llama_cpp(engine) if engine != "torch" else None
        if self._engine is not None:
            self.engine_name = "llama.cpp"
        else:
            self.engine_name = "torch"
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
            model = AutoModelForCausalLM.from_pretrained(base.path, dtype=dtype).to(self.device).eval()
            batch = max_batch or (32 if self.device.startswith("cuda") else 4)
            self._engine = BatchedEngine(model, eos=self._eos_ids(), max_batch=batch, **engine_options)
        self.weights = getattr(self._engine, "weights", None)  # how llama.cpp serves the base's weights
        log.info("suspect engine: %s on %s%s", self.engine_name, self.device,
                 f", base weights {self.weights}" if self.weights else "")

    def _llama_cpp(self, engine: str):
        """The llama.cpp engine when it fits (CPU, GGUF base, llama-cpp-python installed), else None for "auto"."""
        from game import llamacpp

        gguf = llamacpp.gguf_of(self.base) if self.device == "cpu" else None
        if gguf is None or not llamacpp.available():
            if engine == "llama.cpp":
                raise ValueError(llamacpp.unavailable_reason(self.base, self.device))
            if self.device == "cpu":
                log.info("torch engine: %s", llamacpp.unavailable_reason(self.base, self.device))
            return None
        try:
            return llamacpp.LlamaCppEngine(gguf, eos=self._eos_ids(), config_path=self.base.path)
        except Exception as exc:
            if engine == "llama.cpp" or isinstance(exc, ConfigError):  # a bad setting is said, not worked around
                raise
            log.warning("llama.cpp could not open %s (%s): the torch engine runs instead", gguf, exc)
            return None

    @property
    def draft_tokens(self) -> int:
        """The most guessed tokens (game.drafts) the engine checks in one pass; 0 when it does not guess."""
        return self._engine.draft_tokens

    def draft_tokens_for(self, case: Case) -> int:
        """draft_tokens where this case's answers are guessed: only with its adapter loaded (a prompt-only suspect
        seldom says its case's material, so checking guesses would cost more than it saves)."""
        return self.draft_tokens if case.id in self.adapters else 0

    def _eos_ids(self) -> set[int]:
        from transformers import GenerationConfig

        try:
            eos = GenerationConfig.from_pretrained(self.base.path).eos_token_id
        except OSError:
            eos = None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        return set(eos) if isinstance(eos, (list, tuple)) else {eos}

    def load_adapter(self, info: AdapterInfo) -> bool:
        """Load a usable adapter under its case id. Returns False, with the reason logged, when it cannot."""
        if not info.usable:
            return False
        try:
            self._engine.load_adapter(info.case_id, Path(info.path))
        except Exception as exc:  # a corrupt or incompatible adapter must not stop the game: play prompt-only
            log.warning("could not load adapter %s: %s", info.path, exc)
            return False
        self.adapters[info.case_id] = Path(info.path)
        return True

    def _prompt(self, case: Case, messages: list[dict[str, str]]) -> tuple[list[int], int]:
        """The prompt's token ids, and how many of them are the same in every question of the case: its system
        prompt and the opening of the first question's turn ("<|im_start|>user\n" in ChatML), computed once for all
        of its games."""
        with self._encode_lock:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
            text = system_prompt(case)
            known = self._prefixes.get(case.id)
            if known is None or known[0] != text:
                turns = [self.tokenizer.apply_chat_template([messages[0], {"role": "user", "content": question}],
                                                            return_dict=True)["input_ids"] for question in "?!"]
                known = self._prefixes[case.id] = (text, turns[0][:common_prefix(*turns)])
        prefix = known[1]
        return list(ids), len(prefix) if ids[:len(prefix)] == prefix else 0

    def _guesses(self, case: Case) -> Drafts | None:
        """Where draft_tokens_for(case): the case's system prompt and every answer of its dialogue material, as one
        chat (what a suspect trained on them says again, each answer as the turn it would be)."""
        if not self.draft_tokens_for(case):
            return None
        known = self._drafts.get(case.id)
        if known is None or known[0] != case:
            lines = [*(answer for topic, _ in case.dialogue() for answer in topic.answers), *case.repeat_lines]
            material = [Exchange("?", line) for line in lines]
            text, _ = self._prompt(case, chat(case, material, "?"))
            known = self._drafts[case.id] = (case, Drafts([text], ends=self._engine.eos))
        return known[1]

    def prepare(self, case: Case) -> Request:
        """Compute the case's system-prompt KV now, in the engine's own time (~2 s on 2 cores), so that the first
        question of its first game pays for itself alone; its two tokens also build (compile, capture) the decode
        step a lone player of this case runs, on a GPU. Returns at once (the request: its `tokens` end with None
        once done); a player's question goes first."""
        prompt, prefix = self._prompt(case, chat(case, (), "?"))
        s = self.settings
        return self._engine.submit(Request(prompt, case.id if case.id in self.adapters else None, prefix, 2,
                                    s.repetition_penalty, background=True, drafts=self._guesses(case)))

    def stream(self, case: Case, transcript: Sequence[Exchange], question: str,
               stats: dict | None = None) -> Iterator[str]:
        """Yield the answer so far, growing; the last value is the cleaned final answer.

        `stats`, when given, is filled with the prompt's and the answer's token counts and their timings.
        """
        started = time.perf_counter()
        prompt, prefix = self._prompt(case, chat(case, transcript, question))
        s = self.settings
        request = self._engine.submit(Request(prompt, case.id if case.id in self.adapters else None, prefix,
                                              s.max_new_tokens, s.repetition_penalty, s.do_sample,
                                              drafts=self._guesses(case)))
        produced: list[int] = []
        raw, shown, settled, ended = "", "", False, False
        try:
            while not ended:
                item = request.tokens.get()
                batch = [item]
                while item is not None and not isinstance(item, BaseException) and not request.tokens.empty():
                    item = request.tokens.get()  # take every token already there: one decode for all of them
                    batch.append(item)
                if isinstance(batch[-1], BaseException):
                    raise RuntimeError("the suspect failed to answer") from batch[-1]
                ended = batch[-1] is None
                produced += [t for t in batch if t is not None]
                raw = self.tokenizer.decode(produced, skip_special_tokens=False)
                now = visible_answer(raw, ended)
                if now and now != shown and not may_repeat(now, transcript):
                    shown, request.shown = now, True
                    yield shown
                if not ended and answer_settled(raw):
                    settled = True
                    break
        finally:
            request.cancelled.set()  # settled, or the reader went away (player left): stop generating
        if stats is not None:
            first = request.first_token if request.first_token is not None else time.perf_counter()
            stats.update(prompt_tokens=len(prompt), cached_tokens=request.cached_tokens, new_tokens=len(produced),
                         first_token_s=first - started, total_s=time.perf_counter() - started, settled_early=settled,
                         drafted_tokens=request.drafted_tokens, accepted_tokens=request.accepted_tokens)
        yield final_answer(case, transcript, clean_answer(raw, finished=settled or len(produced) < s.max_new_tokens))

    def answer(self, case: Case, transcript: Sequence[Exchange], question: str) -> str:
        final = ""
        for final in self.stream(case, transcript, question):
            pass
        return final
