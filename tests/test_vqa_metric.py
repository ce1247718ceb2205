"""eval_vqa: the VQA accuracy against a transcription of the official code (tests/reference_vqa_eval.py) on generated
cases and by hand, its normalisation, LAVIS's variant, the aggregation per answer type, GQA exact match, the
question-type baseline and the result file."""

import json
import random

import pytest

from eval_vqa import (gqa_accuracy, normalize_answer, process_punctuation, question_type_baseline, vqa_accuracy,
                      vqa_scores, write_results)
from tests.reference_vqa_eval import lavis_accuracy, official_accuracy
from utils import InputError

# Answers that the normalisation maps together in groups, or keeps apart: case, punctuation next to a space or not,
# digit-comma-digit, periods, number words, articles, contractions, tabs and newlines, spaces at the ends.
POOL = ["yes", "Yes", "yes.", "YES!", "yes !", " yes", "yes\n", "no", "No.", "\tno", "2", "two", "Two", "2.", "two.",
        "0", "none", "zero", "dog", "Dog", "dog.", "the dog", "a dog", "dogs", "(dog)", "dog?", "hot-dog", "hot dog",
        "hot dog.", "hotdog", "1,000", "1000", "1.000", "3.5", "3,5", "dont", "don't", "Dont", "isnt", "whats",
        "what's", "Im", "red, white", "red white", "red,white", "red/white", "red / white", "black and white",
        "U.S.A.", "usa", "new york", "new-york", "the", "a", "", "10", "ten", "a.m.", "am", "it's", "its", "; ok",
        "ok", "c++", "c", "1, 2", "1 2", "left", "on the left", "left side"]


def random_case(rng):
    """(prediction, 10 answers): answers drawn from a few pool entries, sometimes all one; the prediction one of the
    answers or any pool entry."""
    if rng.random() < 0.2:
        answers = [rng.choice(POOL)] * 10
    else:
        group = rng.sample(POOL, rng.randint(2, 4))
        answers = [rng.choice(group) for _ in range(10)]
    prediction = rng.choice(answers) if rng.random() < 0.5 else rng.choice(POOL)
    return prediction, answers


def test_accuracy_equals_the_official_code_on_generated_cases():
    rng = random.Random(0)
    values, lavis_differs = set(), 0
    for _ in range(3000):
        prediction, answers = random_case(rng)
        official = vqa_accuracy(prediction, answers)
        assert official == official_accuracy(prediction, answers), (prediction, answers)
        lavis = vqa_accuracy(prediction, answers, variant="lavis")
        assert lavis == lavis_accuracy(prediction, answers), (prediction, answers)
        values.add(round(official, 6))
        lavis_differs += lavis != official
    # The cases reach every score a question can get, and the variants apart.
    assert values == {0.0, 0.3, 0.6, 0.9, 1.0}
    assert lavis_differs > 100


@pytest.mark.parametrize("answer, normalized", [
    ("1,000", "1000"),            # digit-comma-digit: every punctuation character is deleted
    ("hot-dog", "hot dog"),       # punctuation inside a word becomes a space
    ("dog.", "dog"),              # periods go unless a digit follows
    ("3.5", "3.5"),
    ("two", "2"),
    ("none", "0"),
    ("the dog", "dog"),
    ("A Dog", "dog"),
    ("dont", "don't"),
    ("red, white", "red white"),  # a comma before a space is deleted, not spaced
    ("yes !", "yes"),
    ("U.S.A.", "usa"),
    ("Im", "im"),                 # the table's capitalised keys never match lower-cased words
    ("a.b " * 40, "ab " * 32 + "a.b " * 8),  # the first 32 periods go (re.UNICODE as the count), the rest stay
])
def test_normalization_corner_cases(answer, normalized):
    assert normalize_answer(answer) == normalized.strip()


def test_punctuation_next_to_a_space_anywhere_is_deleted_everywhere():
    assert process_punctuation("a-b - c") == "ab  c"
    assert process_punctuation("a-b") == "a b"


def leave_one_out(k, n=10):
    """Mean over the n answers of min(1, matches among the other n - 1 / 3) when k of them match."""
    return ((n - k) * min(1, k / 3) + k * min(1, (k - 1) / 3)) / n


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_leave_one_out_mean_by_number_of_matches(k, expected):
    answers = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected, abs=1e-12)
    assert vqa_accuracy("cat", answers) == pytest.approx(leave_one_out(k), abs=1e-12)
    assert vqa_accuracy("cat", answers) == official_accuracy("cat", answers)


def test_three_matches_score_below_the_simple_formula():
    # min(1, matches / 3) would give 1: each of the three matching answers leaves only two others to match.
    answers = ["cat"] * 3 + ["dog"] * 7
    assert vqa_accuracy("cat", answers) == pytest.approx(0.9)


def test_identical_answers_are_compared_without_normalisation():
    assert vqa_accuracy("Yes", ["Yes"] * 10) == 1.0
    assert vqa_accuracy(" Yes\n", ["Yes"] * 10) == 1.0  # stripped all the same
    assert vqa_accuracy("yes", ["Yes"] * 10) == 0.0
    assert vqa_accuracy("yes", ["Yes"] * 9 + ["yes"]) == 1.0  # they differ: all are normalised


def test_lavis_variant_differs_where_it_should():
    # LAVIS normalises the prediction even when the answers agree, so a prediction as written misses.
    assert vqa_accuracy("Yes", ["Yes"] * 10, variant="lavis") == 0.0
    assert vqa_accuracy("yes", ["yes"] * 10, variant="lavis") == 1.0
    # Its answers get no processDigitArticle: number words, case and articles stay.
    answers = ["Two"] * 5 + ["three"] * 5
    assert vqa_accuracy("Two", answers) == 1.0 and vqa_accuracy("Two", answers, variant="lavis") == 0.0
    answers = ["the dog"] * 5 + ["cat"] * 5
    assert vqa_accuracy("the dog", answers) == 1.0 and vqa_accuracy("the dog", answers, variant="lavis") == 0.0
    # Nor are its answers stripped.
    answers = [" yes"] * 9 + ["no"]
    assert vqa_accuracy("yes", answers) == 1.0 and vqa_accuracy("yes", answers, variant="lavis") == 0.0
    # Where punctuation is all that differs, both agree.
    answers = ["hot-dog"] * 5 + ["hot dog"] * 5
    assert vqa_accuracy("hot dog", answers) == vqa_accuracy("hot dog", answers, variant="lavis") == 1.0
    with pytest.raises(ValueError, match="unknown VQA accuracy variant"):
        vqa_accuracy("yes", ["yes"], variant="vqav1")


def question(qid, answers, answer_type="", question_type=""):
    return {"question_id": qid, "image": "x.jpg", "question": "?", "answers": answers, "answer_type": answer_type,
            "question_type": question_type}


def test_scores_average_per_answer_type():
    questions = [question(1, ["yes"] * 10, "yes/no"), question(2, ["no"] * 10, "yes/no"),
                 question(3, ["yes"] * 7 + ["no"] * 3, "yes/no"), question(4, ["2"] + ["3"] * 9, "number"),
                 question(5, ["red"] * 10, "other"), question(6, ["blue"] * 10)]
    predictions = {1: "yes", 2: "yes", 3: "no", 4: "two", 5: "red", 6: "blue"}
    scores = vqa_scores(predictions, questions)
    per_question = [1.0, 0.0, 0.9, 0.3, 1.0, 1.0]
    assert scores == {"accuracy": pytest.approx(100 * sum(per_question) / 6),
                      "yes/no": pytest.approx(100 * 1.9 / 3), "number": pytest.approx(30.0), "other": 100.0, "n": 6}
    assert list(scores) == ["accuracy", "number", "other", "yes/no", "n"]
    only_other = vqa_scores({5: "red"}, [questions[4]])
    assert only_other == {"accuracy": 100.0, "other": 100.0, "n": 1}


def test_scores_refuse_missing_and_extra_predictions():
    questions = [question(1, ["a"] * 10), question(2, ["b"] * 10), question(3, ["c"] * 10)]
    with pytest.raises(InputError) as err:
        vqa_scores({1: "a", 3: "c", 7: "x", "2": "b"}, questions)
    message = str(err.value)
    assert "1 of 3 questions have no prediction (e.g. ids [2])" in message
    assert "2 predictions are for no question (e.g. ids ['2', 7])" in message
    with pytest.raises(InputError, match="predictions are not strings"):
        vqa_scores({1: "a", 2: ["b"], 3: "c"}, questions)
    with pytest.raises(InputError, match="question 1 has no answers"):
        vqa_scores({1: "a"}, [question(1, [])])
    with pytest.raises(InputError, match="the question list is empty"):
        vqa_scores({}, [])


def test_lavis_metric_reaches_the_scores():
    questions = [question(1, ["Yes"] * 10, "yes/no")]
    assert vqa_scores({1: "Yes"}, questions)["accuracy"] == 100.0
    assert vqa_scores({1: "Yes"}, questions, metric="vqa_lavis")["accuracy"] == 0.0
    with pytest.raises(InputError, match="unknown VQA metric"):
        vqa_scores({1: "Yes"}, questions, metric="vqa2")


def test_gqa_exact_match_after_normalisation():
    assert gqa_accuracy("The Dog.", "dog") == 1.0
    assert gqa_accuracy("two", "2") == 1.0
    assert gqa_accuracy("dogs", "dog") == 0.0
    assert gqa_accuracy("left", "on the left") == 0.0
    questions = [question("a1", ["dog"]), question("a2", ["left"]), question("a3", ["yes"]), question("a4", ["no"])]
    scores = vqa_scores({"a1": "a dog", "a2": "right", "a3": "Yes", "a4": "no"}, questions, metric="gqa")
    assert scores == {"accuracy": 75.0, "n": 4}
    with pytest.raises(InputError, match="question 'a1': GQA accuracy compares with a single answer; .* has 2"):
        vqa_scores({"a1": "dog"}, [question("a1", ["dog", "cat"])], metric="gqa")


def test_question_type_baseline_predicts_the_most_common_answer_of_the_type():
    train = [question(1, ["red"] * 6 + ["Blue"] * 4, question_type="what color is the"),
             question(2, ["blue"] * 10, question_type="what color is the"),
             question(3, ["yes"] * 10, question_type="is there a"),
             question(4, ["no."] * 10, question_type="is there a"),
             question(5, ["two"] * 3 + ["2"] * 3 + ["3"] * 4, question_type="how many")]
    evaluated = [question(10, ["red"] * 10, question_type="what color is the"),
                 question(11, ["yes"] * 10, question_type="is there a"),
                 question(12, ["2"] * 10, question_type="how many"),
                 question(13, ["a"] * 10, question_type="what sport is")]
    # blue 14 of 20; yes and no tie at 10 (the alphabetically first wins); "two" and "2" count together; an unseen
    # type gets the most common answer overall (blue, 14).
    assert question_type_baseline(train, evaluated) == {10: "blue", 11: "no", 12: "2", 13: "blue"}
    with pytest.raises(InputError, match="needs training questions with answers"):
        question_type_baseline([question(1, [])], evaluated)


def test_results_file_is_the_submission_format(tmp_path):
    path = tmp_path / "results.json"
    write_results(path, {262148002: "yes", 5: "two dogs", 262148000: ""})
    assert json.loads(path.read_text()) == [{"question_id": 5, "answer": "two dogs"},
                                            {"question_id": 262148000, "answer": ""},
                                            {"question_id": 262148002, "answer": "yes"}]
