"""semantic_search: the tests that need the semantic extra skip, with this reason, without it."""

EXTRA_MISSING = "the semantic extra is not installed: pip install -e '.[semantic]'"
