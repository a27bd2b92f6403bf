"""{{name}}: republishes every message on `{{name}}:in` on `{{name}}:out`.

A starting point: change `describe` and `handle`, then the manifest and the test files.
componentize-py generates the `wit_world` bindings from wit/plugin.wit while it builds; a WIT
`result<_, error>` is a normal return for ok and a raised `Err(error)` for the error.
"""

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import (
    Capabilities,
    Error_Invalid,
    Level,
    Message,
    PluginInfo,
    Subscription_Channel,
)

INPUT = "{{name}}:in"
OUTPUT = "{{name}}:out"

# Module state lives as long as the instance: messages seen so far.
seen = 0


class Handler(exports.Handler):
    """The exported `handler` interface; componentize-py finds it by this name."""

    def describe(self) -> PluginInfo:
        return PluginInfo(
            name="{{name}}",
            version="0.1.0",
            subscriptions=[Subscription_Channel(INPUT)],
            capabilities=Capabilities(publish=[OUTPUT], invalidate=[], outputs=[]),
        )

    def handle(self, message: Message) -> None:
        global seen
        if not message.payload:
            raise Err(Error_Invalid("empty payload"))
        seen += 1
        host.log(Level.DEBUG, f"message {seen} on {message.channel}")
        # `send` queues the message and returns (`publish` would wait for Redis's reply with
        # the receiver count). A denied send raises Err, which becomes this message's error.
        host.send(OUTPUT, message.payload)
