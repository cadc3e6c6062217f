"""One module per `streamprune` subcommand: `run(config) -> int`, imported only when it runs.

A command reads its typed config (streamprune/config.py), assembles the runtime, models and
pruning recipe it needs, and prints what the user asked for; errors are `StreampruneError`s that
the CLI turns into one line and an exit code.
"""
