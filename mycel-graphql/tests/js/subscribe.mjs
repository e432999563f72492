// Subscribes with the reference graphql-ws client and prints one JSON line
// per thing that happens, for the Python tests to read.
//
//   node subscribe.mjs '{"url": "...", "query": "...", "count": 2,
//                        "connectionParams": {...}, "variables": {...}}'
//
// Lines: {"event":"connected"}, {"event":"next","payload":...},
// {"event":"error","payload":...}, {"event":"complete"},
// {"event":"closed","code":N,"reason":"..."}. Exits after `count` next
// messages, or when the socket closes.
import { createClient } from "graphql-ws";
import WebSocket from "ws";

const args = JSON.parse(process.argv[2]);
const print = (line) => process.stdout.write(JSON.stringify(line) + "\n");

const client = createClient({
  url: args.url,
  webSocketImpl: WebSocket,
  connectionParams: args.connectionParams,
  retryAttempts: 0,
  lazy: false,
  on: {
    connected: () => print({ event: "connected" }),
    closed: (event) => {
      print({ event: "closed", code: event.code, reason: event.reason });
      process.exit(0);
    },
  },
});

let received = 0;
client.subscribe(
  { query: args.query, variables: args.variables },
  {
    next: (payload) => {
      print({ event: "next", payload });
      received += 1;
      if (received >= args.count) {
        client.dispose();
      }
    },
    error: (error) => {
      const payload = Array.isArray(error)
        ? error
        : { message: String(error.message ?? error.reason ?? error) };
      print({ event: "error", payload });
    },
    complete: () => print({ event: "complete" }),
  },
);
