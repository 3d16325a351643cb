"""Generated stubs of the vendored REAPI v2 and ByteStream subset. Do not edit: run scripts/gen_protos.py."""
