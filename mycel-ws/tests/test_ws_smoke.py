from mycel.testing import free_port, running
from websockets.asyncio.client import connect

from testsupport.ws import receive


async def test_smoke():
    port = free_port()
    config = f'''
    connector "mem" {{ type = "memory" }}
    connector "ws" {{ type = "websocket"  port = {port} }}
    flow "b" {{
      from {{ connector = "mem" operation = "price" }}
      to {{ connector = "ws" operation = "broadcast" }}
    }}
    '''
    async with running(config) as app:
        async with connect(f"ws://127.0.0.1:{port}/ws?rooms=a") as client:
            assert await receive(client) == {"type": "joined", "room": "a"}
            await app.publish("mem", "price", {"p": 1})
            assert await receive(client) == {"type": "message", "data": {"p": 1}}
