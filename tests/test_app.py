"""A whole game through the served Gradio app, driven over its API with gradio_client."""

import json

import pytest
from gradio_client import Client

from conftest import MINIMAL_CASE
from game.config import GameConfig
from game.room import open_room

INNOCENT = json.loads(json.dumps(MINIMAL_CASE)) | {
    "id": "greenhouse-innocent", "guilty": False, "tells": [], "quirks": ["Hums when nervous."],
    "truth": "A raccoon broke the pane and the orchid was knocked into the compost; nobody stole it.",
}
QUESTIONS = ["Where were you last night?", "Who has a key?", "What did you see in the morning?",
             "Why is the pane broken?", "Did you take the orchid?"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("app")
    (folder / "scenarios").mkdir()
    for case in (MINIMAL_CASE, INNOCENT):
        (folder / "scenarios" / f"{case['id']}.json").write_text(json.dumps(case))
    (folder / "scenarios" / "broken.json").write_text('{"id": ')  # must not stop the app
    room = open_room(GameConfig(scenarios=folder / "scenarios", adapters=folder / "adapters",
                                results=folder / "results.db"))
    from app import build_app
    demo = build_app(room).queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    yield room, Client(url, verbose=False)
    demo.close()


def test_briefing_shows_the_case_but_not_its_truth(served):
    _, client = served
    shown = json.dumps(client.predict(MINIMAL_CASE["id"], api_name="/new_game"))
    assert "The Greenhouse Orchid" in shown and "Ivo Brandt" in shown
    assert MINIMAL_CASE["truth"] not in shown and "guilty\": true" not in shown


def test_unknown_case_is_a_clear_error(served):
    _, client = served
    with pytest.raises(Exception, match="no-such-case is not in the list of choices"):
        client.predict("no-such-case", api_name="/new_game")


def text_of(message):
    content = message["content"]
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def play(client, case_id, questions):
    client.predict(case_id, api_name="/new_game")  # one Client is one browser session: it keeps the game id
    answers = []
    for question in questions:
        history, *_ = client.predict(question, [], api_name="/ask")
        assert text_of(history[-2]) == question
        answers.append(text_of(history[-1]))
    return answers


def test_a_full_guilty_game_refuses_the_sixth_question_and_records_the_result(served):
    room, client = served
    answers = play(client, MINIMAL_CASE["id"], QUESTIONS)
    assert len(answers) == 5 and all(answers)
    assert MINIMAL_CASE["truth"] not in json.dumps(answers)
    with pytest.raises(Exception, match="all 5 questions"):
        client.predict("A sixth?", [], api_name="/ask")
    result_text, transcript, *_ = client.predict(api_name="/guilty")
    assert "You were right" in result_text and MINIMAL_CASE["truth"] in result_text
    assert "1 of 1 players got this case right" in result_text
    # Each answer, then the tells it let slip, if any, as lines of its message.
    assert [text_of(m).split("\n\n🔎 A slip: ")[0] for m in transcript[1::2]] == answers
    with pytest.raises(Exception, match="already been given"):
        client.predict(api_name="/innocent")
    [game] = room.store.games(MINIMAL_CASE["id"])
    assert game["correct"] and game["questions"] == 5 and game["transcript"][0]["question"] == QUESTIONS[0]


def test_an_early_wrong_verdict_on_an_innocent_suspect(served):
    _, client = served
    play(client, INNOCENT["id"], QUESTIONS[:1])
    result_text, *_ = client.predict(api_name="/guilty")
    assert "You were wrong" in result_text and INNOCENT["truth"] in result_text


def test_question_with_markup_is_shown_as_text(served):
    _, client = served
    client.predict(MINIMAL_CASE["id"], api_name="/new_game")
    history, *_ = client.predict("<script>alert(1)</script>Who?", [], api_name="/ask")
    assert text_of(history[-2]) == "&lt;script&gt;alert(1)&lt;/script&gt;Who?"


def test_the_verdict_says_how_the_player_did_against_everyone_on_the_case():
    from app import standing
    from game.results import CaseRecord

    assert standing(True, CaseRecord(played=1, solved=1)) == (
        "1 of 1 players got this case right (100%): you are the only one so far.")
    assert standing(True, CaseRecord(played=4, solved=3)) == "3 of 4 players got this case right (75%): you are one of them."
    assert standing(False, CaseRecord(played=4, solved=3)) == (
        "3 of 4 players got this case right (75%); you are the only one who missed it.")
    assert standing(False, CaseRecord(played=3, solved=0)) == (
        "0 of 3 players got this case right (0%); you are among the 3 who missed it.")
def test_a_restarted_server_tells_the_player_their_game_was_lost(served, tmp_path):
    # A game in progress lives in the memory of the web server that started it: after a restart the page's next
    # move reaches a server that never heard of it, and the player is told so rather than shown a failure.
    from app import build_app
    from conftest import free_port
    from game.room import Room

    room, _ = served
    port = free_port()

    def start():
        demo = build_app(Room(room.cases, room.suspect, room.notes, room.store)).queue()
        demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
        return demo

    demo = start()
    player = Client(f"http://127.0.0.1:{port}/", verbose=False)
    player.predict(MINIMAL_CASE["id"], api_name="/new_game")
    player.predict("Where were you last night?", [], api_name="/ask")
    demo.close()
    demo = start()
    try:
        with pytest.raises(Exception, match="Your game was lost: the server restarted"):
            player.predict("And after that?", [], api_name="/ask")
        with pytest.raises(Exception, match="Your game was lost: the server restarted"):
            player.predict(api_name="/guilty")
    finally:
        demo.close()
