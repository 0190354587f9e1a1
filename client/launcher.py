"""``fedgru hospital serve``: the hospital runs only the app version its staff approved.

Flower ships each run's app to the SuperNode as a FAB and, by default, runs whatever it
receives. Its own check (``flower-supernode --trusted-entities``) accepts only FABs that
a SuperLink marked as verified, which a self-hosted SuperLink never does, so a hospital
needs its own gate. This is it: the SuperNode starts with ``--isolation process`` and
runs no app itself; this process takes each task from the SuperNode's local runtime API,
compares the hash of the FAB the run came with against the hashes in the hospital's
``approved-apps.txt``, and

- refuses an unapproved FAB before anything reads patient data: the reply is an error
  that says so, and the hospital's log names the hash;
- runs an approved one with the app installed here, which is the approved code: at
  start-up this process checks that the installed project builds exactly an approved
  FAB, and refuses to serve otherwise.

It imports torch, Opacus and the app once; each task then runs in a child forked from
this process (milliseconds, no imports), so a task that Flower stops (it signals the
task's process when its run ends) or that crashes ends alone, and the hospital goes on
serving. Like Flower's own SuperExec, this process does not wait for a task before taking
the next one: a task whose run died under it (a coordinator killed mid-round leaves its
task retrying the runtime API, which Flower's retries do without end) must not keep the
hospital from answering the next run. A task still alive after ``task_timeout_s`` is
killed; the ledger survives that (its writes are atomic and its lock dies with the
process). The runtime-API calls are Flower 1.42's own (the ones its ``flwr-clientapp``
and ``flower-superexec`` make).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import time
from pathlib import Path

from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.build import build_fab_from_disk
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from common.paths import project_root

from .folder import FolderError, HospitalFolder

log = logging.getLogger("fedgru.hospital")


def app_hash(project: Path | None = None) -> str:
    """The sha256 of the FAB that ``flwr run`` builds from a project folder (default:
    the installed fedgru project): the identity of an app version."""
    return hashlib.sha256(build_fab_from_disk(project or project_root())).hexdigest()


class Gate:
    """Serves one hospital's SuperNode: approved app versions only."""

    def __init__(self, folder: HospitalFolder, runtime_address: str, poll_s: float = 0.2,
                 max_parallel: int = 4, task_timeout_s: float = 6 * 3600):
        self.folder = folder
        self.address = runtime_address
        self.poll_s = poll_s
        self.max_parallel = max_parallel  # tasks alive at once (each holds a forked copy of torch)
        self.task_timeout_s = task_timeout_s
        self.children: dict[int, float] = {}  # pid -> start (monotonic seconds)
        log.info("%s: starting: checking the installed app against approved-apps.txt", folder.name)
        self.installed = app_hash()
        if self.installed not in folder.approved():
            raise FolderError(
                f"the installed fedgru (app sha256 {self.installed}) is not in {folder.path / 'approved-apps.txt'}: "
                "review it, then run `fedgru hospital approve`"
            )
        log.info("%s: app %s… is approved; loading torch, Opacus and the app (once: each task forks from here)",
                 folder.name, self.installed[:16])
        from .app import build_client_app  # the heavy imports, once

        self.app = build_client_app()
        self.client = self._client(RuntimeVersionHttpInterceptor(component_name="SuperExec"))

    def _client(self, *interceptors) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=True, root_certificates=None,
            interceptors=list(interceptors), retry_invoker=make_simple_http_retry_invoker(),
        )

    def serve(self, max_tasks: int | None = None) -> None:
        """Take tasks until ``max_tasks`` were started (for ever by default), then wait for
        the ones still running."""
        # "ready" before the SuperNode answered read as connected while Flower retried for ever
        log.info("%s: app %s… loaded; waiting for the SuperNode at %s (flower-supernode must run there; until it "
                 "answers, Flower retries and warns)", self.folder.name, self.installed[:16], self.address)
        started, connected = 0, False
        while max_tasks is None or started < max_tasks:
            self.reap()
            if len(self.children) < self.max_parallel:
                res = self.client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                if not connected:
                    connected = True
                    log.info("%s: connected to the SuperNode at %s: serving its tasks", self.folder.name, self.address)
                if res.HasField("task") and res.token:
                    self._start_child(res.token)
                    started += 1
                    continue
            time.sleep(self.poll_s)
        while self.children:
            self.reap()
            time.sleep(self.poll_s)

    def _start_child(self, token: str) -> None:
        pid = os.fork()
        if pid == 0:  # the child: one task, then gone (whatever happens in it)
            code = 1
            try:
                self.run_task(token)
                code = 0
            finally:
                os._exit(code)
        self.children[pid] = time.monotonic()

    def reap(self) -> None:
        """Collect the tasks that ended, and kill the ones past ``task_timeout_s``."""
        for pid, start in list(self.children.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                del self.children[pid]
                if status != 0:
                    log.warning("%s: a task ended early (status %s); serving on", self.folder.name, status)
            elif time.monotonic() - start > self.task_timeout_s:
                log.warning("%s: a task ran past %.0f s (its run may have ended under it); stopped it",
                            self.folder.name, self.task_timeout_s)
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                del self.children[pid]

    def run_task(self, token: str) -> None:
        client = self._client(RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token))
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        context = None
        try:
            message, context, _run, fab = pull_task_input(client)
            if fab.hash_str != self.installed or fab.hash_str not in self.folder.approved():
                log.error(
                    "%s refused a task: the run's app (sha256 %s) is not an app version this hospital approved; "
                    "nothing was read", self.folder.name, fab.hash_str,
                )
                reason = f"{self.folder.name} runs only app versions its staff approved; app {fab.hash_str[:16]}… is not one"
                push_message(client, Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message), context)
                push_task_output(client, context, SubStatus.FAILED, reason)
                return
            reply = self.app(message=message, context=context)
            push_message(client, reply, context)
            push_task_output(client, context, SubStatus.COMPLETED, "")
        except Exception as exc:  # noqa: BLE001 - one broken task must not stop the hospital
            log.exception("a task failed")
            push_task_output(client, context, SubStatus.FAILED, f"the hospital's app failed ({exc.__class__.__name__})")
        # No heartbeat.stop() or client.close() here: this runs in a child that exits right
        # after (os._exit ends the heartbeat's daemon thread with it). stop() joins that
        # thread, and when the run ends as the task finishes (a coordinator killed after
        # the round, say) its heartbeat can be inside Flower's HTTP retries, which back off
        # without end (seen in the deployment test: 0 hospitals answered the resumed run).
