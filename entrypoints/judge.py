"""MLproject's `judge` entry point (`python -m entrypoints.judge` from the project root): a thin
wrapper of em_core.commands.judge, which `em judge` runs too."""
import sys

from em_core.commands.judge import main

if __name__ == "__main__":
    sys.exit(main())
