"""The public API of taskframe.transport is pinned: changing it is a decision."""

from __future__ import annotations

import taskframe.transport as transport


def test_all_is_pinned_and_sorted() -> None:
    assert transport.__all__ == [
        "Connection",
        "Consumer",
        "Envelope",
        "Exchange",
        "Message",
        "Producer",
        "Queue",
        "Transport",
        "dumps",
        "errors",
        "loads",
    ]
    for name in transport.__all__:
        assert getattr(transport, name) is not None


def test_errors_share_one_root() -> None:
    errors = transport.errors
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.TransportError)
    assert issubclass(errors.ConnectionLost, errors.BrokerConnectionError)
