"""``python -m bench.dual_masking``: exit status 1 when a cell failed with an error."""
import sys

from .cli import cli

if __name__ == "__main__":
    sys.exit(cli())
