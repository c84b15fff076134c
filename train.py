"""corrsteer-pl command line: `python train.py fit|validate|test --config configs/<x>.yaml`."""

from corrsteer_pl.lightning.cli import main

if __name__ == "__main__":
    main()
