"""`python -m vss_lightning predict|test|validate --config ...` (the same CLI as `vss-lightning`)."""

from vss_lightning.cli import main

if __name__ == "__main__":
    main()
