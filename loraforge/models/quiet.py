"""Keep diffusers' and transformers' progress bars out of loraforge's output.

transformers 5 draws a "Loading weights" bar for every model it loads and a "Writing model shards"
bar for every save. Between loraforge's own progress lines they are noise, and under
``accelerate launch`` every process draws them. Their warnings are left alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def no_hf_progress_bars() -> Iterator[None]:
    """Inside: no diffusers/transformers progress bars (restored afterwards)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    enabled = [library.is_progress_bar_enabled() for library in libraries]
    for library in libraries:
        library.disable_progress_bar()
    try:
        yield
    finally:
        with warnings.catch_warnings():  # the hub warns when HF_HUB_DISABLE_PROGRESS_BARS is set
            warnings.simplefilter("ignore")
            for library, was_enabled in zip(libraries, enabled, strict=True):
                if was_enabled:
                    library.enable_progress_bar()
