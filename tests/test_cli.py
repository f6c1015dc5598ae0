"""The `tessera` command: as installed, and in-process."""

import subprocess

import pytest
import torch
import yaml
from conftest import TESSERA

from pipeline.cli import main
from pipeline.models import create_model, list_models
from pipeline.models.registry import PAPER_PARAMS


@pytest.mark.slow
def test_tessera_models_lists_every_size_with_its_figures():
    out = subprocess.run([TESSERA, "models"], check=True, capture_output=True, text=True).stdout
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert list(rows) == list_models()
    for name, (_, params, paper, image, states, gflops) in rows.items():
        with torch.device("meta"):
            model = create_model(name)
        cfg = model.cfg
        count = sum(p.numel() for p in model.parameters())
        assert int(params.replace(",", "")) == count
        if name in PAPER_PARAMS:
            assert paper == f"{PAPER_PARAMS[name] / 1e6:.1f}M"
        else:
            assert paper == "-"
        assert int(image) == cfg.image_size
        if hasattr(cfg, "num_tokens"):
            assert int(states) == cfg.num_tokens
        else:  # a hierarchical model's last feature map
            assert states == f"{cfg.final_side}x{cfg.final_side}"
        assert float(gflops) == round(cfg.train_flops() / 1e9, 2)
    assert rows["igpt-xl"][1] == "6,803,475,456"


def test_tessera_models_filters_by_family(capsys):
    assert main(["models", "--family", "igpt"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert names and all(n.startswith("igpt") for n in names)


def test_a_launcher_local_rank_before_the_command_is_accepted(capsys):
    # `deepspeed --module pipeline.cli pretrain CONFIG` runs `pipeline.cli --local_rank=0 ...`.
    assert main(["--local_rank=1", "models", "--family", "igpt"]) == 0
    assert main(["--local-rank", "0", "models", "--family", "igpt"]) == 0
    assert capsys.readouterr().out.count("igpt-xl") == 2


def test_tessera_config_prints_the_resolved_config(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name: vit-micro-p4}\n")
    assert main(["config", str(path), "--set", "train.steps=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["steps"] == 7 and printed["model"]["width"] == 48


@pytest.mark.slow
def test_tessera_config_error_exits_2_and_names_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {name: vit-micro-p4, heads: 5}\n")
    proc = subprocess.run([TESSERA, "config", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert f"{path}: model.heads: got 5; must divide width=48" in proc.stderr
