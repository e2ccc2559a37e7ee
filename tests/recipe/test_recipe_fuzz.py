"""Property tests: any YAML document either validates or yields clean problems, never an exception."""

from __future__ import annotations

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
