"""Dim expressions: the one reader of a tensor shape's entries.

A shape entry (`TensorSpec.shape`) is a static int, a named dim ("prefix_len", a key of the layout's `dims`) or
an expression of ints and named dims with `+` and `*` ("prefix_len + 64 + suffix_len", a generate-mode KV
length). Everything that reads an entry (the manifest check, the exporter's sample sizes, the runners' bindings,
engine profiles, buffer plans, graph I/O checks) goes through this module, so they agree on what an entry means.
"""

from __future__ import annotations

import ast
from functools import lru_cache

from graphs.errors import ToolchainError


class DimError(ToolchainError):
    """A shape entry that is not an int, a named dim, or ints and named dims joined by + and *."""


Dim = int | str


@lru_cache(maxsize=1024)
def _parse(dim: str) -> ast.expr:
    if not isinstance(dim, str) or len(dim) > 256:
        raise DimError(f"dim {dim!r} is not an int or a dim expression of at most 256 characters")
    try:
        tree = ast.parse(dim, mode="eval").body
    except SyntaxError:
        raise DimError(f"dim expression {dim!r} does not parse; expected ints and named dims joined by + and *"
                       ) from None
    for node in ast.walk(tree):
        ok = (isinstance(node, ast.Name) or isinstance(node, (ast.Add, ast.Mult, ast.Load))
              or (isinstance(node, ast.Constant) and type(node.value) is int and node.value >= 0)
              or (isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult))))
        if not ok:
            raise DimError(f"dim expression {dim!r}: only non-negative ints, named dims, + and * are allowed")
    return tree


def check_dim(dim: Dim) -> None:
    """Raise DimError unless `dim` is a non-negative int or a well-formed dim expression."""
    if type(dim) is int:
        if dim < 0:
            raise DimError(f"dim {dim} is negative")
        return
    _parse(dim)


def is_named(dim: Dim) -> bool:
    """True for a named dim ("prefix_len"); False for a static int or an expression ("prefix_len + 16 + suffix_len")."""
    return isinstance(dim, str) and dim.isidentifier()


def dim_names(dim: Dim) -> tuple[str, ...]:
    """The named dims `dim` uses, in order of appearance (none for an int)."""
    if type(dim) is int:
        return ()
    names = sorted((n.col_offset, n.id) for n in ast.walk(_parse(dim)) if isinstance(n, ast.Name))
    return tuple(dict.fromkeys(name for _, name in names))


def eval_dim(dim: Dim, sizes: dict[str, int]) -> int:
    """The size of `dim` given a size for each named dim.

    Args:
        dim (int or str): a static size, a named dim, or an expression of them with + and *.
        sizes (dict[str, int]): named dim -> size.

    Raises:
        DimError: a malformed expression, or a named dim with no size.
    """
    if type(dim) is int:
        return dim
    if is_named(dim) and dim in sizes:
        return sizes[dim]

    def walk(node) -> int:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in sizes:
                raise DimError(f"dim {dim!r} names {node.id!r}, which has no size")
            return sizes[node.id]
        a, b = walk(node.left), walk(node.right)
        return a + b if isinstance(node.op, ast.Add) else a * b

    return walk(_parse(dim))
