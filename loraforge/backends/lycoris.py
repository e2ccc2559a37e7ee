"""The LyCORIS backend: LoHa, LoKr, (IA)^3, DyLoRA, OFT/BOFT, GLoRA, full and LoRA/LoCon (with
Tucker, scalar and DoRA options) through the lycoris-lora package.

Layers are chosen by a LyCORIS preset (``network.args.preset``, default ``full`` as in
lycoris-lora) and named by loraforge (:mod:`loraforge.backends.lycoris_targets`); each gets
lycoris-lora's own module class. Saved files hold LyCORIS tensor names (``hada_w1_a``,
``lokr_w1``, ``oft_blocks``, ``dora_scale`` …) under kohya module names (``lora_unet_…``,
``lora_te_…``/``lora_te1_…``, SGM names on SDXL) and sd-scripts' ``lycoris.kohya`` metadata, so
A1111/Forge, ComfyUI and lycoris-lora itself read them.

As in lycoris-lora, ``conv_dim``/``conv_alpha`` default to ``dim``/``alpha`` (kxk convs are
trained whenever the preset enables them), ``lora`` and ``locon`` are the same algorithm, and
``dim`` is the block size for ``diag-oft``/``boft``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from loraforge.backends.base import LoadResult, MaxNormResult, Network
from loraforge.backends.lycoris_config import (
    check_config,
    dora_on_output,
    network_metadata,
    resolve_options,
)
from loraforge.console import warn
from loraforge.errors import DependencyError, LoraFileError, RecipeError
from loraforge.models.transformer_naming import TRANSFORMER_FAMILIES

if TYPE_CHECKING:
    from loraforge.backends.lycoris_targets import Target
    from loraforge.recipe.types import NetworkConfig


# The lycoris-lora versions this backend was written and tested against (it subclasses a few of
# its module classes, see loraforge.backends.lycoris_modules).
TESTED_LYCORIS = (4, 1)


def require_lycoris() -> None:
    """Import lycoris-lora, or say how to install it; warn on an untested major version.

    Raises:
        DependencyError: the package is missing, cannot be imported, or is older than 4.1.
    """
    from importlib.metadata import PackageNotFoundError, version

    hint = "pip install 'loraforge[lycoris]' (or pip install 'lycoris-lora>=4.1,<5')"
    try:
        import lycoris  # noqa: F401

        installed = version("lycoris-lora")
    except (ImportError, PackageNotFoundError) as e:
        raise DependencyError(
            f"network.backend: lycoris needs the lycoris-lora package, which cannot be imported ({e})",
            hint=hint,
        ) from e
    parts = tuple(int(p) for p in installed.split(".")[:2] if p.isdigit())
    if parts < TESTED_LYCORIS:
        raise DependencyError(
            f"network.backend: lycoris needs lycoris-lora 4.1 or newer, found {installed}",
            hint=hint,
        )
    if parts[:1] != TESTED_LYCORIS[:1]:
        warn(f"lycoris-lora {installed} is untested with loraforge (written for 4.x)")


class LycorisBackend:
    """``network.backend: lycoris``."""

    name = "lycoris"

    def create(
        self,
        config: NetworkConfig,
        family: str,
        unet: nn.Module,
        text_encoders: Sequence[nn.Module],
    ) -> LycorisAdapterNetwork:
        """See :meth:`loraforge.backends.base.NetworkBackend.create`."""
        check_config(config)
        if family in TRANSFORMER_FAMILIES:
            # sd-scripts' FLUX/SD3 names sit on fused original layers (qkv, linear1) that
            # lycoris-lora's modules cannot span on diffusers' split layers
            raise RecipeError(
                f"network.backend: LyCORIS algorithms are not available for {family} yet",
                hint="use `network.backend: kohya` (lora, lora-fa or dylora), which writes "
                "sd-scripts' FLUX/SD3 names",
            )
        require_lycoris()
        if dora_on_output(config):
            from loraforge.ops.ui_support import DORA_OUTPUT_AXIS_WARNING

            warn(f"network.args.wd_on_output: {DORA_OUTPUT_AXIS_WARNING}")
        from loraforge.backends.lycoris_modules import build_module, lycoris_messages_to_console
        from loraforge.backends.lycoris_targets import load_preset, select_targets

        options = resolve_options(config)
        spec = load_preset(options.preset)
        targets = select_targets(
            spec,
            family,
            unet if config.train_unet else None,
            list(text_encoders) if config.train_text_encoder else [],
            train_norm=options.train_norm,
        )
        if not targets:
            raise RecipeError(
                f"network.args.preset: preset {spec.name!r} selects no layer to train "
                f"(train_unet={config.train_unet}, train_text_encoder={config.train_text_encoder})",
                hint="use preset full, or train the part the preset targets "
                "(e.g. unet-transformer-only needs train_unet: true)",
            )
        with lycoris_messages_to_console():
            modules = [(t, build_module(t, options, config.multiplier)) for t in targets]
        return LycorisAdapterNetwork(config, modules, conv_enabled=spec.enable_conv)


class LycorisAdapterNetwork(Network):
    """lycoris-lora modules registered under kohya names, behind loraforge's Network protocol.

    Args:
        config: the recipe's network section (already accepted by ``check_config``).
        modules: ``(target, lycoris module)`` pairs, the module named ``target.lora_name``.
        conv_enabled: whether the preset trains kxk convs (for the metadata).
    """

    def __init__(
        self,
        config: NetworkConfig,
        modules: Sequence[tuple[Target, nn.Module]],
        *,
        conv_enabled: bool,
    ) -> None:
        super().__init__()
        self.config = config
        self.conv_enabled = conv_enabled
        self.unet_names: set[str] = set()
        for target, module in modules:
            # Registered under the kohya name: nn.Module.state_dict() gives the file's keys.
            self.add_module(target.lora_name, module)
            if target.is_unet:
                self.unet_names.add(target.lora_name)
        self._applied = False
        self._merged = False

    def adapters(self) -> Iterable[nn.Module]:
        """The lycoris-lora modules, in target order (text encoders first)."""
        return self.children()

    # ---- hooks and strength ------------------------------------------------------------------
    def apply_to(self) -> None:
        from loraforge.backends.lycoris_modules import apply_module

        if self._applied:
            return
        if self._merged:
            raise RuntimeError("the network was merged into the base weights; it cannot be applied")
        for module in self.adapters():
            apply_module(module)
        self._applied = True

    def restore(self) -> None:
        from loraforge.backends.lycoris_modules import restore_module

        if not self._applied:
            return
        for module in reversed(list(self.adapters())):
            restore_module(module)
        self._applied = False

    def set_multiplier(self, multiplier: float) -> None:
        for module in self.adapters():
            module.multiplier = multiplier

    # ---- optimizer groups ---------------------------------------------------------------------
    def param_groups(self, unet_lr: float, text_encoder_lr: float) -> list[dict[str, Any]]:
        """``textencoder`` and ``unet`` groups; with LoRA+ the ``lora_up`` weights get their own
        ``… plus`` group at ``lr * loraplus_lr_ratio`` (lycoris.kohya's split)."""
        te = [m for m in self.adapters() if m.lora_name not in self.unet_names]
        unet = [m for m in self.adapters() if m.lora_name in self.unet_names]
        return self._groups("textencoder", te, text_encoder_lr) + self._groups(
            "unet", unet, unet_lr
        )

    def _groups(self, label: str, modules: list[nn.Module], lr: float) -> list[dict[str, Any]]:
        ratio = self.config.loraplus_lr_ratio
        plain: list[nn.Parameter] = []
        plus: list[nn.Parameter] = []
        for module in modules:
            for name, param in module.named_parameters():
                (plus if ratio and "lora_up" in name else plain).append(param)
        groups = []
        for name, group_lr, params in (
            (label, lr, plain),
            (f"{label} plus", lr * (ratio or 0), plus),
        ):
            for p in params:
                p.requires_grad_(group_lr != 0)
            if params and group_lr != 0:
                groups.append({"params": params, "lr": group_lr, "name": name})
        return groups

    # ---- saving and loading ------------------------------------------------------------------
    def state_dict_for_save(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """LyCORIS tensors under kohya names; integer flags (IA3 ``on_input``) keep their type."""
        tensors = {}
        for key, tensor in self.state_dict().items():
            tensor = tensor.detach().to("cpu", copy=True)
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            tensors[key] = tensor.contiguous()
        return tensors

    @torch.no_grad()
    def load_weights(
        self, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True
    ) -> LoadResult:
        """Load tensors as this backend (or lycoris-lora with the same settings) saves them.

        A module whose tensors are present but do not match (other algorithm option, rank or
        shape) is always an error; ``strict`` also refuses modules without tensors and tensors
        of no module.
        """
        from loraforge.backends.lycoris_modules import load_module

        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state_dict.items():
            name, _, suffix = key.partition(".")
            by_module.setdefault(name, {})[suffix] = tensor
        missing = []
        for module in self.adapters():
            tensors = by_module.pop(module.lora_name, None)
            if tensors is None:
                missing.append(module.lora_name)
                continue
            load_module(module, tensors)
        unexpected = sorted(f"{n}.{s}" for n, tensors in by_module.items() for s in tensors)
        result = LoadResult(tuple(missing), tuple(unexpected))
        if strict and (result.missing or result.unexpected):
            raise LoraFileError(
                "the LyCORIS weights do not match the network: "
                f"{len(result.missing)} modules have no tensors (e.g. {list(result.missing[:3])}), "
                f"{len(result.unexpected)} tensors fit no module "
                f"(e.g. {list(result.unexpected[:3])})",
                hint="check that the file was trained for this model family with the same "
                "algorithm, preset, train_norm and train_unet/train_text_encoder",
            )
        return result

    def load_state_dict(  # type: ignore[override]
        self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False
    ) -> Any:
        """``nn.Module.load_state_dict`` for what ``state_dict()`` gives (the file format).

        Routed through :meth:`load_weights`, because lycoris-lora's modules save a different
        set of tensors than they hold (DyLoRA's blocks, Full's diff, a folded scalar), so torch's
        own per-parameter copy cannot read them back. Returns torch's ``(missing_keys,
        unexpected_keys)`` pair; ``assign`` is not supported.
        """
        if assign:
            raise NotImplementedError("assign=True: the tensors are copied into the modules")
        result = self.load_weights(state_dict, strict=strict)
        return _IncompatibleKeys(list(result.missing), list(result.unexpected))

    # ---- merging and regularisation ------------------------------------------------------------
    @torch.no_grad()
    def merge_into_base(self, multiplier: float = 1.0) -> None:
        """Write each module's merged weight into its base layer (lycoris-lora's ``merge_to``),
        full rank and without dropout, after removing the hooks."""
        was_training = self.training
        self.eval()
        self.restore()
        for module in self.adapters():
            module.merge_to(multiplier)
        self._merged = True
        self.train(was_training)

    @torch.no_grad()
    def apply_max_norm(self, max_norm: float) -> MaxNormResult:
        """lycoris-lora's ``apply_max_norm`` per module (algorithms without one are skipped)."""
        scaled, norms = 0, []
        for module in self.adapters():
            was_scaled, norm = module.apply_max_norm(max_norm)
            if was_scaled is None:
                continue
            scaled += int(bool(was_scaled))
            norms.append(float(norm))
        if not norms:
            return MaxNormResult(0, 0.0, 0.0)
        return MaxNormResult(scaled, sum(norms) / len(norms), max(norms))

    def metadata(self) -> dict[str, str]:
        return network_metadata(self.config, conv_enabled=self.conv_enabled)
