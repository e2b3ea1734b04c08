"""The proxy's own errors as real client libraries read them.

Run by tests/tests/sdk_errors.rs against a gateway it starts:

    python3 sdk_errors.py GATEWAY_ADDRESS

- OpenAI's Python SDK, with its default retries (2), against a backend
  whose every connection is reset: the SDK raises an APIStatusError that
  carries the proxy's message and code, and obeys `x-should-retry: false`
  (the Rust side counts the connections the backend saw).
- The SDK streaming a completion the proxy cuts mid-way (the route's idle
  timeout): iterating raises an APIError with the proxy's message.
- grpcio calling a method no route serves (UNIMPLEMENTED) and a method
  routed to the dead backend (UNAVAILABLE): the status and message arrive.

Prints one line per check and "sdk errors: ok" at the end; exits non-zero
on the first check that fails.
"""

import sys

import grpc
import openai

address = sys.argv[1]


def check(what, condition, detail):
    if not condition:
        print(f"FAILED: {what}: {detail}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


client = openai.OpenAI(base_url=f"http://{address}/v1", api_key="unused")

# A dead backend: one call, the proxy's attempts only.
try:
    client.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "hi"}]
    )
    check("a dead backend fails the call", False, "it succeeded")
except openai.APIStatusError as e:
    check("status", e.status_code == 502, e.status_code)
    check("code from the proxy's reason", e.code == "upstream_reset", e.code)
    check("type", e.type == "server_error", e.type)
    check(
        "message",
        "model server" in e.message and "127.0.0.1" not in e.message,
        e.message,
    )
    check(
        "x-infermesh-error",
        e.response.headers.get("x-infermesh-error") == "upstream_reset",
        dict(e.response.headers),
    )

# A stream the proxy cuts: the SDK raises the proxy's error event.
stream = client.completions.create(model="llama", prompt="hi", stream=True)
chunks = 0
try:
    for chunk in stream:
        chunks += 1
    check("a cut stream raises", False, f"{chunks} chunks and a clean end")
except openai.APIError as e:
    check("the stream's first event arrived", chunks == 1, chunks)
    check("the cut is explained", "no response data" in e.message, e.message)
    check("the cut's code", (e.body or {}).get("code") == "idle_timeout", e.body)

# gRPC: no route, and a dead backend.
channel = grpc.insecure_channel(address)
identity = lambda payload: payload  # noqa: E731 - raw bytes in and out
for method, status, reasons in [
    ("/models.Unknown/Predict", grpc.StatusCode.UNIMPLEMENTED, {"no_route"}),
    ("/models.Dead/Predict", grpc.StatusCode.UNAVAILABLE, {"upstream_reset", "connect_failed"}),
]:
    call = channel.unary_unary(
        method, request_serializer=identity, response_deserializer=identity
    )
    try:
        call(b"", timeout=10)
        check(f"gRPC {method} fails", False, "it succeeded")
    except grpc.RpcError as e:
        check(f"gRPC {method} status", e.code() == status, e.code())
        check(f"gRPC {method} message", bool(e.details()), e.details())
        metadata = dict(e.trailing_metadata() or ())
        check(
            f"gRPC {method} reason",
            metadata.get("x-infermesh-error") in reasons,
            metadata,
        )

print("sdk errors: ok")
