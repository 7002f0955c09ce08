"""The suspect served over the network: each answer is an OpenAI-compatible streaming chat completion.

The model tier is an engine its operators already run (vLLM, SGLang, TGI, llama.cpp's server), serving the base
and every case's LoRA adapter under the case's id as its `model` name (vLLM's `--lora-modules CASE=PATH`, a
llama-cpp-python config entry with `model_alias: CASE`; `python -m game serve-config` prints either). The game sends
the chat of `game.prompt.chat` with the local engines' generation settings and cleans the streamed text with the
same functions, so a player gets the same suspect wherever it runs.

At start the server's `/v1/models` says which cases it offers an adapter for; the others are asked of the base,
prompt-only, and their briefing says so. A server that is down, slow or failing raises `EngineUnavailable`, whose
message is for the player: the game withdraws the question, which can be asked again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import httpx

from game.prompt import chat
from game.scenario import Case
from game.session import Exchange
from game.suspect import GenerationSettings, answer_settled, clean_answer, final_answer, may_repeat, visible_answer

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # its line per request, one per answer, would drown the game's

CONNECT_TIMEOUT_S = 5.0  # a server that does not accept a connection in this long is down, not busy


class EngineUnavailable(RuntimeError):
    """The model server did not answer. The message is meant for the player."""


@dataclass(frozen=True)
class ServedBase:
    """What `described()` and the logs name the base by: the served model, not a file on this machine."""

    id: str


class RemoteSuspect:
    """Answers through a model server. Thread-safe: httpx's Client pools connections across threads."""

    engine_name = "remote"
    draft_tokens = 0  # guessing ahead is the server's business

    def __init__(self, url: str, key: str | None = None, base_model: str = "base",
                 settings: GenerationSettings = GenerationSettings(), timeout_s: float = 30.0):
        """url: the server's OpenAI API root, `http://host:port/v1` (a URL without the `/v1` gets it added).
        base_model: the served name of the bare base, which plays cases the server has no adapter for.
        timeout_s: the longest wait for the server's next streamed token before the player is told."""
        root = url.rstrip("/")
        self.url = root if root.endswith("/v1") else root + "/v1"
        self.device = self.url  # where it runs, as the eval and the logs say it
        self.settings = settings
        self.base_model = base_model
        self.base = ServedBase(f"{base_model} at {self.url}")
        self._http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"} if key else None,
                                  timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S))
        self.served = self._models()
        if base_model not in self.served:
            raise EngineUnavailable(f"the model server at {self.url} serves no model named {base_model!r} (it serves: "
                                    f"{', '.join(sorted(self.served)) or 'nothing'}): set IR_ENGINE_MODEL to its base")
        self.adapters: dict[str, str] = {}  # case id -> served model name, for the cases the server has one for
        log.info("suspect engine: remote, %s (models: %s)", self.url, ", ".join(sorted(self.served)))

    def _models(self) -> set[str]:
        try:
            response = self._http.get("/models")
            response.raise_for_status()
            return {model["id"] for model in response.json()["data"]}
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise EngineUnavailable(f"the model server at {self.url} did not list its models ({_why(exc)})") from exc

    def use_served_adapter(self, case_id: str) -> bool:
        """Ask the case's own served adapter from now on; False when the server has none for it."""
        if case_id not in self.served:
            return False
        self.adapters[case_id] = case_id
        return True

    def draft_tokens_for(self, case: Case) -> int:
        return 0

    def request(self, case: Case, transcript: Sequence[Exchange], question: str) -> dict:
        """The chat completion asked for this answer: the game's prompt and generation settings, greedy."""
        s = self.settings
        return {
            "model": self.adapters.get(case.id, self.base_model),
            "messages": chat(case, transcript, question),
            "stream": True,
            "max_tokens": s.max_new_tokens,
            "temperature": 1.0 if s.do_sample else 0.0,  # 0: greedy, in vLLM, SGLang, TGI and llama.cpp alike
            # transformers' repetition penalty, which the OpenAI API lacks: vLLM and SGLang read it under this name,
            # llama.cpp's servers under the other; each ignores the one it does not know.
            "repetition_penalty": s.repetition_penalty,
            "repeat_penalty": s.repetition_penalty,
        }

    def stream(self, case: Case, transcript: Sequence[Exchange], question: str,
               stats: dict | None = None) -> Iterator[str]:
        """Yield the answer so far, growing; the last value is the cleaned final answer (as Suspect.stream)."""
        started, first = time.perf_counter(), None
        raw, shown, settled, reason, chunks = "", "", False, None, 0
        try:
            with self._http.stream("POST", "/chat/completions", json=self.request(case, transcript, question)) as r:
                if r.status_code >= 400:
                    r.read()
                    log.warning("model server answered HTTP %s: %s", r.status_code, r.text[:500])
                    raise EngineUnavailable(f"The suspect's model server failed (HTTP {r.status_code}). "
                                            "Your question was not used: ask it again.")
                for delta, reason in _deltas(r.iter_lines()):
                    if delta:
                        first = first or time.perf_counter()
                        raw, chunks = raw + delta, chunks + 1
                        now = visible_answer(raw, ended=False)
                        if now and now != shown and not may_repeat(now, transcript):
                            shown = now
                            yield shown
                        if answer_settled(raw):
                            settled = True
                            break  # leaving the `with` closes the stream, which stops the server generating
                    if reason is not None:
                        break
                else:
                    raise EngineUnavailable("The suspect's model server stopped in the middle of the answer. "
                                            "Your question was not used: ask it again.")
        except httpx.TimeoutException as exc:
            raise EngineUnavailable("The suspect's model server is too slow to answer right now. "
                                    "Your question was not used: ask it again in a moment.") from exc
        except httpx.HTTPError as exc:
            log.warning("model server at %s: %s", self.url, _why(exc))
            raise EngineUnavailable("The suspect's model server cannot be reached or stopped in the middle of the "
                                    "answer. Your question was not used: ask it again in a moment.") from exc
        if stats is not None:
            stats.update(new_tokens=chunks, first_token_s=(first or time.perf_counter()) - started,
                         total_s=time.perf_counter() - started, settled_early=settled, finish_reason=reason)
        yield final_answer(case, transcript, clean_answer(raw, finished=settled or reason != "length"))

    def answer(self, case: Case, transcript: Sequence[Exchange], question: str) -> str:
        final = ""
        for final in self.stream(case, transcript, question):
            pass
        return final


def _deltas(lines: Iterator[str]) -> Iterator[tuple[str, str | None]]:
    """(text, finish_reason) of each server-sent event of a streamed chat completion, up to `data: [DONE]`."""
    for line in lines:
        if not line.startswith("data:"):
            continue  # blank separators, comments and event names
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            # Without a finish_reason before it, the answer was cut short (llama-cpp-python's server does this to
            # a stream when another request waits, unless told `interrupt_requests: false`).
            return
        try:
            event: Mapping = json.loads(data)
            if "error" in event:
                raise EngineUnavailable(f"The suspect's model server failed ({event['error']}). "
                                        "Your question was not used: ask it again.")
            choice = event["choices"][0] if event["choices"] else {}
        except (ValueError, KeyError, TypeError) as exc:
            raise EngineUnavailable("The suspect's model server sent something that is not an answer. "
                                    "Your question was not used: ask it again.") from exc
        yield (choice.get("delta") or {}).get("content") or "", choice.get("finish_reason")


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
