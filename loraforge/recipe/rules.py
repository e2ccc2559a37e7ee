"""Cross-field rules: combinations the schema alone cannot judge.

Each rule returns findings as ``(severity, path, message, hint)``: an *error* when the combination
cannot work, a *warning* when it is merely unusual. Paths are tuples into the recipe document.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from loraforge.recipe.capabilities import (
    ADAPTIVE_OPTIMIZERS,
    ALGORITHM_ARGS,
    BLOCK_COUNTS,
    SINGLE_LR_OPTIMIZERS,
    algorithms_of,
)
from loraforge.recipe.flow_network_rules import flow_network_problems
from loraforge.recipe.flow_rules import flow_problems
from loraforge.recipe.rules_masks_ema import ema_problems, masked_loss_problems
from loraforge.recipe.types import Recipe
from loraforge.recipe.validation_rules import validation_problems

Finding = tuple[str, tuple[Any, ...], str, str | None]


def cross_field_problems(recipe: Recipe) -> list[Finding]:
    """Every cross-field finding for ``recipe``, errors and warnings together."""
    findings: list[Finding] = []
    for rule in (
        _caching,
        _network,
        flow_network_problems,
        _blocks,
        _training,
        _precision,
        _prediction,
        _dataset,
        _output,
        masked_loss_problems,
        ema_problems,
        validation_problems,
        flow_problems,
    ):
        findings.extend(rule(recipe))
    return findings


def _caching(r: Recipe) -> Iterator[Finding]:
    # validation images are never augmented and their captions are fixed: no conflict there
    trained = [(i, s) for i, s in enumerate(r.dataset.subsets) if not s.is_validation]
    if r.cache.latents != "none":
        for i, s in trained:
            for name in ("color_aug", "random_crop"):
                if getattr(s, name):
                    yield (
                        "error",
                        ("dataset", "subsets", i, name),
                        f"{name} changes the pixels every step, so latents cannot be cached",
                        "set cache.latents: none, or turn it off",
                    )
    if r.cache.text_encoder_outputs != "none":
        if r.network.train_text_encoder:
            yield (
                "error",
                ("cache", "text_encoder_outputs"),
                "text-encoder outputs cannot be cached while the text encoder is trained",
                "set network.train_text_encoder: false, or cache.text_encoder_outputs: none",
            )
        for i, s in trained:
            varying = [n for n in ("shuffle_caption", "enable_wildcard") if getattr(s, n)]
            varying += [
                n
                for n in (
                    "caption_dropout_rate",
                    "caption_tag_dropout_rate",
                    "caption_dropout_every_n_epochs",
                )
                if getattr(s, n)
            ]
            for name in varying:
                yield (
                    "error",
                    ("dataset", "subsets", i, name),
                    f"{name} changes the caption every step, so text-encoder outputs cannot be cached",
                    "set cache.text_encoder_outputs: none, or turn it off",
                )


def _network(r: Recipe) -> Iterator[Finding]:
    n = r.network
    allowed = algorithms_of(n.backend)
    if n.algorithm not in allowed:
        other = "lycoris" if n.backend == "kohya" else "kohya"
        yield (
            "error",
            ("network", "algorithm"),
            f'the {n.backend} backend has no algorithm "{n.algorithm}" (it has {", ".join(allowed)})',
            f"use network.backend: {other}",
        )
        return
    if n.backend == "kohya" and n.algorithm == "locon" and n.conv_dim is None:
        yield (
            "error",
            ("network", "conv_dim"),
            "locon trains the 3x3 conv layers and needs conv_dim",
            "set network.conv_dim (e.g. 8) and conv_alpha",
        )
    takes = ALGORITHM_ARGS[(n.backend, n.algorithm)]
    for key in n.args:
        if key not in takes:
            accepted = ", ".join(sorted(takes)) or "none"
            yield (
                "error",
                ("network", "args", key),
                f'algorithm "{n.algorithm}" ({n.backend} backend) does not take "{key}"',
                f"arguments it takes: {accepted}",
            )
    if not (n.train_unet or n.train_text_encoder):
        yield (
            "error",
            ("network", "train_unet"),
            "nothing to train: train_unet and train_text_encoder are both false",
            None,
        )


def _blocks(r: Recipe) -> Iterator[Finding]:
    n, family = r.network, r.model.family
    expected = BLOCK_COUNTS.get(family)
    for name in ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas"):
        values = getattr(n, name)
        if values is not None and expected is not None and len(values) != expected:
            yield (
                "error",
                ("network", name),
                f"{family} has {expected} blocks, got {len(values)} values",
                None,
            )
        if values is not None and n.backend != "kohya":
            yield (
                "error",
                ("network", name),
                "per-block ranks are a kohya-backend feature",
                "use network.backend: kohya",
            )
    if n.conv_block_dims is not None and n.conv_dim is None and n.backend == "kohya":
        yield ("warning", ("network", "conv_block_dims"), "conv_block_dims without conv_dim", None)


def _training(r: Recipe) -> Iterator[Finding]:
    t, n = r.training, r.network
    if t.max_train_epochs is None and t.max_train_steps is None:
        yield (
            "error",
            ("training", "max_train_epochs"),
            "set max_train_epochs or max_train_steps",
            None,
        )
    if t.min_timestep >= t.max_timestep:
        yield (
            "error",
            ("training", "min_timestep"),
            f"min_timestep {t.min_timestep} must be below max_timestep {t.max_timestep}",
            None,
        )
    lrs = [
        ("learning_rate", t.learning_rate),
        ("unet_lr", t.unet_lr),
        ("text_encoder_lr", t.text_encoder_lr),
    ]
    for name, value in lrs:
        if value is None:
            continue
        if t.optimizer in ADAPTIVE_OPTIMIZERS and 0 < value < 0.1:
            yield (
                "warning",
                ("training", name),
                f"{t.optimizer} finds the step size itself and expects {name} near 1.0, got {value:g}",
                "set it to 1.0 (or use AdamW for a fixed learning rate)",
            )
        if t.optimizer not in ADAPTIVE_OPTIMIZERS and value >= 0.01:
            yield (
                "warning",
                ("training", name),
                f"{name} {value:g} is very high for {t.optimizer} (LoRA usually trains at 1e-4 to 1e-3)",
                None,
            )
    if t.lr_warmup_steps and t.lr_scheduler == "constant":
        yield (
            "error",
            ("training", "lr_warmup_steps"),
            "the constant scheduler has no warm-up",
            "use lr_scheduler: constant_with_warmup, or lr_warmup_steps: 0",
        )
    yield from _single_lr_optimizers(r)
    if not n.train_text_encoder and (
        t.text_encoder_lr is not None or t.stop_text_encoder_training is not None
    ):
        yield (
            "warning",
            ("training", "text_encoder_lr"),
            "the text encoder is not trained, so its settings have no effect",
            None,
        )
    if t.min_snr_gamma is not None and t.debiased_estimation_loss:
        yield (
            "warning",
            ("training", "debiased_estimation_loss"),
            "min_snr_gamma and debiased estimation both reweight the loss by timestep",
            "pick one",
        )
    has_reg = any(s.is_reg for s in r.dataset.subsets)
    if t.prior_loss_weight != 1.0 and not has_reg:
        yield (
            "warning",
            ("training", "prior_loss_weight"),
            "prior_loss_weight only affects regularization subsets, and there are none",
            None,
        )


def _single_lr_optimizers(r: Recipe) -> Iterator[Finding]:
    """Prodigy and most D-Adaptation optimizers crash on groups with different learning rates."""
    t, n = r.training, r.network
    if t.optimizer not in SINGLE_LR_OPTIMIZERS:
        return
    unet_lr = t.unet_lr if t.unet_lr is not None else t.learning_rate
    te_lr = t.text_encoder_lr if t.text_encoder_lr is not None else t.learning_rate
    both_train = n.train_unet and n.train_text_encoder
    causes = [
        (("training", "text_encoder_lr"), "unet_lr and text_encoder_lr differ")
        if both_train and unet_lr != te_lr
        else None,
        (("network", "loraplus_lr_ratio"), "LoRA+ gives the up weights another learning rate")
        if n.loraplus_lr_ratio is not None
        else None,
        (("network", "down_lr_weight"), "per-block learning-rate weights give blocks other rates")
        if any(
            getattr(n, f) is not None for f in ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
        )
        else None,
    ]
    for path, why in filter(None, causes):
        yield (
            "error",
            path,
            f"{t.optimizer} needs one learning rate for every parameter group, but {why}",
            "use the same learning rate everywhere, or AdamW",
        )


def _precision(r: Recipe) -> Iterator[Finding]:
    t = r.training
    if t.full_fp16 and t.full_bf16:
        yield (
            "error",
            ("training", "full_bf16"),
            "full_fp16 and full_bf16 exclude each other",
            None,
        )
    if t.full_fp16 and t.mixed_precision != "fp16":
        yield ("error", ("training", "full_fp16"), "full_fp16 needs mixed_precision: fp16", None)
    if t.full_bf16 and t.mixed_precision != "bf16":
        yield ("error", ("training", "full_bf16"), "full_bf16 needs mixed_precision: bf16", None)
    if t.fp8_base and t.mixed_precision == "no":
        yield (
            "error",
            ("training", "fp8_base"),
            "fp8 base weights need mixed_precision fp16 or bf16",
            None,
        )


def _prediction(r: Recipe) -> Iterator[Finding]:
    t, family = r.training, r.model.family
    v = t.v_parameterization if t.v_parameterization is not None else family == "sd2-v"
    if family == "sd2-v" and t.v_parameterization is False:
        yield (
            "error",
            ("training", "v_parameterization"),
            "sd2-v models predict v; training them with epsilon breaks them",
            "remove v_parameterization or use model.family: sd2",
        )
    if family in ("sd1", "sd2", "sdxl") and t.v_parameterization:
        yield (
            "warning",
            ("training", "v_parameterization"),
            f"{family} base models predict noise (epsilon), not v",
            None,
        )
    if t.zero_terminal_snr and not v:
        yield (
            "warning",
            ("training", "zero_terminal_snr"),
            "zero terminal SNR is meant for v-prediction models",
            None,
        )
    if (t.scale_v_pred_loss_like_noise_pred or t.v_pred_like_loss) and not v:
        yield (
            "warning",
            ("training", "scale_v_pred_loss_like_noise_pred"),
            "v-prediction loss options have no effect without v-prediction",
            None,
        )
    if family == "sdxl" and r.model.clip_skip != 1:
        yield (
            "warning",
            ("model", "clip_skip"),
            "SDXL ignores clip_skip (it always uses the penultimate layer)",
            "remove clip_skip",
        )


def _dataset(r: Recipe) -> Iterator[Finding]:
    d = r.dataset
    if all(s.is_reg or s.is_validation for s in d.subsets):
        yield (
            "error",
            ("dataset", "subsets"),
            "every subset is a regularization or validation subset; add training images",
            None,
        )
    if d.enable_bucket:
        step = d.bucket_reso_steps
        for name in ("min_bucket_reso", "max_bucket_reso"):
            if getattr(d, name) % step:
                yield (
                    "error",
                    ("dataset", name),
                    f"{name} {getattr(d, name)} is not a multiple of bucket_reso_steps {step}",
                    None,
                )
        if d.min_bucket_reso > d.max_bucket_reso:
            yield (
                "error",
                ("dataset", "min_bucket_reso"),
                "min_bucket_reso is larger than max_bucket_reso",
                None,
            )
        if max(d.resolution) > d.max_bucket_reso:
            yield (
                "error",
                ("dataset", "max_bucket_reso"),
                f"max_bucket_reso {d.max_bucket_reso} is below the resolution {max(d.resolution)}",
                f"set max_bucket_reso to at least {max(d.resolution)}",
            )
    if any(v % 8 for v in d.resolution):
        yield (
            "error",
            ("dataset", "resolution"),
            f"resolution {d.resolution} must be a multiple of 8 (the VAE downsamples by 8)",
            None,
        )
    if r.model.family == "sdxl" and max(d.resolution) < 1024:
        yield (
            "warning",
            ("dataset", "resolution"),
            "SDXL was trained at 1024; lower resolutions give blurry results",
            None,
        )
    for i, s in enumerate(d.subsets):
        if s.keep_tokens and s.keep_tokens_separator:
            yield (
                "warning",
                ("dataset", "subsets", i, "keep_tokens"),
                "keep_tokens_separator wins over keep_tokens when present",
                None,
            )


def _output(r: Recipe) -> Iterator[Finding]:
    o = r.output
    if o.save_last_n is not None and o.save_every_n_epochs is None and o.save_every_n_steps is None:
        yield (
            "warning",
            ("output", "save_last_n"),
            "save_last_n without save_every_n_epochs/steps keeps nothing extra",
            None,
        )
