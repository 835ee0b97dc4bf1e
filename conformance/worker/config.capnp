# workerd config serving the conformance reference object (conformance/worker/reference.js).
#
# conformance/run.py starts it as
#   workerd serve config.capnp --experimental --socket-fd http=<fd of a bound loopback socket>
# so the address below is only the default for running it by hand. `--experimental` is needed
# for the `unsafe_module` flag (workerd:unsafe's evict(), the forced-hibernation test hook).
# Durable Object storage goes to the disk service "do-storage" (run.py points it at a fresh
# temporary directory with `--directory-path do-storage=<dir>`): workerd's in-memory storage
# does not survive eviction, and the suite checks that storage does.
using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [
    (name = "conformance", worker = .referenceWorker),
    (name = "do-storage", disk = (path = "/tmp/trio-hibernate-conformance-do", writable = true)),
  ],
  sockets = [ (name = "http", address = "127.0.0.1:8787", http = (), service = "conformance") ],
);

const referenceWorker :Workerd.Worker = (
  modules = [ (name = "reference.js", esModule = embed "reference.js") ],
  compatibilityDate = "2026-11-01",
  compatibilityFlags = ["unsafe_module"],
  # enableSql: a SQLite-backed object, as Cloudflare recommends (ctx.storage.sql).
  durableObjectNamespaces = [
    (className = "Reference", uniqueKey = "trio-hibernate-conformance", enableSql = true),
  ],
  durableObjectStorage = (localDisk = "do-storage"),
  bindings = [ (name = "REF", durableObjectNamespace = "Reference") ],
);
