"""Automatic tagging and captioning (``loraforge tag``).

- WD14-family ONNX taggers (:mod:`.onnx_tagger`, preprocessing in :mod:`.preprocess`),
- transformers image-to-text captioners (:mod:`.captioner`),
- pure tag clean-up helpers (:mod:`.cleanup`, :mod:`.compose`),
- the tag frequency report that training metadata reuses as ``ss_tag_frequency``
  (:mod:`.frequency`),
- the resumable batched run (:mod:`.runner`).

Importing this package imports numpy and Pillow, never torch, transformers or onnxruntime.
"""

from loraforge.tagging.annotator import Annotator, load_annotator
from loraforge.tagging.cleanup import (
    dedupe_tags,
    join_caption,
    merge_tags,
    move_to_front,
    prepend_tags,
    remove_tags,
    replace_tags,
    replace_words,
    sort_scored,
    split_caption,
    tag_key,
)
from loraforge.tagging.compose import (
    ScoredTags,
    compose_caption,
    finish_tags,
    order_tags,
    select_tags,
)
from loraforge.tagging.frequency import (
    merge_frequencies,
    read_frequency_report,
    tag_frequency,
    tag_frequency_by_folder,
    write_frequency_report,
)
from loraforge.tagging.labels import KAOMOJIS, TagLabels, display_name, read_selected_tags
from loraforge.tagging.preprocess import wd14_array, wd14_batch
from loraforge.tagging.runner import (
    Problem,
    TagFolder,
    TagPlan,
    TagRunResult,
    plan_tagging,
    run_tagging,
)
from loraforge.tagging.sources import FolderSelection, folder_from_path, folders_from_dataset

__all__ = [
    "KAOMOJIS",
    "Annotator",
    "FolderSelection",
    "Problem",
    "ScoredTags",
    "TagFolder",
    "TagLabels",
    "TagPlan",
    "TagRunResult",
    "compose_caption",
    "dedupe_tags",
    "display_name",
    "finish_tags",
    "folder_from_path",
    "folders_from_dataset",
    "join_caption",
    "load_annotator",
    "merge_frequencies",
    "merge_tags",
    "move_to_front",
    "order_tags",
    "plan_tagging",
    "prepend_tags",
    "read_frequency_report",
    "read_selected_tags",
    "remove_tags",
    "replace_tags",
    "replace_words",
    "run_tagging",
    "select_tags",
    "sort_scored",
    "split_caption",
    "tag_frequency",
    "tag_frequency_by_folder",
    "tag_key",
    "wd14_array",
    "wd14_batch",
    "write_frequency_report",
]
