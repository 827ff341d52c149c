"""Prompt templates, kept as data in `configs/prompts/*.yaml`.

A solver template has `name`, `style` ("boxed" or "json": how answers are extracted and what the
format rule checks), an optional `system` message (taken literally), a `user` message with a
`{question}` placeholder; a benchmark may declare text its user message gets for a template of a
given name (`Benchmark.prompt_suffix`: the paper's json prompt adds a note for some). The
shipped `boxed` and `json` templates are the paper's prompts verbatim, with their roles (SPEC.md
§3); a template without a system message lets the model's chat template inject its default one. A verifier file has a `marker`, a `format_penalty` and a list of verifiers, each
with `name`, `weight` and a `user` message with `{question}` and `{answer}` (a message without
the placeholder it exists for, `{question}` in a solver's, `{answer}` or `{solution}` in a
verifier's, is refused: every prompt would be the same). Users add a template
by dropping a YAML file in `configs/prompts/` (refer to it by name) or anywhere (refer to it by
path). Messages go through the model's own chat template with a generation prompt.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import CONFIG_DIR, ConfigError, read_yaml_file

PROMPT_DIR = CONFIG_DIR / "prompts"
STYLES = ("boxed", "json")


@dataclass(frozen=True)
class SolverTemplate:
    name: str
    style: str
    user: str
    system: str = ""

    def messages(self, question: str, suffix: str = "") -> list[dict[str, str]]:
        """The chat messages for `question`; `suffix` (the benchmark's text for this template,
        `pipeline.benchmarks.prompt_suffix`) is appended to the user message as it is."""
        user = self.user.format(question=question) + suffix
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": user}]


# What may stand between a verifier's marker and its True/False in the default mode: whitespace,
# markdown emphasis, quotes, backticks, opening braces/brackets/parentheses, `$`, and LaTeX
# wrappers such as \boxed{ or \text{ (compat=reference reads verdicts the official way instead).
VERDICT_WRAPPING = r"(?:[\s*_'\"`{\[($]|\\(?:boxed|text|textbf|mathrm|mathbf)\s*\{)*"


@dataclass(frozen=True)
class Verifier:
    name: str
    weight: float
    user: str

    def messages(self, question: str, answer: str) -> list[dict[str, str]]:
        """The user message alone ({solution} is the official name of {answer})."""
        text = self.user.format(question=question, answer=answer, solution=answer)
        return [{"role": "user", "content": text}]


@dataclass(frozen=True)
class VerifierSet:
    marker: str
    format_penalty: float
    verifiers: tuple[Verifier, ...]

    @property
    def total_weight(self) -> float:
        return sum(v.weight for v in self.verifiers)

    def parse_verdict(self, generated: str) -> bool | None:
        """The last `<marker> True|False` in the generated text (never the prompt), else None.

        Between the marker and the word may stand what models wrap a verdict in: spaces, bold or
        italics (`**`, `_`), quotes, backticks, braces, brackets, `$` and `\\boxed{`/`\\text{`,
        e.g. `<marker> 'True'`, `` `True` ``, `\\boxed{True}`, `**<marker>** **True**`. The word
        itself must stand whole (`Truely` is no verdict)."""
        pattern = re.escape(self.marker) + VERDICT_WRAPPING + r"(true|false)\b"
        found = re.findall(pattern, generated, flags=re.IGNORECASE)
        return None if not found else found[-1].lower() == "true"


def template_path(ref: str) -> Path:
    """The file a `prompt` or `verifier_prompts` value names (a path, or a name in
    configs/prompts)."""
    path = Path(ref).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise ConfigError(f"prompt template file not found: {path}")
        return path
    named = PROMPT_DIR / f"{ref}.yaml"
    if not named.exists():
        known = sorted(p.stem for p in PROMPT_DIR.glob("*.yaml"))
        raise ConfigError(
            f"prompt template {ref!r} not found; known: {', '.join(known)}, or a path"
        )
    return named


def _load_yaml(path: Path) -> dict[str, Any]:
    return read_yaml_file(path, "template keys")


def _text(path: Path, data: dict[str, Any], key: str, where: str = "") -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise ConfigError(f"{path}: {where}{key!r} must be a string, got {type(value).__name__}")
    return value


def _check_placeholders(
    path: Path, text: str, allowed: set[str], needed: set[str], where: str = ""
) -> None:
    """`text` formats with the `allowed` names and holds at least one of `needed`."""
    try:
        names = {m.group(1) for m in re.finditer(r"(?<!\{)\{(\w*)\}(?!\})", text)}
        text.format(**{k: "" for k in allowed})
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"{path}: {where}bad placeholder {exc}; allowed: {sorted(allowed)}"
        ) from None
    if not names <= allowed:
        raise ConfigError(f"{path}: {where}unknown placeholders {sorted(names - allowed)}")
    if not names & needed:
        wanted = " or ".join("{" + n + "}" for n in sorted(needed))
        raise ConfigError(
            f"{path}: {where}the message has no {wanted}: every prompt would be the same"
        )


def load_solver_template(ref: str) -> SolverTemplate:
    path = template_path(ref)
    data = _load_yaml(path)
    for key in ("style", "user"):
        if key not in data:
            raise ConfigError(f"{path}: missing key {key!r}")
    if data["style"] not in STYLES:
        raise ConfigError(f"{path}: style={data['style']!r}; allowed: {', '.join(STYLES)}")
    user = _text(path, data, "user")
    _check_placeholders(path, user, {"question"}, {"question"})
    system = data.get("system") or ""
    if not isinstance(system, str):
        raise ConfigError(f"{path}: 'system' must be a string, got {type(system).__name__}")
    return SolverTemplate(
        name=str(data.get("name", path.stem)), style=data["style"], user=user, system=system
    )


def load_verifiers(ref: str, _seen: tuple[Path, ...] = ()) -> VerifierSet:
    """A verifier file: a list of verifiers, or `include:` another verifier file and change its
    `weights:` (name -> weight), `format_penalty` or `marker` (the paper reweights some cells)."""
    path = template_path(ref)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: include cycle")
    data = _load_yaml(path)
    if "include" in data:
        return _derived_verifiers(path, data, _seen + (path.resolve(),))
    items = data.get("verifiers")
    if not items or not isinstance(items, list):
        raise ConfigError(f"{path}: needs a non-empty list 'verifiers'")
    verifiers = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "user" not in item or "weight" not in item:
            raise ConfigError(f"{path}: verifier {i} needs 'user' and 'weight'")
        weight = item["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"{path}: verifier {i}: 'weight' must be a number, got {weight!r}")
        if not math.isfinite(weight):
            raise ConfigError(f"{path}: verifier {i}: 'weight' must be finite, got {weight}")
        if weight < 0:
            raise ConfigError(f"{path}: verifier {i} has a negative weight")
        where = f"verifier {i}: "
        user = _text(path, item, "user", where)
        _check_placeholders(
            path, user, {"question", "answer", "solution"}, {"answer", "solution"}, where
        )
        verifiers.append(Verifier(str(item.get("name", f"v{i}")), float(weight), user))
    penalty = data.get("format_penalty", 2)
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)):
        raise ConfigError(f"{path}: 'format_penalty' must be a number, got {penalty!r}")
    vset = VerifierSet(
        marker=str(data.get("marker", "Verdict:")),
        format_penalty=float(penalty),
        verifiers=tuple(verifiers),
    )
    if vset.total_weight <= 0:
        raise ConfigError(f"{path}: the verifier weights must sum to > 0")
    return vset


def _derived_verifiers(path: Path, data: dict[str, Any], seen: tuple[Path, ...]) -> VerifierSet:
    unknown = sorted(set(data) - {"include", "name", "weights", "format_penalty", "marker"})
    if unknown:
        raise ConfigError(f"{path}: a file that includes another may set weights, "
                          f"format_penalty and marker only, not {unknown}")  # fmt: skip
    include = str(data["include"])
    base = load_verifiers(
        str(path.parent / include) if include.endswith(".yaml") else include, seen
    )
    weights = data.get("weights") or {}
    names = {v.name for v in base.verifiers}
    if not isinstance(weights, dict) or not set(weights) <= names:
        raise ConfigError(f"{path}: weights must map verifier names ({sorted(names)}) to numbers")
    if any(float(w) < 0 for w in weights.values()):
        raise ConfigError(f"{path}: a negative weight")
    verifiers = tuple(
        Verifier(v.name, float(weights.get(v.name, v.weight)), v.user) for v in base.verifiers
    )
    vset = VerifierSet(
        marker=str(data.get("marker", base.marker)),
        format_penalty=float(data.get("format_penalty", base.format_penalty)),
        verifiers=verifiers,
    )
    if vset.total_weight <= 0:
        raise ConfigError(f"{path}: the verifier weights must sum to > 0")
    return vset


@dataclass(frozen=True)
class ReflectPrompts:
    """Self-reflection's two user messages: a review of the last answer, then a new answer."""

    name: str
    critique: str
    revise: str


def load_reflect_prompts(ref: str) -> ReflectPrompts:
    path = template_path(ref)
    data = _load_yaml(path)
    for key in ("critique", "revise"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise ConfigError(f"{path}: needs a non-empty string {key!r}")
    return ReflectPrompts(str(data.get("name", path.stem)), data["critique"], data["revise"])


def render_chat(tokenizer: Any, messages: list[dict[str, str]], as_text: bool = False) -> list[int]:
    """Token ids of the chat-formatted messages, ending with the assistant generation prompt.

    `as_text=True` is the official code's way (compat=reference): render the template to text,
    then tokenize that text with the tokenizer's defaults, so a tokenizer that adds a BOS token
    adds it again in front of the template's own (Llama 3); for SmolLM2 and Qwen both ways give
    the same ids."""
    if as_text:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text)["input_ids"])
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)
