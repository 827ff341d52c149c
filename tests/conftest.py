"""Shared fixtures: the embedded SmolLM2 (loaded once per session), a tiny random Llama with a
byte-level tokenizer stand-in (milliseconds, no downloads), and a scripted reward.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config import Config
from pipeline.data import Problem
from pipeline.engine.model import LoadedModel, load_model
from pipeline.method.rewards import Reward, RewardResult

# The test machine has 2 cores shared with other jobs: at two intra-op threads, OpenMP barrier
# stalls made the embedded-model tests ~3x slower under load (measured: 27.6 s vs 8.8 s for one
# LatentSeek problem), so tests run one thread unless LATENTSEEK_TEST_THREADS says otherwise.
torch.set_num_threads(int(os.environ.get("LATENTSEEK_TEST_THREADS", "1")))

# --- the tiny model ---------------------------------------------------------------------------

TINY_VOCAB = 128  # byte-level: ASCII characters are their own ids
TINY_PAD = 0
TINY_EOS = 3  # ASCII "end of text": never in a prompt
TINY_CONTEXT = 512


class ByteTokenizer:
    """The part of a Hugging Face tokenizer the engine uses, on bytes: id = byte % vocab."""

    def __init__(
        self,
        vocab_size: int = TINY_VOCAB,
        eos_token_id: int = TINY_EOS,
        pad_token_id: int = TINY_PAD,
    ) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    @property
    def eos_token(self) -> str:
        return chr(self.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode()]

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}

    def convert_tokens_to_ids(self, token: str) -> int | None:
        """A one-character token is its byte; nothing else is a token (None, as HF for unknowns
        without an unk token)."""
        return ord(token) % self.vocab_size if len(token) == 1 else None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        special = {self.eos_token_id, self.pad_token_id} if skip_special_tokens else set()
        return "".join(chr(int(i)) for i in ids if int(i) not in special)

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
    ) -> list[int] | str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<assistant>"
        return self.encode(text) if tokenize else text


def make_tiny_model(
    seed: int = 0, eos_token_id: int = TINY_EOS, max_positions: int = TINY_CONTEXT
) -> LlamaForCausalLM:
    """2 layers, hidden 32, GQA 4/2, tied embeddings; frozen. Same seed -> same weights."""
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=eos_token_id,
        pad_token_id=TINY_PAD,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    model.requires_grad_(False)
    return model


def tiny_loaded(model: LlamaForCausalLM | None = None, eos_token_id: int = TINY_EOS) -> LoadedModel:
    """A `LoadedModel` built by hand around the tiny model (what `Solver` takes)."""
    model = model if model is not None else make_tiny_model(eos_token_id=eos_token_id)
    return LoadedModel(
        model=model,
        tokenizer=ByteTokenizer(eos_token_id=eos_token_id),
        name="tiny-llama",
        device=torch.device("cpu"),
        dtype=torch.float32,
        num_parameters=sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        load_seconds=0.0,
        source="local",
    )


@pytest.fixture
def tiny_model() -> LlamaForCausalLM:
    return make_tiny_model()


@pytest.fixture
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


# --- a scripted reward ------------------------------------------------------------------------


class ScriptedReward(Reward):
    """The n-th call for a problem returns `script(problem)[n]` (the last value once exhausted).

    Call 0 scores the CoT answer (r0), call k the answer of iteration k.
    """

    name = "scripted"

    def __init__(self, script: Sequence[float] | Callable[[Problem], Sequence[float]]) -> None:
        self.script = script
        self.calls: dict[str, int] = defaultdict(int)
        self.seen: dict[str, list[str]] = defaultdict(list)  # answers scored, per problem

    def result(self, problem: Problem, answer: str, outputs: Sequence[Any] = ()) -> RewardResult:
        values = self.script(problem) if callable(self.script) else self.script
        n = self.calls[problem.problem_id]
        self.calls[problem.problem_id] += 1
        self.seen[problem.problem_id].append(answer)
        return RewardResult(float(values[min(n, len(values) - 1)]))


def problem(question: str = "What is 1+1?", gold: str = "2", pid: str = "p0") -> Problem:
    return Problem(problem_id=pid, dataset="toy", question=question, gold=gold)


# --- the embedded model -----------------------------------------------------------------------

EMBEDDED_CFG = dict(model="embedded", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def embedded() -> LoadedModel:
    """SmolLM2-135M-Instruct in float32 on CPU, loaded once per test session."""
    return load_model(Config(**EMBEDDED_CFG))


@pytest.fixture(scope="session")
def embedded_cfg() -> Config:
    """The fidelity setting: fp32, PSRM, rho 0.2, lr 0.03; vary it with `cfg.replace(...)`."""
    return Config(
        **EMBEDDED_CFG,
        method=["latentseek"],
        reward="psrm",
        rho=0.2,
        lr=0.03,
        max_iters=2,
        max_new_tokens=48,
    )


@pytest.fixture(scope="session")
def make_solver(embedded: LoadedModel) -> Callable[..., object]:
    """`make_solver(cfg)` -> a `Solver` on the session's embedded model (no reload)."""
    from pipeline.method.solver import Solver

    def build(cfg: Config, reward: Reward | None = None) -> Solver:
        return Solver(cfg, embedded, reward=reward)

    return build


@pytest.fixture(scope="session")
def solver(make_solver, embedded_cfg):
    return make_solver(embedded_cfg)


# --- one local Ray for the session ------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
RAY_CPUS = 3  # a replica of 3 ranks (tests/test_shards.py), or 2 workers and a spare


@pytest.fixture(scope="session")
def _ray_started() -> Iterator[list[bool]]:
    started: list[bool] = []
    yield started
    if started and ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def local_ray(_ray_started: list[bool]) -> Iterator[None]:
    """A real in-process local Ray with `RAY_CPUS` CPUs, started on first use and shared by the
    session's tests (a Ray start costs 10-20 s here). A test that needs another Ray shuts this
    one down first; the next test that asks for it starts it again. Ray's workers import test
    modules (a faulty reward, a rank's probe) from tests/ and the project root."""
    if not ray.is_initialized():
        paths = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        # address="local": a Ray of its own, never one running on the machine (nor $RAY_ADDRESS)
        ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
        _ray_started.append(True)
    yield


# --- a server on loopback -----------------------------------------------------------------------


def wait_healthy(proc, url: str, log_path, opener, timeout_s: float) -> None:
    """Poll `<url>/health` until it answers 200; fail with the server's log if the process
    exits or `timeout_s` passes (a bounded loop: the tests never wait forever)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited: {log_path.read_text()[-2000:]}")
        try:
            with opener.open(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(
                f"mlflow server not healthy in {timeout_s:.0f} s: {log_path.read_text()[-2000:]}"
            )
        time.sleep(0.5)


# --- a driver holding its run directory ---------------------------------------------------------

_HOLDER = """
import sys, time
from pipeline.run.rundir import hold_run_dir
with hold_run_dir(sys.argv[1]):
    print("held", flush=True)
    time.sleep(300)
"""


def hold_in_child(directory: Path) -> subprocess.Popen:
    """A child process holding `directory` through `hold_run_dir`, as a running driver does
    (it sleeps until the test kills it; at most 5 minutes)."""
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(directory)],
        cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "held", "the child did not take the lock"
    return proc


# --- make test in several processes (pytest-xdist, --dist loadgroup) --------------------------


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    """Tests are spread over the processes one by one, except a module's tests that share a
    module-scoped fixture (a server, a model in bf16, the engine's reference runs, the fuzz
    processes): those run in one process, so that the fixture is made once."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs.values() if info is not None else ()
        if any(d.scope == "module" for group in defs for d in group):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.hookimpl(trylast=True, specname="pytest_collection_modifyitems")
def pytest_collection_modifyitems_groups_taken(config, items) -> None:
    """In a `--dist loadgroup` process, say so when pytest-xdist did not take the groups above (it
    marks a grouped test's node id with `@group`): pytest 9.2 with pytest-xdist 3.8 ignored them
    silently (pytest-xdist#1386), and every process built every server and model of its own."""
    if not config.getoption("loadgroup", False):  # set in xdist's processes only
        return
    lost = [i for i in items if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]
    if lost:
        lost[0].warn(
            pytest.PytestWarning(
                f"--dist loadgroup ignored the xdist_group of {len(lost)} tests: this pytest and "
                "pytest-xdist do not work together (pytest-xdist#1386), so each process builds "
                "the module-scoped servers and models again; install the pytest pyproject.toml pins"
            )
        )


# --- MLflow stores --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def migrated_mlflow_db(tmp_path_factory) -> Path:
    """An empty SQLite MLflow store with MLflow's schema migrations run (2-3 s of CPU each time a
    new store runs them): copy it to start a store in the state MLflow would leave it in."""
    from mlflow.tracking import MlflowClient

    template = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
    return template


@pytest.fixture(scope="session", autouse=True)
def _migrated_mlflow_store(migrated_mlflow_db: Path) -> Iterator[None]:
    """Most runs here open a SQLite store of their own: a store the pipeline opens in this
    process that does not exist yet starts as a copy of `migrated_mlflow_db`."""
    import shutil

    from mlflow.tracking import MlflowClient

    from pipeline.run import tracking

    template = migrated_mlflow_db

    def client(tracking_uri: str | None = None, *args: Any, **kwargs: Any) -> MlflowClient:
        if tracking_uri and tracking_uri.startswith("sqlite:///"):
            db = Path(tracking_uri.removeprefix("sqlite:///"))
            if not db.exists():
                db.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(template, db)
        return MlflowClient(tracking_uri, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tracking, "MlflowClient", client)
        yield
