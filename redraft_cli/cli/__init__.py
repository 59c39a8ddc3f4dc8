"""The command-line layer: parses options and prints; all work is in the core."""
