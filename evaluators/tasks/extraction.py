"""Answer extraction from generated text: one documented rule list per answer format.

Each extractor returns the canonical answer string that is compared with the gold answer ("" = nothing found,
scored wrong). Rules are tried in order; the first that matches wins. The patterns are module constants so the
docs (docs/TASKS.md) and the tests refer to the same objects.
"""
from __future__ import annotations

import re
from typing import Sequence

from evaluators.tasks.metrics import canonical_number, normalize_answer, normalize_short

# A number: 1,234,567.89 (thousands groups) or plain -12.5; an optional $ is allowed before it.
NUMBER = r"(?:(?<!\w)-)?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(NUMBER)


def _num(text: str) -> str:
    return canonical_number(text.replace("$", "").replace(" ", ""))


# ------------------------------------------------------------------------------------------ multiple choice
# 1. an explicit statement: "answer is C", "Answer: (C)", "correct option is **C**"
MC_EXPLICIT = r"(?:[Aa]nswer|[Oo]ption|[Cc]hoice)(?:\s+is)?\s*[:\-]?\s*(?:[Oo]ption\s+)?[\(\[\*]*([A-Z])(?![A-Za-z'])"
# 2. the reply starts with a label: "C", "C.", "(C)", "C) text", "**C**"
MC_LEADING = r"^\s*[\(\[\*]*([A-Z])(?:[\)\]\*.:,]|\s*$)"
# 3. a parenthesised label anywhere: "(C)"
MC_PAREN = r"\(([A-Z])\)"
# 4. (no regex) the reply contains the full text of exactly one option (case-insensitive)
# 5. a lone capital label anywhere, not the article/pronoun "A"/"I" starting a sentence ("A dog ...", "I think")
MC_LONE = r"(?<![A-Za-z'])([A-Z])(?![A-Za-z'])(?!\s+[a-z])"


def extract_choice(text: str, labels: Sequence[str], option_texts: Sequence[str] = ()) -> str:
    """The chosen option label (one of `labels`) in a generated reply, "" when none is found. Rules MC_* above."""
    valid = set(labels)
    for pattern in (MC_EXPLICIT, MC_LEADING, MC_PAREN):
        for m in re.finditer(pattern, text, flags=re.MULTILINE if pattern is MC_LEADING else 0):
            if m.group(1) in valid:
                return m.group(1)
    if option_texts:
        low = text.lower()
        hits = [lab for lab, opt in zip(labels, option_texts) if opt.strip() and opt.strip().lower().rstrip(".") in low]
        if len(hits) == 1:
            return hits[0]
    for m in re.finditer(MC_LONE, text):
        if m.group(1) in valid:
            return m.group(1)
    return ""


# --------------------------------------------------------------------------------------------------- gsm8k
# 1. "The answer is 42" / "answer: $1,200" (the last such statement counts)
GSM_ANSWER_IS = rf"[Aa]nswer(?:\s+is)?\s*[:=]?\s*\**\s*({NUMBER})"
# 2. "#### 42" (GSM8K's own marker)
GSM_HASHES = rf"####\s*({NUMBER})"
# 3. "\boxed{42}"
GSM_BOXED = rf"\\boxed\{{\s*({NUMBER})"
# 4. otherwise the last number in the reply


def extract_number(text: str) -> str:
    """The final numeric answer of a math reply, canonicalised ('1,200.00' -> '1200'); "" when there is no number."""
    for pattern in (GSM_ANSWER_IS, GSM_HASHES, GSM_BOXED):
        found = re.findall(pattern, text)
        if found:
            return _num(found[-1])
    found = _NUMBER_RE.findall(text)
    return _num(found[-1]) if found else ""


# ------------------------------------------------------------------------------------------------- nlgraph
# connectivity ("Please directly answer with Yes or No"): the first standalone yes/no word
NLG_YES_NO = r"\b(yes|no)\b"
# shortest_path ("... answer with the length of the shortest path"):
# 1. a stated length/weight/distance/cost: "length of the shortest path is 11", "total weight: 11"
NLG_LENGTH = rf"(?:length|weight|distance|cost)[^0-9\n]{{0,40}}?(?:is|of|=|:)\s*\**\s*({NUMBER})"
# 2. the reply starts with a number that does not begin a path ("11", "11.", "11 (via 3)"; not "16 -> 3", "16, 3")
NLG_LEADING_NUMBER = rf"^\s*\**\s*({NUMBER})(?!\d|\.\d)\**(?!\s*(?:->|→|,\s*\d|-\s*\d))"
# 3. otherwise the last number in the reply


def extract_yes_no(text: str) -> str:
    m = re.search(NLG_YES_NO, text, flags=re.IGNORECASE)
    return m.group(1).capitalize() if m else ""


def extract_path_length(text: str) -> str:
    found = re.findall(NLG_LENGTH, text, flags=re.IGNORECASE)
    if found:
        return _num(found[-1])
    m = re.search(NLG_LEADING_NUMBER, text)
    if m:
        return _num(m.group(1))
    found = _NUMBER_RE.findall(text)
    return _num(found[-1]) if found else ""


# ----------------------------------------------------------------------------------- free answer (DROP-like)
# 1. an explicit statement "Answer: X" / "the answer is X" / "answer is: X" -> X up to the end of that line
#    ("an answer to the question" is not one: "answer" must be followed by "is" or ":")
FREE_ANSWER_IS = r"(?:^|[^A-Za-z])[Aa]nswer(?:\s+is\s*:?|\s*:)[ \t]*(\S.*)"
# 2. otherwise the first non-empty line. Either way, surrounding quotes, asterisks and a final period are stripped.


def extract_free_answer(text: str) -> str:
    """A short free-form answer (DROP, custom exact-match files); "" for an empty reply."""
    m = re.search(FREE_ANSWER_IS, text)
    if m:
        ans = m.group(1)
    else:
        ans = next((ln for ln in text.splitlines() if ln.strip()), "")
    return ans.strip().strip("*\"'` ").rstrip(".").strip()


def canonical_free_answer(text: str) -> str:
    """Voting key of a free answer: two predictions with the same key get the same EM/F1."""
    return normalize_answer(text)


def canonical_short_answer(text: str) -> str:
    return normalize_short(text)
