"""Frames to messages and back: one cattrs converter, two codecs.

``agor.v1.json`` frames are WebSocket *text* frames holding JSON (orjson);
``agor.v1.cbor`` frames are *binary* frames holding CBOR (cbor2).  Both carry
the same data model, the JSON one: maps with text keys, arrays, text, integers
(64-bit), finite floats, booleans and null.  A CBOR frame that holds anything
else (byte strings, tags, ``undefined``, simple values, non-text keys, NaN) is
refused, so that a message decodes to the same thing from either codec and
can be re-encoded for a peer that speaks the other one.

A frame holds one message (a map) or a batch (an array of 1 to
``limits.max_batch`` maps).  Decoding checks, in this order: the frame kind,
the size (before parsing anything), the syntax (with the parser's own depth
cap), the shape, the depth and data model (an iterative walk, no recursion),
then each message's type and fields (strict: ``"42"`` is not an int, ``1.0``
is not an int, ``1`` is not a string, ``true`` is not an int).
"""

from __future__ import annotations

import enum
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, TypeAlias, TypeVar, cast

import cattrs
import cbor2
import orjson
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn

from ._errors import ErrorCode, LocalProtocolError, ProtocolError
from ._limits import DEFAULT_LIMITS, MAX_WIRE_DEPTH, Limits
from ._messages import (
    _CLIENT_CLASSES,
    _SERVER_CLASSES,
    CLIENT_MESSAGE_TYPES,
    SERVER_MESSAGE_TYPES,
    Auth,
    Call,
    ClientMessage,
    Cursor,
    ErrorInfo,
    Message,
    ServerMessage,
    Since,
    Viewport,
)

__all__ = [
    "Codec",
    "Frame",
    "PreparedBatch",
    "decode_client_frame",
    "decode_server_frame",
    "encode",
    "encode_batch",
    "from_wire",
    "negotiate",
    "prepare_batch",
    "to_wire",
]

Frame: TypeAlias = str | bytes
"""A WebSocket message: ``str`` is a text frame (JSON), ``bytes`` a binary
frame (CBOR)."""

RawFrame: TypeAlias = str | bytes | bytearray | memoryview | None
"""What a transport may hand over (quart hands an empty binary frame as
``None``)."""

T = TypeVar("T")


class Codec(enum.Enum):
    """A negotiated codec; its value is the WebSocket subprotocol."""

    JSON = "agor.v1.json"
    CBOR = "agor.v1.cbor"

    @property
    def subprotocol(self) -> str:
        return self.value

    @property
    def binary(self) -> bool:
        """Whether frames of this codec are binary frames."""
        return self is Codec.CBOR


def negotiate(offered: Iterable[str]) -> Codec | None:
    """The codec for the first subprotocol the client offered that this side
    supports (the client lists them in its order of preference), or ``None``:
    then refuse the WebSocket, never pick one the client did not offer."""
    for name in offered:
        for codec in Codec:
            if name.strip() == codec.value:
                return codec
    return None


# ------------------------------------------------------------------------ converter


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        dict: "a map",
        list: "an array",
    }.get(type(value), type(value).__name__)


def _strict_str(value: object, _type: object) -> str:
    if type(value) is str:
        return value
    raise TypeError(f"expected a string, got {_kind(value)}")


def _strict_int(value: object, _type: object) -> int:
    if type(value) is int:
        return value
    raise TypeError(f"expected an integer, got {_kind(value)}")


def _strict_float(value: object, _type: object) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise TypeError(f"expected a number, got {_kind(value)}")


def _strict_bool(value: object, _type: object) -> bool:
    if type(value) is bool:
        return value
    raise TypeError(f"expected a boolean, got {_kind(value)}")


def _strict_map(value: object, _type: object) -> dict[str, Any]:
    if type(value) is dict:
        return cast(dict[str, Any], value)
    raise TypeError(f"expected a map, got {_kind(value)}")


def _strict_list_of_maps(value: object, _type: object) -> list[dict[str, Any]]:
    if type(value) is list and all(type(item) is dict for item in value):
        return cast(list[dict[str, Any]], value)
    raise TypeError(f"expected an array of maps, got {_kind(value)}")


def _identity(value: Any) -> Any:
    return value


def _build_converter() -> tuple[cattrs.Converter, dict[type, Callable[[Any], dict[str, Any]]]]:
    conv = cattrs.Converter(omit_if_default=True, forbid_extra_keys=False)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(bool, _strict_bool)
    map_type: Any = dict[str, Any]
    list_of_maps_type: Any = list[dict[str, Any]]
    conv.register_structure_hook_func(lambda t: t == map_type, _strict_map)
    conv.register_structure_hook_func(lambda t: t == list_of_maps_type, _strict_list_of_maps)
    # Free-form data goes out as it is (the data-model walk checks it): no
    # copy, and no recursion into deep or cyclic values.
    conv.register_unstructure_hook_func(
        lambda t: t is Any or t in (map_type, list_of_maps_type), _identity
    )

    unstructure: dict[type, Callable[[Any], dict[str, Any]]] = {}
    parts: tuple[type, ...] = (Since, Cursor, Viewport, ErrorInfo)
    for cls in (*parts, *_CLIENT_CLASSES, *_SERVER_CLASSES):
        conv.register_structure_hook(cls, _map_only(make_dict_structure_fn(cls, conv)))
        plain: Callable[[Any], dict[str, Any]] = make_dict_unstructure_fn(
            cls, conv, _cattrs_omit_if_default=True
        )
        if cls in parts:
            conv.register_unstructure_hook(cls, plain)
        else:
            hook = _tagged(cls.TYPE, plain)  # type: ignore[attr-defined]
            conv.register_unstructure_hook(cls, hook)
            unstructure[cls] = hook
    return conv, unstructure


def _map_only(fn: Callable[[Any, Any], T]) -> Callable[[Any, Any], T]:
    def structure(value: Any, type_: Any) -> T:
        if type(value) is not dict:
            raise TypeError(f"expected a map, got {_kind(value)}")
        return fn(value, type_)

    return structure


def _tagged(tag: str, fn: Callable[[Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
    def unstructure(message: Any) -> dict[str, Any]:
        return {"type": tag, **fn(message)}

    return unstructure


converter, _UNSTRUCTURE = _build_converter()
"""The one converter of the protocol (strict structure hooks, ``None`` fields
omitted, the ``type`` tag first)."""


# ------------------------------------------------------------------- data model


_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1


_SCALARS: Final = frozenset({str, bool, type(None)})


def _check_decoded(root: Any, max_depth: int) -> tuple[ErrorCode, str] | None:
    """Walk decoded CBOR (a map or an array) without recursion: it must stay
    within the JSON data model and ``max_depth``.  Types are exact (the
    decoder builds plain dicts, lists, strs...)."""
    stack: list[tuple[Any, int]] = [(root, 1)]
    push = stack.append
    pop = stack.pop
    while stack:
        node, depth = pop()
        if depth > max_depth:
            return ErrorCode.TOO_DEEP, f"nesting deeper than {max_depth}"
        if type(node) is dict:
            for key in node:
                if type(key) is not str:
                    return ErrorCode.BAD_CBOR, f"map key is {_kind(key)}, not a string"
            values = node.values()
        else:
            values = node
        for value in values:
            kind = type(value)
            if kind in _SCALARS:
                continue
            if kind is dict or kind is list:
                push((value, depth + 1))
            elif kind is int:
                if value < _INT_MIN or value > _INT_MAX:
                    return ErrorCode.BAD_CBOR, "integer outside the 64-bit range"
            elif kind is float:
                if not math.isfinite(value):
                    return ErrorCode.BAD_CBOR, "float is not finite"
            else:
                return ErrorCode.BAD_CBOR, f"unsupported value: {_kind(value)}"
    return None


def _check_outgoing(root: Any, max_depth: int) -> tuple[ErrorCode, str] | None:
    """Like :func:`_check_decoded`, for data about to be encoded: subclasses
    of dict, list, str and int (enums, ordered dicts) are accepted too."""
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return ErrorCode.TOO_DEEP, f"nesting deeper than {max_depth}"
        if isinstance(node, dict):
            for key in node:
                if not isinstance(key, str):
                    return ErrorCode.BAD_CBOR, f"map key is {_kind(key)}, not a string"
            values = node.values()
        else:
            values = node
        for value in values:
            kind = type(value)
            if kind in _SCALARS:
                continue
            if isinstance(value, dict | list):
                stack.append((value, depth + 1))
            elif isinstance(value, float):
                if not math.isfinite(value):
                    return ErrorCode.BAD_CBOR, "float is not finite"
            elif isinstance(value, int):
                if not _INT_MIN <= value <= _INT_MAX:
                    return ErrorCode.BAD_CBOR, "integer outside the 64-bit range"
            elif not isinstance(value, str):
                return ErrorCode.BAD_CBOR, f"cannot encode {type(value).__name__}: {value!r:.60}"
    return None


def _check_depth(root: object, max_depth: int) -> None:
    """Depth only: what JSON decoding needs (orjson yields nothing outside the
    data model)."""
    stack: list[tuple[object, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise ProtocolError(ErrorCode.TOO_DEEP, f"nesting deeper than {max_depth}")
        values = node.values() if type(node) is dict else cast(list[object], node)
        for value in values:
            kind = type(value)
            if kind is dict or kind is list:
                stack.append((value, depth + 1))


# ------------------------------------------------------------------------ decoding


def _reject_tag(*_args: object) -> Any:
    raise ValueError("CBOR tags are not part of the protocol's data model")


# Every tag cbor2 decodes by itself (dates, bignums, decimals, shared values,
# string references, sets, regexes, IP addresses, UUIDs...) and, through
# tag_hook, every other tag, is refused while decoding: none of them is JSON,
# and some (shared values) could build cyclic or exponentially large data.
_BUILTIN_TAGS: Final = (0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260)
_REJECT_TAGS: Final[Mapping[int, Callable[..., Any]]] = MappingProxyType(
    {tag: _reject_tag for tag in (*_BUILTIN_TAGS, 261, 1004, 43000, 55799)}
)


def _frame_size_error(size: int, limits: Limits) -> ProtocolError:
    return ProtocolError(
        ErrorCode.FRAME_TOO_LARGE,
        f"frame of {size} bytes, more than {limits.max_frame_bytes}",
    )


def _load_json(data: RawFrame, limits: Limits) -> Any:
    if type(data) is not str:
        raise ProtocolError(
            ErrorCode.WRONG_FRAME_KIND, "agor.v1.json takes text frames, got a binary frame"
        )
    source: str | bytes = data
    if len(data) > limits.max_frame_bytes:
        raise _frame_size_error(len(data), limits)
    if 4 * len(data) > limits.max_frame_bytes:
        # Characters can take up to 4 bytes: measure the real size.
        try:
            source = data.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ProtocolError(ErrorCode.BAD_UTF8, f"text is not valid UTF-8: {exc}") from None
        if len(source) > limits.max_frame_bytes:
            raise _frame_size_error(len(source), limits)
    try:
        return orjson.loads(source)
    except orjson.JSONDecodeError as exc:
        text = str(exc)
        if "not valid UTF-8" in text or "surrogate" in text:
            raise ProtocolError(ErrorCode.BAD_UTF8, text) from None
        if "depth" in text or "recursion" in text.lower():
            raise ProtocolError(ErrorCode.TOO_DEEP, text) from None
        raise ProtocolError(ErrorCode.BAD_JSON, text) from None
    except Exception as exc:  # orjson raises only JSONDecodeError; belt and braces
        raise ProtocolError(ErrorCode.BAD_JSON, f"{type(exc).__name__}: {exc}") from None


def _has_unicode_cause(exc: BaseException) -> bool:
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 16:
        if isinstance(current, UnicodeError):
            return True
        current = current.__cause__ or current.__context__
        seen += 1
    return False


def _load_cbor(data: RawFrame, limits: Limits) -> Any:
    if data is None:
        data = b""
    if isinstance(data, str):
        raise ProtocolError(
            ErrorCode.WRONG_FRAME_KIND, "agor.v1.cbor takes binary frames, got a text frame"
        )
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(ErrorCode.WRONG_FRAME_KIND, f"not a frame: {type(data).__name__}")
    raw = data if type(data) is bytes else bytes(data)
    if len(raw) > limits.max_frame_bytes:
        raise _frame_size_error(len(raw), limits)
    if not raw:
        raise ProtocolError(ErrorCode.BAD_CBOR, "empty frame")
    stream = io.BytesIO(raw)
    try:
        value = cbor2.CBORDecoder(
            stream,
            semantic_decoders=_REJECT_TAGS,
            tag_hook=_reject_tag,
            max_depth=limits.max_depth,
            strict_hashable_types=True,
        ).decode()
    except Exception as exc:
        text = str(exc)
        if "nesting depth" in text:
            raise ProtocolError(ErrorCode.TOO_DEEP, text) from None
        if _has_unicode_cause(exc):
            raise ProtocolError(ErrorCode.BAD_UTF8, text) from None
        raise ProtocolError(ErrorCode.BAD_CBOR, text or type(exc).__name__) from None
    if stream.tell() != len(raw):
        raise ProtocolError(ErrorCode.BAD_CBOR, "bytes left after the first data item")
    return value


def _frame_items(codec: Codec, data: RawFrame, limits: Limits) -> list[dict[str, Any]]:
    """Parse a frame into its message maps, checking everything but the
    messages' fields.  Raises :class:`ProtocolError` (all codes here close the
    connection)."""
    value = _load_json(data, limits) if codec is Codec.JSON else _load_cbor(data, limits)
    if type(value) is dict:
        items = [value]
    elif type(value) is list:
        if not value:
            raise ProtocolError(ErrorCode.BAD_FRAME, "empty batch")
        if len(value) > limits.max_batch:
            raise ProtocolError(
                ErrorCode.BATCH_TOO_LARGE,
                f"batch of {len(value)} messages, more than {limits.max_batch}",
            )
        for item in value:
            if type(item) is not dict:
                raise ProtocolError(ErrorCode.BAD_FRAME, f"a batch holds maps, not {_kind(item)}")
        items = value
    else:
        raise ProtocolError(
            ErrorCode.BAD_FRAME, f"a frame holds a map or an array, not {_kind(value)}"
        )
    if codec is Codec.JSON:
        _check_depth(value, limits.max_depth)
    else:
        problem = _check_decoded(value, limits.max_depth)
        if problem is not None:
            raise ProtocolError(*problem)
    return items


def _describe(exc: BaseException) -> str:
    def fmt(error: BaseException, _type: type | None) -> str:
        if isinstance(error, KeyError):
            return "required field missing"
        return str(error) or type(error).__name__

    try:
        lines = cattrs.transform_error(exc, format_exception=fmt)
    except Exception:
        lines = [str(exc)]
    text = "; ".join(lines)
    return text if len(text) <= 300 else text[:297] + "..."


def _readable_ref(item: Mapping[str, Any]) -> int | None:
    ref = item.get("ref")
    if type(ref) is int and 0 <= ref <= 2**53 - 1:
        return ref
    return None


def _structure(item: dict[str, Any], types: Mapping[str, type[T]], side: str) -> T:
    tag = item.get("type")
    if type(tag) is not str:
        raise ProtocolError(
            ErrorCode.INVALID_FIELD,
            "message has no 'type'" if tag is None else f"'type' is {_kind(tag)}, not a string",
        )
    cls = types.get(tag)
    if cls is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown {side} message type {tag!r:.60}")
    try:
        return converter.structure(item, cls)
    except Exception as exc:
        raise ProtocolError(
            ErrorCode.INVALID_FIELD,
            f"{tag}: {_describe(exc)}",
            ref=_readable_ref(item) if cls in (Call, Auth) else None,
        ) from None


def structure_client_message(item: dict[str, Any]) -> ClientMessage:
    """One decoded map (as found in a frame) to a client message."""
    return _structure(item, CLIENT_MESSAGE_TYPES, "client")


def structure_server_message(item: dict[str, Any]) -> ServerMessage:
    """One decoded map (as found in a frame) to a server message."""
    return _structure(item, SERVER_MESSAGE_TYPES, "server")


def decode_client_frame(
    codec: Codec, data: RawFrame, limits: Limits = DEFAULT_LIMITS
) -> list[ClientMessage]:
    """The messages in a frame a client sent (what a server receives).
    Raises :class:`ProtocolError` and nothing else, whatever ``data`` holds."""
    return [structure_client_message(item) for item in _frame_items(codec, data, limits)]


def decode_server_frame(
    codec: Codec, data: RawFrame, limits: Limits = DEFAULT_LIMITS
) -> list[ServerMessage]:
    """The messages in a frame a server sent (what a client receives).
    Raises :class:`ProtocolError` and nothing else, whatever ``data`` holds."""
    return [structure_server_message(item) for item in _frame_items(codec, data, limits)]


# ------------------------------------------------------------------------ encoding


def to_wire(message: Message) -> dict[str, Any]:
    """The map of one message, ``type`` first, ``None`` fields omitted."""
    hook = _UNSTRUCTURE.get(type(message))
    if hook is None:
        raise LocalProtocolError(f"not a protocol message: {type(message).__name__}")
    return hook(message)


def from_wire(item: dict[str, Any], *, server: bool) -> Message:
    """The message for one map; ``server``: the map was sent by the server
    (this tells ``presence`` from one side from ``presence`` from the other)."""
    if server:
        return structure_server_message(item)
    return structure_client_message(item)


def _wire_value(messages: Message | Sequence[Message], max_depth: int) -> Any:
    if isinstance(messages, Sequence):
        if not messages:
            raise LocalProtocolError("cannot encode an empty batch")
        value: Any = [to_wire(message) for message in messages]
    else:
        value = to_wire(messages)
    problem = _check_outgoing(value, max_depth)
    if problem is not None:
        raise LocalProtocolError(f"cannot encode: {problem[1]}", code=problem[0])
    return value


def _dump(codec: Codec, value: Any) -> Frame:
    try:
        if codec is Codec.JSON:
            return orjson.dumps(value).decode("utf-8")
        return cbor2.dumps(value)
    except Exception as exc:
        raise LocalProtocolError(f"cannot encode: {exc}") from exc


def encode(
    codec: Codec, messages: Message | Sequence[Message], *, max_depth: int = MAX_WIRE_DEPTH
) -> Frame:
    """One frame: a message encodes as a map, a list as a batch (an array),
    whatever its length.  Raises :class:`LocalProtocolError` for data outside
    the data model or deeper than ``max_depth``."""
    return _dump(codec, _wire_value(messages, max_depth))


def encode_batch(codec: Codec, messages: Sequence[Message]) -> Frame:
    """One batch frame for ``messages``, to send as is to every subscriber
    that speaks ``codec`` (see :func:`prepare_batch` to encode for several
    codecs with one conversion)."""
    return _dump(codec, _wire_value(list(messages), MAX_WIRE_DEPTH))


class PreparedBatch:
    """A batch converted and checked once, encoded at most once per codec.

    A room builds one per flush and hands ``frame(subscriber.codec)`` to every
    subscriber: the bytes are shared, nothing is encoded twice.
    """

    __slots__ = ("_frames", "_value", "messages")

    def __init__(self, messages: Sequence[Message]) -> None:
        self.messages: tuple[Message, ...] = tuple(messages)
        self._value = _wire_value(list(self.messages), MAX_WIRE_DEPTH)
        self._frames: dict[Codec, Frame] = {}

    def frame(self, codec: Codec) -> Frame:
        frame = self._frames.get(codec)
        if frame is None:
            frame = self._frames[codec] = _dump(codec, self._value)
        return frame


def prepare_batch(messages: Sequence[Message]) -> PreparedBatch:
    """Convert and check ``messages`` once; see :class:`PreparedBatch`."""
    return PreparedBatch(messages)


def message_classes() -> tuple[type[Message], ...]:
    """Every message class, client side first."""
    return (*_CLIENT_CLASSES, *_SERVER_CLASSES)
