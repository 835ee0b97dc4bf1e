// The workerd peer of the benchmark suite: the same two namespaces as bench/th_app.py.
//
//   /echo/<name>       one hibernatable Durable Object per name; it echoes every message and
//                      answers "ping" with "pong" by auto-response (without waking).
//   /broadcast/<name>  one object holds every socket of the room; a message from any of them
//                      is sent to all of them (getWebSockets() loop calling send).
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

export default {
  async fetch(request, env) {
    const parts = new URL(request.url).pathname.split("/");
    if (parts[1] === "_stats") {
      return new Response(JSON.stringify({ constructed }), {
        headers: { "content-type": "application/json" },
      });
    }
    const namespace = parts[1] === "echo" ? env.ECHO : parts[1] === "broadcast" ? env.BROADCAST : null;
    if (namespace === null || !parts[2]) {
      return new Response("expected /echo/<name> or /broadcast/<name>", { status: 404 });
    }
    return namespace.get(namespace.idFromName(parts[2])).fetch(request);
  },
};
