"""Group a LoRA state dict into modules and recognise each module's algorithm.

Keys look like ``<module name>.<tensor>``: the module name is a kohya name without dots
(``lora_unet_…_to_q``), the tensor part names the algorithm's parameter (``lora_down.weight``,
``hada_w1_a``, ``lokr_w1``, ``oft_blocks``, ``diff`` …, see :data:`ALGORITHM_TENSORS`). The names
follow what kohya-ss/sd-scripts and LyCORIS write and what A1111/Forge/ComfyUI read.

Parsing never raises for a malformed module: it records a :class:`Problem` so that ``check`` can
report every problem at once; operations call :meth:`ParsedLora.require_valid`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from loraforge.errors import LoraFileError

#: tensor names (after the module name) that identify each algorithm, and the optional extras.
ALGORITHM_TENSORS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "lora": (frozenset({"lora_down.weight", "lora_up.weight"}), frozenset({"lora_mid.weight"})),
    "loha": (
        frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
        frozenset({"hada_t1", "hada_t2"}),
    ),
    "lokr": (
        frozenset(),
        frozenset(
            {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
        ),
    ),
    "ia3": (frozenset({"weight"}), frozenset({"on_input"})),
    "oft": (frozenset({"oft_blocks"}), frozenset({"rescale"})),
    "glora": (frozenset({"a1.weight", "a2.weight", "b1.weight", "b2.weight"}), frozenset()),
    "full": (frozenset({"diff"}), frozenset({"diff_b"})),
    # LyCORIS train_norm: LayerNorm/GroupNorm weight and bias deltas
    "norm": (frozenset({"w_norm"}), frozenset({"b_norm"})),
}
#: per algorithm, the tensor that is a delta of the layer's bias (``bias += ratio · delta``)
BIAS_TENSORS = {"full": "diff_b", "norm": "b_norm"}
#: tensors any algorithm may carry.
COMMON_TENSORS = frozenset({"alpha", "dora_scale"})


#: every algorithm name this module reports (``locon``/``boft``/``dora`` are refinements).
ALGORITHMS = (
    "lora", "locon", "loha", "lokr", "ia3", "oft", "boft", "full", "glora", "norm", "dora",
)  # fmt: skip


@dataclass(frozen=True)
class Problem:
    """Something wrong with a file or module.

    Attributes:
        severity: ``"error"`` (the file is broken / cannot be used) or ``"warning"``.
        module: the module name, or ``None`` for the file as a whole.
        message: what is wrong.
    """

    severity: str
    module: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.module}: {self.message}" if self.module else self.message


@dataclass(frozen=True)
class LoraModule:
    """One adapted layer.

    Attributes:
        name: the kohya module name (``lora_unet_…``).
        algorithm: ``lora`` (incl. LoCon), ``loha``, ``lokr``, ``ia3``, ``oft`` (incl. BOFT),
            ``glora``, ``full`` or ``norm`` (a LayerNorm/GroupNorm delta, LyCORIS train_norm).
        tensors: the module's tensors by their name after the module name (without ``alpha``).
        alpha: the stored alpha, ``None`` when the file has none.
    """

    name: str
    algorithm: str
    tensors: Mapping[str, torch.Tensor]
    alpha: float | None

    @property
    def dora(self) -> bool:
        """Weight-decomposed (DoRA / DoHa / DoKr): a ``dora_scale`` tensor is present."""
        return "dora_scale" in self.tensors

    @property
    def dora_on_output(self) -> bool | None:
        """DoRA magnitude per output row (``dora_scale`` ``(out, 1, …)``, lycoris-lora's
        ``wd_on_output``) rather than per input column (``(1, in, …)``); ``None`` without DoRA."""
        if not self.dora:
            return None
        scale = self.tensors["dora_scale"]
        return scale.dim() >= 2 and scale.shape[0] != 1

    @property
    def bias_delta(self) -> torch.Tensor | None:
        """What the module adds to the layer's bias (full ``diff_b``, norm ``b_norm``)."""
        key = BIAS_TENSORS.get(self.algorithm)
        return None if key is None else self.tensors.get(key)

    @property
    def boft(self) -> bool:
        return self.algorithm == "oft" and self.tensors["oft_blocks"].dim() == 4

    @property
    def rank(self) -> int | None:
        """The rank a reader divides alpha by (``None`` for algorithms without one)."""
        t = self.tensors
        if self.algorithm == "lora":
            return int(t["lora_down.weight"].shape[0])
        if self.algorithm == "loha":
            return int(t["hada_w1_b"].shape[0])
        if self.algorithm == "lokr":
            # ComfyUI and A1111: the w2 factorisation's rank wins, else w1's, else no scaling.
            if "lokr_w2_b" in t:
                return int(t["lokr_w2_b"].shape[0])
            if "lokr_w1_b" in t:
                return int(t["lokr_w1_b"].shape[0])
            return None
        if self.algorithm == "glora":
            return _glora_rank(t)
        return None

    @property
    def scale(self) -> float:
        """``alpha / rank`` as A1111/ComfyUI apply it (1.0 without alpha or rank)."""
        rank = self.rank
        if self.algorithm in ("ia3", "oft", "full", "norm") or rank is None or self.alpha is None:
            return 1.0
        return self.alpha / rank

    @property
    def kernel(self) -> tuple[int, ...]:
        """The spatial kernel of the adapted layer (``()`` for a linear layer)."""
        t = self.tensors
        if self.algorithm == "lora":
            source = t.get("lora_mid.weight", t["lora_down.weight"])
            return tuple(int(s) for s in source.shape[2:])
        if self.algorithm == "full":
            return tuple(int(s) for s in t["diff"].shape[2:])
        return ()

    @property
    def is_conv3x3(self) -> bool:
        """A conv layer with a spatial kernel larger than 1x1 (LoCon territory)."""
        return any(k > 1 for k in self.kernel)


def glora_old_layout(t: Mapping[str, torch.Tensor]) -> bool:
    """Whether GLoRA tensors use the old layout (``a1`` ``(r, in)``, ``b2`` ``(out, r)``).

    lycoris-lora 2+ writes ``a1`` ``(in, r)``, ``a2`` ``(r, in)``, ``b1`` ``(out, r)``, ``b2``
    ``(r, in)``. On a square layer both layouts fit the shapes; the rank, the smaller of the two
    candidate sizes, tells them apart (equal sizes: the current layout).
    """
    a1, a2, b1, b2 = (t[k] for k in ("a1.weight", "a2.weight", "b1.weight", "b2.weight"))
    old = b2.shape[1] == b1.shape[0] == a1.shape[0] == a2.shape[1]
    new = b2.shape[0] == b1.shape[1] == a1.shape[1] == a2.shape[0]
    if old and new:
        return a1.shape[0] < a2.shape[0]
    return old


def _glora_rank(t: Mapping[str, torch.Tensor]) -> int:
    return int(t["a1.weight"].shape[0] if glora_old_layout(t) else t["a2.weight"].shape[0])


@dataclass(frozen=True)
class ParsedLora:
    """A LoRA state dict grouped into modules.

    Attributes:
        modules: by module name, in key order.
        problems: structural problems found while grouping (errors and warnings).
        stray_keys: keys that belong to no module (e.g. a diffusers/PEFT key).
        label: how messages name the source (a file path).
        unrecognised_keys: tensors of a module that its algorithm does not use.
    """

    modules: dict[str, LoraModule]
    problems: tuple[Problem, ...] = ()
    stray_keys: tuple[str, ...] = ()
    label: str = "<state dict>"
    unrecognised_keys: tuple[str, ...] = ()

    @property
    def unused_keys(self) -> tuple[str, ...]:
        """Every key no operation reads: stray keys and unrecognised module tensors."""
        return self.stray_keys + self.unrecognised_keys

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")

    @property
    def algorithm(self) -> str:
        """The file's algorithm as users name it (``lora``, ``locon``, ``dora``, ``loha`` …).

        A file mixing algorithms reports them joined by ``+`` (``lokr+full``).
        """
        names: Counter[str] = Counter()
        for m in self.modules.values():
            names[user_algorithm(m)] += 1
        if {"lora", "locon"} <= set(names):
            names["locon"] += names.pop("lora")
        if not names:
            return "none"
        return "+".join(sorted(names, key=lambda n: (-names[n], n)))

    def require_valid(self) -> None:
        """Raise when the file is not usable as a LoRA.

        Raises:
            LoraFileError: listing every structural error (first ten).
        """
        errors = self.errors
        if not self.modules and not errors:
            keys = ", ".join(self.stray_keys[:3]) or "no tensors"
            raise LoraFileError(
                f"{self.label}: is not a LoRA file: no LoRA/LyCORIS modules found ({keys} …)",
                hint="pass a kohya-style LoRA (lora_unet_*/lora_te_* keys); a full checkpoint "
                "goes to `loraforge merge --base`",
            )
        if errors:
            shown = "\n  ".join(str(p) for p in errors[:10])
            more = f"\n  … and {len(errors) - 10} more" if len(errors) > 10 else ""
            raise LoraFileError(
                f"{self.label}: {len(errors)} broken module(s):\n  {shown}{more}",
                hint="the file is damaged or was written by an incompatible tool; "
                "`loraforge check` lists every problem",
            )


def user_algorithm(m: LoraModule) -> str:
    if m.algorithm == "lora":
        if m.dora:
            return "dora"
        return "locon" if m.is_conv3x3 or "lora_mid.weight" in m.tensors else "lora"
    if m.algorithm == "oft" and m.boft:
        return "boft"
    return m.algorithm


def parse_lora(tensors: Mapping[str, torch.Tensor], label: str = "<state dict>") -> ParsedLora:
    """Group ``tensors`` into modules, recognise algorithms and check tensor shapes.

    Args:
        tensors: a LoRA state dict with kohya/LyCORIS key names.
        label: how messages name the source.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, dot, suffix = key.partition(".")
        if not dot:
            groups.setdefault(key, {})["<bare>"] = value
            continue
        groups.setdefault(name, {})[suffix] = value
    modules: dict[str, LoraModule] = {}
    problems: list[Problem] = []
    stray: list[str] = []
    for name, parts in groups.items():
        module, module_problems = _build_module(name, parts)
        problems.extend(module_problems)
        if module is not None:
            modules[name] = module
        elif not module_problems:  # not a module at all (a broken one is reported instead)
            stray.extend(f"{name}.{s}" if s != "<bare>" else name for s in parts)
    if modules and stray:
        problems.append(
            Problem("warning", None, f"{len(stray)} key(s) belong to no module: {stray[:3]}")
        )
    unrecognised = tuple(
        f"{name}.{suffix}"
        for name, module in modules.items()
        for suffix in groups[name]
        if suffix not in module.tensors and suffix != "alpha"
    )
    return ParsedLora(modules, tuple(problems), tuple(stray), label, unrecognised)


def _build_module(
    name: str, parts: dict[str, torch.Tensor]
) -> tuple[LoraModule | None, list[Problem]]:
    algorithm = _detect_algorithm(parts)
    if algorithm is None:
        return None, []
    problems: list[Problem] = []
    required, optional = ALGORITHM_TENSORS[algorithm]
    missing = sorted(required - parts.keys())
    if missing:
        problems.append(Problem("error", name, f"{algorithm} module lacks {', '.join(missing)}"))
        return None, problems
    from loraforge.ops.validation import read_alpha, tensor_problems

    unknown = sorted(parts.keys() - required - optional - COMMON_TENSORS)
    if unknown:
        problems.append(Problem("warning", name, f"unrecognised tensors {unknown} ignored"))
    scales = algorithm in ("lora", "loha", "lokr", "glora")
    alpha = read_alpha(name, parts.get("alpha"), problems, scales=scales)
    kept = {k: v for k, v in parts.items() if k in required | optional | {"dora_scale"}}
    module = LoraModule(name, algorithm, kept, alpha)
    shape_error = _shape_error(module)
    if shape_error:
        problems.append(Problem("error", name, shape_error))
        return None, problems
    problems += tensor_problems(name, kept)
    if "alpha" not in parts and module.rank is not None:
        problems.append(
            Problem(
                "warning",
                name,
                "has no alpha; read as alpha = rank (scale 1.0), as kohya, A1111 and diffusers do",
            )
        )
    return module, problems


def _detect_algorithm(parts: Mapping[str, torch.Tensor]) -> str | None:
    keys = parts.keys()
    if "lora_down.weight" in keys or "lora_up.weight" in keys:
        return "lora"
    if any(k.startswith("hada_") for k in keys):
        return "loha"
    if any(k.startswith("lokr_") for k in keys):
        return "lokr"
    if "oft_blocks" in keys:
        return "oft"
    if "a1.weight" in keys or "b1.weight" in keys:
        return "glora"
    if "diff" in keys:
        return "full"
    if "w_norm" in keys or "b_norm" in keys:
        return "norm"
    if "on_input" in keys or set(keys) == {"weight"}:
        return "ia3"
    return None


def _shape_error(m: LoraModule) -> str | None:
    t = m.tensors
    if m.algorithm == "lora":
        return _lora_shape_error(t)
    if m.algorithm == "loha":
        w1a, w1b, w2a, w2b = (t[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        if "hada_t1" in t:
            return None  # Tucker layout: ranks are checked by the einsum when the delta is built
        if w1a.shape[1] != w1b.shape[0] or w2a.shape[1] != w2b.shape[0]:
            return (
                f"LoHa ranks disagree: w1 {tuple(w1a.shape)}x{tuple(w1b.shape)}, "
                f"w2 {tuple(w2a.shape)}x{tuple(w2b.shape)}"
            )
        if w1a.shape[0] != w2a.shape[0] or w1b.shape[1:] != w2b.shape[1:]:
            return "LoHa halves have different output/input sizes"
        return None
    if m.algorithm == "lokr":
        has1 = "lokr_w1" in t or {"lokr_w1_a", "lokr_w1_b"} <= t.keys()
        has2 = "lokr_w2" in t or {"lokr_w2_a", "lokr_w2_b"} <= t.keys()
        if not (has1 and has2):
            return "LoKr module needs lokr_w1 (or lokr_w1_a+b) and lokr_w2 (or lokr_w2_a+b)"
        return None
    if m.algorithm == "oft" and t["oft_blocks"].dim() not in (3, 4):
        return f"oft_blocks has {t['oft_blocks'].dim()} dims, expected 3 (OFT) or 4 (BOFT)"
    return None


def _lora_shape_error(t: Mapping[str, torch.Tensor]) -> str | None:
    down, up = t["lora_down.weight"], t["lora_up.weight"]
    if down.dim() not in (2, 4) or up.dim() != down.dim():
        return (
            f"lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} "
            "are not a linear or conv pair"
        )
    mid = t.get("lora_mid.weight")
    rank = down.shape[0]
    if up.shape[1] != (mid.shape[0] if mid is not None else rank):
        return (
            f"lora_up {tuple(up.shape)} does not match lora_down {tuple(down.shape)}: "
            f"rank {up.shape[1]} vs {rank}"
        )
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        return f"lora_up has kernel {tuple(up.shape[2:])}, expected 1x1"
    if mid is not None and (mid.dim() != 4 or mid.shape[1] != rank):
        return f"lora_mid {tuple(mid.shape)} does not match lora_down {tuple(down.shape)}"
    return None
