"""The gRPC API: protobuf <-> domain translation, status codes, the server process."""
