"""The codelane session server: agent loop, lane scheduler, worker hub, providers, store."""
