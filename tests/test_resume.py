"""Resume compares what the inputs hold, not their names, and retries failed rows.

A run's first invocation records what its inputs held (inputs.yaml); a resume whose data,
prompt, verifier or reward file, or model, holds something else under the same name is refused
before anything starts, naming the input and what changed. Rows recorded with an error are run
again (`retry_errors`). No Ray: `ray.init` is replaced by a refusal, so a test sees whether the
driver wanted workers, and where it stopped.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

import pytest
import ray

from jobs.preflight import input_digests
from jobs.run import RunError, run_evaluation
from pipeline.config import CONFIG_DIR, PROJECT_ROOT, Config
from pipeline.data import load_dataset
from pipeline.engine import model as model_mod
from pipeline.method.results import ProblemResult
from pipeline.run.records import RecordStore
from pipeline.run.rundir import INPUTS_FILE, read_inputs, write_config, write_inputs


class RayStarted(Exception):
    """The driver got as far as starting Ray (it had work to do)."""


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise RayStarted

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr("jobs.run.start_ray", refuse)  # also when another test's Ray runs
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def inputs(tmp_path, monkeypatch) -> dict[str, Path]:
    """A data file of one problem, a solver and a verifier template, and a reward module."""
    files = tmp_path / "inputs"
    files.mkdir()
    data = files / "d.jsonl"
    data.write_text('{"question": "What is 1+1?", "answer": "2"}\n')
    shutil.copy(CONFIG_DIR / "prompts" / "boxed.yaml", files / "p.yaml")
    shutil.copy(CONFIG_DIR / "prompts" / "verifiers-short.yaml", files / "v.yaml")
    module = f"reward_{uuid.uuid4().hex[:8]}"  # a fresh name: not in sys.modules yet
    (files / f"{module}.py").write_text("def score(problem, answer):\n    return 0.0\n")
    monkeypatch.syspath_prepend(str(files))
    return {
        "dataset": data,
        "prompt": files / "p.yaml",
        "verifier_prompts": files / "v.yaml",
        "reward": files / f"{module}.py",
    }


def make_cfg(tmp_path: Path, inputs: dict[str, Path], **kw) -> Config:
    values = dict(
        dataset=str(inputs["dataset"]), prompt=str(inputs["prompt"]),
        verifier_prompts=str(inputs["verifier_prompts"]), method=["cot"], reward="psrm",
        output_dir=str(tmp_path / "out"), run_id="r1",
    )  # fmt: skip
    values.update(kw)
    return Config(**values)


def record(cfg: Config, error: str = "") -> None:
    """The run's one problem, recorded (as a first invocation that ran it left it)."""
    row = ProblemResult("d-0", "d", "cot", "What is 1+1?", "2", final_answer="2", error=error)
    RecordStore(Path(cfg.output_dir) / cfg.run_id).write([row], cfg.run_id, "m", "w0")


def quiet(msg: str) -> None:
    pass


EDITS = {  # (config key, how the file is edited under the same name)
    "dataset": lambda p: p.write_text('{"question": "What is 2+2?", "answer": "2"}\n'),
    "prompt": lambda p: p.write_text(p.read_text().replace("step by step", "carefully")),
    "verifier_prompts": lambda p: p.write_text(p.read_text().replace("weight: 1", "weight: 3")),
    "reward": lambda p: p.write_text("def score(problem, answer):\n    return -1.0\n"),
}


@pytest.mark.parametrize("key", list(EDITS))
def test_an_input_edited_under_the_same_name_is_not_resumed(tmp_path, inputs, key):
    reward = {"verifier_prompts": "self", "reward": f"{inputs['reward'].stem}:score"}
    cfg = make_cfg(tmp_path, inputs, reward=reward.get(key, "psrm"))
    record(cfg)
    run_evaluation(cfg, progress=False, log=quiet)  # all recorded: finishes without workers
    saved = read_inputs(tmp_path / "out" / "r1")
    assert saved[key]["source"] == str(inputs[key].resolve())

    original = inputs[key].read_text()
    EDITS[key](inputs[key])
    with pytest.raises(RunError) as err:
        run_evaluation(cfg, progress=False, log=quiet)
    message = str(err.value)
    where = re.escape(f"{key} {inputs[key].resolve()}: sha256 ")
    assert re.search(where + r"[0-9a-f]{12}… -> [0-9a-f]{12}…", message), message
    assert "inputs changed" in message and INPUTS_FILE in message and "run_id=<new>" in message

    inputs[key].write_text(original)  # the same content again: the same run
    assert run_evaluation(cfg, progress=False, log=quiet).skipped == 1
    assert read_inputs(tmp_path / "out" / "r1") == saved  # the first invocation's, kept


@pytest.fixture
def model_dir(tmp_path, monkeypatch) -> Path:
    """A model directory as `check_model_source` wants it (its weight digests cached beside)."""
    monkeypatch.setattr(model_mod, "DIGEST_CACHE", str(tmp_path / "digests.json"))
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (d / "model.safetensors").write_bytes(b"w" * 2000)
    (d / "README.md").write_text("notes")  # not an input of the results
    return d


def test_a_model_directory_that_changed_is_not_resumed(tmp_path, inputs, model_dir):
    cfg = make_cfg(tmp_path, inputs, model=str(model_dir))
    directory = tmp_path / "out" / "r1"
    # What the first invocation of this run wrote before its workers ran it
    write_config(cfg, directory)
    write_inputs(directory, input_digests(cfg, load_dataset(cfg)))
    digest = read_inputs(directory)["model"]
    assert digest["source"] == str(model_dir.resolve())
    assert digest["config.json"].startswith("sha256 ") and "README.md" not in digest
    assert re.fullmatch(r"sha256 [0-9a-f]{64}", digest["model.safetensors"])

    (model_dir / "README.md").write_text("other notes")
    with pytest.raises(RayStarted):  # nothing that matters changed: the resume goes ahead
        run_evaluation(cfg, progress=False, log=quiet)

    def refused(what: str) -> None:
        where = re.escape(f"model {model_dir.resolve()}: ")
        with pytest.raises(RunError, match=where + what):
            run_evaluation(cfg, progress=False, log=quiet)

    weights = model_dir / "model.safetensors"
    st = weights.stat()
    weights.write_bytes(b"v" * 2001)  # other weights
    refused(r"model.safetensors sha256 [0-9a-f]{12}… -> sha256 [0-9a-f]{12}…")
    # other weights of the same size and time, copied over it (once not seen: size and time
    # were all that was compared)
    copy = model_dir / ".copy"
    copy.write_bytes(b"v" * 2000)
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(copy, weights)
    refused(r"model.safetensors sha256 [0-9a-f]{12}… -> sha256 [0-9a-f]{12}…")
    weights.write_bytes(b"w" * 2000)  # the first weights again
    (model_dir / "tokenizer_config.json").write_text("{}")  # another chat template
    refused(r"tokenizer_config.json sha256 [0-9a-f]{12}… -> sha256 [0-9a-f]{12}…")


@pytest.mark.slow
def test_rows_recorded_with_an_error_are_retried_unless_turned_off(tmp_path, inputs):
    cfg = make_cfg(tmp_path, inputs)
    record(cfg, error="RuntimeError: the GPU fell off the bus")
    logged: list[str] = []
    with pytest.raises(RayStarted):  # the failed row is work to do again
        run_evaluation(cfg, progress=False, log=logged.append)
    assert "resuming r1: 0 of 1 records already there; retrying 1 recorded with an error" in logged

    kept = run_evaluation(cfg.replace(retry_errors=False), progress=False, log=quiet)
    assert kept.skipped == 1 and kept.recorded == 0 and kept.failures == 1


def test_code_and_library_versions_are_compared_unless_allowed(tmp_path, inputs, monkeypatch):
    from jobs import preflight

    cfg = make_cfg(tmp_path, inputs)
    directory = tmp_path / "out" / "r1"
    # What the first invocation of this run wrote before its workers ran it
    write_config(cfg, directory)
    write_inputs(directory, input_digests(cfg, load_dataset(cfg)))
    with pytest.raises(RayStarted):  # nothing changed: the resume goes ahead
        run_evaluation(cfg, progress=False, log=quiet)
    saved = read_inputs(directory)
    assert saved["code"]["sha256"] and saved["code"]["source"].startswith(("git ", "no git"))
    assert set(saved["packages"]) >= {"torch", "transformers"}
    assert saved["problems"]["sha256"] == load_dataset(cfg).content_digest

    real = preflight.code_digest()
    monkeypatch.setattr(preflight, "code_digest", lambda: {**real, "sha256": "0" * 64})
    with pytest.raises(RunError, match=r"code git .*: sha256 [0-9a-f]{12}… -> 000000000000…"):
        run_evaluation(cfg, progress=False, log=quiet)
    with pytest.raises(RunError, match=r"allow_code_change=true"):
        run_evaluation(cfg, progress=False, log=quiet)
    monkeypatch.setattr(
        preflight, "package_versions", lambda c: {**saved["packages"], "torch": "0.0.1"}
    )
    with pytest.raises(RunError, match=r"packages .*torch \S+ -> 0\.0\.1"):
        run_evaluation(cfg, progress=False, log=quiet)
    with pytest.raises(RayStarted):  # allowed: the resume goes ahead
        run_evaluation(cfg.replace(allow_code_change=True), progress=False, log=quiet)


def test_the_code_digest_is_the_same_from_git_and_from_an_upload(tmp_path):
    from jobs.preflight import code_digest
    from jobs.submit import upload_files

    uploaded = tmp_path / "up"
    for rel in upload_files():
        (uploaded / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / rel, uploaded / rel)
    here, there = code_digest(), code_digest(uploaded)
    assert there["source"] == "no git" and here["sha256"] == there["sha256"]
    (uploaded / "pipeline" / "data.py").write_text("# edited\n")
    assert code_digest(uploaded)["sha256"] != here["sha256"]


def test_a_hub_model_is_pinned_to_one_commit_for_every_worker(tmp_path, monkeypatch):
    """The local Hugging Face cache's commit of the id is resolved once, on the driver, and
    passed to every load: a worker restarted after the cache's `main` moved loads the same."""
    sha = "a" * 40
    hub = tmp_path / "hf" / "hub" / "models--org--tiny"
    (hub / "snapshots" / sha).mkdir(parents=True)
    (hub / "snapshots" / sha / "config.json").write_text("{}")
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    cfg = Config(model="org/tiny")
    pinned = model_mod.pin_revision(cfg)
    assert pinned.model_revision == sha
    assert model_mod.model_digest(cfg) == {"source": "org/tiny", "revision": sha}
    assert model_mod.pin_revision(Config(model="embedded")).model_revision == ""
    seen = {}

    def load(path, dtype, cfg, device, **kw):
        seen.update(kw)
        raise OSError("stop here")

    monkeypatch.setattr(model_mod, "_from_directory", load)
    with pytest.raises(model_mod.ModelError):
        model_mod.load_model(pinned)
    assert seen["revision"] == sha and seen["local_files_only"] is True
