"""`prefill-kit export verl`: chat data as a verl RL dataset whose prompts are exactly prefill-kit's.

verl has no response prefix. It renders each row's `prompt` messages with the model's chat template (or
`actor_rollout_ref.model.custom_chat_template`) and `add_generation_prompt=True`, then tokenizes that. So the
export writes:

- `train.parquet` in verl's RL schema (`data_source`, `prompt` messages, `ability`,
  `reward_model: {style: rule, ground_truth}`, `extra_info: {index, response_prefix, other columns}`);
- `chat_template.jinja`: the template, with the part of the prefix it does not already write appended to its
  generation prompt, so verl's rendering of every row is prefill-kit's `prompt`, text for text;
- `verl_overrides.yaml`: the config that points verl at both and at `prefill_kit.integrations.verl`'s
  `compute_score`.

Each row is rendered by `prefill_kit.prompts.stream` as `prefill-kit render` does, and the written template is
checked against every rendered prompt: a row it would render differently is an error, never a silent drift.
Few-shot examples become the turns (or system text) of the row's messages, as render puts them there. With
`pass_rendered`, every row is exported as its rendered text: verl's `prompt` is one message holding it, and the
written template writes that message verbatim (`RENDERED_TEMPLATE`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefill_kit.data.io import atomic_directory
from prefill_kit.data.readers import DEFAULT_BATCH_SIZE, Record, iter_chunks
from prefill_kit.data.writers import rejects_file
from prefill_kit.errors import ConfigError, DataError
from prefill_kit.prompts.batch import BatchResult
from prefill_kit.prompts.options import RenderOptions
from prefill_kit.prompts.stream import open_stream, render_stream
from prefill_kit.templates import ChatTemplate

DATA_FILE = "train.parquet"
TEMPLATE_FILE = "chat_template.jinja"
OVERRIDES_FILE = "verl_overrides.yaml"
REJECTS_FILE = "rejects.jsonl"
REWARD_PATH = "pkg://prefill_kit.integrations.verl"
# Rendered columns that become verl's own fields, or that verl derives itself (the token ids).
_OWN_COLUMNS = frozenset({"prompt", "prefix", "solution", "prompt_ids", "num_prompt_tokens", "data_source", "ability"})
_EXTRA_INFO_KEYS = ("index", "response_prefix")
# The template of a `pass_rendered` export: the one message is the whole rendered prompt (prefix included).
RENDERED_TEMPLATE = "{{- messages[0]['content'] -}}"


@dataclass
class VerlExport:
    """What an export wrote: counts, the files, and what verl needs to be told."""

    directory: Path
    rows: int = 0
    rejected: int = 0
    without_ground_truth: int = 0
    response_prefix: str = ""
    generation_suffix: str = ""
    max_prompt_tokens: int | None = None
    boundary_merges: int = 0
    files: list[str] = field(default_factory=list)


def template_with_suffix(source: str, suffix: str) -> str:
    """`source` with `suffix` written after its generation prompt (and nowhere else).

    Appended as one expression tag, which `trim_blocks`/`lstrip_blocks` leave alone. Jinja drops one
    trailing newline of a template source; it is dropped here too, or it would move in front of the suffix.
    The suffix is a JSON string literal: every JSON escape is also a Jinja string escape.
    """
    if not suffix:
        return source
    body = source[:-2] if source.endswith("\r\n") else source[:-1] if source.endswith(("\n", "\r")) else source
    literal = json.dumps(suffix, ensure_ascii=False)
    return f'{body}{{{{ {literal} if add_generation_prompt is defined and add_generation_prompt else "" }}}}'


class _Exporter:
    """Turns rendered rows into verl rows, fixing the generation suffix on the first one and checking the
    written template against every later one."""

    def __init__(self, options: RenderOptions, data_source: str, ability: str) -> None:
        self.options = options
        self.data_source = data_source
        self.ability = ability
        self.template: ChatTemplate | None = None
        self.rows: list[dict[str, Any]] = []
        self.first: tuple[str, str] | None = None  # (where, effective prefix) of the first row
        self.suffix = ""  # what the written template appends to the generation prompt

    def add(self, record: Record, rendered: dict[str, Any], messages: list[dict[str, Any]] | None) -> None:
        """Add a rendered row; `messages` are those its prompt renders (None for a row passed through rendered)."""
        if self.options.pass_rendered:
            self._add_rendered(record, rendered)
            return
        kwargs = self.options.template_kwargs
        if self.template is None:
            generation_prompt = self.options.template.render(messages, add_generation_prompt=True, **kwargs)
            suffix = rendered["prompt"][len(generation_prompt):]
            base = self.options.template
            self.template = ChatTemplate(template_with_suffix(base.source, suffix), f"{base.name} (+ prefix)",
                                         base.special_tokens)
            self.suffix = suffix
            self.first = (record.where, rendered["prefix"])
        if rendered["prefix"] != self.first[1]:
            raise DataError(f"its prefix {rendered['prefix']!r} differs from {self.first[1]!r} of {self.first[0]}: "
                            "verl renders every row with one chat template, so rows with different prefixes "
                            "cannot share it; export them separately", source=record.where, field="prefix")
        as_verl = self.template.render(messages, add_generation_prompt=True, **kwargs)
        if as_verl != rendered["prompt"]:
            raise DataError(f"the exported chat template renders this row as {as_verl[-80:]!r} (end), not as "
                            f"prefill-kit's prompt {rendered['prompt'][-80:]!r} (end)", source=record.where,
                            field="prompt")
        self._append(record, rendered, messages)

    def _add_rendered(self, record: Record, rendered: dict[str, Any]) -> None:
        """A row as its rendered text: each row carries its own prefix, so rows with different ones may mix."""
        if self.template is None:
            self.template = ChatTemplate(RENDERED_TEMPLATE, "rendered prompts (--pass-rendered)")
            self.first = (record.where, rendered["prefix"])
        messages = [{"role": "user", "content": rendered["prompt"]}]
        if self.template.render(messages, add_generation_prompt=True) != rendered["prompt"]:  # never, by design
            raise DataError("the exported template does not write the rendered prompt verbatim", source=record.where,
                            field="prompt")
        self._append(record, rendered, messages)

    def _append(self, record: Record, rendered: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        extra = {"index": len(self.rows), "response_prefix": rendered["prefix"]}
        for key, value in rendered.items():
            if key in _OWN_COLUMNS:
                continue
            if key in _EXTRA_INFO_KEYS:
                raise DataError(f"column {key!r} would overwrite extra_info's own {key!r}; rename it with --columns",
                                source=record.where, field=key)
            extra[key] = value
        self.rows.append({
            "data_source": rendered.get("data_source") or self.data_source,
            "prompt": messages,
            "ability": rendered.get("ability") or self.ability,
            "reward_model": {"style": "rule", "ground_truth": rendered.get("solution")},
            "extra_info": extra,
        })


def export_verl(source: str | Path, directory: str | Path, options: RenderOptions, *, data_source: str | None = None,
                ability: str = "math", rewards: str = "format,accuracy", model_path: str | None = None,
                batch_size: int = DEFAULT_BATCH_SIZE, progress: Callable[[int], None] | None = None) -> VerlExport:
    """Render `source` and write the verl dataset, chat template and config overrides into `directory`.

    The directory is written whole or not at all. `data_source` defaults to the input's name; a row's own
    `data_source` / `ability` columns win. Bad rows raise DataError (file, line or row, field), or with
    `options.on_error == "skip"` go to `directory/rejects.jsonl`.
    """
    if options.continue_final:
        raise ConfigError("--continue-final: verl renders prompts with add_generation_prompt=True, so a final "
                          "assistant message cannot be continued there")
    directory = Path(directory)
    if directory.is_dir() and any(p.name not in (DATA_FILE, TEMPLATE_FILE, OVERRIDES_FILE, REJECTS_FILE)
                                  for p in directory.iterdir()):
        raise ConfigError(f"output directory {directory} holds other files; give a new or an earlier export's "
                          "directory (it is replaced whole)")
    exporter = _Exporter(options, data_source or Path(str(source)).stem, ability)
    summary = VerlExport(directory.resolve())
    rejects: list[dict[str, Any]] = []
    lengths: list[int] = []
    stream = open_stream(iter_chunks(source, batch_size), options)
    for records, result in render_stream(stream, options, _records_and_result, keep_messages=True):
        rejects.extend(result.rejects)
        summary.boundary_merges += result.merges
        for record, row, messages in zip(result.kept, result.rows, result.messages, strict=True):
            exporter.add(record, row, messages)
            if "num_prompt_tokens" in row:
                lengths.append(row["num_prompt_tokens"])
        if progress is not None:
            progress(len(records))
    if not exporter.rows:
        raise DataError("no rows to export" + (f" ({len(rejects)} rejected)" if rejects else ""), source=str(source))

    summary.rows = len(exporter.rows)
    summary.rejected = len(rejects)
    summary.without_ground_truth = sum(r["reward_model"]["ground_truth"] is None for r in exporter.rows)
    summary.response_prefix = exporter.first[1]
    summary.generation_suffix = exporter.suffix
    summary.max_prompt_tokens = max(lengths) if lengths else None
    with atomic_directory(directory) as tmp:
        _write_parquet(exporter.rows, tmp / DATA_FILE)
        (tmp / TEMPLATE_FILE).write_text(exporter.template.source, encoding="utf-8")
        overrides = verl_overrides(summary.directory, exporter.template.source, rewards=rewards,
                                   template_kwargs=options.template_kwargs, model_path=model_path,
                                   max_prompt_tokens=summary.max_prompt_tokens)
        (tmp / OVERRIDES_FILE).write_text(overrides, encoding="utf-8")
        summary.files = [DATA_FILE, TEMPLATE_FILE, OVERRIDES_FILE]
        with rejects_file(tmp / REJECTS_FILE) as written:
            written.write(rejects)
        if written.count:
            summary.files.append(REJECTS_FILE)
    return summary


def _records_and_result(records: list[Record], result: BatchResult) -> tuple[list[Record], BatchResult]:
    return records, result


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"cannot write the rows as one Parquet table (a column holds mixed types?): {exc}",
                        source=str(path)) from None
    pq.write_table(table, path)


def _omegaconf_literal(text: str) -> str:
    """`text` as OmegaConf reads it literally: `${` starts an interpolation there, so it is escaped as `\\${`
    (and the backslashes before it doubled)."""
    return re.sub(r"(\\*)\$\{", lambda m: m[1] * 2 + "\\${", text)


class _Dumper:
    """A YAML dumper that writes multi-line strings as literal blocks (readable templates) where YAML can."""

    @staticmethod
    def dump(data: Mapping[str, Any]) -> str:
        import yaml

        class Dumper(yaml.SafeDumper):
            pass

        def string(dumper, value: str):
            style = "|" if "\n" in value else None
            return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

        Dumper.add_representer(str, string)
        return yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=10_000)


def verl_overrides(directory: Path, template_source: str, *, rewards: str, template_kwargs: Mapping[str, Any],
                   model_path: str | None, max_prompt_tokens: int | None) -> str:
    """The Hydra config for `python -m verl.trainer.main_ppo --config-path DIR --config-name verl_overrides`:
    verl's `ppo_trainer` with the data files, the chat template and the reward function set."""
    data: dict[str, Any] = {"train_files": str(directory / DATA_FILE), "val_files": str(directory / DATA_FILE),
                            "prompt_key": "prompt"}
    if template_kwargs:
        data["apply_chat_template_kwargs"] = dict(template_kwargs)
    if max_prompt_tokens is not None:
        data["max_prompt_length"] = max_prompt_tokens
    model: dict[str, Any] = {"custom_chat_template": _omegaconf_literal(template_source)}
    if model_path is not None:
        model["path"] = str(model_path)
    config = {
        "hydra": {"searchpath": ["pkg://verl.trainer.config"]},
        "defaults": ["ppo_trainer", "_self_"],
        "data": data,
        # verl has no default for the rollout engine (`???`); vLLM is its usual one, `sglang` the other.
        "actor_rollout_ref": {"model": model, "rollout": {"name": "vllm"}},
        "reward": {"custom_reward_function": {"path": REWARD_PATH, "name": "compute_score",
                                              "reward_kwargs": {"rewards": rewards}}},
    }
    head = ("# verl config written by `prefill-kit export verl`. Run:\n"
            f"#   {launch_command(directory, model_path)}\n"
            "# data.val_files is the training data: export a held-out split the same way and override it.\n")
    return head + _Dumper.dump(config)


def launch_command(directory: Path, model_path: str | None = None) -> str:
    """The verl launch line for an export in `directory` (GPUs, batch sizes and the rest are the user's)."""
    model = "" if model_path is not None else " actor_rollout_ref.model.path=MODEL"
    return (f"python -m verl.trainer.main_ppo --config-path {directory} --config-name "
            f"{OVERRIDES_FILE.removesuffix('.yaml')}{model} trainer.n_gpus_per_node=1")
