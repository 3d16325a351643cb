"""LLM providers: OpenAI-compatible Chat Completions, Anthropic Messages, and a scripted model."""
