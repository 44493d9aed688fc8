"""The training commands show prefill-kit's own progress and warnings, not the libraries' chatter about steps
prefill-kit takes for the user.

Loading the data (datasets: "Generating train split", "Map"), loading and saving weights (transformers: "Loading
weights", "Writing model shards") and checkpointing a model whose output embedding is tied to its input
embedding (accelerate: "Removed shared tensor {'lm_head.weight'} while saving", the expected way to save tied
weights) print lines a user cannot act on. `library_chatter_off` hides exactly those for the length of a
command and restores the libraries' settings after it. Other warnings stay, as does every bar of prefill-kit
and TRL's training bar; `HF_DATASETS_DISABLE_PROGRESS_BARS=0` still shows datasets' bars.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

# accelerate's message when saving a state dict drops one name of a shared tensor; only a tied output embedding
# (`lm_head.weight`, under any wrapper's prefix) is expected, so another shared tensor still warns.
TIED_OUTPUT_EMBEDDING = re.compile(r"Removed shared tensor \{'(?:[\w.]+\.)?lm_head\.weight'\} while saving")
ACCELERATE_SAVE_LOGGER = "accelerate.utils.other"


class _TiedEmbeddingNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not TIED_OUTPUT_EMBEDDING.search(record.getMessage())


@contextlib.contextmanager
def library_chatter_off() -> Iterator[None]:
    """Within the block: no datasets or transformers progress bars, no tied-embedding notice from accelerate."""
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    datasets_were_off = are_progress_bars_disabled()
    transformers_were_on = transformers_logging.is_progress_bar_enabled()
    notice = _TiedEmbeddingNotice()
    save_logger = logging.getLogger(ACCELERATE_SAVE_LOGGER)
    with warnings.catch_warnings():  # the libraries warn instead where an environment variable wins
        warnings.simplefilter("ignore", UserWarning)
        disable_progress_bars()
        transformers_logging.disable_progress_bar()
    save_logger.addFilter(notice)
    try:
        yield
    finally:
        save_logger.removeFilter(notice)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if transformers_were_on:
                transformers_logging.enable_progress_bar()
            if not datasets_were_off:
                enable_progress_bars()
