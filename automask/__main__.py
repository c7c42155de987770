"""``python -m automask`` runs the command line (torch loads only for commands that need it)."""
import sys

from .cli import run

sys.exit(run())
