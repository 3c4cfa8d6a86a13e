"""Errors raised by the transport layer.

The transport package can ship alone, so its root is its own ``TransportError``;
``taskframe.errors`` re-exports every class here.

Hierarchy::

    TransportError
    ├── ImproperlyConfigured       bad URL, unknown scheme, missing client library
    ├── BrokerConnectionError      the broker cannot be reached (connect failed)
    │   └── ConnectionLost         an established connection dropped
    ├── PublishError               the broker refused a message (nack, unroutable)
    ├── SerializationError
    │   ├── EncodeError            an object cannot be serialized
    │   ├── DecodeError            bytes cannot be deserialized
    │   └── ContentDisallowed      the content type is not in ``accept_content``
    └── MessageStateError          ack/reject of a message that is already settled
"""

from __future__ import annotations

__all__ = [
    "BrokerConnectionError",
    "ConnectionLost",
    "ContentDisallowed",
    "DecodeError",
    "EncodeError",
    "ImproperlyConfigured",
    "MessageStateError",
    "PublishError",
    "SerializationError",
    "TransportError",
]


class TransportError(Exception):
    """Raised for any failure of the transport layer (root of this package's errors)."""


class ImproperlyConfigured(TransportError):
    """Raised when a URL, a scheme or an option is wrong, or a client library is missing."""


class BrokerConnectionError(TransportError):
    """Raised when the broker cannot be reached."""


class ConnectionLost(BrokerConnectionError):
    """Raised when an established connection to the broker drops."""


class PublishError(TransportError):
    """Raised when the broker refuses a message (negative confirm, unroutable return)."""


class SerializationError(TransportError):
    """Raised when a payload cannot be serialized or deserialized."""


class EncodeError(SerializationError):
    """Raised when an object cannot be serialized."""


class DecodeError(SerializationError):
    """Raised when bytes cannot be deserialized with their declared content type."""


class ContentDisallowed(SerializationError):
    """Raised when a message's content type is not in the accepted list."""


class MessageStateError(TransportError):
    """Raised when a message that was already acked or rejected is settled again."""
