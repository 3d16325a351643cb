"""The built-in tools, one module each; `tool_worker.registry` collects them."""
