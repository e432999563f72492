// The quickstart page: plain browser APIs, no build step.
const host = location.hostname;
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const user = params.get("user") || "1";
$("user").value = user;
$("order-user").value = user;
$("user").onchange = () => { location.search = "?user=" + $("user").value; };

function add(list, text) {
  const li = document.createElement("li");
  li.textContent = text;
  $(list).prepend(li);
}

// Orders: POST to the http connector.
$("order-form").onsubmit = async (event) => {
  event.preventDefault();
  const order = {
    id: crypto.randomUUID().slice(0, 8),
    user_id: Number($("order-user").value),
    item: $("order-item").value,
    status: $("order-status").value,
  };
  const response = await fetch("/orders", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify(order),
  });
  $("order-result").textContent = `${response.status}: order ${order.id} for user ${order.user_id}`;
};

// Chat: the WebSocket connector, in room "lobby" from the handshake.
const chat = new WebSocket(`ws://${host}:8081/ws?user_id=${user}&rooms=lobby`);
chat.onmessage = (event) => {
  const frame = JSON.parse(event.data);
  if (frame.type === "joined") $("chat-status").textContent = `in room ${frame.room}`;
  if (frame.type === "message") add("chat-log", `${frame.data.user}: ${frame.data.text}`);
  if (frame.type === "error") $("chat-status").textContent = frame.message;
};
chat.onclose = () => { $("chat-status").textContent = "disconnected"; };
$("chat-form").onsubmit = (event) => {
  event.preventDefault();
  const text = $("chat-text").value;
  if (!text) return;
  chat.send(JSON.stringify({type: "message", data: {room: "lobby", user: "user " + user, text}}));
  $("chat-text").value = "";
};

// Feed: Server-Sent Events, filtered by ?user_id on the server.
const feed = new EventSource(`http://${host}:8082/events/orders?user_id=${user}`);
feed.onopen = () => { $("feed-status").textContent = "subscribed to stream orders"; };
feed.onmessage = (event) => {
  const order = JSON.parse(event.data);
  add("feed-log", `#${event.lastEventId} order ${order.id}: ${order.item} (${order.status})`);
};
feed.onerror = () => { $("feed-status").textContent = "reconnecting..."; };

// GraphQL: the graphql-transport-ws protocol, spoken by hand for brevity.
const gql = new WebSocket(`ws://${host}:8083/graphql/ws`, "graphql-transport-ws");
gql.onopen = () => gql.send(JSON.stringify({type: "connection_init", payload: {userId: user}}));
gql.onmessage = (event) => {
  const message = JSON.parse(event.data);
  if (message.type === "connection_ack") {
    gql.send(JSON.stringify({id: "1", type: "subscribe",
      payload: {query: "subscription { orderUpdated }"}}));
    $("gql-status").textContent = "subscribed to orderUpdated";
  } else if (message.type === "next") {
    const order = message.payload.data.orderUpdated;
    add("gql-log", `order ${order.id}: ${order.item} (${order.status})`);
  } else if (message.type === "ping") {
    gql.send(JSON.stringify({type: "pong"}));
  } else if (message.type === "error") {
    $("gql-status").textContent = JSON.stringify(message.payload);
  }
};
gql.onclose = (event) => { $("gql-status").textContent = `closed (${event.code})`; };
