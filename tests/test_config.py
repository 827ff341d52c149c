"""`pipeline.config`: defaults, YAML with include:, key=value overrides, validation messages that
name the key, and a saved config that loads back equal."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest
import yaml

from pipeline.config import CONFIG_DIR, Config, ConfigError, describe_keys, load_config


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_are_valid_and_match_the_reference():
    cfg = Config()
    cfg.validate()
    assert load_config() == cfg
    # SPEC.md §1: the reference code's defaults.
    assert (cfg.lr, cfg.rho, cfg.max_iters, cfg.reward_threshold) == (0.03, 0.1, 10, -0.2)
    assert (cfg.max_new_tokens, cfg.seed, cfg.max_update_length) == (1024, 42, 300)
    assert (cfg.sample_update, cfg.return_best, cfg.grad_clip) == (False, False, 0.0)
    assert cfg.model == "embedded" and cfg.allow_download is False


def test_yaml_with_include(tmp_path):
    write(tmp_path, "base.yaml", "lr: 0.05\nrho: 0.2\nmax_iters: 4\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path, "sub/psrm.yaml", "include: ../base.yaml\nreward: psrm\nmax_iters: 5\n")
    run = write(
        tmp_path,
        "run.yaml",
        """\
        include: [base.yaml, sub/psrm.yaml]
        rho: 0.3            # the including file wins
        method: cot,latentseek
        question_field:     # null for a string key means ''
        """,
    )
    cfg = load_config(run)
    assert (cfg.lr, cfg.rho, cfg.max_iters, cfg.reward) == (0.05, 0.3, 5, "psrm")
    assert cfg.method == ["cot", "latentseek"] and cfg.question_field == ""


def test_include_cycle_and_missing_files(tmp_path):
    write(tmp_path, "a.yaml", "include: b.yaml\n")
    write(tmp_path, "b.yaml", "include: a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    write(tmp_path, "c.yaml", "include: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "d.yaml", "- lr\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "e.yaml", "lr: [0.1\n"))


def test_overrides_with_types(tmp_path):
    cfg = load_config(
        write(tmp_path, "c.yaml", "lr: 0.05\nmax_iters: 4\n"),
        [
            "max_iters=7",
            "lr=1e-3",
            "grad_clip=1",  # an int string for a float key
            "return_best=true",
            "lr_relative=0",
            "method=cot,latentseek",
            "ids=[gsm8k-0, gsm8k-5]",
            "reward=mypkg.rewards:score",
            "run_id=sweep-1.a",
            "dtype=bfloat16",
            " seed = 7",
        ],
    )
    assert (cfg.max_iters, cfg.lr, cfg.grad_clip, cfg.seed) == (7, 0.001, 1.0, 7)
    assert isinstance(cfg.grad_clip, float)
    assert (cfg.return_best, cfg.lr_relative) == (True, False)
    assert cfg.method == ["cot", "latentseek"] and cfg.ids == ["gsm8k-0", "gsm8k-5"]
    assert (cfg.reward, cfg.run_id, cfg.dtype) == ("mypkg.rewards:score", "sweep-1.a", "bfloat16")
    assert load_config(overrides=["question_field="]).question_field == ""
    assert load_config(overrides=["method=latentseek"]).method == ["latentseek"]


@pytest.mark.parametrize(
    "override, match",
    [
        ("lrr=0.1", r"unknown key 'lrr'; did you mean lr"),
        ("max_iter=3", r"unknown key 'max_iter'; did you mean max_iters"),
        ("zzzzzz=1", r"unknown key 'zzzzzz'; allowed keys: model"),
        ("max_iters", r"override 'max_iters': expected key=value"),
    ],
)
def test_unknown_keys(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[override])


def test_reference_format_rule_refuses_a_json_prompt(tmp_path):
    # compat=reference's format rule is the official \\boxed{(.*)} regex: with a json-style
    # prompt (by name or by a template file's style) it would fail every JSON answer.
    json_file = write(tmp_path, "mine.yaml", "style: json\nuser: '{question}'\n")
    for prompt in ("json", str(json_file)):
        with pytest.raises(ConfigError, match=r"format_rule=True: under compat=reference"):
            Config(compat="reference", format_rule=True, prompt=prompt)
    Config(compat="reference", format_rule=True, prompt="boxed")  # the official pairing
    Config(compat="none", format_rule=True, prompt="json")  # our rule checks the JSON style
    Config(compat="reference", format_rule=False, prompt="json")


def test_unknown_key_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'learning_rate'"):
        load_config(write(tmp_path, "c.yaml", "learning_rate: 0.1\n"))


@pytest.mark.parametrize(
    "override, match",
    [
        ("max_iters=abc", r"max_iters='abc': expected int"),
        ("max_iters=2.5", r"max_iters='2.5': expected int"),
        ("lr=fast", r"lr='fast': expected float"),
        ("return_best=maybe", r"return_best='maybe': expected bool"),
        ("dtype=float64", r"dtype='float64': expected one of 'auto', 'float32'"),
    ],
)
def test_wrong_types_in_overrides(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[override])


@pytest.mark.parametrize(
    "yaml_text, match",
    [
        ("max_iters: 2.5\n", r"max_iters=2.5: expected int"),
        ("max_iters: true\n", r"max_iters=True: expected int"),  # a bool is not an int
        ("lr: fast\n", r"lr='fast': expected float"),
        ("return_best: 1\n", r"return_best=1: expected bool"),
        ("method: [cot, 3]\n", r"method=\['cot', 3\]: expected a list of str"),
        ("model: 3\n", r"model=3: expected str"),
    ],
)
def test_wrong_types_in_yaml(tmp_path, yaml_text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, "c.yaml", yaml_text))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"lr": 0.0}, r"lr=0.0: must be > 0"),
        ({"lr": -0.1}, r"lr=-0.1: must be > 0"),
        ({"rho": 1.5}, r"rho=1.5: must be in \[0, 1\]"),
        ({"rho": -0.1}, r"rho=-0.1"),
        (
            {"method": ["beam"]},
            r"method=\['beam'\]: allowed: cot, bon, sc, reflect, latentseek, se",
        ),
        ({"method": []}, r"method=\[\]"),
        ({"method": ["cot", "cot"]}, r"method=.*each method at most once"),
        ({"reward": "bad"}, r"reward='bad': allowed: 'self', 'psrm', or 'module:function'"),
        ({"max_iters": -1}, r"max_iters=-1"),
        ({"max_update_length": -1}, r"max_update_length=-1"),
        ({"grad_clip": -1.0}, r"grad_clip=-1.0"),
        ({"max_new_tokens": 0}, r"max_new_tokens=0: must be >= 1"),
        ({"temperature": 0.0}, r"temperature=0.0"),
        ({"top_p": 0.0}, r"top_p=0.0"),
        ({"top_p": 1.5}, r"top_p=1.5"),
        ({"batch_size": 0}, r"batch_size=0"),
        ({"n_samples": 0}, r"n_samples=0"),
        ({"device": "tpu"}, r"device='tpu': allowed: auto, cpu, cuda, cuda:N"),
        ({"run_id": "a/b"}, r"run_id='a/b'"),
        ({"run_id": ".."}, r"run_id='..': must not start with '.'"),
        ({"lr": float("inf")}, r"lr=inf: must be a finite number"),
        ({"reward_threshold": float("nan")}, r"reward_threshold=nan: must be a finite number"),
        ({"gpus_per_worker": float("inf")}, r"gpus_per_worker=inf: must be a finite number"),
    ],
)
def test_out_of_range_values_name_the_key(change, match):
    with pytest.raises(ConfigError, match=match):
        Config(**change)
    key, value = next(iter(change.items()))
    override = f"{key}={','.join(value) if isinstance(value, list) else value}"
    if value != []:  # the same through load_config and through replace()
        with pytest.raises(ConfigError, match=key):
            load_config(overrides=[override])
    with pytest.raises(ConfigError, match=key):
        Config().replace(**change)


def test_edge_values_are_allowed():
    cfg = Config(rho=0.0, max_iters=0, max_update_length=0, top_p=1.0, device="cuda:1")
    assert (cfg.rho, cfg.max_iters) == (0.0, 0)
    assert Config(rho=1.0).rho == 1.0


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(
        overrides=[
            "method=cot,latentseek,bon",
            "lr=0.007",
            "rho=0.25",
            "ids=[gsm8k-1, gsm8k-2]",
            "reward=psrm",
            "return_best=true",
            "run_id=r1",
            "question_field=",
        ]
    )
    path = tmp_path / "config.yaml"
    cfg.save(path)
    again = load_config(path)
    assert again == cfg
    assert dataclasses.asdict(again) == cfg.to_dict()
    Config().save(path)
    assert load_config(path) == Config()


def test_describe_keys_lists_every_key():
    text = describe_keys()
    for f in dataclasses.fields(Config):
        assert f.name in text and f.metadata["help"] in text


SHIPPED = sorted(p for p in CONFIG_DIR.glob("*.yaml"))


def _written(path) -> dict:
    """What a config file says, its includes first (read here with PyYAML, not the loader)."""
    data = yaml.safe_load(path.read_text())
    includes = data.pop("include", [])
    merged: dict = {}
    for name in [includes] if isinstance(includes, str) else includes:
        merged.update(_written(path.parent / name))
    return {**merged, **data}


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_load(path):
    # Every key the file (or what it includes) sets has that value, every other key its default.
    written = _written(path)
    assert written, f"{path.name} sets nothing"
    assert load_config(path).to_dict() == {**Config().to_dict(), **written}
