"""gRPC servicers. They translate between codelane.v1 protos and domain objects, nothing more."""
