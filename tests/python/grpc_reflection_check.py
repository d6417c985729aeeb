"""A new user's first look at Medley's gRPC port with Python's grpcio-reflection client.

grpcio-reflection speaks only `grpc.reflection.v1alpha`, like older grpcurl and most GUI clients:
it must find the services, resolve `medley.v1.GenerationService` with its messages, and call
`Generate` from the reflected descriptors alone (no generated code).

Usage: grpc_reflection_check.py HOST:PORT
Prints "ALL OK" when every check passed.
"""

import sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def main(target: str) -> None:
    channel = grpc.insecure_channel(target)
    database = ProtoReflectionDescriptorDatabase(channel)
    services = sorted(database.get_services())
    print("services:", services)
    for expected in ("medley.v1.GenerationService", "grpc.health.v1.Health"):
        assert expected in services, f"{expected} not listed: {services}"

    pool = descriptor_pool.DescriptorPool(database)
    service = pool.FindServiceByName("medley.v1.GenerationService")
    methods = sorted(m.name for m in service.methods)
    print("methods:", methods)
    assert "Generate" in methods and "GenerateStream" in methods, methods

    method = service.FindMethodByName("Generate")
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    generate = channel.unary_unary(
        f"/{service.full_name}/{method.name}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    request = request_class(inputs="Hello")
    request.parameters.max_new_tokens = 3
    request.parameters.details = True
    response = generate(request, timeout=60)
    print("generated:", repr(response.generated_text), response.details.generated_tokens)
    assert response.details.generated_tokens == 3, response
    print("ALL OK")


if __name__ == "__main__":
    main(sys.argv[1])
