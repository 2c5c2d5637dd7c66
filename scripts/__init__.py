"""Command-line tools that drive the harness from outside: `python -m scripts.X`."""
