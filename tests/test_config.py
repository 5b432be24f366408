"""Config: shipped spaces load, overrides apply, every problem is listed at once, the CLI exits 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kdray.config import SPACES_DIR, load_config
from kdray.errors import UserError
from kdray.train.budget import count
from tests.conftest import ROOT


SHIPPED = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def test_spaces_are_shipped_in_the_package_and_at_the_repo_root():
    assert {"smoke", "default"} <= set(SHIPPED)
    assert sorted(p.stem for p in (ROOT / "search_spaces").glob("*.yaml")) == SHIPPED


#: The hub models the shipped spaces name, as their configs (no network here): the architecture
#: is all the budget count needs.
HUB_CONFIGS = {
    "bert-base-uncased": lambda: __import__("transformers").BertConfig(),
    "distilbert-base-uncased": lambda: __import__("transformers").DistilBertConfig(),
    "roberta-base": lambda: __import__("transformers").RobertaConfig(vocab_size=50265, max_position_embeddings=514,
                                                                      type_vocab_size=1),
}


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_space_loads_and_samples_within_budget(name, tmp_path):
    import optuna

    from kdray.stages.searcher import BudgetedSpace
    from kdray.train.models import build_model, encoder_layers

    cfg = load_config(name)
    for spec in (cfg.teacher, cfg.student):
        if spec.name in HUB_CONFIGS:
            HUB_CONFIGS[spec.name]().save_pretrained(tmp_path / spec.name)
            spec.name = str(tmp_path / spec.name)
    k = len(cfg.data.label_names) if cfg.data.label_names else 2
    assert count(cfg.student, k) <= cfg.budget
    n_layers = len(encoder_layers(build_model(cfg.student, k, device="meta"))[1])
    space = BudgetedSpace(cfg.space, cfg.student, k, cfg.budget, n_layers)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    feasible = 0
    for _ in range(12):
        trial = study.ask()
        out = space(trial)
        if out["feasible"]:
            feasible += 1
            assert 0 < out["trainable_params"] <= cfg.budget
        study.tell(trial, 0.0)
    assert feasible > 0


def test_overrides_apply_with_yaml_types():
    cfg = load_config("smoke", ["student.lora.r=16", "data.max_length=48", "student.lora.layers=[1]", "budget=2e5"])
    assert (cfg.student.lora.r, cfg.data.max_length, cfg.student.lora.layers, cfg.budget) == (16, 48, [1], 200000)


def test_every_problem_is_reported_at_once(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("data:\n  sorce: x.csv\n  max_length: 2\nstudent:\n  mode: lorra\n  lora: {r: 0}\nbudget: lots\n")
    with pytest.raises(UserError) as e:
        load_config(str(f))
    msg = e.value.message()
    assert msg.startswith(f"kdray: 6 problems in {f}")
    for needle in ["student: set exactly one of student.name (pretrained) or student.config",
                   "data.sorce: unknown field. Did you mean 'source'?", "data.max_length: 2 tokens",
                   "student.mode: 'lorra' is unknown", "student.lora.r: rank 0", "budget: 'lots' is not an integer"]:
        assert needle in msg


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("smoke", ["data.source=reviews.csv"])
    assert cfg.data.source == str(tmp_path / "reviews.csv")


def run_budget(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdray", "budget", *args], capture_output=True, text=True, cwd=ROOT)


def test_budget_cli_prints_count_and_feasible_ranks():
    r = run_budget("--space", "smoke", "--budget", "1e5")
    assert r.returncode == 0, r.stderr
    assert "trainable parameters: 2,146  (budget 100,000: fits" in r.stdout
    assert "q,v" in r.stdout and "386" in r.stdout  # (100000 - 1122 head) // 256


def test_the_smallest_feasible_budget_follows_the_layers_the_space_can_choose():
    """A space that picks layer subsets can train a one-layer student: its floor is that
    student's exact count (PEFT's own, on the meta device), below the all-layer one."""
    import dataclasses

    from kdray.config import LoraChoice
    from kdray.train.budget import smallest_feasible

    cfg = load_config("smoke")
    cheapest = min(cfg.space.target_modules, key=len)

    def built(layers):
        return count(dataclasses.replace(cfg.student, lora=LoraChoice(r=min(cfg.space.lora_r), target_modules=cheapest,
                                                                       layers=layers)), 2)

    assert cfg.space.layers == "subset" and smallest_feasible(cfg, 2) == built([0]) == built([1])
    everywhere = load_config("smoke", ["space.layers=all"])
    assert smallest_feasible(everywhere, 2) == built(None) > built([0])
    r = run_budget("--space", "smoke", "--budget", str(built([0]) - 1))
    assert r.returncode == 2 and f"below the smallest feasible student of this space ({built([0]):,}" in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["--budget", "100"], "below the smallest feasible student of this space ("),
    (["--set", "data.source=missing.csv"], "missing.csv: no such file"),
    (["--set", "student.lora.target_modules=[q, nope]"], "'nope' is not a linear module of a bert layer"),
    (["--set", "student.keep_layers=[0, 9]"], "out of range"),
    (["--space", "no-such-space"], "not a shipped space"),
])
def test_budget_cli_bad_input_exits_2_with_one_message(args, needle):
    r = run_budget(*(["--space", "smoke"] if "--space" not in args else []), *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_a_space_with_base_is_a_set_of_changes_to_it(tmp_path):
    """`base:` names a shipped space (or a file beside this one); sections merge over it."""
    (tmp_path / "mine.yaml").write_text("base: default\nname: mine\nsearch: {trials: 12}\n"
                                        "student: {lora: {r: 4}}\n")
    cfg, default = load_config(tmp_path / "mine.yaml"), load_config("default")
    assert cfg.name == "mine" and cfg.search.trials == 12 and cfg.student.lora.r == 4
    assert cfg.search.concurrency == default.search.concurrency and cfg.student.keep_layers == [0, 2, 4]
    assert cfg.student.lora.target_modules == default.student.lora.target_modules and cfg.data == default.data
    (tmp_path / "on_mine.yaml").write_text("base: mine.yaml\nseed: 3\n")  # a file beside it, chained
    assert load_config(tmp_path / "on_mine.yaml").search.trials == 12
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(UserError, match="leads back to this file"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "lost.yaml").write_text("base: nosuch\n")
    with pytest.raises(UserError, match="base: nosuch"):
        load_config(tmp_path / "lost.yaml")
