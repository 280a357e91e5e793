"""``python -m slimguard``: the command line, also what ``torchrun -m slimguard`` starts on every rank.

Example:
    torchrun --nproc_per_node 2 -m slimguard compress --recipe recipe.yaml --out out/
"""

from slimguard.cli import main

if __name__ == "__main__":
    main()
