"""Conformance kits: does a tool worker, or a client library, follow the codelane protocol?"""
