"""The paper's prompts (SPEC.md §3), verbatim and with their roles, through the embedded model's
chat template: the exact strings the model sees. The expected strings are written out here by hand
from SPEC §3 and SmolLM2's ChatML template, not computed from the templates under test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.benchmarks import prompt_suffix
from pipeline.config import CONFIG_DIR, ConfigError
from pipeline.method import reference
from pipeline.method.prompts import load_solver_template, load_verifiers, render_chat

Q = "Natalia sold 48 clips in April. How many clips did she sell?"

BOXED = (
    "<|im_start|>system\n"
    "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
    "<|im_start|>user\n" + Q + "<|im_end|>\n"
    "<|im_start|>assistant\n"
)
JSON_HEAD = (
    "<|im_start|>system\n"
    "You are a precise math question solver. Solve this math problem. <|im_end|>\n"
    "<|im_start|>user\n"
    "QUESTION: " + Q + " \n"
    "Let's think step by step. Please provide your thought process and your final answer "
    'separately and response in json format containing the keys "thought process" and "final '
    'answer". For example your response should be {"thought process": "your thought process", '
    '"final answer": "your final answer"}. '
)
NOTE = (
    "Note that the final answer should be pure numbers, not the calculation formulas, and "
    "without any units or explanation!!! "
)
TAIL = "<|im_end|>\n<|im_start|>assistant\n"

EXPECTED = {
    ("boxed", "gsm8k"): BOXED,
    ("boxed", "math500"): BOXED,
    ("boxed", "aime2024"): BOXED,
    ("json", "gsm8k"): JSON_HEAD + NOTE + TAIL,
    ("json", "math500"): JSON_HEAD + TAIL,
    ("json", "aime2024"): JSON_HEAD + NOTE + TAIL,
}


@pytest.mark.parametrize("prompt,dataset", sorted(EXPECTED))
def test_paper_prompt_renders_exactly(embedded, prompt, dataset):
    tok = embedded.tokenizer
    messages = load_solver_template(prompt).messages(Q, prompt_suffix(dataset, prompt))
    assert [m["role"] for m in messages] == ["system", "user"]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == EXPECTED[prompt, dataset]
    # SmolLM2's default system prompt ("You are a helpful AI assistant named SmolLM ...") is
    # injected only when no system message is given: it must not appear.
    assert "SmolLM" not in text
    # The ids the engine feeds are those of this text, in both compat modes.
    ids = render_chat(tok, messages)
    assert tok.decode(ids) == EXPECTED[prompt, dataset]
    assert render_chat(tok, messages, as_text=True) == ids


@pytest.mark.parametrize("prompt,dataset", sorted(EXPECTED))
def test_reference_keeps_its_own_copy_of_the_same_prompts(embedded, prompt, dataset):
    # pipeline.method.reference writes the prompts out independently; both copies must agree.
    note = prompt_suffix(dataset, prompt)
    assert reference.paper_messages(Q, prompt, note) == load_solver_template(prompt).messages(
        Q, note
    )
    ids = reference.prompt_ids(embedded.tokenizer, Q, prompt, note)
    assert embedded.tokenizer.decode(ids) == EXPECTED[prompt, dataset]


def test_a_template_under_another_name_gets_no_benchmark_note(tmp_path):
    # The note belongs to the benchmark and the paper's template name ("json"); a user's copy
    # under another name renders its own text only.
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nstyle: json\nuser: 'Q: {question}'\n")
    template = load_solver_template(str(path))
    assert prompt_suffix("gsm8k", template.name) == ""
    assert prompt_suffix("gsm8k", "json") == NOTE and prompt_suffix("math500", "json") == ""
    with pytest.raises(ConfigError, match="style"):
        path.write_text("style: latex\nuser: '{question}'\n")
        load_solver_template(str(path))


# --- the paper's verifiers ----------------------------------------------------------------------

# tests/data/verifiers.json: the official code's renders of the four prompts, copied from the
# project's shared reference (MIT-licensed; LICENSE-LatentSeek.txt beside it), the independent
# source the shipped configs/prompts/verifiers.yaml is checked against.
OFFICIAL = json.loads((Path(__file__).parent / "data" / "verifiers.json").read_text())
SMOL_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n"
)
ANSWER = "She sold 48 / 2 = 24 clips in May, so 48 + 24 = 72 in all. \\boxed{72}<|im_end|>"


@pytest.mark.parametrize("name", OFFICIAL["order"])
def test_paper_verifier_renders_exactly(embedded, name):
    # Each verifier prompt is the user message alone; the chat template adds SmolLM2's default
    # system message, as in the official code, and the answer (special tokens kept, as the
    # official answer text) sits where the official code interpolates {solution}.
    shipped = {v.name: v for v in load_verifiers("verifiers").verifiers}[name]
    messages = shipped.messages(Q, ANSWER)
    assert messages == [{"role": "user", "content": messages[0]["content"]}]
    body = OFFICIAL["prompts"][name].replace("{question}", Q).replace("{solution}", ANSWER)
    expected = SMOL_SYSTEM + "<|im_start|>user\n" + body + "<|im_end|>\n<|im_start|>assistant\n"
    tok = embedded.tokenizer
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected
    ids = render_chat(tok, messages)
    assert tok.decode(ids) == expected
    # The answer's <|im_end|> is read back as that one special token, inside the user turn.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert ids.count(im_end) == 3  # the system turn's, the answer's, the user turn's


def test_paper_verifiers_order_weights_and_marker():
    v = load_verifiers("verifiers")
    assert [x.name for x in v.verifiers] == OFFICIAL["order"]
    assert {x.name: x.weight for x in v.verifiers} == OFFICIAL["weights"]
    assert v.marker == OFFICIAL["answer_symbol"] == "FINAL VERIFICATION ANSWER IS:"
    license_text = (CONFIG_DIR / "prompts" / "LICENSE-LatentSeek.txt").read_text()
    assert "MIT License" in license_text and "NLCo-Lab" in license_text
