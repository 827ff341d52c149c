"""How tokens and z are made: model loading, the native engine (`generation`, `batching`), one
file per backend (`backends/`: native, vLLM), tensor-parallel shards.

May import the floor (config, data, benchmarks) only; never `pipeline.method` or `pipeline.run`.
"""
