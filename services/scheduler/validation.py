"""Checks of a GenerateRequest that the scheduler makes before the request may queue or route.

Every failure is an `InvalidArgument` whose message starts with the field's name. The sampling
rules are the engine's own (`shared.params.SamplingParams.validate`, torch-free), applied here
so that an invalid request is refused at once, not after waiting in the admission queue.

`parse_generate_request` is the request deserializer of Tandem.Generate. proto3 refuses
`string` fields that are not valid UTF-8 while parsing, before any handler runs, and gRPC
would answer with an opaque UNKNOWN. Here a request that fails to parse is parsed again as a
twin message whose string fields are `bytes` (same field numbers, same wire format), so that
the bad field can be named: the handler then answers INVALID_ARGUMENT.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from services.common.convert import sampling_from_pb
from services.common.errors import InvalidArgument
from shared import params
from shared.params import InvalidRequest
from shared.pb.tandem.v1 import common_pb2, generate_pb2


@dataclass
class MalformedRequest:
    """What the deserializer returns for bytes that are not a valid GenerateRequest."""

    field: str
    message: str

    def error(self) -> InvalidArgument:
        return InvalidArgument(self.field, self.message)


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


def _first_invalid_utf8(msg: Message) -> tuple[str, str] | None:
    """(field name, message) of the first bytes field (a string field originally) not valid UTF-8."""
    for fd, value in msg.ListFields():
        repeated = _is_repeated(fd)
        for i, item in enumerate(value if repeated else [value]):
            if fd.type == fd.TYPE_MESSAGE:
                bad = _first_invalid_utf8(item)
                if bad is not None:
                    return bad
            elif fd.type == fd.TYPE_BYTES:
                try:
                    item.decode("utf-8")
                except UnicodeDecodeError as e:
                    what = f"{fd.name}[{i}] is not" if repeated else "not"
                    return fd.name, f"{what} valid UTF-8 (byte 0x{item[e.start]:02x} at offset {e.start})"
    return None


def _is_repeated(fd) -> bool:
    if hasattr(fd, "is_repeated"):  # protobuf >= 6
        return fd.is_repeated
    return fd.label == fd.LABEL_REPEATED


def check_sampling(
    sampling: common_pb2.SamplingParameters, stopping: common_pb2.StoppingCriteria, vocab_size: int
) -> None:
    """The engine's rules for the sampling parameters; unset fields take their defaults."""
    try:
        sampling_from_pb(sampling, stopping).validate(vocab_size)
    except InvalidRequest as e:
        raise InvalidArgument(e.field, e.message) from None


def check_length(num_prompt_tokens: int, max_tokens: int, max_model_len: int | None) -> None:
    """prompt + max_tokens within the model length (when the decode workers have told it); the
    engine's rule (shared.params.check_length)."""
    if max_model_len:
        try:
            params.check_length(num_prompt_tokens, max_tokens, max_model_len)
        except InvalidRequest as e:
            raise InvalidArgument(e.field, e.message) from None
