"""The client side of `x2v-gateway`: commands a script or a person runs against a gateway.

  plan.py      forming jobs from local files (folder, manifest, grid), and their Idempotency-Keys
  api.py       the gateway's job API over httpx, streaming, with exit codes for every failure
  results.py   an output folder: videos, manifest.csv, and the journal a second run resumes from
  run.py       submitting, following and downloading a batch, with progress bars (rich)
  commands.py  the click commands: submit, watch, download, cancel, retry
"""

from .commands import COMMANDS

__all__ = ["COMMANDS"]
