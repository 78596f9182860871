"""Asks the core for dice rolls every few seconds and prints what it got."""
import time

import aigis


def launch():
    with open("secrets/motd.secret") as motd:
        print("oracle: message of the day:", motd.read().strip())
    alignments = aigis.dnd.ALIGNMENTS()  # constants are called through the proxy
    for turn in range(1_000_000):
        print(f"oracle: turn {turn}: rolled {aigis.dnd.roll(20)}; alignments {alignments}")
        time.sleep(5)
