"""``python -m dist_ortho.integrations.megatron SCRIPT [ARGS]``: run a Megatron-LM script (pretrain_gpt.py,
...) with dist_ortho installed, as ``python SCRIPT ARGS`` would (under torchrun: ``torchrun ... -m
dist_ortho.integrations.megatron pretrain_gpt.py ARGS``)."""

from __future__ import annotations

import runpy
import sys

from dist_ortho.integrations.megatron.install import install


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    install()
    sys.argv = argv
    sys.path.insert(0, str(__import__("pathlib").Path(argv[0]).resolve().parent))
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
