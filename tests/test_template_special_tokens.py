"""A template always gets the tokenizer's special tokens, however it is named (issue 18, item 2).

`--template FILE --tokenizer DIR` used to hand the template the tokenizer's added tokens but not its
`bos_token`: Llama-3.1's `{{- bos_token }}` then rendered nothing (a training run without BOS, silently), and
Llama-3's `bos_token + content` failed on every row. With a tokenizer that writes BOS, every path (a file,
a shipped name, a directory, the tokenizer's own template) must give prompt ids with exactly one BOS, first.
"""

from __future__ import annotations

import shutil
from importlib import resources

import pytest

from prefill_kit.data.readers import Record
from prefill_kit.prompts.batch import BatchRenderer
from prefill_kit.prompts.options import RenderOptions, resolve_template
from prefill_kit.templates import available_templates, load_template
from prefill_kit.tiny_model import build_tokenizer
from tests.conftest import REFERENCE_ABSENT, SHARED_REFERENCE

# Meta-Llama-3-8B-Instruct's template (tokenizer_config.json, 2024-04): BOS is *added* to the first turn's text,
# so an undefined bos_token is an error, not an empty string.
LLAMA3_OFFICIAL = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# The BOS each shipped template writes by default (its `bos_token | default(...)`); None: the family has none.
SHIPPED_BOS = {"llama3": "<|begin_of_text|>", "mistral": "<s>", "gemma": "<bos>",
               "deepseek-r1": "<｜begin▁of▁sentence｜>"}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]


def _ids(template, tokenizer) -> tuple[str, list[int]]:
    options = RenderOptions(resolve_template(template, tokenizer), "<think>\n", tokenizer=tokenizer)
    result = BatchRenderer(options, "messages")([Record("t", "line", 1, {"messages": MESSAGES}, index=0)])
    assert not result.rejects, result.rejects
    row = result.rows[0]
    return row["prompt"], row["prompt_ids"]


def _paths(tmp_path, source: str, tokenizer_dir, name: str | None = None) -> dict[str, object]:
    """The template named every way a user can name it, each with the tokenizer (BOS-adding) from `tokenizer_dir`."""
    file = tmp_path / "template.jinja"
    file.write_text(source, encoding="utf-8")
    bare = tmp_path / "bare"  # a directory with only chat_template.jinja (no tokenizer_config.json)
    bare.mkdir()
    shutil.copy(file, bare / "chat_template.jinja")
    paths = {"file": str(file), "directory": str(bare), "tokenizer's own": None}
    if name is not None:
        paths["shipped name"] = name
    return paths


def _bos_tokenizer(tmp_path, source: str, bos: str):
    from transformers import AutoTokenizer

    out = tmp_path / "tokenizer"
    build_tokenizer(chat_template=source, add_bos=True, bos_token=bos).save_pretrained(out)
    return AutoTokenizer.from_pretrained(out), out


def _assert_one_bos(tmp_path, source: str, bos: str, name: str | None = None) -> None:
    tokenizer, tokenizer_dir = _bos_tokenizer(tmp_path, source, bos)
    bos_id = tokenizer.convert_tokens_to_ids(bos)
    prompts = {}
    for path, template in _paths(tmp_path, source, tokenizer_dir, name).items():
        prompt, ids = _ids(template, tokenizer)
        assert ids.count(bos_id) == 1 and ids[0] == bos_id, (path, ids[:4])
        assert prompt.startswith(bos) and prompt.count(bos) == 1, (path, prompt[:40])
        prompts[path] = prompt
    assert len(set(prompts.values())) == 1, prompts


@pytest.mark.parametrize("name", sorted(SHIPPED_BOS))
def test_shipped_bos_templates_write_one_bos_on_every_path(tmp_path, name):
    source = resources.files("prefill_kit.templates").joinpath(f"{name}.jinja").read_text(encoding="utf-8")
    _assert_one_bos(tmp_path, source, SHIPPED_BOS[name], name)


@pytest.mark.parametrize("name", sorted(set(available_templates()) - set(SHIPPED_BOS)))
def test_templates_without_bos_write_none_with_a_bos_tokenizer(tmp_path, name):
    """A ChatML-style family writes no BOS; a BOS-adding tokenizer must not slip one into prompt_ids."""
    tokenizer, _ = _bos_tokenizer(tmp_path, load_template(name).source, "<s>")
    prompt, ids = _ids(name, tokenizer)
    assert tokenizer.convert_tokens_to_ids("<s>") not in ids and "<s>" not in prompt


def test_llama3_official_file_gets_bos_instead_of_failing(tmp_path):
    _assert_one_bos(tmp_path, LLAMA3_OFFICIAL, "<|begin_of_text|>")


@pytest.mark.skipif(not (SHARED_REFERENCE / "templates").is_dir(), reason=REFERENCE_ABSENT)
def test_llama31_official_file_writes_bos(tmp_path):
    source = (SHARED_REFERENCE / "templates" / "llama-3.1-instruct.jinja").read_text(encoding="utf-8")
    _assert_one_bos(tmp_path, source, "<|begin_of_text|>", "llama3")


def test_the_tokenizers_special_tokens_win_over_a_template_directorys(tmp_path):
    """A template directory's tokenizer_config.json names its own tokens; the tokenizer given encodes the prompt,
    so its tokens are the ones written (as transformers does when the template is set on that tokenizer)."""
    other = tmp_path / "other"
    build_tokenizer(chat_template=LLAMA3_OFFICIAL, add_bos=True, bos_token="<s>").save_pretrained(other)
    tokenizer, _ = _bos_tokenizer(tmp_path, LLAMA3_OFFICIAL, "<|begin_of_text|>")
    assert load_template(other).special_tokens["bos_token"] == "<s>"
    assert resolve_template(str(other), tokenizer).special_tokens["bos_token"] == "<|begin_of_text|>"
