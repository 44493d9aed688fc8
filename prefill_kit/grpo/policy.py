"""The tokenizer and the policy as a run starts: one way to load them for both backends and preflight.

LoRA lives here as far as the model is concerned (a fresh adapter on the base); its checkpoints and the merged
save are the backends' (`prefill_kit.backends.lora`).
"""

from __future__ import annotations

import torch

from prefill_kit.config import LoraSection, TrainingConfig
from prefill_kit.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def load_tokenizer(config: TrainingConfig):
    """`model.tokenizer` (or the model's own); a tokenizer without a pad token pads with EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model.tokenizer or config.model.path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: TrainingConfig, *, training: bool = False, with_lora: bool = True):
    """The policy from `model.path` in `model.dtype`; with `model.lora` (and `with_lora`) a fresh adapter on it.

    `training`: dropout off (sampling and scoring must see the same distribution) and gradient checkpointing
    as `train.gradient_checkpointing` says, both before the adapter, whose own dropout is the user's.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(config.model.path, dtype=DTYPES[config.model.dtype])
    if training:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if config.train.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
    if with_lora and config.model.lora is not None:
        model = apply_lora(model, config.model.lora)
    return model


def load_reference(config: TrainingConfig):
    """A frozen reference model, needed only when beta > 0 without LoRA (else None: with LoRA the reference is
    the policy with its adapter switched off, so no second copy is loaded)."""
    if config.grpo.beta <= 0 or config.model.lora is not None:
        return None
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(config.model.path, dtype=DTYPES[config.model.dtype]).eval()
    ref_model.requires_grad_(False)
    return ref_model


def lora_config(section: LoraSection):
    """peft's `LoraConfig` for `model.lora` (a causal LM; unset options keep peft's defaults)."""
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=section.target_modules, modules_to_save=section.modules_to_save,
                      bias=section.bias, use_rslora=section.use_rslora, use_dora=section.use_dora)


def apply_lora(model, section: LoraSection):
    """`model` wrapped in a fresh adapter (a `PeftModel`): only the adapter's parameters require grad.

    peft initialises the adapter's B matrix to zero, so the wrapped model computes what the base does
    until the first update.
    """
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(section))
    except ValueError as exc:  # e.g. no default target modules for this architecture, or a name that matches none
        raise ConfigError(f"model.lora: peft cannot add an adapter to this model: {exc}") from None
