"""Which checkpoint a run resumes from."""

from __future__ import annotations

from pathlib import Path

from wct.errors import WCTError


def resolve_ckpt(ckpt_path: str | None, run_dir: Path) -> str | None:
    """``last`` → the newest ``checkpoints/last.ckpt`` of earlier runs with this run name; else the path given."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        found = sorted(run_dir.parent.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        found = [p for p in found if run_dir not in p.parents]
        if not found:
            raise WCTError(f"ckpt_path=last: no earlier run under {run_dir.parent} has checkpoints/last.ckpt; "
                           "pass the checkpoint file with ckpt_path=/path/to/last.ckpt")
        return str(found[-1])
    if not Path(ckpt_path).is_file():
        raise WCTError(f"ckpt_path={ckpt_path} does not exist; pass a .ckpt file of a wct run or ckpt_path=last")
    return ckpt_path
