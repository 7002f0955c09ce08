"""The browser game: a Gradio page over `game.room.Room`. It holds no rules and no secrets.

    python app.py [--host 127.0.0.1] [--port 7860] [--base embedded]

The browser keeps only an opaque game id (in `gr.State`); the case, its truth and the session stay on the server.
"""

from __future__ import annotations

import argparse
import html
import logging
import os

import gradio as gr
import matplotlib

from game.config import ConfigError, GameConfig
from game.remote import EngineUnavailable
from game.results import CaseRecord
from game.room import Briefing, Room, UnknownCase, UnknownGame, Verdict, open_room
from game.score import Score
from game.session import MoveRefused, Phase

RANDOM = "A random case"
TITLE = "# 🕵️ Interrogation Room"
# Answers in progress at once: the engines batch every player's answer together (a CPU answers twenty players in a
# few seconds that way), so players wait in the engine's batch rather than in Gradio's queue; beyond this, in the queue.
ANSWERS_AT_ONCE = 64
RULES = "Read the briefing, ask the suspect up to **{n} questions**, then decide: guilty or not guilty?"

# Run once on load. The seconds an answer has taken are counted in the page, from when "is thinking" appears: the
# server sends that line once, not every second; they are hidden from screen readers, which would read each tick.
# Two repairs of Gradio's own markup that axe-core finds serious: the chat's scrolling log cannot be reached by a
# keyboard to scroll it (it gets a tab stop), and a toast's header is a "button" holding the close button (nested
# controls; the close button is the control).
PAGE_JS = """() => {
  let since = null;
  setInterval(() => {
    const counter = document.querySelector("#progress .elapsed");
    if (!counter) { since = null; return; }
    since ??= Date.now();
    counter.textContent = `${Math.floor((Date.now() - since) / 1000)} s`;
  }, 250);
  const repair = () => {
    document.querySelectorAll("#chat [role=log]:not([tabindex])").forEach(log => log.setAttribute("tabindex", "0"));
    document.querySelectorAll(".toast-header[role=button]").forEach(header => {
      header.removeAttribute("role");
      header.removeAttribute("tabindex");
    });
  };
  new MutationObserver(repair).observe(document.body, {childList: true, subtree: true});
  repair();
}"""
# A keyboard player's focus goes to the question box when it opens: the box was disabled while the suspect answered,
# which took the focus away from it.
FOCUS_QUESTION = "() => document.querySelector('#question textarea:not([disabled])')?.focus()"
# Soft, with colours dark enough for WCAG AA contrast (4.5:1), which axe-core finds Soft's own miss: white on
# indigo-500 buttons (4.46:1), indigo-500 labels on indigo-100 (3.6:1), the footer's grey-400 links (2.4:1).
THEME = gr.themes.Soft().set(
    button_primary_background_fill="*primary_600", button_primary_background_fill_hover="*primary_700",
    block_title_text_color="*primary_700", block_label_text_color="*primary_700",
    body_text_color_subdued="*neutral_600")
# Long words (a case's place names, a pasted question) wrap instead of widening a phone's page.
CSS = "#chat, #transcript, #case-file, #briefing, #result { overflow-wrap: anywhere; }"


def briefing_markdown(b: Briefing) -> str:
    s = b.suspect
    return (f"## {b.title}\n\n{b.briefing}\n\n**Suspect:** {s.name}, {s.age}, {s.role}.\n\n"
            f"_{b.suspect_note}_\n\n{RULES.format(n=b.max_questions)}")


def case_file_markdown(b: Briefing) -> str:
    """What the player may need again while questioning: the briefing and who the suspect is."""
    s = b.suspect
    return (f"## 🗂️ Case file: {b.title}\n\n{b.briefing}\n\n### Suspect\n\n**{s.name}**, {s.age}, {s.role}  \n"
            f"_{b.suspect_note}_")


def status(text: str) -> str:
    """A line of `#progress`: a live region, so a screen reader hears each change of the game's state."""
    return f'<p role="status">{text}</p>'


def counter(room: Room, game_id: str) -> str:
    session = room.session(game_id)
    if session.phase is Phase.VERDICT:
        return status(f"All {session.max_questions} questions asked: give your verdict.")
    return status(f"Question {session.questions_asked + 1} of {session.max_questions}")


def thinking(name: str) -> str:
    return status(f'{html.escape(name)} is thinking… <span class="elapsed" aria-hidden="true">0 s</span>')


def standing(correct: bool, record: CaseRecord) -> str:
    """How this player did against everyone who has played the case, this game included."""
    missed = record.played - record.solved
    rate = f"{record.solved} of {record.played} players got this case right ({round(100 * record.solved / record.played)}%)"
    if correct:
        return rate + (": you are one of them." if record.solved > 1 else ": you are the only one so far.")
    return rate + (f"; you are among the {missed} who missed it." if missed > 1 else "; you are the only one who missed it.")


def score_markdown(score: Score) -> str:
    if not score.played:
        return "Your score: no verdicts yet."
    return f"Your score: **{score.right} of {score.played}** verdicts right · current streak **{score.streak}**"


def transcript_messages(verdict: Verdict) -> list[dict]:
    """The game's exchanges, each answer followed by what it gave away: a tell slipped, or a quirk that misled.

    The marks are lines of the answer's own message: Gradio's collapsible message titles have unnamed buttons."""
    mark = "🔎 A slip: " if verdict.result.guilty else "🎭 A quirk, not guilt: "
    messages = []
    for exchange, slipped in zip(verdict.result.transcript, verdict.slips):
        answer = "\n\n".join([exchange.answer, *(mark + text for text in slipped)])
        messages += [{"role": "user", "content": html.escape(exchange.question, quote=False)},
                     {"role": "assistant", "content": html.escape(answer, quote=False)}]
    return messages


def refusal(exc: Exception) -> gr.Error:
    """A move the rules refuse, shown to the player as a toast; it is play, not a server fault: no traceback logged."""
    return gr.Error(str(exc), print_exception=False)


def build_app(room: Room, answers_at_once: int = ANSWERS_AT_ONCE) -> gr.Blocks:
    choices = [RANDOM] + [(f"{c.case.title}", case_id) for case_id, c in sorted(room.cases.items())]

    with gr.Blocks(title="Interrogation Room") as demo:
        game_id = gr.State(None)
        score = gr.State(Score())  # on the server, per browser session: a reload starts a new score
        gr.Markdown(TITLE)
        score_line = gr.Markdown(score_markdown(Score()), elem_id="score")
        with gr.Column(visible=True) as briefing_screen:
            briefing = gr.Markdown(elem_id="briefing")
            with gr.Row():
                case_choice = gr.Dropdown(choices, value=RANDOM, label="Case", elem_id="case-choice", scale=2)
                # Off until the case on screen is the one the server holds for this player: see `lock` below.
                begin = gr.Button("Begin questioning", variant="primary", elem_id="begin", interactive=False)
                other = gr.Button("Another case", elem_id="another-case")
        with gr.Column(visible=False) as questioning_screen:
            with gr.Row(equal_height=False):
                with gr.Column(scale=3, min_width=300):
                    # render_markdown=False: a player's words are shown as typed, `[x](y)` and `**` included; the
                    # HTML in them is escaped below, so nothing a player types takes effect on the page.
                    chat = gr.Chatbot(label="Interrogation", height=420, elem_id="chat", sanitize_html=True,
                                      render_markdown=False, buttons=["copy_all"],
                                      placeholder="The suspect waits for your first question.")
                    progress = gr.Markdown(elem_id="progress")
                    with gr.Row():
                        question = gr.Textbox(placeholder="Ask the suspect a question…", label="Your question",
                                              show_label=False, scale=4, max_length=500, elem_id="question",
                                              submit_btn=False)
                        ask = gr.Button("Ask", variant="primary", elem_id="ask", scale=1, min_width=80)
                    with gr.Row():
                        guilty = gr.Button("Guilty", variant="stop", interactive=False, elem_id="guilty")
                        innocent = gr.Button("Not guilty", interactive=False, elem_id="innocent")
                with gr.Column(scale=2, min_width=260, elem_id="case-file"):
                    case_file = gr.Markdown()
                    # Never an input of any event: what the player writes here stays in their browser.
                    notes = gr.Textbox(label="Your notes", lines=4, elem_id="notes", interactive=True,
                                       placeholder="Times, places, anything that does not add up…",
                                       info="Only in this browser tab: never sent to the server.")
        with gr.Column(visible=False) as result_screen:
            result = gr.Markdown(elem_id="result")
            # As tall as the game was: the whole transcript is on screen, from the first question.
            transcript = gr.Chatbot(label="Transcript", height=None, autoscroll=False, elem_id="transcript",
                                    sanitize_html=True, render_markdown=False, buttons=["copy_all"])
            again = gr.Button("New case", variant="primary", elem_id="new-case")

        def start(choice: str | None):
            try:
                b = room.new_game(None if choice in (None, RANDOM) else choice)
            except UnknownCase as exc:
                raise refusal(exc) from exc
            return (b.game_id, briefing_markdown(b), gr.Column(visible=True), gr.Column(visible=False),
                    gr.Column(visible=False), case_file_markdown(b), "", [],
                    status(f"Question 1 of {b.max_questions}"), gr.Button(interactive=False),
                    gr.Button(interactive=False), gr.Textbox(value="", interactive=True), gr.Button(interactive=True),
                    gr.Button(interactive=True))

        start_outputs = [game_id, briefing, briefing_screen, questioning_screen, result_screen, case_file, notes,
                         chat, progress, guilty, innocent, question, ask, begin]

        def lock():
            # Begin plays the game the server holds for this player; until the new one's briefing is back, that
            # is still the case on screen before the choice, so Begin waits.
            return gr.Button(interactive=False)

        demo.load(start, case_choice, start_outputs, api_name="new_game")
        case_choice.input(lock, None, begin, queue=False, api_visibility="private").then(
            start, case_choice, start_outputs, api_visibility="private")
        other.click(lock, None, begin, queue=False, api_visibility="private").then(
            lambda: (RANDOM, *start(RANDOM)), None, [case_choice, *start_outputs], api_visibility="private")
        again.click(lock, None, begin, queue=False, api_visibility="private").then(
            start, case_choice, start_outputs, api_visibility="private")
        begin.click(lambda: (gr.Column(visible=False), gr.Column(visible=True)), None,
                    [briefing_screen, questioning_screen], api_visibility="private").then(None, js=FOCUS_QUESTION)

        def refuse(text: str, gid: str | None):
            # A refusal raised here, in an event without outputs, is a toast and nothing else; raised from
            # `interrogate`, Gradio would also cover the whole chat with an "Error" badge until dismissed.
            try:
                room.check_question(gid, text)
            except (MoveRefused, UnknownGame) as exc:
                raise refusal(exc) from exc

        def lock_question():
            """The question box and the buttons, while the suspect answers."""
            return gr.Textbox(interactive=False), *[gr.Button(interactive=False)] * 3

        def interrogate(text: str, gid: str | None, history: list):
            try:
                stream = room.ask(gid, text)  # refuses again, atomically: API callers and double submits land here
            except (MoveRefused, UnknownGame) as exc:
                raise refusal(exc) from exc
            shown = html.escape(" ".join(text.split()), quote=False)  # a question is shown as text, never as markup
            history = [*history, {"role": "user", "content": shown}, {"role": "assistant", "content": "…"}]
            waiting = thinking(room.persona(gid).name)
            yield history, waiting, ""  # the question leaves the box for the chat
            try:
                for partial in stream:
                    history[-1] = {"role": "assistant", "content": html.escape(partial, quote=False)}
                    # The line and the box as they are: Gradio sends only what changed. A value is cheap to process
                    # where gr.skip() is a component update, which Gradio rebuilds as a new component each time.
                    yield history, waiting, ""
            except EngineUnavailable as exc:
                # The room has withdrawn the question: the chat goes back to before it, and the question back into
                # the box, so that asking again is one click; the message says what happened, there and as a toast.
                gr.Warning(str(exc))
                yield history[:-2], status(f"⚠️ {html.escape(str(exc), quote=False)}"), text
                return
            # What an API caller is left with: the counter. The box opens in the next step (controls), once the page
            # shows the counter: never "is thinking" beside an open box.
            yield history, counter(room, gid), ""

        def controls(gid: str | None):
            """The question box and the buttons as the rules now allow, after an answer or a failed one."""
            try:
                session = room.session(gid)
            except UnknownGame:
                return status("This game has ended: start a new case."), *[gr.update()] * 4
            answered = bool(session.transcript)
            return (counter(room, gid), gr.Textbox(interactive=True), gr.Button(interactive=answered),
                    gr.Button(interactive=answered), gr.Button(interactive=session.phase is Phase.QUESTIONING))

        question_outputs = [progress, question, guilty, innocent, ask]
        # A question that will be answered locks the box and the buttons at once, in a step of its own (the answer's
        # streamed updates then carry only the chat and the line under it), and waits its turn for the suspect, its
        # place in the queue on the progress line.
        gr.on([ask.click, question.submit], refuse, [question, game_id], None, api_visibility="private").success(
            lock_question, None, question_outputs[1:], queue=False, show_progress="hidden",
            api_visibility="private").success(
            interrogate, [question, game_id, chat], [chat, progress, question], api_name="ask",
            show_progress="minimal", show_progress_on=progress,
            concurrency_limit=answers_at_once).then(
            controls, game_id, question_outputs, api_visibility="private", show_progress="hidden").then(
            None, js=FOCUS_QUESTION)

        def decide(accused: bool, gid: str | None, score_so_far: Score):
            try:
                verdict = room.decide(gid, accused)
            except (MoveRefused, UnknownGame) as exc:
                raise refusal(exc) from exc
            r = verdict.result
            headline = "✅ You were right." if r.correct else "❌ You were wrong."
            said = "guilty" if r.accused else "not guilty"
            text = (f"## {headline}\n\nYou said **{said}**; the suspect was "
                    f"**{'guilty' if r.guilty else 'innocent'}**.\n\n### What really happened\n{html.escape(r.truth, quote=False)}")
            if verdict.record is not None:
                text += f"\n\n_{standing(r.correct, verdict.record)}_"
            shown = sum(map(bool, verdict.slips))
            what = "let something slip" if r.guilty else "looked shifty without being guilty"
            text += (f"\n\nThe transcript marks the {shown} answer{'s' * (shown != 1)} in which the suspect {what}."
                     if shown else f"\n\nIn none of the answers did the suspect {what}.")
            new_score = score_so_far.after(r.correct)
            return (text, transcript_messages(verdict), gr.Column(visible=False), gr.Column(visible=True),
                    gr.Button(interactive=False), gr.Button(interactive=False), new_score, score_markdown(new_score))

        decide_outputs = [result, transcript, questioning_screen, result_screen, guilty, innocent, score, score_line]
        guilty.click(lambda gid, s: decide(True, gid, s), [game_id, score], decide_outputs, api_name="guilty")
        innocent.click(lambda gid, s: decide(False, gid, s), [game_id, score], decide_outputs, api_name="innocent")
    return demo


def launch(room: Room, answers_at_once: int = ANSWERS_AT_ONCE, **launch_args) -> gr.Blocks:
    """Serve the page as `make play` does, queue and theme included (the tests serve it through here too)."""
    # Gradio asks matplotlib for its backend around every event it runs; while that is still matplotlib's "auto", the
    # first ask imports pyplot, ~0.7 s holding the GIL in the middle of the first players' answers. The page draws no
    # plot on a display: Agg from the start.
    matplotlib.use("agg")
    # Gradio's queue sums up every event it has run (a pandas table of up to 10,000, for its API page's timings) each
    # time one ends: with 20 players ~8% of the 2 cores, and growing with the server's age. Once in 1,000 events.
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")
    # Other events are quick: at most four of each at once, more players wait in Gradio's queue, which shows their place.
    demo = build_app(room, answers_at_once).queue(default_concurrency_limit=4)
    demo.launch(theme=THEME, js=PAGE_JS, css=CSS, **launch_args)
    return demo


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the Interrogation Room game.")
    parser.add_argument("--host", default=None, help="interface to bind (default 127.0.0.1, or $GRADIO_SERVER_NAME)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860, or $GRADIO_SERVER_PORT)")
    parser.add_argument("--base", default=None, help="base model: embedded, a .gguf, a Llama folder or a hub id")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        room = open_room(GameConfig.from_env(base=args.base))
    except (ConfigError, EngineUnavailable) as exc:  # a setting or the model server: say which, not a traceback
        raise SystemExit(f"error: {exc}") from None
    launch(room, server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
