"""`python -m onnx_net2net` runs the command-line interface."""

import sys

from .cli import main

sys.exit(main())
