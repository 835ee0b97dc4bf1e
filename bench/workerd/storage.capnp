# workerd config of the durable-writes peer: the Writer object of bench/workerd/bench.js, a
# SQLite-backed Durable Object (enableSql) stored on local disk. bench/run.py starts it as
#   workerd serve storage.capnp --socket-fd http=<fd> --directory-path do-storage=<empty dir>
# so the address and the path below are only the defaults for running it by hand.
using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [
    (name = "bench", worker = .storageWorker),
    (name = "do-storage", disk = (path = "/tmp/trio-hibernate-bench-do", writable = true)),
  ],
  sockets = [ (name = "http", address = "127.0.0.1:8789", http = (), service = "bench") ],
);

const storageWorker :Workerd.Worker = (
  modules = [ (name = "bench.js", esModule = embed "bench.js") ],
  compatibilityDate = "2026-11-01",
  durableObjectNamespaces = [
    (className = "Writer", uniqueKey = "trio-hibernate-bench-writer", enableSql = true),
  ],
  durableObjectStorage = (localDisk = "do-storage"),
  bindings = [ (name = "WRITER", durableObjectNamespace = "Writer") ],
);
