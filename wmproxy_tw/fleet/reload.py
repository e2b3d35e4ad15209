"""Fleet-wide reload: ``wmproxy reload --fleet`` and the nodes' side of it.

The protocol, on Redis pub/sub (channels under ``key_prefix``):

1. the CLI lists the live nodes (their records, :func:`~wmproxy_tw.fleet.nodes.live_nodes`),
   subscribes to a reply channel of its own (``PREFIX reload:reply:ID``) and,
   once Redis confirmed that, publishes ``{"id", "reply"}`` on
   ``PREFIX reload``;
2. every node (:class:`~wmproxy_tw.fleet.FleetFeature` subscribes at start)
   re-reads its own configuration file through the service's usual reload
   path and publishes ``{"id", "node_id", "ok", "summary" | "errors"}`` on
   the reply channel;
3. the CLI waits, up to its timeout, for an answer from each live node, and
   prints one line per node (:func:`fleet_reload`).

Nodes that were not in the list but answered (started meanwhile) are shown
too; a listed node that did not answer counts as a failure.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Optional

from twisted.internet import defer
from twisted.logger import Logger

from ..config.model import Config
from .nodes import live_nodes
from .redis import RedisManager, RedisUnavailable

__all__ = ["request_channel", "answer", "fleet_reload", "format_answers"]

_log = Logger()

def request_channel(prefix: str) -> str:
    """Where reload requests are published."""
    return prefix + "reload"


def answer(request: dict[str, Any], node_id: str, result: Any) -> str:
    """A node's reply to ``request``: a reload summary (dict) or the errors (list of lines)."""
    doc: dict[str, Any] = {"id": request.get("id"), "node_id": node_id}
    if isinstance(result, dict):
        doc.update(ok=True, summary=(f"reloaded {result.get('config')}: kept {len(result.get('kept', []))}, "
                                     f"opened {len(result.get('opened', []))}, closed {len(result.get('closed', []))} "
                                     f"listeners"))
    else:
        doc.update(ok=False, errors=[str(e) for e in result])
    return json.dumps(doc)


async def fleet_reload(reactor: Any, config: Config, timeout: float) -> tuple[list[str], Any]:
    """Ask every live node of ``config``'s fleet to reload: (one line per node, True if all
    reloaded), or ([], why) when there was nobody to ask (Redis unreachable, no live node)."""
    fleet = config.fleet
    assert fleet is not None
    redis = RedisManager(reactor, fleet.redis, password=fleet.password, tls_ca=fleet.tls_ca,
                         connect_timeout=min(timeout, 5.0), reply_timeout=min(timeout, 5.0))
    redis.start()
    try:
        try:
            await redis.when_available(min(timeout, 5.0))
            nodes = await live_nodes(redis, fleet.key_prefix)
        except RedisUnavailable as e:
            return [], f"cannot reach the fleet's Redis: {e}"
        if not nodes:
            return [], f"no live node is registered in {redis.url} under {fleet.key_prefix!r}"
        rid = uuid.uuid4().hex
        reply = f"{fleet.key_prefix}reload:reply:{rid}"
        answers: dict[str, dict[str, Any]] = {}
        expected = {str(n.get("node_id")) for n in nodes}
        complete: defer.Deferred[None] = defer.Deferred()

        def got(_channel: str, message: str) -> None:
            try:
                doc = json.loads(message)
            except ValueError:
                return
            if not isinstance(doc, dict) or doc.get("id") != rid:
                return
            answers[str(doc.get("node_id"))] = doc
            if expected <= set(answers) and not complete.called:
                complete.callback(None)

        await redis.subscribe(reply, got)
        await redis.publish(request_channel(fleet.key_prefix), json.dumps({"id": rid, "reply": reply}))
        complete.addTimeout(timeout, reactor)
        try:
            await complete
        except defer.TimeoutError:
            pass
        return format_answers(nodes, answers, timeout)
    finally:
        await redis.stop()


def format_answers(nodes: list[dict[str, Any]], answers: dict[str, dict[str, Any]],
                   timeout: float) -> tuple[list[str], bool]:
    """One line per node: ``NODE  ok  summary`` / ``NODE  FAILED  error`` / ``NODE  no answer``."""
    ids = [str(n.get("node_id")) for n in nodes] + sorted(set(answers) - {str(n.get("node_id")) for n in nodes})
    width = max(len(i) for i in ids)
    lines, ok = [], True
    for node_id in ids:
        doc: Optional[dict[str, Any]] = answers.get(node_id)
        if doc is None:
            ok = False
            lines.append(f"{node_id:<{width}}  FAILED  no answer within {timeout:g}s")
        elif doc.get("ok"):
            lines.append(f"{node_id:<{width}}  ok      {doc.get('summary', '')}")
        else:
            ok = False
            lines.append(f"{node_id:<{width}}  FAILED  {'; '.join(doc.get('errors') or ['unknown error'])}")
    return lines, ok
