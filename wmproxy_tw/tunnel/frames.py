"""Sans-IO codec for the tunnel wire protocol (``docs/tunnel-protocol.md``).

Frames are frozen dataclasses that validate themselves on construction, so an invalid frame can
neither be built locally nor decoded from the wire.  :func:`encode` turns a frame into bytes and
:class:`FrameDecoder` turns a byte stream, split anywhere, back into frames; every malformed,
oversized or unknown input raises :class:`TunnelProtocolError` and nothing else.

Nothing here does I/O or imports ``twisted.internet``.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

__all__ = [
    "DEFAULT_WINDOW",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_CONTROL_PAYLOAD",
    "MAX_DATA_PAYLOAD",
    "MAX_MESSAGE_BYTES",
    "MAX_STREAM_ID",
    "MAX_WINDOW",
    "MODES",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "Accept",
    "AuthFailed",
    "Close",
    "Data",
    "Error",
    "ErrorCode",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "GoAway",
    "Hello",
    "HelloOk",
    "Open",
    "Ping",
    "Pong",
    "Refuse",
    "Register",
    "Reset",
    "ResetCode",
    "TunnelProtocolError",
    "WindowUpdate",
    "encode",
    "encode_all",
    "encode_data",
    "encode_parts",
    "error_frame",
]

MAGIC = b"WMTUNNEL"
"""First 8 bytes of the ``HELLO`` payload."""
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})

_HEADER = struct.Struct("!BBII")
HEADER_SIZE = _HEADER.size  # 10: type u8, flags u8, stream id u32, payload length u32
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")

MAX_DATA_PAYLOAD = 64 * 1024
MAX_CONTROL_PAYLOAD = 16 * 1024
MAX_MESSAGE_BYTES = 1024
MAX_STREAM_ID = 2**32 - 1
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 256 * 1024
MAX_HEARTBEAT_MS = 3_600_000
MAX_DOMAINS = 32
MAX_HEADER_RULES = 64
MODES = ("http", "https", "tcp", "proxy")

_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_SERVICE_RE = re.compile(r"@?[A-Za-z0-9_.\-]{1,64}")
_DOMAIN_RE = re.compile(r"(\*\.)?[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")
_PEER_RE = re.compile(r"[A-Za-z0-9_.:%\[\]\-]{1,64}")


class FrameType(IntEnum):
    """The ``type`` byte of the frame header."""

    HELLO = 0x01
    HELLO_OK = 0x02
    AUTH_FAILED = 0x03
    REGISTER = 0x04
    ACCEPT = 0x05
    REFUSE = 0x06
    OPEN = 0x10
    DATA = 0x11
    WINDOW_UPDATE = 0x12
    CLOSE = 0x13
    RESET = 0x14
    PING = 0x20
    PONG = 0x21
    GOAWAY = 0x22
    ERROR = 0x23


class ErrorCode(IntEnum):
    """Connection-level codes carried by ``GOAWAY`` and ``ERROR``."""

    NO_ERROR = 0
    PROTOCOL_ERROR = 1
    FRAME_TOO_LARGE = 2
    UNKNOWN_FRAME = 3
    FLOW_CONTROL_ERROR = 4
    STREAM_ERROR = 5
    UNSUPPORTED_VERSION = 6
    INTERNAL_ERROR = 7
    HEARTBEAT_TIMEOUT = 8


class ResetCode(IntEnum):
    """Stream-level codes carried by ``RESET``; unknown values mean ``CANCEL``."""

    CANCEL = 0
    REFUSED = 1
    UNKNOWN_MAPPING = 2
    CONNECT_FAILED = 3
    CONNECT_TIMEOUT = 4
    INTERNAL = 5


class TunnelProtocolError(Exception):
    """The peer broke the protocol; answer with :func:`error_frame` and close the connection."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


# --- validation helpers (raise ValueError/TypeError; the decoder makes them protocol errors) -----


def _check_int(value: object, what: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{what} must be an integer in {low}..{high}, got {value!r}")
    return value


def _check_str(value: object, what: str, max_chars: int, *, min_chars: int = 0,
               printable: bool = True, pattern: re.Pattern[str] | None = None) -> str:
    if type(value) is not str:
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if not min_chars <= len(value) <= max_chars:
        raise ValueError(f"{what} must have {min_chars}..{max_chars} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise ValueError(f"{what} {value!r} is not valid")
    if printable and not value.isprintable():
        raise ValueError(f"{what} must not contain control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not encodable as UTF-8") from None
    return value


def _check_message(value: object, what: str) -> str:
    text = _check_str(value, what, MAX_MESSAGE_BYTES)
    if len(text.encode("utf-8")) > MAX_MESSAGE_BYTES:
        raise ValueError(f"{what} must be at most {MAX_MESSAGE_BYTES} bytes of UTF-8")
    return text


def _check_stream_id(value: object) -> int:
    return _check_int(value, "stream id", 1, MAX_STREAM_ID)


def _check_version(value: object) -> None:
    if type(value) is not int or value not in SUPPORTED_VERSIONS:
        raise ValueError(f"unsupported protocol version {value!r}")


_AUTH_SHAPES: tuple[frozenset[str], ...] = (frozenset(), frozenset({"token"}), frozenset({"username", "password"}))


def _check_bytes(value: object, what: str, low: int, high: int) -> bytes:
    if type(value) is not bytes or not low <= len(value) <= high:
        raise ValueError(f"{what} must be {low}..{high} bytes")
    return value


def _dump_json(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return data.encode("utf-8")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _load_json(payload: bytes, required: frozenset[str],
               optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Parse one strict JSON object with exactly the given keys."""
    try:
        text = payload.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_reject_duplicates,
                         parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"invalid JSON payload: {exc}") from None
    if not isinstance(obj, dict):
        raise TypeError("JSON payload must be an object")
    keys = obj.keys()
    missing = required - keys
    if missing:
        raise ValueError(f"missing keys {sorted(missing)}")
    extra = keys - required - optional
    if extra:
        raise ValueError(f"unknown keys {sorted(extra)}")
    return obj


def _load_text(payload: bytes, what: str) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not valid UTF-8") from None


# --- frames ---------------------------------------------------------------------------------------


class _ConnectionFrame:
    """Base of frames that travel on stream 0."""

    __slots__ = ()
    frame_type: ClassVar[FrameType]

    @property
    def stream_id(self) -> int:
        """Connection frames always use stream id 0."""
        return 0


@dataclass(frozen=True, slots=True)
class Hello(_ConnectionFrame):
    """Client's first frame: protocol version, credentials and its receive window.

    At most one of ``token`` or the ``username``/``password`` pair is given; none means anonymous.
    Secrets are left out of ``repr()`` so a logged frame never leaks them.
    """

    frame_type: ClassVar[FrameType] = FrameType.HELLO
    client: str = ""
    window: int = DEFAULT_WINDOW
    token: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_version(self.version)
        _check_str(self.client, "client name", 64)
        _check_int(self.window, "window", 1, MAX_WINDOW)
        if self.token is not None:
            if self.username is not None or self.password is not None:
                raise ValueError("give either a token or a username/password, not both")
            _check_str(self.token, "token", 256, min_chars=1, printable=False)
        elif (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        elif self.username is not None:
            _check_str(self.username, "username", 256, min_chars=1, printable=False)
            _check_str(self.password, "password", 256, min_chars=1, printable=False)

    def _payload(self) -> bytes:
        auth: dict[str, str] = {}
        if self.token is not None:
            auth["token"] = self.token
        elif self.username is not None and self.password is not None:
            auth["username"] = self.username
            auth["password"] = self.password
        body = {"client": self.client, "window": self.window, "auth": auth}
        return MAGIC + _U16.pack(self.version) + _dump_json(body)

    @classmethod
    def _decode(cls, stream_id: int, payload: bytes) -> Hello:
        prefix = len(MAGIC) + _U16.size
        if len(payload) < prefix or payload[: len(MAGIC)] != MAGIC:
            raise ValueError("HELLO does not start with the protocol magic")
        (version,) = _U16.unpack_from(payload, len(MAGIC))
        if version not in SUPPORTED_VERSIONS:
            supported = ", ".join(str(v) for v in sorted(SUPPORTED_VERSIONS))
            raise TunnelProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {version} not supported; supported versions: {supported}")
        body = _load_json(payload[prefix:], frozenset({"client", "window", "auth"}))
        auth = body["auth"]
        if not isinstance(auth, dict):
            raise TypeError("auth must be an object")
        if frozenset(auth) not in _AUTH_SHAPES:
            raise ValueError("auth must be {}, {token} or {username, password}")
        if any(type(value) is not str for value in auth.values()):
            raise ValueError("credentials must be strings")
        return cls(client=body["client"], window=body["window"], token=auth.get("token"),
                   username=auth.get("username"), password=auth.get("password"),
                   version=version)


@dataclass(frozen=True, slots=True)
class HelloOk(_ConnectionFrame):
    """Server accepted the client: its receive window and the ping interval it expects."""

    frame_type: ClassVar[FrameType] = FrameType.HELLO_OK
    window: int = DEFAULT_WINDOW
    heartbeat_ms: int = 10_000
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_version(self.version)
        _check_int(self.window, "window", 1, MAX_WINDOW)
        _check_int(self.heartbeat_ms, "heartbeat_ms", 1, MAX_HEARTBEAT_MS)

    def _payload(self) -> bytes:
        return _dump_json({"version": self.version, "window": self.window,
                           "heartbeat_ms": self.heartbeat_ms})

    @classmethod
    def _decode(cls, stream_id: int, payload: bytes) -> HelloOk:
        body = _load_json(payload, frozenset({"version", "window", "heartbeat_ms"}))
        return cls(window=body["window"], heartbeat_ms=body["heartbeat_ms"],
                   version=body["version"])


@dataclass(frozen=True, slots=True)
class AuthFailed(_ConnectionFrame):
    """Server refused the credentials; it closes the connection after this frame."""

    frame_type: ClassVar[FrameType] = FrameType.AUTH_FAILED
    reason: str

    def __post_init__(self) -> None:
        _check_message(self.reason, "reason")

    def _payload(self) -> bytes:
        return self.reason.encode("utf-8")

    @classmethod
    def _decode(cls, stream_id: int, payload: bytes) -> AuthFailed:
        return cls(_load_text(payload, "reason"))


@dataclass(frozen=True, slots=True)
class Register(_ConnectionFrame):
    """Client asks the server to publish one mapping."""

    frame_type: ClassVar[FrameType] = FrameType.REGISTER
    name: str
    mode: str
    domains: tuple[str, ...] = ()
    remote_port: int | None = None
    headers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_str(self.name, "mapping name", 64, pattern=_NAME_RE)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if isinstance(self.domains, list):
            object.__setattr__(self, "domains", tuple(self.domains))
        if not isinstance(self.domains, tuple) or len(self.domains) > MAX_DOMAINS:
            raise ValueError(f"domains must be a list of at most {MAX_DOMAINS} names")
        for domain in self.domains:
            _check_str(domain, "domain", 253, pattern=_DOMAIN_RE)
        if self.remote_port is not None:
            _check_int(self.remote_port, "remote_port", 1, 65535)
        if isinstance(self.headers, list):
            object.__setattr__(self, "headers", tuple(self.headers))
        if not isinstance(self.headers, tuple) or len(self.headers) > MAX_HEADER_RULES:
            raise ValueError(f"headers must be a list of at most {MAX_HEADER_RULES} rules")
        for rule in self.headers:
            _check_str(rule, "header rule", MAX_MESSAGE_BYTES, min_chars=1)

    def _payload(self) -> bytes:
        body: dict[str, Any] = {"name": self.name, "mode": self.mode,
                                "domains": list(self.domains), "remote_port": self.remote_port}
        if self.headers:
            body["headers"] = list(self.headers)
        return _dump_json(body)

    @classmethod
    def _decode(cls, stream_id: int, payload: bytes) -> Register:
        body = _load_json(payload, frozenset({"name", "mode", "domains", "remote_port"}),
                          frozenset({"headers"}))
        if not isinstance(body["domains"], list):
            raise TypeError("domains must be a list")
        headers = body.get("headers", [])
        if not isinstance(headers, list):
            raise TypeError("headers must be a list")
        return cls(name=body["name"], mode=body["mode"], domains=tuple(body["domains"]),
                   remote_port=body["remote_port"], headers=tuple(headers))


@dataclass(frozen=True, slots=True)
class Accept(_ConnectionFrame):
    """Server published the mapping of that name."""

    frame_type: ClassVar[FrameType] = FrameType.ACCEPT
    name: str

    def __post_init__(self) -> None:
        _check_str(self.name, "mapping name", 64, pattern=_NAME_RE)

    def _payload(self) -> bytes:
        return _dump_json({"name": self.name})

    @classmethod
    def _decode(cls, stream_id: int, payload: bytes) -> Accept:
        return cls(_load_json(payload, frozenset({"name"}))["name"])


@dataclass(frozen=True, slots=True)
class Refuse(_ConnectionFrame):
    """Server refused the mapping of that name, saying why (e.g. a domain held by another client)."""

    frame_type: ClassVar[FrameType] = FrameType.REFUSE
    name: str
    reason: str

    def __post_init__(self) -> None:
        _check_str(self.name, "mapping name", 64, pattern=_NAME_RE)
        _check_str(self.reason, "reason", MAX_MESSAGE_BYTES)

    def _payload(self) -> bytes:
        return _dump_json({"name": self.name, "reason": self.reason})

    @classmethod
    def _decode(cls, stream_id: int, payload: bytes) -> Refuse:
        body = _load_json(payload, frozenset({"name", "reason"}))
        return cls(name=body["name"], reason=body["reason"])


@dataclass(frozen=True, slots=True)
class Open:
    """Opens a stream for a mapping (server-initiated) or a ``@service`` (client-initiated)."""

    frame_type: ClassVar[FrameType] = FrameType.OPEN
    stream_id: int
    mapping: str
    peer: str | None = None

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id)
        _check_str(self.mapping, "mapping", 65, pattern=_SERVICE_RE)
        if self.peer is not None:
            _check_str(self.peer, "peer address", 64, pattern=_PEER_RE)

    def _payload(self) -> bytes:
        return _dump_json({"mapping": self.mapping, "peer": self.peer})

    @classmethod
    def _decode(cls, stream_id: int, payload: bytes) -> Open:
        body = _load_json(payload, frozenset({"mapping", "peer"}))
        return cls(stream_id=stream_id, mapping=body["mapping"], peer=body["peer"])


@dataclass(frozen=True, slots=True)
class Data:
    """1 to 64 KiB of stream bytes, counted against the receiver's window."""

    frame_type: ClassVar[FrameType] = FrameType.DATA
    stream_id: int
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id)
        _check_bytes(self.data, "DATA payload", 1, MAX_DATA_PAYLOAD)

    def __repr__(self) -> str:
        return f"Data(stream_id={self.stream_id}, len={len(self.data)})"

    def _payload(self) -> bytes:
        return self.data

    @classmethod
    def _decode(cls, stream_id: int, payload: bytes) -> Data:
        return cls(stream_id, payload)


@dataclass(frozen=True, slots=True)
class WindowUpdate:
    """Returns ``increment`` bytes of credit to the sender of the stream."""

    frame_type: ClassVar[FrameType] = FrameType.WINDOW_UPDATE
    stream_id: int
    increment: int

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id)
        _check_int(self.increment, "window increment", 1, MAX_WINDOW)

    def _payload(self) -> bytes:
        return _U32.pack(self.increment)

    @classmethod
    def _decode(cls, stream_id: int, payload: bytes) -> WindowUpdate:
        return cls(stream_id, _U32.unpack(payload)[0])


@dataclass(frozen=True, slots=True)
class Close:
    """Half-close: the sender will send no more data on this stream."""

    frame_type: ClassVar[FrameType] = FrameType.CLOSE
    stream_id: int

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id)

    def _payload(self) -> bytes:
        return b""

    @classmethod
    def _decode(cls, stream_id: int, payload: bytes) -> Close:
        return cls(stream_id)


@dataclass(frozen=True, slots=True)
class Reset:
    """Aborts both directions of a stream; ``code`` is a :class:`ResetCode` value."""

    frame_type: ClassVar[FrameType] = FrameType.RESET
    stream_id: int
    code: int = ResetCode.CANCEL

    def __post_init__(self) -> None:
        _check_stream_id(self.stream_id)
        _check_int(int(self.code) if isinstance(self.code, IntEnum) else self.code,
                   "reset code", 0, 2**32 - 1)

    def _payload(self) -> bytes:
        return _U32.pack(self.code)

    @classmethod
    def _decode(cls, stream_id: int, payload: bytes) -> Reset:
        return cls(stream_id, _U32.unpack(payload)[0])


@dataclass(frozen=True, slots=True)
class Ping(_ConnectionFrame):
    """Heartbeat request with 8 opaque bytes, answered by a :class:`Pong` carrying them back."""

    frame_type: ClassVar[FrameType] = FrameType.PING
    payload: bytes

    def __post_init__(self) -> None:
        _check_bytes(self.payload, "PING payload", 8, 8)

    def _payload(self) -> bytes:
        return self.payload

    @classmethod
    def _decode(cls, stream_id: int, payload: bytes) -> Ping:
        return cls(payload)


@dataclass(frozen=True, slots=True)
class Pong(_ConnectionFrame):
    """Heartbeat answer, echoing the 8 bytes of the :class:`Ping`."""

    frame_type: ClassVar[FrameType] = FrameType.PONG
    payload: bytes

    def __post_init__(self) -> None:
        _check_bytes(self.payload, "PONG payload", 8, 8)

    def _payload(self) -> bytes:
        return self.payload

    @classmethod
    def _decode(cls, stream_id: int, payload: bytes) -> Pong:
        return cls(payload)


def _check_code(value: object) -> None:
    _check_int(int(value) if isinstance(value, IntEnum) else value, "error code", 0, 2**32 - 1)


@dataclass(frozen=True, slots=True)
class GoAway(_ConnectionFrame):
    """No new streams from or to the sender; open streams may finish."""

    frame_type: ClassVar[FrameType] = FrameType.GOAWAY
    code: int = ErrorCode.NO_ERROR
    message: str = ""

    def __post_init__(self) -> None:
        _check_code(self.code)
        _check_message(self.message, "message")

    def _payload(self) -> bytes:
        return _U32.pack(self.code) + self.message.encode("utf-8")

    @classmethod
    def _decode(cls, stream_id: int, payload: bytes) -> GoAway:
        return cls(_U32.unpack_from(payload)[0], _load_text(payload[4:], "message"))


@dataclass(frozen=True, slots=True)
class Error(_ConnectionFrame):
    """Fatal protocol error; the sender closes the connection after it."""

    frame_type: ClassVar[FrameType] = FrameType.ERROR
    code: int = ErrorCode.PROTOCOL_ERROR
    message: str = ""

    def __post_init__(self) -> None:
        _check_code(self.code)
        _check_message(self.message, "message")

    def _payload(self) -> bytes:
        return _U32.pack(self.code) + self.message.encode("utf-8")

    @classmethod
    def _decode(cls, stream_id: int, payload: bytes) -> Error:
        return cls(_U32.unpack_from(payload)[0], _load_text(payload[4:], "message"))


Frame = (Hello | HelloOk | AuthFailed | Register | Accept | Refuse | Open | Data | WindowUpdate
         | Close | Reset | Ping | Pong | GoAway | Error)
"""Any tunnel frame."""

CONNECTION_FRAMES = (Hello, HelloOk, AuthFailed, Register, Accept, Refuse, Ping, Pong, GoAway,
                     Error)
STREAM_FRAMES = (Open, Data, WindowUpdate, Close, Reset)

# type -> (class, min payload, max payload); DATA's max is the decoder's own limit.
_LAYOUT: dict[int, tuple[Any, int, int]] = {
    FrameType.HELLO: (Hello, len(MAGIC) + 2, MAX_CONTROL_PAYLOAD),
    FrameType.HELLO_OK: (HelloOk, 0, MAX_CONTROL_PAYLOAD),
    FrameType.AUTH_FAILED: (AuthFailed, 0, MAX_MESSAGE_BYTES),
    FrameType.REGISTER: (Register, 0, MAX_CONTROL_PAYLOAD),
    FrameType.ACCEPT: (Accept, 0, MAX_CONTROL_PAYLOAD),
    FrameType.REFUSE: (Refuse, 0, MAX_CONTROL_PAYLOAD),
    FrameType.OPEN: (Open, 0, MAX_CONTROL_PAYLOAD),
    FrameType.DATA: (Data, 1, MAX_DATA_PAYLOAD),
    FrameType.WINDOW_UPDATE: (WindowUpdate, 4, 4),
    FrameType.CLOSE: (Close, 0, 0),
    FrameType.RESET: (Reset, 4, 4),
    FrameType.PING: (Ping, 8, 8),
    FrameType.PONG: (Pong, 8, 8),
    FrameType.GOAWAY: (GoAway, 4, 4 + MAX_MESSAGE_BYTES),
    FrameType.ERROR: (Error, 4, 4 + MAX_MESSAGE_BYTES),
}


def encode_parts(frame: Frame) -> tuple[bytes, bytes]:
    """The 10-byte header and the payload of a frame (for ``writeSequence``: no join)."""
    payload = frame._payload()
    _cls, _low, high = _LAYOUT[frame.frame_type]
    if len(payload) > high:  # only reachable by a bug in the limits above
        raise ValueError(f"{frame.frame_type.name} payload of {len(payload)} bytes is too large")
    return _HEADER.pack(frame.frame_type, 0, frame.stream_id, len(payload)), payload


def encode(frame: Frame) -> bytes:
    """Serialize one frame: 10-byte header followed by its payload."""
    header, payload = encode_parts(frame)
    return header + payload


def encode_all(frames: Iterable[Frame]) -> bytes:
    """Serialize several frames into one buffer, in order."""
    return b"".join(encode(frame) for frame in frames)


_DATA_HEADER = _HEADER.pack
_DATA = int(FrameType.DATA)


def encode_data(stream_id: int, data: bytes | bytearray | memoryview,
                max_frame: int = MAX_DATA_PAYLOAD) -> bytes:
    """The wire bytes of ``data`` as consecutive ``DATA`` frames of at most ``max_frame`` bytes.

    The fast path of ``encode_all(Data(...) ...)`` for the data path: no frame objects, one copy
    of the payload (headers and payload slices are joined once).  The caller guarantees a valid
    stream id, ``1 <= max_frame <= MAX_DATA_PAYLOAD`` and a non-empty ``data``.
    """
    size = len(data)
    if size <= max_frame:
        return _DATA_HEADER(_DATA, 0, stream_id, size) + data
    view = memoryview(data).cast("B")
    parts: list[bytes | memoryview] = []
    for start in range(0, size, max_frame):
        piece = view[start:start + max_frame]
        parts.append(_DATA_HEADER(_DATA, 0, stream_id, len(piece)))
        parts.append(piece)
    return b"".join(parts)


def _truncate_utf8(text: str, limit: int) -> str:
    data = text.encode("utf-8", "replace")[:limit]
    return data.decode("utf-8", "ignore")


def error_frame(exc: TunnelProtocolError) -> Error:
    """The ``ERROR`` frame answering a protocol error (message sanitized and truncated)."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in exc.message)
    return Error(exc.code, _truncate_utf8(clean, MAX_MESSAGE_BYTES))


class FrameDecoder:
    """Incremental decoder: ``feed(bytes) -> list[Frame]``.

    ``max_payload`` caps ``DATA`` payloads (at most :data:`MAX_DATA_PAYLOAD`); other frame types
    have their own fixed caps.  The length is checked from the header alone, so after each
    ``feed`` at most one partial frame (header plus its allowed payload) stays buffered.  The first
    violation raises :class:`TunnelProtocolError`; the decoder then stays failed and re-raises it.
    """

    def __init__(self, max_payload: int = MAX_DATA_PAYLOAD) -> None:
        if not 1 <= max_payload <= MAX_DATA_PAYLOAD:
            raise ValueError(f"max_payload must be in 1..{MAX_DATA_PAYLOAD}")
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._header: tuple[int, int, int] | None = None  # type, stream id, length
        self._failure: TunnelProtocolError | None = None
        self._data_left = 0  # feed_data: payload bytes of the current DATA frame still to come
        self._data_stream = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """Add received bytes; return every frame they complete, in order."""
        if self._failure is not None:
            raise self._failure
        if self._data_left:
            raise RuntimeError("feed() after feed_data() left a DATA frame open")
        frames: list[Frame] = []
        try:
            offset = self._complete_pending(data, frames)
            if offset is None:
                return frames
            # Parse straight from ``data``: each payload is copied once, and only an incomplete
            # tail (at most one frame) is kept for the next call.
            end = len(data)
            with memoryview(data) as view:
                while end - offset >= HEADER_SIZE:
                    frame_type, stream_id, length = header = self._parse_header(view, offset)
                    offset += HEADER_SIZE
                    if end - offset < length:
                        self._header = header
                        break
                    payload = bytes(view[offset:offset + length])
                    offset += length
                    frames.append(self._build(frame_type, stream_id, payload))
                if offset < end:
                    self._buffer += view[offset:]
        except TunnelProtocolError as exc:
            self._failure = exc
            self._buffer.clear()
            raise
        return frames

    def feed_data(self, data: bytes) -> list[Frame | tuple[int, bytes]]:
        """Like :meth:`feed`, but ``DATA`` payloads come out as ``(stream_id, bytes)`` pieces.

        The fast path of the data path: a ``DATA`` frame's bytes are handed out as they arrive
        (a frame split across reads comes out in pieces, a read that is all payload comes out
        as itself, uncopied), and the payloads of consecutive ``DATA`` frames of one stream within
        a read are joined into one piece.  Pieces of a stream concatenate to exactly its DATA
        payloads; order with respect to the other frames is kept; nothing but the partial header
        or partial control frame is buffered.  Checks and failure are those of :meth:`feed`
        (use one of the two methods per decoder).
        """
        if self._failure is not None:
            raise self._failure
        out: list[Frame | tuple[int, bytes]] = []
        try:
            self._feed_data(data, out)
        except TunnelProtocolError as exc:
            self._failure = exc
            self._buffer.clear()
            self._data_left = 0
            raise
        return out

    def _feed_data(self, data: bytes, out: list[Frame | tuple[int, bytes]]) -> None:
        end = len(data)
        if not end:
            return
        offset = self._complete_pending(data, out, open_data=True)
        if offset is None:
            return
        view = memoryview(data)
        run_stream = 0  # the stream whose consecutive DATA pieces are being collected
        run: list[memoryview] = []
        left = self._data_left
        if left:  # the payload of a DATA frame begun earlier
            take = min(left, end - offset)
            self._data_left = left - take
            if take == end:
                out.append((self._data_stream, data))
                return
            if take:
                run_stream = self._data_stream
                run.append(view[offset:offset + take])
                offset += take
        parse = self._parse_header
        while end - offset >= HEADER_SIZE:
            frame_type, stream_id, length = parse(view, offset)
            offset += HEADER_SIZE
            if frame_type == _DATA:
                avail = end - offset
                if avail < length:  # the rest comes with later reads
                    self._data_left = length - avail
                    self._data_stream = stream_id
                    length = avail
                    if not length:
                        break
                if stream_id != run_stream:
                    if run:
                        out.append((run_stream, b"".join(run)))
                    run = []
                    run_stream = stream_id
                run.append(view[offset:offset + length])
                offset += length
                continue
            if end - offset < length:
                self._header = (frame_type, stream_id, length)
                break
            if run:
                out.append((run_stream, b"".join(run)))
                run = []
                run_stream = 0
            out.append(self._build(frame_type, stream_id, bytes(view[offset:offset + length])))
            offset += length
        if run:
            out.append((run_stream, b"".join(run)))
        if offset < end:
            self._buffer += view[offset:]

    def _complete_pending(self, data: bytes, out: list[Any], open_data: bool = False) -> int | None:
        """Finish the frame begun by earlier calls; bytes of ``data`` used, None if all of them.

        With ``open_data`` (:meth:`feed_data`), a completed DATA header opens the payload, whose
        bytes are then handed out as they come, instead of buffering it.
        """
        buffer = self._buffer
        if not buffer and self._header is None:
            return 0
        used = 0
        view = memoryview(data)
        if self._header is None:
            used = min(HEADER_SIZE - len(buffer), len(view))
            buffer += view[:used]
            if len(buffer) < HEADER_SIZE:
                return None
            self._header = self._parse_header(buffer, 0)
            buffer.clear()
            if open_data and self._header[0] == _DATA:
                _type, self._data_stream, self._data_left = self._header
                self._header = None
                return used
        frame_type, stream_id, length = self._header
        take = min(length - len(buffer), len(view) - used)
        buffer += view[used:used + take]
        used += take
        if len(buffer) < length:
            return None
        payload = bytes(buffer)
        buffer.clear()
        self._header = None
        out.append(self._build(frame_type, stream_id, payload))
        return used

    def _parse_header(self, buffer: bytearray | memoryview, offset: int) -> tuple[int, int, int]:
        frame_type, flags, stream_id, length = _HEADER.unpack_from(buffer, offset)
        layout = _LAYOUT.get(frame_type)
        if layout is None:
            raise TunnelProtocolError(ErrorCode.UNKNOWN_FRAME,
                                      f"unknown frame type 0x{frame_type:02x}")
        cls, low, high = layout
        name = FrameType(frame_type).name
        if flags:
            raise TunnelProtocolError(ErrorCode.PROTOCOL_ERROR,
                                      f"{name} with unknown flags 0x{flags:02x}")
        if (stream_id == 0) != issubclass(cls, _ConnectionFrame):
            raise TunnelProtocolError(ErrorCode.PROTOCOL_ERROR,
                                      f"{name} not allowed on stream {stream_id}")
        if frame_type == FrameType.DATA:
            high = self.max_payload
        if length > high:
            raise TunnelProtocolError(ErrorCode.FRAME_TOO_LARGE,
                                      f"{name} payload of {length} bytes exceeds {high}")
        if length < low:
            raise TunnelProtocolError(ErrorCode.PROTOCOL_ERROR,
                                      f"{name} payload of {length} bytes is shorter than {low}")
        return frame_type, stream_id, length

    @staticmethod
    def _build(frame_type: int, stream_id: int, payload: bytes) -> Frame:
        cls = _LAYOUT[frame_type][0]
        try:
            frame: Frame = cls._decode(stream_id, payload)
        except (ValueError, TypeError) as exc:
            name = FrameType(frame_type).name
            raise TunnelProtocolError(ErrorCode.PROTOCOL_ERROR, f"bad {name}: {exc}") from None
        return frame
