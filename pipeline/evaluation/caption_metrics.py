"""Caption metrics through pycocoevalcap, the way the COCO caption evaluation computes them.

References and predictions first go through pycocoevalcap's PTBTokenizer (Stanford CoreNLP: lower-cases, splits
off punctuation, then drops it), then BLEU-1..4, METEOR 1.5, ROUGE-L and CIDEr-D score the tokenised text. SPICE is
left out: it downloads Stanford models on first use.

The tokenizer and METEOR run Java; `require_java` checks for it before any model is loaded.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Hashable, Iterable, Mapping

JAVA_INSTALL_HINT = "install a Java runtime, e.g. `apt-get install default-jre-headless`"
BLEU_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
CAPTION_METRICS = (*BLEU_METRICS, "METEOR", "ROUGE_L", "CIDEr")


class JavaNotFound(RuntimeError):
    """Java is missing or does not run; the message is one line."""


def require_java() -> str:
    """The `java -version` banner's first line; raises JavaNotFound when Java cannot run."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFound(f"caption metrics need Java (pycocoevalcap's tokenizer and METEOR): {JAVA_INSTALL_HINT}")
    try:
        result = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise JavaNotFound(f"'{java} -version' failed ({error}); {JAVA_INSTALL_HINT}") from None
    if result.returncode != 0:
        raise JavaNotFound(f"'{java} -version' exited with {result.returncode}; {JAVA_INSTALL_HINT}")
    return (result.stderr or result.stdout).strip().splitlines()[0]


def ptb_tokenize(captions: Mapping[Hashable, Iterable[str]]) -> dict[Hashable, list[str]]:
    """{key: [caption, ...]} -> {key: [tokenised caption, ...]} through pycocoevalcap's PTBTokenizer."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    try:
        return PTBTokenizer().tokenize({key: [{"caption": c} for c in texts] for key, texts in captions.items()})
    except PermissionError as error:
        # It writes its input to a temporary file beside its jar, inside the installed package.
        raise PermissionError(
            f"pycocoevalcap's PTBTokenizer could not write beside its jar ({error.filename}); install pycocoevalcap "
            "into an environment you can write to"
        ) from None


def caption_scores(
    references: Mapping[Hashable, list[str]],
    predictions: Mapping[Hashable, str],
    metrics: Iterable[str] = CAPTION_METRICS,
) -> dict[str, float]:
    """Corpus-level scores of one predicted caption per key against that key's reference captions.

    `metrics` picks from CAPTION_METRICS (asking for any BLEU order computes all four); the result holds the
    requested names, e.g. {"Bleu_4": 0.31, "METEOR": 0.25, "ROUGE_L": 0.54, "CIDEr": 1.02}.
    """
    wanted = tuple(dict.fromkeys(metrics))
    unknown = sorted(set(wanted) - set(CAPTION_METRICS))
    if unknown:
        raise ValueError(f"unknown caption metrics {unknown}; choose from {list(CAPTION_METRICS)}")
    if set(references) != set(predictions):
        extra = sorted(map(str, set(references) ^ set(predictions)))
        raise ValueError(f"references and predictions must have the same keys; {len(extra)} differ (first: {extra[0]})")
    empty = [key for key, texts in references.items() if not texts]
    if empty:
        raise ValueError(f"{len(empty)} images have no reference caption (first: {empty[0]!r})")
    if not references:
        raise ValueError("no captions to score")

    gts = ptb_tokenize(references)
    res = ptb_tokenize({key: [caption] for key, caption in predictions.items()})
    scores: dict[str, float] = {}
    if any(name in wanted for name in BLEU_METRICS):
        from pycocoevalcap.bleu.bleu import Bleu

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores.update(zip(BLEU_METRICS, map(float, bleu), strict=True))
    if "METEOR" in wanted:
        scores["METEOR"] = _meteor(gts, res)
    if "ROUGE_L" in wanted:
        from pycocoevalcap.rouge.rouge import Rouge

        scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in wanted:
        from pycocoevalcap.cider.cider import Cider

        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return {name: scores[name] for name in wanted}


def _meteor(gts: dict, res: dict) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()  # starts a JVM that loads the paraphrase table: ~10 s
    try:
        return float(meteor.compute_score(gts, res)[0])
    finally:
        # Stop the JVM now, not whenever the garbage collector gets to it.
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()
