"""Checks of a GenerateRequest that the scheduler makes before the request may queue or route.

Every failure is an `InvalidArgument` whose message starts with the field's name. The rules for
the prompt, the sampling parameters and the model length are the engine's own (`shared.params`:
`check_prompt`, `SamplingParams.validate`, `check_length`, torch-free), applied here in the
engine's order so that an invalid request is refused at once, not after waiting in the
admission queue. Two bounds keep a huge request from costing the scheduler much before it is
refused: the serialized size (`request_parser`, TANDEM_MAX_REQUEST_BYTES) and, for text, a byte
bound derived from the model length (`check_text_size`), checked before tokenizing.

`parse_generate_request` is the request deserializer of Tandem.Generate. proto3 refuses
`string` fields that are not valid UTF-8 while parsing, before any handler runs, and gRPC
would answer with an opaque UNKNOWN. Here a request that fails to parse is parsed again as a
twin message whose string fields are `bytes` (same field numbers, same wire format), so that
the bad field can be named: the handler then answers INVALID_ARGUMENT.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from services.common.convert import sampling_from_pb
from services.common.errors import InvalidArgument
from shared import guidance
from shared.params import InvalidRequest, check_length, check_prompt
from shared.pb.tandem.v1 import common_pb2, generate_pb2
from shared.text import validate_stop_strings

# A text prompt may have at most this many bytes per token of the model length: twice the
# longest token (normalizers such as NFC may shorten a text a little before it is split).
TEXT_BYTES_PER_TOKEN_FACTOR = 2


@dataclass
class MalformedRequest:
    """What the deserializer returns for bytes that are not a valid GenerateRequest."""

    field: str
    message: str

    def error(self) -> InvalidArgument:
        return InvalidArgument(self.field, self.message)


def request_parser(max_bytes: int) -> Callable[[bytes], generate_pb2.GenerateRequest | MalformedRequest]:
    """The Generate deserializer: refuses a message over `max_bytes` unparsed, else parse_generate_request."""

    def parse(data: bytes) -> generate_pb2.GenerateRequest | MalformedRequest:
        if len(data) > max_bytes:
            return MalformedRequest(
                "request",
                f"{len(data)} bytes exceed the limit of {max_bytes} bytes per request (TANDEM_MAX_REQUEST_BYTES)",
            )
        return parse_generate_request(data)

    return parse


def parse_generate_request(data: bytes) -> generate_pb2.GenerateRequest | MalformedRequest:
    try:
        return generate_pb2.GenerateRequest.FromString(data)
    except DecodeError as strict_error:
        try:
            twin = _lenient_request_class().FromString(data)
        except DecodeError:
            return MalformedRequest("request", f"not a valid tandem.v1.GenerateRequest ({strict_error})")
        bad = _first_invalid_utf8(twin)
        if bad is None:
            return MalformedRequest("request", f"not a valid tandem.v1.GenerateRequest ({strict_error})")
        return MalformedRequest(*bad)


@functools.cache
def _lenient_request_class() -> type[Message]:
    """GenerateRequest with every string field (its own and its sub-messages') turned into bytes."""
    pool = descriptor_pool.DescriptorPool()
    for file in (common_pb2.DESCRIPTOR, generate_pb2.DESCRIPTOR):  # dependencies first
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        proto.ClearField("service")
        for msg in proto.message_type:
            _strings_to_bytes(msg)
        pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tandem.v1.GenerateRequest"))


def _strings_to_bytes(msg: descriptor_pb2.DescriptorProto) -> None:
    for f in msg.field:
        if f.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
            f.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
    for nested in msg.nested_type:
        _strings_to_bytes(nested)


def _first_invalid_utf8(msg: Message, depth: int = 0) -> tuple[str, str] | None:
    """(field name, message) of the first bytes field (a string field originally) not valid UTF-8.
    Fields are named as the request's other errors name them: the fields of sampling and stopping
    by their own names, a field of a message inside them by that message ("guidance: regex is
    not valid UTF-8 ...")."""
    for fd, value in msg.ListFields():
        if fd.type == fd.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
            bad = _first_invalid_utf8_in_map(fd, value)
            if bad is not None:
                return bad
            continue
        repeated = _is_repeated(fd)
        for i, item in enumerate(value if repeated else [value]):
            if fd.type == fd.TYPE_MESSAGE:
                bad = _first_invalid_utf8(item, depth + 1)
                if bad is not None:
                    return (fd.name, f"{bad[0]} is {bad[1]}") if depth > 0 else bad
            elif fd.type == fd.TYPE_BYTES and (error := _utf8_error(item)) is not None:
                return fd.name, f"{fd.name}[{i}] is {error}" if repeated else error
    return None


def _first_invalid_utf8_in_map(fd, entries) -> tuple[str, str] | None:
    """A map field iterates as its keys: check keys and values that were strings (or messages)."""
    key_fd, value_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
    for key, value in entries.items():
        if key_fd.type == key_fd.TYPE_BYTES and (error := _utf8_error(key)) is not None:
            return fd.name, f"{fd.name} has a key that is {error}"
        if value_fd.type == value_fd.TYPE_MESSAGE:
            bad = _first_invalid_utf8(value)
            if bad is not None:
                return bad
        elif value_fd.type == value_fd.TYPE_BYTES and (error := _utf8_error(value)) is not None:
            return fd.name, f"{fd.name}[{key!r}] is {error}"
    return None


def _utf8_error(data: bytes) -> str | None:
    """None for valid UTF-8, else "not valid UTF-8 (byte 0x.. at offset N)"."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})"
    return None


def _is_repeated(fd) -> bool:
    if hasattr(fd, "is_repeated"):  # protobuf >= 6
        return fd.is_repeated
    return fd.label == fd.LABEL_REPEATED


def _engine_rule(fn: Callable[..., None], *args) -> None:
    try:
        fn(*args)
    except InvalidRequest as e:
        raise InvalidArgument(e.field, e.message) from None


def text_byte_limit(max_model_len: int, max_token_bytes: int) -> int:
    """Bytes of prompt text beyond which the text cannot fit the model length, whatever its tokens."""
    return max_model_len * max_token_bytes * TEXT_BYTES_PER_TOKEN_FACTOR


def check_text_size(text: str, max_model_len: int | None, max_token_bytes: int) -> None:
    """A text prompt: not empty, and not so large it cannot fit the model length (checked
    before tokenizing it, which costs about a second per megabyte)."""
    if not text:
        raise InvalidArgument("text", "must not be empty")
    if max_model_len is None:  # no decode worker has told its model length yet
        return
    limit = text_byte_limit(max_model_len, max_token_bytes)
    # characters <= bytes: the cheap count decides most huge texts without encoding them
    if len(text) > limit or len(text.encode("utf-8")) > limit:
        raise InvalidArgument(
            "text",
            f"{len(text.encode('utf-8'))} bytes cannot fit the model length of {max_model_len} tokens "
            f"(the limit is {limit} bytes: {TEXT_BYTES_PER_TOKEN_FACTOR} x {max_token_bytes} bytes, "
            "the longest token, per token)",
        )


def check_prompt_ids(prompt: list[int], vocab_size: int, max_model_len: int | None, field: str) -> None:
    """The engine's prompt rule: not empty, room for output within the model length, ids in range."""
    _engine_rule(check_prompt, prompt, vocab_size, max_model_len, field)


def check_options(
    req: generate_pb2.GenerateRequest,
    num_prompt_tokens: int,
    *,
    vocab_size: int,
    max_model_len: int | None,
    default_max_tokens: int,
    max_stop_strings: int,
) -> tuple[common_pb2.StoppingCriteria, list[str]]:
    """Stop strings, then the engine's rules for the sampling parameters (unset fields take their
    defaults) and for prompt + max_tokens. Returns the stopping criteria to send downstream
    (max_tokens filled in, stop strings removed: the scheduler applies them) and the stop strings."""
    try:
        stops = validate_stop_strings(list(req.stopping.stop), max_count=max_stop_strings)
    except ValueError as e:
        raise InvalidArgument("stop", str(e).split(": ", 1)[-1]) from None
    stopping = common_pb2.StoppingCriteria()
    stopping.CopyFrom(req.stopping)
    del stopping.stop[:]
    if not stopping.HasField("max_tokens"):
        stopping.max_tokens = default_max_tokens
    params = sampling_from_pb(req.sampling, stopping)
    _engine_rule(params.validate, vocab_size)
    if params.guidance is not None:
        _engine_rule(guidance.check, params.guidance)
    _engine_rule(check_length, num_prompt_tokens, stopping.max_tokens, max_model_len)
    return stopping, stops
