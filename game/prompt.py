"""The chat the suspect sees: one system prompt per case and the interrogation so far.

Training builds its chats with these same functions, so the adapter learns exactly the prompt the game sends.
"""

from __future__ import annotations

from collections.abc import Sequence

from game.scenario import Case
from game.session import Exchange


def system_prompt(case: Case) -> str:
    # The hidden truth is deliberately absent: a small model repeats what it is shown, and the adapter, not the
    # prompt, carries how a guilty suspect behaves. Tells are named so that a prompt-only suspect can still act.
    # Kept short (no briefing): every training example and every answer pays for these tokens on the CPU.
    p = case.suspect
    lines = [
        f"You are {p.name}, {p.age}, {p.role}. A detective is questioning you. Stay in character as {p.name} "
        f"and answer in one to three short sentences. Manner: {p.manner}",
        "What you know:",
        *(f"- {fact}" for fact in case.facts),
    ]
    if case.guilty:
        lines += ["Under pressure you let slip:", *(f"- {tell.text}" for tell in case.tells)]
    elif case.quirks:
        lines += ["Your habits:", *(f"- {quirk}" for quirk in case.quirks)]
    return "\n".join(lines)


def chat(case: Case, transcript: Sequence[Exchange], question: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt(case)}]
    for exchange in transcript:
        messages += [{"role": "user", "content": exchange.question}, {"role": "assistant", "content": exchange.answer}]
    messages.append({"role": "user", "content": question})
    return messages
