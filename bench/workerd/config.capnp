# workerd config of the benchmark peer (bench/workerd/bench.js). bench/run.py starts it as
#   workerd serve config.capnp --socket-fd http=<fd of a bound loopback socket>
# so the address below is only the default for running it by hand. Durable Object storage is
# in memory (the benchmark objects store nothing).
using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [ (name = "bench", worker = .benchWorker) ],
  sockets = [ (name = "http", address = "127.0.0.1:8788", http = (), service = "bench") ],
);

const benchWorker :Workerd.Worker = (
  modules = [ (name = "bench.js", esModule = embed "bench.js") ],
  compatibilityDate = "2026-11-01",
  durableObjectNamespaces = [
    (className = "Echo", uniqueKey = "trio-hibernate-bench-echo"),
    (className = "Broadcast", uniqueKey = "trio-hibernate-bench-broadcast"),
  ],
  durableObjectStorage = (inMemory = void),
  bindings = [
    (name = "ECHO", durableObjectNamespace = "Echo"),
    (name = "BROADCAST", durableObjectNamespace = "Broadcast"),
  ],
);
