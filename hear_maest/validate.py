"""Run the published HEAR validator (``hearvalidator`` 2021.0.2) on hear_maest, with or without TensorFlow.

    python -m hear_maest.validate [hear_maest] --model weights/discogs-maest-30s-pw-129e-swa.ckpt [--device cuda]

is ``hear-validator hear_maest --model ...``: the same published code (``hearvalidator.validate.main``);
the module to validate may be named as there, and is ``hear_maest`` when left out.
That code imports TensorFlow only to ask whether the model is a ``tf.Module`` and for ``tf.device``;
where TensorFlow is not installed (``pip install --no-deps hearvalidator==2021.0.2``), a stand-in
module with those two names takes its place for the run, so the torch checks run unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import sys
import types


def tensorflow_stand_in() -> types.ModuleType:
    """A ``tensorflow`` module with the two names hearvalidator uses; nothing is a ``tf.Module``."""
    tf = types.ModuleType("tensorflow")
    tf.Module = type("Module", (), {"__doc__": "stand-in: no TensorFlow model is ever one"})
    tf.device = lambda name: contextlib.nullcontext()
    return tf


@contextlib.contextmanager
def tensorflow_available():
    """TensorFlow if installed, else the stand-in in ``sys.modules`` until the block ends."""
    if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is not None:
        yield
        return
    sys.modules["tensorflow"] = tensorflow_stand_in()
    try:
        yield
    finally:
        del sys.modules["tensorflow"]


MODULE = "hear_maest"


def parser() -> argparse.ArgumentParser:
    """The validator's own arguments (``hearvalidator.validate.main``), its module optional: ``hear_maest`` by default."""
    p = argparse.ArgumentParser(
        prog="python -m hear_maest.validate",
        description="Run the published HEAR 2021 validator (hearvalidator 2021.0.2) on hear_maest, with or without TensorFlow.",
    )
    p.add_argument("module", nargs="?", default=MODULE, help=f"the model package to validate (default {MODULE})")
    p.add_argument("--model", "-m", default="", help="the checkpoint to load (default: the released model from the weights directory)")
    p.add_argument("--device", "-d", default=None, help="the device to validate on (default: a GPU if available)")
    return p


def main(argv: list[str] | None = None) -> None:
    """``hear-validator [module] --model PATH --device DEVICE`` with ``argv`` (the module is ``hear_maest`` when left out)."""
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    forwarded = [args.module, "--model", args.model] + ([] if args.device is None else ["--device", args.device])
    try:
        with tensorflow_available():
            validate = importlib.import_module("hearvalidator.validate")
    except ModuleNotFoundError as e:
        if e.name != "hearvalidator":
            raise
        raise SystemExit("hearvalidator is not installed: pip install --no-deps hearvalidator==2021.0.2") from None
    saved = sys.argv
    sys.argv = ["hear-validator", *forwarded]
    try:
        validate.main()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
