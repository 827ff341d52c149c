"""A deliberately naive LatentSeek, written from SPEC.md alone: the engine's independent reference.

The engine (`pipeline.method.methods`, `pipeline.engine.generation`, `pipeline.method.latent`, `pipeline.method.compat`) is
checked against this file in `tests/test_fidelity.py`, and `latentseek bench` times it as the
naive cost structure. To be worth comparing with, it shares nothing with the engine but the model
and the tokenizer: its own copy of the paper's prompts (SPEC §3), its own budget and stop rules,
its own answer extraction and PSRM, its own settings (keyword arguments, no config reader).

- One problem at a time, no KV cache: every generated token runs one full forward over the whole
  sequence so far (`model.model(ids).last_hidden_state[:, -1]` is the post-final-norm z_t,
  `model.lm_head(z_t)` its logits), greedy argmax.
- The CoT pass keeps every z_t; U = min(floor(rho * T), U_max); Z is a copy that requires grad;
  one Adam(lr) per problem; per iteration loss = -r * sum_t log(p_t[a_t] + 1e-10) with
  a_t = argmax, one step, new prefix = argmax(lm_head(Z)), greedy continuation from
  prompt + prefix; stop as soon as r > tau, at most K iterations, return the last answer.

The two modes (SPEC §1 and §6):

| | `compat="none"` (the engine's decisions) | `compat="reference"` (the official code) |
|---|---|---|
| CoT budget | `max_new_tokens` | `max_new_tokens + 1` |
| continuation budget | `max_new_tokens - U` | `max_new_tokens + 1` |
| CoT stops on | the model's EOS ids | a token decoding to `</s>`, `<|im_end|>`, `<|endoftext|>` or EOS |
| continuation stops on | the model's EOS ids | a token decoding to the EOS token |
| answer text | special tokens skipped | special tokens kept |
| prompt ids | chat template tokenized directly | chat template as text, then tokenized |
| Z, softmax | float32 | the model's dtype, `softmax + 1e-8` |
| PSRM | last boxed (else last number), math-verify | the official GSM8K extraction, string equality |

Expects a Llama-style causal LM (`model.model`, `model.lm_head`) with frozen weights.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

MODES = ("none", "reference")
PROB_EPS_REFERENCE = 1e-8  # the official code: probs = softmax(logits) + 1e-8
LOG_EPS = 1e-10  # both: log(p + 1e-10)
STOP_TEXTS_REFERENCE = ("</s>", "<|im_end|>", "<|endoftext|>")

# The paper's prompts (SPEC §3), verbatim: (system, user template). The note the json prompt
# adds for some datasets is the caller's `note` (the benchmark declares it).
PAPER_PROMPTS: dict[str, tuple[str, str]] = {
    "boxed": ("Please reason step by step, and put your final answer within \\boxed{}.", "{q}"),
    "json": (
        "You are a precise math question solver. Solve this math problem. ",
        "QUESTION: {q} \nLet's think step by step. Please provide your thought process and your "
        'final answer separately and response in json format containing the keys "thought '
        'process" and "final answer". For example your response should be {{"thought process": '
        '"your thought process", "final answer": "your final answer"}}. ',
    ),
}


def paper_messages(question: str, prompt: str = "boxed", note: str = "") -> list[dict]:
    system, user = PAPER_PROMPTS[prompt]
    content = user.format(q=question) + note
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


def prompt_ids(
    tokenizer: Any, question: str, prompt: str = "boxed", note: str = "", compat: str = "none"
) -> list[int]:
    """The paper's prompt (with `note` appended to the user message), chat-formatted with a
    generation prompt, as token ids."""
    messages = paper_messages(question, prompt, note)
    if compat == "reference":
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text)["input_ids"])
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


# ------------------------------------------------------------------------------------------
# Decoding without a cache


def model_eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return ids


@torch.no_grad()
def naive_greedy(
    model: Any,
    ids: Sequence[int],
    max_new_tokens: int,
    stop: Callable[[int], bool] | set[int],
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding without a cache; returns the tokens (the stop token included) and each
    token's z_t ([D], in the model's dtype). `stop` is a set of ids or a predicate on an id."""
    is_stop = stop.__contains__ if isinstance(stop, (set, frozenset)) else stop
    device = next(model.parameters()).device
    sequence = list(ids)
    tokens: list[int] = []
    zs: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        z = model.model(input_ids=torch.tensor([sequence], device=device), use_cache=False)
        z = z.last_hidden_state[:, -1]  # [1, D] post-final-norm
        token = int(model.lm_head(z).argmax(dim=-1)[0])
        tokens.append(token)
        zs.append(z[0].clone())
        sequence.append(token)
        if is_stop(token):
            break
    return tokens, zs


# ------------------------------------------------------------------------------------------
# PSRM, written independently of pipeline.method.grading and pipeline.method.compat


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 0, start + len("\\boxed")
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                inside = text[i + 1 : j].strip()
                if inside:
                    return inside
                break
        start = text.rfind("\\boxed{", 0, start)
    return None


def _plain_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").replace("$", "").strip())
    except ValueError:
        return None


def psrm_default(text: str, gold: str) -> float:
    """0 if the last boxed answer (else the last number) equals `gold`, else -1: numbers by
    value, anything else by math-verify."""
    found = _last_boxed(text)
    if found is None:
        numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
        found = numbers[-1] if numbers else None
    if found is None:
        return -1.0
    a, b = _plain_number(found), _plain_number(gold)
    if a is not None and b is not None:
        return 0.0 if a == b else -1.0
    from math_verify import parse, verify

    try:
        return 0.0 if verify(parse(f"${gold}$"), parse(f"${found}$")) else -1.0
    except Exception:  # noqa: BLE001 - an unparsable answer is a wrong answer
        return -1.0


_N = r"[$€£¥]?\s*-?\s*[\d,]+(?:\.\d+)?"


def official_gsm8k_answer(text: str) -> str | None:
    """SPEC §6's reading of the official GSM8K extraction (boxed prompt, generic model path)."""
    text = text.strip()
    found = (
        re.search(r"\\boxed\{\s*(" + _N + r")\s*\}", text, re.IGNORECASE)
        or re.search(r"Answer:\s*(" + _N + ")", text, re.IGNORECASE)
        or re.search(r"=\s*(" + _N + ")", text)
        or re.search(r"is\s*(" + _N + r")\s*(?:dollars|euros|pounds|yen)", text, re.IGNORECASE)
    )
    number = found.group(1) if found else None
    if number is None:
        for line in reversed(text.split("\n")):
            tail = re.search("(" + _N + r")\s*$", line.strip()) if line.strip() else None
            if tail:
                number = tail.group(1)
                break
    if number is None:
        every = re.findall("(" + _N + ")", text)
        number = every[-1] if every else None
    return None if number is None else re.sub(r"[$€£¥,\s]", "", number)


def psrm_official(text: str, label: str) -> float:
    """0 if the official extraction equals the label string exactly, else -1."""
    return 0.0 if official_gsm8k_answer(text) == label else -1.0


# ------------------------------------------------------------------------------------------
# The method


@dataclass
class ReferenceResult:
    cot_tokens: list[int]  # greedy CoT answer (the stop step included if reached)
    cot_text: str
    initial_reward: float  # r0
    update_length: int  # U
    answer_tokens: list[list[int]] = field(default_factory=list)  # per iteration: prefix + cont.
    answer_texts: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)  # reward after each iteration
    final_text: str = ""  # the last answer (the CoT answer if there was no iteration)
    stop_reason: str = ""  # cot_accepted | no_update | threshold | max_iters
    cot_seconds: float = 0.0  # wall time of the CoT pass alone (the naive CoT baseline's cost)

    @property
    def iterations(self) -> int:
        return len(self.rewards)


def naive_latentseek(
    model: Any,
    tokenizer: Any,
    prompt: Sequence[int],
    gold: str,
    *,
    lr: float,
    rho: float,
    max_iters: int,
    max_new_tokens: int,
    reward_threshold: float = -0.2,
    max_update_length: int = 300,
    compat: str = "none",
    reward_fn: Callable[[str, str], float] | None = None,
    se_sigma2: float | None = None,
    se_seed: int = 0,
) -> ReferenceResult:
    """SPEC §1 for one problem in mode `compat`; `reward_fn(answer_text, gold) -> float`
    (default: the mode's PSRM; in reference mode `gold` is the label as the data writes it).

    `se_sigma2`: the unguided search of the paper's Table 5 instead of the gradient steps: Z plus
    Gaussian noise of that variance (drawn on the CPU in float32 from a generator seeded with
    `se_seed`), decoded and continued once; its answer is returned."""
    if compat not in MODES:
        raise ValueError(f"compat={compat!r}: allowed: {', '.join(MODES)}")
    reference = compat == "reference"
    reward_of = reward_fn or (psrm_official if reference else psrm_default)
    eos = model_eos_ids(model, tokenizer)
    if reference:
        stop_words = {*STOP_TEXTS_REFERENCE, tokenizer.eos_token}

        def cot_stop(token: int) -> bool:
            return tokenizer.decode(token) in stop_words

        def continuation_stop(token: int) -> bool:
            return tokenizer.decode(token) == tokenizer.eos_token

        cot_budget = max_new_tokens + 1
    else:
        cot_stop = continuation_stop = eos.__contains__
        cot_budget = max_new_tokens

    def text_of(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=not reference)

    # 1-2. CoT pass, keeping z_t; initial reward.
    start = time.perf_counter()
    cot, zs = naive_greedy(model, prompt, cot_budget, cot_stop)
    cot_seconds = time.perf_counter() - start
    reward = reward_of(text_of(cot), gold)
    # 3. U = min(floor(rho * T), U_max).
    u = min(math.floor(rho * len(cot)), max_update_length)
    res = ReferenceResult(cot, text_of(cot), reward, u, final_text=text_of(cot))
    res.cot_seconds = cot_seconds
    if reward > reward_threshold:
        res.stop_reason = "cot_accepted"
        return res
    if u == 0:
        res.stop_reason = "no_update"
        return res

    z = torch.stack(zs[:u]).detach().clone()  # [U, D] the trainable parameter
    z = z if reference else z.float()
    continuation_budget = max_new_tokens + 1 if reference else max(max_new_tokens - u, 0)
    if se_sigma2 is not None:
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(se_seed))
        noisy = z + (math.sqrt(se_sigma2) * noise).to(z.dtype)
        with torch.no_grad():
            prefix = model.lm_head(noisy.to(model.lm_head.weight.dtype)).argmax(dim=-1).tolist()
        continuation, _ = naive_greedy(
            model, list(prompt) + prefix, continuation_budget, continuation_stop
        )
        text = text_of(prefix + continuation)
        res.answer_tokens, res.answer_texts = [prefix + continuation], [text]
        res.rewards, res.final_text, res.stop_reason = [reward_of(text, gold)], text, "explored"
        return res
    z.requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)
    res.stop_reason = "max_iters"
    # 4. Iterate while r <= tau, at most K times.
    for _ in range(max_iters):
        with torch.enable_grad():
            logits = model.lm_head(z.to(model.lm_head.weight.dtype))  # [U, V], model's dtype
            if reference:
                probs = torch.softmax(logits, dim=-1) + PROB_EPS_REFERENCE
            else:
                probs = torch.softmax(logits.float(), dim=-1)
            chosen = probs.argmax(dim=-1)  # [U] a_t
            logp = torch.log(probs[torch.arange(u), chosen] + LOG_EPS)  # [U]
            loss = -reward * logp.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            prefix = model.lm_head(z.to(logits.dtype)).argmax(dim=-1).tolist()  # x'_1..U
        continuation, _ = naive_greedy(
            model, list(prompt) + prefix, continuation_budget, continuation_stop
        )
        answer = prefix + continuation
        text = text_of(answer)
        reward = reward_of(text, gold)
        res.answer_tokens.append(answer)
        res.answer_texts.append(text)
        res.rewards.append(reward)
        res.final_text = text
        if reward > reward_threshold:
            res.stop_reason = "threshold"
            break
    return res


# ------------------------------------------------------------------------------------------
# Self-reward, written from SPEC §2 (greedy verifiers only)


def _verdict_after_marker(generated: str, marker: str) -> bool | None:
    """Default mode: the last `marker` in the generated text followed (after spaces and `*`) by
    the whole word True or False, any case; None when there is none."""
    verdict = None
    low, key = generated.lower(), marker.lower()
    at = low.find(key)
    while at >= 0:
        rest = low[at + len(key) :].lstrip(" \t\n*")
        for word, value in (("true", True), ("false", False)):
            follows = rest[len(word) : len(word) + 1]
            if rest.startswith(word) and not (follows.isalnum() or follows == "_"):
                verdict = value
        at = low.find(key, at + 1)
    return verdict


def _official_approval(whole: str, marker: str) -> bool:
    """compat=reference: the text after the last `marker` of prompt and answer together, `*`
    removed, lower-cased: "true" in it approves; anything else does not."""
    at = whole.lower().rfind(marker.lower())
    if at < 0:
        return False
    return "true" in whole[at + len(marker) :].replace("*", "").strip().lower()


def naive_self_reward(
    model: Any,
    tokenizer: Any,
    question: str,
    verifiers: Sequence[tuple[str, float, str]],  # (name, weight, template), in order
    marker: str,
    *,
    max_new_tokens: int,
    compat: str = "none",
    format_rule: bool = False,
    format_penalty: float = 2.0,
) -> Callable[[str, str], float]:
    """SPEC §2's self-reward of answers to `question`, as `reward_fn(text, gold)`: each verifier
    in turn, its template filled with the question and the answer as the only user message of
    the chat template (tokenized by the template call), decoded greedily without a cache for up
    to `max_new_tokens` tokens, stopping on the generation config's EOS ids (compat=reference)
    or the model's (default); reward = -(weights of rejections [+ penalty]) / (all weights)."""
    if getattr(model.generation_config, "do_sample", False):
        raise NotImplementedError("the reference loop decodes verifiers greedily only")
    reference = compat == "reference"
    if reference:
        eos = model.generation_config.eos_token_id
        stops = set(eos) if isinstance(eos, (list, tuple)) else {eos}
    else:
        stops = model_eos_ids(model, tokenizer)
    total = sum(w for _, w, _ in verifiers)

    def reward(text: str, gold: str) -> float:
        failed = 0.0
        for _, weight, template in verifiers:
            content = template.format(question=question, solution=text, answer=text)
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
            )
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            generated, _ = naive_greedy(model, ids, max_new_tokens, stops)
            if reference:
                whole = tokenizer.decode(ids + generated, skip_special_tokens=True)
                approved = _official_approval(whole, marker)
            else:
                said = tokenizer.decode(generated, skip_special_tokens=True)
                approved = _verdict_after_marker(said, marker) is True
            failed += 0.0 if approved else weight
        if format_rule:
            boxed = (
                re.search(r"\\boxed{(.*)}", text, re.DOTALL) is not None
                if reference
                else ("\\boxed" in text or "\\fbox" in text)
            )
            failed += 0.0 if boxed else format_penalty
        return -failed / total

    return reward
