"""The registries (`pipeline.method.methods`, `pipeline.benchmarks`, `pipeline.engine.backends`) and the
config's key roles: the one place each thing users add is declared, and the checks that keep
the rest of the code from naming it."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
from pathlib import Path

import pytest

from pipeline.benchmarks import all_benchmarks
from pipeline.config import (
    BATCHING,
    DERIVABLE,
    MODEL,
    RESULT,
    ROLES,
    RUN,
    Config,
    ConfigError,
    _check_roles,
    _f,
    keys_with,
)
from pipeline.engine.backends import all_backends
from pipeline.method.methods import all_methods, get_method, reference_method

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_METHODS = ["cot", "bon", "sc", "latentseek"]
SHIPPED_BENCHMARKS = ["gsm8k", "math500", "aime2024"]

# Tools that exist to measure or check particular methods or benchmarks by name: the bench rows
# (CoT, LatentSeek), the GPU check and the cluster simulation (GSM8K-sized work), and the naive
# LatentSeek reference loop with its command (`latentseek reference`); the chaos run's stand-in
# workers (CoT-shaped work); the paper comparison, whose budgets (N of BoN and SC, K of LatentSeek)
# are the paper's own table labels.
NAMING_TOOLS = {
    "analysis/paper.py",
    "jobs/chaos.py",
    "jobs/bench",
    "jobs/gpu_check.py",
    "jobs/simulate.py",
    "jobs/reference.py",
    "pipeline/method/reference.py",
}


def _modules(*owners: str):
    """Production modules outside `owners` and the tools above."""
    for folder in ("pipeline", "jobs", "analysis"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(owners) or any(rel.startswith(t) for t in NAMING_TOOLS):
                continue
            yield rel, ast.parse(path.read_text())


def _names_used(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """String constants equal to one of `names` where code branches or looks up on them:
    comparisons, collection literals, dict keys and subscripts."""
    found = []

    def check(node: ast.AST | None) -> None:
        if isinstance(node, ast.Constant) and node.value in names:
            found.append((node.lineno, node.value))

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                check(side)
        elif isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            for element in node.elts:
                check(element)
        elif isinstance(node, ast.Dict):
            for key in node.keys:
                check(key)
        elif isinstance(node, ast.Subscript):
            check(node.slice)
    return found


def test_no_module_outside_the_methods_names_a_method():
    names = set(all_methods())
    offenders = [
        f"{rel}:{line} {name!r}"
        for rel, tree in _modules("pipeline/method/methods/")
        for line, name in _names_used(tree, names)
    ]
    assert not offenders, "ask pipeline.method.methods instead: " + ", ".join(offenders)


def test_no_module_outside_the_benchmarks_names_a_benchmark():
    names = set(all_benchmarks())
    offenders = [
        f"{rel}:{line} {name!r}"
        for rel, tree in _modules("pipeline/benchmarks/")
        for line, name in _names_used(tree, names)
    ]
    assert not offenders, "ask pipeline.benchmarks instead: " + ", ".join(offenders)


def test_the_name_check_finds_a_switch_on_a_method():
    tree = ast.parse('if method == "cot":\n    pass\nx = {"latentseek": 1}\ny = ("bon", 2)\n')
    assert _names_used(tree, {"cot", "latentseek", "bon"}) == [
        (1, "cot"),
        (3, "latentseek"),
        (4, "bon"),
    ]


def _declaring(package: str, name: str) -> list[str]:
    """The modules of `package` (a folder) that assign `name` at top level."""
    found = []
    for path in sorted((ROOT / package).glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == name for t in node.targets
            ):
                found.append(path.stem)
    return found


def test_the_registries_find_every_module():
    # The shipped ones, in table order; a module added beside them is found too.
    methods, benchmarks = list(all_methods()), list(all_benchmarks())
    assert [m for m in methods if m in SHIPPED_METHODS] == SHIPPED_METHODS
    assert [b for b in benchmarks if b in SHIPPED_BENCHMARKS] == SHIPPED_BENCHMARKS
    assert list(all_backends())[0] == "native"
    assert len(methods) == len(_declaring("pipeline/method/methods", "METHOD"))
    assert len(benchmarks) == len(_declaring("pipeline/benchmarks", "BENCHMARK"))
    assert len(all_backends()) == len(_declaring("pipeline/engine/backends", "BACKEND"))
    assert reference_method().name == "cot"
    assert Config().method == [m.name for m in all_methods().values() if m.default]
    with pytest.raises(ValueError, match="unknown method 'nope'; allowed: cot, bon"):
        get_method("nope")


def test_every_method_declares_what_it_derives_consistently():
    for m in all_methods().values():
        if m.derive is not None:
            assert m.derive.key in keys_with(DERIVABLE), m.name
            assert m.derive.key in m.settings, m.name  # it depends on what it derives
            assert (m.derive.kind == "samples") == m.samples, m.name
            assert (m.derive.kind == "samples") == (m.derive.pick is not None), m.name
        for key in m.settings:
            assert key in {f.name for f in dataclasses.fields(Config)}, (m.name, key)


def test_every_config_key_declares_its_roles():
    for f in dataclasses.fields(Config):
        roles = f.metadata["roles"]
        assert roles and set(roles) <= set(ROLES), f.name
    # what the roles replaced: the keys resume may change, and the keys that decide the workers
    assert set(keys_with(RUN)) | set(keys_with(MODEL)) - set(keys_with(RESULT)) == {
        "device", "dtype", "allow_download", "model_cache_dir", "threads", "workers",
        "cpus_per_worker", "gpus_per_worker", "ray_address", "max_worker_restarts",
        "max_retries", "batch_timeout_s", "output_dir", "run_id", "mlflow_tracking_uri",
        "mlflow_experiment", "paper_model", "retry_errors", "device_memory_gib",
        "allow_code_change", "vllm_engine_args",
    }  # fmt: skip
    assert keys_with(DERIVABLE) == ("max_iters", "n_samples")
    assert keys_with(BATCHING) == ("batch_size", "batching", "task_size")
    assert "backend" in keys_with(MODEL) and "backend" in keys_with(RESULT)


def test_a_key_without_a_role_fails_at_import():
    @dataclasses.dataclass
    class Bad:
        ok: int = _f(1, "has one", roles=(RUN,))
        new: int = dataclasses.field(default=0, metadata={"help": "forgot its roles"})

    with pytest.raises(TypeError, match="Config.new: declare its roles"):
        _check_roles(Bad)


def test_backend_is_checked_against_the_registry_and_its_capabilities():
    with pytest.raises(ConfigError, match="backend='nope': allowed: native"):
        Config(backend="nope")


def test_backend_vllm_is_refused_where_it_cannot_serve():
    with pytest.raises(ConfigError, match="compat=reference promises the official code's tokens"):
        Config(backend="vllm", compat="reference")
    with pytest.raises(ConfigError, match="one whole model per worker"):
        Config(backend="vllm", tensor_parallel=2)
    with pytest.raises(ConfigError, match="one whole model per worker"):
        Config(backend="vllm", device_map="auto")


def test_backend_vllm_without_vllm_stops_before_ray_with_the_install_command(tmp_path):
    # make test's venv has no vLLM (.venv-vllm has): the run stops in preflight, one line.
    import subprocess
    import sys

    if importlib.util.find_spec("vllm") is not None and importlib.util.find_spec("vllm").origin:
        pytest.skip("vLLM is installed in this environment: nothing to refuse")
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "run", "backend=vllm", "limit=1",
         f"output_dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: backend=vllm needs vLLM") and len(lines) == 1
    assert "make setup-vllm" in lines[-1] and "pip install -e '.[vllm]'" in lines[-1]
    assert not (tmp_path / "mlflow.db").exists() and not list(tmp_path.rglob("*.parquet"))
