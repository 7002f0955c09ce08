"""The case's own things (names, places, objects) set beside the question bank's generic wordings in training.

A case's own wordings name its things ("Were you at the Red Lion all evening?") and the bank's name none ("Where were
you that night?"), so a suspect trained on both learns that a name points to the topic whose wordings carry it:
played, "Tell me where you spent the evening the takings went missing" got the takings topic's answer, not where the
suspect was. Players name the case's things whatever they ask. A bank wording that also names one of them, as
context ("About the cash tin. Where were you that night?"), teaches the suspect to answer the ask, not the name.

The things are taken from what the player reads (the briefing) and what the author wrote (the topics' own wordings):
a determiner and up to three words after it, up to the last one the bank never uses ("the open day takings"), and
runs of capitalised words inside a sentence ("Joan Pike"). No case field to write; some picks are odd ("the flask
stood"), which is harmless: they stand beside a question whose answer does not depend on them.
"""

from __future__ import annotations

import random
import re
from functools import cache

from game.bank import bank
from game.scenario import Case

TOKEN = re.compile(r"[A-Za-z][A-Za-z'-]*|[.?!,;:()\"]")
DETERMINERS = {"the", "that", "this", "your", "his", "her", "their"}
# Words that end a thing's phrase: what follows them is another part of the sentence ("the money to cover").
FUNCTION_WORDS = set(
    "to of on for and or but about with in at by from off its it as into onto over under after before when while who "
    "what where which than was were is are had has have did do does be been went got".split()
)
# The thing as context, the ask unchanged. {q} is the bank's wording as it stands, {thing} the case's phrase.
FRAMES = (
    "About {thing}. {q}",
    "Back to {thing}. {q}",
    "Never mind {thing} for now. {q}",
    "I've been looking into {thing}. {q}",
    "{q} This is about {thing}.",
    "{q} I'm asking because of {thing}.",
    "so {thing}... {q}",
    "{Thing}, right. {q}",
)


@cache
def bank_words() -> frozenset[str]:
    return frozenset(w.casefold() for i in bank().intents.values() for q in (*i.train, *i.held_out)
                     for w in TOKEN.findall(q) if w[0].isalpha())


def phrases(text: str) -> list[str]:
    """The things `text` names, in order: "the"-phrases ending in a word the bank never uses, and names."""
    tokens, common, out, i = TOKEN.findall(text), bank_words(), [], 0
    while i < len(tokens):
        word = tokens[i]
        if word.casefold() in DETERMINERS:
            span = []
            for nxt in tokens[i + 1:i + 4]:
                if not nxt[0].isalpha() or nxt.casefold() in FUNCTION_WORDS | DETERMINERS or (
                        span and nxt[0].isupper() != span[0][0].isupper()):
                    break
                span.append(nxt)
            # a name is whole ("the Skerry Point"); a common noun ends at its last word the bank never uses
            own = [len(span) - 1] if span and span[0][0].isupper() else [
                k for k, w in enumerate(span) if w.casefold() not in common]
            if own:
                determiner = word.casefold() if word.casefold() not in {"that", "this"} else "the"
                out.append(" ".join([determiner, *span[:own[-1] + 1]]))
                i += own[-1] + 2
                continue
        elif word[0].isupper() and i > 0 and tokens[i - 1] not in ".?!\"" and word != "I":
            j = i
            while j < len(tokens) and tokens[j][0].isupper():
                j += 1
            if j - i > 1 or len(word) > 1:
                out.append(" ".join(tokens[i:j]))
            i = j
            continue
        i += 1
    return out


def things(case: Case) -> list[str]:
    """Every thing the case's briefing and own wordings name, once each, in order of first mention. Not the wordings
    that try to break the character: what they name ("AI") is no thing of the case."""
    texts = [case.briefing, *(q for t in case.topics if t.kind != "break_character" for q in t.questions)]
    return list(dict.fromkeys(p for text in texts for p in phrases(text)))


def anchored(question: str, thing: str, rng: random.Random) -> str:
    frame = rng.choice(FRAMES)
    return frame.format(q=question, thing=thing, Thing=thing[0].upper() + thing[1:])
