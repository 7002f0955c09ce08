"""The browser game: a Gradio page over `game.room.Room`. It holds no rules and no secrets.

    python app.py [--host 127.0.0.1] [--port 7860] [--base embedded]

The browser keeps only an opaque game id (in `gr.State`); the case, its truth and the session stay on the server.
"""

from __future__ import annotations

import argparse
import html
import logging

import gradio as gr

from game.config import ConfigError, GameConfig
from game.remote import EngineUnavailable
from game.room import Briefing, Room, UnknownCase, UnknownGame, open_room
from game.session import MoveRefused, Phase

RANDOM = "A random case"
TITLE = "# 🕵️ Interrogation Room"
RULES = "Read the briefing, ask the suspect up to **{n} questions**, then decide: guilty or not guilty?"


def briefing_markdown(b: Briefing) -> str:
    s = b.suspect
    return (f"## {b.title}\n\n{b.briefing}\n\n**Suspect:** {s.name}, {s.age}, {s.role}.\n\n"
            f"_{b.suspect_note}_\n\n{RULES.format(n=b.max_questions)}")


def counter(room: Room, game_id: str) -> str:
    session = room.session(game_id)
    if session.phase is Phase.VERDICT:
        return f"All {session.max_questions} questions asked: give your verdict."
    return f"Question {session.questions_asked + 1} of {session.max_questions}"


def refusal(exc: Exception) -> gr.Error:
    """A move the rules refuse, shown to the player as a toast; it is play, not a server fault: no traceback logged."""
    return gr.Error(str(exc), print_exception=False)


def build_app(room: Room) -> gr.Blocks:
    choices = [RANDOM] + [(f"{c.case.title}", case_id) for case_id, c in sorted(room.cases.items())]

    with gr.Blocks(title="Interrogation Room") as demo:
        game_id = gr.State(None)
        gr.Markdown(TITLE)
        with gr.Column(visible=True) as briefing_screen:
            briefing = gr.Markdown()
            with gr.Row():
                begin = gr.Button("Begin questioning", variant="primary", elem_id="begin")
                case_choice = gr.Dropdown(choices, value=RANDOM, label="Case", elem_id="case-choice", scale=2)
                other = gr.Button("Another case", elem_id="another-case")
        with gr.Column(visible=False) as questioning_screen:
            summary = gr.Markdown()
            # render_markdown=False: a player's words are shown as typed, `[x](y)` and `**` included; the HTML in
            # them is escaped below, so nothing a player types takes effect on the page.
            chat = gr.Chatbot(label="Interrogation", height=420, elem_id="chat", sanitize_html=True,
                              render_markdown=False, buttons=["copy_all"],
                              placeholder="The suspect waits for your first question.")
            progress = gr.Markdown(elem_id="progress")
            with gr.Row():
                question = gr.Textbox(placeholder="Ask the suspect a question…", show_label=False, scale=4,
                                      max_length=500, elem_id="question", submit_btn=False)
                ask = gr.Button("Ask", variant="primary", elem_id="ask", scale=1)
            with gr.Row():
                guilty = gr.Button("Guilty", variant="stop", interactive=False, elem_id="guilty")
                innocent = gr.Button("Not guilty", interactive=False, elem_id="innocent")
        with gr.Column(visible=False) as result_screen:
            result = gr.Markdown(elem_id="result")
            # As tall as the game was: the whole transcript is on screen, from the first question.
            transcript = gr.Chatbot(label="Transcript", height=None, autoscroll=False, elem_id="transcript",
                                    sanitize_html=True, render_markdown=False, buttons=["copy_all"])
            again = gr.Button("New case", variant="primary", elem_id="new-case")

        def start(choice: str):
            try:
                b = room.new_game(None if choice in (None, RANDOM) else choice)
            except UnknownCase as exc:
                raise refusal(exc) from exc
            return (b.game_id, briefing_markdown(b), gr.Column(visible=True), gr.Column(visible=False),
                    gr.Column(visible=False), f"**{b.title}** — {b.suspect.name}, {b.suspect.role}", [],
                    f"Question 1 of {b.max_questions}", gr.Button(interactive=False), gr.Button(interactive=False),
                    gr.Textbox(value="", interactive=True), gr.Button(interactive=True))

        start_outputs = [game_id, briefing, briefing_screen, questioning_screen, result_screen, summary, chat,
                         progress, guilty, innocent, question, ask]
        demo.load(start, case_choice, start_outputs, api_name="new_game")
        other.click(start, case_choice, start_outputs, api_visibility="private")
        again.click(start, case_choice, start_outputs, api_visibility="private")
        begin.click(lambda: (gr.Column(visible=False), gr.Column(visible=True)), None,
                    [briefing_screen, questioning_screen], api_visibility="private")

        def refuse(text: str, gid: str | None):
            # A refusal raised here, in an event without outputs, is a toast and nothing else; raised from
            # `interrogate`, Gradio would also cover the whole chat with an "Error" badge until dismissed.
            try:
                room.check_question(gid, text)
            except (MoveRefused, UnknownGame) as exc:
                raise refusal(exc) from exc

        def interrogate(text: str, gid: str | None, history: list):
            try:
                stream = room.ask(gid, text)  # refuses again, atomically: API callers and double submits land here
            except (MoveRefused, UnknownGame) as exc:
                raise refusal(exc) from exc
            shown = html.escape(" ".join(text.split()), quote=False)  # a question is shown as text, never as markup
            history = [*history, {"role": "user", "content": shown}, {"role": "assistant", "content": "…"}]
            locked = gr.Button(interactive=False)
            yield history, "", "The suspect is answering…", locked, locked, gr.Button(interactive=False)
            try:
                for partial in stream:
                    history[-1] = {"role": "assistant", "content": html.escape(partial, quote=False)}
                    yield history, "", "The suspect is answering…", locked, locked, gr.Button(interactive=False)
            except EngineUnavailable as exc:
                # The room has withdrawn the question: the chat goes back to before it, and the question back into
                # the box, so that asking again is one click; the message says what happened, there and as a toast.
                gr.Warning(str(exc))
                decidable = gr.Button(interactive=room.session(gid).questions_asked > 0)
                yield history[:-2], text, f"⚠️ {exc}", decidable, decidable, gr.Button(interactive=True)
                return
            open_ = gr.Button(interactive=True)
            more = room.session(gid).phase is Phase.QUESTIONING
            yield history, "", counter(room, gid), open_, open_, gr.Button(interactive=more)

        gr.on([ask.click, question.submit], refuse, [question, game_id], None, api_visibility="private").success(
            interrogate, [question, game_id, chat], [chat, question, progress, guilty, innocent, ask], api_name="ask")

        def decide(accused: bool, gid: str | None):
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
                rec = verdict.record
                text += f"\n\n_{rec.solved} of {rec.played} players got this case right._"
            history = [{"role": role, "content": html.escape(said, quote=False)} for e in r.transcript
                       for role, said in (("user", e.question), ("assistant", e.answer))]
            return (text, history, gr.Column(visible=False), gr.Column(visible=True),
                    gr.Button(interactive=False), gr.Button(interactive=False))

        decide_outputs = [result, transcript, questioning_screen, result_screen, guilty, innocent]
        guilty.click(lambda gid: decide(True, gid), game_id, decide_outputs, api_name="guilty")
        innocent.click(lambda gid: decide(False, gid), game_id, decide_outputs, api_name="innocent")
    return demo


def launch(room: Room, **launch_args) -> gr.Blocks:
    """Serve the page as `make play` does, queue and theme included (the tests serve it through here too)."""
    # At most four runs of each event at once; more players wait in Gradio's queue, which shows them their place.
    demo = build_app(room).queue(default_concurrency_limit=4)
    demo.launch(theme=gr.themes.Soft(), **launch_args)
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
