"""codelane: a runtime for coding agents that fans tool calls out across machines.

The `codelane` package holds the Python SDK and the generated stubs of the codelane.v1 contract
(`codelane.v1`). The server lives in `session_server`, the tools and worker in `tool_worker`.
"""

__version__ = "0.1.0"
