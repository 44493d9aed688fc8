"""LoRA through peft, the same for both backends: one LoraConfig from `model.lora`, the adapter in checkpoints,
and the merged model beside the adapter when `model.lora.merge` asks for it.

Only the adapter trains; the base weights never change, so a checkpoint holds the adapter alone (not a copy
of the base model per checkpoint) and the reference model of beta > 0 is the policy with its adapter
switched off: no second copy of the weights is loaded.
"""

from __future__ import annotations

from pathlib import Path

from prefill_kit.config import LoraSection
from prefill_kit.errors import ConfigError, PrefillKitError

ADAPTER_WEIGHTS = "adapter_model.safetensors"  # what peft's save_pretrained writes


def register_adapter_checkpointing(accelerator) -> None:
    """Make `accelerator.save_state`/`load_state` store the adapter (peft's files) instead of the whole model.

    The checkpoint directory then holds `adapter_config.json` and `adapter_model.safetensors`, loadable with
    `PeftModel.from_pretrained` like the final directory, next to accelerate's optimizer, scheduler and RNG.
    """

    def save(models, weights, output_dir):
        weights.clear()  # the base weights are the ones loaded from model.path: saving them again is waste
        if accelerator.is_main_process:
            accelerator.unwrap_model(models[0]).save_pretrained(output_dir)

    def load(models, input_dir):
        load_adapter_weights(accelerator.unwrap_model(models.pop(0)), Path(input_dir))

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def check_resume_kind(checkpoint: Path, lora: LoraSection | None) -> None:
    """A LoRA checkpoint resumes only a LoRA run and a full one only a full run: say so before loading."""
    has_adapter = (checkpoint / ADAPTER_WEIGHTS).is_file()
    if has_adapter and lora is None:
        raise ConfigError(f"output.resume_from: {checkpoint} holds a LoRA adapter, and model.lora is not set; "
                          "set model.lora as in the run that wrote it")
    if lora is not None and not has_adapter:
        raise ConfigError(f"output.resume_from: {checkpoint} holds no {ADAPTER_WEIGHTS}: not a checkpoint of a "
                          "LoRA run (model.lora must match the run that wrote it)")


def load_adapter_weights(peft_model, directory: Path) -> None:
    """Put the adapter saved in `directory` into `peft_model`'s adapter; refuse one that does not fit it."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        raise PrefillKitError(f"{directory}: no {ADAPTER_WEIGHTS}: not a checkpoint of a LoRA run "
                              "(model.lora must match the run that wrote it)")
    result = set_peft_model_state_dict(peft_model, load_file(path))
    if result.unexpected_keys:
        raise PrefillKitError(f"{path}: the adapter does not fit model.lora: unexpected weights "
                              f"{', '.join(result.unexpected_keys[:3])}...")
