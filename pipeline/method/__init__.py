"""What is computed per problem: the solver, one file per method (`methods/`), the latent step
(pure torch), rewards, prompts, grading, `compat=reference`, results, the naive reference loop.

May import `pipeline.engine` and the floor (config, data, benchmarks); never `pipeline.run`,
Ray or MLflow.
"""
