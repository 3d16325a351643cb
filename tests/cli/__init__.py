"""Tests of the codelane CLI and the sync SDK against real servers."""
