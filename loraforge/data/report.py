"""The bucket report behind ``loraforge bucket``: plain, JSON-ready data. Torch-free.

Shape (``--format json`` prints exactly this)::

    {"settings": {...bucket settings...},
     "totals": {"images", "train_images", "reg_images", "samples_per_epoch", "batch_size",
                "gradient_accumulation_steps", "batches_per_epoch", "steps_per_epoch",
                "mean_aspect_error", "skipped", "validation_images"},
     "buckets": [{"width", "height", "images", "samples", "batches", "mean_aspect_error"}],
     "images": [{"path", "subset", "is_reg", "repeats", "width", "height", "bucket": [w, h],
                 "resized": [w, h], "crop": [left, top, right, bottom] | null,
                 "random_crop", "aspect_error", "caption_source"}],
     "validation": [{...as images, without repeats...}],
     "skipped": [{"path", "reason"}], "caption_issues": [{"path", "reason"}],
     "unused_reg_images": [path], "warnings": [text], "searched": [folder]}

``crop`` is the centre crop box in the resized image; ``null`` for subsets with
``random_crop`` (the box is drawn per step). ``validation`` lists the held-out images
(``dataset.validation_split``, ``is_validation`` subsets), which are in no bucket's samples and
always use the centre crop.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from loraforge.data.discovery import Discovery
from loraforge.data.plan import BucketPlan, PlannedImage


def bucket_report(
    discovery: Discovery,
    plan: BucketPlan,
    batch_size: int = 1,
    gradient_accumulation_steps: int = 1,
) -> dict[str, Any]:
    """Summarise a bucket plan for people and machines.

    Args:
        discovery: what discovery found.
        plan: the bucket plan made from it.
        batch_size: the training batch size (steps per epoch depend on it).
        gradient_accumulation_steps: batches per optimizer step.

    Returns:
        A JSON-serialisable dict (see the module docstring).
    """
    skipped = [*discovery.skipped, *plan.skipped]
    return {
        "settings": {
            **asdict(plan.settings),
            "resolution": list(plan.settings.resolution),
        },
        "totals": {
            "images": len(plan.images),
            "train_images": sum(not p.record.is_reg for p in plan.images),
            "reg_images": sum(p.record.is_reg for p in plan.images),
            "samples_per_epoch": plan.num_samples,
            "batch_size": batch_size,
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "batches_per_epoch": plan.batches_per_epoch(batch_size),
            "steps_per_epoch": plan.steps_per_epoch(batch_size, gradient_accumulation_steps),
            "mean_aspect_error": plan.mean_aspect_error,
            "skipped": len(skipped),
            "validation_images": len(plan.validation),
        },
        "buckets": [
            {
                "width": bucket.resolution[0],
                "height": bucket.resolution[1],
                "images": len(bucket.images),
                "samples": bucket.samples,
                "batches": bucket.batches(batch_size),
                "mean_aspect_error": bucket.mean_aspect_error,
            }
            for bucket in plan.buckets
        ],
        "images": [_image_entry(p, discovery) for p in plan.images],
        "validation": [_image_entry(p, discovery, validation=True) for p in plan.validation],
        "skipped": [{"path": str(i.path), "reason": i.reason} for i in skipped],
        "caption_issues": [
            {"path": str(i.path), "reason": i.reason} for i in discovery.caption_issues
        ],
        "unused_reg_images": [str(p) for p in discovery.unused_reg_images],
        "warnings": list(discovery.warnings),
        "searched": [str(p) for p in discovery.searched],
    }


def _image_entry(
    planned: PlannedImage, discovery: Discovery, *, validation: bool = False
) -> dict[str, Any]:
    record, assignment = planned.record, planned.assignment
    random_crop = discovery.subsets[record.subset].config.random_crop and not validation
    crop = None
    if not random_crop:
        left, top = assignment.center_crop()
        crop = [left, top, left + assignment.bucket[0], top + assignment.bucket[1]]
    entry = {
        "path": str(record.path),
        "subset": record.subset,
        "is_reg": record.is_reg,
        "repeats": record.repeats,
        "width": record.size[0],
        "height": record.size[1],
        "bucket": list(assignment.bucket),
        "resized": list(assignment.resized),
        "crop": crop,
        "random_crop": random_crop,
        "aspect_error": assignment.aspect_error,
        "caption_source": record.caption_source,
    }
    if validation:
        del entry["repeats"], entry["is_reg"]
    return entry


def skipped_summary(skipped: list[Any] | tuple[Any, ...], shown: int = 3) -> str | None:
    """One line for commands that do not list files (``train``, ``cache``): how many image files
    are skipped, the first few with their reason, and where the full list is; ``None`` if none.
    """
    if not skipped:
        return None
    first = "; ".join(f"{issue.path.name}: {issue.reason}" for issue in skipped[:shown])
    more = f"; and {len(skipped) - shown} more" if len(skipped) > shown else ""
    return (
        f"{len(skipped)} image file(s) skipped ({first}{more}); "
        "`loraforge bucket RECIPE --verify` lists them all"
    )
