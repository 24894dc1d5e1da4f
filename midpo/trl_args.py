"""The TRL/transformers training arguments every midpo trainer shares, with TRL's surprising defaults
written out in one place: TRL would turn bf16 and gradient checkpointing on and pick its own learning
rate, seed and reporting. SFT (tiny base), the score models and the DPO family each add their own fields.
"""

from __future__ import annotations

from typing import Any


def common_args(
    *,
    output_dir: str,
    learning_rate: float,
    epochs: float,
    batch_size: int,
    lr_scheduler: str,
    warmup_ratio: float,
    weight_decay: float,
    seed: int,
    bf16: bool,
    gradient_checkpointing: bool,
    gradient_accumulation_steps: int = 1,
) -> dict[str, Any]:
    import torch

    return dict(
        output_dir=output_dir,
        learning_rate=learning_rate,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        lr_scheduler_type=lr_scheduler,
        warmup_steps=warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        weight_decay=weight_decay,
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        fp16=False,
        # transformers 5.24 renamed gradient_checkpointing to activation_checkpointing; TRL still defaults the
        # old name to True. Both are set so neither default wins (and no deprecation warning).
        activation_checkpointing=gradient_checkpointing,
        gradient_checkpointing=gradient_checkpointing,
        logging_first_step=True,
        disable_tqdm=False,  # the Trainer's progress bar
        report_to="none",  # the pipeline logs to MLflow itself
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
