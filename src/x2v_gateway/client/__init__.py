"""The client side of `x2v-gateway`: commands a script or a person runs against a gateway.

  plan.py      forming jobs from local files (folder, manifest, grid), and their Idempotency-Keys
  api.py       the gateway's job API over httpx, streaming, with exit codes for every failure
  results.py   an output folder: videos, manifest.csv, and the journal a second run resumes from
  run.py       submitting, following and downloading a batch, with progress bars (rich)
  commands.py  the click commands: submit, watch, download, cancel, retry
  pipeline.py  `pipeline submit FILE.json`: a pipeline's document sent, followed, its video downloaded
"""

from .commands import COMMANDS as _JOB_COMMANDS
from .pipeline import pipeline

COMMANDS = (*_JOB_COMMANDS, pipeline)
__all__ = ["COMMANDS"]
