"""Tools and environments for multi-turn rollouts, in TRL's conventions (GRPOTrainer's `tools`, `environment_factory`).

- `rollout.tools: [module:function, ...]`: plain functions; their JSON schemas (what the template shows the model)
  come from their signatures and docstrings (`transformers.utils.get_json_schema`, as `apply_chat_template` does).
- `rollout.environment: module:Factory`: called with no argument, one instance per rollout. `reset(**row)` starts a
  rollout and returns None or text to append to the last user message; every public method (not `reset`, not
  `get_reward`) is a tool bound to that instance; `get_reward()`, when defined, is an extra reward named after the
  class, weight 1 (TRL's rule), called with `environments=` like any reward.
- A turn's tool calls are parsed by the tokenizer's own response parsing where it has one (`response_schema` /
  `response_template`, as TRL does), else by the Hermes parser (`<tool_call>{json}</tool_call>`).
- A malformed call, an unknown tool, a tool that raises, or one that runs past `rollout.tool_timeout` becomes a tool
  message holding the error (TRL's `{'error': ...}` form); it never stops the run.

Timeouts: an environment's tools share its instance's state, so they cannot run in another process. Calls run in a
daemon worker thread, one per calling thread, reused from call to call (a new thread per call cost more than most
tools do), and each is waited for up to the deadline. A call that overruns is abandoned with its worker: the worker
takes no further call and ends once the tool returns (it is never joined, so it blocks neither the rollout nor
interpreter exit), its eventual result is dropped, and the next call gets a new worker. Python cannot stop a
thread: a tool that spins forever keeps a core busy, so tools must be written to return; the timeout keeps the run
going.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefill_kit.errors import ConfigError

_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def load_object(spec: str, key: str) -> Any:
    """`module:name` -> the object; ConfigError names the config key. The working directory is on the import path
    (as for `python -m`), so a module beside the config imports as it does for the user's own scripts."""
    import os
    import sys

    module_name, _, name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import {module_name!r}: {exc}") from None
    try:
        return getattr(module, name)
    except AttributeError:
        raise ConfigError(f"{key}: module {module_name!r} has no {name!r}") from None


def tool_schema(fn: Callable, key: str) -> dict[str, Any]:
    """The JSON schema the template gets for `fn`, as `apply_chat_template(tools=[fn])` builds it."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as exc:  # noqa: BLE001 - transformers raises its own DocstringParsingException, TypeError
        raise ConfigError(f"{key}: {getattr(fn, '__name__', fn)!r} cannot be described to the model: {exc} (a tool "
                          "needs type hints and a docstring with an Args section)") from None


def environment_methods(instance: Any) -> list[Callable]:
    """An environment's tools: its class's public functions but `reset` and `get_reward` (TRL's rule), bound."""
    return [getattr(instance, name) for name, _ in inspect.getmembers(type(instance), predicate=inspect.isfunction)
            if name not in ("reset", "get_reward") and not name.startswith("_")]


@dataclass
class ToolConfig:
    """The loaded `rollout` section: standalone tools, the environment factory, and the schemas of all tools."""

    tools: list[Callable]
    factory: Callable[[], Any] | None
    schemas: list[dict[str, Any]]
    reward_name: str | None  # the environment class's name when it defines get_reward
    timeout: float = 10.0
    _pool: list[Any] = field(default_factory=list)

    def environments(self, n: int) -> list[Any] | None:
        """`n` environment instances, made once and reused (TRL pools them the same way); None without a factory."""
        if self.factory is None:
            return None
        while len(self._pool) < n:
            self._pool.append(self.factory())
        return self._pool[:n]

    def tool_table(self, environment: Any = None) -> dict[str, Callable]:
        """Name -> callable of the tools one rollout may call: the standalone tools and its environment's methods."""
        table = {fn.__name__: fn for fn in self.tools}
        if environment is not None:
            table.update((m.__name__, m) for m in environment_methods(environment))
        return table


def load_tools(tool_specs: list[str], environment: str | None, timeout: float = 10.0) -> ToolConfig:
    """Import `rollout.tools` and `rollout.environment`, check them, and build the schemas the prompt shows."""
    tools = []
    for i, spec in enumerate(tool_specs):
        fn = load_object(spec, f"rollout.tools[{i}]")
        if not callable(fn):
            raise ConfigError(f"rollout.tools[{i}]: {spec} is not callable")
        tools.append(fn)
    factory, reward_name, methods = None, None, []
    if environment is not None:
        factory = load_object(environment, "rollout.environment")
        try:
            probe = factory()
        except Exception as exc:  # noqa: BLE001 - a user factory: report, do not crash with a traceback
            raise ConfigError(f"rollout.environment: {environment}() raised {type(exc).__name__}: {exc}") from None
        if not callable(getattr(probe, "reset", None)):
            raise ConfigError(f"rollout.environment: {environment} instances must define a callable reset(**row)")
        methods = environment_methods(probe)
        if callable(getattr(probe, "get_reward", None)):
            reward_name = type(probe).__name__
    names = [fn.__name__ for fn in tools + methods]
    if len(set(names)) != len(names):
        twice = sorted(n for n in set(names) if names.count(n) > 1)
        raise ConfigError(f"rollout: two tools share a name ({', '.join(twice)})")
    key = "rollout.tools" if not methods else "rollout.environment"
    schemas = [tool_schema(fn, key) for fn in tools + methods]
    config = ToolConfig(tools, factory, schemas, reward_name, timeout)
    if factory is not None:
        config._pool.append(probe)
    return config


# --- parsing ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """One call the model wrote: `name` and `arguments`, or `error` when the call could not be read."""

    name: str | None
    arguments: dict[str, Any] | None
    error: str | None = None

    def message(self) -> dict[str, Any]:
        """The call as a message's `tool_calls` entry (templates render these)."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_hermes(text: str) -> tuple[str, list[ToolCall]]:
    """`(content, calls)` of a turn's text in the Hermes style: `<tool_call>{"name": ..., "arguments": {...}}
    </tool_call>` blocks (Qwen2.5, Qwen3 and most tool-tuned models). The content is the text before the first
    block; a block whose JSON cannot be read, or a `<tool_call>` never closed, is a malformed call."""
    start = text.find("<tool_call>")
    if start < 0:
        return text, []
    calls = [_hermes_call(block) for block in _HERMES.findall(text)]
    if text.count("<tool_call>") > len(calls):
        calls.append(ToolCall(None, None, "malformed tool call: <tool_call> without </tool_call>"))
    return text[:start].rstrip(), calls


def _hermes_call(block: str) -> ToolCall:
    try:
        data = json.loads(block)
    except ValueError as exc:
        return ToolCall(None, None, f"malformed tool call: invalid JSON ({exc})")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return ToolCall(None, None, "malformed tool call: expected {\"name\": ..., \"arguments\": {...}}")
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    if not isinstance(arguments, dict):
        return ToolCall(data["name"], None, "malformed tool call: arguments must be an object")
    return ToolCall(data["name"], arguments)


def _new_style_parser(tokenizer: Any) -> bool:
    """Whether `tokenizer.parse_response` is transformers' new-style parser (>= 5.13: it reads `response_template`
    and needs `prefix=`), which no longer reads the legacy `response_schema`."""
    return _takes_prefix(type(tokenizer))


@functools.cache
def _takes_prefix(tokenizer_class: type) -> bool:
    """Decided once per tokenizer class: `parse_turn` asks on every sampled turn."""
    parse = getattr(tokenizer_class, "parse_response", None)
    return parse is not None and "prefix" in inspect.signature(parse).parameters


def has_response_parser(tokenizer: Any) -> bool:
    """Whether the tokenizer parses its own responses (TRL's rule): a `response_template` where transformers reads
    it, else a legacy `response_schema` where transformers still reads that."""
    if not callable(getattr(tokenizer, "parse_response", None)):
        return False
    if _new_style_parser(tokenizer):
        return getattr(tokenizer, "response_template", None) is not None
    return getattr(tokenizer, "response_schema", None) is not None


def parse_turn(tokenizer: Any, ids: list[int], tools: list[dict[str, Any]] | None = None, *,
               prompt_ids: list[int] | None = None, turn_prefix: str = "") -> tuple[dict[str, Any], list[ToolCall]]:
    """The assistant message of one sampled turn (content without the prefix, `tool_calls` when any) and its calls.

    The tokenizer's own response parsing where it has one (TRL's `parse_response` rule: the new-style parser gets
    the ids the turn continued from as `prefix=`, which tells it what the template and the prefix already opened,
    and `tools=`, which types the arguments; a parse failure means the turn is plain text), else Hermes on the
    turn decoded without special tokens. The new-style parser reads the message from the assistant opening on, so
    its content starts with what the prompt wrote after that opening, the turn's effective prefix (`turn_prefix`,
    `<think>\n`), which the model did not sample: it is taken off, as the content is the sampled part only.
    """
    if has_response_parser(tokenizer):
        try:
            if _new_style_parser(tokenizer):
                parsed = tokenizer.parse_response(ids, prefix=list(prompt_ids or []), tools=tools)
                if prompt_ids and isinstance(parsed, dict) and isinstance(parsed.get("content"), str):
                    parsed = {**parsed, "content": parsed["content"].removeprefix(turn_prefix)}
            else:
                parsed = tokenizer.parse_response(ids)
            if parsed is None:
                raise ValueError("nothing parsed")
        except (ValueError, TypeError):
            parsed = {"content": tokenizer.decode(ids, skip_special_tokens=True)}
        content = parsed.get("content") or ""
        if isinstance(content, str) and tokenizer.eos_token:
            content = content.removesuffix(tokenizer.eos_token)
        calls = []
        for call in parsed.get("tool_calls") or []:
            function = call.get("function", {}) if isinstance(call, dict) else {}
            name, arguments = function.get("name"), function.get("arguments")
            calls.append(ToolCall(name, arguments) if isinstance(name, str) and isinstance(arguments, dict)
                         else ToolCall(None, None, f"malformed tool call: {str(call)[:200]}"))
    else:  # the turn's text without its stop token (`<tool_call>` may be an added token: keep added tokens)
        body = ids[:-1] if ids and ids[-1] in set(tokenizer.all_special_ids) else ids
        content, calls = parse_hermes(tokenizer.decode(body, skip_special_tokens=False,
                                                       clean_up_tokenization_spaces=False))
    message: dict[str, Any] = {"role": "assistant", "content": content}
    good = [c.message() for c in calls if c.error is None]
    if good:
        message["tool_calls"] = good
    return message, calls


# --- execution -------------------------------------------------------------------------------------------


def run_tool_calls(calls: list[ToolCall], table: dict[str, Callable], timeout: float
                   ) -> tuple[list[dict[str, Any]], int]:
    """One tool message per call, in order, and how many failed. Never raises on what a tool or the model did."""
    messages, failures = [], 0
    for call in calls:
        name = call.name or "unknown"
        if call.error is not None:
            result, failed = {"error": call.error}, True
        elif call.name not in table:
            result, failed = {"error": f"Tool {call.name} not found."}, True
        else:
            result, failed = call_with_deadline(table[call.name], call.arguments or {}, timeout)
        failures += failed
        messages.append({"role": "tool", "name": name, "content": str(result)})
    return messages, failures


def call_with_deadline(fn: Callable, arguments: dict[str, Any], timeout: float) -> tuple[Any, bool]:
    """`(result, failed)`: `fn(**arguments)` on this thread's tool worker, waited for at most `timeout` seconds
    (module docstring). An exception or an overrun is `({"error": ...}, True)`."""
    worker = getattr(_WORKERS, "worker", None)
    if worker is None:
        worker = _WORKERS.worker = _ToolWorker()
    box: dict[str, Any] = {}
    done = threading.Event()
    worker.jobs.put((fn, arguments, box, done))
    if not done.wait(timeout):
        worker.retire()
        _WORKERS.worker = None  # the next call gets a new worker; this one ends when the tool returns
        return {"error": f"Tool {getattr(fn, '__name__', 'tool')} timed out after {timeout:g} s."}, True
    if "error" in box:
        return {"error": box["error"]}, True
    return box.get("result"), False


class _ToolWorker:
    """A daemon thread running tool calls one after another, until it is retired (its call overran)."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._retired = False
        threading.Thread(target=self._run, name="prefill-kit-tools", daemon=True).start()

    def retire(self) -> None:
        self._retired = True
        self.jobs.put(None)  # wakes it once the overrunning call returns: it takes no further call

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None or self._retired:
                return
            fn, arguments, box, done = job
            try:
                box["result"] = fn(**arguments)
            except BaseException as exc:  # noqa: BLE001 - a tool's failure becomes a message to the model
                box["error"] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            done.set()


_WORKERS = threading.local()
