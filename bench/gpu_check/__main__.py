"""``python -m bench.gpu_check``: exit status 0 when every part ran (or said why it could not), 1
when one failed, raised or ran out of its share, 2 without a CUDA device (use --dry-run)."""
import sys

from .cli import cli

if __name__ == "__main__":
    sys.exit(cli())
