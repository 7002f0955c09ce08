"""What the result screen marks on a finished game's answers, and the score a browser session keeps."""

import json

from conftest import INNOCENT_CASE, MINIMAL_CASE, ROOT
from game.review import quirk_words, slips
from game.scenario import Case
from game.score import Score
from game.session import Exchange

GUILTY = Case.model_validate(MINIMAL_CASE | {"tells": [
    {"text": "He knows the orchid was wrapped in newspaper.", "keywords": ["newspaper"]},
    {"text": "He names the collector.", "keywords": ["Mr Vance", "the collector"]}]})
INNOCENT = Case.model_validate(INNOCENT_CASE | {"quirks": ["Hums Latin names when nervous.",
                                                           "Keeps polishing his spectacles."]})


def exchanges(*answers):
    return [Exchange(f"question {i}?", a) for i, a in enumerate(answers)]


def test_a_guilty_answer_is_marked_with_each_tell_it_slips():
    marks = slips(GUILTY, exchanges("I locked up at six.", "Wrapped in Newspaper, I imagine.",
                                    "The collector, Mr Vance, loved it; newspapers everywhere."))
    assert marks == ((), ("He knows the orchid was wrapped in newspaper.",),
                     ("He knows the orchid was wrapped in newspaper.", "He names the collector."))


def test_a_tell_needs_its_whole_keyword_not_a_word_containing_it():
    assert slips(GUILTY, exchanges("The newspaperman came by.")) == ((),)


def test_an_innocent_answer_is_marked_with_the_quirk_it_shows_never_with_a_tell():
    marks = slips(INNOCENT, exchanges("Ah, Paphiopedilum, the Latin is lovely.", "My spectacles, sorry.",
                                      "I went home at six.", "It was wrapped in newspaper."))
    assert marks == (("Hums Latin names when nervous.",), ("Keeps polishing his spectacles.",), (), ())


def test_a_quirk_stands_for_its_distinctive_words_not_its_common_ones():
    assert quirk_words("She keeps wiping diesel off her hands with a rag while she talks.") == ("wiping", "diesel",
                                                                                                "hands")
    assert quirk_words("He apologises constantly, which sounds rehearsed.") == ("apologises", "rehearsed")


def test_every_bundled_quirk_has_words_to_show_it_by():
    for path in sorted((ROOT / "scenarios").glob("*.json")):
        if path.name != "schema.json":
            for quirk in json.loads(path.read_text()).get("quirks", []):
                assert quirk_words(quirk), f"{path.name}: '{quirk}' has no distinctive word"


def test_the_score_counts_games_right_verdicts_and_the_streak():
    score = Score().after(True).after(True)
    assert score == Score(played=2, right=2, streak=2)
    score = score.after(False)
    assert score == Score(played=3, right=2, streak=0)
    assert score.after(True) == Score(played=4, right=3, streak=1)
