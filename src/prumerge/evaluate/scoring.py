"""Scoring answers the way the field's scorers do, so figures here compare with published ones.

* **Open answers**: VQA-normalised exact match (the normalisation of the VQAv2 evaluation that LLaVA's
  ``m4c_evaluator`` also applies: lower case, punctuation, number words to digits, articles and common
  contractions). With a list of reference answers (VQAv2's ten annotators) a question scores ``min(1, matches/3)``.
* **Yes/no** (reference ``yes`` or ``no``): POPE's rule — the answer's first sentence counts as *no* when it holds
  the word ``no`` or ``not``, else *yes*; reported as accuracy, precision, recall, F1 (positive = yes) and the yes
  ratio, as POPE reports them.
* **Multiple choice** (reference a single letter, LLaVA's MMBench/SEED style): the option letter the answer starts
  with (``B``, ``B.``, ``(B)``), else the one after "answer is".
"""

from __future__ import annotations

import re

NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                "wont": "won't", "wasnt": "wasn't", "werent": "weren't", "didnt": "didn't", "hasnt": "hasn't",
                "havent": "haven't", "im": "i'm", "ive": "i've", "youre": "you're", "thats": "that's", "whats": "what's"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")
_MC = re.compile(r"^\s*\(?([A-Z])(?:[.):]|\s|$)")
_MC_LATE = re.compile(r"answer is\s*:?\s*\(?([A-Z])\b", re.IGNORECASE)


def normalize(text: str) -> str:
    """VQA answer normalisation (punctuation, then digits/articles/contractions word by word)."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_NUMBER, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = []
    for word in out.split():
        word = NUMBERS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def kind_of(reference) -> str:
    """``yesno``, ``choice`` or ``open``: how a question with this reference answer is scored."""
    if isinstance(reference, str):
        if normalize(reference) in ("yes", "no"):
            return "yesno"
        if re.fullmatch(r"[A-Z]", reference.strip()):
            return "choice"
    return "open"


def yes_no(text: str) -> str:
    """POPE's reading of a free answer: ``no`` if its first sentence has the word no/not, else ``yes``."""
    first = text.split(".")[0].replace(",", " ").lower()
    return "no" if {"no", "not"} & set(first.split()) else "yes"


def choice_letter(text: str) -> str | None:
    found = _MC.match(text) or _MC_LATE.search(text)
    return found.group(1).upper() if found else None


def score(text: str, reference) -> float:
    """1.0 / 0.0 (or the VQA fraction for a list of references) for one answer."""
    kind = kind_of(reference)
    if kind == "yesno":
        return float(yes_no(text) == normalize(reference))
    if kind == "choice":
        return float(choice_letter(text) == reference.strip())
    got = normalize(text)
    refs = reference if isinstance(reference, list) else [reference]
    matches = sum(got == normalize(str(r)) for r in refs)
    return min(1.0, matches / 3) if isinstance(reference, list) else float(matches > 0)


def yes_no_metrics(pairs: list) -> dict | None:
    """POPE's report over ``[(answer text, reference yes/no)]``; None when there are none."""
    if not pairs:
        return None
    tp = fp = tn = fn = 0
    for text, reference in pairs:
        pred, ref = yes_no(text) == "yes", normalize(reference) == "yes"
        tp, fp = tp + (pred and ref), fp + (pred and not ref)
        tn, fn = tn + (not pred and not ref), fn + (not pred and ref)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"questions": len(pairs), "accuracy": (tp + tn) / len(pairs), "precision": precision, "recall": recall,
            "f1": f1, "yes_ratio": (tp + fp) / len(pairs)}


def same_answer(a: str, b: str, reference=None) -> bool:
    """Whether two answers say the same (agreement with the full-token answer): compared as they are scored."""
    kind = kind_of(reference) if reference is not None else "open"
    if kind == "yesno":
        return yes_no(a) == yes_no(b)
    if kind == "choice":
        return choice_letter(a) == choice_letter(b)
    return normalize(a) == normalize(b)
