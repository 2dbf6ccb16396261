"""The client commands of `x2v-gateway`: submit, watch, download, cancel, retry.

They talk to a gateway over its API (`X2V_URL`, `X2V_KEY`), locally or on another machine, and
import nothing of the server: httpx and rich are loaded when a command runs, so `serve` and
`keys` start no slower for them.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .plan import JOB_FIELDS, MODES, TASKS

if TYPE_CHECKING:
    from .api import GatewayAPI
    from .run import Display, Outcome

EXIT_CODES = """\b
Exit codes:
  0    every job succeeded (and, with an output folder, every video is in it)
  1    some jobs failed or were cancelled
  2    usage: a bad option, a missing file, a manifest that cannot be read
  3    the gateway does not answer (not running, wrong X2V_URL)
  4    no key, or the gateway refused it (X2V_KEY)
  5    the gateway refused a request (an unknown job or batch, an input it cannot take)
  6    download --no-wait, and some jobs have not finished yet
  130  interrupted (Ctrl-C): run the same command again to go on"""


def _gateway_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--url, --key, --json and --quiet, and the translation of every failure to its exit code."""

    @click.option("--url", envvar="X2V_URL", default="http://127.0.0.1:8000", show_default=True,
                  help="The gateway (or X2V_URL)")
    @click.option("--key", envvar="X2V_KEY", show_default=False,
                  help="API key; better in X2V_KEY, since `ps` shows a command's flags to everyone")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout when done, for pipes")
    @click.option("--quiet", "-q", is_flag=True, help="No progress bars on stderr")
    @functools.wraps(command)
    def run(url: str, key: str | None, as_json: bool, quiet: bool, **kwargs: Any) -> None:
        from .api import GatewayAPI
        from .run import Display

        api = None
        try:
            api = GatewayAPI(url, key)
            with Display(enabled=not quiet) as display:
                answer, code = command(api=api, display=display, **kwargs)
        except KeyboardInterrupt:
            click.echo("\nx2v-gateway: interrupted; run the same command again to go on", err=True)
            sys.stdout.flush()
            # Upload and download threads may be mid-request: what they finished is in the
            # journal, and the rest is redone (safely) by the next run, so do not wait for them.
            os._exit(130)
        except _planning_errors() as exc:
            _fail(exc)
        finally:
            if api is not None:
                api.close()
        _answer(answer, as_json)
        sys.exit(code)

    return run


def _planning_errors() -> tuple[type[Exception], ...]:
    from .api import ClientError
    from .plan import PlanError

    return ClientError, PlanError


def _fail(exc: Exception) -> None:
    from .api import USAGE
    from .plan import PlanError

    if isinstance(exc, PlanError):
        for problem in exc.problems:
            click.echo(f"x2v-gateway: {problem}", err=True)
        sys.exit(USAGE)
    click.echo(f"x2v-gateway: {exc}", err=True)
    sys.exit(exc.code)  # type: ignore[attr-defined]


def _answer(answer: Any, as_json: bool) -> None:
    """The command's answer on stdout: JSON for `--json`, else a line for people."""
    if hasattr(answer, "as_json"):
        if as_json:
            click.echo(json.dumps(answer.as_json()))
        else:
            click.echo(answer.summary())
        return
    click.echo(json.dumps(answer) if as_json else _human(answer))


def _human(answer: dict[str, Any]) -> str:
    if "jobs" in answer and "cancelled" in answer:  # a batch cancelled
        return f"batch {answer['batch_id']}: {answer['cancelled']} of {answer['jobs']} jobs cancelled"
    if "retried" in answer:
        return f"batch {answer['batch_id']}: {len(answer['retried'])} failed jobs queued again"
    return f"job {answer['id']}: {answer['state']}"


def _outcome(outcome: Outcome, display: Display) -> tuple[Outcome, int]:
    for job in outcome.jobs:
        if job["state"] == "failed" and display.progress is None:  # else said above the bars
            click.echo(f"x2v-gateway: job {job['id']} failed: {job.get('error') or 'no reason given'}", err=True)
    return outcome, outcome.code


def _set(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    fields = {}
    for value in values:
        name, sep, text = value.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in JOB_FIELDS:
            raise click.BadParameter(f"{value!r}: write NAME=VALUE, NAME one of {', '.join(JOB_FIELDS)}")
        fields[name] = text.strip()
    return fields


@click.command(epilog=EXIT_CODES)
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--task", type=click.Choice(TASKS), default="s2v", show_default=True, help="Task type of every job")
@click.option("--mode", type=click.Choice(MODES),
              help="each: every image × every audio; pair: image and audio by file name; manifest: a job per"
                   " row of the .csv/.jsonl among PATHS; grid: input sets × --prompts × --seeds."
                   " Default: manifest with one, grid with --prompts or --seeds, else each")
@click.option("--prompt", default="", help="Prompt of every job (a manifest row or --prompts may set its own)")
@click.option("--negative-prompt", default="", help="Negative prompt of every job")
@click.option("--seed", help="Seed of every job (default: a random one each)")
@click.option("--priority", type=click.IntRange(-100, 100), help="Higher runs first")
@click.option("--set", "params", multiple=True, callback=_set, metavar="NAME=VALUE",
              help="Any other job field, e.g. --set infer_steps=8 --set target_shape=480,832 (repeatable)")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="grid: a file of prompts, one a line")
@click.option("--seeds", help="grid: seeds, e.g. 1,2,10-12")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: videos, manifest.csv and the journal a second run resumes from."
                   " Default: ./<first PATH's name>-videos, or ./<batch id> without PATHS")
@click.option("--parallel", type=click.IntRange(1, 16), default=2, show_default=True, help="Uploads at once")
@click.option("--no-wait", is_flag=True, help="Return once every job is submitted; fetch later with `download`")
@_gateway_options
def submit(
    api: GatewayAPI, display: Display, paths: tuple[Path, ...], task: str, mode: str | None, prompt: str,
    negative_prompt: str, seed: str | None, priority: int | None, params: dict[str, str],
    prompts_file: Path | None, seeds: str | None, out: Path | None, parallel: int, no_wait: bool,
) -> tuple[Outcome, int]:
    """Submit a batch made from a folder, files or a CSV/JSONL manifest, follow it, and download
    each video as it finishes into an output folder with a manifest.csv.

    Jobs are formed as on the dashboard's new-batch page. Run the same command again after an
    interruption: nothing is submitted twice (each job has an Idempotency-Key derived from its
    inputs) and no video is downloaded twice (the folder's files are checked by sha256).

    \b
    Examples:
      export X2V_URL=http://gpu-box:8000 X2V_KEY=x2v_...
      x2v-gateway submit portraits/ --prompt "a presenter talking" --out videos/
      x2v-gateway submit faces/ voices/ --mode pair
      x2v-gateway submit jobs.csv assets/ --out campaign/
      x2v-gateway submit --task t2v --prompts prompts.txt --seeds 1-4 --json | jq .counts
      BATCH=$(x2v-gateway submit portraits/ --no-wait --json | jq -r .batch_id)
    """
    from .plan import collect, plan_jobs
    from .run import submit_batch

    inputs = collect(list(paths))
    for skipped in inputs.skipped:
        click.echo(f"x2v-gateway: skipping {skipped}: not an image, audio or a video", err=True)
    base = {"prompt": prompt, "negative_prompt": negative_prompt, "seed": seed or "",
            "priority": "" if priority is None else str(priority), **params}
    prompts = None
    if prompts_file is not None:
        prompts = [line.strip() for line in prompts_file.read_text(errors="replace").splitlines() if line.strip()]
    planned = plan_jobs(inputs, task=task, mode=mode, base=base, prompts=prompts, seeds=seeds)
    named = paths[0] if paths else prompts_file
    if out is None and named is not None:
        out = Path(f"{named.resolve().stem}-videos")
    return _outcome(submit_batch(api, planned, out, display, parallel=parallel, wait=not no_wait), display)


@click.command(epilog=EXIT_CODES)
@click.argument("batch")
@_gateway_options
def watch(api: GatewayAPI, display: Display, batch: str) -> tuple[Outcome, int]:
    """Follow a batch until every job has finished; the exit code says how it went.

    \b
    Examples:
      x2v-gateway watch b3f9c2...
      x2v-gateway watch "$BATCH" --quiet && echo "all done"
      x2v-gateway watch "$BATCH" --json | jq '.jobs[] | select(.state == "failed")'
    """
    from .api import ClientError
    from .run import follow

    if not api.batch_jobs(batch):
        raise ClientError(f"no batch {batch} (or none of its jobs is this key's)")
    return _outcome(follow(api, batch, display), display)


@click.command(epilog=EXIT_CODES)
@click.argument("batch")
@click.argument("dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--no-wait", is_flag=True, help="Take the videos ready now; do not wait for the other jobs")
@_gateway_options
def download(api: GatewayAPI, display: Display, batch: str, dir: Path, no_wait: bool) -> tuple[Outcome, int]:
    """Download a batch's videos into DIR, with a manifest.csv; waits for unfinished jobs.

    A video already in DIR (same size and sha256 as the gateway's) is not downloaded again.

    \b
    Examples:
      x2v-gateway download "$BATCH" videos/
      x2v-gateway download "$BATCH" videos/ --no-wait --json | jq .counts
    """
    from .run import download_batch

    return _outcome(download_batch(api, batch, dir, display, wait=not no_wait), display)


@click.command(epilog=EXIT_CODES)
@click.argument("id")
@click.option("--purge", is_flag=True, help="Also delete the inputs and videos on the gateway now")
@_gateway_options
def cancel(api: GatewayAPI, display: Display, id: str, purge: bool) -> tuple[dict[str, Any], int]:
    """Cancel a job, or every unfinished job of a batch.

    \b
    Examples:
      x2v-gateway cancel jk2v7...
      x2v-gateway cancel "$BATCH" --purge --json
    """
    from .api import OK, ClientError

    try:
        return api.cancel_job(id, purge), OK
    except ClientError as exc:
        if exc.status != 404:
            raise
    try:
        return api.cancel_batch(id, purge), OK
    except ClientError as exc:
        if exc.status == 404:
            raise ClientError(f"no job or batch {id}") from None
        raise


@click.command(epilog=EXIT_CODES)
@click.argument("id")
@_gateway_options
def retry(api: GatewayAPI, display: Display, id: str) -> tuple[dict[str, Any], int]:
    """Run a failed or cancelled job again (same parameters and seed); for a batch, every failed job.

    \b
    Examples:
      x2v-gateway retry jk2v7...
      x2v-gateway retry "$BATCH" && x2v-gateway download "$BATCH" videos/
    """
    from .api import OK, ClientError

    try:
        return api.retry(id), OK
    except ClientError as exc:
        if exc.status != 404:
            raise
    jobs = api.batch_jobs(id)
    if not jobs:
        raise ClientError(f"no job or batch {id}")
    retried = [api.retry(job["id"])["id"] for job in jobs if job["state"] == "failed"]
    return {"batch_id": id, "retried": retried}, OK


COMMANDS = (submit, watch, download, cancel, retry)
