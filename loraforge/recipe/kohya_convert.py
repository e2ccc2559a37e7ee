"""Converting an sd-scripts ``--config_file`` TOML (with its ``--dataset_config`` TOML and
sample prompt file) or a kohya_ss GUI JSON into a recipe, with what could not be carried over.

Option names come from :data:`loraforge.recipe.kohya.KOHYA_OPTIONS`. kohya_ss writes numbers as
text and 0 or "" for "not set"; both are read as sd-scripts means them.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraforge.recipe.capabilities import TRANSFORMER_NETWORK_ARGS
from loraforge.recipe.kohya import KOHYA_OPTIONS

_NETWORK_MODULES = {
    "networks.lora": "lora",
    "networks.lora_flux": "lora",
    "networks.lora_sd3": "lora",
    "networks.dylora": "dylora",
    "lycoris.kohya": None,
}
_GUI_LORA_TYPES = {
    "standard": "lora",
    "kohya locon": "locon",
    "locon": "locon",
    "lycoris/locon": "locon",
    "kohya dylora": "dylora",
    "lycoris/loha": "loha",
    "lycoris/lokr": "lokr",
    "lycoris/ia3": "ia3",
    "lycoris/diag-oft": "diag-oft",
    "lycoris/boft": "boft",
    "lycoris/glora": "glora",
    "lycoris/native fine-tuning": "full",
    "lora-fa": "lora-fa",
}
_LYCORIS = {"loha", "lokr", "ia3", "diag-oft", "boft", "full", "glora"}
_SAMPLERS = {"ddim", "euler", "euler_a", "dpmsolver++", "dpm_2", "heun", "lms", "pndm"}
_NETWORK_ARG_KEYS = {
    "conv_dim": "conv_dim", "conv_alpha": "conv_alpha", "rank_dropout": "rank_dropout",
    "module_dropout": "module_dropout", "loraplus_lr_ratio": "loraplus_lr_ratio",
    "block_dims": "block_dims", "block_alphas": "block_alphas",
    "conv_block_dims": "conv_block_dims", "conv_block_alphas": "conv_block_alphas",
    "down_lr_weight": "down_lr_weight", "mid_lr_weight": "mid_lr_weight",
    "up_lr_weight": "up_lr_weight",
}  # fmt: skip
_LYCORIS_ARGS = {
    "factor", "decompose_both", "full_matrix", "use_tucker", "use_scalar", "dora_wd",
    "constraint", "rescaled", "block_size", "unit", "train_norm", "preset",
}  # fmt: skip


@dataclass
class Conversion:
    """A recipe made from a kohya config, and what could not be carried over.

    Attributes:
        recipe: the recipe as nested dicts (sections in the usual order).
        unmapped: ``(option, value, why)`` for each option left out.
        notes: conversions worth knowing (a unit changed, a default assumed).
    """

    recipe: dict[str, Any]
    unmapped: list[tuple[str, Any, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _unset(value: Any) -> bool:
    return value is None or value == "" or value == []


def _number(value: Any) -> Any:
    """``"1e-4"`` -> ``0.0001`` (kohya_ss writes numbers as text), ``"8"`` -> ``8``."""
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return value
    return value


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _resolution(value: Any) -> Any:
    if isinstance(value, str):
        numbers = [int(n) for n in re.findall(r"\d+", value)]
        value = numbers[0] if len(numbers) == 1 else numbers
    if isinstance(value, list | tuple) and len(value) == 2 and value[0] == value[1]:
        return int(value[0])
    return list(value) if isinstance(value, list | tuple) else int(value)


def _flow_arg(name: str, text: str) -> Any:
    """A FLUX/SD3 network arg as the recipe types it (``in_dims`` a list, indices a string)."""
    if name == "train_t5xxl":
        return _flag(text)
    if name in ("in_dims", "emb_dims"):
        return [int(v) for v in re.findall(r"\d+", text)]
    if name.endswith("_dim"):
        return int(text)
    return text


def _split_args(value: Any) -> list[str]:
    """``network_args``/``optimizer_args``: a list of ``k=v`` or one space-separated string."""
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return shlex.split(str(value))


def _set(recipe: dict[str, Any], path: str, value: Any) -> None:
    node = recipe
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


class _Converter:
    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.result = Conversion(recipe={})
        self.subset_defaults: dict[str, Any] = {}
        self.subsets: list[dict[str, Any]] = []

    def skip(self, key: str, value: Any, why: str = "loraforge has no such option") -> None:
        self.result.unmapped.append((key, value, why))

    def set(self, path: str, value: Any) -> None:
        _set(self.result.recipe, path, value)

    def option(self, key: str, value: Any, config: Mapping[str, Any]) -> None:
        if _unset(value):
            return
        path = KOHYA_OPTIONS.get(key, "?")
        if path == "?":
            self.skip(key, value, "not an sd-scripts or kohya_ss option loraforge knows")
        elif path is None:
            self.skip(key, value)
        elif key == "dataset_config":
            self.dataset_toml(Path(str(value)))
        elif key in ("train_data_dir", "reg_data_dir"):
            self.subsets.append({"dir": str(value), **({"is_reg": True} if "reg" in key else {})})
        elif path.startswith("dataset.subsets[]."):
            self.subset_defaults[path.rsplit(".", 1)[1]] = _number(value)
        elif key in ("v2", "sdxl"):
            if _flag(value):
                v = _flag(config.get("v_parameterization"))
                self.set("model.family", "sdxl" if key == "sdxl" else ("sd2-v" if v else "sd2"))
        elif key in ("resolution", "max_resolution"):
            self.set("dataset.resolution", _resolution(value))
        elif key.startswith("cache_"):
            self.cache(key, value)
        elif key in ("network_module", "LoRA_type"):
            self.algorithm(key, str(value))
        elif key == "network_args":
            self.network_args(value)
        elif key in ("network_train_unet_only", "network_train_text_encoder_only"):
            if _flag(value):
                self.set(path, False)
        elif key in ("optimizer_type", "optimizer"):
            self.set("training.optimizer", str(value))
        elif key in ("use_8bit_adam", "use_lion_optimizer"):
            if _flag(value):
                self.set("training.optimizer", "AdamW8bit" if "adam" in key else "Lion")
        elif key == "optimizer_args":
            self.optimizer_args(value)
        elif key == "lr_warmup":  # kohya_ss: percent of all steps
            if _number(value):
                self.set("training.lr_warmup_steps", _number(value) / 100)
                self.result.notes.append(
                    f"lr_warmup {value}% -> training.lr_warmup_steps (fraction)"
                )
        elif key in ("xformers", "sdpa", "mem_eff_attn"):
            chosen = {"xformers": "xformers", "sdpa": "sdpa", "mem_eff_attn": "eager"}[key]
            if isinstance(value, str) and value in ("xformers", "sdpa", "none"):
                chosen = {"none": "eager"}.get(value, value)  # kohya_ss: a choice, not a flag
            elif not _flag(value):
                return
            self.set("training.attention", chosen)
        else:
            self.plain(key, value, path)

    def plain(self, key: str, value: Any, path: str) -> None:
        """Options that map to one field, some with a unit or a name to translate."""
        if key == "sample_sampler":
            self.sampler(str(value))
        elif key == "sample_prompts":
            self.prompts(Path(str(value)))
        elif key in ("epoch", "max_train_epochs", "max_train_steps") and _number(value) == 0:
            return  # kohya_ss: 0 is "not set"
        elif key == "log_with":
            if value in ("tensorboard", "none"):
                self.set(path, value)
            else:
                self.skip(key, value, "loraforge logs to tensorboard only")
        elif key == "metadata_tags":
            self.set(path, [t.strip() for t in str(value).split(",") if t.strip()])
        elif key == "lr_scheduler" and value not in (
            "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
            "polynomial",
        ):  # fmt: skip
            self.skip(key, value, "loraforge has no such scheduler")
        else:
            self.set(path, _number(value))

    def cache(self, key: str, value: Any) -> None:
        if not _flag(value):
            return
        section = "latents" if "latents" in key else "text_encoder_outputs"
        current = self.result.recipe.get("cache", {}).get(section)
        mode = "disk" if key.endswith("_to_disk") else "memory"
        self.set(f"cache.{section}", "disk" if "disk" in (current, mode) else mode)

    def algorithm(self, key: str, value: str) -> None:
        if key == "network_module":
            if value not in _NETWORK_MODULES:
                self.skip(
                    key, value, "loraforge trains networks.lora, networks.dylora and lycoris.kohya"
                )
                return
            algorithm = _NETWORK_MODULES[value]
            if algorithm is None:  # the algorithm comes with network_args algo=
                self.set("network.backend", "lycoris")
                return
        else:
            algorithm = _GUI_LORA_TYPES.get(value.strip().lower())
            if algorithm is None:
                self.skip(key, value, "no matching loraforge algorithm")
                return
        self.set("network.algorithm", algorithm)
        if algorithm in _LYCORIS:
            self.set("network.backend", "lycoris")

    def network_args(self, value: Any) -> None:
        args: dict[str, Any] = {}
        for item in _split_args(value):
            name, sep, text = item.partition("=")
            name, text = name.strip(), text.strip()
            if not sep:
                self.skip("network_args", item, "expected key=value")
            elif name == "algo":
                self.set("network.algorithm", text)
                self.set("network.backend", "lycoris")
            elif name in _NETWORK_ARG_KEYS:
                parsed = [_number(v) for v in text.split(",")] if "," in text else _number(text)
                self.set(f"network.{_NETWORK_ARG_KEYS[name]}", parsed)
                if (
                    name == "conv_dim"
                    and self.result.recipe.get("network", {}).get("algorithm", "lora") == "lora"
                ):
                    self.set("network.algorithm", "locon")
            elif name in ("dropout",):
                self.set("network.dropout", _number(text))
            elif name in _LYCORIS_ARGS:
                args[name] = _flag(text) if text.lower() in ("true", "false") else _number(text)
            elif name in TRANSFORMER_NETWORK_ARGS:
                args[name] = _flow_arg(name, text)
            else:
                self.skip(f"network_args {name}", text)
        if args:
            self.set("network.args", args)

    def optimizer_args(self, value: Any) -> None:
        args: dict[str, Any] = {}
        for item in _split_args(value):
            name, sep, text = item.partition("=")
            if not sep:
                self.skip("optimizer_args", item, "expected key=value")
                continue
            text = text.strip()
            if text.lower() in ("true", "false"):
                args[name.strip()] = text.lower() == "true"
            elif text.startswith(("(", "[")):
                args[name.strip()] = [_number(v) for v in re.findall(r"[^\s,()\[\]]+", text)]
            else:
                args[name.strip()] = _number(text)
        if args:
            self.set("training.optimizer_args", args)

    def sampler(self, value: str) -> None:
        name = value.removeprefix("k_")
        if name in _SAMPLERS:
            self.set("sample.sampler", name)
        else:
            self.skip(
                "sample_sampler", value, f"loraforge samples with {', '.join(sorted(_SAMPLERS))}"
            )

    def prompts(self, path: Path) -> None:
        """sd-scripts' prompt file: one prompt a line, options ``--n --w --h --s --d --l``."""
        full = path if path.is_absolute() else self.base_dir / path
        if not full.is_file():
            self.skip("sample_prompts", str(path), "file not found; add sample.prompts by hand")
            return
        keys = {
            "n": "negative",
            "w": "width",
            "h": "height",
            "s": "steps",
            "d": "seed",
            "l": "cfg_scale",
        }
        prompts = []
        for line in full.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = re.split(r"\s--(?=[a-z]\s)", f" {line}")
            prompt: dict[str, Any] = {"prompt": parts[0].strip()}
            for part in parts[1:]:
                flag, _, text = part.partition(" ")
                if flag in keys:
                    prompt[keys[flag]] = text.strip() if flag == "n" else _number(text.strip())
            prompts.append(prompt)
        if prompts:
            self.set("sample.prompts", prompts)

    def dataset_toml(self, path: Path) -> None:
        full = path if path.is_absolute() else self.base_dir / path
        if not full.is_file():
            self.skip("dataset_config", str(path), "file not found; add dataset.subsets by hand")
            return
        data = read_config(full)
        general = dict(data.get("general", {}))
        datasets = data.get("datasets", [])
        if len(datasets) > 1:
            self.result.notes.append(
                f"{path.name} has {len(datasets)} datasets; a recipe has one, so their subsets "
                "are joined and the first dataset's settings are used"
            )
        dataset_keys = ("resolution", "batch_size", "enable_bucket", "min_bucket_reso",
                        "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
                        "validation_split", "validation_seed")  # fmt: skip
        for key in dataset_keys:
            for source in (datasets[0] if datasets else {}, general):
                if key in source:
                    self.option(key, source[key], general)
                    break
        for key, value in general.items():
            path = KOHYA_OPTIONS.get(key)
            if path and path.startswith("dataset.subsets[]."):
                self.subset_defaults[path.rsplit(".", 1)[1]] = _number(value)
            elif key not in dataset_keys:
                self.option(key, value, general)
        for dataset in datasets:
            for key, value in dataset.items():
                if key != "subsets" and key not in dataset_keys:
                    self.skip(f"datasets.{key}", value, "per-dataset settings are not converted")
            for subset in dataset.get("subsets", []):
                converted: dict[str, Any] = {}
                for key, value in subset.items():
                    path = KOHYA_OPTIONS.get(key)
                    if path and path.startswith("dataset.subsets[]."):
                        converted[path.rsplit(".", 1)[1]] = _number(value)
                    else:
                        self.skip(f"subsets.{key}", value, "no per-subset equivalent")
                if "dir" in converted:
                    self.subsets.append(converted)

    def finish(self) -> Conversion:
        recipe = self.result.recipe
        if self.subsets:
            subsets = [{"dir": s["dir"], **self.subset_defaults, **s} for s in self.subsets]
            recipe.setdefault("dataset", {})["subsets"] = subsets
            masked = recipe.get("training", {}).get("masked_loss")
            if any(_flag(s.get("alpha_mask")) for s in subsets) and not masked:
                # sd-scripts masks the loss whenever a batch has alpha masks
                self.set("training.masked_loss", True)
                self.result.notes.append("alpha_mask -> training.masked_loss: true")
        elif self.subset_defaults:
            self.result.notes.append("no train_data_dir or dataset_config: add dataset.subsets")
        order = ("model", "dataset", "cache", "network", "training", "output", "sample", "logging")
        self.result.recipe = {k: recipe[k] for k in order if k in recipe}
        return self.result


def read_config(path: Path) -> dict[str, Any]:
    """A kohya config file: ``.toml`` (sd-scripts) or ``.json`` (kohya_ss GUI)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        data = tomllib.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: expected a table of options")
    return data


def flatten_config(data: Mapping[str, Any]) -> dict[str, Any]:
    """sd-scripts reads the options of a ``--config_file`` TOML from any table: flatten them."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value))
        else:
            flat[key] = value
    return flat


def convert_kohya(
    config: Mapping[str, Any], base_dir: Path, dataset_config: Path | None = None
) -> Conversion:
    """Convert a kohya config (flattened options) into a recipe.

    Args:
        config: the options, as :func:`read_config` and :func:`flatten_config` give them.
        base_dir: where relative ``dataset_config`` / ``sample_prompts`` paths are looked up.
        dataset_config: a ``--dataset_config`` TOML given separately (overrides the config's).
    """
    converter = _Converter(base_dir)
    options = dict(config)
    if dataset_config is not None:
        options["dataset_config"] = str(dataset_config)
    if _flag(options.get("v_parameterization")) and not any(
        _flag(options.get(k)) for k in ("v2", "sdxl")
    ):
        converter.result.notes.append(
            "v_parameterization without v2: kept as training.v_parameterization"
        )
    for key, value in options.items():
        if key == "v_parameterization" and _flag(options.get("v2")):
            continue  # folded into model.family: sd2-v
        converter.option(key, value, options)
    return converter.finish()
