"""What every backend and preflight do the same way: load the training (and eval) prompts exactly as rendered."""

from __future__ import annotations

from pathlib import Path

from prefill_kit.config import DataSection
from prefill_kit.data.formats import detect_format, last_user_text, to_conversation
from prefill_kit.errors import ConfigError, DataError


def is_rendered(dataset) -> bool:
    """A rendered file has a string `prompt` and a `prefix` column: it is used as is, never rendered again."""
    cols = set(dataset.column_names)
    return {"prompt", "prefix"} <= cols and len(dataset) > 0 and isinstance(dataset[0]["prompt"], str)


def load_training_data(section: DataSection, tokenizer):
    """The prompts to train on: a `datasets.Dataset` with `prompt`, `prefix`, `prompt_ids` and every other column.

    Raw data is rendered with `section.template`, or the tokenizer's own chat template when that is None.
    `prompt_ids` come from the rendered text with `add_special_tokens=False` and the tokenizer in use (a
    rendered file's own ids are replaced), so the model sees exactly the rendered prompt. `section.few_shot`
    puts worked examples before each raw row, as `prefill-kit render --few-shot` does.
    """
    from prefill_kit.prompts.dataset import as_dataset, render_dataset  # datasets loads only when data does
    from prefill_kit.prompts.tokens import PromptTokenizer

    path = Path(section.path)
    if not path.exists():
        raise DataError("no such file or directory", source=str(path))
    dataset = as_dataset(str(path))
    if len(dataset) == 0:
        raise DataError("no rows", source=str(path))
    if not is_rendered(dataset):
        rendered = render_dataset(dataset, template=section.template, tokenizer=tokenizer, prefix=section.prefix,
                                  continue_final=section.continue_final, template_kwargs=section.template_kwargs,
                                  format=section.format, few_shot=few_shot_examples(section))
        return with_question_column(dataset, rendered, section.format)
    if section.few_shot is not None:
        raise ConfigError(f"data.few_shot: {path} is already rendered (it has `prompt` and `prefix` columns); "
                          "few-shot examples are added when rendering: render with --few-shot, or give raw data")
    encoder = PromptTokenizer(tokenizer)  # == tokenizer(prompts, add_special_tokens=False), computed faster

    def tokenize(batch):
        ids = encoder.encode(batch["prompt"])
        return {"prompt_ids": ids, "num_prompt_tokens": [len(i) for i in ids]}

    return dataset.map(tokenize, batched=True)


def with_question_column(raw, rendered, fmt: str):
    """`rendered` plus a `question` column: each row's last user message, which rendering folds into the prompt.

    It lets a completion log show what was asked. A `question` column the data passes through is kept as is.
    `rendered` must hold one row per `raw` row (rendering fails on a bad row rather than skip it).
    """
    if "question" in rendered.column_names:
        return rendered
    fmt = fmt if fmt != "auto" else detect_format(raw.column_names)
    questions = [last_user_text(to_conversation(row, fmt).messages) for row in raw]
    return rendered.add_column("question", questions)


def few_shot_examples(section: DataSection):
    """The `data.few_shot` examples, loaded and checked against `data.prefix`; None when not configured."""
    if section.few_shot is None:
        return None
    from prefill_kit.prompts.few_shot import load_few_shot

    f = section.few_shot
    return load_few_shot(f.path, shots=f.shots, seed=f.seed, mode=f.mode, prefix=section.prefix)


def check_eval_held_out(path: str, eval_path: str) -> None:
    """Eval rows scored on the training file measure memorisation, not generalisation."""
    if Path(eval_path).resolve() == Path(path).resolve():
        raise ConfigError(f"data.eval_path: {eval_path} is the training data; eval rows must be held out")


def load_eval_data(section: DataSection, tokenizer):
    """The held-out prompts of `section.eval_path`, rendered exactly as the training data (None without one)."""
    import dataclasses

    if not section.eval_path:
        return None
    check_eval_held_out(section.path, section.eval_path)
    return load_training_data(dataclasses.replace(section, path=section.eval_path), tokenizer)
