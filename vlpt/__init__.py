"""The `vlpt` command line, the top of the package layering: kernels <- data <- trainer <- cluster <- vlpt.

Run it as `vlpt ...` (console script) or `python -m vlpt ...`; `vlpt.cli` holds the
subcommands. Nothing below imports this package.
"""
