"""Generated gRPC stubs of the codelane.v1 contract. Do not edit: run scripts/gen_protos.py."""
