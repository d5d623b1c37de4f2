"""``python -m torch_impl COMMAND ...``: the command line (:mod:`torch_impl.pipeline.cli`)."""

import sys

from .pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main())
