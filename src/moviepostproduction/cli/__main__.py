"""python -m moviepostproduction.cli (accelerate launch / torchrun -m ...)."""

from moviepostproduction.cli import app

app()
