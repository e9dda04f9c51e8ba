"""`python -m training.model_card RUN_DIR`: write the student's model card, RUN_DIR/README.md (it was
`python -m model_cards`). The code is `training.hub.model_card`."""

import sys

from training.hub.model_card import main

if __name__ == "__main__":
    sys.exit(main())
