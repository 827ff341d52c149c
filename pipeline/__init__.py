"""LatentSeek at scale, in three wings and a floor (docs/development.md, the module map):

    run/      the cluster job: workers, scheduler, pool, records, run directory, tracking, sweeps
    method/   what is computed per problem: solver, methods, latent step, rewards, grading
    engine/   how tokens and z are made: model, native engine, backends, shards
    config.py, data.py, benchmarks/   the floor everything stands on

A wing imports only the wings below it (`tests/test_layout.py`). The floor's config names
methods and backends without importing their registries: this package wires the two registries
into `pipeline.config.register_choices` here, lazily, so importing the config imports neither.
"""

from pipeline import config as _config


def _methods() -> dict:
    from pipeline.method.methods import all_methods

    return all_methods()


def _backends() -> dict:
    from pipeline.engine.backends import all_backends

    return all_backends()


_config.register_choices("method", _methods)
_config.register_choices("backend", _backends)
