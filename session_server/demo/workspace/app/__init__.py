"""The greeter app."""
