"""The sampled configuration: one typed value, converted to and from every shape it is stored in."""

from __future__ import annotations

import dataclasses

from kdray import metrics as M
from kdray.config import LoraChoice, load_config
from kdray.trials import TrialConfig


PARAMS = {"alpha": 0.25, "temperature": 3.5, "learning_rate": 1e-3, "lora_r": 16, "lora_alpha": 32.0,
          "lora_dropout": 0.05, "target_modules": "q,v,ffn_in", "epochs": 2,
          "layer_0": True, "layer_1": False, "layer_2": True}


def test_optuna_params_decode_without_knowing_the_layer_count():
    c = TrialConfig.from_params(PARAMS, trainable_params=1234)
    assert c.lora == LoraChoice(r=16, lora_alpha=32.0, lora_dropout=0.05, target_modules=["q", "v", "ffn_in"], layers=[0, 2])
    assert (c.alpha, c.temperature, c.learning_rate, c.epochs, c.trainable_params) == (0.25, 3.5, 1e-3, 2, 1234)
    # No layer flags: the space puts LoRA on every layer.
    flat = {k: v for k, v in PARAMS.items() if not k.startswith("layer_")}
    assert TrialConfig.from_params(flat).lora.layers is None
    # Tune's config of a sampled trial carries the space's count beside the parameters.
    assert TrialConfig.of_tune({**PARAMS, M.TRAINABLE_PARAMS: 99, "feasible": True}).trainable_params == 99


def test_rows_yaml_and_tune_round_trip():
    c = TrialConfig.from_params(PARAMS, trainable_params=1234)
    row = c.to_row()
    assert row["layers"] == "0,2" and row["target_modules"] == "q,v,ffn_in"
    assert TrialConfig.from_row(row) == c
    assert TrialConfig.from_yaml({**c.to_yaml(), M.TRAINABLE_PARAMS: 1234}) == c
    final = dataclasses.replace(c, mode="head", seed=2, variant="head_only")
    assert TrialConfig.of_tune({"trial": final.to_tune()}) == final and final.label() == "head_only/s2"


def test_job_applies_the_knobs_to_the_template():
    from kdray.train.loop import DistillJob

    cfg = load_config("smoke")
    template = DistillJob(cfg.student, cfg.train, ["neg", "pos"], 0, seed=7)
    c = TrialConfig.from_params(PARAMS)
    job = c.job(template)
    assert (job.train.alpha, job.train.temperature, job.train.learning_rate, job.train.epochs) == (0.25, 3.5, 1e-3, 2)
    assert job.model.lora == c.lora and job.model.mode == "lora" and job.seed == 7
    head = dataclasses.replace(c, mode="head", seed=3).job(template)
    assert head.model.mode == "head" and head.model.lora == cfg.student.lora and head.seed == 3
    assert job.train.batch_size == cfg.train.batch_size  # what the config does not choose stays the run's


def test_a_retried_trial_keeps_one_row_per_epoch():
    """A retry can report an epoch twice (its result was lost with the node, or Tune repeats a
    restored trial's last result): the per-epoch lists keep the last report of each epoch."""
    import pandas as pd

    from kdray.stages.search import _per_epoch

    df = pd.DataFrame({M.EPOCHS_DONE: [1, 2, 2, 3, 3, None], M.VAL_ACCURACY: [0.5, 0.6, 0.61, 0.7, 0.7, None]})
    per_epoch = _per_epoch(df)
    assert list(per_epoch[M.EPOCHS_DONE]) == [1, 2, 3]
    assert list(per_epoch[M.VAL_ACCURACY]) == [0.5, 0.61, 0.7]
