import pytest

from game.session import (
    MAX_QUESTION_CHARS, InvalidQuestion, NoQuestionsLeft, OutOfOrder, Phase, Session, VerdictAlreadyGiven,
)


def started(guilty=True):
    return Session(case_id="c", guilty=guilty, truth="the butler did it").begin()


def asked(session, n):
    for i in range(n):
        session = session.ask(f"question {i}?").answer(f"answer {i}.")
    return session


def test_a_game_starts_at_the_briefing():
    session = Session(case_id="c", guilty=False, truth="t")
    assert session.phase is Phase.BRIEFING
    with pytest.raises(OutOfOrder):
        session.ask("Where were you?")
    assert session.begin().phase is Phase.QUESTIONING


def test_beginning_twice_is_refused():
    with pytest.raises(OutOfOrder):
        started().begin()


def test_question_then_answer_is_recorded_in_order():
    session = started().ask("  Where were   you?  ")
    assert session.phase is Phase.ANSWERING and session.pending == "Where were you?"
    session = session.answer(" At home. ")
    assert session.phase is Phase.QUESTIONING
    assert [(e.question, e.answer) for e in session.transcript] == [("Where were you?", "At home.")]
    assert session.questions_asked == 1 and session.questions_left == 4


def test_sixth_question_is_refused():
    session = asked(started(), 5)
    assert session.phase is Phase.VERDICT
    with pytest.raises(NoQuestionsLeft, match="all 5 questions"):
        session.ask("One more?")


def test_empty_question_is_refused():
    with pytest.raises(InvalidQuestion, match="empty"):
        started().ask("   \n ")


def test_over_long_question_is_refused_and_limit_is_inclusive():
    started().ask("x" * MAX_QUESTION_CHARS)
    with pytest.raises(InvalidQuestion, match="limit is 500"):
        started().ask("x" * (MAX_QUESTION_CHARS + 1))


def test_asking_while_the_suspect_answers_is_refused():
    with pytest.raises(OutOfOrder, match="still answering"):
        started().ask("a?").ask("b?")


def test_answer_without_a_question_is_refused():
    with pytest.raises(OutOfOrder):
        started().answer("hello")


def test_withdrawn_question_does_not_count():
    session = started().ask("a?").withdraw()
    assert session.phase is Phase.QUESTIONING and session.questions_asked == 0


def test_verdict_before_any_answer_is_refused():
    with pytest.raises(OutOfOrder, match="at least one question"):
        started().decide(True)
    with pytest.raises(OutOfOrder, match="wait for the suspect"):
        started().ask("a?").decide(True)


@pytest.mark.parametrize("guilty,accused,correct", [(True, True, True), (True, False, False),
                                                    (False, False, True), (False, True, False)])
def test_early_verdict_gives_a_result(guilty, accused, correct):
    session = asked(started(guilty), 2).decide(accused)
    assert session.phase is Phase.RESULT
    r = session.result
    assert (r.accused, r.guilty, r.correct, r.truth) == (accused, guilty, correct, "the butler did it")
    assert len(r.transcript) == 2


def test_verdict_given_twice_is_refused():
    session = asked(started(), 1).decide(True)
    with pytest.raises(VerdictAlreadyGiven):
        session.decide(False)
    with pytest.raises(OutOfOrder):
        session.ask("and now?")


def test_refused_move_changes_nothing():
    session = asked(started(), 5)
    try:
        session.ask("sixth?")
    except NoQuestionsLeft:
        pass
    assert session.phase is Phase.VERDICT and len(session.transcript) == 5
