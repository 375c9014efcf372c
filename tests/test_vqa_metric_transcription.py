"""The VQA metric against a second, independent implementation: a transcription of the official `vqaEval.py`
(GT-Vision-Lab/VQA at a013f00) that keeps its structure instead of this project's shortcuts.

The transcription works as the script does: answer records are dicts with an answer id and are rewritten in place;
each leave-one-out subset is built by comparing whole records; the digit/article step goes word list by word list,
with the number-word map's `setdefault`; the period pattern is the official one, odd look-ahead included; the
per-question lists are summed and divided, then rounded. Where Python 2 and Python 3 differ it uses Python 2's
behaviour by its own means (re.ASCII, a round written with fractions, a plain left-to-right sum). Thousands of
generated questions, with answers built from the cases where normalisation matters, must score the same per
question (exactly, not approximately) and in every rounded total. The generated text is ASCII; the Unicode cases
where Python 2 differs are worked by hand in `test_eval_metrics.py`.
"""

from __future__ import annotations

import math
import random
import re
from fractions import Fraction

from pipeline.evaluation.vqa_metric import CONTRACTIONS, NUMBER_WORDS, PUNCTUATION, vqa_accuracy, vqa_scores


class OfficialTranscription:
    """The official evaluation, step by step, over VQA-format annotations and {question_id: answer} results."""

    def __init__(self):
        self.contractions = dict(CONTRACTIONS)
        self.manual_map = dict(NUMBER_WORDS)
        self.articles = ["a", "an", "the"]
        self.period_strip = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
        self.comma_strip = re.compile(r"(\d)(\,)(\d)", re.ASCII)
        self.punct = list(PUNCTUATION)

    def evaluate(self, annotations: list[dict], results: dict) -> tuple[dict, dict]:
        acc_qa, acc_ques_type, acc_ans_type, per_question = [], {}, {}, {}
        for annotation in annotations:
            records = annotation["answers"]
            for record in records:
                record["answer"] = record["answer"].replace("\n", " ")
                record["answer"] = record["answer"].replace("\t", " ")
                record["answer"] = record["answer"].strip()
            res_ans = results[annotation["question_id"]]
            res_ans = res_ans.replace("\n", " ")
            res_ans = res_ans.replace("\t", " ")
            res_ans = res_ans.strip()
            gt_acc = []
            gt_answers = [record["answer"] for record in records]
            if len(set(gt_answers)) > 1:
                for record in records:
                    record["answer"] = self.process_punctuation(record["answer"])
                    record["answer"] = self.process_digit_article(record["answer"])
                res_ans = self.process_punctuation(res_ans)
                res_ans = self.process_digit_article(res_ans)
            for gt_record in records:
                other_records = [record for record in records if record != gt_record]
                matching = [record for record in other_records if record["answer"] == res_ans]
                gt_acc.append(min(1, float(len(matching)) / 3))
            average = float(python2_sum(gt_acc)) / len(gt_acc)
            acc_qa.append(average)
            acc_ques_type.setdefault(annotation["question_type"], []).append(average)
            acc_ans_type.setdefault(annotation["answer_type"], []).append(average)
            per_question[annotation["question_id"]] = average
        accuracy = {
            "overall": python2_round(100 * float(python2_sum(acc_qa)) / len(acc_qa), 2),
            "perQuestionType": {t: python2_round(100 * python2_sum(v) / len(v), 2) for t, v in acc_ques_type.items()},
            "perAnswerType": {t: python2_round(100 * python2_sum(v) / len(v), 2) for t, v in acc_ans_type.items()},
        }
        return accuracy, per_question

    def process_punctuation(self, in_text: str) -> str:
        out_text = in_text
        for p in self.punct:
            if (p + " " in in_text or " " + p in in_text) or (re.search(self.comma_strip, in_text) is not None):
                out_text = out_text.replace(p, "")
            else:
                out_text = out_text.replace(p, " ")
        return self.period_strip.sub("", out_text, 32)  # the official call passes re.UNICODE (32) as the count

    def process_digit_article(self, in_text: str) -> str:
        out_text = []
        for word in in_text.lower().split():
            word = self.manual_map.setdefault(word, word)
            if word not in self.articles:
                out_text.append(word)
        for word_id, word in enumerate(out_text):
            if word in self.contractions:
                out_text[word_id] = self.contractions[word]
        return " ".join(out_text)


def python2_sum(values) -> float:
    total = 0
    for value in values:
        total = total + value
    return total


def python2_round(value: float, digits: int) -> float:
    """Python 2's round for non-negative values: the exact binary value, halves away from zero."""
    scaled = Fraction(value) * 10**digits
    return float(Fraction(math.floor(scaled + Fraction(1, 2)), 10**digits))


# Groups of spellings of one answer: normalising a spelling can make it equal to another of its group (or not).
SPELLINGS = [
    ["yes", "Yes", "yes.", " yes", "YES!", "yes\n", "\tyes", "yes ."],
    ["2", "two", "Two.", "2.0", "the two", "2 ", "(2)"],
    ["1,000", "1000", "1 000", "1.000", "1,000.", "one thousand"],
    ["t-shirt", "t shirt", "T-Shirt", "tshirt", "t - shirt"],
    ["don't know", "dont know", "Dont know", "do not know", "dont  know"],
    ["black/white", "black white", "black and white", "black, white", "black,white"],
    ["a dog", "dog", "the dog", "dogs", "dog's", "A Dog"],
    ["2.5", "2.5.", "2,5", "2. 5", "2.50"],
    ["", "?", "the", ".", "a", " "],
    ["none", "0", "zero", "None.", "nothing"],
    ["red , white", "red, white", "red white", "(red) white", "red-white"],
    ["it's", "its", "itll", "it'll", "Im", "i'm", "isnt", "isn't"],
    ["10:30", "10.30", "10 30", "ten thirty", "1030"],
    ["." * 35 + "x", "." * 3 + "x", "x"],
]


def generated_questions(count: int, seed: int = 0) -> tuple[list[dict], dict]:
    rng = random.Random(seed)
    annotations, results = [], {}
    for question_id in range(count):
        pool = [spelling for group in rng.sample(SPELLINGS, rng.choice([1, 1, 2])) for spelling in group]
        records = rng.choice([10, 10, 10, 3])
        if rng.random() < 0.3:  # unanimous humans
            answers = [rng.choice(pool)] * records
        else:
            answers = [rng.choice(pool[: rng.randint(1, len(pool))]) for _ in range(records)]
        annotations.append(
            {
                "question_id": question_id,
                "question_type": rng.choice(["what is", "how many", "is the"]),
                "answer_type": rng.choice(["yes/no", "number", "other"]),
                "answers": [{"answer": answer, "answer_id": index + 1} for index, answer in enumerate(answers)],
            }
        )
        results[question_id] = rng.choice(pool) if rng.random() < 0.9 else rng.choice(rng.choice(SPELLINGS))
    return annotations, results


def test_generated_questions_exercise_both_branches_and_every_score():
    annotations, results = generated_questions(3000)
    humans = [[record["answer"] for record in annotation["answers"]] for annotation in annotations]
    assert 700 < sum(len(set(answers)) == 1 for answers in humans) < 1500
    predictions = [results[annotation["question_id"]] for annotation in annotations]
    scores = {round(vqa_accuracy(p, h), 12) for p, h in zip(predictions, humans, strict=True)}
    assert {0.0, 0.3, 0.6, 0.9, 1.0} <= scores


def test_metric_equals_the_transcription_question_by_question_and_in_total():
    annotations, results = generated_questions(3000)
    human_answers = {a["question_id"]: [record["answer"] for record in a["answers"]] for a in annotations}
    answer_types = {a["question_id"]: a["answer_type"] for a in annotations}
    question_types = {a["question_id"]: a["question_type"] for a in annotations}
    ours = vqa_scores(results, human_answers, answer_types, question_types)  # before the transcription edits them

    official, per_question = OfficialTranscription().evaluate(annotations, results)

    differing = [key for key in per_question if ours["per_question"][key] != per_question[key]]
    assert not differing, (
        f"{len(differing)} questions differ, e.g. {results[differing[0]]!r} vs {human_answers[differing[0]]}"
    )
    assert ours["accuracy"] == official["overall"]
    assert ours["per_answer_type"] == official["perAnswerType"]
    assert ours["per_question_type"] == official["perQuestionType"]


def test_the_transcription_reproduces_the_documented_examples():
    """The transcription itself, on the examples that tell the current script from the 2016 one."""
    for prediction, humans, expected in [
        ("Yes", ["yes"] * 10, 0.0),
        ("t-shirt", ["t-shirt"] * 10, 1.0),
        ("yes", [" yes"] * 6 + ["no"] * 4, 1.0),
    ]:
        annotation = {
            "question_id": 1,
            "question_type": "q",
            "answer_type": "a",
            "answers": [{"answer": answer, "answer_id": i} for i, answer in enumerate(humans)],
        }
        _, per_question = OfficialTranscription().evaluate([annotation], {1: prediction})
        assert per_question[1] == expected == vqa_accuracy(prediction, humans)
