"""The HTTP requests a block of code makes, by method and endpoint: every MLflow client
call to a tracking server (REST and proxied artifacts) goes through
`requests.Session.request`, which `counting_requests` wraps for the block's duration.
Ids and artifact paths are folded, so one trial's requests group into a short table. A
count is deterministic where a trial's seconds on a shared machine are not.

`python -m benchmarks.http_requests` prints the table for one logged trial (quick.yaml's
training settings, a child of a study's parent run) against a fresh tracking server, in
the order the requests were made.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_ID = re.compile(r"\b(m-)?[0-9a-f]{32}\b")
_ARTIFACT = re.compile(r"(/mlflow-artifacts/artifacts)/.*")


@dataclass(frozen=True)
class Request:
    method: str
    endpoint: str  # the path, ids as <id> and artifact paths as /...
    path: str
    milliseconds: float
    thread: str


@dataclass
class RequestLog:
    requests: list[Request] = field(default_factory=list)

    def by_endpoint(self) -> Counter[str]:
        return Counter(f"{r.method} {r.endpoint}" for r in self.requests)

    def summary(self) -> str:
        """'12 PUT /api/2.0/mlflow-artifacts/artifacts/..., 5 POST .../runs/log-batch, ...',
        most frequent first."""
        return ", ".join(f"{n} {name}" for name, n in self.by_endpoint().most_common())


def endpoint_of(url: str) -> str:
    path = urlsplit(url).path
    return _ARTIFACT.sub(r"\1/...", _ID.sub("<id>", path))


@contextmanager
def counting_requests() -> Iterator[RequestLog]:
    """Every request made in this process (any thread) while the block runs."""
    import requests

    log = RequestLog()
    original = requests.Session.request

    def request(self, method, url, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original(self, method, url, *args, **kwargs)
        finally:
            log.requests.append(
                Request(
                    method.upper(),
                    endpoint_of(url),
                    urlsplit(url).path,
                    (time.perf_counter() - started) * 1000,
                    threading.current_thread().name,
                )
            )

    requests.Session.request = request
    try:
        yield log
    finally:
        requests.Session.request = original


def main() -> None:
    from contextlib import ExitStack

    from benchmarks.common import Context
    from benchmarks.team import CONFIG, test_helpers
    from mnist_track import tracking
    from mnist_track.config import load_study_config
    from mnist_track.runs import train_and_track

    postgres, tracking_server = test_helpers()
    context = Context(quick=True)
    train = load_study_config(CONFIG, {}).train
    splits = context.splits(
        val_size=train.val_size, split_seed=train.split_seed, train_limit=train.train_limit
    )
    with ExitStack() as stack:
        postgres_url = stack.enter_context(postgres.postgres_cluster())
        server = stack.enter_context(tracking_server.running_tracking_server(postgres_url))
        tracking.use_tracking_uri(server.url)
        # A study's trials: children of one parent run. The first creates the registered
        # model and reads the parent's experiment.
        parent = tracking.create_run("requests", "study", {})

        def trial():
            train_and_track(
                train,
                splits,
                experiment="requests",
                registered_model="requests",
                parent_run_id=parent,
            )

        trial()
        with counting_requests() as log:
            trial()
    for r in log.requests:
        print(f"{r.milliseconds:7.1f} ms  {r.thread[:18]:18}  {r.method:6} {r.path}")
    total = sum(r.milliseconds for r in log.requests)
    print(f"\n{len(log.requests)} requests, {total:.0f} ms in all (threads overlap):")
    for name, count in log.by_endpoint().most_common():
        print(f"{count:4}  {name}")


if __name__ == "__main__":
    main()
