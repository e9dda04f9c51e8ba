"""python -m model_cards RUN_DIR [--repo_id ...]: write RUN_DIR/README.md, the student's model card."""

import argparse
import sys

from .card import write_card


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_cards", description=__doc__)
    parser.add_argument("run_dir", help="a finished training.train output_dir")
    parser.add_argument("--repo_id", default=None, help="Hub id used in the card's code (default: the folder name)")
    parser.add_argument("--base_model", default=None, help="Hub id of the teacher (default: from the run's config)")
    parser.add_argument("--license", default=None, help="license identifier for the YAML header")
    args = parser.parse_args(argv)
    print(write_card(args.run_dir, repo_id=args.repo_id, base_model=args.base_model, license=args.license))
    return 0


if __name__ == "__main__":
    sys.exit(main())
