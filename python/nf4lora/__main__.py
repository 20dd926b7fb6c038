"""`python -m nf4lora ...` (and `torchrun -m nf4lora finetune ...`): the command line of cli.py."""
import sys

from .cli import main

sys.exit(main())
