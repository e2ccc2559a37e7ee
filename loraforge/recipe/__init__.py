"""The recipe: YAML (with line/column marks) -> JSON Schema validation -> defaults -> frozen dataclasses."""

from loraforge.recipe.load import (
    Validation,
    errors_found,
    load_recipe,
    parse_recipe_text,
    section_defaults,
    shareable_dict,
    validate_recipe_file,
    validate_recipe_text,
)
from loraforge.recipe.problems import Problem
from loraforge.recipe.schema import load_schema
from loraforge.recipe.types import (
    CacheConfig,
    DatasetConfig,
    LoggingConfig,
    MetadataConfig,
    ModelConfig,
    NetworkConfig,
    OutputConfig,
    Recipe,
    SampleConfig,
    SamplePrompt,
    SubsetConfig,
    TaggingConfig,
    TrainingConfig,
)

__all__ = [
    "CacheConfig",
    "DatasetConfig",
    "LoggingConfig",
    "MetadataConfig",
    "ModelConfig",
    "NetworkConfig",
    "OutputConfig",
    "Problem",
    "Recipe",
    "SampleConfig",
    "SamplePrompt",
    "SubsetConfig",
    "TaggingConfig",
    "TrainingConfig",
    "Validation",
    "errors_found",
    "load_recipe",
    "load_schema",
    "parse_recipe_text",
    "section_defaults",
    "shareable_dict",
    "validate_recipe_file",
    "validate_recipe_text",
]
