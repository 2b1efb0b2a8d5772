"""``python -m duplus.synth.phantoms``: write a Decathlon task of phantoms (see :mod:`duplus.synth.phantoms.cli`)."""

from duplus.synth.phantoms.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
