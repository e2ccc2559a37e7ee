"""Dataset facts for LoRA file metadata, computed the way sd-scripts computes them.

``ss_tag_frequency``: per image folder (its base name), how many captions contain each tag
(tags split on ``","``, stripped, lower-cased; counted from the raw captions, reg included).
``ss_bucket_info``: ``{"buckets": {i: {"resolution": [w, h], "count": samples}},
"mean_img_ar_error": e}``. Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable
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
