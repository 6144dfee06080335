"""Real data shipped inside the package, so the default run trains and calibrates on real text offline.

* ``alpaca-libre`` (``alpaca_libre.jsonl.gz``): 2,494 Alpaca-format rows (``instruction``, ``input``, ``output``)
  from the alpaca-libre project (https://github.com/mobarski/alpaca-libre, repository license MIT; its README
  states "All data byproducts are CC0/MIT-licensed"): the first 2,528 of the project's 2,828 generated tasks minus
  the 34 with an empty ``output``. The last 300 are held out of the package, so the benchmarks' held-out rows
  (``scripts/bench_wct_vs_qlora.py``) are in no file of the repository. Responses were machine-generated.
* ``emma`` (``emma.txt.gz``): Jane Austen's *Emma* (1815), public domain, the Project Gutenberg transcription as
  packaged in ``janeaustenr`` (packaging MIT, Julia Silge). Disjoint from the *Pride and Prejudice* text the
  perplexity benchmarks evaluate on.

See ``NOTICE.md`` beside this file for the attributions and docs/data.md for how the runs use them.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
INSTRUCTIONS = {"alpaca-libre": HERE / "alpaca_libre.jsonl.gz"}
TEXTS = {"emma": HERE / "emma.txt.gz"}
ORIGINS = {
    "alpaca-libre": "alpaca-libre (embedded: wct/data/embedded/alpaca_libre.jsonl.gz; MIT/CC0, "
    "github.com/mobarski/alpaca-libre)",
    "emma": "emma (embedded: wct/data/embedded/emma.txt.gz; Jane Austen, public domain, Project Gutenberg)",
}
