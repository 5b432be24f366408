"""`kdray export --run DIR`: the student's ONNX forms for a run whose final stage has run."""

from __future__ import annotations

import argparse
from pathlib import Path

from kdray.cli import flags
from kdray.errors import UserError


DESCRIPTION = ("Write the ONNX forms of a run's student (final/student-onnx, final/student-onnx-int8), each checked "
               "against the PyTorch student's logits on the validation split. The final stage writes them itself; "
               "this command makes them again, e.g. for a run made with serve.export: false.")
EXAMPLES = (
    'kdray export --run runs/default',
    'kdray predict --model runs/default/final/student-onnx-int8 "a gorgeous, witty film"',
)


def arguments(ap: argparse.ArgumentParser) -> None:
    flags.add_run(ap, "a run whose final stage has run")


def run(args: argparse.Namespace) -> int:
    from kdray.artifacts import RunDir

    run_dir = RunDir(Path(args.run).resolve())
    if not (run_dir.student / "config.json").is_file():
        raise UserError(f"--run {args.run}: no student in it ({run_dir.student} is missing). Fix: run the final stage "
                        f"first: `kdray final --run {args.run}`.")
    from kdray.config import load_config
    from kdray.data.load import load_data
    from kdray.stages.serving import export_student

    cfg = load_config(run_dir.config)
    task = load_data(cfg.data)
    forms = export_student(cfg, task, run_dir, who="export")
    failed = [f"{runtime}: {f['error']}" for runtime, f in forms.items() if "error" in f]
    if failed:
        raise UserError(f"--run {args.run}: the student's forms were not all made ({'; '.join(failed)}); "
                        f"final/student is unchanged. Fix: serve final/student with PyTorch (serve.runtime: pytorch).")
    return 0
