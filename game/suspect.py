"""The model that answers: one base in memory for every game, each case's LoRA adapter loaded once beside it.

An answer is generated with the tokenizer's chat template over `game.prompt.chat`, streamed as it grows, and
cleaned at the end: no role tokens, no text after the suspect's turn, no half sentence, no repeated sentence.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from game.adapters import AdapterInfo
from game.base import Base
from game.prompt import chat
from game.scenario import Case
from game.session import Exchange

log = logging.getLogger(__name__)

# Where a model that runs past its turn starts writing the detective's lines or new turns.
_TURN_MARKERS = re.compile(r"<\|[^|]*\|>|</?s>|\n\s*(?:user|assistant|system|detective|q|a)\s*[:\n]", re.IGNORECASE)
_SENTENCE = re.compile(r"[^.!?…]*[.!?…]+[\"'”’)]*")
MAX_SENTENCES = 3


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 72  # three short sentences; bounds the wait at ~20 tokens/s on a 2-core CPU
    repetition_penalty: float = 1.1  # the 135M base loops on a phrase without it
    do_sample: bool = False  # the same question gets the same answer: players can re-check a story


def clean_answer(text: str, finished: bool = True) -> str:
    """The part of raw model output that is the suspect's answer.

    `finished` is False when generation stopped at the token limit: then a trailing unfinished sentence goes.
    """
    text = " ".join(_TURN_MARKERS.split(text, maxsplit=1)[0].split())
    sentences: list[str] = []
    end = 0
    for match in _SENTENCE.finditer(text):
        end = match.end()
        sentence = match.group().strip()
        if sentence and sentence not in sentences:
            sentences.append(sentence)
    tail = text[end:].strip()
    if tail and finished:
        sentences.append(tail)
    if not sentences and tail:  # no sentence ended at all: keep the words rather than answer nothing
        return tail.rstrip(",;:-") + "…"
    return " ".join(sentences[:MAX_SENTENCES])


class _Cancelled(StoppingCriteria):
    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return self.event.is_set()


class Suspect:
    """Owns the model. Thread-safe: one generation at a time (adapters are switched on the shared model)."""

    def __init__(self, base: Base, device: str | None = None, settings: GenerationSettings = GenerationSettings()):
        self.base = base
        self.settings = settings
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(base.path)
        self.model = AutoModelForCausalLM.from_pretrained(base.path, dtype=dtype).to(self.device).eval()
        self.adapters: dict[str, Path] = {}  # case id -> folder, for those loaded
        self._lock = threading.Lock()

    def load_adapter(self, info: AdapterInfo) -> bool:
        """Load a usable adapter under its case id. Returns False, with the reason logged, when it cannot."""
        if not info.usable:
            return False
        from peft import PeftModel

        try:
            with self._lock:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(str(info.path), adapter_name=info.case_id)
                else:
                    self.model = PeftModel.from_pretrained(self.model, str(info.path), adapter_name=info.case_id)
                self.model.eval()
        except Exception as exc:  # a corrupt or incompatible adapter must not stop the game: play prompt-only
            log.warning("could not load adapter %s: %s", info.path, exc)
            return False
        self.adapters[info.case_id] = info.path
        return True

    def stream(self, case: Case, transcript: Sequence[Exchange], question: str) -> Iterator[str]:
        """Yield the answer so far, growing; the last value is the cleaned final answer."""
        messages = chat(case, transcript, question)
        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=False)
        cancelled = threading.Event()
        s = self.settings
        kwargs = dict(
            **inputs, streamer=streamer, max_new_tokens=s.max_new_tokens, do_sample=s.do_sample,
            repetition_penalty=s.repetition_penalty, pad_token_id=self.tokenizer.pad_token_id,
            stopping_criteria=StoppingCriteriaList([_Cancelled(cancelled)]),
        )
        produced: list[int] = []

        def generate() -> None:
            try:
                with torch.inference_mode():
                    out = self._generate(case.id, kwargs)
                produced.append(out.shape[1] - inputs["input_ids"].shape[1])
            except Exception:
                streamer.end()  # unblock the reader; it re-raises below through `produced` being empty
                raise

        with self._lock:
            worker = threading.Thread(target=generate, daemon=True)
            worker.start()
            raw = ""
            try:
                for piece in streamer:
                    raw += piece
                    shown = _TURN_MARKERS.split(raw, maxsplit=1)[0].strip()
                    if shown:
                        yield " ".join(shown.split())
            finally:
                cancelled.set()  # the reader went away (player left): stop generating
                worker.join()
        if not produced:
            raise RuntimeError("the suspect failed to answer")
        yield clean_answer(raw, finished=produced[0] < s.max_new_tokens)

    def answer(self, case: Case, transcript: Sequence[Exchange], question: str) -> str:
        final = ""
        for final in self.stream(case, transcript, question):
            pass
        return final

    def _generate(self, case_id: str, kwargs: dict) -> torch.Tensor:
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            return self.model.generate(**kwargs)
        if case_id in self.adapters:
            self.model.set_adapter(case_id)
            return self.model.generate(**kwargs)
        with self.model.disable_adapter():
            return self.model.generate(**kwargs)
