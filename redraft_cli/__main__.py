"""`python -m redraft_cli ...` (also what `accelerate launch -m redraft_cli` runs)."""

from .cli.app import main

if __name__ == "__main__":
    main()
