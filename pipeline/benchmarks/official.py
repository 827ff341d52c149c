"""The official code's answer extraction (`extract_judge_answer/utils.py`: `extract_answer` for a
model name that takes the generic path), which `compat=reference` grades GSM8K and AIME 2024
with: a number compared by string equality with the label as the data writes it."""

from __future__ import annotations

import json
import re

_NUM = r"([$€£¥]?\s*-?\s*[\d,]+(?:\.\d+)?)"
_OFFICIAL_PATTERNS = (  # tried in order; the first match wins
    (re.compile(r"\\boxed\{\s*" + _NUM + r"\s*\}", re.IGNORECASE), "first"),
    (re.compile(r"Answer:\s*" + _NUM, re.IGNORECASE), "first"),
    (re.compile(r"=\s*" + _NUM), "first"),
    (re.compile(r"is\s*" + _NUM + r"\s*(?:dollars|euros|pounds|yen)", re.IGNORECASE), "first"),
    (re.compile(_NUM + r"\s*$"), "last_line"),  # the last non-empty line's trailing number
    (re.compile(_NUM), "last"),  # the last number anywhere
)
_JSON_FALLBACK = re.compile(r'(?:final answer|my answer)"?:?\s*(.*?)[}<]', re.I | re.M | re.DOTALL)


def _clean_number(text: str) -> str:
    return re.sub(r"[$€£¥,\s]", "", text)


def official_number(text: str | None) -> str | None:
    """The official numeric extraction: first boxed number, `Answer:`, `= N`, `is N dollars`,
    the trailing number of the last line that has one, the last number; currency signs, commas
    and spaces removed."""
    if text is None:
        return None
    text = text.strip()
    for pattern, where in _OFFICIAL_PATTERNS:
        if where == "first":
            found = pattern.search(text)
        elif where == "last":
            hits = pattern.findall(text)
            return _clean_number(hits[-1]) if hits else None
        else:  # from the last line upwards, the first line that ends in a number
            lines = (ln.strip() for ln in reversed(text.split("\n")))
            found = next((m for ln in lines if ln and (m := pattern.search(ln))), None)
        if found:
            return _clean_number(found.group(1))
    return None


def official_extract(text: str, style: str) -> str | None:
    """The official answer for the boxed prompt (numeric extraction) or the json prompt (the
    "final answer" value of the whole text parsed as JSON, else the text after `final answer`)."""
    if style != "json":
        return official_number(text)
    try:
        parsed = json.loads(text.strip("` \n"))
    except json.JSONDecodeError:
        found = _JSON_FALLBACK.search(text)
        return official_number(found.group(1) if found else text)
    value = parsed.get("final answer", "") if isinstance(parsed, dict) else ""
    return official_number(value if isinstance(value, str) else str(value))
