"""`python -m training.convert_llama2c`: convert a llama2.c checkpoint and tokenizer into a Llama folder. The code is `training.converters.llama2c`."""

import sys

from training.converters.llama2c import main
from training.utils.exports import moved

# The names this module held before the code moved keep working for one release (with a DeprecationWarning).
__getattr__, __dir__ = moved(__name__, "training.converters.llama2c")

if __name__ == "__main__":
    sys.exit(main())
