"""Fine-tune a teacher on a task once and cache it, so every distillation run reuses it.

The cache key is everything that determines the fine-tuned weights: the teacher, the data
(name, split, subsampling, truncation) and ``teacher_train``. The run is an ordinary geodistill
run (labels only) whose output directory lives in the user cache; a file lock keeps parallel
sweep workers from fine-tuning the same teacher twice.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from geodistill.config import DistillConfig, LossConfig, StudentConfig, identity_hash

__all__ = ["finetune_config", "finetuned_teacher", "fitted_teacher", "is_fitted"]


def finetune_config(cfg: DistillConfig, output_dir: str | Path | None = None) -> DistillConfig:
    """The labels-only run that fine-tunes ``cfg.teacher`` on ``cfg.data`` with ``cfg.teacher_train``."""
    from geodistill.tasks import model_fingerprint

    # a local teacher directory by its files' contents (a model saved again in place is another
    # teacher); offline and hub names as they are, so their keys are unchanged
    key = {
        "teacher": model_fingerprint(cfg.teacher.name),
        "task": cfg.task,
        "data": cfg.data,
        "teacher_train": cfg.teacher_train,
    }
    if cfg.task == "instruction":
        # prompts over max_prompt_length lose the middle of the user's text since 2026-12-07
        # (before: their start, template header and BOS included): a teacher fine-tuned on the old
        # prompts is not reused. Classification keys are unchanged
        key["prompt_cut"] = 2
    if output_dir is None:
        from geodistill.assets import cache_dir

        output_dir = (
            cache_dir()
            / "teachers"
            / f"{_slug(cfg.teacher.name)}-{cfg.data.name.replace('/', '_')}-{identity_hash(key)}"
        )
    return replace(
        cfg,
        teacher=replace(cfg.teacher, finetune=False),
        student=StudentConfig(init="pretrained", name=cfg.teacher.name),
        losses=(LossConfig(name="ce"),),
        train=cfg.teacher_train,
        output_dir=str(output_dir),
        overwrite=False,
    )


def _slug(name: str) -> str:
    return Path(name).name.replace("/", "_") or "model"


@contextlib.contextmanager
def _locked(path: Path) -> Any:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # under torchrun / accelerate launch every rank takes part in the one fine-tuning run (a
        # lock would let one rank start DDP collectives the others never join)
        yield
        return
    from geodistill.assets import file_lock

    with file_lock(path):
        yield


def is_fitted(out: str | Path) -> bool:
    """Whether the fine-tuning run writing to ``out`` has finished (its ``results.json`` is written
    last, after ``best/``)."""
    return Path(out, "results.json").exists()


def fitted_teacher(cfg: DistillConfig) -> Path | None:
    """Directory of the fine-tuned teacher for ``cfg`` when this machine's cache holds it, else
    None (fits nothing)."""
    out = Path(finetune_config(cfg).output_dir)
    return out / "best" if is_fitted(out) else None


def finetuned_teacher(cfg: DistillConfig, *, progress: bool = True) -> Path:
    """Directory of the fine-tuned teacher for ``cfg`` (trained now if not cached)."""
    from geodistill.train import setup, train

    ft = finetune_config(cfg)
    out = Path(ft.output_dir)
    with _locked(out.with_suffix(".lock")):
        if not is_fitted(out):
            if progress:
                print(f"fine-tuning teacher {cfg.teacher.name} on {cfg.data.name} (cached in {out})")
            train(setup(ft, kind="finetune", progress=progress), progress=progress)
    return out / "best"


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
