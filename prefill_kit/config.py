"""The training config: one YAML file that every backend reads.

Schema (every key but `model.path`, `data.path` and `output.dir` has a default; unknown keys are errors):

```yaml
backend: builtin                # builtin | trl; `prefill-kit train --backend` overrides it
model:
  path: ./my-model              # a local Hugging Face model directory
  dtype: float32                # float32 | bfloat16 | float16 | auto: the dtype the weights are loaded in
  tokenizer: null               # tokenizer directory; default: model.path
  lora: null                    # a mapping trains a LoRA adapter through peft instead of every weight:
    # r: 8                      #   rank; these defaults are peft's LoraConfig defaults (`lora: {}` takes them all)
    # alpha: 8.0                #   lora_alpha: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)
    # dropout: 0.0              #   lora_dropout, in the training forward only (sampling and scoring run in eval mode)
    # target_modules: null      #   module names, or "all-linear"; null: peft's default for the architecture
    # modules_to_save: null     #   modules trained in full and saved beside the adapter (e.g. [lm_head])
    # bias: none                #   none | all | lora_only
    # use_rslora: false
    # use_dora: false
    # merge: false              #   also save the merged model (base + adapter) in <output.dir>/merged
data:
  path: data.jsonl              # JSON Lines (or a dataset saved with save_to_disk)
  prefix: "<think>\\n"           # the response prefix; a rendered file's own `prefix` column wins
  template: null                # chat template spec for raw data; default: the tokenizer's own template
  format: auto                  # raw-data format (see `prefill-kit render --help`)
  continue_final: false         # render options, as for `prefill-kit render`
  template_kwargs: {}
  shuffle: true                 # shuffle prompts each epoch (seeded by train.seed)
  few_shot: null                # worked examples before each raw row, as `prefill-kit render --few-shot`:
                                #   {path: examples.jsonl, shots: 4, seed: 0, mode: turns}  (mode: turns | system)
  eval_path: null               # held-out prompts, rendered like `path`; never trained on. Needs train.eval_steps
rewards:                        # a spec string "format,accuracy:2.0" or a list of {name, weight, ...params}
  - {name: format, weight: 1.0}
grpo:
  num_generations: 8            # completions per prompt (>= 2)
  max_completion_length: 256
  temperature: 1.0
  top_p: 1.0
  top_k: 0                      # 0 disables top-k
  beta: 0.0                     # KL coefficient; > 0 loads a frozen reference model
  loss_type: dapo               # dapo | grpo | bnpo | dr_grpo | cispo | sapo | luspo (TRL 1.16's formulas)
  importance_sampling_level: token  # token | sequence (GSPO: one length-normalised ratio per completion)
  epsilon: 0.2
  epsilon_high: null            # default: epsilon; for cispo the clamp of the ratio itself (ScaleRL: 5.0)
  sapo_temperature_pos: 1.0     # sapo: gate temperature where the advantage is > 0
  sapo_temperature_neg: 1.05    # sapo: ... where it is <= 0
  scale_rewards: group          # group | batch | none
  num_iterations: 1             # optimizer steps per generated batch
  mask_truncated_completions: false
  eval_num_generations: 1       # completions per eval prompt
  eval_temperature: null        # sampling temperature of eval completions; default: grpo.temperature
train:
  learning_rate: 1.0e-6
  per_device_train_batch_size: 8   # completions, a multiple of grpo.num_generations
  gradient_accumulation_steps: 1
  max_steps: 100                # optimizer steps
  warmup_steps: 0
  lr_scheduler_type: linear     # linear | cosine | constant | constant_with_warmup
  weight_decay: 0.0
  adam_beta1: 0.9
  adam_beta2: 0.999
  adam_epsilon: 1.0e-8
  max_grad_norm: 1.0            # 0 disables clipping
  seed: 42
  bf16: false                   # bf16 mixed precision (autocast)
  gradient_checkpointing: false
  eval_steps: 0                 # with data.eval_path: evaluate every N optimizer steps (N >= 1) and after the last
output:
  dir: runs/my-run
  logging_steps: 1
  save_steps: 500               # 0 disables intermediate checkpoints
  resume_from: null             # a checkpoint directory, or a run directory (its latest checkpoint)
  overwrite: false              # delete an earlier run in `dir` first (`train --overwrite`); else a fresh run
                                #   refuses a directory that holds another run's files
  log_completions_steps: 10     # completions.jsonl gets step 1 and every N-th step's completions; 0: none
  log_completions_max: 64       # at most this many completions per logged step (whole prompt groups first)
  report_to: []                 # trackers that get every metrics.jsonl row: tensorboard | wandb | mlflow | trackio
  project: prefill-kit          # the tracker's project (wandb, trackio) or experiment (mlflow)
  run_name: null                # the tracker's run name (wandb, trackio, mlflow); default: output.dir's last part
rollout:                        # multi-turn tool rollouts (builtin backend), in TRL's conventions; off by default
  tools: []                     # tool functions as "module:function" (typed, with a docstring: their JSON schema)
  environment: null             # "module:Factory": one instance per rollout; reset(**row) returns None or text to
                                #   append to the last user message; its public methods are tools; get_reward(),
                                #   when defined, is an extra reward named after the class (weight 1)
  max_turns: 8                  # assistant turns per rollout at most
  tool_timeout: 10.0            # seconds a tool call may run; past it, the call is an error tool message
  thinking_history: keep        # keep | split: a rollout whose template rewrites earlier turns stays one sample
                                #   (keep), or becomes one sample per turn from the rewrite on (split)
trl: {}                         # trl backend only: extra GRPOConfig options, e.g. {use_vllm: true}
```

Relative paths are relative to the working directory, as on the command line. Numbers read as YAML 1.2 reads
them: `1e-5`, `1E-5`, `.5` and `5.` are floats, in the file and in `--set` (PyYAML alone reads `1e-5` as a string).
Every option is a plain value so that the TRL backend can map it to its `GRPOConfig` name; an option a
backend does not support is that backend's error, not a silent no-op.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prefill_kit.errors import ConfigError

BACKENDS = ("builtin", "trl")
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")  # output.report_to; see prefill_kit.runs.trackers
REQUIRED = object()  # marks a field with no default; dataclasses need a default to keep the order free


def _field(default: Any = REQUIRED, *, help: str = "", **checks: Any) -> Any:
    """A dataclass field with validation metadata: `min`/`max` bounds, `exclusive_min` for a strict `min`."""
    kwargs = {"default_factory": default} if callable(default) else {"default": default}
    return field(**kwargs, metadata={"help": help, **checks})


@dataclass
class LoraSection:
    """`model.lora`: peft's LoraConfig under short names (see `prefill_kit.backends.lora`)."""

    r: int = _field(8, min=1)
    alpha: float = _field(8.0, min=0.0, exclusive_min=True)
    dropout: float = _field(0.0, min=0.0, max=1.0)
    target_modules: list | str | None = None
    modules_to_save: list | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False
    merge: bool = False


@dataclass
class ModelSection:
    path: str = _field()
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    tokenizer: str | None = None
    lora: LoraSection | None = None  # None: full fine-tuning


@dataclass
class FewShotSection:
    path: str = _field()
    shots: int = _field(4, min=1)
    seed: int = 0
    mode: Literal["turns", "system"] = "turns"


@dataclass
class DataSection:
    path: str = _field()
    prefix: str = ""
    template: str | None = None
    format: str = "auto"
    continue_final: bool = False
    template_kwargs: dict = _field(dict)
    shuffle: bool = True
    few_shot: FewShotSection | None = None
    eval_path: str | None = None


@dataclass
class GRPOSection:
    num_generations: int = _field(8, min=2)
    max_completion_length: int = _field(256, min=1)
    temperature: float = _field(1.0, min=0.0, exclusive_min=True)
    top_p: float = _field(1.0, min=0.0, exclusive_min=True, max=1.0)
    top_k: int = _field(0, min=0)
    beta: float = _field(0.0, min=0.0)
    loss_type: Literal["dapo", "grpo", "bnpo", "dr_grpo", "cispo", "sapo", "luspo"] = "dapo"
    importance_sampling_level: Literal["token", "sequence"] = "token"
    epsilon: float = _field(0.2, min=0.0)
    epsilon_high: float | None = _field(None, min=0.0)
    sapo_temperature_pos: float = _field(1.0, min=0.0, exclusive_min=True)
    sapo_temperature_neg: float = _field(1.05, min=0.0, exclusive_min=True)
    scale_rewards: Literal["group", "batch", "none"] = "group"
    num_iterations: int = _field(1, min=1)
    mask_truncated_completions: bool = False
    eval_num_generations: int = _field(1, min=1)
    eval_temperature: float | None = _field(None, min=0.0, exclusive_min=True)


@dataclass
class TrainSection:
    learning_rate: float = _field(1e-6, min=0.0)
    per_device_train_batch_size: int = _field(8, min=1)
    gradient_accumulation_steps: int = _field(1, min=1)
    max_steps: int = _field(100, min=1)
    warmup_steps: int = _field(0, min=0)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    weight_decay: float = _field(0.0, min=0.0)
    adam_beta1: float = _field(0.9, min=0.0, max=1.0)
    adam_beta2: float = _field(0.999, min=0.0, max=1.0)
    adam_epsilon: float = _field(1e-8, min=0.0)
    max_grad_norm: float = _field(1.0, min=0.0)
    seed: int = _field(42, min=0)
    bf16: bool = False
    gradient_checkpointing: bool = False
    eval_steps: int = _field(0, min=0)


@dataclass
class OutputSection:
    dir: str = _field()
    logging_steps: int = _field(1, min=1)
    save_steps: int = _field(500, min=0)
    resume_from: str | None = None
    overwrite: bool = False
    log_completions_steps: int = _field(10, min=0)
    log_completions_max: int = _field(64, min=1)
    report_to: list = _field(list)
    project: str = "prefill-kit"
    run_name: str | None = None


@dataclass
class RolloutSection:
    """`rollout`: multi-turn tool rollouts; on when `tools` or `environment` is set (see `prefill_kit.grpo.tools`)."""

    tools: list = _field(list)
    environment: str | None = None
    max_turns: int = _field(8, min=1)
    tool_timeout: float = _field(10.0, min=0.0, exclusive_min=True)
    thinking_history: Literal["keep", "split"] = "keep"

    @property
    def multi_turn(self) -> bool:
        return bool(self.tools or self.environment)


@dataclass
class TrainingConfig:
    """A validated training config. Build it with `load_config` or `config_from_dict`."""

    model: ModelSection = _field()
    data: DataSection = _field()
    output: OutputSection = _field()
    backend: Literal["builtin", "trl"] = "builtin"
    rewards: list | str = _field(list)
    grpo: GRPOSection = _field(GRPOSection)
    train: TrainSection = _field(TrainSection)
    rollout: RolloutSection = _field(RolloutSection)
    # Extra TRL `GRPOConfig` options with no prefill-kit equivalent (use_vllm, deepspeed, ...). Only the
    # trl backend takes them; the built-in backend rejects a non-empty section rather than ignore it.
    trl: dict = _field(dict)

    @property
    def prompts_per_device_step(self) -> int:
        """Prompts one process generates for per optimizer step (each gets `num_generations` completions)."""
        return (self.train.per_device_train_batch_size * self.train.gradient_accumulation_steps
                // self.grpo.num_generations)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> TrainingConfig:
    """Read a YAML config, apply `key.sub=value` overrides, validate. ConfigError names file and key."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        raw = parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    overrides = list(overrides)
    try:
        return config_from_dict(apply_overrides(raw, overrides))
    except ConfigError as exc:
        for item in reversed(overrides):  # a key a --set wrote (the last one wins): blame it, not the file
            key = item.partition("=")[0].strip()
            if key and str(exc).startswith((f"{key}:", f"{key}[")):
                raise ConfigError(f"--set {item!r} (over {path}): {exc}") from None
        raise ConfigError(f"{path}: {exc}") from None


# YAML 1.2's float spellings that YAML 1.1 (PyYAML) does not resolve: an exponent without a dot (`1e-5`,
# `3E+2`), and a mantissa with nothing after the dot (`5.e-3`). PyYAML's own resolver still takes the rest.
_YAML12_FLOAT = r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"


def parse_yaml(text: str) -> Any:
    """`yaml.safe_load`, but every float spelling is a float: `learning_rate: 1e-5` must not be a string."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(_YAML12_FLOAT), list("-+0123456789."))
    return yaml.load(text, Loader=Loader)  # a SafeLoader: plain data only


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of `raw` with each `key.sub=value` set; the value is parsed as YAML (`0.5`, `true`, `null`, `[..]`),
    except `data.prefix`, which is decoded as `--prefix` is (`decode_escapes`)."""
    import copy

    import yaml

    from prefill_kit.prompts.render import decode_escapes

    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected key.sub=value")
        try:
            parsed = parse_yaml(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        if key == "data.prefix":  # typed like --prefix on the command line: the same escapes, nothing else
            parsed = decode_escapes(value)
        node = out
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:depth + 1])} is not a section")
            node = child
        node[parts[-1]] = parsed
    return out


def config_from_dict(raw: dict[str, Any]) -> TrainingConfig:
    """Validate a plain dict (as read from YAML) into a TrainingConfig; ConfigError names the bad key."""
    config = _build(TrainingConfig, raw, "")
    _check_rewards(config.rewards)
    lora = config.model.lora
    if lora is not None:
        for key in ("target_modules", "modules_to_save"):
            names = getattr(lora, key)
            if isinstance(names, list) and not all(isinstance(n, str) and n for n in names):
                raise ConfigError(f"model.lora.{key}: expected a list of module names, got {_show(names)}")
    g, t = config.grpo, config.train
    if t.per_device_train_batch_size % g.num_generations:
        raise ConfigError(f"train.per_device_train_batch_size: {t.per_device_train_batch_size} completions is not a "
                          f"multiple of grpo.num_generations ({g.num_generations}); the completions of a prompt must "
                          "stay in one batch")
    if t.warmup_steps > t.max_steps:
        raise ConfigError(f"train.warmup_steps: {t.warmup_steps} is more than train.max_steps ({t.max_steps})")
    _check_report_to(config.output.report_to)
    _check_eval(config)
    _check_rollout(config.rollout)
    return config


def _check_rollout(rollout: RolloutSection) -> None:
    """Spelling only (`module:function`); importing them is `prefill_kit.grpo.tools.load_tools`."""
    for i, spec in enumerate(rollout.tools):
        if not _is_import_spec(spec):
            raise ConfigError(f"rollout.tools[{i}]: expected \"module:function\", got {_show(spec)}")
    if rollout.environment is not None and not _is_import_spec(rollout.environment):
        raise ConfigError(f"rollout.environment: expected \"module:Factory\", got {_show(rollout.environment)}")


def _is_import_spec(spec: Any) -> bool:
    module, sep, name = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    return bool(sep) and all(p.isidentifier() for p in module.split(".")) and name.isidentifier()


def _check_report_to(report_to: list) -> None:
    """Names only; whether each tracker's package is installed is `prefill_kit.runs.trackers.check_trackers`."""
    for i, name in enumerate(report_to):
        if name not in TRACKERS:
            raise ConfigError(f"output.report_to[{i}]: unknown tracker {_show(name)}; known: {', '.join(TRACKERS)}")
    if len(set(report_to)) != len(report_to):
        raise ConfigError(f"output.report_to: a tracker is listed twice: {report_to}")


def _check_eval(config: TrainingConfig) -> None:
    """Evaluation needs both its data and its schedule: one without the other would silently do nothing."""
    if config.data.eval_path and not config.train.eval_steps:
        raise ConfigError("train.eval_steps: data.eval_path is set, so say how often to evaluate (N >= 1)")
    if config.train.eval_steps and not config.data.eval_path:
        raise ConfigError(f"data.eval_path: train.eval_steps is {config.train.eval_steps} but there is no eval data")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_show(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key; known keys: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in raw:
            if f.default is REQUIRED:
                raise ConfigError(f"{key}: required")
            continue
        tp = hints[name]
        optional = _optional_section(tp)
        if optional is not None:  # an optional section: null (or absent) turns it off
            values[name] = None if raw[name] is None else _build(optional, raw[name], key + ".")
        elif dataclasses.is_dataclass(tp):
            values[name] = _build(tp, raw[name] if raw[name] is not None else {}, key + ".")
        else:
            values[name] = _check_value(raw[name], tp, key, f.metadata)
    return cls(**values)


def _optional_section(tp: Any) -> type | None:
    """The section class of an `X | None` field whose X is a section (a dataclass); None for any other type."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return None
    inner = [a for a in typing.get_args(tp) if a is not type(None)]
    return inner[0] if len(inner) == 1 and dataclasses.is_dataclass(inner[0]) else None


def _show(value: Any) -> str:
    return "null" if value is None else repr(value)


def _check_value(value: Any, tp: Any, key: str, checks: dict) -> Any:
    """Check `value` against type `tp` and the bounds in `checks`; returns the value, ints widened to float."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _check_value(value, inner[0], key, checks)
        for candidate in inner:
            try:
                return _check_value(value, candidate, key, checks)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a, {}) for a in inner)}, got {_show(value)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(map(str, choices))}, got {_show(value)}")
        return value
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        dict: lambda v: isinstance(v, dict),
        list: lambda v: isinstance(v, list),
    }[origin or tp](value)
    if ok and tp in (int, float):
        low, high, strict = checks.get("min"), checks.get("max"), checks.get("exclusive_min", False)
        ok = (low is None or (value > low if strict else value >= low)) and (high is None or value <= high)
    if not ok:
        raise ConfigError(f"{key}: expected {_type_name(tp, checks)}, got {_show(value)}")
    return float(value) if tp is float else value


def _type_name(tp: Any, checks: dict) -> str:
    low, high, strict = checks.get("min"), checks.get("max"), checks.get("exclusive_min", False)
    if tp is int:
        if low == 1:
            return "a positive integer"
        if low == 0:
            return "a non-negative integer"
        return f"an integer >= {low}" if low is not None else "an integer"
    if tp is float:
        if low is not None and high is not None:
            return f"a number in {'(' if strict else '['}{low}, {high}]"
        if low is not None:
            return f"a number {'>' if strict else '>='} {low}"
        return "a number"
    return {bool: "true or false", str: "a string", dict: "a mapping", list: "a list"}.get(tp, str(tp))


def _check_rewards(rewards: list | str) -> None:
    """Shape only: names and weights. The rewards registry checks that names and params exist."""
    if isinstance(rewards, str):
        return
    for i, item in enumerate(rewards):
        key = f"rewards[{i}]"
        if isinstance(item, str):
            continue
        if not isinstance(item, dict):
            raise ConfigError(f"{key}: expected a mapping with `name` (and `weight`), got {_show(item)}")
        if not isinstance(item.get("name"), str) or not item["name"]:
            raise ConfigError(f"{key}.name: expected a reward name, got {_show(item.get('name'))}")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ConfigError(f"{key}.weight: expected a number, got {_show(weight)}")
