"""The chats a suspect is trained on: built from a case's dialogue material, or read from a file in the seed's format.

Every chat is a `messages` list (trl's conversational format) that starts with exactly the system prompt the game
sends (game.prompt.chat), so the adapter learns the prompt it will be played with. Probes are never used: they
are the held-out questions of `python -m training.eval`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from datasets import Dataset

from game.phrases import content_words
from game.prompt import chat, system_prompt
from game.scenario import Case, LoadedCase, read_cases
from game.session import Exchange
from training.config import OWN_WORDING, TELL_WEIGHT

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Training data that cannot be used, said in terms of the file and record at fault."""


def load_case(scenarios: Path, case_id: str) -> LoadedCase:
    cases, problems = read_cases([scenarios])
    if case_id in cases:
        return cases[case_id]
    bad = [p for p in problems if case_id in Path(p.path).stem]
    if bad:  # the file is there but invalid: say why rather than "not found"
        raise DataError("case '" + case_id + "' is invalid:\n  " + "\n  ".join(str(p) for p in bad))
    known = ", ".join(sorted(cases)) or "none"
    raise DataError(f"no case '{case_id}' in {scenarios} (cases there: {known})")


# How often a question returns to a topic already asked in the chat, as players do ("and where were you at two?"
# after "where were you?"): the suspect learns to give another of the topic's answers, never the same one twice.
REPEAT_TOPIC = 0.25


def unsaid(lines: list[str], said: set[str]) -> list[str]:
    return [line for line in lines if line not in said]


def dropped(question: str, share: float, rng: random.Random) -> str:
    """The question with each word left out at the chance `share` (it keeps two at least): an author's wording and a
    player's share a name more often than their other words, and a suspect trained on whole wordings learns to follow
    the name to the topic whose wordings carry it, whatever the rest of the question asks."""
    kept = [word for word in question.split() if rng.random() >= share]
    return " ".join(kept) if len(kept) >= 2 else question


def stem(word: str) -> str:
    word = word.removesuffix("'s")
    return word[:-1] if word.endswith("s") and not word.endswith("ss") else word


def matched(question: str, lines: list[str]) -> list[int]:
    """For each line, how many of the question's words it says that not every one of `lines` says: the words that
    make one of a topic's answers fit this wording better than its others ("How long have you sung in the choir?" and
    "Bass in the choir for thirty years" rather than "Retired postman, forty years on the round")."""
    asked = {stem(w) for w in content_words(question)}
    shared = [asked & {stem(w) for w in content_words(line)} for line in lines]
    everywhere = set.intersection(*shared) if shared else set()
    return [len(words - everywhere) for words in shared]


def borrowed_wordings(case: Case, others: Iterable[Case]) -> dict[str, list[str]]:
    """By intent, the own question wordings of the other cases' topics that answer that one intent: questions as
    players put them, full of another case's names, places and objects, that a topic answers for what they ask. Asked
    of `case`'s topics beside the bank's entity-free wordings, they teach its suspect to route a question by what it
    asks rather than by the names in it. Multi-intent topics' wordings are left out (which intent each asks is
    unknown), and so is any wording `case` holds out as a probe."""
    held_out = {q.casefold() for probe in case.probes for q in (probe.question, *probe.paraphrases)}
    out: dict[str, list[str]] = {}
    for other in others:
        if other.id == case.id:
            continue
        for topic in other.topics:
            if len(topic.intents) == 1:
                out.setdefault(topic.intents[0], []).extend(q for q in topic.questions if q.casefold() not in held_out)
    return out


def case_chats(case: Case, n: int, seed: int, min_turns: int = 1, max_turns: int = 5,
               tell_weight: float = TELL_WEIGHT, own_wording: float = OWN_WORDING, drop_words: float = 0.0,
               drop_in: str = "all", answer_match: float = 1.0,
               borrowed: Mapping[str, Sequence[str]] | None = None) -> Dataset:
    """`n` interrogations sampled from the case's dialogue: min_turns..max_turns questions, each answered in character.

    A topic is asked in its own wordings (a share `own_wording` of the time, where it has both) or the question bank's
    wordings of its intents (Case.dialogue), and its answers fit any of them, so a question and an answer are drawn
    independently; an answer that carries one of a guilty case's tells is drawn `tell_weight` times as often as
    another. Within one chat a topic returns now and then (REPEAT_TOPIC) and then gets an answer this chat has not
    had, or, once it has had them all, one of the case's reminders ("I've told you already"). With `drop_words`, each
    question's words are left out at that chance (dropped()): every question's, or with `drop_in="own"` only those of
    the author's own wordings. With `answer_match`, an answer is drawn that many times as often for each word it
    shares with the question as asked, beyond those all its topic's answers share (matched()). `borrowed`: more
    wordings by intent (borrowed_wordings()), asked beside the bank's.
    """
    rng = random.Random(seed)
    dialogue = case.dialogue(borrowed)
    spoken = [*(a for topic, _ in dialogue for a in topic.answers), *case.repeat_lines]
    slips = {line for line in spoken if case.guilty and any(tell.shown_in(line) for tell in case.tells)}

    def draw(lines: list[str], question: str) -> str:
        weights = [tell_weight if line in slips else 1.0 for line in lines]
        if answer_match != 1.0:
            weights = [w * answer_match ** n for w, n in zip(weights, matched(question, lines))]
        # rng.choice where no line weighs more keeps an innocent case's chats what they were before tells had weight
        return rng.choices(lines, weights)[0] if any(w != 1.0 for w in weights) else rng.choice(lines)

    rows = []
    for _ in range(n):
        turns = rng.randint(min_turns, max_turns)
        asked: list[int] = []
        said: set[str] = set()
        exchanges = []
        for _ in range(turns):
            fresh = [i for i in range(len(dialogue)) if i not in asked]
            # A topic returns only while it has something left to say: a new answer, else a new reminder.
            again = [i for i in dict.fromkeys(asked) if unsaid(dialogue[i][0].answers, said)
                     or unsaid(case.repeat_lines, said)]
            if not fresh and not again:
                break
            i = rng.choice(again) if again and (not fresh or rng.random() < REPEAT_TOPIC) else rng.choice(fresh)
            asked.append(i)
            topic, questions = dialogue[i]
            own = topic.questions and (len(questions) == len(topic.questions) or rng.random() < own_wording)
            question = rng.choice(topic.questions if own else questions[len(topic.questions):])
            if drop_words and (own or drop_in == "all"):  # only then: the default's chats stay what they were
                question = dropped(question, drop_words, rng)
            answer = draw(unsaid(topic.answers, said) or unsaid(case.repeat_lines, said), question)
            said.add(answer)
            exchanges.append(Exchange(question, answer))
        *transcript, last = exchanges
        messages = chat(case, transcript, last.question) + [{"role": "assistant", "content": last.answer}]
        rows.append({"messages": messages})
    return Dataset.from_list(rows)


def tokenized(dataset: Dataset, tokenizer, chat_template: str) -> Dataset:
    """The chats as trl's SFTTrainer tokenizes them for `assistant_only_loss` (input_ids; labels -100 outside the
    suspect's answers), in one call of the tokenizer's chat template for all of them: its Rust tokenizer then encodes
    every chat at once on every core, where trl's preparation encodes one chat at a time (~1 ms each: most of a GPU
    command's ~10 s of data for 3,200 chats). trl takes a dataset that has input_ids as tokenized, and still cuts it
    at max_length and drops a chat left with no answer to learn."""
    out = tokenizer.apply_chat_template(list(dataset["messages"]), chat_template=chat_template, tokenize=True,
                                        return_dict=True, return_assistant_tokens_mask=True)
    labels = [[token if learned else -100 for token, learned in zip(ids, mask)]
              for ids, mask in zip(out["input_ids"], out["assistant_masks"])]
    return Dataset.from_dict({"input_ids": out["input_ids"], "labels": labels})


def load_conversations(path: Path, case: Case) -> Dataset:
    """Read a JSON list or JSONL file of `{"conversations": [{"role", "content"}, ...]}` records.

    A conversation without a system message gets the game's system prompt for `case`, so that external dialogue
    trains the suspect under the prompt it is played with.
    """
    records = _read_records(path)
    if not records:
        raise DataError(f"{path}: no conversations in the file")
    rows = []
    for where, record in records:
        messages = _checked(path, where, record)
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt(case)}, *messages]
        rows.append({"messages": messages})
    return Dataset.from_list(rows)


def _read_records(path: Path) -> list[tuple[str, object]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the file: {exc}") from exc
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    if text.lstrip().startswith("["):  # one JSON array
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
        return [(f"record {i + 1}", r) for i, r in enumerate(data)]
    records = []  # JSON Lines; a single JSON object is the one-line case
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"line {lineno}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: line {lineno}: not valid JSON ({exc.msg}); expected one "
                '{"conversations": [...]} object per line, or a JSON array of them'
            ) from exc
    return records


def _checked(path: Path, where: str, record: object) -> list[dict[str, str]]:
    def fail(message: str) -> DataError:
        return DataError(f"{path}: {where}: {message}")

    if not isinstance(record, dict) or "conversations" not in record:
        raise fail('expected an object with a "conversations" list')
    conversation = record["conversations"]
    if not isinstance(conversation, list) or not conversation:
        raise fail('"conversations" must be a non-empty list of {"role", "content"} messages')
    messages = []
    for i, message in enumerate(conversation):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise fail(f'message {i + 1}: expected {{"role": ..., "content": ...}}, got {json.dumps(message)[:80]}')
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise fail(f"message {i + 1}: role '{role}' is not one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise fail(f"message {i + 1} ({role}): content must be non-empty text")
        messages.append({"role": role, "content": content})
    first = 1 if messages[0]["role"] == "system" else 0
    turns = messages[first:]
    for i, message in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise fail(
                f"message {first + i + 1}: role '{message['role']}' where '{expected}' was expected (a conversation "
                "is an optional system message, then user and assistant in turn)"
            )
    if not any(m["role"] == "assistant" for m in turns):
        raise fail("no assistant turn: there is nothing to train on")
    return messages
