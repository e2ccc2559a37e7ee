"""Optimizers by name, with ``optimizer_args`` checked against the optimizer's signature.

Names and behaviour follow kohya-ss/sd-scripts' ``train_util.get_optimizer``: SGDNesterov is
``torch.optim.SGD(nesterov=True)`` with momentum 0.9 unless given; Adafactor defaults to
``relative_step=True`` (then the learning rate is computed by the optimizer, group learning rates
are dropped and :func:`loraforge.training.schedulers.build_scheduler` returns an
``AdafactorSchedule``); D-Adaptation and Prodigy expect a learning rate around 1.0. Optional
packages (bitsandbytes, lion-pytorch, prodigyopt, dadaptation, schedulefree) are imported only
when their optimizer is asked for.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from loraforge.console import info, warn
from loraforge.errors import DependencyError, RecipeError, TrainingError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class OptimizerSpec:
    """Where an optimizer lives and what loraforge knows about it.

    Attributes:
        module, attr: import path of the class.
        package: pip name when it is an optional dependency, else ``None``.
        state_bytes: optimizer state per trainable parameter, in bytes (for VRAM estimates).
        fixed_kwargs: always passed; the user may not override them.
        default_kwargs: passed unless ``optimizer_args`` sets them.
        needs_cuda: only works on an NVIDIA GPU.
        adaptive: estimates its own step size (expects lr ~ 1.0).
        schedule_free: needs no learning-rate scheduler; has ``train()`` / ``eval()`` modes.
        equal_group_lrs: refuses parameter groups with different non-zero learning rates.
    """

    module: str
    attr: str
    package: str | None
    state_bytes: float
    fixed_kwargs: Mapping[str, Any] = field(default_factory=dict)
    default_kwargs: Mapping[str, Any] = field(default_factory=dict)
    needs_cuda: bool = False
    adaptive: bool = False
    schedule_free: bool = False
    equal_group_lrs: bool = False


_BNB = "bitsandbytes.optim"
OPTIMIZERS: Mapping[str, OptimizerSpec] = MappingProxyType(
    {
        "AdamW": OptimizerSpec("torch.optim", "AdamW", None, 8.0),
        "AdamW8bit": OptimizerSpec(_BNB, "AdamW8bit", "bitsandbytes", 2.0, needs_cuda=True),
        "PagedAdamW8bit": OptimizerSpec(
            _BNB, "PagedAdamW8bit", "bitsandbytes", 2.0, needs_cuda=True
        ),
        "Lion": OptimizerSpec("lion_pytorch", "Lion", "lion-pytorch", 4.0),
        "Lion8bit": OptimizerSpec(_BNB, "Lion8bit", "bitsandbytes", 1.0, needs_cuda=True),
        "SGDNesterov": OptimizerSpec(
            "torch.optim",
            "SGD",
            None,
            4.0,
            fixed_kwargs={"nesterov": True},
            default_kwargs={"momentum": 0.9},
        ),
        "Prodigy": OptimizerSpec(
            "prodigyopt", "Prodigy", "prodigyopt", 16.0, adaptive=True, equal_group_lrs=True
        ),
        "DAdaptAdam": OptimizerSpec(
            "dadaptation", "DAdaptAdam", "dadaptation", 12.0, adaptive=True, equal_group_lrs=True
        ),
        "DAdaptLion": OptimizerSpec(
            "dadaptation", "DAdaptLion", "dadaptation", 8.0, adaptive=True, equal_group_lrs=True
        ),
        "DAdaptAdaGrad": OptimizerSpec(
            "dadaptation", "DAdaptAdaGrad", "dadaptation", 12.0, adaptive=True
        ),
        "DAdaptSGD": OptimizerSpec(
            "dadaptation", "DAdaptSGD", "dadaptation", 12.0, adaptive=True, equal_group_lrs=True
        ),
        # Factored second moments: (rows + cols) floats per matrix, about 1 byte per parameter
        # for LoRA-sized matrices (rank >= 8); more for 1-D tensors, less for big ones.
        "Adafactor": OptimizerSpec(
            "transformers.optimization",
            "Adafactor",
            None,
            1.0,
            default_kwargs={"relative_step": True},
        ),
        "AdamWScheduleFree": OptimizerSpec(
            "schedulefree", "AdamWScheduleFree", "schedulefree", 8.0, schedule_free=True
        ),
        "SGDScheduleFree": OptimizerSpec(
            "schedulefree", "SGDScheduleFree", "schedulefree", 4.0, schedule_free=True
        ),
    }
)
OPTIMIZER_NAMES: tuple[str, ...] = tuple(OPTIMIZERS)

# Parameters every optimizer takes that loraforge sets itself.
_RESERVED = {"params": "the trainable parameters", "lr": "training.learning_rate"}


def optimizer_spec(name: str) -> OptimizerSpec:
    """The :class:`OptimizerSpec` for ``name`` (case-insensitive).

    Raises:
        RecipeError: unknown name, with the closest known one.
    """
    if name in OPTIMIZERS:
        return OPTIMIZERS[name]
    by_lower = {known.lower(): known for known in OPTIMIZERS}
    if name.lower() in by_lower:
        return OPTIMIZERS[by_lower[name.lower()]]
    close = difflib.get_close_matches(name, OPTIMIZER_NAMES, n=1)
    hint = f"did you mean {close[0]}?" if close else f"use one of {', '.join(OPTIMIZER_NAMES)}"
    raise RecipeError(f"training.optimizer: unknown optimizer {name!r}", hint=hint)


def canonical_name(name: str) -> str:
    """The registered spelling of ``name`` (``adamw8bit`` -> ``AdamW8bit``)."""
    spec = optimizer_spec(name)
    return next(known for known, value in OPTIMIZERS.items() if value is spec)


def optimizer_state_bytes_per_param(name: str) -> float:
    """Bytes of optimizer state per trainable parameter (AdamW 8, 8-bit AdamW 2, Lion 4, ...)."""
    return optimizer_spec(name).state_bytes


def is_adaptive(name: str) -> bool:
    """True for optimizers that estimate their own step size (Prodigy, DAdapt*)."""
    return optimizer_spec(name).adaptive


def is_schedule_free(name: str) -> bool:
    """True for schedule-free optimizers (no LR scheduler; ``train()``/``eval()`` modes)."""
    return optimizer_spec(name).schedule_free


def optimizer_class(name: str) -> type:
    """Import and return the optimizer class for ``name``.

    Raises:
        DependencyError: the optional package is missing or too old to have the class.
    """
    spec = optimizer_spec(name)
    canonical = canonical_name(name)
    install = f"pip install {spec.package}" if spec.package else "reinstall loraforge"
    try:
        module = importlib.import_module(spec.module)
    except ImportError as e:
        raise DependencyError(
            f"optimizer {canonical} needs the package {spec.package or spec.module}, "
            "which is not installed",
            hint=f"{install}, or choose another training.optimizer (AdamW needs nothing extra)",
        ) from e
    try:
        return getattr(module, spec.attr)
    except AttributeError as e:
        raise DependencyError(
            f"optimizer {canonical}: the installed {spec.package or spec.module} has no "
            f"{spec.attr} (too old?)",
            hint=f"upgrade it: {install} --upgrade",
        ) from e


def _accepted_args(cls: type) -> tuple[dict[str, inspect.Parameter], bool]:
    """The keyword parameters of ``cls.__init__`` and whether it takes ``**kwargs``."""
    params = inspect.signature(cls.__init__).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {
        key: p
        for key, p in params.items()
        if key != "self"
        and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    }
    return named, accepts_any


def _check_type(canonical: str, key: str, value: Any, default: Any) -> Any:
    """Check ``value`` against the type of the parameter's default; lists become tuples."""
    where = f"training.optimizer_args.{key}"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise RecipeError(
                f"{where}: {canonical} expects true or false, got {value!r}",
                hint=f"write {key}: {str(default).lower()}",
            )
    elif isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(
                f"{where}: {canonical} expects a number, got {value!r}",
                hint=f"write a plain number, e.g. {key}: {default}",
            )
    elif isinstance(default, tuple) and (
        not isinstance(value, (list, tuple)) or len(value) != len(default)
    ):
        raise RecipeError(
            f"{where}: {canonical} expects a list of {len(default)} values, got {value!r}",
            hint=f"write {key}: {list(default)}",
        )
    return tuple(value) if isinstance(value, list) else value


def validate_optimizer_args(name: str, args: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check ``optimizer_args`` against the optimizer's constructor and return the kwargs to pass.

    The result holds the optimizer's loraforge defaults (SGDNesterov momentum 0.9, Adafactor
    relative_step true) updated with ``args``; fixed arguments (``nesterov``) are not included.

    Raises:
        RecipeError: an argument the optimizer does not take (naming the accepted ones), one
            loraforge sets itself (``lr``, ``params``, ``nesterov`` for SGDNesterov), or a value
            of the wrong type.
        DependencyError: the optimizer's package is missing.
    """
    spec = optimizer_spec(name)
    canonical = canonical_name(name)
    cls = optimizer_class(name)
    named, accepts_any = _accepted_args(cls)
    reserved = dict(_RESERVED)
    reserved.update(
        {key: f"always {value!r} for {canonical}" for key, value in spec.fixed_kwargs.items()}
    )
    accepted = sorted(key for key in named if key not in reserved)
    kwargs = dict(spec.default_kwargs)
    for key, value in (args or {}).items():
        if key in reserved:
            raise RecipeError(
                f"training.optimizer_args.{key}: {canonical}'s {key} is set by loraforge "
                f"({reserved[key]})",
                hint=f"remove {key} from training.optimizer_args",
            )
        if key not in named and not accepts_any:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise RecipeError(
                f"training.optimizer_args.{key}: {canonical} has no argument {key!r}",
                hint=f"{hint}{canonical} accepts: {', '.join(accepted)}",
            )
        default = named[key].default if key in named else None
        kwargs[key] = _check_type(canonical, key, value, default)
    return kwargs


def _resolved_kwargs(name: str, args: Mapping[str, Any] | None) -> dict[str, Any]:
    """Validated kwargs plus sd-scripts' Adafactor rule: warmup_init switches relative_step on."""
    kwargs = validate_optimizer_args(name, args)
    if canonical_name(name) == "Adafactor" and kwargs.get("warmup_init", False):
        kwargs["relative_step"] = True
    return kwargs


def optimizer_description(name: str, args: Mapping[str, Any] | None = None) -> str:
    """The ``ss_optimizer`` metadata value: ``module.Class(key=value,...)`` like sd-scripts writes.

    Raises:
        RecipeError, DependencyError: as :func:`validate_optimizer_args`.
    """
    cls = optimizer_class(name)
    kwargs = _resolved_kwargs(name, args)
    listed = ",".join(f"{key}={value}" for key, value in kwargs.items())
    full = f"{cls.__module__}.{cls.__name__}"
    return f"{full}({listed})" if listed else full


def _as_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    """Parameter groups as fresh dicts (the caller's dicts are never modified)."""
    items = list(params)
    if items and isinstance(items[0], Mapping):
        return [{**group, "params": list(group["params"])} for group in items]
    return [{"params": items}] if items else []


def _group_lrs(groups: Sequence[Mapping[str, Any]], lr: float) -> list[float]:
    return [float(group.get("lr", lr)) for group in groups]


def _check_adaptive(
    canonical: str, spec: OptimizerSpec, groups: Sequence[Mapping], lr: float
) -> None:
    lrs = _group_lrs(groups, lr)
    first = lrs[0] if lrs else lr
    if first <= 0.1:
        warn(
            f"{canonical} estimates its own step size and expects a learning rate around 1.0, "
            f"got {first:g}; set training.learning_rate: 1.0 (and leave unet_lr and "
            "text_encoder_lr unset)"
        )
    nonzero = {value for value in lrs if value != 0.0}
    if spec.equal_group_lrs and len(nonzero) > 1:
        raise RecipeError(
            f"training.optimizer {canonical}: parameter groups have different learning rates "
            f"({', '.join(f'{value:g}' for value in sorted(nonzero))}), which {canonical} refuses",
            hint="leave unet_lr, text_encoder_lr, loraplus_lr_ratio and the per-block lr weights "
            "unset, or use AdamW",
        )


def _prepare_adafactor(
    kwargs: dict[str, Any], groups: list[dict[str, Any]], lr: float
) -> float | None:
    """Apply sd-scripts' Adafactor rules; returns the lr to pass (``None`` for relative steps)."""
    if not kwargs["relative_step"]:
        return lr
    if lr != 0.0:
        warn(
            "Adafactor with relative_step computes its own learning rate; training.learning_rate "
            f"({lr:g}) is only reported as the initial value"
        )
    dropped = [group.pop("lr", None) for group in groups]  # every group, no short-circuit
    if any(value is not None for value in dropped):
        warn("Adafactor with relative_step ignores unet_lr and text_encoder_lr")
    return None


def _check_cuda(canonical: str, spec: OptimizerSpec) -> None:
    import torch

    if spec.needs_cuda and not torch.cuda.is_available():
        raise DependencyError(
            f"optimizer {canonical} (bitsandbytes 8-bit) needs an NVIDIA GPU with CUDA, "
            "and none is available",
            hint="use training.optimizer: AdamW on this machine, or train on a CUDA GPU",
        )


def build_optimizer(
    name: str,
    param_groups: Iterable[Any],
    lr: float,
    args: Mapping[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """Create the optimizer ``name`` over ``param_groups``.

    Args:
        name: one of :data:`OPTIMIZER_NAMES` (case-insensitive).
        param_groups: parameters, or dicts with ``params`` and optionally ``lr`` (other keys are
            kept, as torch allows). The dicts are copied, never modified.
        lr: the default learning rate (``training.learning_rate``).
        args: ``training.optimizer_args``.

    Returns:
        The optimizer; schedule-free optimizers are already in ``train()`` mode.

    Raises:
        RecipeError: unknown name or argument, wrong argument type, or per-group learning rates
            an adaptive optimizer refuses.
        DependencyError: the optional package is missing, or an 8-bit optimizer has no CUDA GPU.
        TrainingError: there are no trainable parameters.
    """
    spec = optimizer_spec(name)
    canonical = canonical_name(name)
    cls = optimizer_class(name)
    _check_cuda(canonical, spec)
    if (args or {}).get("warmup_init") and (args or {}).get("relative_step") is False:
        info("Adafactor: warmup_init needs relative_step; using relative_step: true")
    kwargs = _resolved_kwargs(name, args)
    groups = _as_groups(param_groups)
    if not any(group["params"] for group in groups):
        raise TrainingError(
            "there are no trainable parameters for the optimizer",
            hint="check network.train_unet / network.train_text_encoder and the network's modules",
        )
    if spec.adaptive:
        _check_adaptive(canonical, spec, groups, lr)
    use_lr: float | None = lr
    if canonical == "Adafactor":
        use_lr = _prepare_adafactor(kwargs, groups, lr)
    optimizer = cls(groups, lr=use_lr, **spec.fixed_kwargs, **kwargs)
    set_train_mode(optimizer)
    return optimizer


def set_train_mode(optimizer: Any) -> None:
    """Put a schedule-free optimizer in training mode (no-op for the others)."""
    if callable(getattr(optimizer, "train", None)):
        optimizer.train()


def set_eval_mode(optimizer: Any) -> None:
    """Put a schedule-free optimizer in evaluation mode before sampling or saving weights."""
    if callable(getattr(optimizer, "eval", None)):
        optimizer.eval()
