"""`python -m redraft_cli ...` (also what `accelerate launch -m redraft_cli` runs)."""

from .entry import main

if __name__ == "__main__":
    main()
