"""The native network backend: LoRA, LoCon (conv kxk), LoRA-FA and DyLoRA as sd-scripts trains them.

Files it writes and reads use sd-scripts' key names (``<lora_name>.lora_down.weight``,
``.lora_up.weight``, ``.alpha``) and metadata, so A1111/Forge, ComfyUI, diffusers and sd-scripts
load them. Which layers get a module comes from ``loraforge.models.naming`` (sd-scripts' default
targets: attention/MLP Linear and 1x1 convs of the UNet transformers and the text encoders, plus
the ResNet and sampler layers when conv modules are on).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loraforge.backends.base import LoadResult, MaxNormResult, Network
from loraforge.backends.dylora import DyLoRAModule
from loraforge.backends.hooks import HookedAdapter
from loraforge.backends.kohya_blocks import RankPlan, RankSpec, rank_plan
from loraforge.backends.kohya_config import check_config, dylora_unit, network_metadata
from loraforge.backends.kohya_transformer import transformer_network_targets
from loraforge.backends.lora_modules import LoRAModule
from loraforge.errors import LoraFileError, RecipeError
from loraforge.models.naming import UNET_PREFIX, block_index, lora_targets
from loraforge.models.transformer_naming import TRANSFORMER_FAMILIES
from loraforge.recipe.capabilities import TRANSFORMER_NETWORK_ARGS

if TYPE_CHECKING:
    from loraforge.recipe.types import NetworkConfig

_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


class KohyaBackend:
    """``network.backend: kohya``."""

    name = "kohya"

    def create(
        self,
        config: NetworkConfig,
        family: str,
        unet: nn.Module,
        text_encoders: Sequence[nn.Module],
    ) -> KohyaNetwork:
        """See :meth:`loraforge.backends.base.NetworkBackend.create`."""
        check_config(config)
        plan = rank_plan(config, family)
        if family in TRANSFORMER_FAMILIES:
            # `unet` is the FLUX/SD3 transformer; text encoders in the family's order
            targets, ranks = transformer_network_targets(config, family, unet, text_encoders)
            return KohyaNetwork(config, plan, targets, lambda name: None, ranks)
        flow_args = sorted(TRANSFORMER_NETWORK_ARGS & set(config.args))
        if flow_args:
            raise RecipeError(
                f"network.args.{flow_args[0]}: an option of the FLUX/SD3 families, not {family}",
                hint="remove it (per-block settings of UNet families are block_dims & co.)",
            )
        targets = lora_targets(family, unet, list(text_encoders), conv=plan.uses_conv)
        return KohyaNetwork(config, plan, targets, partial(block_index, family))


def _make_module(
    config: NetworkConfig, name: str, target: nn.Module, spec: RankSpec
) -> HookedAdapter:
    if config.algorithm == "dylora":
        return DyLoRAModule(
            name,
            target,
            spec.dim,
            spec.alpha,
            unit=dylora_unit(config),
            multiplier=config.multiplier,
        )
    return LoRAModule(
        name,
        target,
        spec.dim,
        spec.alpha,
        multiplier=config.multiplier,
        dropout=config.dropout,
        rank_dropout=config.rank_dropout,
        module_dropout=config.module_dropout,
        freeze_down=config.algorithm == "lora-fa",
    )


class KohyaNetwork(Network):
    """The native network: one adapter module per targeted layer, registered under its kohya name.

    Args:
        config: the recipe's network section (already accepted by ``check_config``).
        plan: ranks per module kind / block, from :func:`rank_plan`.
        targets: kohya LoRA name -> base ``nn.Linear``/``nn.Conv2d`` (or a ``FusedLinear``).
        block_of: the kohya block index of a UNet module name (``None`` when it has none).
        ranks: rank/alpha of named modules that do not follow the plan (FLUX ``in_dims``).
    """

    def __init__(
        self,
        config: NetworkConfig,
        plan: RankPlan,
        targets: Mapping[str, nn.Module],
        block_of: Callable[[str], int | None],
        ranks: Mapping[str, RankSpec] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.plan = plan
        self.blocks: dict[str, int | None] = {}
        for name, target in targets.items():
            is_unet = name.startswith(UNET_PREFIX)
            if not (config.train_unet if is_unet else config.train_text_encoder):
                continue
            is_kxk = isinstance(target, nn.Conv2d) and tuple(target.kernel_size) != (1, 1)
            block = block_of(name) if is_unet else None
            spec = plan.spec_for(is_unet=is_unet, is_kxk_conv=is_kxk, block=block)
            if ranks and name in ranks:
                spec = ranks[name]
            if spec is None:
                continue
            # Registered under the kohya name, so nn.Module.state_dict() already has kohya keys.
            self.add_module(name, _make_module(config, name, target, spec))
            self.blocks[name] = block

    # ---- module access --------------------------------------------------------------------
    def adapters(self) -> Iterable[HookedAdapter]:
        """The adapter modules, in target order."""
        return (m for m in self.children() if isinstance(m, HookedAdapter))

    def _unet_and_te(self) -> tuple[list[HookedAdapter], list[HookedAdapter]]:
        unet, te = [], []
        for module in self.adapters():
            (unet if module.lora_name.startswith(UNET_PREFIX) else te).append(module)
        return unet, te

    # ---- hooks and strength ------------------------------------------------------------------
    def apply_to(self) -> None:
        for module in self.adapters():
            module.apply_to()

    def restore(self) -> None:
        for module in self.adapters():
            module.restore()

    def set_multiplier(self, multiplier: float) -> None:
        for module in self.adapters():
            module.multiplier = multiplier

    def requires_grad_(self, requires_grad: bool = True) -> KohyaNetwork:
        """Per module, so a LoRA-FA down stays frozen."""
        for module in self.adapters():
            module.requires_grad_(requires_grad)
        return self

    # ---- optimizer groups ---------------------------------------------------------------------
    def param_groups(self, unet_lr: float, text_encoder_lr: float) -> list[dict[str, Any]]:
        unet, te = self._unet_and_te()
        groups = self._groups("textencoder", te, text_encoder_lr)
        if self.plan.lr_weights is None:
            return groups + self._groups("unet", unet, unet_lr)
        by_block: dict[int | None, list[HookedAdapter]] = {}
        for module in unet:
            by_block.setdefault(self.blocks[module.lora_name], []).append(module)
        for block in sorted(by_block, key=lambda b: -1 if b is None else b):
            label = "unet" if block is None else f"unet_block{block}"
            lr = unet_lr * self.plan.lr_weight(block)
            groups += self._groups(label, by_block[block], lr)
        return groups

    def _groups(self, label: str, modules: list[HookedAdapter], lr: float) -> list[dict[str, Any]]:
        """One group (two with LoRA+: up matrices at ``lr * ratio``); lr 0 freezes instead."""
        ratio = self.config.loraplus_lr_ratio
        plus_ids = {id(p) for m in modules for p in m.up_parameters()} if ratio else set()
        trainable = [p for m in modules for p in m.trainable_parameters()]
        candidates = [
            (label, lr, [p for p in trainable if id(p) not in plus_ids]),
            (f"{label} plus", lr * (ratio or 0.0), [p for p in trainable if id(p) in plus_ids]),
        ]
        groups = []
        for name, group_lr, params in candidates:
            if not params:
                continue
            for p in params:
                p.requires_grad_(group_lr != 0)
            if group_lr != 0:
                groups.append({"params": params, "lr": group_lr, "name": name})
        return groups

    # ---- saving and loading ------------------------------------------------------------------
    def state_dict_for_save(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        tensors = {}
        for module in self.adapters():
            for suffix, tensor in module.kohya_tensors().items():
                key = f"{module.lora_name}.{suffix}"
                tensors[key] = tensor.detach().to("cpu", dtype, copy=True).contiguous()
        return tensors

    def load_weights(
        self, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True
    ) -> LoadResult:
        """Load kohya tensors; a file alpha different from the network's is folded into ``up``.

        The loaded module then changes the model exactly as the file does (``up`` is rescaled
        by ``(file_alpha/rank) / (alpha/rank)``), while the network keeps the recipe's alpha.
        A file without ``.alpha`` (old sd-scripts) means alpha = rank.
        """
        unexpected = set(state_dict)
        missing = []
        for module in self.adapters():
            keys = [f"{module.lora_name}.{suffix}" for suffix in _SUFFIXES]
            if keys[0] not in state_dict or keys[1] not in state_dict:
                missing.append(module.lora_name)
                continue
            unexpected.difference_update(keys)
            _load_module(module, *(state_dict.get(k) for k in keys))
        result = LoadResult(tuple(missing), tuple(sorted(unexpected)))
        if strict and (result.missing or result.unexpected):
            raise LoraFileError(
                "the LoRA weights do not match the network: "
                f"{len(result.missing)} modules have no tensors (e.g. {result.missing[:3]}), "
                f"{len(result.unexpected)} tensors fit no module (e.g. {result.unexpected[:3]})",
                hint="check that the file was trained for this model family with the same "
                "algorithm and conv/block settings, and train_unet/train_text_encoder",
            )
        return result

    # ---- merging and regularisation ------------------------------------------------------------
    def merge_into_base(self, multiplier: float = 1.0) -> None:
        self.restore()
        for module in self.adapters():
            module.merge_into_target(multiplier)

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> MaxNormResult:
        """sd-scripts' ``apply_max_norm_regularization``, module by module.

        A delta norm ``n`` (of ``up @ down * alpha/rank``) above ``max_norm`` is scaled to
        ``max_norm``; norms are clamped below at ``max_norm / 2`` before the ratio (sd-scripts).
        """
        norms, scaled = [], 0
        for module in self.adapters():
            norm = module.delta_weight(multiplier=1.0).norm()
            clamped = norm.clamp(min=max_norm / 2)
            ratio = float(clamped.clamp(max=max_norm) / clamped)
            if ratio != 1.0:
                scaled += 1
                module.scale_weights_(ratio)
            norms.append(float(norm) * ratio)
        if not norms:
            return MaxNormResult(0, 0.0, 0.0)
        return MaxNormResult(scaled, sum(norms) / len(norms), max(norms))

    def metadata(self) -> dict[str, str]:
        return network_metadata(self.config)


def _fit(tensor: torch.Tensor, shape: tuple[int, ...], key: str) -> torch.Tensor:
    """``tensor`` in ``shape``; a Linear-vs-1x1-conv difference (trailing 1s) is reshaped."""
    if tuple(tensor.shape) == shape:
        return tensor
    squeezed = tuple(d for d in tensor.shape[2:] if d != 1)
    if tensor.shape[:2] == shape[:2] and not squeezed and all(d == 1 for d in shape[2:]):
        return tensor.reshape(shape)
    raise LoraFileError(
        f"{key}: shape {tuple(tensor.shape)} does not fit the network's {shape}",
        hint="the file has a different rank or was trained for another model; set network.dim "
        "(and conv_dim) to the file's ranks",
    )


def _load_module(
    module: HookedAdapter, down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor | None
) -> None:
    name = module.lora_name
    down = _fit(down, module.down_shape(), f"{name}.lora_down.weight").float()
    up = _fit(up, module.up_shape(), f"{name}.lora_up.weight").float()
    rank = down.shape[0]
    file_alpha = float(alpha) if alpha is not None else float(rank)
    file_scale = (file_alpha if file_alpha != 0 else rank) / rank
    module.load_down_up(down, up * (file_scale / module.scale))
