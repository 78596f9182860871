"""Tiny dice-and-rules library used by the example core plugin."""
import random

ALIGNMENTS = ["lawful good", "neutral", "chaotic evil"]
_ROLLS = []


def roll(sides=20, logger=None):
    """Roll one die; AIGIS passes logger= because the signature accepts it."""
    result = random.randint(1, sides)
    _ROLLS.append(result)
    if logger:
        logger.info("rolled a d%d: %d", sides, result)
    return result


def forget_rolls():
    """Called from AIGIS.core's cleanup when AIGIS stops."""
    _ROLLS.clear()


class Character:
    """A class skill: registered as the class itself, never wrapped."""

    def __init__(self, name, alignment="neutral"):
        self.name = name
        self.alignment = alignment

    def __repr__(self):
        return f"Character({self.name!r}, {self.alignment!r})"
