#!/bin/sh
# Prints the time every 10 seconds, forever.
while true; do
    echo "clock: it is $(date +%H:%M:%S)"
    sleep 10
done
