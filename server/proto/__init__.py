"""The gRPC API's generated stubs (`loraserve.proto.v1`), made from protos/ by `loraserve.proto.codegen`."""
