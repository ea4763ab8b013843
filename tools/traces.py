"""Read the JSON-lines span files that services write with TANDEM_TRACE_FILE, without Jaeger.

    python -m tools.traces show <request id | its first characters | trace id> [--file spans.jsonl]
    python -m tools.traces list [--file spans.jsonl]

`show` prints each matching trace as a tree: offset from the trace's start, duration,
the span (indented under its parent), its service, and the attributes worth reading
(Tandem's `tandem.*` ones without the prefix, the gRPC status, errors). A trace id may be
given in full or as a prefix of 6+ hex digits, a request id in full or as a prefix of 4+
characters. `--file` may be repeated when the services write separate files; without it,
the file named by TANDEM_TRACE_FILE is read.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from shared.telemetry.attributes import PREFIX, REQUEST_ID, RPC_GRPC_STATUS_CODE
from shared.telemetry.jsonl import read_spans

_GRPC_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_HEX = set("0123456789abcdef")
MIN_REQUEST_PREFIX = 4


def find_trace_ids(spans: Iterable[dict[str, Any]], ident: str) -> list[str]:
    """Trace ids that `ident` names: a request id, a trace id (or a 6+ digit prefix of one), else
    a prefix of request ids (4+ characters; every request it starts)."""
    spans = list(spans)

    def request_id(span: dict[str, Any]) -> str | None:
        value = span.get("attributes", {}).get(REQUEST_ID)
        return None if value is None else str(value)

    exact = _ordered_unique(s["trace_id"] for s in spans if request_id(s) == ident)
    if exact:
        return exact
    ident_lower = ident.lower()
    if len(ident_lower) >= 6 and set(ident_lower) <= _HEX:
        by_trace = _ordered_unique(s["trace_id"] for s in spans if s["trace_id"].startswith(ident_lower))
        if by_trace:
            return by_trace
    if len(ident) < MIN_REQUEST_PREFIX:
        return []
    return _ordered_unique(s["trace_id"] for s in spans if (request_id(s) or "").startswith(ident))


def _ordered_unique(values: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _key_attributes(span: dict[str, Any]) -> str:
    parts = []
    attributes = span.get("attributes", {})
    for key, value in attributes.items():
        if key.startswith(PREFIX):
            parts.append(f"{key[len(PREFIX) :]}={_short(value)}")
    code = attributes.get(RPC_GRPC_STATUS_CODE)
    if code is not None:
        parts.append(f"grpc={_GRPC_CODE_NAMES.get(code, code)}")
    status = span.get("status") or {}
    if status.get("code") == "ERROR":
        description = status.get("description")
        parts.append(f"ERROR({description})" if description else "ERROR")
    return "  ".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def render_trace(spans: Sequence[dict[str, Any]]) -> str:
    """One trace as an indented tree, children in start order."""
    spans = sorted(spans, key=lambda s: s["start_time_unix_nano"])
    ids = {s["span_id"] for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for s in spans:
        parent = s.get("parent_span_id")
        children[parent if parent in ids else None].append(s)

    t0 = spans[0]["start_time_unix_nano"]
    t_end = max(s["end_time_unix_nano"] for s in spans)
    request_ids = _ordered_unique(
        str(s["attributes"][REQUEST_ID]) for s in spans if REQUEST_ID in s.get("attributes", {})
    )
    header = f"trace {spans[0]['trace_id']}"
    if request_ids:
        header += f"  request {', '.join(request_ids)}"
    header += f"  {len(spans)} spans  {(t_end - t0) / 1e6:.1f} ms"
    lines = [header, f"{'start ms':>10} {'dur ms':>10}  span [service]  attributes"]

    def walk(span: dict[str, Any], depth: int) -> None:
        offset = (span["start_time_unix_nano"] - t0) / 1e6
        duration = (span["end_time_unix_nano"] - span["start_time_unix_nano"]) / 1e6
        kind = span.get("kind", "INTERNAL")
        label = f"{span['name']} [{span.get('service') or '?'}]"
        if kind in ("SERVER", "CLIENT"):
            label += f" {kind.lower()}"
        if depth == 0 and span.get("parent_span_id"):
            label += " (parent not in file)"
        attributes = _key_attributes(span)
        line = f"{offset:>10.2f} {duration:>10.2f}  {'  ' * depth}{label}"
        lines.append(f"{line}  {attributes}" if attributes else line)
        for child in children.get(span["span_id"], []):
            walk(child, depth + 1)

    for root in children[None]:
        walk(root, 0)
    return "\n".join(lines)


def render_list(spans: Sequence[dict[str, Any]]) -> str:
    """One line per trace: id, start offset order, duration, span count, root span, request ids."""
    traces: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in spans:
        traces[s["trace_id"]].append(s)
    lines = []
    for trace_id, members in sorted(
        traces.items(), key=lambda kv: min(s["start_time_unix_nano"] for s in kv[1])
    ):
        root = min(members, key=lambda s: s["start_time_unix_nano"])
        duration = (
            max(s["end_time_unix_nano"] for s in members) - min(s["start_time_unix_nano"] for s in members)
        ) / 1e6
        request_ids = _ordered_unique(
            str(s["attributes"][REQUEST_ID]) for s in members if REQUEST_ID in s.get("attributes", {})
        )
        lines.append(
            f"{trace_id}  {duration:>9.1f} ms  {len(members):>4} spans  {root['name']}"
            + (f"  request {', '.join(request_ids)}" if request_ids else "")
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "python -m tools.traces") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="print the span tree of one request or trace")
    show.add_argument(
        "ident", help="request id (or its first 4+ characters), trace id, or a 6+ hex digit trace id prefix"
    )
    listing = commands.add_parser("list", help="one line per trace in the file")
    for sub in (show, listing):
        sub.add_argument(
            "--file",
            action="append",
            help="JSON-lines span file; repeatable (default: $TANDEM_TRACE_FILE)",
        )
    args = parser.parse_args(argv)
    if not args.file:
        if not os.environ.get("TANDEM_TRACE_FILE"):
            parser.error("no span file: pass --file, or set TANDEM_TRACE_FILE as the services did")
        args.file = [os.environ["TANDEM_TRACE_FILE"]]

    try:
        spans = list(read_spans(args.file))
    except OSError as err:
        print(f"traces: cannot read {err.filename}: {err.strerror}", file=sys.stderr)
        return 2

    if args.command == "list":
        print(render_list(spans))
        return 0

    trace_ids = find_trace_ids(spans, args.ident)
    if not trace_ids:
        print(f"traces: no trace or request {args.ident!r} in {', '.join(args.file)}", file=sys.stderr)
        return 1
    print("\n\n".join(render_trace([s for s in spans if s["trace_id"] == t]) for t in trace_ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
