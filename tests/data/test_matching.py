"""Table-driven tests of free-text answer matching (modality_circuits.data.matching)."""

from __future__ import annotations

from pathlib import Path

import pytest

from modality_circuits.data.matching import classify, matches, normalize_answer
from modality_circuits.data.mc2 import load_mc2
from modality_circuits.data.sample import Sample

MC2 = Path(__file__).resolve().parents[1] / "fixtures" / "mc2_small.json"


@pytest.mark.parametrize("raw, norm", [
    ("Red", "red"),                                  # case
    ("RED!!!", "red"),                               # punctuation
    ("  red \n\t car ", "red car"),                  # whitespace
    ("The cat", "cat"),                              # articles
    ("a dog", "dog"),
    ("An apple", "apple"),
    ("another", "another"),                          # only whole-word articles
    ("two", "2"),                                    # number words -> digits
    ("Twenty-one", "21"),
    ("twenty", "20"),
    ("zero", "0"),
    ("3", "3"),
    ("\uff13", "3"),                                 # full-width digit (NFKC)
    ("\uff32\uff45\uff44", "red"),                   # full-width letters (NFKC)
    ("It's", "its"),                                 # apostrophes dropped
    ("It\u2019s", "its"),
    ("black-and-white", "black and white"),
    ("两个。", "两个"),                              # CJK punctuation
    ("The answer is 2.", "answer is 2"),
    ("", ""),
    ("the", ""),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.mark.parametrize("generation, candidates, expected", [
    # case, punctuation, whitespace, articles
    ("Red.", ["red"], True),
    ("  RED  ", ["red"], True),
    ("The red one", ["red"], True),
    ("a dog", ["dog"], True),
    # whole words only
    ("reddish", ["red"], False),
    ("red-ish", ["red"], True),                      # hyphen splits words
    ("redder than blue", ["red"], False),
    ("bluebird", ["blue"], False),
    # answer at the start, after lead-ins
    ("The answer is red.", ["red"], True),
    ("The answer is: red", ["red"], True),
    ("Answer: red", ["red"], True),
    ("It's red.", ["red"], True),
    ("There are two dogs.", ["two"], True),
    ("They are standing", ["standing"], True),
    ("red car parked outside", ["red"], True),
    ("red car", ["red car"], True),
    ("red", ["red car"], False),
    ("The car is red.", ["red"], False),             # not at the start (default mode)
    ("not blue", ["blue"], False),                   # negation: never a match
    ("blue, not red", ["red"], False),
    ("blue, not red", ["blue"], True),
    # numbers: words == digits
    ("2", ["two"], True),
    ("two", ["2"], True),
    ("Two dogs", ["2"], True),
    ("21", ["twenty-one"], True),
    ("twenty one", ["21"], True),
    ("12", ["one"], False),
    ("1", ["one"], True),
    ("II", ["2", "II"], True),
    # non-ASCII (Chinese) synonyms: exact after NFKC / punctuation
    ("两个", ["two", "两个"], True),
    ("两个。", ["两个"], True),
    ("The answer is 两个", ["两个"], True),
    ("一对", ["一"], False),                         # no substring match
    ("两个人", ["两个"], False),
    ("两", ["两个"], False),
    ("\uff13", ["3"], True),                         # full-width digit
    ("3", ["\uff13"], True),
    # empty things
    ("", ["red"], False),
    ("red", [], False),
    ("red", ["", "the"], False),                     # candidates normalizing to nothing never match
])
def test_matches(generation, candidates, expected):
    assert matches(generation, candidates) is expected


@pytest.mark.parametrize("generation, candidates, expected", [
    ("The giraffes are standing.", ["standing"], True),
    ("The car is red.", ["red"], True),
    ("The car is not red.", ["red"], False),
    ("It isn't red", ["red"], False),
    ("reddish", ["red"], False),
    ("两个人", ["两个"], False),                     # non-ASCII stays exact
    ("There are two of them", ["two"], True),
])
def test_matches_anywhere(generation, candidates, expected):
    assert matches(generation, candidates, anywhere=True) is expected


def _sample(follow="image", img="red", txt="green", img_c=(), txt_c=()) -> Sample:
    return Sample(image=None, context="ctx", instruction=None, question="q?", constraint=None, answer_img=img,
                  answer_text=txt, follow=follow, answer_img_candidates=list(img_c),
                  answer_text_candidates=list(txt_c))


@pytest.mark.parametrize("generation, follow, expected", [
    ("Red", "image", "follow"),
    ("Red", "text", "competitor"),
    ("green.", "image", "competitor"),
    ("The answer is green", "text", "follow"),
    ("红色", "image", "follow"),                     # Chinese synonym of the image answer
    ("绿色", "image", "competitor"),
    ("blue", "image", "other"),
    ("reddish", "image", "other"),
    ("", "image", "other"),
    ("red, not green", "image", "follow"),
    ("green, not red", "image", "competitor"),
    ("red and white", "image", "competitor"),        # same start: the longer (more specific) answer wins
    ("red and white", "text", "follow"),
    ("shared", "image", "other"),                    # a synonym on both sides: ambiguous
])
def test_classify(generation, follow, expected):
    s = _sample(follow, img_c=["Red", "红色", "shared"], txt_c=["red and white", "绿色", "shared"])
    assert classify(generation, s) == expected


@pytest.mark.parametrize("generation, expected", [
    ("The car is red, not green.", "follow"),        # earlier match wins
    ("The car is green, not red.", "competitor"),
    ("It is not green but red", "follow"),           # negated competitor ignored
    ("Neither", "other"),
])
def test_classify_anywhere(generation, expected):
    assert classify(generation, _sample("image"), anywhere=True) == expected


def test_classify_on_fixture_samples():
    samples = load_mc2(MC2, images=None)
    giraffes, counting = samples[0], samples[2]  # image-following; counting follows the image: two vs three
    assert classify("Standing.", giraffes) == "follow"
    assert classify("stand", giraffes) == "follow"
    assert classify("站着", giraffes) == "follow"
    assert classify("They are walking", giraffes) == "competitor"
    assert classify("散步", giraffes) == "competitor"
    assert classify("sitting", giraffes) == "other"
    assert counting.follow == "image" and counting.answer_img == "two"
    for gen, out in [("2", "follow"), ("Two.", "follow"), ("两个", "follow"), ("一对", "follow"),
                     ("3", "competitor"), ("\uff13", "competitor"), ("three", "competitor"), ("III", "competitor"),
                     ("三个", "competitor"), ("4", "other"), ("两个人", "other")]:
        assert classify(gen, counting) == out, gen
