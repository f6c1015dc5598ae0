"""Run configs: every shipped file validates; bad input names the file, the key and the value."""

import copy
from pathlib import Path

import pytest
import yaml

from pipeline.config import RunConfig, config_to_raw, load_config, parse_config
from pipeline.errors import ConfigError
from pipeline.models import IGPTConfig, ViTConfig

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_there_are_configs_for_every_paper_size():
    names = {load_config(p).model.name for p in CONFIGS}
    assert {"vit-b16", "vit-l16", "vit-h14", "igpt-s", "igpt-m", "igpt-l", "igpt-xl"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates_and_says_how_to_run_it(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    for tag in ("Run:", "Hardware:", "Time:", "Result:"):
        assert tag in text, f"{path.name} header lacks {tag}"
    assert "tessera" in text


def test_model_section_names_a_size_and_overrides_fields(tmp_path):
    cfg = load_config(write(tmp_path, "model: {name: vit-tiny-p4, image_size: 28, channels: 1}\n"))
    assert isinstance(cfg.model, ViTConfig)
    assert (cfg.model.width, cfg.model.image_size, cfg.model.channels) == (192, 28, 1)


def test_set_overrides_any_field_with_yaml_values(tmp_path):
    path = write(tmp_path, "model: {name: igpt-micro}\ntrain: {objective: igpt-ar}\n")
    cfg = load_config(
        path, ["optim.lr=3e-4", "optim.betas=[0.9, 0.95]", "model.depth=3", "eval.layers=[0, -1]"]
    )
    assert cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.9, 0.95)
    assert isinstance(cfg.model, IGPTConfig) and cfg.model.depth == 3
    assert cfg.eval.layers == [0, -1]
    hybrid = load_config(write(tmp_path, "model: {name: vit-tiny-p7}\n"), ["model.stem=[16, 32]"])
    assert hybrid.model.stem == (16, 32)


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        # unknown key, with a suggestion and the allowed keys
        (
            "model: {name: vit-b16}\noptim: {weight_dacay: 1}\n",
            [],
            r"run\.yaml: optim\.weight_dacay: unknown key \(did you mean 'weight_decay'\?\); allowed keys: name, lr, ",
        ),
        (
            "model: {name: vit-b16}\ntrian: {}\n",
            [],
            r"run\.yaml: trian: unknown key \(did you mean 'train'\?\)",
        ),
        (
            "model: {name: vit-b16, widht: 3}\n",
            [],
            r"model\.widht: unknown key \(did you mean 'width'\?\)",
        ),
        # wrong types
        (
            "model: {name: vit-b16}\noptim: {lr: fast}\n",
            [],
            r"optim\.lr: got 'fast' \(str\); expected a number",
        ),
        (
            "model: {name: vit-b16}\ntrain: {steps: 1.5}\n",
            [],
            r"train\.steps: got 1\.5 \(float\); expected an integer",
        ),
        (
            "model: {name: vit-b16}\nlogging: {tensorboard: 'yes'}\n",
            [],
            r"logging\.tensorboard: got 'yes' \(str\); expected true or false",
        ),
        (
            "model: {name: vit-b16}\neval: {evaluators: [probe]}\n",
            [],
            r"eval\.evaluators\[0\]: got 'probe' \(str\); expected one of 'linear_probe'",
        ),
        # impossible values
        (
            "model: {name: vit-b16, image_size: 100}\n",
            [],
            r"run\.yaml: model\.image_size: got 100; must be a multiple of patch_size=16",
        ),
        ("model: {name: vit-s16, heads: 5}\n", [], r"model\.heads: got 5; must divide width=384"),
        (
            "model: {name: vit-tiny-p7, stem: [32, 64], patch_size: 2}\n",
            [],
            r"model\.patch_size: got 2; must divide the stem's 7x7 feature map \(image_size 28",
        ),
        (
            "model: {name: vit-tiny-p7, stem: [32, 'wide']}\n",
            [],
            r"model\.stem\[1\]: got 'wide' \(str\); expected an integer",
        ),
        (
            "model: {name: vit-b16, head_bias: -2}\ntrain: {objective: supervised-sigmoid}\n",
            [],
            r"model\.head_bias: got -2(\.0)?; is ignored by supervised-sigmoid, .* train\.head_bias=-10",
        ),
        (
            "model: {name: vit-b16}\ndeepspeed: {zero_stage: 4}\n",
            [],
            r"deepspeed\.zero_stage: got 4; allowed: 0, 1, 2, 3",
        ),
        (
            "model: {name: vit-b16}\ndeepspeed: {offload_params: true}\n",
            [],
            r"deepspeed\.offload_params: got True; needs zero_stage 3",
        ),
        (
            "model: {name: vit-b16}\ntrain: {steps: 10}\noptim: {warmup_steps: 10}\n",
            [],
            r"optim\.warmup_steps: got 10; must be below train\.steps=10",
        ),
        # cross-section rules
        (
            "model: {name: vit-b16}\ntrain: {objective: igpt-ar}\n",
            [],
            r"train\.objective: got 'igpt-ar'; needs an igpt model",
        ),
        (
            "model: {name: igpt-micro, causal: true}\ntrain: {objective: igpt-bert}\n",
            [],
            r"model\.causal: got True; must be False for igpt-bert",
        ),
        (
            "model: {name: igpt-micro}\n",
            [],
            r"model\.num_classes: got 0; must be > 0 for the supervised objective",
        ),
        # unknown model, missing model
        (
            "model: {name: vit-b61}\n",
            [],
            r"model\.name: unknown model 'vit-b61' \(did you mean vit-b16",
        ),
        ("train: {steps: 3}\n", [], r"run\.yaml: model: is required"),
        # errors that come from --set name the option, not the file
        (
            "model: {name: vit-b16}\n",
            ["model.heads=7"],
            r"--set model\.heads=7: model\.heads: got 7; must divide width=768",
        ),
        ("model: {name: vit-b16}\n", ["optim.lr"], r"--set optim\.lr: expected KEY=VALUE"),
        (
            "model: {name: vit-b16}\n",
            ["optim.nope=1"],
            r"--set optim\.nope=1: optim\.nope: unknown key",
        ),
    ],
)
def test_bad_config_names_file_key_value_and_what_is_allowed(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(write(tmp_path, text), overrides)


def test_missing_file_and_bad_yaml_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: {name: [\n"))


def test_yaml_exponent_without_dot_reads_as_a_number(tmp_path):
    # PyYAML reads `1e-3` as a string; the loader accepts it for float fields.
    cfg = load_config(write(tmp_path, "model: {name: vit-b16}\noptim: {lr: 1e-3}\n"))
    assert cfg.optim.lr == pytest.approx(1e-3)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_resolved_config_round_trips_through_plain_data(path):
    cfg = load_config(path)
    raw = yaml.safe_load(yaml.safe_dump(config_to_raw(cfg)))
    assert parse_config(raw, "round-trip") == cfg


def test_set_reaches_into_lists_by_index_and_names_itself_in_errors():
    base = {"model": {"name": "vit-micro-p4", "num_classes": 10},
            "prepare": [{"source": "digits", "output": "a"}, {"source": "digits", "output": "b"}]}  # fmt: skip
    run = parse_config(copy.deepcopy(base), "q.yaml", ["prepare.1.source=/data/fmnist"])
    assert [p.source for p in run.prepare] == ["digits", "/data/fmnist"]
    with pytest.raises(ConfigError, match=r"^--set prepare\.0\.val_fraction=2: prepare\[0\]"):
        parse_config(copy.deepcopy(base), "q.yaml", ["prepare.0.val_fraction=2"])
    with pytest.raises(ConfigError, match="prepare is a list of 2; '2' is not an index in it"):
        parse_config(copy.deepcopy(base), "q.yaml", ["prepare.2.source=x"])


def test_a_key_given_twice_is_a_config_error_naming_it_and_both_lines(tmp_path):
    """Plain YAML keeps the second `train:` and silently drops the first's settings."""
    path = tmp_path / "run.yaml"
    path.write_text("model: {name: vit-micro-p4}\ntrain:\n  steps: 10\ntrain:\n  output: x\n")
    with pytest.raises(
        ConfigError, match=r"run.yaml: .*key 'train' appears twice, on lines 2 and 4"
    ):
        load_config(path)
    path.write_text("model: {name: vit-micro-p4}\ntrain: {steps: 10, steps: 20}\n")
    with pytest.raises(ConfigError, match=r"key 'steps' appears twice, on lines 2 and 2"):
        load_config(path)
