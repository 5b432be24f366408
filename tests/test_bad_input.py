"""Every user mistake is caught before anything expensive: one row per bad input.

Each row runs the real command (`python -m kdray ...`) in a fresh directory and checks:
exit status 2, the words the message must contain (what is wrong, where, the fix), and that
nothing was written: no run directory, no cache entry, no Ray session (`RAY_TMPDIR` stays
absent, so Ray never started). Flag and config mistakes must also be fast: their time to the
error is measured, not asserted: `python -m pytest tests/test_bad_input.py --durations=0` prints
each row's time (README).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]

GOOD_CSV = "review,sentiment\n" + "".join(f"text number {i},{'pos' if i % 2 else 'neg'}\n" for i in range(40))


@dataclass
class Case:
    id: str
    args: list[str]
    words: list[str]
    """Words the message must contain (case-insensitive)."""
    files: dict[str, str] = field(default_factory=dict)
    """Files to write in the working directory first: name -> text."""
    env: dict[str, str] = field(default_factory=dict)
    code: int = 2


SEARCH = ["search", "--space", "smoke"]
PRETRAINED = ["--set", "student.init=pretrained"]
CSV = ["--set", "data.source=reviews.csv", "--set", "data.text_columns=[review]",
       "--set", "data.label_column=sentiment"]

CASES = [
    # --- flags
    Case("budget-nan", [*SEARCH, "--budget", "nan"], ["--budget", "finite"]),
    Case("budget-inf", [*SEARCH, "--budget", "inf"], ["--budget", "finite"]),
    Case("budget-huge", [*SEARCH, "--budget", "1e99"], ["--budget", "1e+99", "fix"]),
    Case("budget-negative", [*SEARCH, "--budget", "-5"], ["budget", "positive"]),
    Case("budget-zero", [*SEARCH, "--budget", "0"], ["budget", "positive"]),
    Case("budget-word", [*SEARCH, "--budget", "lots"], ["--budget", "lots"]),
    Case("budget-too-small", [*SEARCH, "--budget", "10"], ["budget", "head"]),
    Case("trials-zero", [*SEARCH, "--trials", "0"], ["--trials", "at least 1"]),
    Case("trials-negative", [*SEARCH, "--trials", "-3"], ["--trials", "at least 1"]),
    Case("unknown-space", ["search", "--space", "nosuch"], ["--space nosuch", "smoke", "default"]),
    Case("unknown-command", ["serch"], ["serch", "search"]),
    Case("unknown-flag", [*SEARCH, "--budgett", "1e6"], ["--budgett"]),
    Case("latency-budget-word", [*SEARCH, "--latency-budget", "fast"], ["--latency-budget fast", "2x"]),
    Case("latency-budget-zero", [*SEARCH, "--latency-budget", "0ms"], ["--latency-budget 0ms", "above 0"]),
    Case("shape-subset-layers", [*SEARCH, "--set", "space.keep_layers=[[0],[0,1]]"], ["space.layers: subset", "all"]),
    Case("name-escapes", [*SEARCH, "--name", "../../x"], ["--name", "../../x", "fix"]),
    Case("name-slash", [*SEARCH, "--name", "a/b"], ["--name", "a/b"]),
    Case("output-dir-is-file", [*SEARCH, "--output-dir", "afile"], ["--output-dir", "afile", "not a directory"],
         files={"afile": "x"}),
    Case("resume-nothing", [*SEARCH, "--resume"], ["--resume", "no search"]),
    Case("export-no-final", [*SEARCH, "--no-final", "--export", "out"], ["--export", "--no-final"]),
    Case("name-exists", [*SEARCH, "--name", "smoke", "--output-dir", "runs"], ["--name smoke", "--resume", "--overwrite"],
         files={"runs/smoke/config.yaml": "name: smoke\n"}),
    Case("overwrite-with-a-bad-budget", [*SEARCH, "--name", "smoke", "--output-dir", "runs", "--overwrite",
                                         "--budget", "10"], ["budget", "head"],
         files={"runs/smoke/config.yaml": "name: smoke\n"}),  # nothing deleted: the run is still there
    Case("workers-without-gpus", [*SEARCH, "--set", "resources.workers=2", "--set", "resources.device=gpu"],
         ["resources.device: gpu", "no GPU"]),
    Case("ddp-fractional-gpu", [*SEARCH, "--set", "resources.workers=2", "--set", "resources.gpus_per_worker=0.5"],
         ["resources.gpus_per_worker: 0.5", "workers 2", "one GPU per rank"]),
    Case("workers-bigger-than-the-machine", [*SEARCH, "--set", "resources.workers=4"],
         ["need 4 worker(s)", "holds"]),
    Case("wandb-online-no-key", [*SEARCH, "--wandb", "online"], ["--wandb online", "WANDB_API_KEY"],
         env={"WANDB_API_KEY": "", "WANDB_MODE": "", "NETRC": "/nonexistent/netrc", "HOME": "home"}),
    Case("address-unreachable", [*SEARCH, "--address", "127.0.0.1:9"], ["--address", "127.0.0.1:9", "reach"]),
    Case("ray-address-stale", SEARCH, ["RAY_ADDRESS", "127.0.0.1:9", "reach"], env={"RAY_ADDRESS": "127.0.0.1:9"}),
    # --- --set and the config
    Case("set-no-equals", [*SEARCH, "--set", "data.max_length"], ["--set", "key=value"]),
    Case("set-unknown-field", [*SEARCH, "--set", "data.max_lenght=64"], ["--set", "max_lenght", "max_length"]),
    Case("set-bad-type", [*SEARCH, "--set", "data.max_length=abc"], ["--set data.max_length", "integer"]),
    Case("set-negative-length", [*SEARCH, "--set", "data.max_length=-1"], ["--set data.max_length"]),
    Case("set-bad-lr", [*SEARCH, "--set", "train.learning_rate=-1"], ["--set train.learning_rate"]),
    Case("set-concurrency-zero", [*SEARCH, "--set", "search.concurrency=0"], ["--set search.concurrency"]),
    Case("set-negative-temperature", [*SEARCH, "--set", "train.temperature=-2"], ["train.temperature", "-2"]),
    Case("set-reversed-range", [*SEARCH, "--set", "space.learning_rate=[0.3,0.01]"],
         ["space.learning_rate", "[0.01, 0.3]"]),
    Case("set-scalar-for-list", [*SEARCH, "--set", "space.lora_r=8"], ["space.lora_r", "[8]"]),
    Case("set-key-without-value", [*SEARCH, "--set", "space.lora_r"], ["--set", "space.lora_r", "key=value"]),
    Case("set-unknown-section", [*SEARCH, "--set", "serch.trials=3"], ["serch", "search"]),
    Case("set-not-a-section", [*SEARCH, "--set", "budget.x=1"], ["budget", "not a section"]),
    Case("set-bad-yaml-value", [*SEARCH, "--set", "space.lora_r=[8"], ["space.lora_r", "quote"]),
    Case("set-device", [*SEARCH, "--set", "resources.device=tpu"], ["resources.device", "auto"]),
    Case("set-alpha-range", [*SEARCH, "--set", "space.alpha=[0.9,0.1]"], ["space.alpha"]),
    Case("student-init-unknown", [*SEARCH, "--set", "student.init=distilled"],
         ["student.init", "distilled", "pretrained, teacher"]),
    Case("student-init-teacher-other-model", [*SEARCH, "--set", "student.init=teacher",
                                              "--set", "student.config.hidden_size=64"],
         ["student.init", "student.config", "teacher's", "fix", "pretrained"]),
    Case("precision-unknown", [*SEARCH, "--set", "teacher.train.precision=fp16"],
         ["teacher.train.precision", "fp16", "auto, bf16, fp32"]),
    Case("set-empty-ranks", [*SEARCH, "--set", "space.lora_r=[]"], ["space.lora_r"]),
    Case("space-module-typo", [*SEARCH, "--set", "space.target_modules=[[q,vv]]"], ["space.target_modules", "vv"]),
    Case("student-full", [*SEARCH, "--set", "student.mode=full"], ["student.mode", "lora"]),
    Case("keep-layers-range", [*SEARCH, "--set", "student.keep_layers=[0,9]"], ["keep_layers", "9"]),
    Case("yaml-syntax", ["search", "--space", "bad.yaml"], ["bad.yaml", "yaml", "line 2"],
         files={"bad.yaml": "data: [1, 2\n"}),
    Case("yaml-bad-indent", ["search", "--space", "bad.yaml"], ["bad.yaml", "yaml"],
         files={"bad.yaml": "data:\n  source: x\n    max_length: 3\n"}),
    Case("yaml-not-mapping", ["search", "--space", "list.yaml"], ["list.yaml", "mapping"],
         files={"list.yaml": "- a\n- b\n"}),
    Case("yaml-unknown-section", ["search", "--space", "s.yaml", "--budget", "1e6"], ["s.yaml", "dataa"],
         files={"s.yaml": "dataa: {max_length: 32}\n"}),
    # --- data
    Case("data-missing-file", [*SEARCH, "--set", "data.source=nothere.csv"], ["data.source", "nothere.csv"]),
    Case("data-header-only", [*SEARCH, *CSV], ["reviews.csv", "no rows"], files={"reviews.csv": "review,sentiment\n"}),
    Case("data-no-label-column", [*SEARCH, *CSV[:4], "--set", "data.label_column=stars"], ["stars", "sentiment"],
         files={"reviews.csv": GOOD_CSV}),
    Case("data-no-text-column", [*SEARCH, "--set", "data.source=reviews.csv", "--set", "data.text_columns=[body]",
                                 "--set", "data.label_column=sentiment"], ["body", "review"],
         files={"reviews.csv": GOOD_CSV}),
    Case("data-one-label", [*SEARCH, *CSV], ["reviews.csv", "label"],
         files={"reviews.csv": "review,sentiment\n" + "".join(f"t {i},pos\n" for i in range(40))}),
    Case("data-tsv-commas", [*SEARCH, "--set", "data.source=reviews.tsv", "--set", "data.text_columns=[review]",
                             "--set", "data.label_column=sentiment"], ["reviews.tsv", "comma"],
         files={"reviews.tsv": GOOD_CSV}),
    Case("data-hub-name-without-embedded", [*SEARCH, "--set", "data.source=rotten_tomatoes"],
         ["rotten_tomatoes", "embedded:rotten_tomatoes"], env={"HF_HUB_OFFLINE": "1"}),
    Case("data-encoding", [*SEARCH, *CSV, "--set", "data.encoding=nosuchcodec"], ["data.encoding", "nosuchcodec"],
         files={"reviews.csv": GOOD_CSV}),
    Case("data-zero-samples", [*SEARCH, "--set", "data.max_train_samples=0"], ["data.max_train_samples"]),
    Case("data-unlabeled-missing-file", [*SEARCH, "--set", "data.unlabeled=pool.csv"],
         ["pool.csv", "no such file", "data.unlabeled"]),
    Case("data-unlabeled-zero-samples", [*SEARCH, "--set", "data.unlabeled=rest", "--set",
                                         "data.max_unlabeled_samples=0"], ["data.max_unlabeled_samples", "at least 1"]),
    # --- models
    # The default starts its student from the teacher: another student model needs student.init=pretrained
    # (the row after these three checks the message without it).
    Case("student-missing-dir", ["search", *PRETRAINED, "--set", "student.name=./no-model"], ["student.name", "no-model"]),
    Case("teacher-missing-dir", ["search", *PRETRAINED, "--set", "teacher.name=./no-model"], ["teacher.name", "no-model"]),
    Case("student-hub-offline", ["search", *PRETRAINED, "--set", "student.name=someone/some-model"],
         ["student.name", "someone/some-model", "HF_HUB_OFFLINE"], env={"HF_HUB_OFFLINE": "1"}),
    Case("student-other-than-the-teacher", ["search", "--set", "student.name=someone/some-model"],
         ["student.init: teacher", "student.name 'someone/some-model'", "teacher.name 'embedded:minilm-l6'",
          "--set student.init=pretrained"]),
    Case("budget-hub-offline", ["budget", "--space", "sst2"], ["sst2", "HF_HUB_OFFLINE"], env={"HF_HUB_OFFLINE": "1"}),
    # --- the other commands
    Case("distill-seeds-zero", ["distill", "--space", "smoke", "--seeds", "0"], ["--seeds", "0", "1 or more"]),
    Case("final-missing-run", ["final", "--run", "nothere"], ["--run", "nothere"]),
    Case("final-malformed-run", ["final", "--run", "junk"], ["--run", "junk", "config.yaml"],
         files={"junk/notes.txt": "x"}),
    Case("final-damaged-best-config", ["final", "--run", "runs/smoke"], ["best_config.yaml", "damaged", "--resume"],
         files={"runs/smoke/config.yaml": "base: smoke\n", "runs/smoke/best_config.yaml": "trial_id: [\n"}),
    Case("final-seeds-zero", ["final", "--run", "runs/smoke", "--seeds", "0"], ["--seeds", "0"],
         files={"runs/smoke/config.yaml": "base: smoke\n", "runs/smoke/best_config.yaml": "x: 1\n"}),
    Case("report-damaged-final", ["report", "--run", "runs/smoke"], ["final.json", "damaged", "kdray final --run"],
         files={"runs/smoke/config.yaml": "base: smoke\n", "runs/smoke/final/final.json": "{\"seeds\": 1"}),
    Case("report-missing-run", ["report", "--run", "nothere"], ["--run", "nothere"]),
    Case("export-without-final", ["export", "--run", "runs/smoke"], ["--run runs/smoke", "kdray final --run"],
         files={"runs/smoke/config.yaml": "base: smoke\n"}),
    Case("serve-runtime-unknown", [*SEARCH, "--set", "serve.runtime=tensorrt"], ["serve.runtime", "onnx-int8"]),
    Case("predict-missing-model", ["predict", "--model", "nothere", "hi"], ["--model", "nothere"]),
]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def run_case(case: Case, cwd: Path) -> tuple[subprocess.CompletedProcess, bool]:
    """Run `case` in `cwd`; returns the process and whether Ray started (its temp dir appeared)."""
    for name, text in case.files.items():
        (cwd / name).parent.mkdir(parents=True, exist_ok=True)
        (cwd / name).write_text(text)
    (cwd / "home").mkdir(exist_ok=True)
    # Ray's socket paths must stay under 107 bytes: a short temp dir of its own.
    ray_tmp = Path(tempfile.mkdtemp(prefix="kdr", dir="/tmp"))
    try:
        env = {**os.environ, "KDRAY_CACHE": str(cwd / "cache"), "RAY_TMPDIR": str(ray_tmp / "r"),
               "PYTHONPATH": str(ROOT), **case.env}
        if "RAY_ADDRESS" not in case.env:
            env.pop("RAY_ADDRESS", None)
        env = {k: v for k, v in env.items() if v != ""}
        proc = subprocess.run([sys.executable, "-m", "kdray", *case.args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=120)
        return proc, (ray_tmp / "r").exists()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(case: Case, tmp_path):
    before = _tree(tmp_path) | {str(Path(n)) for n in case.files} | {"home"}
    before |= {str(p) for n in case.files for p in Path(n).parents if str(p) != "."}
    proc, ray_started = run_case(case, tmp_path)
    message = proc.stderr + proc.stdout
    assert not ray_started, f"Ray started before the error was found:\n{message[-3000:]}"
    assert proc.returncode == case.code, f"exit {proc.returncode}, wanted {case.code}:\n{message[-3000:]}"
    assert "Traceback" not in message, message[-3000:]
    for word in case.words:
        assert word.lower() in message.lower(), f"{word!r} not in the message:\n{message[-3000:]}"
    assert "Fix:" in message, f"no fix in the message:\n{message[-3000:]}"
    assert _tree(tmp_path) == before, f"written: {sorted(_tree(tmp_path) - before)}"


def test_the_table_is_large_enough():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
