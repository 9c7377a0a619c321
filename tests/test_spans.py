import pytest

from seam.runtime.spans import Span


def test_span_is_half_open():
    span = Span(2, 5)
    assert list(span) == [2, 3, 4]
    assert len(span) == 3
    assert 2 in span and 5 not in span


def test_span_covers_and_rejects_reversed_bounds():
    assert Span(0, 4).covers(Span(1, 4))
    assert not Span(1, 4).covers(Span(0, 2))
    with pytest.raises(ValueError):
        Span(3, 2)
