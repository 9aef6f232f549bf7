"""Partitioning a layer sequence into contiguous pipeline stages (solvers in C++).

`partition_uniform` and `partition_balanced` return exactly what
`deepspeed.runtime.utils` returns for the same input. `partition_minmax` is the
exact partition that minimises the heaviest stage.
"""
from collections.abc import Iterable

from ._native import _C

__all__ = ["partition_uniform", "partition_balanced", "partition_minmax", "max_part_weight"]


def _check_count(value, name):
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy
            if isinstance(value, numpy.integer):
                return int(value)
        except ImportError:  # pragma: no cover
            pass
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def _as_weights(weights):
    # Only the conversion lives here; the C++ solvers reject negative and
    # non-finite weights (ValueError naming the layer).
    try:
        return [float(w) for w in weights]
    except (TypeError, ValueError) as err:
        raise TypeError(f"weights must be a sequence of numbers: {err}") from None


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """Boundaries (num_parts + 1 ints) giving each part the same number of items."""
    return _C.partition_uniform(_check_count(num_items, "num_items"), _check_count(num_parts, "num_parts"))


def partition_balanced(weights: Iterable[float], num_parts: int) -> list[int]:
    """DeepSpeed's balanced partition: minimises (heaviest part - lightest part)."""
    return _C.partition_balanced(_as_weights(weights), _check_count(num_parts, "num_parts"))


def partition_minmax(weights: Iterable[float], num_parts: int) -> list[int]:
    """The contiguous partition whose heaviest part is as light as possible.

    Every part is non-empty when there are at least as many items as parts.
    """
    return _C.partition_minmax(_as_weights(weights), _check_count(num_parts, "num_parts"))


def max_part_weight(weights: Iterable[float], parts: Iterable[int]) -> float:
    """The weight of the heaviest part of `parts`."""
    values = _as_weights(weights)
    _C.check_weights(values)
    return _C.max_part_weight(values, [int(p) for p in parts])
