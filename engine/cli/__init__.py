"""The `polyrec` click admin commands: the group and its state (engine/cli/main.py), one
module per area of commands. ``CliState`` is what a plugin's command receives."""
from polyrec.cli.main import CliState, cli, echo_json, main

__all__ = ["CliState", "cli", "echo_json", "main"]
