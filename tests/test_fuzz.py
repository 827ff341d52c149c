"""Bad input, tried on purpose: every user-facing input, broken in the ways users break it.

Each case runs the real command line (`python -m jobs.cli run ...`, or `sweep`) in a fresh
process with its output_dir in a temporary directory, and must end in one line on stderr that
names the input, exit status 2, no traceback, no Ray started (no worker can have started) and no
record written. The cases are generated below (no fuzzing library): config YAML and `key=value`
values, dataset files, prompt and verifier templates, sweep files, `reward=module:function`.

Each case is a process that imports torch (seconds), so the selected cases are started together,
a few at a time, when the first of them is checked (`launched`), and each test reads its own. As
processes, a few cases run by default (`PROCESS`), every case with the slow tests; in the default
suite the representative cases (`DEFAULT`) also run through the same entry point in this process
(`jobs.cli.main`, its libraries already imported: a fraction of a second each) with Ray's start
refused, which checks the same line, exit status and files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "configs" / "prompts"
BIG = 10 * 2**20  # "a 10 MB line"


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path], list[str]]  # writes its files under the directory, returns the args
    names: str  # what the one line must name (a key, a file, a value)
    says: str  # and what it must say about it


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def run(*overrides: str) -> Callable[[Path], list[str]]:
    """`run` with these overrides (`{d}` is the case's directory)."""
    return lambda d: ["run", *(o.format(d=d) for o in overrides)]


def with_config(text: str | bytes, *overrides: str) -> Callable[[Path], list[str]]:
    def build(d: Path) -> list[str]:
        return ["run", "--config", str(write(d / "c.yaml", text)), *overrides]

    return build


def with_file(name: str, content: str | bytes, key: str, *more: str) -> Callable:
    """`run key=<the file>`, the file written first."""

    def build(d: Path) -> list[str]:
        return ["run", f"{key}={write(d / name, content)}", *more]

    return build


def with_sweep(text: str | bytes) -> Callable[[Path], list[str]]:
    return lambda d: ["sweep", str(write(d / "s.yaml", text))]


def include_cycle(d: Path) -> list[str]:
    write(d / "b.yaml", "include: c.yaml\n")
    return ["run", "--config", str(write(d / "c.yaml", "include: b.yaml\n"))]


def config_directory(d: Path) -> list[str]:
    (d / "conf.d").mkdir()
    return ["run", "--config", str(d / "conf.d")]


def reward_module(source: str, name: str = "fuzz_reward") -> Callable[[Path], list[str]]:
    """`run reward=<module>:score` with the module in the case's directory (on PYTHONPATH)."""

    def build(d: Path) -> list[str]:
        write(d / "mods" / f"{name}.py", source)
        return ["run", f"reward={name}:score"]

    return build


def jsonl(*rows: str) -> str:
    return "".join(r + "\n" for r in rows)


GOOD_ROW = '{"question": "What is 1+1?", "answer": "2"}'
BOXED = (PROMPTS / "boxed.yaml").read_text()
VERIFIERS = (PROMPTS / "verifiers-short.yaml").read_text()

CASES = [
    # --- the model, templates, dataset and device named on the command line -----------------
    Case("cli-model-dir", run("model=no/such/dir"), "model='no/such/dir'", "no such directory"),
    Case(
        "cli-model-hub-id",
        run("model=no-org/no-such-model-xyz"),  # HF_HOME is an empty cache: not downloaded
        "model='no-org/no-such-model-xyz'",
        "not in the local Hugging Face cache",
    ),
    Case("cli-model-gguf", run("model=/no/such/model.gguf"), "/no/such/model.gguf", "GGUF file"),
    Case(
        "cli-prompt-file",
        run("prompt=/no/such/prompt.yaml"),
        "prompt='/no/such/prompt.yaml'",
        "template file not found",
    ),
    Case("cli-verifier-name", run("verifier_prompts=nosuch"), "'nosuch'", "known: boxed"),
    Case("cli-dataset", run("dataset=/no/such/data.jsonl"), "/no/such/data.jsonl", "not found"),
    Case("cli-device-cuda", run("device=cuda"), "device='cuda'", "needs gpus_per_worker > 0"),
    Case("cli-rho", run("rho=2"), "rho=2.0", "must be in [0, 1]"),
    # --- config YAML -------------------------------------------------------------------------
    Case("yaml-syntax", with_config("lr: [0.1\nrho: 0.2\n"), "c.yaml", "not valid YAML"),
    Case("yaml-list", with_config("- lr\n- rho\n"), "c.yaml", "expected a mapping"),
    Case("yaml-unknown-key", with_config("lrr: 0.1\n"), "'lrr'", "unknown key"),
    Case("yaml-wrong-type", with_config("max_iters: ten\n"), "max_iters='ten'", "expected int"),
    Case("yaml-null", with_config("max_iters:\n"), "max_iters=None", "expected int"),
    Case("yaml-nan", with_config("lr: .nan\n"), "lr=nan", "finite"),
    Case("yaml-not-utf8", with_config(b"lr: 0.1 # \xff\xfe\n"), "c.yaml", "not UTF-8"),
    Case("yaml-include-missing", with_config("include: nope.yaml\n"), "nope.yaml", "not found"),
    Case("yaml-include-number", with_config("include: 5\n"), "c.yaml", "include must be"),
    Case("yaml-include-cycle", include_cycle, "c.yaml", "include cycle"),
    Case("config-is-a-directory", config_directory, "conf.d", "cannot read"),
    # --- key=value -----------------------------------------------------------------------------
    Case("kv-not-a-float", run("lr=abc"), "lr='abc'", "expected float"),
    Case("kv-infinite", run("lr=inf"), "lr=inf", "finite"),
    Case("kv-nan-threshold", run("reward_threshold=nan"), "reward_threshold=nan", "finite"),
    Case("kv-negative", run("limit=-1"), "limit=-1", ">= 0"),
    Case("kv-no-equals", run("limit"), "'limit'", "expected key=value"),
    Case("kv-unknown-key", run("lmit=1"), "'lmit'", "unknown key"),
    Case("kv-empty-list", run("method="), "method=[]", "allowed"),
    Case("kv-broken-list", run("ids=[a,"), "ids='[a,'", "expected a list"),
    Case("kv-run-id-dots", run("run_id=.."), "run_id='..'", "must not start with '.'"),
    Case("kv-float-for-int", run("batch_size=1.5"), "batch_size='1.5'", "expected int"),
    Case("kv-newline-in-path", run("dataset={d}/a\nb.jsonl"), "b.jsonl", "file not found"),
    # --- dataset files ---------------------------------------------------------------------------
    Case("data-empty", with_file("d.jsonl", "", "dataset"), "d.jsonl", "file is empty"),
    Case("data-blank-lines", with_file("d.jsonl", "\n\n \n", "dataset"), "d.jsonl", "empty"),
    Case(
        "data-bad-json",
        with_file("d.jsonl", jsonl(GOOD_ROW, "{question: 1"), "dataset"),
        "d.jsonl line 2",
        "not valid JSON",
    ),
    Case(
        "data-10mb-question",
        with_file("d.jsonl", jsonl('{"question": "' + "7" * BIG + '", "answer": "1"}'), "dataset"),
        "d.jsonl line 1",
        f"field 'question' is {BIG} characters long",
    ),
    Case(
        "data-10mb-garbage",
        with_file("d.jsonl", "{" + "x" * BIG + "\n", "dataset"),
        "d.jsonl line 1",
        "not valid JSON",
    ),
    Case(
        "data-not-utf8",
        with_file("d.jsonl", b'{"question": "\xff\xfe", "answer": "1"}\n', "dataset"),
        "d.jsonl line 1",
        "not valid UTF-8",
    ),
    Case(
        "data-nested-deep",
        with_file("d.jsonl", '{"a": ' * 100_000 + "\n", "dataset"),
        "d.jsonl line 1",
        "nested too deep",
    ),
    Case(
        "data-nested-array",
        with_file("d.json", "[" * 100_000, "dataset"),
        "d.json",
        "nested too deep",
    ),
    Case(
        "data-array-of-numbers",
        with_file("d.json", "[1, 2]", "dataset"),
        "d.json row 0",
        "expected a JSON object",
    ),
    Case(
        "data-question-number",
        with_file("d.jsonl", '{"question": 3, "answer": "1"}\n', "dataset"),
        "'question'",
        "must be a string",
    ),
    Case(
        "data-no-answer",
        with_file("d.jsonl", '{"question": "q"}\n', "dataset"),
        "'answer'",
        "is missing",
    ),
    Case(
        "data-duplicate-ids",
        with_file(
            "d.jsonl",
            jsonl(
                '{"id": 1, "question": "a", "answer": "1"}',
                '{"id": 1, "question": "b", "answer": "2"}',
            ),
            "dataset",
            "id_field=id",
        ),
        "d.jsonl line 2",
        "duplicate problem id '1'",
    ),
    Case(
        "data-csv-not-utf8",
        with_file("d.csv", b"question,answer\n\xff,1\n", "dataset"),
        "d.csv",
        "not valid CSV",
    ),
    Case(
        "data-parquet-garbage",
        with_file("d.parquet", b"PAR1 not really", "dataset"),
        "d.parquet",
        "not a valid Parquet file",
    ),
    Case(
        "data-unknown-suffix",
        with_file("d.txt", GOOD_ROW, "dataset"),
        "d.txt",
        "unsupported file type",
    ),
    # --- prompt and verifier templates -----------------------------------------------------------
    Case(
        "prompt-no-question",
        with_file("p.yaml", BOXED.replace("{question}", "Solve it."), "prompt"),
        "p.yaml",
        "has no {question}",
    ),
    Case(
        "prompt-unknown-placeholder",
        with_file("p.yaml", BOXED.replace("{question}", "{question} {hint}"), "prompt"),
        "p.yaml",
        "bad placeholder 'hint'",
    ),
    Case(
        "prompt-user-a-list",
        with_file("p.yaml", "style: boxed\nuser: [a, b]\n", "prompt"),
        "p.yaml",
        "'user' must be a string",
    ),
    Case(
        "prompt-bad-yaml",
        with_file("p.yaml", "style: boxed\nuser: '{question}\n", "prompt"),
        "p.yaml",
        "not valid YAML",
    ),
    Case(
        "prompt-not-utf8",
        with_file("p.yaml", b"style: boxed\nuser: '\xff{question}'\n", "prompt"),
        "p.yaml",
        "not UTF-8",
    ),
    Case(
        "verifier-weight-text",
        with_file(
            "v.yaml",
            VERIFIERS.replace("weight: 1", "weight: heavy", 1),
            "verifier_prompts",
            "reward=self",
        ),
        "v.yaml",
        "'weight' must be a number",
    ),
    Case(
        "verifier-no-answer",
        with_file("v.yaml", VERIFIERS.replace("{answer}", "the answer"), "verifier_prompts"),
        "v.yaml",
        "has no {answer} or {solution}",
    ),
    # --- sweep files -------------------------------------------------------------------------------
    Case(
        "sweep-unknown-key",
        with_sweep("name: s\ngrids: {lr: [0.1]}\n"),
        "s.yaml",
        "unknown sweep keys ['grids']",
    ),
    Case(
        "sweep-empty-values", with_sweep("name: s\ngrid: {lr: []}\n"), "s.yaml", "non-empty lists"
    ),
    Case("sweep-nothing", with_sweep("name: s\ngrid: {}\n"), "s.yaml", "nothing to sweep"),
    Case(
        "sweep-unknown-config-key",
        with_sweep("name: s\ngrid: {lrr: [0.1, 0.2]}\n"),
        "'lrr'",
        "unknown key",
    ),
    Case("sweep-not-utf8", with_sweep(b"name: s\xff\ngrid: {lr: [0.1]}\n"), "s.yaml", "not UTF-8"),
    Case(
        "sweep-bad-point",
        with_sweep("name: s\ngrid: {lr: [0.1, 0.2]}\nset: {dataset: no.jsonl}\n"),
        "no.jsonl",
        "file not found",
    ),
    # --- reward=module:function --------------------------------------------------------------------
    Case(
        "reward-no-module",
        run("reward=no_such_module_xyz:score"),
        "no_such_module_xyz",
        "cannot import module",
    ),
    Case("reward-no-function", run("reward=json:no_such_fn"), "'no_such_fn'", "no callable"),
    Case("reward-empty-module", run("reward=:score"), "reward=':score'", "module:function"),
    Case(
        "reward-syntax-error",
        reward_module("def score(p, a)\n    return 0\n"),
        "fuzz_reward",
        "SyntaxError",
    ),
    Case(
        "reward-raises-on-import",
        reward_module("raise RuntimeError('no licence')\n"),
        "fuzz_reward",
        "RuntimeError: no licence",
    ),
]


# One or more of each input kind and every case a fix was made for: by default in this process
# (`test_bad_input_is_refused_by_the_entry_point_in_process`); every case as a process of its own
# in the slow tests (`make test-slow`).
DEFAULT = {
    "cli-model-dir", "cli-model-hub-id", "cli-model-gguf", "cli-prompt-file", "cli-verifier-name",
    "cli-dataset", "cli-device-cuda", "cli-rho",
    "yaml-not-utf8", "yaml-include-number", "kv-infinite", "kv-run-id-dots", "kv-broken-list",
    "kv-newline-in-path", "data-10mb-question", "data-nested-deep", "data-duplicate-ids",
    "prompt-no-question", "verifier-weight-text", "sweep-nothing", "sweep-bad-point",
    "reward-no-module", "reward-syntax-error",
}  # fmt: skip
# As processes by default: the case whose input is the process's environment (an empty Hugging
# Face cache; refused once torch and the rest are imported) and three refused before any import.
PROCESS = {"cli-model-hub-id", "yaml-not-utf8", "yaml-include-number", "kv-broken-list"}
PARAMS = [
    pytest.param(c, id=c.id, marks=() if c.id in PROCESS else pytest.mark.slow) for c in CASES
]
IN_PROCESS = [pytest.param(c, id=c.id) for c in CASES if c.id in DEFAULT - {"cli-model-hub-id"}]


@dataclass
class Outcome:
    done: subprocess.CompletedProcess
    directory: Path  # the case's files and its output_dir (out/)
    ray_started: bool  # whether Ray made its session directory


def case_args(case: Case, directory: Path) -> list[str]:
    """The command line of `case` (its files written under `directory`)."""
    command, *rest = case.build(directory)
    common = [f"output_dir={directory / 'out'}"]  # the case's own values come after, and win
    if command == "run":
        common += ["limit=1", "method=cot"]
    return [command, *common, *rest] if command == "run" else [command, *rest, *common]


def run_case(case: Case, directory: Path) -> Outcome:
    args = case_args(case, directory)
    ray_parent = Path(tempfile.mkdtemp(prefix="lsk-", dir="/tmp"))  # Ray's sockets: short paths
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(directory / "mods")]),
        "RAY_TMPDIR": str(ray_parent / "ray"),
        "HF_HOME": str(directory / "hf"),
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "jobs.cli", *args],
            cwd=directory, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        return Outcome(done, directory, (ray_parent / "ray").exists())
    finally:
        shutil.rmtree(ray_parent, ignore_errors=True)


@pytest.fixture(scope="module")
def launched(request, tmp_path_factory) -> dict[str, Future]:
    """Every selected case of this module, started a few at a time."""
    wanted = [
        item.callspec.params["case"]
        for item in request.session.items
        if item.module is request.module and "case" in getattr(item, "callspec", {}).params
    ]
    pool = ThreadPoolExecutor(max_workers=min(3, os.cpu_count() or 1))
    futures = {c.id: pool.submit(run_case, c, tmp_path_factory.mktemp(c.id)) for c in wanted}
    yield futures
    pool.shutdown(cancel_futures=True)


def assert_refused(case: Case, code: int, stderr: str, directory: Path) -> None:
    """Exit status 2, one line on stderr naming the input, no traceback, nothing written."""
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr[-3000:]
    line = lines[0]
    assert line.startswith(("config error: ", "error: ")), line
    assert len(line) < 2000, f"a {len(line)}-character line"
    assert case.names in line and case.says in line, line
    out = directory / "out"
    assert not list(out.rglob("problems")), "a record was written"
    assert not list(out.rglob("config.yaml")), "a run was opened"


@pytest.mark.parametrize("case", PARAMS)
def test_bad_input_ends_in_one_line_before_anything_starts(case: Case, launched):
    outcome = launched[case.id].result(timeout=900)
    assert_refused(case, outcome.done.returncode, outcome.done.stderr, outcome.directory)
    assert not outcome.ray_started, "Ray was started"


class RayStarted(Exception):
    """The entry point got as far as starting Ray: the input was not refused."""


@pytest.mark.parametrize("case", IN_PROCESS)
def test_bad_input_is_refused_by_the_entry_point_in_process(
    case: Case, tmp_path, monkeypatch, capsys
):
    import ray

    import jobs.run
    from jobs.cli import main

    def refuse(*args, **kwargs):
        raise RayStarted

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(jobs.run, "start_ray", refuse)  # also while another test's Ray runs
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(key)
    for key, value in [("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1")]:  # fmt: skip
        monkeypatch.setenv(key, os.environ.get(key, value))  # main's defaults, undone after
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.delitem(sys.modules, "fuzz_reward", raising=False)  # another case's module
    args = case_args(case, tmp_path)
    capsys.readouterr()
    code = main(args)
    sys.modules.pop("fuzz_reward", None)
    assert_refused(case, code, capsys.readouterr().err, tmp_path)
