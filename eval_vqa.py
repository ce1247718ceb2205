"""Visual question answering evaluation: the VQA accuracy of the official evaluation code (GT-Vision-Lab/VQA
PythonEvaluationTools/vqaEvaluation/vqaEval.py, current version, commit a013f00) and LAVIS's variant of it
(lavis/common/vqa_tools/vqa_eval.py), GQA exact match (LAVIS's `gqa` task), the question-type baseline, and the
submission file of the VQA evaluation server.

Questions are the dicts of data/vqa.py: {"question_id", "answers" (the human answers), "answer_type",
"question_type", ...}; predictions map each question id to one answer string.
"""

import json
import re
from collections import Counter, defaultdict

from utils import InputError

# processPunctuation: each of these 21 characters is deleted where the answer has it next to a space or holds a
# digit-comma-digit ("1,000"), else replaced by a space ("hot-dog" -> "hot dog"). `'` `:` `#` `$` `%` `&` `*` stay.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# The official pattern is malformed: "(?!<=\d)" was meant as a look-behind but is a look-ahead for "<=" and a
# digit, which never follows the position of a ".", so every period not followed by a digit is removed ("3.5"
# stays). The official call also passes re.UNICODE where sub() takes its count, so at most 32 periods go.
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
PERIOD_COUNT = 32  # int(re.UNICODE)

# processDigitArticle: number words to digits, articles dropped, apostrophe-less forms to contractions.
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# The official table of 120 entries, as it is: some keys are already contracted ("let's") and the capitalised ones
# ("Im", "Ive") never match, since answers are lower-cased first.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
VARIANTS = ("official", "lavis")
# vqa_scores' metrics: the VQA accuracy in either variant, or GQA's exact match.
METRICS = ("vqa", "vqa_lavis", "gqa")


# -------------------------------------------------------------------------------------------------- normalisation

def process_punctuation(text):
    """The official processPunctuation: the 21 PUNCTUATION characters deleted or made spaces (whether a character
    is deleted depends on the text as given, not as partly processed), then periods not followed by a digit
    removed, the first 32 of them."""
    delete_all = DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in PUNCTUATION:
        out = out.replace(p, "" if delete_all or p + " " in text or " " + p in text else " ")
    return PERIOD.sub("", out, count=PERIOD_COUNT)


def process_digit_article(text):
    """The official processDigitArticle: lower-case, split on whitespace, number words to digits, articles dropped,
    CONTRACTIONS applied, words joined by single spaces."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_answer(text):
    """process_punctuation, then process_digit_article: "The Hot-Dog." -> "hot dog", "two" -> "2"."""
    return process_digit_article(process_punctuation(text))


def _strip(text):
    return text.replace("\n", " ").replace("\t", " ").strip()


# -------------------------------------------------------------------------------------------------------- metrics

def vqa_accuracy(prediction, gt_answers, variant="official"):
    """VQA accuracy of one prediction against the human answers `gt_answers` (10 in VQAv2), in [0, 1].

    For each human answer i, acc_i = min(1, (number of the other answers equal to the prediction) / 3); the
    accuracy is the mean of the acc_i: k matching answers of 10 give 0, 0.3, 0.6, 0.9 for k = 0..3 and 1 from 4 on.
    Strings are compared after normalisation, which depends on `variant`:
      "official" (GT-Vision-Lab/VQA at a013f00): tabs and newlines become spaces and the ends are stripped, for the
        prediction and the answers; then, only when the answers are not all the same, all are normalize_answer'ed.
      "lavis" (LAVIS, and the official code before a013f00): the prediction is stripped and normalize_answer'ed
        always, the answers only process_punctuation'ed and only when they differ; answers are not stripped.
    The official code leaves out answer i by comparing answer records, which differ in their answer_id; here by
    position.
    """
    if not gt_answers:
        raise ValueError("VQA accuracy needs at least one ground-truth answer")
    if variant == "official":
        answers, prediction = [_strip(a) for a in gt_answers], _strip(prediction)
        if len(set(answers)) > 1:
            answers, prediction = [normalize_answer(a) for a in answers], normalize_answer(prediction)
    elif variant == "lavis":
        prediction = normalize_answer(_strip(prediction))
        answers = [process_punctuation(a) for a in gt_answers] if len(set(gt_answers)) > 1 else list(gt_answers)
    else:
        raise ValueError(f"unknown VQA accuracy variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    matches = [a == prediction for a in answers]
    total = sum(matches)
    return sum(min(1, (total - match) / 3) for match in matches) / len(matches)


def gqa_accuracy(prediction, gt_answer):
    """1.0 if the prediction equals GQA's single answer after normalize_answer on both (LAVIS's `gqa` task, which
    does not strip), else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gt_answer))


def question_accuracy(prediction, answers, metric="vqa"):
    """The accuracy of one prediction against a question's `answers` by `metric` (one of METRICS): "vqa" and
    "vqa_lavis" are vqa_accuracy's two variants, "gqa" is gqa_accuracy against the question's single answer."""
    if metric == "gqa":
        if len(answers) != 1:
            raise InputError(f"GQA accuracy compares with a single answer; the question has {len(answers)}")
        return gqa_accuracy(prediction, answers[0])
    if metric not in METRICS:
        raise InputError(f"unknown VQA metric {metric!r}; expected one of {', '.join(METRICS)}")
    return vqa_accuracy(prediction, answers, "lavis" if metric == "vqa_lavis" else "official")


def vqa_scores(predictions, questions, metric="vqa"):
    """Scores of `predictions` {question_id: answer} on `questions` (data/vqa.py dicts, with answers) by `metric`
    (question_accuracy's): {"accuracy": percent over all questions, "<answer type>": percent over that type's
    questions for each type present ("yes/no", "number", "other" in VQAv2), "n": number of questions}.

    Every question must have exactly one prediction and every prediction a question, as the official loadRes
    asserts. Percentages are not rounded (the official code rounds them to 2 decimals for display).
    """
    if not questions:
        raise InputError("VQA scores of no questions: the question list is empty")
    check_predictions(predictions, questions)
    overall, by_type = [], defaultdict(list)
    for q in questions:
        if not q["answers"]:
            raise InputError(f"question {q['question_id']!r} has no answers to score against; a split without "
                             "answers (such as test-dev) is scored by the evaluation server: submit write_results' "
                             "file there")
        try:
            accuracy = question_accuracy(predictions[q["question_id"]], q["answers"], metric)
        except InputError as e:
            raise InputError(f"question {q['question_id']!r}: {e}") from None
        overall.append(accuracy)
        if q["answer_type"]:
            by_type[q["answer_type"]].append(accuracy)
    scores = {"accuracy": 100 * sum(overall) / len(overall)}
    scores.update({answer_type: 100 * sum(values) / len(values) for answer_type, values in sorted(by_type.items())})
    scores["n"] = len(overall)
    return scores


def check_predictions(predictions, questions):
    """InputError unless `predictions` has one answer string for each question id of `questions` and no other."""
    ids = [q["question_id"] for q in questions]
    missing = [qid for qid in ids if qid not in predictions]
    extra = sorted(set(predictions) - set(ids), key=repr)
    if missing or extra:
        raise InputError(f"predictions and questions differ: {len(missing)} of {len(ids)} questions have no "
                         f"prediction (e.g. ids {missing[:5]}), {len(extra)} predictions are for no question (e.g. "
                         f"ids {extra[:5]}); every question needs exactly one prediction, keyed by its question_id "
                         "(an integer and a string are different ids)")
    bad = [(qid, answer) for qid, answer in predictions.items() if not isinstance(answer, str)]
    if bad:
        raise InputError(f"{len(bad)} predictions are not strings, e.g. question {bad[0][0]!r}: {bad[0][1]!r:.80}")


# ------------------------------------------------------------------------------------------------------- baseline

def question_type_baseline(train_questions, eval_questions):
    """The question-only baseline: {question_id: answer} predicting for each of `eval_questions` the most common
    normalised human answer of the training questions of its question_type (all of a question's answers count);
    a type unseen in training gets the most common answer over all types. Ties go to the alphabetically first
    answer."""
    counts = defaultdict(Counter)
    for q in train_questions:
        counts[q["question_type"]].update(normalize_answer(a) for a in q["answers"])
    overall = sum(counts.values(), Counter())
    if not overall:
        raise InputError("the question-type baseline needs training questions with answers; those given have none")
    best = {question_type: _most_common(counter) for question_type, counter in counts.items() if counter}
    fallback = _most_common(overall)
    return {q["question_id"]: best.get(q["question_type"], fallback) for q in eval_questions}


def _most_common(counter):
    """The most frequent key of `counter`, the alphabetically first of those tied."""
    return min(counter.items(), key=lambda item: (-item[1], item[0]))[0]


# -------------------------------------------------------------------------------------------------------- results

def write_results(path, predictions):
    """Write `predictions` {question_id: answer} as the VQA evaluation server's result file, a JSON list of
    {"question_id": int, "answer": str} sorted by question_id."""
    results = [{"question_id": qid, "answer": answer} for qid, answer in sorted(predictions.items())]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f)
