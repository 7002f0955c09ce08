"""Guesses at an answer's next tokens: the longest matching run of the text's end in the sources wins."""

from game.drafts import MAX_N, Drafts


def test_the_longest_matching_suffix_picks_the_source():
    drafts = Drafts([[1, 2, 3, 4, 5], [9, 2, 3, 7, 8], [2, 3, 6]])
    assert drafts.guess([0, 2, 3], 2) == [4, 5]  # 2 3 first appears in the first source
    assert drafts.guess([9, 2, 3], 2) == [7, 8]  # 9 2 3 is longer
    assert drafts.guess([5, 9, 2, 3], 5) == [7, 8]  # a source's end cuts the guess short


def test_no_guess_without_a_long_enough_match_or_room():
    drafts = Drafts([[1, 2, 3, 4, 5]])
    assert drafts.guess([7, 3], 3) == []  # only one token matches
    assert drafts.guess([4, 5], 3) == []  # nothing follows in the source
    assert drafts.guess([2], 3) == []
    assert drafts.guess([1, 2], 0) == []
    assert Drafts([]).guess([1, 2], 3) == []


def test_matches_longer_than_max_n_still_guess():
    source = list(range(100, 130))
    drafts = Drafts([source, [0] + source[2 * MAX_N:2 * MAX_N + 2] + [1]])
    assert drafts.guess(source[:2 * MAX_N + 2], 1) == [source[2 * MAX_N + 2]]  # the last MAX_N decide


def test_a_guess_stops_at_the_end_of_an_answer():
    drafts = Drafts([[1, 2, 3, 0, 5, 6]], ends={0})
    assert drafts.guess([1, 2], 5) == [3, 0]
    assert drafts.guess([3, 0], 5) == [5, 6]
