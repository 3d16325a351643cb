"""The codelane tool library (every built-in tool with its spec) and the tool-worker process."""
