"""A tiny command-line client of the Tandem API: stream one completion to stdout.

    python -m tools.client "def fib(n):" --max-tokens 64   # or: tandem generate "def fib(n):" ...
    python -m tools.client --info                      # model and workers
    python -m tools.client "hi" --ca deploy/certs/ca.pem --api-key-file deploy/certs/api-keys   # TLS, a key

Greedy unless --temperature is given (the API itself samples at temperature 1.0 when a request
does not set it). Ctrl-C cancels the request.

The finish reason and token usage go to stderr, so stdout holds only the generated text.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from shared.pb.tandem.v1 import common_pb2, generate_pb2, generate_pb2_grpc


def build_request(args: argparse.Namespace) -> generate_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParameters(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        logprobs=args.logprobs,
        frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty,
    )
    if args.seed is not None:
        sampling.seed = args.seed
    if args.repetition_penalty is not None:
        sampling.repetition_penalty = args.repetition_penalty
    stopping = common_pb2.StoppingCriteria(
        max_tokens=args.max_tokens, stop=args.stop, ignore_eos=args.ignore_eos
    )
    return generate_pb2.GenerateRequest(text=args.prompt, sampling=sampling, stopping=stopping)


def main(argv: list[str] | None = None, prog: str = "python -m tools.client") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", help="prompt text")
    parser.add_argument("--addr", default="localhost:50051", help="scheduler address (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 = greedy (this client's default; the API's default when a request leaves it unset is 1.0)",
    )
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    parser.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument(
        "--logprobs", type=int, default=0, help="print top-N logprobs of each token to stderr"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds (default %(default)s)")
    parser.add_argument("--info", action="store_true", help="print the model info and exit")
    parser.add_argument(
        "--ca", help="PEM CA to verify the scheduler's TLS certificate with (default: plaintext)"
    )
    parser.add_argument(
        "--api-key-file",
        help="file whose first non-comment line is the API key (default: the TANDEM_API_KEY environment variable)",
    )
    args = parser.parse_args(argv)
    if not args.info and args.prompt is None:
        parser.error("a prompt is required (or --info)")

    try:
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C: the call is cancelled as the channel closes; no traceback
        print("\n[interrupted]", file=sys.stderr)
        return 130


def _api_key(path: str | None) -> str:
    if not path:
        return os.environ.get("TANDEM_API_KEY", "").strip()
    with open(path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    return lines[0] if lines else ""


def _run(args: argparse.Namespace) -> int:
    key = _api_key(args.api_key_file)
    metadata = [("authorization", f"Bearer {key}")] if key else None
    if args.ca:
        with open(args.ca, "rb") as f:
            channel = grpc.secure_channel(args.addr, grpc.ssl_channel_credentials(f.read()))
    else:
        channel = grpc.insecure_channel(args.addr)
    with channel:
        stub = generate_pb2_grpc.TandemStub(channel)
        try:
            if args.info:
                print(
                    stub.GetModelInfo(
                        generate_pb2.GetModelInfoRequest(), timeout=args.timeout, metadata=metadata
                    )
                )
                return 0
            last = None
            for resp in stub.Generate(build_request(args), timeout=args.timeout, metadata=metadata):
                sys.stdout.write(resp.text)
                sys.stdout.flush()
                for lp in resp.logprobs:
                    top = ", ".join(f"{t.token_id}:{t.logprob:.2f}" for t in lp.top)
                    print(f"\n  [{lp.token_id} {lp.logprob:.3f}] {top}", file=sys.stderr)
                last = resp
        except grpc.RpcError as e:
            print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print()
    if last is not None:
        reason = common_pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
        detail = f" ({last.finish_message})" if last.finish_message else ""
        u = last.usage
        print(
            f"[finish: {reason}{detail}; prompt {u.prompt_tokens}, completion {u.completion_tokens}, "
            f"cached {u.cached_tokens} tokens; request {last.request_id}]",
            file=sys.stderr,
        )
        if u.spec_verify_steps:
            print(
                f"[speculation: {u.spec_accepted_tokens} of {u.spec_proposed_tokens} draft tokens accepted "
                f"in {u.spec_verify_steps} steps; mean accepted length {u.spec_mean_accepted_length:.2f}]",
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
