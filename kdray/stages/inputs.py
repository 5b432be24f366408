"""The distillation inputs: the job and the read-only data every student trial shares."""

from __future__ import annotations

from typing import Any

from kdray.train.batches import Split
from kdray.train.logits import TeacherLogits
from kdray.train.loop import DistillData, DistillJob


def distill_inputs(cfg: Any, task: Any, teacher: Any) -> tuple[DistillJob, DistillData]:
    """The job and the shared read-only data of the distillations of `cfg`'s student: the
    search's trials and the final stage's runs alike. The teacher's logits (or, online, its
    weights) come along when any of them distils: `train.alpha` or the space's below 1.

    `teacher` is the teacher stage's `TeacherResult`. The student is tokenized with its own
    tokenizer (cached); cached logits are keyed by example_id, so the teacher's tokenizer may
    differ. Online mode runs the teacher on the student's batches, so it needs the same one.
    With `student.init: teacher` the teacher's weights travel in the data too (workers never
    read the driver's teacher directory).
    """
    from kdray.data.tokenize import tokenize, tokenizer_identity
    from kdray.errors import UserError
    from kdray.train.models import from_pretrained_dir, load_tokenizer, to_payload

    train = cfg.train
    distils = train.alpha < 1.0 or cfg.space.alpha[0] < 1.0
    student = cfg.student
    tokenizer = load_tokenizer(student)
    tokenized, _ = tokenize(task, tokenizer, cfg.data.max_length, cfg.cache_dir)
    data = DistillData(Split.from_dataset(tokenized["train"]), Split.from_dataset(tokenized["validation"]))
    if task.transfer is not None:
        data.transfer = Split.from_dataset(tokenize(task, tokenizer, cfg.data.max_length, cfg.cache_dir,
                                                    extra="transfer")[0]["transfer"])
    if distils and train.teacher_logits == "online":
        from transformers import AutoTokenizer

        if tokenizer_identity(AutoTokenizer.from_pretrained(teacher.model_dir)) != tokenizer_identity(tokenizer):
            raise UserError("train.teacher_logits: online mode runs the teacher on the student's batches, "
                            "but they use different tokenizers. Fix: use cached (the default).")
        data.teacher_model = to_payload(from_pretrained_dir(teacher.model_dir))
    elif distils:
        data.teacher_logits = TeacherLogits.from_parquet(teacher.logits_path, teacher.transfer_logits_path)
    if student.init == "teacher":
        data.student_base = (data.teacher_model if data.teacher_model is not None
                             else to_payload(from_pretrained_dir(teacher.model_dir)))
    job = DistillJob(student, train, task.label_names, tokenizer.pad_token_id, cfg.seed)
    return job, data
