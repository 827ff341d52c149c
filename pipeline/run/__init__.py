"""The cluster job: Ray workers and the driver's scheduler, the worker pool, the records
(Parquet) and the run directory, MLflow tracking, sweep plans.

May import `pipeline.method`, `pipeline.engine` and the floor (config, data, benchmarks). The only
wing that imports Ray and MLflow (MLflow in `tracking` alone).
"""
