"""graphs/dims.py: the one reader of shape entries (ints, named dims, + and * expressions)."""

import pytest

from graphs.dims import DimError, check_dim, dim_names, eval_dim, is_named

SIZES = {"prefix_len": 3, "suffix_len": 5, "past_llm_0": 10, "step_len": 1}


@pytest.mark.parametrize("dim, want", [(7, 7), ("prefix_len", 3), ("prefix_len + 16 + suffix_len", 24),
                                       ("past_llm_0 + step_len", 11), ("2 * prefix_len", 6),
                                       ("prefix_len+suffix_len*2", 13), ("(prefix_len + 1) * 2", 8)])
def test_eval_dim(dim, want):
    assert eval_dim(dim, SIZES) == want


@pytest.mark.parametrize("dim, names", [(7, ()), ("prefix_len", ("prefix_len",)),
                                        ("prefix_len + 64 + suffix_len", ("prefix_len", "suffix_len")),
                                        ("a * a + b", ("a", "b"))])
def test_dim_names(dim, names):
    assert dim_names(dim) == names


def test_is_named():
    assert is_named("past_llm_0") and not is_named("past_llm_0 + step_len") and not is_named(4)
    assert not is_named("1x")


@pytest.mark.parametrize("dim, needle", [
    ("prefix_len - 1", "only non-negative ints"), ("max(prefix_len, 2)", "only non-negative ints"),
    ("prefix_len +", "does not parse"), ("__import__('os').system('x')", "only non-negative ints"),
    ("prefix_len ** 99", "only non-negative ints"), ("1.5 * prefix_len", "only non-negative ints"),
    ("True + prefix_len", "only non-negative ints"), ("x" * 300, "at most 256 characters"), ("", "does not parse"),
    (-3, "negative"), (2.5, "not an int"), (None, "not an int")])
def test_malformed_dims_are_refused(dim, needle):
    with pytest.raises(DimError, match=needle):
        check_dim(dim)
    if not isinstance(dim, int):
        with pytest.raises(DimError):
            dim_names(dim)


def test_unknown_name_has_no_size():
    with pytest.raises(DimError, match="names 'unknown', which has no size"):
        eval_dim("unknown + 1", SIZES)
