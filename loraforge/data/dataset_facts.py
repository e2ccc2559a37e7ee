"""Dataset facts for LoRA file metadata, computed the way sd-scripts computes them.

``ss_tag_frequency``: per image folder (its base name), how many captions contain each tag
(tags split on ``","``, stripped, lower-cased; counted from the raw captions, reg included).
``ss_bucket_info``: ``{"buckets": {i: {"resolution": [w, h], "count": samples}},
"mean_img_ar_error": e}``. A huge tag frequency is cut to each folder's most frequent tags
(:func:`capped_tag_frequency`) so the file header stays small. Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from loraforge.data.discovery import Discovery
from loraforge.data.plan import BucketPlan


def count_tags(captions: Iterable[str], separator: str = ",") -> dict[str, int]:
    """How many captions contain each tag, the way sd-scripts counts for ``ss_tag_frequency``.

    Args:
        captions: caption texts, one per image.
        separator: what separates tags (``,`` for the training metadata, as sd-scripts splits).

    Returns:
        ``{tag: count}``, tags stripped and lower-cased, most frequent first (ties by tag).
    """
    counts: dict[str, int] = {}
    sep = separator.strip() or separator
    for caption in captions:
        for piece in caption.split(sep):
            tag = piece.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def tag_frequency(discovery: Discovery) -> dict[str, dict[str, int]]:
    """sd-scripts' ``ss_tag_frequency`` for the discovered images (folders of the same name add up).

    Unused regularization images are not counted (sd-scripts counts every file of a folder;
    here only images training sees).
    """
    captions: dict[str, list[str]] = {}
    for image in discovery.images:
        captions.setdefault(discovery.subsets[image.subset].dir.name, []).append(image.caption)
    return {folder: count_tags(texts) for folder, texts in captions.items()}


def bucket_info(plan: BucketPlan) -> dict[str, Any]:
    """sd-scripts' ``ss_bucket_info`` (only when bucketing is enabled in sd-scripts)."""
    return {
        "buckets": {
            str(i): {"resolution": list(bucket.resolution), "count": bucket.samples}
            for i, bucket in enumerate(plan.buckets)
        },
        "mean_img_ar_error": plan.mean_aspect_error,
    }


#: the most JSON ``ss_tag_frequency`` may take (it is written twice: also in ``ss_datasets``), so
#: the header stays well under the 1 MiB ComfyUI's metadata view reads
TAG_FREQUENCY_BUDGET = 128 * 1024


def capped_tag_frequency(
    frequency: Mapping[str, Mapping[str, int]], budget: int = TAG_FREQUENCY_BUDGET
) -> tuple[Mapping[str, Mapping[str, int]], str | None]:
    """``frequency`` itself when its JSON fits ``budget`` characters, else each folder's most
    frequent tags (the same number per folder, as many as fit), with a note saying what was kept.

    Returns:
        the (possibly cut) frequency, and the note (``None`` when nothing was cut).
    """
    if _json_size(frequency) <= budget:
        return frequency, None
    ranked = {
        folder: sorted(tags.items(), key=lambda item: (-item[1], item[0]))
        for folder, tags in frequency.items()
    }

    def top(k: int) -> dict[str, dict[str, int]]:
        return {folder: dict(tags[:k]) for folder, tags in ranked.items()}

    low, high = 0, max((len(tags) for tags in ranked.values()), default=0)
    while low < high:  # the largest k whose cut fits
        k = (low + high + 1) // 2
        low, high = (k, high) if _json_size(top(k)) <= budget else (low, k - 1)
    kept = top(low) if _json_size(top(low)) <= budget else {}
    total = sum(len(tags) for tags in ranked.values())
    count = sum(len(tags) for tags in kept.values())
    note = (
        f"ss_tag_frequency keeps the {low} most frequent tags of each folder "
        f"({count} of {total} tags), so the file's header stays small"
    )
    return kept, note


def _json_size(value: Any) -> int:
    return len(json.dumps(value))
