"""The text the package carries, so that `pip install llamaship` users can validate and calibrate
with no data folder of their own: WikiText-2 test (evaluation) and validation (calibration). See
README.md in this folder for the source and licence (CC BY-SA 3.0)."""

from __future__ import annotations

import os
from pathlib import Path

from llamaship.errors import DataError

EVAL_FILE = "wikitext-2-test.txt"
CALIB_FILE = "wikitext-2-valid.txt"
HERE = Path(__file__).resolve().parent
MAX_TEXT_BYTES = 256 << 20


def data_file(name: str = EVAL_FILE) -> Path:
    """`name` from the folder LLAMASHIP_DATA names (an override, e.g. another release of the text),
    else from the package itself."""
    env = os.environ.get("LLAMASHIP_DATA")
    folder = Path(env) if env else HERE
    path = folder / name
    if path.is_file():  # a regular file (a FIFO would block the reader), of a text corpus' size
        if path.stat().st_size > MAX_TEXT_BYTES:
            raise DataError(f"{path} is {path.stat().st_size} bytes; WikiText-2 is about 1 MB: is LLAMASHIP_DATA "
                            "pointing at the right folder?")
        return path
    if env:
        raise DataError(f"{path} not found: LLAMASHIP_DATA={env} must name a folder holding {name}; "
                             "unset it to use the copy the package carries")
    raise DataError(f"{path} not found: the llamaship installation is incomplete; reinstall it "
                         "(pip install --force-reinstall llamaship) or set LLAMASHIP_DATA to a folder holding it")
