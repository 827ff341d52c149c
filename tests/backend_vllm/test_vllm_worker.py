"""backend=vllm in a worker across a sweep (`make test-vllm`): one engine per process, reused
for the next point. Its own module, run after the others: closing an engine tears down the
process's vLLM parallel groups, which the session's engine (tests/backend_vllm/conftest.py) also uses."""

from __future__ import annotations

import pytest

from pipeline.config import Config
from pipeline.data import load_dataset

pytestmark = pytest.mark.vllm

SMALL = dict(
    max_new_tokens=24,
    verifier_max_new_tokens=8,
    max_iters=2,
    rho=0.2,
    lr=0.05,
    n_samples=2,
    limit=3,
)  # fmt: skip (as in test_vllm_pipeline.py)


def _problems():
    return load_dataset(Config(dataset="gsm8k", limit=1)).problems


def test_a_two_point_sweep_reuses_one_engine(local_ray, vllm_cfg, monkeypatch):
    # What a worker does for a sweep: its first point in the constructor, the next one sent
    # with the batch (`settings`): one engine in the process, kept for the second point.
    from pipeline.engine.backends.vllm import VllmBackend
    from pipeline.run.workers import EvalWorker

    starts = []
    start = VllmBackend._start_engine

    def counted(self):
        starts.append(self)
        return start(self)

    monkeypatch.setattr(VllmBackend, "_start_engine", counted)
    point = vllm_cfg.replace(backend="vllm", method=["latentseek"], reward="self", **SMALL)
    points = [point.replace(lr=0.05), point.replace(lr=0.1)]
    worker = EvalWorker(points[0])
    assert worker.start_error == ""
    try:
        for cfg in points:
            _, outcomes = worker.run("latentseek", _problems()[:1], settings=cfg)
            assert outcomes[0].error == "" and outcomes[0].capture_mismatch == 0
            assert worker.solver.cfg.lr == cfg.lr
        assert len(starts) == 1 and worker.solver.backend is starts[0]
        # a point with other engine arguments gets a new engine, the old one closed first
        other = points[1].replace(vllm_engine_args={"max_model_len": 4096})  # ours: 2048
        assert not worker.solver.backend.serves(other)
    finally:
        worker.solver.close()
    assert starts[0].engine is None
