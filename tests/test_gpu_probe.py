"""`latentseek gpu-probe` (jobs/gpu_probe.py) on the CPU: the tiny shape end to end in a process
where Ray, MLflow, gguf, math-verify and vLLM cannot be imported (a bare GPU node has none of
them), and the memory plan of a 7B shape printed without building it."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from jobs.cli import main as cli_main
from jobs.gpu_probe import main as probe_main

ROOT = Path(__file__).resolve().parent.parent
ABSENT = ("ray", "mlflow", "gguf", "math_verify", "vllm")  # not installed on a bare GPU node
NOT_OURS = (*ABSENT, "tqdm")  # tqdm comes with transformers, but our probe must not need it

# Installed first in the child (a sitecustomize on its path): an absent module cannot be imported
# and `importlib.util.find_spec` finds none (as where it is not installed: accelerate asks), and
# at exit the child lists the project's modules it loaded (not the packages of a venv that
# lies inside the checkout, as `make setup`'s .venv does).
BLOCKER = """
import atexit, json, os, sys
for name in {absent!r}:
    sys.modules[name] = None
def _loaded():
    root = {root!r}
    files = sorted({{getattr(m, "__file__", None) or "" for m in list(sys.modules.values())}})
    with open(os.environ["PROBE_LOADED"], "w") as fh:
        ours = tuple(os.path.join(root, d) + os.sep for d in ("pipeline", "jobs", "analysis"))
        json.dump([f for f in files if f.startswith(ours) and f.endswith(".py")], fh)
atexit.register(_loaded)
"""


def _imports(path: str) -> set[str]:
    """Top-level names of every import in a file, lazy ones (inside functions) included."""
    names = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_tiny_probe_runs_on_cpu_without_ray_mlflow_gguf_math_verify_or_vllm(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.format(absent=ABSENT, root=str(ROOT)))
    out, loaded = tmp_path / "probe.json", tmp_path / "loaded.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
           "PROBE_LOADED": str(loaded), "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.gpu_probe", "--shape", "tiny", "--device", "cpu",
         "--batches", "1,3", "--new-tokens", "6", "--prompt-tokens", "5",
         "--invariant-rows", "3", "--update-length", "20", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Nothing the probe loaded from this project imports a module a bare node lacks, not even
    # in a function that only a GPU run would call.
    files = json.loads(loaded.read_text())
    assert any(f.endswith("jobs/gpu_probe.py") for f in files)
    assert any(f.endswith("pipeline/method/latent.py") for f in files)
    offending = {f: sorted(_imports(f) & set(NOT_OURS)) for f in files}
    assert {f: m for f, m in offending.items() if m} == {}

    report = json.loads(out.read_text())
    assert report["machine"]["torch"] and report["machine"]["transformers"]
    tiny = report["shapes"]["tiny"]
    assert tiny["parameters"] == 139840
    assert tiny["plan"]["lines"][0].startswith("memory plan: tiny")
    rows = tiny["decode"]["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    assert all(r["native_tokens_per_s"] > 0 and r["hf_generate_tokens_per_s"] > 0 for r in rows)
    inv = tiny["invariants"]
    assert inv["argmax_head_z_equals_token_rate"] == 1.0  # float32: z is the tokens' own
    assert inv["prefill_z_argmax_equals_token_rate"] == 1.0
    assert inv["captured_vs_prefill_z_relative_diff_max"] < 1e-4
    assert inv["batch_vs_alone_rows_diverged"] == 0
    assert tiny["busy"] == {"skipped": "no CUDA device"}
    assert set(tiny["batching_peak"]) >= {"static", "continuous"}
    step = tiny["latent_step"]
    assert step["finite"] and step["update_length"] == 20 and step["vocab"] == 512
    assert any("vLLM" in line for line in report["cannot_answer"])
    assert any("trained-model" in line for line in report["cannot_answer"])


def test_plan_only_prints_both_backends_without_building_a_model(capsys, monkeypatch):
    import jobs.gpu_probe as probe

    def no_build(*args, **kwargs):
        raise AssertionError("--plan-only built a model")

    monkeypatch.setattr(probe, "build", no_build)
    assert probe_main(["--shape", "qwen2.5-7b", "--plan-only", "--device-memory-gib", "79.2"]) == 0
    out = capsys.readouterr().out
    assert out.count("memory plan: qwen2.5-7b (7.62B parameters), bfloat16") == 2
    assert "backend=native" in out and "backend=vllm" in out and "vLLM: KV pool" in out
    assert "of 79.2 GiB" in out and "DOES NOT FIT" not in out
    # the same through the command line, with a run's key=value overrides
    assert cli_main(["gpu-probe", "--shape", "qwen2.5-14b", "--plan-only", "batch_size=64"]) == 0
    out = capsys.readouterr().out
    assert "batch_size=64" in out and "DOES NOT FIT" in out  # vLLM's second copy of 14B
