"""Property tests: any YAML document either validates or yields clean problems, never an exception."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraforge.recipe import validate_recipe_text

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    # the classes of hostile values issue 17 found: huge and non-finite numbers, huge integers
    # written as floats, paths no file system takes
    st.sampled_from([10**39, 10**400, 1e308, float("inf"), -float("inf"), 64.0]),
    st.sampled_from(["a" * 4096, "/" + "a" * 300, "a\x00b", "a/" * 2100]),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(
                st.sampled_from(
                    ["model", "dataset", "network", "subsets", "dir", "base", "dim", "training"]
                ),
                st.text(max_size=8),
            ),
            children,
            max_size=5,
        ),
    ),
    max_leaves=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_arbitrary_structures_never_raise(doc) -> None:
    text = yaml.safe_dump(doc, allow_unicode=True)
    validation = validate_recipe_text(text)
    assert validation.recipe is not None or validation.errors


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_never_raises(text: str) -> None:
    validation = validate_recipe_text(text)
    assert validation.recipe is not None or validation.errors


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["dim", "alpha", "conv_dim", "dropout", "args", "algorithm"]),
        scalars,
        max_size=6,
    )
)
def test_network_section_values(network) -> None:
    doc = {"model": {"base": "a/b"}, "dataset": {"subsets": [{"dir": "d"}]}, "network": network}
    validation = validate_recipe_text(yaml.safe_dump(doc))
    assert validation.recipe is not None or validation.errors


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(documents.map(lambda d: yaml.safe_dump(d, allow_unicode=True)), st.text(max_size=120))
)
def test_check_cli_never_lets_an_exception_escape(tmp_path_factory, text: str) -> None:
    from loraforge.cli import main

    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        main(["check", str(path), "--format", "json"])
        code = 0
    except SystemExit as e:
        code = e.code
    assert code in (0, 1)


# --- Hostile values (issue 17): every one is a finding at its field's line, never a traceback ---

MINIMAL_DOC = {"model": {"base": "org/model"}, "dataset": {"subsets": [{"dir": "data"}]}}
PLACEHOLDER = "__VALUE__"


def _numeric_fields() -> list[tuple[tuple, str]]:
    """``(path, json type)`` of every number/integer field of the schema (list items as 0)."""
    from loraforge.recipe import load_schema

    found = []

    def walk(node: dict, path: tuple) -> None:
        kinds = node.get("type")
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if "integer" in kinds or "number" in kinds:
            found.append((path, "integer" if "integer" in kinds else "number"))
            BOUNDED[path] = BOUNDED.get(path, True) and bool(
                {"maximum", "exclusiveMaximum", "enum"} & node.keys()
            )
        for name, child in node.get("properties", {}).items():
            walk(child, (*path, name))
        if isinstance(node.get("items"), dict):
            walk(node["items"], (*path, 0))
        for child in node.get("oneOf", []):
            walk(child, path)

    walk(load_schema(), ())
    return sorted(set(found))


BOUNDED: dict[tuple, bool] = {}
NUMERIC_FIELDS = _numeric_fields()


def _document_with(path: tuple, token: str) -> tuple[str, int]:
    """A minimal recipe with ``token`` (raw YAML) at ``path``, and the 1-based line it is on."""
    import copy

    doc = copy.deepcopy(MINIMAL_DOC)
    node: object = doc
    for part, following in zip(path, (*path[1:], None), strict=True):
        container = {} if not isinstance(following, int) else []
        if following is None:
            container = PLACEHOLDER
        if isinstance(part, int):
            if not node:  # type: ignore[truthy-bool]
                node.append({"prompt": "p"} if path[0] == "sample" else container)  # type: ignore[union-attr]
            if following is None:
                node[0] = container  # type: ignore[index]
            node = node[0]  # type: ignore[index]
        else:
            node.setdefault(part, container)  # type: ignore[union-attr]
            if following is None:
                node[part] = container  # type: ignore[index]
            node = node[part]  # type: ignore[index]
    text = yaml.safe_dump(doc, sort_keys=False).replace(PLACEHOLDER, token)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if token in row)
    return text, line


HOSTILE_NUMBERS = [
    ".nan",
    ".inf",
    "-.inf",
    "1e400",  # overflows to infinity
    "9" * 5000,  # more digits than Python's int() accepts
    "1" + "0" * 39,  # 1e39: beyond every field's maximum, and beyond float32
    "1e308",  # a float in an integer field; beyond every maximum
]


def test_every_numeric_field_has_a_maximum() -> None:
    assert NUMERIC_FIELDS and not [path for path, bounded in BOUNDED.items() if not bounded]


@pytest.mark.parametrize("field", [p for p, _ in NUMERIC_FIELDS], ids=str)
def test_hostile_numbers_are_errors_at_the_field(field: tuple) -> None:
    from loraforge.recipe.problems import format_path

    tokens = list(HOSTILE_NUMBERS)
    if dict(NUMERIC_FIELDS)[field] == "integer":
        tokens.append("64.0")  # integer fields take integers only
    for token in tokens:
        text, line = _document_with(field, token)
        validation = validate_recipe_text(text, source="r.yaml")
        assert validation.recipe is None, (field, token)
        where = format_path(field)
        # an item of a either-or field (resolution: 512 or [w, h]) is reported at that field
        placed = [p for p in validation.errors if where in (p.path, f"{p.path}[0]")]
        assert len(placed) == 1, (field, token, validation.errors)  # one finding per value
        assert placed[0].line in (line, line - (placed[0].path != where)), (field, token)


def test_non_finite_numbers_are_refused_in_free_form_fields_too() -> None:
    text = yaml.safe_dump({**MINIMAL_DOC, "training": {"optimizer_args": {"betas": [0.9, 1]}}})
    validation = validate_recipe_text(text.replace("- 1\n", "- .nan\n"), source="r.yaml")
    assert [p.path for p in validation.errors] == ["training.optimizer_args.betas[1]"]
    assert "not a finite number" in validation.errors[0].message


PATH_FIELDS = [
    ("model", "base"),
    ("model", "vae"),
    ("dataset", "subsets", 0, "dir"),
    ("cache", "dir"),
    ("network", "weights"),
    ("output", "dir"),
    ("logging", "dir"),
    ("tagging", "model"),
]
HOSTILE_PATHS = {
    "too long": "a" * 4096,
    "too long, absolute": "/" + "a" * 4096,
    "too long in all": "a/" * 2100,
    "NUL": "a\\0b",
    "NUL, absolute": "/tmp/a\\0b.safetensors",
}


@pytest.mark.parametrize("field", PATH_FIELDS, ids=str)
@pytest.mark.parametrize("value", list(HOSTILE_PATHS.values()), ids=list(HOSTILE_PATHS))
def test_unusable_paths_are_errors_at_the_field(field: tuple, value: str, tmp_path) -> None:
    from loraforge.recipe.problems import format_path

    text, line = _document_with(field, f'"{value}"')
    validation = validate_recipe_text(text, source="r.yaml", base_dir=tmp_path)
    placed = [p for p in validation.errors if p.path == format_path(field)]
    assert placed and placed[0].line == line, validation.problems
    assert "NUL" in placed[0].message or "too long" in placed[0].message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        (("output", "name"), "a\\0b"),
        (("output", "name"), "n" * 300),
        (("dataset", "subsets", 0, "caption_extension"), ".t\\0xt"),
    ],
)
def test_file_names_with_nul_or_too_long_are_errors(field: tuple, value: str) -> None:
    text, line = _document_with(field, f'"{value}"')
    validation = validate_recipe_text(text, source="r.yaml")
    assert [p.line for p in validation.errors] == [line]


ALIAS_BOMBS = {
    "recursive list": "a: &a [*a]\n",
    "recursive mapping": "a: &a {b: *a}\n",
    "recursive merge": "a: &a {<<: *a}\n",
    "billion laughs": "l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10)),
}


@pytest.mark.parametrize("bomb", list(ALIAS_BOMBS.values()), ids=list(ALIAS_BOMBS))
def test_alias_bombs_are_refused_at_once(bomb: str) -> None:
    import time

    started = time.process_time()
    validation = validate_recipe_text(bomb + "model: {base: a/b}\n", source="r.yaml")
    assert time.process_time() - started < 1.0  # a hang guard: it takes milliseconds
    assert [p.message.split(":")[0] for p in validation.errors] == ["refused"]
    assert validation.errors[0].line is not None


def test_aliases_within_the_budget_still_work() -> None:
    text = (
        "model: {base: a/b}\n"
        "dataset:\n  subsets:\n    - &s {dir: d, repeats: 3}\n    - *s\n"
        "tagging: {undesired_tags: &t [a, b], always_first_tags: *t}\n"
    )
    validation = validate_recipe_text(text)
    assert validation.errors == ()
    assert validation.recipe.tagging.always_first_tags == ("a", "b")


def test_validation_time_grows_linearly_with_the_recipe() -> None:
    """A regression guard for quadratic work (5,000 subsets took 32 s); the speed target itself
    is measured by benchmarks/check_speed.py."""
    import time

    def cpu_seconds(count: int) -> float:
        subsets = "".join(f"    - dir: d{i}\n      repeats: 2\n" for i in range(count))
        prompts = "".join(f"    - prompt: thing {i}\n" for i in range(count))
        text = (
            "model: {base: a/b}\ndataset:\n  subsets:\n"
            + subsets
            + "sample:\n  prompts:\n"
            + prompts
        )
        started = time.process_time()
        assert validate_recipe_text(text).errors == ()
        return time.process_time() - started

    cpu_seconds(50)  # warm-up: imports and caches
    small, large = cpu_seconds(400), cpu_seconds(4000)
    assert large < 30 * max(small, 0.01), (small, large)  # linear: ~10x; quadratic: ~100x


@pytest.mark.parametrize(
    "extra",
    [
        "training: {learning_rate: .nan}\n",
        "network: {alpha: .inf}\n",
        f"network: {{dim: {'9' * 5000}}}\n",
        "training: {max_train_steps: 1e308}\n",
        f"output: {{dir: '{'a' * 4096}'}}\n",
        'model: {base: "a\\0b.safetensors"}\n',
        "x: &x [*x]\n",
    ],
    ids=["nan", "inf", "5000 digits", "1e308 integer", "long path", "NUL path", "alias loop"],
)
def test_check_and_dry_run_report_hostile_values_without_a_traceback(
    extra: str, tmp_path, capsys
) -> None:
    from loraforge.cli import main

    recipe = tmp_path / "r.yaml"
    base = "model: {base: org/model}\ndataset: {subsets: [{dir: data}]}\n"
    if extra.startswith("model:"):
        base = base.split("\n", 1)[1]
    recipe.write_text(base + extra, encoding="utf-8")
    codes = []
    for args in (["check", str(recipe)], ["train", str(recipe), "--dry-run"]):
        try:
            main(args)
            codes.append(0)
        except SystemExit as e:
            codes.append(e.code)
    assert codes == [1, 2]
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert "r.yaml:" in captured.err  # the dry run names the place
