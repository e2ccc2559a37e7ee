"""The LoRA layer names of each family's published architecture, for checking LoRA files.

The names come from building the architecture on the meta device (no weights, no network) and
naming its layers with :mod:`loraforge.models.naming`. They are cached as JSON under
``$XDG_CACHE_HOME/loraforge`` (default ``~/.cache/loraforge``) because importing diffusers takes
seconds.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

_CACHE_VERSION = 2  # 2: norm layers (LyCORIS train_norm modules) are layer names too


def expected_names(family: str, conv: bool) -> tuple[frozenset[str], frozenset[str]] | None:
    """Every layer name of ``family``'s published architecture and kohya's default targets.

    Returns ``None`` when diffusers/transformers cannot build the architecture.
    """
    tables = _name_tables(family)
    if tables is None:
        return None
    return tables["all"], tables["conv" if conv else "attn"]


@lru_cache(maxsize=4)
def _name_tables(family: str) -> dict[str, frozenset[str]] | None:
    cache = _cache_file(family)
    if cache is not None and cache.is_file():
        try:
            data = json.loads(cache.read_text("utf-8"))
            if data.get("version") == _CACHE_VERSION:
                return {k: frozenset(v) for k, v in data["names"].items()}
        except (OSError, json.JSONDecodeError, KeyError):
            pass
    try:
        names = _build_name_tables(family)
    except (ImportError, OSError, ValueError):
        return None
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            payload = {"version": _CACHE_VERSION, "names": {k: sorted(v) for k, v in names.items()}}
            cache.write_text(json.dumps(payload), "utf-8")
        except OSError:
            pass  # a read-only home is fine: we just rebuild next time
    return names


def _cache_file(family: str) -> Path | None:
    try:
        import diffusers
        import transformers
    except ImportError:
        return None
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loraforge"
    tag = f"{family}-d{diffusers.__version__}-t{transformers.__version__}-v{_CACHE_VERSION}"
    return root / f"lora-names-{tag}.json"


def _build_name_tables(family: str) -> dict[str, frozenset[str]]:
    from loraforge.models.transformer_naming import TRANSFORMER_FAMILIES

    if family in TRANSFORMER_FAMILIES:
        from loraforge.models.transformer_tables import build_flow_name_tables

        return build_flow_name_tables(family)
    import torch
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loraforge.models.configs import architecture_config_dir
    from loraforge.models.naming import lora_targets, text_encoder_lora_name, unet_lora_name

    folder = architecture_config_dir(family)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))]
        if (folder / "text_encoder_2").is_dir():
            config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            encoders.append(CLIPTextModelWithProjection(config))
    layers = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm)
    every: set[str] = set()
    for path, module in unet.named_modules():
        if isinstance(module, layers):
            try:
                every.add(unet_lora_name(family, path, unet_config=dict(unet.config)))
            except ValueError:
                continue
    for index, encoder in enumerate(encoders):
        for path, module in encoder.named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.LayerNorm):
                every.add(text_encoder_lora_name(family, index, path))
    attn = lora_targets(family, unet, encoders, conv=False)
    conv = lora_targets(family, unet, encoders, conv=True)
    return {"all": frozenset(every), "attn": frozenset(attn), "conv": frozenset(conv)}
