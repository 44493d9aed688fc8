"""Shared fixtures: everything is built locally, nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_REFERENCE = REPO.parent / "shared" / "reference"
# Why a test that compares with an official file skips (the README says how many do).
REFERENCE_ABSENT = "../shared/reference is absent: it holds official files that prefill-kit does not ship"


def free_port() -> str:
    """A free local TCP port for a multi-process run, so that parallel test runs do not collide on 29500."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models are fastest single-threaded; on a busy 2-core box two threads can be 100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def chatml():
    from prefill_kit.templates import load_template

    return load_template("chatml")


@pytest.fixture(scope="session")
def tiny_tokenizer(chatml):
    """The tiny BPE tokenizer with the chatml template (no BOS)."""
    from prefill_kit.tiny_model import build_tokenizer

    return build_tokenizer(chat_template=chatml.source)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 model with the chatml template (tokenizer adds no BOS)."""
    from prefill_kit.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny"), context=512)  # short: over-long prompts are cheap to reach


@pytest.fixture(scope="session")
def bos_template() -> str:
    """A Llama-style template that writes BOS itself."""
    return ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def bos_tokenizer_dir(tmp_path_factory, bos_template) -> Path:
    """A tokenizer that prepends BOS on `add_special_tokens=True` and whose template writes BOS too."""
    from prefill_kit.tiny_model import build_tokenizer

    out = tmp_path_factory.mktemp("bos_tok")
    build_tokenizer(chat_template=bos_template, add_bos=True).save_pretrained(out)
    return out
