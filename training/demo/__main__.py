"""`python -m training.demo --config examples/configs/demo.yaml [--key value ...]`."""

import sys

from training.demo.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
