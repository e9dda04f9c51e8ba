"""`python -m training.convert_gguf`: Llama GGUF file -> safetensors Llama folder. The code is `training.converters.gguf`."""

import sys

from training.converters.gguf import main

if __name__ == "__main__":
    sys.exit(main())
