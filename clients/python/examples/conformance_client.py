"""The client conformance scenario (docs/protocol.md, "Conformance kits", `codelane conformance
client`) played with the async Python SDK:

    codelane conformance client -- python clients/python/examples/conformance_client.py
"""

from __future__ import annotations

import asyncio
import os

from codelane import CaughtUp, Client, CodelaneError


async def main() -> None:
    async with Client(os.environ["CODELANE_SERVER"]) as client:
        session = await client.create_session(os.environ["CODELANE_CONFORMANCE_WORKSPACE"])
        print("session", session.id)
        async for event in session.send("hello"):
            print("turn", event.sequence, event.kind)
        async for item in session.watch(after=2, follow=False):
            if isinstance(item, CaughtUp):
                print("caught_up", item.last_sequence)
            else:
                print("replay", item.sequence, item.kind)
        try:
            async for _ in session.watch(after=1_000_000, follow=False):
                pass
        except CodelaneError as exc:
            print("error", exc.code, exc.reason)
        try:
            await client.get_session("missing")
        except CodelaneError as exc:
            print("error", exc.code, exc.reason)


if __name__ == "__main__":
    asyncio.run(main())
