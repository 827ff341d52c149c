"""`backend=native`: this project's engine (`pipeline.engine.generation`), driven by the batching of
`pipeline.engine.batching`. Token for token the official code under `compat=reference`; prompt caches
reused by continuations; static and continuous batching."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pipeline.engine.backends.base import Capabilities, GenerationRequest, GenerationResult, Task
from pipeline.engine.batching import run_continuous, run_static
from pipeline.engine.generation import Generator


class NativeBackend:
    name = "native"
    capabilities = Capabilities(
        exact_reference=True, prompt_state=True, static_batching=True, shards=True
    )

    def __init__(self, loaded: Any, cfg: Any = None) -> None:
        self.generator = Generator(loaded.model, loaded.tokenizer)
        self.tokenizer = loaded.tokenizer
        self.eos_ids = self.generator.eos_ids
        self.max_positions = self.generator.max_positions
        self.device = self.generator.device
        self.stats = self.generator.stats

    def run(self, tasks: Sequence[Task], max_rows: int, batching: str = "continuous") -> None:
        if batching == "static":
            run_static(self.generator, tasks)
        else:
            run_continuous(self.generator, tasks, max_rows)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return self.generator.generate(requests)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.generator.logits(hidden)


BACKEND = NativeBackend
