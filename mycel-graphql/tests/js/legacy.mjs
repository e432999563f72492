// Speaks the older graphql-ws subprotocol (subscriptions-transport-ws) over
// a raw `ws` socket and prints every server message as one JSON line.
//
//   node legacy.mjs '{"url": "...", "query": "...", "count": 2,
//                     "connectionParams": {...}}'
//
// Sends connection_init, then start once acknowledged; after `count` data
// messages sends stop and connection_terminate. Prints
// {"event":"closed","code":N} when the socket closes, then exits.
import WebSocket from "ws";

const args = JSON.parse(process.argv[2]);
const print = (line) => process.stdout.write(JSON.stringify(line) + "\n");
const socket = new WebSocket(args.url, "graphql-ws");
let received = 0;

socket.on("open", () => {
  print({ event: "open", protocol: socket.protocol });
  socket.send(JSON.stringify({ type: "connection_init", payload: args.connectionParams }));
});

socket.on("message", (data) => {
  const message = JSON.parse(data.toString());
  print(message);
  if (message.type === "connection_ack") {
    socket.send(JSON.stringify({
      id: "1",
      type: "start",
      payload: { query: args.query, variables: args.variables ?? null },
    }));
  } else if (message.type === "data") {
    received += 1;
    if (received >= args.count) {
      socket.send(JSON.stringify({ id: "1", type: "stop" }));
      socket.send(JSON.stringify({ type: "connection_terminate" }));
    }
  }
});

socket.on("close", (code) => {
  print({ event: "closed", code });
  process.exit(0);
});
