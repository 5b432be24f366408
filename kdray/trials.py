"""One trial's configuration, as one typed value, and every shape it is stored in.

A configuration is sampled by Optuna (flat parameters: comma-joined target modules, one
`layer_i` flag per encoder layer, the student's shape as comma-joined `keep_layers`), trained by a Tune trial, written as a row of
`search/trials.parquet`, chosen into `best_config.yaml` and retrained by the final stage. This
module is the one place that converts between those shapes; everything else holds a `TrialConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kdray import metrics as M
from kdray.config import LoraChoice, TrainableModelConfig


#: An Optuna trial's user attribute: the sample was infeasible (over budget, no layer, or a too-slow
#: shape) and never trained.
REJECTED_ATTR = "kdray_rejected"
#: Why it was rejected: `budget` (over the parameter budget, or no layer) or `latency` (a too-slow shape).
REJECTED_WHY_ATTR = "kdray_rejected_why"
#: The final stage's variants: the search's choice and its two baselines.
VARIANTS = {
    "student": "distilled LoRA student (the search's best configuration)",
    "no_kd": "the same LoRA student on labels only (alpha = 1)",
    "head_only": "frozen encoder, trained classifier head (same alpha, T, learning rate, epochs)",
}
LAYER_PREFIX = "layer_"
#: The Optuna parameter (and trials.parquet column) of the student's shape: comma-joined `keep_layers`.
SHAPE_PARAM = "keep_layers"


def shape_text(keep_layers: list[int] | None) -> str | None:
    """`[0, 2, 4]` as `0,2,4` (an Optuna categorical choice, a table cell); None stays None."""
    return None if keep_layers is None else ",".join(map(str, keep_layers))


def shape_of(text: str | None) -> list[int] | None:
    return None if text is None else [int(x) for x in str(text).split(",")]


@dataclass(frozen=True)
class TrialConfig:
    """What one trial trains: the distillation knobs, the student's LoRA choice, and (final
    stage) which variant and seed."""

    alpha: float
    """Weight of the hard-label loss (1 = no KD)."""
    temperature: float
    """KD softmax temperature."""
    learning_rate: float
    """Peak AdamW learning rate."""
    epochs: int
    """Epochs the trial trains unless ASHA stops it."""
    lora: LoraChoice
    """Rank, alpha, dropout, target modules and layers of the student's LoRA."""
    trainable_params: int = 0
    """The student's trainable parameters, counted on the meta device when the config was made."""
    mode: str = "lora"
    """`lora`, or `head` (the final stage's frozen-encoder baseline: `lora` is then unused)."""
    seed: int | None = None
    """Training seed; None: the run's `seed`."""
    variant: str | None = None
    """The final stage's variant (`student`, `no_kd`, `head_only`); None in the search."""
    keep_layers: list[int] | None = None
    """The student's shape (`student.keep_layers`) when the search chooses it (`space.keep_layers`);
    None: the run's student as configured."""

    # ------------------------------------------------------------------ Optuna parameters

    @classmethod
    def from_params(cls, params: dict[str, Any], trainable_params: int = 0) -> "TrialConfig":
        """From Optuna's flat parameters (`layer_i` flags present only when layers are searched)."""
        flags = {int(k[len(LAYER_PREFIX):]): bool(v) for k, v in params.items() if k.startswith(LAYER_PREFIX)}
        layers = sorted(i for i, on in flags.items() if on) if flags else None
        lora = LoraChoice(r=int(params["lora_r"]), lora_alpha=float(params["lora_alpha"]),
                          lora_dropout=float(params["lora_dropout"]),
                          target_modules=str(params["target_modules"]).split(","), layers=layers,
                          variant=str(params.get("lora_variant", "lora")))
        return cls(alpha=float(params["alpha"]), temperature=float(params["temperature"]),
                   learning_rate=float(params["learning_rate"]), epochs=int(params["epochs"]), lora=lora,
                   trainable_params=int(trainable_params), keep_layers=shape_of(params.get(SHAPE_PARAM)))

    @classmethod
    def of_tune(cls, config: dict[str, Any]) -> "TrialConfig":
        """A Tune trial's config: the sampled parameters (plus the space's `trainable_params`),
        or the final stage's `{"trial": TrialConfig.to_tune()}`."""
        if "trial" in config:
            return cls(**{**config["trial"], "lora": LoraChoice(**config["trial"]["lora"])})
        return cls.from_params(config, config.get(M.TRAINABLE_PARAMS, 0))

    def to_tune(self) -> dict[str, Any]:
        """As plain data, for a Tune `param_space` (its params.json stays readable)."""
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ trials.parquet and best_config.yaml

    @property
    def layers_text(self) -> str:
        """`all`, or the comma-joined LoRA layers."""
        return "all" if self.lora.layers is None else ",".join(map(str, self.lora.layers))

    def to_row(self) -> dict[str, Any]:
        """The configuration columns of a `trials.parquet` row."""
        return {"alpha": self.alpha, "temperature": self.temperature, "learning_rate": self.learning_rate,
                "lora_alpha": self.lora.lora_alpha, "lora_dropout": self.lora.lora_dropout, "lora_r": self.lora.r,
                "target_modules": ",".join(self.lora.target_modules), "layers": self.layers_text,
                "lora_variant": self.lora.variant, "epochs": self.epochs, M.TRAINABLE_PARAMS: self.trainable_params,
                SHAPE_PARAM: shape_text(self.keep_layers)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "TrialConfig":
        layers = None if row["layers"] == "all" else [int(x) for x in row["layers"].split(",")]
        lora = LoraChoice(r=int(row["lora_r"]), lora_alpha=float(row["lora_alpha"]), lora_dropout=float(row["lora_dropout"]),
                          target_modules=str(row["target_modules"]).split(","), layers=layers,
                          variant=str(row.get("lora_variant") or "lora"))
        return cls(alpha=float(row["alpha"]), temperature=float(row["temperature"]),
                   learning_rate=float(row["learning_rate"]), epochs=int(row["epochs"]), lora=lora,
                   trainable_params=int(row[M.TRAINABLE_PARAMS]), keep_layers=shape_of(row.get(SHAPE_PARAM)))

    def to_yaml(self) -> dict[str, Any]:
        """The `train:` and `student:` sections of `best_config.yaml` (shaped like a space's)."""
        return {"train": {"alpha": self.alpha, "temperature": self.temperature, "learning_rate": self.learning_rate,
                          "epochs": self.epochs},
                "student": {"mode": self.mode, "lora": dataclasses.asdict(self.lora),
                            **({"keep_layers": list(self.keep_layers)} if self.keep_layers is not None else {})}}

    @classmethod
    def from_yaml(cls, best: dict[str, Any]) -> "TrialConfig":
        t, lora = best["train"], best["student"]["lora"]
        return cls(alpha=float(t["alpha"]), temperature=float(t["temperature"]),
                   learning_rate=float(t["learning_rate"]), epochs=int(t["epochs"]),
                   lora=LoraChoice(r=int(lora["r"]), lora_alpha=float(lora["lora_alpha"]), lora_dropout=float(lora["lora_dropout"]),
                                   target_modules=list(lora["target_modules"]), layers=lora["layers"],
                                   variant=lora.get("variant", "lora")),
                   trainable_params=int(best.get(M.TRAINABLE_PARAMS, 0)), mode=best["student"].get("mode", "lora"),
                   keep_layers=best["student"].get("keep_layers"))

    # ------------------------------------------------------------------ what trains

    def student(self, base: TrainableModelConfig) -> TrainableModelConfig:
        """`base` as this configuration trains it: LoRA as chosen, or head only."""
        return dataclasses.replace(base, mode=self.mode, lora=self.lora if self.mode == "lora" else base.lora,
                                   keep_layers=base.keep_layers if self.keep_layers is None else list(self.keep_layers))

    def job(self, template: Any) -> Any:
        """The `kdray.train.loop.DistillJob` of this configuration, from the run's `template` job."""
        train = dataclasses.replace(template.train, alpha=self.alpha, temperature=self.temperature,
                                    learning_rate=self.learning_rate, epochs=self.epochs)
        return dataclasses.replace(template, model=self.student(template.model), train=train,
                                   seed=template.seed if self.seed is None else self.seed)

    def label(self) -> str:
        """The final stage's name of a run (`student/s0`)."""
        return f"{self.variant}/s{self.seed}"


def shape_note(c: TrialConfig) -> str:
    """` of 0,2,4` after the LoRA layers of a trial whose shape was searched, else nothing."""
    return "" if c.keep_layers is None else f" of {shape_text(c.keep_layers)}"
