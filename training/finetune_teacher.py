"""`python -m training.finetune_teacher`: correct the teacher with TRL's SFTTrainer + LoRA before distilling. The code is `training.trainers.teacher_sft`."""

import sys

from training.trainers.teacher_sft import main
from training.utils.exports import moved

# The names this module held before the code moved keep working for one release (with a DeprecationWarning).
__getattr__, __dir__ = moved(__name__, "training.trainers.teacher_sft")

if __name__ == "__main__":
    sys.exit(main())
