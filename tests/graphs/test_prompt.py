"""graphs.prompt: queries are checked before tokenisation (issue 15: inputs the code never imagined)."""

from __future__ import annotations

import pytest

from graphs.errors import InputError
from graphs.prompt import CONTROL_TOKENS, MAX_CHARS_PER_TOKEN, check_query, prompt_text, tokenize_prompt


class _NeverCalled:
    """A tokenizer that fails the test if anything reaches it."""

    def __call__(self, *a, **k):
        raise AssertionError("the tokenizer ran on a query that should have been refused first")


@pytest.mark.parametrize("token", CONTROL_TOKENS)
def test_control_tokens_refused(token):
    with pytest.raises(InputError, match="control token") as err:
        prompt_text(f"where is {token} the cat", "single-pass")
    assert token in str(err.value)


def test_non_utf8_argv_refused():
    query = b"where is the caf\xe9".decode("utf-8", errors="surrogateescape")  # how Python hands over such argv
    with pytest.raises(InputError, match="not valid UTF-8"):
        check_query(query)


@pytest.mark.parametrize("query", ["", "   \n\t"])
def test_empty_refused(query):
    with pytest.raises(InputError, match="empty"):
        check_query(query)


def test_non_text_refused():
    with pytest.raises(InputError, match="must be text"):
        check_query(b"bytes")


def test_huge_query_refused_before_tokenising():
    query = "cat " * (MAX_CHARS_PER_TOKEN * 64)  # 4x the character bound for 64 positions
    with pytest.raises(InputError, match="characters"):
        tokenize_prompt(_NeverCalled(), query, "single-pass", n_image_tokens=16, max_positions=64)


def test_plain_query_passes_stripped():
    assert check_query("  Where is the café's 招牌?  ", max_positions=64) == "Where is the café's 招牌?"
