"""Confinement of the processes tools start: bash and execute (bubblewrap, cgroups, rlimits) and
Query tools' ripgrep (Landlock). `launcher.Sandbox` is the entry point; see README "Sandbox"."""
