"""The VQA accuracy metric as the official VQA evaluation script (GT-Vision-Lab/VQA, `vqaEval.py`) defines it.

VQAv2, OK-VQA, TextVQA and VizWiz all score an answer against the ten human answers of its question:

    accuracy = mean over the 10 leave-one-out subsets of 9 human answers of min(#humans in the subset who gave the
               prediction / 3, 1)

so an answer given by 3 or more humans scores 1, by 2 humans 0.6 (8 subsets see 2 matches, 2 see 1), by 1 human
0.3. Before matching, the prediction is normalised: newlines and tabs become spaces, punctuation is removed or turned
into spaces (`process_punctuation`), then it is lower-cased, number words become digits, the articles a/an/the go
and contractions missing their apostrophe get it back (`process_digit_article`). The human answers of a question
get `process_punctuation` only, and only when they are not all the same; the annotation files already hold them
lower-cased, with digits and without articles. Every quirk of the official script that changes a score is kept
(each is marked below), so that these numbers equal the official ones.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

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

# A comma between two digits ("1,000") anywhere in the text makes every punctuation mark vanish instead of
# becoming a space.
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# A period goes unless a digit follows it ("2.5" keeps it). The official pattern opens with "(?!<=\d)", which reads
# like a look-behind but is a look-ahead that always passes, so this is what it does.
_PERIOD = re.compile(r"\.(?!\d)")
# Quirk: the official script passes re.UNICODE (= 32) where re.sub takes `count`, so at most 32 periods go.
_PERIODS_REMOVED_AT_MOST = int(re.UNICODE)


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
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """A predicted answer as the official script compares it with the human answers."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """The official accuracy of one predicted answer, in [0, 1], against a question's (usually 10) human answers."""
    if not human_answers:
        raise ValueError("a question needs at least one human answer to be scored")
    prediction = normalize_answer(prediction)
    humans = list(human_answers)
    if len(set(humans)) > 1:
        humans = [process_punctuation(answer) for answer in humans]
    matches = [answer == prediction for answer in humans]
    total = sum(matches)
    # Leaving out human i leaves total - matches[i] matching answers among the others.
    return sum(min(1.0, (total - left_out) / 3) for left_out in matches) / len(humans)


def vqa_scores(
    predictions: Mapping[object, str],
    human_answers: Mapping[object, Sequence[str]],
    answer_types: Mapping[object, str] | None = None,
    question_types: Mapping[object, str] | None = None,
) -> dict:
    """Accuracy over questions, in percent as the official script reports it (rounded to 2 decimals).

    Every question of `human_answers` must have a prediction. Returns {"accuracy", "n", "per_answer_type",
    "per_question_type"} (the last two only when their types are given) and the unrounded per-question
    accuracies in [0, 1] under "per_question".
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


def _percent(values) -> float:
    values = list(values)
    return round(100 * sum(values) / len(values), 2) if values else 0.0
