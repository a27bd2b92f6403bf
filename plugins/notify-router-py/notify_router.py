"""notify-router: checks notifications and hands each one to the gateway for its kind.

The Python build of the Rust notify-router, with the same behaviour (see
../notify-router/README.md). It subscribes to `notifications:*`; the kind is the part of the
channel after `notifications:`. A valid notification goes, byte for byte as published, to the
output named like its kind; anything else is published on `notifications:dead` as a dead letter
and counts as handled. A failed gateway call is dead-lettered *and* returned as an error.

componentize-py builds this module into a component: it generates the `wit_world` bindings
from the WIT contract during the build, and the host's calls to the exported `handler`
interface land on an instance of the `Handler` class below.
"""

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import (
    Capabilities,
    Error_Failed,
    Error_Invalid,
    Error_Unavailable,
    Level,
    Message,
    PluginInfo,
    Subscription_Pattern,
)

import notification_rules as rules

VERSION = "0.1.0"


def _reject(message: Message, reason: str) -> None:
    """Dead-letters `message`. A failed publish propagates as the host's own Err."""
    host.log(Level.INFO, f"dead-lettering message on {message.channel}: {reason}")
    host.publish(
        rules.DEAD_LETTERS, rules.dead_letter(message.channel, reason, message.payload)
    )


def _deliver(kind: str, payload: bytes) -> None:
    """Calls the gateway for `kind`; raises Err when it did not take the notification."""
    reply = host.call_output(kind, payload)
    failure = rules.status_failure(reply.status)
    if failure is not None:
        transient, text = failure
        # 408, 429 and 5xx may well succeed later: the host treats `unavailable` as transient.
        raise Err(Error_Unavailable(text) if transient else Error_Failed(text))


class Handler(exports.Handler):
    """The exported `handler` interface. componentize-py finds it by this name."""

    def describe(self) -> PluginInfo:
        return PluginInfo(
            name="notify-router",
            version=VERSION,
            subscriptions=[Subscription_Pattern(rules.PREFIX + "*")],
            capabilities=Capabilities(
                publish=[rules.DEAD_LETTERS],
                invalidate=[],
                outputs=list(rules.REQUIRED_FIELDS),
            ),
        )

    def handle(self, message: Message) -> None:
        # A WIT `result<_, error>` is a return for ok and a raised Err(error) for the error.
        channel = message.channel
        if not channel.startswith(rules.PREFIX):
            raise Err(Error_Invalid(f"{channel} is not a {rules.PREFIX} channel"))
        kind = channel[len(rules.PREFIX):]
        decision = rules.route(kind, message.payload)
        if decision is rules.IGNORE:
            return
        if isinstance(decision, rules.Reject):
            _reject(message, decision.reason)
            return
        try:
            _deliver(kind, message.payload)
        except Err as error:
            # Every case of the WIT error variant carries its text as `.value`.
            _reject(message, f"output {kind} failed: {error.value.value}")
            raise
