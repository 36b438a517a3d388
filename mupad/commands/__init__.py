"""What every `mupad` command shares: the error boundary (one line per failure, exit code 2;
130 when interrupted) and the root group that imports a command's module only when that
command runs. The commands themselves live next to their library code (`*_cli.py`)."""
