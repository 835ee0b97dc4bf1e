// The conformance reference object for workerd: the same JSON command protocol as
// conformance/reference_object.py, so that one black-box suite can drive both.
// conformance/README.md describes the protocol; keep the two implementations in step.
//
// Routes (served by the Worker below):
//   GET  /conformance/info                  -> {"implementation", "capabilities"}
//   POST /conformance/evict/<ns>/<name>     -> {"ok": true, "evicted": bool}  (workerd:unsafe)
//   POST /conformance/evict-id/<ns>/<hex>   -> the same, for an object of a unique id
//   POST /conformance/unique/<ns>           -> {"ok": true, "id": newUniqueId().toString()}
//   GET  /ref-id/<hex>[/...]                -> forwarded with a stub to the object of that id
//   GET  /<ns>/<name>  (WebSocket upgrade)  -> accepted as a hibernatable WebSocket, with the
//                                              tags/attachment in the x-accept header (JSON)
//   GET  /<ns>/<name>/events | /stats       -> the same JSON as the "events" / "stats" ops

import unsafe from "workerd:unsafe";
import { DurableObject } from "cloudflare:workers";

// Constructor runs per object id. Module globals survive eviction within the isolate, and
// this config runs one isolate for the whole process, so the count spans every wake.
const constructorRuns = new Map();
// Object ids whose next construction throws (the "fail_next_construction" op).
const failNextConstruction = new Set();
// Object ids whose next construction runs a slow setup in blockConcurrencyWhile (the
// "slow_next_construction" op), and how long it sleeps, in ms.
const slowNextConstruction = new Map();

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const IMPLEMENTATION = "workerd";
// workerd hibernates an idle object after 10 s (server.c++); announced so that the idle
// case can wait for it.
const IDLE_TIMEOUT_S = 10;

function json(value, status = 200, headers = {}) {
  return new Response(JSON.stringify(value), {
    status,
    headers: { "content-type": "application/json", ...headers },
  });
}

// Map an exception to the protocol's error kinds (both implementations use these names).
function errorKind(err) {
  const message = String(err && err.message);
  if (err && err.name === "DataCloneError") return "data_clone";
  const kinds = [
    [/more than \d+ tags/, "too_many_tags"],
    [/longer than the max tag length/, "tag_too_long"],
    [/already accepted/, "already_accepted"],
    [/attachment' cannot be larger/, "attachment_too_large"],
    [/Invalid WebSocket close code/, "invalid_close_code"],
    [/must also specify a code/, "reason_without_code"],
    [/close reason must not be longer/, "reason_too_long"],
    [/(Request|Response) cannot be larger/, "auto_response_too_large"],
    [/send\(\) after close/, "send_after_close"],
    [/Event timeout should not exceed/, "event_timeout_too_large"],
    [/negative/, "event_timeout_negative"],
    [/not an integer/, "event_timeout_not_integer"],
    [/Could not serialize|could not be cloned/, "data_clone"],
  ];
  for (const [pattern, kind] of kinds) {
    if (pattern.test(message)) return kind;
  }
  return "other";
}

function failure(err) {
  return { ok: false, error: errorKind(err), message: String(err && err.message) };
}

function isCloseCodeSendable(code) {
  return code >= 1000 && code <= 4999 && ![1004, 1005, 1006, 1015].includes(code);
}

export class Reference extends DurableObject {
  constructor(ctx, env) {
    super(ctx, env);
    const key = ctx.id.toString();
    constructorRuns.set(key, (constructorRuns.get(key) || 0) + 1);
    if (failNextConstruction.delete(key)) {
      throw new Error("constructor failing on purpose (conformance suite)");
    }
    this.key = key;
    // In-memory only: lost on every eviction (the "remember"/"recall" ops).
    this.memo = null;
    // Whether this instance's slow setup has run (the "setup_state" op).
    this.setupDone = false;
    const setupMs = slowNextConstruction.get(key);
    if (setupMs !== undefined) {
      slowNextConstruction.delete(key);
      ctx.blockConcurrencyWhile(() => this.setup(setupMs));
    }
  }

  // The slow setup: sleeps, counts itself in storage, then marks the instance.
  async setup(ms) {
    await sleep(ms);
    const setups = ((await this.ctx.storage.get("setups")) ?? 0) + 1;
    await this.ctx.storage.put("setups", setups);
    this.setupDone = true;
  }

  // Run request.query; read request.read rows (all if absent) with raw(); report.
  sql(request) {
    let cursor;
    try {
      cursor = this.ctx.storage.sql.exec(request.query, ...(request.bindings ?? []));
    } catch (err) {
      return failure(err);
    }
    const rowsReadAtExec = cursor.rowsRead;
    const rows = [];
    const raw = cursor.raw();
    while (request.read === undefined || rows.length < request.read) {
      const next = raw.next();
      if (next.done) break;
      rows.push(next.value);
    }
    return {
      ok: true,
      columns: cursor.columnNames,
      rows,
      rows_read_at_exec: rowsReadAtExec,
      rows_read: cursor.rowsRead,
      rows_written: cursor.rowsWritten,
    };
  }

  async fetch(request) {
    const url = new URL(request.url);
    const rest = url.pathname.split("/").slice(3).join("/");
    if (request.headers.get("upgrade") !== "websocket") {
      if (rest === "events") return json(await this.eventsReply());
      if (rest === "stats") return json(await this.statsReply());
      return json({ ok: false, error: "not_found" }, 404);
    }
    let options = {};
    const header = request.headers.get("x-accept");
    if (header !== null) {
      try {
        options = JSON.parse(header);
      } catch (err) {
        return json({ ok: false, error: "bad_json", message: String(err) }, 400);
      }
    }
    const [client, server] = Object.values(new WebSocketPair());
    if ("attachment" in options) {
      try {
        server.serializeAttachment(options.attachment);
      } catch (err) {
        return json(failure(err), 400);
      }
    }
    try {
      if ("tags" in options) {
        this.ctx.acceptWebSocket(server, options.tags);
      } else {
        this.ctx.acceptWebSocket(server);
      }
    } catch (err) {
      return json(failure(err), 400);
    }
    const headers = {};
    if (options.twice) {
      let second = null;
      try {
        this.ctx.acceptWebSocket(server);
      } catch (err) {
        second = errorKind(err);
      }
      headers["x-second-accept"] = JSON.stringify(second);
    }
    return new Response(null, { status: 101, webSocket: client, headers });
  }

  async webSocketMessage(ws, message) {
    await this.countMessage();
    if (typeof message !== "string") {
      ws.send(message); // binary: echoed as binary
      return;
    }
    let request = null;
    try {
      request = JSON.parse(message);
    } catch {
      request = null;
    }
    if (request === null || typeof request !== "object" || typeof request.op !== "string") {
      ws.send(JSON.stringify({ echo: message }));
      return;
    }
    const reply = await this.handle(ws, request);
    if (reply !== null) {
      ws.send(JSON.stringify({ re: request.id ?? null, ...reply }));
    }
  }

  async webSocketClose(ws, code, reason, wasClean) {
    const record = {
      kind: "close",
      tags: this.ctx.getTags(ws),
      code,
      reason,
      was_clean: wasClean,
      ready_state: ws.readyState,
      attachment: ws.deserializeAttachment(),
      listed: this.ctx.getWebSockets().includes(ws),
    };
    // Reciprocate before awaiting anything, as workerd's docs ask of close handlers.
    const reply = (await this.ctx.storage.get("close_reply")) ?? true;
    if (reply) {
      try {
        if (isCloseCodeSendable(code)) ws.close(code, reason);
        else ws.close();
      } catch (err) {
        record.reply_error = errorKind(err);
      }
    }
    await this.appendEvent(record);
  }

  async webSocketError(ws, error) {
    await this.appendEvent({
      kind: "error",
      tags: this.ctx.getTags(ws),
      attachment: ws.deserializeAttachment(),
    });
  }

  // -- helpers -------------------------------------------------------------------------

  async countMessage() {
    const n = ((await this.ctx.storage.get("messages")) ?? 0) + 1;
    await this.ctx.storage.put("messages", n);
  }

  async appendEvent(record) {
    const events = (await this.ctx.storage.get("events")) ?? [];
    events.push(record);
    await this.ctx.storage.put("events", events);
  }

  async eventsReply() {
    return { ok: true, events: (await this.ctx.storage.get("events")) ?? [] };
  }

  async statsReply() {
    return {
      ok: true,
      implementation: IMPLEMENTATION,
      constructor_runs: constructorRuns.get(this.key) || 0,
      messages: (await this.ctx.storage.get("messages")) ?? 0,
    };
  }

  targets(ws, request) {
    return "tag" in request ? this.ctx.getWebSockets(request.tag) : [ws];
  }

  describe(ws, socket) {
    return {
      tags: this.ctx.getTags(socket),
      ready_state: socket.readyState,
      attachment: socket.deserializeAttachment(),
      self: socket === ws,
    };
  }

  // Returns the reply body, or null to send no reply.
  async handle(ws, request) {
    const ok = (fields = {}) => ({ ok: true, ...fields });
    switch (request.op) {
      case "stats":
        return await this.statsReply();
      case "events":
        return await this.eventsReply();
      case "remember":
        this.memo = request.value ?? null;
        return ok();
      case "recall":
        return ok({ value: this.memo });
      case "tags":
        return ok({ tags: this.ctx.getTags(ws) });
      case "ready_state":
        return ok({ ready_state: ws.readyState });
      case "get_attachment":
        return ok({ value: ws.deserializeAttachment() });
      case "set_attachment":
        try {
          ws.serializeAttachment(request.value);
        } catch (err) {
          return failure(err);
        }
        return ok();
      case "set_attachment_unclonable":
        try {
          ws.serializeAttachment({ f: () => 1 });
        } catch (err) {
          return failure(err);
        }
        return ok();
      case "attachment_copy_semantics": {
        const previous = ws.deserializeAttachment();
        const value = { list: [1] };
        ws.serializeAttachment(value);
        value.list.push(2);
        const first = ws.deserializeAttachment();
        first.list.push(3);
        const second = ws.deserializeAttachment();
        ws.serializeAttachment(previous);
        return ok({
          kept_mutation_after_set: second.list.includes(2),
          kept_mutation_of_copy: second.list.includes(3),
          fresh_copy_each_get: first !== second,
        });
      }
      case "list": {
        const sockets = "tag" in request ? this.ctx.getWebSockets(request.tag) : this.ctx.getWebSockets();
        return ok({ sockets: sockets.map((s) => this.describe(ws, s)) });
      }
      case "broadcast": {
        let count = 0;
        const sockets = "tag" in request ? this.ctx.getWebSockets(request.tag) : this.ctx.getWebSockets();
        for (const s of sockets) {
          if (s.readyState === 1) {
            s.send(JSON.stringify({ push: "broadcast", data: request.data ?? null }));
            count += 1;
          }
        }
        return ok({ count });
      }
      case "send": {
        const errors = [];
        for (const s of this.targets(ws, request)) {
          try {
            s.send(String(request.data));
            errors.push(null);
          } catch (err) {
            errors.push(errorKind(err));
          }
        }
        return ok({ errors });
      }
      case "close": {
        const args = [];
        if ("code" in request) args.push(request.code);
        if ("reason" in request) {
          if (args.length === 0) args.push(undefined);
          args.push(request.reason);
        }
        const targets = this.targets(ws, request);
        const self = !("tag" in request);
        const then = { send_errors: [], close_again_errors: [] };
        for (const s of targets) {
          try {
            s.close(...args);
          } catch (err) {
            return failure(err);
          }
          if ("then_send" in request) {
            try {
              s.send(String(request.then_send));
              then.send_errors.push(null);
            } catch (err) {
              then.send_errors.push(errorKind(err));
            }
          }
          if (request.then_close) {
            try {
              s.close(...args);
              then.close_again_errors.push(null);
            } catch (err) {
              then.close_again_errors.push(errorKind(err));
            }
          }
        }
        // Closing oneself leaves no way to reply: the Close frame is the answer.
        return self ? null : ok({ count: targets.length, ...then });
      }
      case "set_auto_response":
        try {
          if ("request" in request) {
            this.ctx.setWebSocketAutoResponse(
              new WebSocketRequestResponsePair(request.request, request.response),
            );
          } else {
            this.ctx.setWebSocketAutoResponse();
          }
        } catch (err) {
          return failure(err);
        }
        return ok();
      case "get_auto_response": {
        const pair = this.ctx.getWebSocketAutoResponse();
        return ok({ pair: pair === null ? null : [pair.request, pair.response] });
      }
      case "auto_response_timestamp": {
        const when = this.ctx.getWebSocketAutoResponseTimestamp(ws);
        return ok({ timestamp_ms: when === null ? null : when.getTime() });
      }
      case "set_event_timeout":
        try {
          if ("ms" in request && request.ms !== null) {
            this.ctx.setHibernatableWebSocketEventTimeout(request.ms);
          } else {
            this.ctx.setHibernatableWebSocketEventTimeout();
          }
        } catch (err) {
          return failure(err);
        }
        return ok();
      case "get_event_timeout":
        return ok({ ms: this.ctx.getHibernatableWebSocketEventTimeout() ?? null });
      case "set_close_reply":
        await this.ctx.storage.put("close_reply", Boolean(request.reply));
        return ok();
      case "sleep":
        await sleep(request.ms);
        return ok();
      case "fail_next_construction":
        failNextConstruction.add(this.key);
        return ok();
      case "slow_next_construction":
        slowNextConstruction.set(this.key, request.ms);
        return ok();
      case "setup_state":
        return ok({
          setup_done: this.setupDone,
          setups: (await this.ctx.storage.get("setups")) ?? 0,
        });
      case "block":
        await this.ctx.blockConcurrencyWhile(() => sleep(request.ms));
        return ok();
      case "sql":
        return this.sql(request);
      case "raise":
        throw new Error("raised on purpose by the conformance suite");
      default:
        return { ok: false, error: "unknown_op", message: `unknown op ${request.op}` };
    }
  }
}

const NAMESPACES = { ref: "REF" };

export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    const parts = url.pathname.split("/");
    if (parts[1] === "conformance") {
      if (parts[2] === "info" && request.method === "GET") {
        return json({
          implementation: IMPLEMENTATION,
          capabilities: { evict: true, idle_timeout_s: IDLE_TIMEOUT_S, forward: true, sql: true },
        });
      }
      if (parts[2] === "unique" && request.method === "POST" && parts.length === 4) {
        const binding = env[NAMESPACES[parts[3]]];
        if (binding === undefined) return json({ ok: false, error: "not_found" }, 404);
        return json({ ok: true, id: binding.newUniqueId().toString() });
      }
      const evicting = parts[2] === "evict" || parts[2] === "evict-id";
      if (evicting && request.method === "POST" && parts.length === 5) {
        const binding = env[NAMESPACES[parts[3]]];
        if (binding === undefined) return json({ ok: false, error: "not_found" }, 404);
        const key = decodeURIComponent(parts[4]);
        let id;
        try {
          id = parts[2] === "evict-id" ? binding.idFromString(key) : binding.idFromName(key);
        } catch (err) {
          return json({ ok: false, error: "bad_id", message: String(err) }, 400);
        }
        const stub = binding.get(id);
        try {
          await unsafe.evict(stub, { webSockets: "hibernate" });
        } catch (err) {
          if (/not currently running/.test(String(err && err.message))) {
            return json({ ok: true, evicted: false });
          }
          throw err;
        }
        return json({ ok: true, evicted: true });
      }
      return json({ ok: false, error: "not_found" }, 404);
    }
    if (parts[1] === "ref-id" && parts[2]) {
      // A Worker route of its own: forward (an upgrade too) to the object of that id.
      let id;
      try {
        id = env.REF.idFromString(parts[2]);
      } catch (err) {
        return json({ ok: false, error: "bad_id", message: String(err) }, 400);
      }
      return env.REF.get(id).fetch(request);
    }
    const bindingName = NAMESPACES[parts[1]];
    if (bindingName === undefined || !parts[2]) {
      return json({ ok: false, error: "not_found" }, 404);
    }
    const binding = env[bindingName];
    return binding.get(binding.idFromName(decodeURIComponent(parts[2]))).fetch(request);
  },
};
