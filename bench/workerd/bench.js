// The workerd peer of the benchmark suite: the same two namespaces as bench/th_app.py.
//
//   /echo/<name>       one hibernatable Durable Object per name; it echoes every message and
//                      answers "ping" with "pong" by auto-response (without waking).
//   /broadcast/<name>  one object holds every socket of the room; a message from any of them
//                      is sent to all of them (getWebSockets() loop calling send).
//   /writer/<name>     (storage.capnp only) each message m: storage.put(m.slice(0, 4), m), then
//                      m is sent back; the output gate holds the reply until the write is
//                      durable (a SQLite-backed object on local disk).
//   /_stats            {"constructed": N}: Durable Object constructor runs so far (one
//                      isolate serves the whole process, so a module global counts them all).

import { DurableObject } from "cloudflare:workers";

let constructed = 0;

function acceptHibernatable(ctx) {
  const pair = new WebSocketPair();
  ctx.acceptWebSocket(pair[1]);
  return new Response(null, { status: 101, webSocket: pair[0] });
}

export class Echo extends DurableObject {
  constructor(ctx, env) {
    super(ctx, env);
    constructed += 1;
  }

  async fetch(request) {
    if (request.headers.get("upgrade") !== "websocket") {
      return new Response("WebSocket only", { status: 426 });
    }
    this.ctx.setWebSocketAutoResponse(new WebSocketRequestResponsePair("ping", "pong"));
    return acceptHibernatable(this.ctx);
  }

  async webSocketMessage(ws, message) {
    ws.send(message);
  }
}

export class Broadcast extends DurableObject {
  constructor(ctx, env) {
    super(ctx, env);
    constructed += 1;
  }

  async fetch(request) {
    if (request.headers.get("upgrade") !== "websocket") {
      return new Response("WebSocket only", { status: 426 });
    }
    return acceptHibernatable(this.ctx);
  }

  async webSocketMessage(ws, message) {
    for (const peer of this.ctx.getWebSockets()) {
      peer.send(message);
    }
  }
}

export class Writer extends DurableObject {
  constructor(ctx, env) {
    super(ctx, env);
    constructed += 1;
  }

  async fetch(request) {
    if (request.headers.get("upgrade") !== "websocket") {
      return new Response("WebSocket only", { status: 426 });
    }
    return acceptHibernatable(this.ctx);
  }

  async webSocketMessage(ws, message) {
    // Not awaited, as Cloudflare recommends: the output gate holds the send until the
    // put is durable, and puts of the next messages join the same write.
    this.ctx.storage.put(String(message).slice(0, 4), message);
    ws.send(message);
  }
}

const NAMESPACES = { echo: "ECHO", broadcast: "BROADCAST", writer: "WRITER" };

export default {
  async fetch(request, env) {
    const parts = new URL(request.url).pathname.split("/");
    if (parts[1] === "_stats") {
      return new Response(JSON.stringify({ constructed }), {
        headers: { "content-type": "application/json" },
      });
    }
    const namespace = env[NAMESPACES[parts[1]]];
    if (namespace === undefined || !parts[2]) {
      return new Response("expected /echo/<name>, /broadcast/<name> or /writer/<name>", {
        status: 404,
      });
    }
    return namespace.get(namespace.idFromName(parts[2])).fetch(request);
  },
};
