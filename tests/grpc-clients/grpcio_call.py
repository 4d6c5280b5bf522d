"""One gRPC call with grpcio, the C-core client Python, Ruby, PHP, C++ and C# use: stricter about
HTTP/2 framing than tonic. Prints one JSON line: the status code name, its details and the
received messages (hex).

Usage: grpcio_call.py HOST:PORT /package.Service/Method unary|stream REQUEST_HEX IDEMPOTENCY_KEY"""

import json
import sys

import grpc


def main():
    target, method, kind, request_hex, key = sys.argv[1:6]
    identity = lambda b: b  # noqa: E731 - raw protobuf bytes both ways
    with grpc.insecure_channel(target) as channel:
        metadata = [("idempotency-key", key)]
        request = bytes.fromhex(request_hex)
        messages = []
        try:
            if kind == "unary":
                call = channel.unary_unary(method, request_serializer=identity, response_deserializer=identity)
                messages.append(call(request, metadata=metadata, timeout=30))
            else:
                call = channel.unary_stream(method, request_serializer=identity, response_deserializer=identity)
                for message in call(request, metadata=metadata, timeout=30):
                    messages.append(message)
            code, details = "OK", ""
        except grpc.RpcError as error:
            code, details = error.code().name, error.details()
        print(json.dumps({"code": code, "details": details, "messages": [m.hex() for m in messages]}))


main()
