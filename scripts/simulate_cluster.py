"""The driver at cluster scale, by simulation (`jobs.simulate`): the real driver, scheduler and
record store with stand-in workers; prints the driver's cost per batch and the number of GPU
workers at which it would become the bottleneck.

    .venv/bin/python scripts/simulate_cluster.py [workers=64] [problems=10000] [key=value ...]
"""

import sys

from jobs.simulate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
