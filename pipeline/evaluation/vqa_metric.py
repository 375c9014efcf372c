"""VQA accuracy exactly as the official VQA evaluation script computes it.

The reference is GT-Vision-Lab/VQA, `PythonEvaluationTools/vqaEvaluation/vqaEval.py` at commit a013f00 ("Fixed
processing answers bug", 2021), the script behind VQAv2's evaluation. Per question, with its human answer records
(ten in VQAv2):

1. every human answer and the prediction get "\\n" and "\\t" replaced by spaces and are stripped (`clean_whitespace`);
2. only when those human answers are not all the same do the human answers *and* the prediction go through
   `process_punctuation` and then `process_digit_article`. When all humans agree, neither side is changed further:
   "Yes" does not match ten "yes", "two" does not match ten "2", and "t-shirt" matches ten "t-shirt";
3. the accuracy is the mean over the leave-one-out subsets (one answer record removed each) of
   min(1, matching answers in the subset / 3): given by 3 or more humans an answer scores 1, by 2 it scores 0.6,
   by 1 it scores 0.3. Records differ by `answer_id`, so removing one removes exactly one, even among equal answers.

Overall, per answer type and per question type, the script averages the per-question accuracies and reports
100 x the mean rounded to 2 decimals. Predictions are scored as given; callers keep the raw text for submission.

The script runs under Python 2, and Python 3 differs in ways that change scores. This module does what Python 2
does: `\\d` matches ASCII digits only (so "١,٢" keeps its comma as a space); lower-casing maps every character on
its own by its simple mapping ("İ" -> "i", where Python 3 gives "i" plus a combining dot, and a final "Σ" -> "σ",
where Python 3 gives "ς"); U+180E counts as whitespace for strip and split (Unicode 5.2, Python 2.7's tables);
`round` takes exact halves away from zero (62.125 -> 62.13, where Python 3 gives 62.12); sums run left to right.
Not reproduced: characters that gained a lower-case form after Unicode 5.2 (Cherokee, Georgian Mtavruli and a few
others) are lower-cased here and were left alone by Python 2.7.

How this differs from the 2016 version of the script (before a013f00), which many copies still run:
  - 2016 normalised the prediction always (punctuation, case, number words, articles, contractions); now only
    when the humans disagree. "Yes" against ten "yes" scored 1 and scores 0; "t-shirt" against ten "t-shirt"
    scored 0 (the prediction became "t shirt") and scores 1.
  - 2016 did not whitespace-clean the human answers, so six " yes" and four "no" were not matched by "yes" (0);
    now they are (1).
  - 2016 gave disagreeing human answers `process_punctuation` only, so "the dog" or "two" from a human never
    matched a prediction; now they also get `process_digit_article` ("dog", "2").

How other benchmarks' own evaluators differ (this project scores all of them with the rules above, so TextVQA and
VizWiz numbers here are VQAv2-rule numbers; their servers score the raw `predictions.json` with their own):
  - OK-VQA is distributed in the VQA format and scored with the VQA tools: the rules above, or the 2016 ones where
    a copy from before 2021 is used. Its ten answer records hold five answers twice each.
  - TextVQA (the EvalAI answer processor, as in MMF's `m4c_evaluator.py`): the prediction and every human answer
    are always normalised, with no unanimity shortcut; before the punctuation step the text is lower-cased, commas
    and "?" are deleted and "'s" becomes " 's"; it runs under Python 3 (Unicode `\\d`, full lower-case mappings).
  - VizWiz (the challenge's `vqaEval.py`): the prediction is always normalised and compared with the human answers
    as they are in the file (not whitespace-cleaned, not normalised); Python 3.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal

# Removed (or replaced by a space) by `process_punctuation`; note that "'", ":" and "." are not among them.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip

# The official table: a word written without its apostrophe(s) -> the word with them. Its capitalised entries
# ("Im", "Ive", ...) never match, since words are lower-cased first, and "somebody'd" maps the wrong way round;
# both are kept as the official script has them.
_CONTRACTION_PAIRS = """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
    didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
    havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's
    Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll
    let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've
    mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't
    ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've
    she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've
    somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll
    somebodys=somebody's someoned=someone'd someoned've=someone'd've someone'dve=someone'd've
    someonell=someone'll someones=someone's somethingd=something'd somethingd've=something'd've
    something'dve=something'd've somethingll=something'll thats=that's thered=there'd thered've=there'd've
    there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've
    theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've
    weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
    whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll
    whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
    wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
    yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've
    youll=you'll youre=you're youve=you've
"""
CONTRACTIONS = dict(pair.split("=") for pair in _CONTRACTION_PAIRS.split())

# What Python 2.7's unicode.strip() and split() treat as whitespace (Unicode 5.2): Python 3's set plus U+180E
# MONGOLIAN VOWEL SEPARATOR, which Unicode 6.3 stopped calling a space.
PY2_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u180e\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
_WHITESPACE_RUN = re.compile(f"[{re.escape(PY2_WHITESPACE)}]+")

# A comma between two digits ("1,000") anywhere in the text makes every punctuation mark vanish instead of
# becoming a space. Python 2's `\d` (no re.UNICODE flag) is ASCII-only.
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d", re.ASCII)
# A period goes unless a digit follows it ("2.5" keeps it). The official pattern opens with "(?!<=\d)", which reads
# like a look-behind but is a look-ahead that always passes, so this is what it does.
_PERIOD = re.compile(r"\.(?!\d)", re.ASCII)
# Quirk: the official script passes re.UNICODE (= 32) where re.sub takes `count`, so at most 32 periods go.
_PERIODS_REMOVED_AT_MOST = 32


def clean_whitespace(answer: str) -> str:
    """Newlines and tabs become spaces, then the answer is stripped (done to every answer, human or predicted)."""
    return answer.replace("\n", " ").replace("\t", " ").strip(PY2_WHITESPACE)


def process_punctuation(text: str) -> str:
    """Remove each punctuation mark that touches a space (or every mark, given "digit,digit"); else space it."""
    out = text
    remove_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        # The conditions look at the original text, not at `out`, as in the official script.
        if remove_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIODS_REMOVED_AT_MOST)


def process_digit_article(text: str) -> str:
    """Lower-case, split on whitespace, map number words to digits, drop articles, restore contractions."""
    words = []
    for word in _split(_lower(text)):
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """An answer as the official script compares it on a question whose human answers disagree."""
    return process_digit_article(process_punctuation(clean_whitespace(answer)))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """The official accuracy of one predicted answer, in [0, 1], against a question's human answer records."""
    if not human_answers:
        raise ValueError("a question needs at least one human answer to be scored")
    humans = [clean_whitespace(answer) for answer in human_answers]
    prediction = clean_whitespace(prediction)
    if len(set(humans)) > 1:
        humans = [process_digit_article(process_punctuation(answer)) for answer in humans]
        prediction = process_digit_article(process_punctuation(prediction))
    matches = [answer == prediction for answer in humans]
    total = sum(matches)
    # Leaving out record i leaves total - matches[i] matching answers among the others.
    return _sum_left_to_right(min(1.0, (total - left_out) / 3) for left_out in matches) / len(humans)


def vqa_scores(
    predictions: Mapping[object, str],
    human_answers: Mapping[object, Sequence[str]],
    answer_types: Mapping[object, str] | None = None,
    question_types: Mapping[object, str] | None = None,
) -> dict:
    """Accuracy over questions, in percent as the official script reports it (rounded to 2 decimals).

    Every question of `human_answers` must have a prediction; questions are summed in `human_answers`' order (the
    official script's is the annotation file's). Returns {"accuracy", "n", "per_answer_type",
    "per_question_type"} (the last two only when their types are given) and the unrounded per-question accuracies
    in [0, 1] under "per_question".
    """
    missing = [key for key in human_answers if key not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} questions have no predicted answer (first: {missing[0]!r})")
    per_question = {key: vqa_accuracy(predictions[key], answers) for key, answers in human_answers.items()}
    scores: dict = {"accuracy": _percent(per_question.values()), "n": len(per_question)}
    for name, types in (("per_answer_type", answer_types), ("per_question_type", question_types)):
        if types is not None:
            groups: dict[str, list[float]] = defaultdict(list)
            for key, accuracy in per_question.items():
                groups[types[key]].append(accuracy)
            scores[name] = {group: _percent(values) for group, values in sorted(groups.items())}
    scores["per_question"] = per_question
    return scores


def _lower(text: str) -> str:
    """Python 2's unicode.lower(): each character by its simple mapping, with no context (no final sigma)."""
    if text.isascii():
        return text.lower()
    # Only "İ" (U+0130) lower-cases to two characters in Python 3; the first of them is its simple mapping.
    return "".join(char.lower()[0] for char in text)


def _split(text: str) -> list[str]:
    """Python 2's unicode.split() with no argument."""
    return [word for word in _WHITESPACE_RUN.split(text) if word]


def _sum_left_to_right(values: Iterable[float]) -> float:
    # Python 2's sum(); Python 3.12's sum() of floats compensates rounding errors and can differ in the last bit.
    total = 0.0
    for value in values:
        total += value
    return total


def _percent(values: Iterable[float]) -> float:
    values = list(values)
    if not values:
        return 0.0
    # Python 2's round(): correctly rounded, exact halves away from zero (Python 3 rounds them to even).
    exact = Decimal(100 * _sum_left_to_right(values) / len(values))
    return float(exact.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))
